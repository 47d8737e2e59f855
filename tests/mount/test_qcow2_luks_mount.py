"""qcow2 ``encrypt.format=luks`` through a real FUSE mount: the mount's
key-secret reaches the driver, writes come back through QEMU, a wrong
passphrase mounts nothing."""
from __future__ import annotations

from pathlib import Path

from tests.conftest import (
    assert_wrong_passphrase_mounts_nothing,
    imgfs,
    is_mounted,
    mounted,
    need,
    pwrite_all,
    random_bytes,
    unmount,
)
from tests.drivers.test_qcow2_luks import (
    QEMU_WRITES,
    SECRET,
    create_encrypted,
    expected_after_qemu_writes,
    qemu_check,
    qemu_contents,
    qemu_io,
)

MiB = 1 << 20


def fill(image: Path) -> None:
    qemu_io(image, *(f"write -P {pattern:#x} {offset} {length}"
                     for offset, length, pattern in QEMU_WRITES))


def test_read_write_through_the_mount(tmp_path: Path, mnt: Path) -> None:
    need("qemu-img", "qemu-io")
    image = tmp_path / "disk.qcow2"
    create_encrypted(image)
    fill(image)
    expected = bytearray(qemu_contents(image, tmp_path))
    assert expected[:MiB - 512] == b"\x5a" * (MiB - 512)
    with mounted(image, mountpoint=mnt, options="key-secret=sec0", extra=tuple(SECRET)):
        exposed = next(mnt.iterdir())
        assert exposed.stat().st_size == len(expected)
        assert exposed.read_bytes() == expected
        pwrite_all(exposed, [(3 * MiB + 100, b"through the mount" * 30),
                             (9 * MiB + 1, random_bytes(300_000, seed=7)),
                             (511, b"straddles a sector")], expected)
    qemu_check(image)
    assert qemu_contents(image, tmp_path) == expected


def test_wrong_passphrase_mounts_nothing(tmp_path: Path, mnt: Path) -> None:
    need("qemu-img")
    image = tmp_path / "disk.qcow2"
    create_encrypted(image, 2 * MiB)
    assert_wrong_passphrase_mounts_nothing(image, mnt)


def test_read_only_mount_of_qemu_image(tmp_path: Path, mnt: Path) -> None:
    need("qemu-img", "qemu-io")
    image = tmp_path / "disk.qcow2"
    create_encrypted(image)
    fill(image)
    before = image.read_bytes()
    with mounted(image, mountpoint=mnt, options="ro,key-secret=sec0", extra=tuple(SECRET)):
        assert next(mnt.iterdir()).read_bytes() == expected_after_qemu_writes()
    assert image.read_bytes() == before


def test_legacy_aes_mounts_read_only_only(tmp_path: Path, mnt: Path) -> None:
    """Legacy qcow2 AES: refused read-write (one line, nothing mounted);
    with -o ro it mounts, reads what QEMU reads, and warns."""
    from tests.drivers.test_qcow2_aes import WARNING, create_aes, expected

    need("qemu-img", "qemu-io")
    image = tmp_path / "aes.qcow2"
    create_aes(image)
    before = image.read_bytes()
    result = imgfs("mount", *SECRET, "-o", "key-secret=sec0", image, mnt, check=False)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert WARNING in result.stderr and "-o ro" in result.stderr
    assert not is_mounted(mnt)
    with mounted(image, mountpoint=mnt, options="ro,key-secret=sec0", extra=tuple(SECRET)):
        assert next(mnt.iterdir()).read_bytes() == expected()
    assert image.read_bytes() == before
    result = imgfs("mount", *SECRET, "-o", "ro,key-secret=sec0", image, mnt, timeout=60)
    try:
        assert WARNING in result.stderr
    finally:
        unmount(mnt)
