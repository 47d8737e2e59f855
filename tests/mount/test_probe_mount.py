"""Probing through real mounts: a format without a driver mounts nothing; a
raw image that was only probed refuses (EPERM) writes that would make it
probe as another format, however they are cut; format=raw allows them."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from tests.conftest import imgfs, is_mounted, mounted, need, run
from tests.drivers.test_probe import has_driver
from tests.probe_samples import CASES, refusal

MiB = 1 << 20


@pytest.mark.parametrize("case_id, fmt, build", CASES, ids=[case[0] for case in CASES])
def test_mount_refuses_and_mounts_nothing(case_id: str, fmt: str, build: object,
                                          tmp_path: Path, mnt: Path) -> None:
    if has_driver(fmt):
        pytest.skip(f"{fmt} has a driver now")
    image = build(tmp_path)  # type: ignore[operator]
    before = image.read_bytes()
    result = imgfs("mount", image.name, mnt, check=False, cwd=image.parent)
    assert (result.returncode, result.stderr) == (1, refusal(image.name, fmt))
    assert not is_mounted(mnt)
    assert image.read_bytes() == before


@pytest.mark.parametrize("case_id", ["vmdk-monolithicSparse", "vpc-fixed", "dmg-koly-only"])
def test_format_raw_mounts_the_file_bytes(case_id: str, tmp_path: Path, mnt: Path) -> None:
    build = {case[0]: case[2] for case in CASES}[case_id]
    image = build(tmp_path)
    with mounted(image, mountpoint=mnt, options="format=raw,ro"):
        assert (mnt / f"{image.stem}.raw").read_bytes() == image.read_bytes()


@pytest.fixture
def raw_disk(tmp_path: Path) -> Path:
    need("qemu-img")
    image = tmp_path / "disk.img"
    run("qemu-img", "create", "-q", "-f", "raw", image, "4M")
    return image


@pytest.fixture
def hostile_header(tmp_path: Path) -> bytes:
    """The first 4 KiB of a qcow2 image whose backing file is a host file
    outside the image's directory: what a guest must not be able to write."""
    need("qemu-img")
    evil = tmp_path / "evil.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "/etc/shadow", "-F", "raw",
        evil, "4M")
    return evil.read_bytes()[:4096]


def pwrite(path: Path, writes: list[tuple[int, bytes]]) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        for offset, data in writes:
            assert os.pwrite(fd, data, offset) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)


def assert_eperm(path: Path, offset: int, data: bytes) -> None:
    with pytest.raises(OSError) as caught:
        pwrite(path, [(offset, data)])
    assert caught.value.errno == errno.EPERM


def test_a_header_in_two_pieces_is_refused_when_raw_was_guessed(
        raw_disk: Path, hostile_header: bytes, mnt: Path) -> None:
    with mounted(raw_disk, mountpoint=mnt):
        exposed = mnt / "disk.raw"
        pwrite(exposed, [(4, hostile_header[4:])])      # no magic yet: a raw sector
        assert_eperm(exposed, 0, hostile_header[:4])    # the magic would complete it
        assert_eperm(exposed, 0, hostile_header[:512])  # and so would the whole sector
        pwrite(exposed, [(0, b"\x55\xaa\0\0")])         # anything else is written
    assert "file format: raw" in imgfs("info", raw_disk).stdout
    assert run("qemu-img", "info", "-f", "raw", raw_disk).returncode == 0
    assert raw_disk.read_bytes()[:4] == b"\x55\xaa\0\0"


def test_format_raw_allows_the_same_writes(raw_disk: Path, hostile_header: bytes,
                                           mnt: Path) -> None:
    with mounted(raw_disk, mountpoint=mnt, options="format=raw"):
        pwrite(mnt / "disk.raw", [(4, hostile_header[4:]), (0, hostile_header[:4])])
    # which is why a guessed raw refuses them: the file is now such a qcow2
    assert "backing file: /etc/shadow" in run("qemu-img", "info", "-U", raw_disk).stdout


def test_a_vmdk_descriptor_naming_host_files_is_refused(raw_disk: Path, mnt: Path) -> None:
    with mounted(raw_disk, mountpoint=mnt):
        exposed = mnt / "disk.raw"
        pwrite(exposed, [(512, b'\nRW 8192 FLAT "/etc/shadow" 0\n')])
        assert_eperm(exposed, 0, b"version=1\n")
        assert_eperm(exposed, 0, b"# Disk DescriptorFile\n")
    assert "file format: raw" in imgfs("info", raw_disk).stdout


def test_a_footer_at_the_end_is_refused(raw_disk: Path, mnt: Path) -> None:
    """imgfs finds a fixed VHD by its last 512 bytes (QEMU does not), so it
    guards them too."""
    size = raw_disk.stat().st_size
    with mounted(raw_disk, mountpoint=mnt):
        exposed = mnt / "disk.raw"
        pwrite(exposed, [(size - 508, b"ctix")])
        assert_eperm(exposed, size - 512, b"cone")
        assert_eperm(exposed, size - 512, b"koly")
        pwrite(exposed, [(size - 1024, b"conectix")])   # not where a footer is
    assert "file format: raw" in imgfs("info", raw_disk).stdout
