"""Parallels images through a real FUSE mount, with qemu-img / qemu-io as
the oracle.

Images written out of order by qemu-io, and the sample written by
Parallels software, read through `imgfs mount` exactly as `qemu-img
convert -O raw` reads them; what is written through the mount passes
`qemu-img check` and `qemu-img compare` once unmounted, with the in-use
flag set while mounted read-write and cleared by the clean unmount; a
daemon killed mid-write leaves the image in use, which QEMU and imgfs then
open read-only only, and a check repairs.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from imgfs.drivers.parallels.layout import INUSE_OPEN

from tests.conftest import (
    assert_damage_is_eio_and_mount_stays_up,
    exposed,
    imgfs,
    kill_daemon_mid_writes,
    mounted,
    need,
    pwrite_all,
    qemu_raw,
    random_bytes,
    run,
)
from tests.drivers.test_parallels import (
    FMT,
    MIDDLE_GUID,
    ROOT_GUID,
    TOP_GUID,
    bundle,
    check_clean,
    compare_raw,
    hds_name,
    header_of,
    out_of_order,
    patch,
    qemu_chain_raw,
    qemu_create,
    qemu_io,
    sample,
    to_sector_entries,
)
from tests.mount.test_qed_mount import assert_reads_like_qemu

KiB = 1024
MiB = 1024 * KiB


@pytest.fixture(autouse=True)
def _oracles(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    need("qemu-img", "qemu-io")
    monkeypatch.chdir(workdir)


@pytest.mark.parametrize("option, cluster", [("cluster_size=64k", 65536),
                                             ("cluster_size=3k", 3072)])
def test_out_of_order_image_reads_like_qemu(workdir: Path, mnt: Path, option: str,
                                            cluster: int) -> None:
    size = 40 * cluster + 512
    image = qemu_create(workdir / "o.prl", size, option)
    out_of_order(image, cluster, size)
    assert_reads_like_qemu(image, mnt, workdir)


def test_old_layout_and_sample_read_like_qemu(workdir: Path, mnt: Path) -> None:
    image = qemu_create(workdir / "old.prl", 2 * MiB, "cluster_size=64k")
    qemu_io(image, "write -P 0x61 70000 100000")
    to_sector_entries(image)
    assert_reads_like_qemu(image, mnt, workdir)
    assert_reads_like_qemu(sample(workdir), mnt, workdir)


def test_writes_through_the_mount_pass_qemu_check(workdir: Path, mnt: Path) -> None:
    image = qemu_create(workdir / "w.prl", 6 * MiB, "cluster_size=64k")
    qemu_io(image, "write -P 0x61 8k 12k", "write -P 0x62 3M 100k")
    expected = bytearray(qemu_raw(image, workdir / "before.raw", FMT))
    writes = [(2 * MiB - 5, random_bytes(10, seed=1)), (5000, random_bytes(9000, seed=2)),
              (3 * MiB - 1, random_bytes(MiB + 2, seed=3)),
              (6 * MiB - 4096, random_bytes(4096, seed=4)), (1, bytes(3000))]
    with mounted(image, mountpoint=mnt):
        assert header_of(image).inuse == INUSE_OPEN
        pwrite_all(exposed(mnt, image), writes, expected)
        assert exposed(mnt, image).read_bytes() == bytes(expected)
    assert header_of(image).inuse == 0
    check_clean(image)
    compare_raw(bytes(expected), image)


def test_damaged_entry_is_eio_and_the_mount_stays_up(workdir: Path, mnt: Path) -> None:
    image = qemu_create(workdir / "d.prl", 4 * MiB, "cluster_size=64k")
    qemu_io(image, "write -P 1 0 128k")
    to_sector_entries(image)
    patch(image, 64, struct.pack("<I", 1))          # cluster 0 -> inside the catalog
    assert_damage_is_eio_and_mount_stays_up(image, mnt, 65536, b"\1" * 4096)


def test_sigkill_mid_writes_leaves_the_image_in_use(workdir: Path, mnt: Path) -> None:
    """QEMU and imgfs then open it read-only only; `imgfs check -r all`
    repairs it as qemu-img does, and every write fsync returned for is there."""
    image = qemu_create(workdir / "k.prl", 16 * MiB, "cluster_size=64k")
    expected = bytearray(16 * MiB)
    with mounted(image, mountpoint=mnt):
        view = exposed(mnt, image)
        pwrite_all(view, [(number * 200_017 + 3, random_bytes(30_001, seed=number))
                          for number in range(40)], expected)
        kill_daemon_mid_writes(mnt, view, 8 * MiB, 8 * MiB)
    assert header_of(image).inuse == INUSE_OPEN
    result = run("qemu-io", "-f", FMT, "-c", "read 0 512", image, check=False)
    assert "not closed correctly" in result.stderr
    result = imgfs("check", "-r", "all", "--output=json", image, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout).get("corruptions-fixed") == 1
    assert header_of(image).inuse == 0
    check_clean(image)
    assert qemu_raw(image, workdir / "after.raw", FMT)[:8 * MiB] == expected[:8 * MiB]


def test_bundle_directory_mounts_and_writes_go_to_the_top(workdir: Path, mnt: Path) -> None:
    directory = bundle(workdir)
    chain = [TOP_GUID, MIDDLE_GUID, ROOT_GUID]
    expected = bytearray(qemu_chain_raw(directory, chain))
    with mounted(directory, mountpoint=mnt, options="ro"):
        (view,) = list(mnt.iterdir())
        assert view.read_bytes() == bytes(expected)
    writes = [(700 * KiB + 1, random_bytes(90000, seed=9)), (2 * MiB, b"x" * 4096)]
    with mounted(directory / "DiskDescriptor.xml", mountpoint=mnt):
        (view,) = list(mnt.iterdir())
        assert header_of(directory / hds_name(TOP_GUID)).inuse == INUSE_OPEN
        pwrite_all(view, writes, expected)
    assert qemu_chain_raw(directory, chain) == bytes(expected)
    check_clean(directory / hds_name(TOP_GUID))
