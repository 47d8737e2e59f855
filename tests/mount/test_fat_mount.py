"""Virtual FAT through the real mount: `imgfs mount fat:DIR MNT` shows
MNT/DIR.raw, checked with fsck.fat, mtools and (where the kernel has it)
a read-only vfat loop mount."""
from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import imgfs, mounted, need, need_root, run, unmount
from tests.drivers.test_fat import (
    MTOOLS_ENV,
    PARTITION,
    extract_partition,
    fsck_clean,
    host_listing,
    make_tree,
    mcopy_tree,
    mdir_paths,
)


def test_mount_shows_dir_raw_read_only(tmp_path: Path, mnt: Path) -> None:
    tree = make_tree(tmp_path / "share")
    with mounted(f"fat:{tree}", mountpoint=mnt):
        assert os.listdir(mnt) == ["share.raw"]
        disk = mnt / "share.raw"
        with pytest.raises(OSError) as caught:
            os.open(disk, os.O_WRONLY)
        assert caught.value.errno in (errno.EROFS, errno.EACCES)
        assert mcopy_tree(f"{disk}@@{PARTITION}", tmp_path / "out") == host_listing(tree)
        copy = tmp_path / "disk.raw"
        run("cp", "--sparse=always", disk, copy)
    fsck_clean(extract_partition(copy, tmp_path / "part.raw"))


def test_floppy_and_forced_types_through_the_mount(tmp_path: Path, mnt: Path) -> None:
    tree = make_tree(tmp_path / "share", many=10, big=10_000)
    with mounted(f"fat:floppy:{tree}", mountpoint=mnt):
        disk = mnt / "share.raw"
        assert disk.stat().st_size == 1474560
        assert mcopy_tree(str(disk), tmp_path / "floppy") == host_listing(tree)
    with mounted(f"fat:32:{tree}", mountpoint=mnt, options="name=thirty-two"):
        disk = mnt / "thirty-two.raw"
        run("cp", "--sparse=always", disk, tmp_path / "disk32.raw")
    report = fsck_clean(extract_partition(tmp_path / "disk32.raw", tmp_path / "part32.raw"))
    assert "32 bit entries" in report


def test_host_file_changed_after_mount_reads_as_eio(tmp_path: Path, mnt: Path) -> None:
    tree = make_tree(tmp_path / "share", many=5)
    (tree / "shrinks.bin").write_bytes(b"s" * 100_000)
    with mounted(f"fat:{tree}", mountpoint=mnt):
        disk = mnt / "share.raw"
        assert "shrinks.bin" in mdir_paths(f"{disk}@@{PARTITION}")
        os.truncate(tree / "shrinks.bin", 10)
        (tree / "README.TXT").unlink()
        with pytest.raises(OSError) as caught:
            disk.read_bytes()
        assert caught.value.errno == errno.EIO
        # one request failed; the mount is still there and the rest reads
        assert "crowd" in mdir_paths(f"{disk}@@{PARTITION}")
        need("mtype")
        result = run("mtype", "-i", f"{disk}@@{PARTITION}", "::/shrinks.bin", check=False,
                     env=MTOOLS_ENV)
        assert result.returncode != 0
        listing = run("mtype", "-i", f"{disk}@@{PARTITION}", "::/.hidden", env=MTOOLS_ENV)
        assert listing.stdout == "dot file\n"


def test_ten_thousand_files_mount_in_under_two_seconds(tmp_path: Path, mnt: Path) -> None:
    tree = tmp_path / "many"
    for directory in range(100):
        folder = tree / f"folder {directory:03d}"
        folder.mkdir(parents=True)
        for number in range(100):
            (folder / f"a file called {number:03d}.txt").write_bytes(b"%d\n" % number)
    # Best of two: the first mount may pay for a cold dentry cache or a
    # loaded machine; the limit is about imgfs, not about the neighbours.
    timings = []
    for _attempt in range(2):
        started = time.monotonic()
        imgfs("mount", f"fat:{tree}", mnt)
        timings.append(time.monotonic() - started)
        if timings[-1] < 2.0:
            break
        unmount(mnt)
    try:
        assert min(timings) < 2.0, f"mounting 10,000 files took {timings} s"
        paths = mdir_paths(f"{mnt / 'many.raw'}@@{PARTITION}")
        assert len(paths) == 100 + 10_000
        assert "folder 099/a file called 099.txt" in paths
    finally:
        unmount(mnt)


@contextlib.contextmanager
def vfat_loop_mount(disk: Path, target: Path, *, read_only: bool) -> Iterator[Path]:
    """The partition of `disk` loop-mounted as vfat at `target`; skips where
    the kernel has no vfat (loop devices here do not scan partitions, so the
    partition is reached with an offset)."""
    need_root()
    need("losetup")
    target.mkdir(exist_ok=True)
    flags = ["-r"] if read_only else []
    loop = run("losetup", *flags, "-f", "--show", "-o", str(PARTITION), disk).stdout.strip()
    try:
        options = "ro,utf8" if read_only else "utf8"
        result = run("mount", "-t", "vfat", "-o", options, loop, target, check=False)
        if result.returncode != 0:
            pytest.skip(f"this kernel cannot mount vfat: {result.stderr.strip()}")
        try:
            yield target
        finally:
            run("umount", target)
    finally:
        run("losetup", "-d", loop)


def test_vfat_loop_mount_shows_the_same_tree(tmp_path: Path, mnt: Path) -> None:
    tree = make_tree(tmp_path / "share", many=30)
    with mounted(f"fat:{tree}", mountpoint=mnt), \
            vfat_loop_mount(mnt / "share.raw", tmp_path / "vfat", read_only=True) as target:
        assert host_listing(target) == host_listing(tree)
