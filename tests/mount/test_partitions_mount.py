"""-o partitions: each MBR/GPT partition as <name>-p<N>.raw beside the disk.

Tables are written by sfdisk; each partition file must hold exactly the
bytes `qemu-img convert -O raw` puts at the partition's range; an ext4 made
by mkfs.ext4 on a partition file mounts with `mount -o loop` and passes
`fsck.ext4 -n` seen through the whole-disk file; writes through either file
are read back through the other; a table changed through the disk's file
shows at the next listing; damaged tables leave the whole disk, with a
warning naming the problem.
"""
from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import (
    imgfs,
    is_mounted,
    mounted,
    need,
    need_root,
    qemu_raw,
    random_bytes,
    run,
    unmount,
)

MiB = 1 << 20
SECTOR = 512
MBR_LOGICAL = "label: dos\n1MiB,12MiB,83\n,6MiB,83\n,,5\n,4MiB,83\n,3MiB,83\n"
GPT_FIVE = "label: gpt\n,12MiB\n,3MiB\n,5MiB\n,2MiB\n,3MiB\n"


def partitioned(path: Path, script: str, size: int = 40 * MiB) -> dict[int, tuple[int, int]]:
    """A raw disk partitioned by sfdisk, every byte random (the tables
    rewritten after): {number: (offset, length)} as sfdisk lists them."""
    need("sfdisk")
    path.write_bytes(random_bytes(size, seed=len(script)))
    run("sfdisk", "-q", "--wipe", "never", path, input=script.encode())
    listing = json.loads(run("sfdisk", "-J", path).stdout)["partitiontable"]["partitions"]
    return {int(entry["node"][len(str(path)):]): (entry["start"] * SECTOR, entry["size"] * SECTOR)
            for entry in listing if entry["type"] not in ("5", "f", "85")}


def as_qcow2(raw: Path) -> Path:
    need("qemu-img")
    image = raw.with_suffix(".qcow2")
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, image)
    raw.unlink()
    return image


def partition_names(mnt: Path, stem: str) -> list[str]:
    return sorted(name for name in os.listdir(mnt) if name.startswith(f"{stem}-p"))


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("script", [MBR_LOGICAL, GPT_FIVE], ids=["mbr-logical", "gpt-5"])
def test_partition_files_hold_the_partitions(workdir: Path, mnt: Path, fmt: str,
                                             script: str) -> None:
    layout = partitioned(workdir / "vm.img", script)
    image = workdir / "vm.img" if fmt == "raw" else as_qcow2(workdir / "vm.img")
    expected = qemu_raw(image, workdir / "expected.raw")
    with mounted(image, mountpoint=mnt, options=f"partitions,format={fmt}"):
        assert partition_names(mnt, "vm") == sorted(f"vm-p{n}.raw" for n in layout)
        for number, (offset, length) in layout.items():
            view = mnt / f"vm-p{number}.raw"
            assert view.stat().st_size == length
            assert view.read_bytes() == expected[offset:offset + length]
        assert (mnt / "vm.raw").read_bytes() == expected


def test_writes_are_coherent_between_disk_and_partition(workdir: Path, mnt: Path) -> None:
    layout = partitioned(workdir / "vm.img", MBR_LOGICAL)
    image = as_qcow2(workdir / "vm.img")
    offset, _length = layout[5]
    with mounted(image, mountpoint=mnt, options="partitions"):
        disk, part = mnt / "vm.raw", mnt / "vm-p5.raw"
        with open(disk, "rb") as disk_reader, open(part, "rb") as part_reader:
            # both read first, so that any cache would hold the old bytes
            assert os.pread(disk_reader.fileno(), 4096, offset + 8192) == \
                os.pread(part_reader.fileno(), 4096, 8192)
            write_at(part, 8192, b"\x5a" * 4096)
            assert os.pread(disk_reader.fileno(), 4096, offset + 8192) == b"\x5a" * 4096
            write_at(disk, offset + 12288, b"\xa5" * 4096)
            assert os.pread(part_reader.fileno(), 4096, 12288) == b"\xa5" * 4096
    run("qemu-img", "check", image)
    run("qemu-io", "-r", "-f", "qcow2", "-c", f"read -P 0x5a {offset + 8192} 4k",
        "-c", f"read -P 0xa5 {offset + 12288} 4k", image)


def write_at(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        assert os.pwrite(fd, data, offset) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)


def test_partition_files_end_at_the_partition(workdir: Path, mnt: Path) -> None:
    layout = partitioned(workdir / "vm.img", GPT_FIVE)
    _offset, length = layout[2]
    with mounted(workdir / "vm.img", mountpoint=mnt, options="partitions,format=raw"):
        part = mnt / "vm-p2.raw"
        fd = os.open(part, os.O_WRONLY)
        try:
            assert os.pwrite(fd, b"x" * 8192, length - 4096) == 4096
            with pytest.raises(OSError):
                os.pwrite(fd, b"x", length)
            with pytest.raises(OSError):
                os.truncate(part, length + 4096)
        finally:
            os.close(fd)
        assert part.stat().st_size == length


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_ext4_made_on_a_partition_file(workdir: Path, mnt: Path, fmt: str) -> None:
    need("mkfs.ext4", "fsck.ext4", "losetup")
    layout = partitioned(workdir / "vm.img", MBR_LOGICAL)
    image = workdir / "vm.img" if fmt == "raw" else as_qcow2(workdir / "vm.img")
    offset, length = layout[1]
    inner = workdir / "inner"
    inner.mkdir()
    with mounted(image, mountpoint=mnt, options=f"partitions,format={fmt}"):
        run("mkfs.ext4", "-q", "-F", mnt / "vm-p1.raw")
        with loop_mounted(mnt / "vm-p1.raw", inner):
            (inner / "hello.txt").write_bytes(b"hello from a partition file\n" * 1000)
        with loop_device(mnt / "vm.raw", offset, length) as device:
            run("fsck.ext4", "-n", "-f", device)
        with loop_mounted(mnt / "vm-p1.raw", inner, "ro"):
            assert (inner / "hello.txt").read_bytes() == b"hello from a partition file\n" * 1000
    if fmt == "qcow2":
        run("qemu-img", "check", image)
    # and what QEMU sees of the disk holds the same file system
    disk = workdir / "after.raw"
    qemu_raw(image, disk)
    with loop_device(disk, offset, length) as device:
        run("fsck.ext4", "-n", "-f", device)


@contextlib.contextmanager
def loop_device(path: Path, offset: int, length: int) -> Iterator[str]:
    device = run("losetup", "-f", "--show", "-r", "-o", str(offset), "--sizelimit",
                 str(length), path).stdout.strip()
    try:
        yield device
    finally:
        run("losetup", "-d", device, check=False)


@contextlib.contextmanager
def loop_mounted(path: Path, target: Path, extra: str = "rw") -> Iterator[None]:
    run("mount", "-t", "ext4", "-o", f"loop,{extra}", path, target)
    try:
        yield
    finally:
        run("umount", target)


@pytest.mark.parametrize("script", ["label: dos\n,8MiB\n,,5\n,4MiB\n,4MiB\n",
                                    "label: gpt\n,8MiB\n,4MiB\n"], ids=["mbr", "gpt"])
def test_device_with_4096_byte_sectors(workdir: Path, mnt: Path, script: str) -> None:
    """A host block device that says its sectors are 4 KiB (a loop device
    made so): its table counts in 4 KiB sectors, as sfdisk wrote it."""
    need("sfdisk", "losetup")
    need_root()
    backing = workdir / "disk.img"
    backing.write_bytes(random_bytes(40 * MiB, seed=7))
    device = run("losetup", "-f", "--show", "--sector-size", "4096", backing).stdout.strip()
    try:
        run("sfdisk", "-q", "--wipe", "never", device, input=script.encode(), check=False)
        listing = json.loads(run("sfdisk", "-J", device).stdout)["partitiontable"]
        assert listing["sectorsize"] == 4096
        content = backing.read_bytes()
        stem = os.path.basename(device)
        with mounted(device, mountpoint=mnt, options="partitions"):
            names = []
            for entry in listing["partitions"]:
                if entry["type"] in ("5", "f", "85"):
                    continue
                name = f"{stem}-p{entry['node'][len(device):].lstrip('p')}.raw"
                names.append(name)
                offset, length = entry["start"] * 4096, entry["size"] * 4096
                assert (mnt / name).read_bytes() == content[offset:offset + length]
            assert partition_names(mnt, stem) == sorted(names)
    finally:
        run("losetup", "-d", device, check=False)


def test_table_changed_through_the_disk_is_read_again(workdir: Path, mnt: Path) -> None:
    partitioned(workdir / "vm.img", "label: gpt\n,4MiB\n,4MiB\n")
    with mounted(workdir / "vm.img", mountpoint=mnt, options="partitions,format=raw"):
        assert partition_names(mnt, "vm") == ["vm-p1.raw", "vm-p2.raw"]
        run("sfdisk", "-q", "--append", mnt / "vm.raw", input=b",6MiB\n")
        assert partition_names(mnt, "vm") == ["vm-p1.raw", "vm-p2.raw", "vm-p3.raw"]
        assert (mnt / "vm-p3.raw").stat().st_size == 6 * MiB
        run("sfdisk", "-q", "--delete", mnt / "vm.raw", "1")
        assert partition_names(mnt, "vm") == ["vm-p2.raw", "vm-p3.raw"]
        assert not (mnt / "vm-p1.raw").exists()


def test_protective_mbr_only(workdir: Path, mnt: Path) -> None:
    partitioned(workdir / "vm.img", GPT_FIVE)
    with open(workdir / "vm.img", "r+b") as disk:
        disk.seek(SECTOR)
        disk.write(bytes(SECTOR))                      # the primary header
        disk.seek(-SECTOR, os.SEEK_END)
        disk.write(bytes(SECTOR))                      # the backup header
    result = imgfs("mount", "-o", "partitions,format=raw", "vm.img", mnt, cwd=workdir)
    try:
        assert result.stderr == ("imgfs: vm.img: protective MBR without a valid GPT (primary "
                                 "and backup headers damaged or missing): no partitions\n")
        assert os.listdir(mnt) == ["vm.raw"]
    finally:
        unmount(mnt)


def test_damaged_primary_gpt_uses_the_backup(workdir: Path, mnt: Path) -> None:
    layout = partitioned(workdir / "vm.img", GPT_FIVE)
    expected = (workdir / "vm.img").read_bytes()
    with open(workdir / "vm.img", "r+b") as disk:
        disk.seek(SECTOR + 60)                         # the disk GUID: the CRC fails
        disk.write(b"\xff")
    result = imgfs("mount", "-o", "partitions,format=raw", "vm.img", mnt, cwd=workdir)
    try:
        assert result.stderr == ("imgfs: vm.img: primary GPT header is invalid (header CRC "
                                 "mismatch): using the backup GPT\n")
        assert partition_names(mnt, "vm") == sorted(f"vm-p{n}.raw" for n in layout)
        offset, length = layout[3]
        assert (mnt / "vm-p3.raw").read_bytes() == expected[offset:offset + length]
    finally:
        unmount(mnt)


def test_entry_past_the_end_is_not_exposed(workdir: Path, mnt: Path) -> None:
    partitioned(workdir / "vm.img", "label: dos\n1MiB,4MiB\n,4MiB\n,4MiB\n")
    with open(workdir / "vm.img", "r+b") as disk:
        disk.seek(446 + 16 + 12)                       # partition 2's sector count
        disk.write(struct.pack("<I", 200 * MiB // SECTOR))
    result = imgfs("mount", "-o", "partitions,format=raw", workdir / "vm.img", mnt)
    try:
        assert "partition 2 (sectors" in result.stderr and "not exposed" in result.stderr
        assert sorted(os.listdir(mnt)) == ["vm-p1.raw", "vm-p3.raw", "vm.raw"]
    finally:
        unmount(mnt)


def test_read_only_mount_has_read_only_partitions(workdir: Path, mnt: Path) -> None:
    partitioned(workdir / "vm.img", GPT_FIVE)
    with mounted(workdir / "vm.img", mountpoint=mnt, options="ro,partitions,format=raw"):
        with pytest.raises(OSError):
            os.open(mnt / "vm-p1.raw", os.O_WRONLY)


def test_partitions_need_a_directory_mountpoint(workdir: Path) -> None:
    image = workdir / "vm.img"
    partitioned(image, GPT_FIVE)
    target = workdir / "target.raw"
    target.write_bytes(b"")
    result = imgfs("mount", "-o", "partitions,format=raw", image, target, check=False)
    assert result.returncode == 2
    assert result.stderr == "imgfs: partitions needs a directory mountpoint\n"
    assert not is_mounted(target)
