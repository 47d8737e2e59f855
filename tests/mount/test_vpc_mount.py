"""VHD images through a real FUSE mount, with qemu-img / qemu-io as the oracle.

Dynamic and fixed images written out of order by qemu-io, and the images
Hyper-V and Virtual PC made, read through `imgfs mount` exactly as `qemu-img
convert -O raw` reads them; what is written through the mount reads back
identically in qemu-img (`qemu-img compare`); a BAT entry aimed at the
metadata is EIO for that block's requests, and the mount stays up.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from tests.conftest import (
    exposed,
    is_mounted,
    kill_daemon_mid_writes,
    mounted,
    need,
    pwrite_all,
    qemu_raw,
    random_bytes,
    write_through_api,
)
from tests.drivers.test_vpc import (
    compare_raw,
    info_json,
    out_of_order,
    patch,
    qemu_create,
    qemu_io,
    sample,
)

KiB = 1024
MiB = 1024 * KiB


@pytest.fixture(autouse=True)
def _oracles(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    need("qemu-img", "qemu-io")
    monkeypatch.chdir(workdir)



@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_out_of_order_image_reads_like_qemu(workdir: Path, mnt: Path, subformat: str) -> None:
    image = qemu_create(workdir / "o.vhd", 9 * MiB + 5000, f"subformat={subformat}")
    out_of_order(image, info_json("qemu-img", image)["virtual-size"])
    expected = qemu_raw(image, workdir / "expected.raw", fmt="vpc")
    with mounted(image, mountpoint=mnt, options="ro"):
        view = exposed(mnt, image)
        assert view.stat().st_size == len(expected)
        assert view.read_bytes() == expected
        with open(view, "rb") as handle:
            for offset, length in [(1, 100), (2 * MiB - 3, 7), (len(expected) - 7, 7),
                                   (4096 * 3 + 17, 3 * MiB)]:
                assert os.pread(handle.fileno(), length, offset) == \
                    expected[offset:offset + length]


def test_hyperv_image_mounts_with_qemus_size(workdir: Path, mnt: Path) -> None:
    image = sample("hyperv2012r2-dynamic.vhd", workdir)
    size = info_json("qemu-img", image)["virtual-size"]
    with mounted(image, mountpoint=mnt, options="ro"):
        view = exposed(mnt, image)
        assert view.stat().st_size == size
        with open(view, "rb") as handle:
            assert os.pread(handle.fileno(), MiB, 0) == bytes(MiB)
            assert os.pread(handle.fileno(), 4096, size - 4096) == bytes(4096)


def test_bat_entry_over_the_metadata_is_eio_and_the_mount_stays_up(
        workdir: Path, mnt: Path) -> None:
    """A BAT entry aimed at the footer copy (QEMU reads the metadata there
    as data): that block's requests fail with EIO, the others read."""
    image = qemu_create(workdir / "h.vhd", 5 * MiB)
    qemu_io(image, "write -P 0x11 0 4k", "write -P 0x22 2M 4k")
    patch(image, 1536, (0).to_bytes(4, "big"))        # block 0: sector 0
    with mounted(image, mountpoint=mnt, options="ro"):
        view = exposed(mnt, image)
        fd = os.open(view, os.O_RDONLY)
        try:
            with pytest.raises(OSError) as info:
                os.pread(fd, 4096, 0)
            assert info.value.errno == errno.EIO
            assert os.pread(fd, 4096, 2 * MiB) == b"\x22" * 4096
        finally:
            os.close(fd)
        assert is_mounted(mnt)


@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_writes_through_the_mount_read_back_in_qemu(workdir: Path, mnt: Path,
                                                    subformat: str) -> None:
    image = qemu_create(workdir / "w.vhd", 7 * MiB, f"subformat={subformat}")
    qemu_io(image, "write -P 0x11 1M 8k")
    expected = bytearray(qemu_raw(image, workdir / "before.raw", fmt="vpc"))
    writes = [(MiB + 4096, random_bytes(8192, seed=11)), (2 * MiB - 100, random_bytes(300, 12)),
              (len(expected) - 5, b"tail!"), (7, random_bytes(3 * MiB, seed=13))]
    with mounted(image, mountpoint=mnt):
        view = exposed(mnt, image)
        pwrite_all(view, writes, expected)
        assert view.read_bytes() == expected
    compare_raw(bytes(expected), image)


def test_sigkill_mid_writes_keeps_what_was_synced(workdir: Path, mnt: Path) -> None:
    """The daemon killed while a writer allocates blocks: QEMU and imgfs
    still open the image (a dynamic disk's footer copy at offset 0 covers a
    footer caught moving), and every write fsync returned for is there."""
    image = qemu_create(workdir / "k.vhd", 16 * MiB)
    size = info_json("qemu-img", image)["virtual-size"]
    expected = bytearray(size)
    with mounted(image, mountpoint=mnt):
        view = exposed(mnt, image)
        pwrite_all(view, [(number * 200_017 + 3, random_bytes(30_001, seed=number))
                          for number in range(40)], expected)
        kill_daemon_mid_writes(mnt, view, 8 * MiB, 8 * MiB)
    assert qemu_raw(image, workdir / "after.raw", fmt="vpc")[:8 * MiB] == expected[:8 * MiB]
    write_through_api(image, [(size - 512, b"\x77" * 512)])    # imgfs appends after it
    expected[size - 512:] = b"\x77" * 512
    assert qemu_raw(image, workdir / "again.raw", fmt="vpc")[:8 * MiB] == expected[:8 * MiB]
    assert qemu_raw(image, workdir / "again.raw", fmt="vpc")[-512:] == b"\x77" * 512
