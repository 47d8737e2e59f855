"""VHD images through a real FUSE mount, with qemu-img / qemu-io as the oracle.

Dynamic and fixed images written out of order by qemu-io, and the images
Hyper-V and Virtual PC made, read through `imgfs mount` exactly as `qemu-img
convert -O raw` reads them; what is written through the mount reads back
identically in qemu-img (`qemu-img compare`).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import mounted, need, qemu_raw
from tests.drivers.test_vpc import info_json, out_of_order, qemu_create, sample

KiB = 1024
MiB = 1024 * KiB


@pytest.fixture(autouse=True)
def _oracles(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    need("qemu-img", "qemu-io")
    monkeypatch.chdir(workdir)


def exposed(mnt: Path, image: Path) -> Path:
    return mnt / (image.name.rsplit(".", 1)[0] + ".raw")


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
