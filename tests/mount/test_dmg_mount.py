"""DMG (UDIF) images through a real FUSE mount: read-only by default, read
as qemu-img (zlib, raw, zero chunks) or dmg2img (bzip2, ADC) reads them;
`-o rw` refused in one line; a damaged chunk is EIO for the requests that
meet it and the mount stays up.
"""
from __future__ import annotations

import errno
import os
import zlib
from pathlib import Path

import pytest

from tests.conftest import imgfs, is_mounted, mounted, need, qemu_raw, run
from tests.dmg_images import ADC, BZIP2, ZLIB, Chunk, Image, Partition, build, pattern
from tests.drivers.test_dmg import kinds_image, mixed_image, pydmg_image, sample_dmg

KiB = 1024
MiB = 1024 * KiB


def assert_view_reads(view: Path, expected: bytes) -> None:
    assert view.stat().st_size == len(expected)
    assert view.read_bytes() == expected
    with open(view, "rb") as handle:
        for offset, length in [(1, 100), (MiB - 7, 300), (len(expected) - 7, 7),
                               (4096 * 3 + 17, 200_000)]:
            assert os.pread(handle.fileno(), length, offset) == \
                expected[offset:offset + length]


@pytest.mark.parametrize("name", ["sample", "mixed"])
def test_reads_like_qemu_read_only(tmp_path: Path, mnt: Path, name: str) -> None:
    image = sample_dmg(tmp_path) if name == "sample" else mixed_image(tmp_path)
    expected = qemu_raw(image, tmp_path / "expected.raw")
    with mounted(image, mountpoint=mnt):
        view = mnt / (image.stem + ".raw")
        assert_view_reads(view, expected)
        assert view.stat().st_mode & 0o222 == 0
        with pytest.raises(OSError) as info:
            os.open(view, os.O_WRONLY)
        assert info.value.errno in (errno.EROFS, errno.EACCES, errno.EPERM)


@pytest.mark.parametrize("kind", [BZIP2, ADC], ids=["bzip2", "adc"])
def test_kinds_read_like_dmg2img(tmp_path: Path, mnt: Path, kind: int) -> None:
    need("dmg2img")
    image, data = kinds_image(tmp_path, kind)
    run("dmg2img", "-s", image, tmp_path / "dmg2img.raw")
    assert (tmp_path / "dmg2img.raw").read_bytes() == data
    with mounted(image, mountpoint=mnt):
        assert_view_reads(mnt / (image.stem + ".raw"), data)


def test_read_write_mount_is_refused(tmp_path: Path, mnt: Path) -> None:
    image = mixed_image(tmp_path)
    result = imgfs("mount", "-o", "rw", image, mnt, check=False, timeout=60)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"imgfs: {image}: dmg images can only be opened read-only (use -o ro)"]
    assert not is_mounted(mnt)


def test_damaged_chunks_are_eio_and_the_mount_stays_up(tmp_path: Path, mnt: Path) -> None:
    """A chunk of corrupt zlib bytes and a bomb (64 MiB of zeros declared
    as 64 KiB): EIO for the requests that meet them, the rest reads."""
    good = pattern(64 * KiB)
    bomb = zlib.compress(bytes(64 * MiB))
    corrupt = bytearray(zlib.compress(pattern(64 * KiB, 2)))
    corrupt[10:20] = bytes(10)
    image = tmp_path / "damaged.dmg"
    image.write_bytes(build(Image([Partition([
        Chunk(ZLIB, 128, good), Chunk(ZLIB, 128, stored=bytes(corrupt)),
        Chunk(ZLIB, 128, stored=bomb), Chunk(ZLIB, 128, good)])])))
    with mounted(image, mountpoint=mnt):
        view = mnt / "damaged.raw"
        fd = os.open(view, os.O_RDONLY)
        try:
            for offset in (64 * KiB, 128 * KiB + 4096):
                with pytest.raises(OSError) as info:
                    os.pread(fd, 4096, offset)
                assert info.value.errno == errno.EIO
            assert os.pread(fd, 64 * KiB, 0) == good
            assert os.pread(fd, 64 * KiB, 192 * KiB) == good
        finally:
            os.close(fd)
        assert is_mounted(mnt)


def test_pydmg_partition_is_a_fat_volume(tmp_path: Path, mnt: Path) -> None:
    """The MBR and FAT32 tables of a pydmg image are one disk; its partition
    file holds the FAT volume with the files pydmg was given.  (No fsck:
    pydmg's FAT writer leaves out the '.' and '..' entries of directories.)"""
    need("mcopy")
    image = pydmg_image(tmp_path)
    with mounted(image, mountpoint=mnt, options="partitions"):
        volume = mnt / "pydmg-p1.raw"
        run("mcopy", "-i", volume, "::/tree/text.txt", tmp_path / "text.txt")
    assert (tmp_path / "text.txt").read_bytes() == b"hello dmg\n" * 50_000
