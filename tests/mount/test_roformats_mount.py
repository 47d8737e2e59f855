"""Bochs and cloop through a real FUSE mount: reads agree with ``qemu-img
convert -O raw``; the mount is read-only by default (the mount table
says so), ``-o rw`` is refused in one line naming the format and mounts
nothing, ``-o snapshot`` gives a writable view that leaves the image as
it was; a damaged chunk is EIO for its own reads and the mount stays up."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from tests.conftest import (
    MOUNT_HELPER,
    imgfs,
    is_mounted,
    mounted,
    qemu_raw,
    run,
    sha256,
    unmount,
)
from tests.roformat_images import (
    BochsLayout,
    KiB,
    MiB,
    bximage_growing,
    cloop_image,
    create_compressed_fs,
    deflate,
    raw_disk,
)


def mount_options(mountpoint: Path) -> list[str]:
    target = os.path.realpath(mountpoint)
    with open("/proc/self/mountinfo") as table:
        for line in table:
            fields = line.split()
            if fields[4] == target:
                return fields[5].split(",")
    raise AssertionError(f"{mountpoint} not mounted")


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    flat = tmp_path / "flat.img"
    raw_disk(flat, 3 * MiB, seed=11)
    grown = tmp_path / "grown.bochs"
    bximage_growing(flat, grown)
    crafted = tmp_path / "crafted.bochs"
    BochsLayout(disk=1 * MiB, version=0x00010000,
                stored=[(100, 0xF0), (0, 0xFF), (1, 0x81)]).write(crafted)
    packed = tmp_path / "packed.cloop"
    create_compressed_fs(flat, packed, 64 * KiB)
    return [grown, crafted, packed]


def test_reads_agree_with_qemu_read_only(images: list[Path], tmp_path: Path,
                                         mnt: Path) -> None:
    before = [sha256(image) for image in images]
    with mounted(*images, mountpoint=mnt):
        assert "ro" in mount_options(mnt)
        for image in images:
            view = mnt / f"{image.stem}.raw"
            assert view.read_bytes() == qemu_raw(image, tmp_path / "expected.raw")
            with pytest.raises(OSError) as caught:
                os.open(view, os.O_WRONLY)
            assert caught.value.errno in (errno.EROFS, errno.EACCES)
    assert [sha256(image) for image in images] == before


@pytest.mark.parametrize("index, fmt", [(0, "bochs"), (2, "cloop")])
def test_rw_is_refused_in_one_line(images: list[Path], mnt: Path, index: int,
                                   fmt: str) -> None:
    image = images[index]
    result = imgfs("mount", "-o", "rw", image.name, mnt, check=False, cwd=image.parent)
    assert (result.returncode, result.stderr) == (
        1, f"imgfs: {image.name}: {fmt} images can only be opened read-only (use -o ro)\n")
    assert not is_mounted(mnt)


def test_snapshot_gives_a_writable_view(images: list[Path], tmp_path: Path,
                                        mnt: Path) -> None:
    image = images[2]
    before = sha256(image)
    expected = bytearray(qemu_raw(image, tmp_path / "expected.raw"))
    with mounted(image, mountpoint=mnt, options="snapshot"):
        view = mnt / "packed.raw"
        with open(view, "r+b") as handle:
            handle.seek(100 * KiB)
            handle.write(b"\x5a" * 8 * KiB)
        expected[100 * KiB:108 * KiB] = b"\x5a" * 8 * KiB
        assert view.read_bytes() == expected
    assert sha256(image) == before


def test_damaged_chunks_are_eio_and_the_mount_stays_up(tmp_path: Path, mnt: Path) -> None:
    """Chunk 1 empty, chunk 2 a bomb, chunk 3 cut short: EIO for the reads
    that meet them (qemu-img fails them too); chunks 0 and 4 read."""
    block = 64 * KiB
    good = [bytes([index + 1]) * block for index in range(5)]
    chunks = [deflate(good[0]), b"", deflate(bytes(4 * block)), deflate(good[3])[:-20],
              deflate(good[4])]
    image = tmp_path / "damaged.cloop"
    cloop_image(image, block, chunks)
    with mounted(image, mountpoint=mnt):
        fd = os.open(mnt / "damaged.raw", os.O_RDONLY)
        try:
            for index in (1, 2, 3):
                with pytest.raises(OSError) as caught:
                    os.pread(fd, 4 * KiB, index * block + 8 * KiB)
                assert caught.value.errno == errno.EIO
            assert os.pread(fd, block, 0) == good[0]
            assert os.pread(fd, block, 4 * block) == good[4]
        finally:
            os.close(fd)
        assert is_mounted(mnt)


def test_mount_helper_mounts_read_only_formats_read_only(images: list[Path],
                                                         mnt: Path) -> None:
    """mount(8) hands mount.imgfs `-o rw` unless told ro: for a bochs or
    cloop image that is its default, and the mount is read-only."""
    for image in (images[0], images[2]):
        run(MOUNT_HELPER, image, mnt, "-o", "rw")
        try:
            assert "ro" in mount_options(mnt)
            assert (mnt / f"{image.stem}.raw").stat().st_size > 0
        finally:
            unmount(mnt)
