"""-o snapshots: each qcow2 internal snapshot as a read-only raw file."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import imgfs, is_mounted, mounted, need, run

MiB = 1 << 20


@pytest.fixture
def image_with_snapshots(workdir: Path) -> Path:
    need("qemu-img", "qemu-io")
    try:
        from imgfs.registry import get_driver
        get_driver("qcow2")
    except Exception:
        pytest.skip("qcow2 driver not available")
    image = workdir / "vm.qcow2"
    run("qemu-img", "create", "-f", "qcow2", image, "8M")
    for pattern, tag in ((0x11, "before-update"), (0x22, "after update")):
        run("qemu-io", "-f", "qcow2", "-c", f"write -P {pattern} 0 1M", image)
        run("qemu-img", "snapshot", "-c", tag, image)
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x33 0 1M", image)
    return image


def snapshot_raw(image: Path, tag: str, out: Path) -> bytes:
    run("qemu-img", "convert", "-U", "-l", f"snapshot.name={tag}", "-O", "raw", image, out)
    return out.read_bytes()


def test_snapshots_appear_read_only_beside_the_live_image(
        image_with_snapshots: Path, mnt: Path, workdir: Path) -> None:
    image = image_with_snapshots
    expected = {tag: snapshot_raw(image, tag, workdir / f"{index}.raw")
                for index, tag in enumerate(("before-update", "after update"))}
    with mounted(image, mountpoint=mnt, options="snapshots"):
        assert sorted(os.listdir(mnt)) == ["vm.raw", "vm@after update.raw",
                                           "vm@before-update.raw"]
        for tag, content in expected.items():
            view = mnt / f"vm@{tag}.raw"
            assert view.read_bytes() == content
            with pytest.raises(OSError):
                os.open(view, os.O_WRONLY)
        # writing the live image leaves every snapshot as it was
        fd = os.open(mnt / "vm.raw", os.O_WRONLY)
        try:
            os.pwrite(fd, b"\x44" * MiB, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        for tag, content in expected.items():
            assert (mnt / f"vm@{tag}.raw").read_bytes() == content
    run("qemu-img", "check", image)
    run("qemu-io", "-r", "-f", "qcow2", "-c", "read -P 0x44 0 1M", image)
    assert snapshot_raw(image, "before-update", workdir / "again.raw") == \
        expected["before-update"]


def test_snapshots_on_a_format_without_them(workdir: Path, mnt: Path) -> None:
    image = workdir / "plain.img"
    image.write_bytes(bytes(MiB))
    result = imgfs("mount", "-o", "snapshots", image, mnt, check=False)
    assert result.returncode == 2 and "no internal snapshots" in result.stderr
    assert not is_mounted(mnt)
