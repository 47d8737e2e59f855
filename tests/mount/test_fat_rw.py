"""Virtual FAT in rw mode through the real mount: what a guest writes (mtools
here; a vfat loop mount where the kernel has vfat) reaches the host
directory on fsync and at unmount; an inconsistent FAT changes nothing."""
from __future__ import annotations

import os
import struct
from pathlib import Path

from tests.conftest import mounted, need, run
from tests.drivers.test_fat import MTOOLS_ENV, PARTITION, host_listing, mdir_paths
from tests.mount.test_fat_mount import vfat_loop_mount


def make_rw_tree(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "gone").mkdir()
    (root / "empty dir").mkdir()
    (root / "one.txt").write_bytes(b"one\n")
    (root / "grows.txt").write_bytes(b"short\n")
    (root / "shrinks.bin").write_bytes(b"s" * 100_000)
    (root / "sub" / "keep.txt").write_bytes(b"keep me\n")
    (root / "gone" / "x.txt").write_bytes(b"bye\n")
    (root / "big.bin").write_bytes(os.urandom(300_000))
    return root


def mtools(*args: str | Path) -> None:
    run(*args, env=MTOOLS_ENV)


def test_mtools_changes_reach_the_host(tmp_path: Path, mnt: Path) -> None:
    need("mcopy", "mren", "mdel", "mmd", "mrd", "mdeltree", "mmove")
    tree = make_rw_tree(tmp_path / "share")
    expected = host_listing(tree)
    source = tmp_path / "source"
    source.mkdir()
    (source / "new.txt").write_bytes("nouveau ☃\n".encode())
    (source / "grown.txt").write_bytes(b"short\nand now much longer\n" * 50)
    (source / "shrunk.bin").write_bytes(b"s" * 10)
    with mounted(f"fat:rw:{tree}", mountpoint=mnt):
        disk = f"{mnt / 'share.raw'}@@{PARTITION}"
        mtools("mcopy", "-i", disk, source / "new.txt", "::/Nouveau fichier ☃.txt")
        mtools("mcopy", "-o", "-i", disk, source / "grown.txt", "::/grows.txt")
        mtools("mcopy", "-o", "-i", disk, source / "shrunk.bin", "::/shrinks.bin")
        mtools("mren", "-i", disk, "::/one.txt", "::/one renamed.txt")
        mtools("mmove", "-i", disk, "::/big.bin", "::/sub/big moved.bin")
        mtools("mdeltree", "-i", disk, "::/gone")
        mtools("mrd", "-i", disk, "::/empty dir")
        mtools("mmd", "-i", disk, "::/New Directory")
        mtools("mmd", "-i", disk, "::/New Directory/nested")
        mtools("mdel", "-i", disk, "::/sub/keep.txt")
    expected["Nouveau fichier ☃.txt"] = (source / "new.txt").read_bytes()
    expected["grows.txt"] = (source / "grown.txt").read_bytes()
    expected["shrinks.bin"] = b"s" * 10
    expected["one renamed.txt"] = expected.pop("one.txt")
    expected["sub/big moved.bin"] = expected.pop("big.bin")
    for path in ("gone", "gone/x.txt", "empty dir", "sub/keep.txt"):
        del expected[path]
    expected["New Directory"] = expected["New Directory/nested"] = None
    assert host_listing(tree) == expected
    assert not [name for name in os.listdir(tree) if name.startswith(".imgfs-")]


def test_renames_and_swaps_move_host_files(tmp_path: Path, mnt: Path) -> None:
    need("mren", "mmove")
    tree = make_rw_tree(tmp_path / "share")
    (tree / "Alpha File.txt").write_bytes(b"alpha\n")
    (tree / "Beta File.txt").write_bytes(b"beta, longer\n")
    expected = host_listing(tree)
    inode = (tree / "big.bin").stat().st_ino
    with mounted(f"fat:rw:{tree}", mountpoint=mnt):
        disk = f"{mnt / 'share.raw'}@@{PARTITION}"
        mtools("mren", "-i", disk, "::/Alpha File.txt", "::/Swap Space")
        mtools("mren", "-i", disk, "::/Beta File.txt", "::/Alpha File.txt")
        mtools("mren", "-i", disk, "::/Swap Space", "::/Beta File.txt")
        mtools("mmove", "-i", disk, "::/big.bin", "::/sub/moved big.bin")
        # the view keeps reading the moved file after a flush moved it
        fd = os.open(mnt / "share.raw", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        out = tmp_path / "moved.bin"
        mtools("mcopy", "-i", disk, "::/sub/moved big.bin", out)
        assert out.read_bytes() == expected["big.bin"]
    expected["Alpha File.txt"], expected["Beta File.txt"] = \
        expected["Beta File.txt"], expected["Alpha File.txt"]
    expected["sub/moved big.bin"] = expected.pop("big.bin")
    assert host_listing(tree) == expected
    assert (tree / "sub" / "moved big.bin").stat().st_ino == inode     # renamed, not copied


def test_fsync_applies_changes_before_unmount(tmp_path: Path, mnt: Path) -> None:
    need("mcopy")
    tree = make_rw_tree(tmp_path / "share")
    (tmp_path / "late.txt").write_bytes(b"written while mounted\n")
    with mounted(f"fat:rw:{tree}", mountpoint=mnt):
        disk = mnt / "share.raw"
        mtools("mcopy", "-i", f"{disk}@@{PARTITION}", tmp_path / "late.txt", "::/late.txt")
        assert not (tree / "late.txt").exists()
        fd = os.open(disk, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        assert (tree / "late.txt").read_bytes() == b"written while mounted\n"
        # the view still reads back everything, including the new file
        assert "late.txt" in mdir_paths(f"{disk}@@{PARTITION}")


def test_inconsistent_fat_leaves_the_host_untouched(tmp_path: Path, mnt: Path) -> None:
    need("mcopy")
    tree = make_rw_tree(tmp_path / "share")
    before = host_listing(tree)
    (tmp_path / "new.txt").write_bytes(b"never reaches the host\n")
    with mounted(f"fat:rw:16:{tree}", mountpoint=mnt):
        disk = mnt / "share.raw"
        mtools("mcopy", "-i", f"{disk}@@{PARTITION}", tmp_path / "new.txt", "::/new.txt")
        with open(disk, "r+b") as handle:
            handle.seek(PARTITION)
            boot = handle.read(512)
            reserved, fats = struct.unpack_from("<HB", boot, 14)
            fat_sectors = struct.unpack_from("<H", boot, 22)[0]
            for copy in range(fats):
                # free every cluster but the two reserved entries: all chains break
                handle.seek(PARTITION + (reserved + copy * fat_sectors) * 512 + 4)
                handle.write(bytes(fat_sectors * 512 - 4))
            handle.flush()
            os.fsync(handle.fileno())
            handle.seek(PARTITION + reserved * 512 + 4)
            assert handle.read(16) == bytes(16)       # the view keeps the writes
    assert host_listing(tree) == before


def test_vfat_loop_mount_changes_reach_the_host(tmp_path: Path, mnt: Path) -> None:
    tree = make_rw_tree(tmp_path / "share")
    with mounted(f"fat:rw:{tree}", mountpoint=mnt), \
            vfat_loop_mount(mnt / "share.raw", tmp_path / "vfat", read_only=False) as target:
        (target / "created ☃.txt").write_bytes(b"created\n")
        with open(target / "grows.txt", "ab") as handle:
            handle.write(b"appended\n")
        (target / "big.bin").write_bytes(b"overwritten")
        os.truncate(target / "shrinks.bin", 5)
        os.rename(target / "one.txt", target / "sub" / "one moved.txt")
        (target / "gone" / "x.txt").unlink()
        (target / "gone").rmdir()
        (target / "made" / "deeper").mkdir(parents=True)
    assert host_listing(tree) == {
        "big.bin": b"overwritten", "created ☃.txt": b"created\n", "empty dir": None,
        "grows.txt": b"short\nappended\n", "made": None, "made/deeper": None,
        "shrinks.bin": b"s" * 5, "sub": None, "sub/keep.txt": b"keep me\n",
        "sub/one moved.txt": b"one\n",
    }
