"""VMDK images through a real FUSE mount, with qemu-img / qemu-io as the oracle.

Images of each subformat written out of order by qemu-io, a backing chain
and VMware's own stream layout (the ESXi sample) read through `imgfs
mount` as `qemu-img` reads them; writes through the mount pass `qemu-img
check` and `compare`; a damaged grain is EIO for its request only; a
stream refuses writes with EIO; a daemon killed mid-write leaves an image
QEMU checks clean with every fsynced write in it, a stream too (appends
never cut its footer off).  A seSparse snapshot
(built by tests/sesparse_images.py) mounts read-only and reads as QEMU
reads it.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import struct
import threading
from pathlib import Path

import pytest
from imgfs.drivers.vmdk.layout import SparseHeader

from tests.conftest import (
    assert_damage_is_eio_and_mount_stays_up,
    exposed,
    imgfs,
    is_mounted,
    kill_daemon_mid_writes,
    kill_daemon_while_writing,
    mounted,
    need,
    pread_errno,
    pwrite_all,
    qemu_raw,
    random_bytes,
    run,
)
from tests.drivers.test_vmdk import (
    GRAIN,
    check_clean,
    compare_raw,
    esxi_sample,
    out_of_order,
    vmdk_create,
    vmdk_io,
)
from tests.sesparse_images import GT_SPAN_SECTORS, UNMAPPED, ZERO, SeSparse, sesparse_disk

MiB = 1024 * 1024


@pytest.fixture(autouse=True)
def _oracles(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    need("qemu-img", "qemu-io")
    monkeypatch.chdir(workdir)


@pytest.mark.parametrize("subformat", ["monolithicSparse", "twoGbMaxExtentFlat",
                                       "streamOptimized"])
def test_subformat_reads_like_qemu(workdir: Path, mnt: Path, subformat: str) -> None:
    size = 20 * GRAIN + 512
    image = vmdk_create(workdir / "d.vmdk", size, f"subformat={subformat}")
    if subformat == "streamOptimized":
        vmdk_io(image, "write -P 1 0 64k", f"write -P 2 {3 * GRAIN} {2 * GRAIN}")
    else:
        out_of_order(image, size)
    expected = qemu_raw(image, workdir / "expected.raw")
    with mounted(image, mountpoint=mnt, options="ro"):
        view = exposed(mnt, image)
        assert view.stat().st_size == len(expected)
        assert view.read_bytes() == expected
        with open(view, "rb") as handle:
            for offset, length in [(1, 100), (GRAIN - 3, 7), (len(expected) - 7, 7)]:
                assert os.pread(handle.fileno(), length, offset) == \
                    expected[offset:offset + length]


def test_chain_reads_like_qemu(workdir: Path, mnt: Path) -> None:
    base = vmdk_create(workdir / "base.vmdk", 2 * MiB)
    vmdk_io(base, "write -P 1 0 2M")
    top = vmdk_create(workdir / "top.vmdk", None, "backing_file=base.vmdk",
                      "backing_fmt=vmdk")
    vmdk_io(top, f"write -P 3 {5 * GRAIN - 3} 9")
    expected = qemu_raw(top, workdir / "expected.raw")
    with mounted(top, mountpoint=mnt, options="ro"):
        assert exposed(mnt, top).read_bytes() == expected


def test_esxi_stream_reads_like_qemu(workdir: Path, mnt: Path) -> None:
    """The first 4 MiB of the 16 GiB sample (qemu-img dd cuts them out)."""
    image = esxi_sample(workdir)
    run("qemu-img", "dd", "-f", "vmdk", "-O", "raw", f"if={image}", "of=head.raw",
        "bs=1M", "count=4")
    expected = (workdir / "head.raw").read_bytes()
    with mounted(image, mountpoint=mnt, options="ro"):
        with open(exposed(mnt, image), "rb") as handle:
            assert os.pread(handle.fileno(), len(expected), 0) == expected


@pytest.mark.parametrize("subformat", ["monolithicSparse", "twoGbMaxExtentSparse",
                                       "monolithicFlat"])
def test_writes_through_the_mount_pass_qemu_check(workdir: Path, mnt: Path,
                                                  subformat: str) -> None:
    """Unaligned and grain-crossing writes over data, holes and a parent."""
    (workdir / "base.raw").write_bytes(random_bytes(4 * MiB, seed=5))
    run("qemu-img", "convert", "-f", "raw", "-O", "vmdk", "base.raw", "base.vmdk")
    options = [f"subformat={subformat}"]
    if subformat != "monolithicFlat":
        options += ["backing_file=base.vmdk", "backing_fmt=vmdk"]
    image = vmdk_create(workdir / "w.vmdk", 4 * MiB, *options)
    vmdk_io(image, "write -P 0x61 8k 12k")
    expected = bytearray(qemu_raw(image, workdir / "before.raw"))
    writes = [(2 * MiB - 5, random_bytes(10, seed=1)), (5000, random_bytes(9000, seed=2)),
              (64 * 1024 + 100, b"z" * 4096), (3 * MiB - 1, random_bytes(MiB - 3, seed=3)),
              (1, bytes(3000))]
    with mounted(image, mountpoint=mnt):
        pwrite_all(exposed(mnt, image), writes, expected)
        assert exposed(mnt, image).read_bytes() == bytes(expected)
    check_clean(image)
    compare_raw(bytes(expected), image)


def test_damaged_grain_is_eio_and_the_mount_stays_up(workdir: Path, mnt: Path) -> None:
    image = vmdk_create(workdir / "d.vmdk", 4 * MiB)
    vmdk_io(image, "write -P 1 0 128k")
    data = bytearray(image.read_bytes())
    header = SparseHeader.unpack(bytes(data[:512]))
    gt = struct.unpack_from("<I", data, header.gd_offset * 512)[0] * 512
    struct.pack_into("<I", data, gt, 1 << 30)          # grain 0 past the end
    image.write_bytes(bytes(data))
    assert_damage_is_eio_and_mount_stays_up(image, mnt, GRAIN, b"\1" * 4096)


def test_stream_write_through_the_mount_is_eio(workdir: Path, mnt: Path) -> None:
    image = esxi_sample(workdir)
    with mounted(image, mountpoint=mnt):
        fd = os.open(exposed(mnt, image), os.O_RDWR)
        try:
            with pytest.raises(OSError) as info:
                os.pwrite(fd, b"x" * 512, 0)
            assert info.value.errno == errno.EIO
        finally:
            os.close(fd)
        assert is_mounted(mnt)


def test_sigkill_mid_writes_keeps_what_was_synced(workdir: Path, mnt: Path) -> None:
    """The daemon killed while a writer is busy: qemu-img check finds no
    corruption and every write fsync returned for is there."""
    image = vmdk_create(workdir / "k.vmdk", 16 * MiB)
    expected = bytearray(16 * MiB)
    with mounted(image, mountpoint=mnt):
        view = exposed(mnt, image)
        pwrite_all(view, [(number * 200_017 + 3, random_bytes(30_001, seed=number))
                          for number in range(40)], expected)
        kill_daemon_mid_writes(mnt, view, 8 * MiB, 8 * MiB)
    check_clean(image)
    assert qemu_raw(image, workdir / "after.raw")[:8 * MiB] == expected[:8 * MiB]


# -- seSparse (read-only) ------------------------------------------------------------------

def sesparse_over_base(workdir: Path) -> tuple[Path, SeSparse]:
    """A seSparse snapshot (tests/sesparse_images.py) of a qemu-img parent."""
    base = vmdk_create(workdir / "base.vmdk", 2 * GT_SPAN_SECTORS * 512)
    vmdk_io(base, "write -P 0x55 0 128k", f"write -P 0x66 {16 * MiB - 6144} 20k")
    cid = json.loads(run("qemu-img", "info", "--output=json", base).stdout)[
        "format-specific"]["data"]["cid"]
    extent = SeSparse(2 * GT_SPAN_SECTORS, {0: b"\x01" * 4096, 3: ZERO, 5: UNMAPPED,
                                            4095: b"\x02" * 100, 4096: b"\x03" * 4096},
                      clusters={4096: 5000})
    return sesparse_disk(workdir, extent, name="snap", parent="base.vmdk",
                         parent_cid=cid), extent


def test_sesparse_mounts_read_only_and_reads_like_qemu(workdir: Path, mnt: Path) -> None:
    image, extent = sesparse_over_base(workdir)
    expected = qemu_raw(image, workdir / "expected.raw")
    assert expected == extent.expected(qemu_raw(workdir / "base.vmdk", workdir / "b.raw"))
    before = (workdir / "snap-sesparse.vmdk").read_bytes()
    with mounted(image, mountpoint=mnt):
        with open("/proc/self/mountinfo") as table:
            options = next(line.split()[5] for line in table
                           if line.split()[4] == os.path.realpath(mnt))
        assert "ro" in options.split(",")
        view = exposed(mnt, image)
        assert view.read_bytes() == expected
        with open(view, "rb") as handle:
            for offset, length in [(1, 100), (4095 * 4096 - 3, 4200), (len(expected) - 7, 7)]:
                assert os.pread(handle.fileno(), length, offset) == \
                    expected[offset:offset + length]
        with pytest.raises(OSError) as caught:
            os.open(view, os.O_WRONLY)
        assert caught.value.errno in (errno.EROFS, errno.EACCES)
    assert (workdir / "snap-sesparse.vmdk").read_bytes() == before


def test_sesparse_rw_mount_is_refused_in_one_line(workdir: Path, mnt: Path) -> None:
    image, _ = sesparse_over_base(workdir)
    result = imgfs("mount", "-o", "rw", image.name, mnt, check=False, cwd=workdir)
    assert (result.returncode, result.stderr) == (
        1, f"imgfs: {image.name}: VMDK images with seSparse extents can only be opened "
           "read-only (use -o ro)\n")
    assert not is_mounted(mnt)


def test_sesparse_bad_entry_is_eio_and_the_mount_stays_up(workdir: Path, mnt: Path) -> None:
    image, extent = sesparse_over_base(workdir)
    extent.grains[7] = 4 << 60                  # an entry of no known type
    extent.write(workdir / "snap-sesparse.vmdk")
    with mounted(image, mountpoint=mnt):
        assert pread_errno(exposed(mnt, image), 7 * 4096, 4096, direct=True) == errno.EIO
        with open(exposed(mnt, image), "rb") as handle:
            assert os.pread(handle.fileno(), 4096, 0) == b"\x01" * 4096
        assert is_mounted(mnt)


def test_stream_sigkill_mid_appends_keeps_what_was_synced(workdir: Path, mnt: Path) -> None:
    """A VMware-layout stream written in order through the mount, synced
    every few writes, the daemon killed while the writer is busy: qemu-img
    opens and checks the image, and every synced byte is in it."""
    image = workdir / "s.vmdk"
    imgfs("create", "-q", "-f", "vmdk", "-o", "subformat=streamOptimized", image, "64M")
    expected = bytearray(64 * MiB)
    synced = [0]

    def append_until_gone(stop: threading.Event) -> None:
        fd = os.open(exposed(mnt, image), os.O_WRONLY)
        offset, number = 0, 0
        try:
            while not stop.is_set() and offset + 50_000 <= len(expected):
                data = random_bytes(50_000, seed=number)
                os.pwrite(fd, data, offset)
                expected[offset:offset + len(data)] = data
                offset, number = offset + len(data), number + 1
                if number % 8 == 0:
                    os.fsync(fd)
                    synced[0] = offset
        except OSError:
            pass                       # ENOTCONN once the daemon is killed
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)

    with mounted(image, mountpoint=mnt):
        kill_daemon_while_writing(mnt, append_until_gone, lambda: synced[0] >= 3 * 400_000)
    assert synced[0] >= 3 * 400_000
    check_clean(image)
    assert qemu_raw(image, workdir / "after.raw")[:synced[0]] == expected[:synced[0]]
