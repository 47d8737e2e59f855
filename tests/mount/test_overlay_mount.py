"""-o overlay=FILE: writes go to a qcow2 overlay over the read-only image.

The image is never changed (sha256 before and after); the overlay is an
ordinary qcow2 naming the image as its backing file and format, which
qemu-img opens, compares and commits; a second mount continues where the
first stopped; the image stays readable by qemu-img while mounted, and an
overlay of another image is refused.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import (
    imgfs,
    is_mounted,
    mounted,
    need,
    pwrite_all,
    qemu_raw,
    random_bytes,
    run,
    sha256,
)

MiB = 1 << 20
SIZE = 16 * MiB


def base_image(workdir: Path, fmt: str) -> Path:
    need("qemu-img", "qemu-io")
    image = workdir / f"vm.{fmt}"
    run("qemu-img", "create", "-q", "-f", fmt, image, str(SIZE))
    run("qemu-io", "-f", fmt, "-c", "write -P 0x11 0 2M", "-c", "write -P 0x22 5M 1M", image)
    return image


def overlay_info(overlay: Path) -> dict:
    return json.loads(run("qemu-img", "info", "-U", "--output=json", overlay).stdout)


def assert_same(image: Path, expected: bytes, workdir: Path) -> None:
    reference = workdir / "expected.bin"
    reference.write_bytes(expected)
    run("qemu-img", "compare", "-U", image, "-F", "raw", reference)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_overlay_takes_the_writes_and_commits(workdir: Path, mnt: Path, fmt: str) -> None:
    base = base_image(workdir, fmt)
    before = sha256(base)
    expected = bytearray(qemu_raw(base, workdir / "before.raw"))
    overlay = workdir / "vm-overlay.qcow2"
    writes = [(MiB + 4096, random_bytes(MiB, 3)), (12 * MiB - 100, b"\x77" * 5000), (0, b"A")]
    with mounted(base, mountpoint=mnt, options=f"overlay={overlay},format={fmt}"):
        pwrite_all(mnt / "vm.raw", writes, expected)
        assert (mnt / "vm.raw").read_bytes() == expected
    assert sha256(base) == before
    info = overlay_info(overlay)
    assert info["format"] == "qcow2" and info["virtual-size"] == SIZE
    assert info["backing-filename"] == str(base)
    assert info["backing-filename-format"] == fmt
    run("qemu-img", "check", overlay)
    assert_same(overlay, expected, workdir)
    run("qemu-img", "commit", overlay)
    assert_same(base, expected, workdir)
    if fmt == "qcow2":
        run("qemu-img", "check", base)


def test_second_mount_continues_the_overlay(workdir: Path, mnt: Path) -> None:
    base = base_image(workdir, "qcow2")
    before = sha256(base)
    expected = bytearray(qemu_raw(base, workdir / "before.raw"))
    overlay = workdir / "vm-overlay.qcow2"
    with mounted(base, mountpoint=mnt, options=f"overlay={overlay}"):
        pwrite_all(mnt / "vm.raw", [(3 * MiB, b"\x33" * MiB)], expected)
    with mounted(base, mountpoint=mnt, options=f"overlay={overlay}"):
        assert (mnt / "vm.raw").read_bytes() == expected
        pwrite_all(mnt / "vm.raw", [(3 * MiB + 512, b"\x44" * 8192), (9 * MiB, b"\x55" * 3)],
                   expected)
    with mounted(base, mountpoint=mnt, options=f"ro,overlay={overlay}"):
        assert (mnt / "vm.raw").read_bytes() == expected
        with pytest.raises(OSError):
            os.open(mnt / "vm.raw", os.O_WRONLY)
    assert sha256(base) == before
    assert_same(overlay, expected, workdir)
    run("qemu-img", "check", overlay)


def test_image_is_shared_with_readers_while_mounted(workdir: Path, mnt: Path) -> None:
    base = base_image(workdir, "qcow2")
    expected = qemu_raw(base, workdir / "before.raw")
    overlay = workdir / "vm-overlay.qcow2"
    with mounted(base, mountpoint=mnt, options=f"overlay={overlay}"):
        pwrite_all(mnt / "vm.raw", [(0, b"\x99" * 4096)])
        # no -U: a reader's shared lock is compatible with the mount's
        run("qemu-img", "info", base)
        run("qemu-img", "convert", "-O", "raw", base, workdir / "read.raw")
        assert (workdir / "read.raw").read_bytes() == expected
        # a writer is refused: the image is in use, read-only, by the mount
        writer = run("qemu-io", "-c", "write 0 4k", base, check=False)
        assert writer.returncode != 0 and "lock" in writer.stderr
        # and the overlay itself is locked for writing by the mount
        assert run("qemu-img", "info", overlay, check=False).returncode != 0


def test_relative_names_are_recorded_relative_to_the_overlay(workdir: Path, mnt: Path) -> None:
    base = base_image(workdir, "qcow2")
    (workdir / "overlays").mkdir()
    with mounted("vm.qcow2", mountpoint=mnt, options="overlay=overlays/ovl.qcow2",
                 cwd=workdir):
        pwrite_all(mnt / "vm.raw", [(0, b"\x42" * 512)])
    info = overlay_info(workdir / "overlays" / "ovl.qcow2")
    assert info["backing-filename"] == "../vm.qcow2"
    assert os.path.normpath(info["full-backing-filename"]) == str(base)
    run("qemu-io", "-r", "-c", "read -P 0x42 0 512", "-c", "read -P 0x11 512 1M",
        workdir / "overlays" / "ovl.qcow2")


def test_overlay_of_another_image_is_refused(workdir: Path, mnt: Path) -> None:
    base = base_image(workdir, "qcow2")
    other = workdir / "other.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", other, str(SIZE))
    overlay = workdir / "ovl.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "other.qcow2", "-F", "qcow2", overlay)
    before = overlay.read_bytes()
    result = imgfs("mount", "-o", f"overlay={overlay}", base, mnt, check=False)
    assert result.returncode == 1
    assert result.stderr == (f"imgfs: {overlay}: is an overlay of other.qcow2, "
                             f"not of {base}\n")
    assert not is_mounted(mnt)
    assert overlay.read_bytes() == before


def test_overlay_usage_errors(workdir: Path, mnt: Path) -> None:
    base = base_image(workdir, "qcow2")
    for options, sources, message in (
            ("overlay=o.qcow2,snapshot", [base], "overlay= and snapshot cannot be used together"),
            ("overlay=o.qcow2", [base, base_image(workdir, "raw")],
             "overlay= needs a single SOURCE")):
        result = imgfs("mount", "-o", options, *sources, mnt, check=False)
        assert result.returncode == 2
        assert result.stderr == f"imgfs: {message}\n"
        assert not is_mounted(mnt)
    assert not os.path.exists(workdir / "o.qcow2")
    result = imgfs("mount", "-o", f"ro,overlay={workdir / 'missing.qcow2'}", base, mnt,
                   check=False)
    assert result.returncode == 2 and "does not exist" in result.stderr
    assert not is_mounted(mnt)
    nowhere = workdir / "no-such-dir" / "ovl.qcow2"
    result = imgfs("mount", "-o", f"overlay={nowhere}", base, mnt, check=False)
    assert result.returncode == 1
    assert result.stderr == f"imgfs: {nowhere}: No such file or directory\n"
    assert not is_mounted(mnt)
