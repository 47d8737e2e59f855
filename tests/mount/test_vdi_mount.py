"""VDI images through a real FUSE mount: qemu-img / qemu-io as the oracle
for base images, dissect.hypervisor and the expected bytes for VirtualBox
snapshot chains (which QEMU refuses).

Images written out of order by qemu-io read through `imgfs mount` exactly
as `qemu-img convert -O raw` reads them; what is written through the
mount passes `qemu-img check` and `qemu-img compare` once unmounted; a
snapshot chain mounts read-write, with its parent found by UUID or named
with ``-o backing.file.filename=``; a daemon killed mid-write leaves an
image whose every fsynced write is there and that the next read-write
open makes `qemu-img check` clean.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

from tests.conftest import (
    IMGFS,
    assert_damage_is_eio_and_mount_stays_up,
    exposed,
    is_mounted,
    kill_daemon_mid_writes,
    mounted,
    need,
    pwrite_all,
    qemu_raw,
    random_bytes,
    run,
    write_through_api,
)
from tests.drivers.test_vdi import (
    check_clean,
    dissect_read,
    header_of,
    imgfs_raw,
    make_chain,
    out_of_order,
    patch,
    qemu_create,
    qemu_io,
)

KiB = 1024
MiB = 1024 * KiB


@pytest.fixture(autouse=True)
def _oracles(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    need("qemu-img", "qemu-io")
    monkeypatch.chdir(workdir)



@pytest.mark.parametrize("static", ["off", "on"])
def test_out_of_order_image_reads_like_qemu(workdir: Path, mnt: Path, static: str) -> None:
    size = 12 * MiB + 512
    image = qemu_create(workdir / "o.vdi", size, f"static={static}")
    out_of_order(image, size)
    expected = qemu_raw(image, workdir / "expected.raw")
    with mounted(image, mountpoint=mnt, options="ro"):
        view = exposed(mnt, image)
        assert view.stat().st_size == len(expected)
        assert view.read_bytes() == expected
        with open(view, "rb") as handle:
            for offset, length in [(1, 100), (MiB - 3, 7), (len(expected) - 7, 7),
                                   (3 * MiB + 17, 2 * MiB)]:
                assert os.pread(handle.fileno(), length, offset) == \
                    expected[offset:offset + length]


def test_writes_through_the_mount_pass_qemu_check(workdir: Path, mnt: Path) -> None:
    image = qemu_create(workdir / "w.vdi", 6 * MiB)
    qemu_io(image, "write -P 0x61 8k 12k", "write -P 0x62 4M 1M")
    expected = bytearray(qemu_raw(image, workdir / "before.raw"))
    writes = [(2 * MiB - 5, random_bytes(10, seed=1)), (5000, random_bytes(9000, seed=2)),
              (4 * MiB + 100, b"z" * 4096), (3 * MiB - 1, random_bytes(MiB + 2, seed=3)),
              (6 * MiB - 4096, random_bytes(4096, seed=4)), (1, bytes(3000))]
    with mounted(image, mountpoint=mnt):
        pwrite_all(exposed(mnt, image), writes, expected)
        assert exposed(mnt, image).read_bytes() == bytes(expected)
    check_clean(image)
    raw = workdir / "expected.raw"
    raw.write_bytes(bytes(expected))
    run("qemu-img", "compare", "-q", "-f", "raw", "-F", "vdi", raw, image)


def test_snapshot_chain_mounts_read_write(workdir: Path, mnt: Path) -> None:
    """base.vdi <- Snapshots/s1.vdi <- Snapshots/s2.vdi: the top mounted
    read-write (parents found by UUID), written, and read back by imgfs and
    by dissect.hypervisor; the parents are left as they were."""
    vdi = pytest.importorskip("dissect.hypervisor.disk.vdi")
    chain, expected_bytes = make_chain(workdir)
    expected = bytearray(expected_bytes)
    parents = [path.read_bytes() for path in chain[:-1]]
    top = chain[-1]
    writes = [(MiB - 1, random_bytes(3 * MiB, seed=8)), (5 * MiB + 10, b"q" * 100)]
    with mounted(top, mountpoint=mnt):
        pwrite_all(exposed(mnt, top), writes, expected)
        assert exposed(mnt, top).read_bytes() == bytes(expected)
    assert [path.read_bytes() for path in chain[:-1]] == parents
    assert imgfs_raw(top, "after.raw") == bytes(expected) == dissect_read(vdi, chain)


def test_parent_named_with_a_mount_option(workdir: Path, mnt: Path) -> None:
    chain, expected = make_chain(workdir)
    moved = workdir / "s2.vdi"
    chain[-1].rename(moved)
    result = run(IMGFS, "mount", moved, mnt, check=False)
    assert result.returncode == 1 and "backing.file.filename" in result.stderr
    assert not is_mounted(mnt)
    with mounted(moved, mountpoint=mnt, options=f"ro,backing.file.filename={chain[1]}"):
        assert exposed(mnt, moved).read_bytes() == expected
    # the wrong parent: one line, nothing mounted
    result = run(IMGFS, "mount", "-o", f"ro,backing.file.filename={chain[0]}", moved, mnt,
                 check=False)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "but this image's parent is" in result.stderr
    assert not is_mounted(mnt)


def test_damaged_entry_is_eio_and_the_mount_stays_up(workdir: Path, mnt: Path) -> None:
    image = qemu_create(workdir / "d.vdi", 4 * MiB)
    qemu_io(image, "write -P 1 0 1M", "write -P 2 1M 1M")
    patch(image, header_of(image).offset_bmap, struct.pack("<I", 1000))
    assert_damage_is_eio_and_mount_stays_up(image, mnt, MiB, b"\2" * 4096)


def test_sigkill_mid_writes_keeps_what_was_synced(workdir: Path, mnt: Path) -> None:
    """The daemon killed while a writer allocates blocks: QEMU reads every
    write fsync returned for, and after imgfs's next read-write open (which
    corrects a count a kill left behind) qemu-img check is clean."""
    image = qemu_create(workdir / "k.vdi", 16 * MiB)
    expected = bytearray(16 * MiB)
    with mounted(image, mountpoint=mnt):
        view = exposed(mnt, image)
        pwrite_all(view, [(number * 200_017 + 3, random_bytes(30_001, seed=number))
                          for number in range(40)], expected)
        kill_daemon_mid_writes(mnt, view, 8 * MiB, 8 * MiB)
    assert qemu_raw(image, workdir / "after.raw")[:8 * MiB] == expected[:8 * MiB]
    write_through_api(image, [])
    result = run("qemu-img", "check", "--output=json", image, check=False)
    assert result.returncode == 0 and not json.loads(result.stdout).get("corruptions")
