"""qcow (version 1) through a real FUSE mount: reads agree with
``qemu-img convert -O raw``, writes come back through ``qemu-img compare``
(qemu-img cannot check qcow), legacy AES mounts only read-only."""
from __future__ import annotations

import struct
from pathlib import Path

from tests.conftest import (
    assert_legacy_aes_mounts_read_only_only,
    imgfs,
    mounted,
    need,
    pwrite_all,
    random_bytes,
    run,
)
from tests.drivers.test_qcow import (
    AES_WARNING,
    QEMU_WRITES,
    SIZE,
    apply,
    chain,
    compare,
    create_aes,
    filled,
    patch,
    qemu_compressed,
    qemu_raw,
)

KiB = 1024
MiB = 1024 * KiB


def overlay_with_4k_clusters(tmp_path: Path, backing: Path) -> Path:
    """qemu-img gives a qcow overlay 512-byte clusters, so no write through
    QEMU is ever a partial cluster; an overlay with 4 KiB clusters is made
    from a plain image by appending the backing name (QEMU reads it)."""
    image = tmp_path / "over4k.qcow"
    run("qemu-img", "create", "-q", "-f", "qcow", image, str(SIZE))
    name = backing.name.encode()
    end = image.stat().st_size
    patch(image, end, name)
    patch(image, 8, struct.pack(">QI", end, len(name)))
    return image


def test_reads_agree_with_qemu(tmp_path: Path, mnt: Path) -> None:
    need("qemu-img", "qemu-io")
    plain = filled(tmp_path)
    packed = qemu_compressed(plain, tmp_path / "packed.qcow")
    top, expected = chain(tmp_path)
    with mounted(plain, packed, top, mountpoint=mnt):
        assert (mnt / "disk.raw").read_bytes() == qemu_raw(plain, tmp_path / "a.raw")
        assert (mnt / "packed.raw").read_bytes() == (tmp_path / "a.raw").read_bytes()
        assert (mnt / "top.raw").read_bytes() == expected
        assert (mnt / "top.raw").stat().st_size == SIZE


def test_writes_come_back_through_qemu(tmp_path: Path, mnt: Path) -> None:
    """Partial clusters over a backing file (copy-on-write), over compressed
    clusters, across L2 tables, then `qemu-img compare` with what was written."""
    need("qemu-img", "qemu-io")
    base = filled(tmp_path, "base.qcow")
    over = overlay_with_4k_clusters(tmp_path, base)
    packed = qemu_compressed(filled(tmp_path, "src.qcow"), tmp_path / "packed.qcow")
    assert qemu_raw(over, tmp_path / "o.raw") == apply(bytearray(SIZE), QEMU_WRITES)
    writes = [(100, b"a" * 50), (MiB - 4000, random_bytes(10_000, seed=2)),
              (2 * MiB - 3000, random_bytes(300_000, seed=3)), (3 * MiB + 700, b"b" * 9000),
              (5 * MiB + 1, b"c"), (SIZE - 10, b"d" * 10)]
    expected = {image: apply(bytearray(SIZE), QEMU_WRITES) for image in (over, packed)}
    with mounted(over, packed, mountpoint=mnt):
        for image, contents in expected.items():
            exposed = mnt / (image.stem + ".raw")
            pwrite_all(exposed, writes, contents)
            assert exposed.read_bytes() == contents
    for image, contents in expected.items():
        (tmp_path / "expected.raw").write_bytes(contents)
        compare(image, tmp_path / "expected.raw")
    assert qemu_raw(base, tmp_path / "b.raw") == apply(bytearray(SIZE), QEMU_WRITES)
    assert run("qemu-img", "check", over, check=False).returncode == 63


def test_dd_into_a_created_image(tmp_path: Path, mnt: Path) -> None:
    need("qemu-img")
    image = tmp_path / "new.qcow"
    imgfs("create", "-f", "qcow", image, "8M")
    payload = random_bytes(3 * MiB + 123, seed=9)
    source = tmp_path / "payload.bin"
    source.write_bytes(payload)
    with mounted(image, mountpoint=mnt):
        run("dd", f"if={source}", f"of={mnt / 'new.raw'}", "bs=64k", "seek=1",
            "conv=notrunc,fsync", "status=none")
    expected = bytearray(8 * MiB)
    expected[64 * KiB:64 * KiB + len(payload)] = payload
    (tmp_path / "expected.raw").write_bytes(expected)
    compare(image, tmp_path / "expected.raw")


def test_legacy_aes_mounts_read_only_only(tmp_path: Path, mnt: Path) -> None:
    """Refused read-write (one line, nothing mounted, image untouched);
    with -o ro it mounts, reads what QEMU reads, and warns."""
    need("qemu-img", "qemu-io")
    image = create_aes(tmp_path / "aes.qcow")
    assert_legacy_aes_mounts_read_only_only(image, mnt, AES_WARNING,
                                            bytes(apply(bytearray(SIZE), QEMU_WRITES)))
