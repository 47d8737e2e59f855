"""VMDK images through a real FUSE mount, with qemu-img / qemu-io as the oracle.

Images of each subformat written out of order by qemu-io, a backing chain
and VMware's own stream layout (the ESXi sample) read through `imgfs
mount` as `qemu-img` reads them.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import mounted, need, qemu_raw, run
from tests.drivers.test_vmdk import GRAIN, esxi_sample, out_of_order, vmdk_create, vmdk_io

MiB = 1024 * 1024


@pytest.fixture(autouse=True)
def _oracles(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    need("qemu-img", "qemu-io")
    monkeypatch.chdir(workdir)


def exposed(mnt: Path, image: Path) -> Path:
    return mnt / (image.name.rsplit(".", 1)[0] + ".raw")


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
