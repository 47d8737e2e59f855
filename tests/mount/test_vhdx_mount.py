"""VHDX images through a real FUSE mount, with qemu-img / qemu-io as the oracle.

An image written out of order by qemu-io, and the Hyper-V sample, read
through `imgfs mount` exactly as `qemu-img convert -O raw` reads them; the
dirty-log sample mounted read-only shows the replayed contents and the
file stays as it was.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import (
    IMGFS,
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
from tests.drivers.test_vhdx import (
    data_ranges,
    digest,
    independent_reads,
    make_base,
    out_of_order,
    qemu_create,
    sample,
)

KiB = 1024
MiB = 1024 * KiB


@pytest.fixture(autouse=True)
def _oracles(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    need("qemu-img", "qemu-io")
    monkeypatch.chdir(workdir)


def test_out_of_order_image_reads_like_qemu(workdir: Path, mnt: Path) -> None:
    size = 5 * MiB + 512
    image = qemu_create(workdir / "o.vhdx", size, "block_size=1M")
    out_of_order(image, MiB, size)
    expected = qemu_raw(image, workdir / "expected.raw")
    with mounted(image, mountpoint=mnt, options="ro"):
        view = exposed(mnt, image)
        assert view.stat().st_size == len(expected)
        assert view.read_bytes() == expected
        with open(view, "rb") as handle:
            for offset, length in [(1, 100), (MiB - 7, 14), (len(expected) - 7, 7),
                                   (2 * MiB + 17, 300_000)]:
                assert os.pread(handle.fileno(), length, offset) == \
                    expected[offset:offset + length]


def test_dirty_log_sample_mounts_read_only_replayed(workdir: Path, mnt: Path) -> None:
    image = sample("iotest-dirtylog-10G-4M.vhdx", workdir)
    before = digest(image)
    repaired = workdir / "repaired.vhdx"
    repaired.write_bytes(image.read_bytes())
    run("qemu-img", "check", "-r", "all", repaired)
    run("qemu-img", "convert", "-O", "raw", repaired, workdir / "expected.raw")
    with mounted(image, mountpoint=mnt, options="ro"):
        view = exposed(mnt, image)
        assert view.stat().st_size == 10 * 1024 * MiB
        with open(view, "rb") as got, open(workdir / "expected.raw", "rb") as expected:
            data = [start for start, _ in data_ranges(workdir / "expected.raw")[:8]]
            assert data
            for offset in (*data, 4 * MiB - 512, 10 * 1024 * MiB - 4 * MiB):
                assert os.pread(got.fileno(), 4 * MiB, offset) == \
                    os.pread(expected.fileno(), 4 * MiB, offset)
    assert digest(image) == before


def test_writes_through_the_mount_are_clean_for_qemu(workdir: Path, mnt: Path) -> None:
    image = workdir / "w.vhdx"
    run(IMGFS, "create", "-q", "-f", "vhdx", "-o", "block_size=1M", image, str(6 * MiB))
    expected = bytearray(6 * MiB)
    with mounted(image, mountpoint=mnt):
        pwrite_all(exposed(mnt, image), [(number * 150_001 + 5, random_bytes(20_003, number))
                                         for number in range(38)], expected)
    (workdir / "expected.raw").write_bytes(expected)
    run("qemu-img", "check", image)
    run("qemu-img", "compare", "-f", "vhdx", "-F", "raw", image, workdir / "expected.raw")


def test_killed_daemon_leaves_a_log_qemu_replays(workdir: Path, mnt: Path) -> None:
    """SIGKILL mid-write: every fsynced write is there after QEMU's replay
    (qemu-img check -r all) and after imgfs's (a read-write open)."""
    image = workdir / "k.vhdx"
    run(IMGFS, "create", "-q", "-f", "vhdx", "-o", "block_size=1M", image, str(16 * MiB))
    expected = bytearray(16 * MiB)
    with mounted(image, mountpoint=mnt):
        view = exposed(mnt, image)
        pwrite_all(view, [(number * 200_017 + 3, random_bytes(30_001, seed=number))
                          for number in range(40)], expected)
        kill_daemon_mid_writes(mnt, view, 8 * MiB, 8 * MiB)
    refused = run("qemu-img", "info", image, check=False)      # a log is left to replay
    assert refused.returncode and "log that needs to be replayed" in refused.stderr
    ours = workdir / "ours.vhdx"
    shutil.copyfile(image, ours)
    run("qemu-img", "check", "-r", "all", image)
    write_through_api(ours, [])
    for replayed in (image, ours):
        run("qemu-img", "check", replayed)
        assert qemu_raw(replayed, workdir / "after.raw")[:8 * MiB] == expected[:8 * MiB]


def test_differencing_chain_mounts_read_write(workdir: Path, mnt: Path) -> None:
    """A child on a qemu-img base mounted as one raw file: reads through to
    the parent, writes land in the child (libvhdi agrees afterwards)."""
    size = 4 * MiB
    base = workdir / "base.vhdx"
    expected = make_base(base, size)
    child = workdir / "child.avhdx"
    run(IMGFS, "create", "-q", "-f", "vhdx", "-b", "base.vhdx", "-o", "block_size=1M", child)
    with mounted(child, mountpoint=mnt):
        view = mnt / "child.raw"
        assert view.read_bytes() == expected
        pwrite_all(view, [(number * 100_003 + 7, random_bytes(9_001, number))
                          for number in range(30)], expected)
        assert view.read_bytes() == expected
    assert independent_reads(child, [child, base], size) == [expected, expected]
    assert qemu_raw(base, workdir / "base-after.raw") == (workdir / "base.raw").read_bytes()


def test_killed_daemon_differencing_keeps_fsynced_writes(workdir: Path, mnt: Path) -> None:
    """SIGKILL mid-write on a differencing image: the next read-write open
    replays the log; every fsynced write is there for imgfs and libvhdi."""
    size = 16 * MiB
    base = workdir / "base.vhdx"
    expected = make_base(base, size)
    child = workdir / "child.vhdx"
    run(IMGFS, "create", "-q", "-f", "vhdx", "-b", "base.vhdx", "-o", "block_size=1M", child)
    with mounted(child, mountpoint=mnt):
        view = mnt / "child.raw"
        pwrite_all(view, [(number * 200_017 + 3, random_bytes(30_001, seed=number))
                          for number in range(40)], expected)
        kill_daemon_mid_writes(mnt, view, 8 * MiB, 8 * MiB)
    write_through_api(child, [])
    run(IMGFS, "convert", "-O", "raw", child, workdir / "after.raw")
    assert (workdir / "after.raw").read_bytes()[:8 * MiB] == expected[:8 * MiB]
    assert independent_reads(child, [child, base], size)[0][:8 * MiB] == expected[:8 * MiB]
