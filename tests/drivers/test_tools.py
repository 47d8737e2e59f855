"""imgfs compare / commit / rebase / measure / amend against qemu-img.

Every case runs the same command line through qemu-img and imgfs on the
same images (copies of them, for the tools that write) and compares the
output and exit status; written images are judged by `qemu-img compare`
and `qemu-img check`.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import imgfs, need, run

KiB = 1024
MiB = 1024 * KiB


@pytest.fixture(autouse=True)
def _in_workdir(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Relative backing names resolve alike for both tools."""
    need("qemu-img", "qemu-io")
    monkeypatch.chdir(workdir)


def qemu_io(image: str, *commands: str, fmt: str = "qcow2") -> None:
    args: list[str] = []
    for command in commands:
        args += ["-c", command]
    output = run("qemu-io", "-f", fmt, *args, image).stdout
    assert "error" not in output.lower(), output


def qemu_create(image: str, size: str, *options: str, fmt: str = "qcow2") -> str:
    run("qemu-img", "create", "-q", "-f", fmt, *options, image, size)
    return image


def both(*args: str) -> tuple[tuple[int, str], tuple[int, str]]:
    """(exit status, stdout) of qemu-img ARGS and of imgfs ARGS."""
    theirs = run("qemu-img", *args, check=False)
    ours = imgfs(*args, check=False)
    return (theirs.returncode, theirs.stdout), (ours.returncode, ours.stdout)


def assert_clean(image: str) -> None:
    run("qemu-img", "check", image)


def assert_same_contents(first: str, second: str) -> None:
    result = run("qemu-img", "compare", first, second, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# -- compare --------------------------------------------------------------------------------


@pytest.fixture
def compare_images() -> None:
    """a: data at 0; b: a with one byte changed mid-sector; c: only a byte
    far away; big: a's data plus a byte past a's end; bigzero: a's data
    plus explicit zeros past a's end; a.raw: a converted to raw."""
    qemu_create("a.qcow2", "4M")
    qemu_io("a.qcow2", "write -P 1 0 64k", "write -P 5 1M 4k")
    shutil.copy("a.qcow2", "b.qcow2")
    qemu_io("b.qcow2", "write -P 2 8195 1")
    qemu_create("c.qcow2", "4M")
    qemu_io("c.qcow2", "write -P 3 1000003 1")
    qemu_create("big.qcow2", "8M")
    qemu_io("big.qcow2", "write -P 1 0 64k", "write -P 5 1M 4k", "write -P 3 6000001 1")
    qemu_create("bigzero.qcow2", "8M")
    qemu_io("bigzero.qcow2", "write -P 1 0 64k", "write -P 5 1M 4k", "write -P 0 5M 64k",
            "write -z 6M 64k")
    run("qemu-img", "convert", "-O", "raw", "a.qcow2", "a.raw")


@pytest.mark.parametrize("args", [
    "a.qcow2 a.qcow2", "a.qcow2 b.qcow2", "b.qcow2 a.qcow2", "a.qcow2 c.qcow2",
    "c.qcow2 a.qcow2", "a.qcow2 big.qcow2", "big.qcow2 a.qcow2", "a.qcow2 bigzero.qcow2",
    "bigzero.qcow2 a.qcow2", "a.qcow2 a.raw", "-s a.qcow2 a.qcow2", "-s a.qcow2 b.qcow2",
    "-s a.qcow2 a.raw", "-s a.qcow2 bigzero.qcow2", "-f raw a.qcow2 a.qcow2",
    "-F raw a.qcow2 a.qcow2", "-f qcow2 -F raw a.qcow2 a.raw", "-q a.qcow2 b.qcow2",
])
def test_compare_matches_qemu_img(compare_images: None, args: str) -> None:
    theirs, ours = both("compare", *args.split())
    assert ours == theirs


def test_compare_chain_and_zero_flags() -> None:
    """Data from the backing file, zero clusters and holes compare as the
    bytes they read as."""
    qemu_create("base.qcow2", "2M")
    qemu_io("base.qcow2", "write -P 7 0 256k")
    qemu_create("top.qcow2", "2M", "-b", "base.qcow2", "-F", "qcow2")
    qemu_io("top.qcow2", "write -z 64k 64k", "write -P 8 1M 512")
    run("qemu-img", "convert", "-O", "qcow2", "top.qcow2", "flat.qcow2")
    for args in (["top.qcow2", "flat.qcow2"], ["flat.qcow2", "base.qcow2"],
                 ["-s", "top.qcow2", "flat.qcow2"]):
        theirs, ours = both("compare", *args)
        assert ours == theirs, args


def test_compare_errors_exit_2(compare_images: None) -> None:
    for args in (["missing.qcow2", "a.qcow2"], ["a.qcow2", "missing.qcow2"],
                 ["-f", "qcow2", "a.raw", "a.qcow2"]):
        result = imgfs("compare", *args, check=False)
        assert result.returncode == 2, result
        assert result.stderr.startswith("imgfs: ") and result.stderr.count("\n") == 1
        assert run("qemu-img", "compare", *args, check=False).returncode == 2
