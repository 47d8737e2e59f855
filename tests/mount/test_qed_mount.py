"""QED images through a real FUSE mount, with qemu-img / qemu-io as the oracle.

Images written out of order by qemu-io (alone and in backing chains that
mix QED, qcow2 and raw) read through `imgfs mount` exactly as `qemu-img
convert -O raw` reads them; what is written through the mount passes
`qemu-img check` and `qemu-img compare` once unmounted; a daemon killed
mid-write leaves an image QEMU opens and repairs, with every fsynced write
kept.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest

from tests.conftest import (
    assert_damage_is_eio_and_mount_stays_up,
    exposed,
    kill_daemon_mid_writes,
    mounted,
    need,
    pwrite_all,
    qemu_raw,
    random_bytes,
    run,
    write_through_api,
)
from tests.drivers.test_qed import check_clean, first_l2, out_of_order, patch, qemu_create, qemu_io

KiB = 1024
MiB = 1024 * KiB


@pytest.fixture(autouse=True)
def _oracles(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    need("qemu-img", "qemu-io")
    monkeypatch.chdir(workdir)



def assert_reads_like_qemu(image: Path, mnt: Path, workdir: Path) -> bytes:
    expected = qemu_raw(image, workdir / "expected.raw")
    with mounted(image, mountpoint=mnt, options="ro"):
        view = exposed(mnt, image)
        assert view.stat().st_size == len(expected)
        assert view.read_bytes() == expected
        with open(view, "rb") as handle:
            for offset, length in [(1, 100), (65535, 3), (len(expected) - 7, 7),
                                   (4096 * 3 + 17, 200_000)]:
                assert os.pread(handle.fileno(), length, offset) == \
                    expected[offset:offset + length]
    return expected


@pytest.mark.parametrize("options, cluster", [((), 65536), (("cluster_size=4k",
                                                             "table_size=2"), 4096)])
def test_out_of_order_image_reads_like_qemu(workdir: Path, mnt: Path,
                                            options: tuple[str, ...], cluster: int) -> None:
    size = 40 * cluster + 512
    image = qemu_create(workdir / "o.qed", size, *options)
    out_of_order(image, cluster, size)
    assert_reads_like_qemu(image, mnt, workdir)


def test_chain_three_deep_reads_like_qemu(workdir: Path, mnt: Path) -> None:
    """qed <- qcow2 <- qed <- raw (shorter), each layer written out of order."""
    (workdir / "base.raw").write_bytes(random_bytes(2 * MiB + 512, seed=11))
    lower = qemu_create(workdir / "low.qed", 3 * MiB, "backing_file=base.raw",
                        "backing_fmt=raw", "cluster_size=4k", "table_size=4")
    out_of_order(lower, 4096, 3 * MiB)
    middle = qemu_create(workdir / "mid.qcow2", 3 * MiB, "backing_file=low.qed",
                         "backing_fmt=qed", fmt="qcow2")
    out_of_order(middle, 65536, 3 * MiB, fmt="qcow2")
    top = qemu_create(workdir / "top.qed", 4 * MiB, "backing_file=mid.qcow2",
                      "backing_fmt=qcow2", "cluster_size=16k")
    out_of_order(top, 16384, 4 * MiB)
    assert_reads_like_qemu(top, mnt, workdir)


def test_writes_through_the_mount_pass_qemu_check(workdir: Path, mnt: Path) -> None:
    """Unaligned, cluster-crossing and table-crossing writes over data,
    zero clusters, holes and a backing file; then qemu-img check and
    compare, and the need-check flag cleared by the clean unmount."""
    (workdir / "base.raw").write_bytes(random_bytes(3 * MiB, seed=5))
    image = qemu_create(workdir / "w.qed", 6 * MiB, "backing_file=base.raw",
                        "backing_fmt=raw", "cluster_size=4k", "table_size=2")
    qemu_io(image, "write -P 0x61 8k 12k", "write -z 64k 64k")
    expected = bytearray(qemu_raw(image, workdir / "before.raw"))
    writes = [(2 * MiB - 5, random_bytes(10, seed=1)), (5000, random_bytes(9000, seed=2)),
              (64 * KiB + 100, b"z" * 4096), (3 * MiB - 1, random_bytes(MiB + 2, seed=3)),
              (6 * MiB - 4096, random_bytes(4096, seed=4)), (1, bytes(3000))]
    with mounted(image, mountpoint=mnt):
        pwrite_all(exposed(mnt, image), writes, expected)
        assert exposed(mnt, image).read_bytes() == bytes(expected)
    check_clean(image)
    raw = workdir / "expected.raw"
    raw.write_bytes(bytes(expected))
    run("qemu-img", "compare", "-q", "-f", "raw", "-F", "qed", raw, image)
    with open(image, "rb") as handle:
        handle.seek(16)
        assert struct.unpack("<Q", handle.read(8))[0] & 2 == 0     # need-check cleared


def test_damaged_entry_is_eio_and_the_mount_stays_up(workdir: Path, mnt: Path) -> None:
    image = qemu_create(workdir / "d.qed", 4 * MiB)
    qemu_io(image, "write -P 1 0 128k")
    patch(image, first_l2(image), struct.pack("<Q", 1 << 40))
    assert_damage_is_eio_and_mount_stays_up(image, mnt, 65536, b"\1" * 4096)


@pytest.mark.parametrize("options", [("cluster_size=4k", "table_size=2"), ()])
def test_sigkill_mid_writes_qemu_repairs_and_keeps_what_was_synced(
        workdir: Path, mnt: Path, options: tuple[str, ...]) -> None:
    """The daemon killed while a writer is busy: the need-check flag is
    set, qemu-img check finds no corruption, QEMU's read-write open repairs
    the image and so does imgfs's, and every write fsync returned for is
    there."""
    image = qemu_create(workdir / "k.qed", 16 * MiB, *options)
    expected = bytearray(16 * MiB)
    with mounted(image, mountpoint=mnt):
        view = exposed(mnt, image)
        pwrite_all(view, [(number * 200_017 + 3, random_bytes(30_001, seed=number))
                          for number in range(40)], expected)
        kill_daemon_mid_writes(mnt, view, 8 * MiB, 8 * MiB)
    with open(image, "rb") as handle:
        handle.seek(16)
        assert struct.unpack("<Q", handle.read(8))[0] & 2      # need-check left set
    result = run("qemu-img", "check", "--output=json", image, check=False)
    report = json.loads(result.stdout)
    assert result.returncode in (0, 3) and not report.get("corruptions"), report
    ours = workdir / "ours.qed"
    shutil.copyfile(image, ours)
    qemu_io(image, "read 0 512")                  # QEMU's read-write open repairs
    write_through_api(ours, [])                   # and so does imgfs's
    for repaired in (image, ours):
        with open(repaired, "rb") as handle:
            handle.seek(16)
            assert struct.unpack("<Q", handle.read(8))[0] & 2 == 0
        result = run("qemu-img", "check", "--output=json", repaired, check=False)
        assert result.returncode in (0, 3), result.stdout
        assert qemu_raw(repaired, workdir / "after.raw")[:8 * MiB] == expected[:8 * MiB]
