"""imgfs compare / commit / rebase / measure / amend against qemu-img.

Every case runs the same command line through qemu-img and imgfs on the
same images (copies of them, for the tools that write) and compares the
output and exit status; written images are judged by `qemu-img compare`
and `qemu-img check`.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import fast_pbkdf_environment, imgfs, need, run
from tests.drivers.test_qcow2_cli import qemu_io

KiB = 1024
MiB = 1024 * KiB


@pytest.fixture(autouse=True)
def _in_workdir(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Relative backing names resolve alike for both tools."""
    need("qemu-img", "qemu-io")
    monkeypatch.chdir(workdir)


def qemu_create(image: str, size: str, *options: str, fmt: str = "qcow2") -> str:
    run("qemu-img", "create", "-q", "-f", fmt, *options, image, size)
    return image


def both(*args: str) -> tuple[tuple[int, str], tuple[int, str]]:
    """(exit status, stdout) of qemu-img ARGS and of imgfs ARGS (qemu-img
    calibrates a PBKDF even to measure a LUKS header: in milliseconds with
    conftest.fast_pbkdf_environment)."""
    theirs = run("qemu-img", *args, check=False, env=fast_pbkdf_environment())
    ours = imgfs(*args, check=False)
    return (theirs.returncode, theirs.stdout), (ours.returncode, ours.stdout)


def without_progress(output: str) -> str:
    """The output with -p's progress lines ("    (50.00/100%)\\r") left out."""
    return "".join(part for part in output.replace("\r", "\n").splitlines(keepends=True)
                   if not part.lstrip().startswith("(") or not part.rstrip().endswith("%)"))


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


# -- commit ---------------------------------------------------------------------------------


@pytest.fixture
def chain() -> None:
    """base <- mid <- top, each layer writing over part of the one below,
    top with a zero cluster over data; *.orig are pristine copies."""
    qemu_create("base.qcow2", "1M")
    qemu_io("base.qcow2", "write -P 1 0 128k", "write -P 4 768k 64k")
    qemu_create("mid.qcow2", "1M", "-b", "base.qcow2", "-F", "qcow2")
    qemu_io("mid.qcow2", "write -P 2 64k 128k")
    qemu_create("top.qcow2", "2M", "-b", "mid.qcow2", "-F", "qcow2")
    qemu_io("top.qcow2", "write -P 3 512k 64k", "write -z 0 4k", "write -z 768k 64k",
            "write -P 9 1536k 4k")
    for name in ("base", "mid", "top"):
        shutil.copy(f"{name}.qcow2", f"{name}.orig.qcow2")


def restore() -> None:
    for name in ("base", "mid", "top"):
        shutil.copy(f"{name}.orig.qcow2", f"{name}.qcow2")


def assert_commit_like_qemu(*args: str) -> None:
    """imgfs commit ARGS leaves every image of the chain reading as
    qemu-img commit ARGS leaves it, all of them clean."""
    restore()
    theirs = run("qemu-img", "commit", *args)
    for name in ("base", "mid", "top"):
        shutil.copy(f"{name}.qcow2", f"{name}.qemu.qcow2")
    restore()
    ours = imgfs("commit", *args)
    assert without_progress(ours.stdout) == without_progress(theirs.stdout)
    for name in ("base", "mid", "top"):
        assert_clean(f"{name}.qcow2")
        # each image compared alone: what it holds, with its own chain as is
        assert_same_contents(f"{name}.qcow2", f"{name}.qemu.qcow2")
    assert run("qemu-img", "map", "--output=json", "top.qcow2").stdout == \
        run("qemu-img", "map", "--output=json", "top.qemu.qcow2").stdout.replace(
            "qemu.", "") or "-d" in args or "-b" in args


@pytest.mark.parametrize("args", [["top.qcow2"], ["-d", "top.qcow2"],
                                  ["-b", "base.qcow2", "top.qcow2"], ["-q", "top.qcow2"],
                                  ["-p", "-d", "mid.qcow2"]])
def test_commit_matches_qemu_img(chain: None, args: list[str]) -> None:
    assert_commit_like_qemu(*args)


def test_commit_empties_top_and_grows_base(chain: None) -> None:
    imgfs("commit", "top.qcow2")
    info = json.loads(run("qemu-img", "info", "--output=json", "mid.qcow2").stdout)
    assert info["virtual-size"] == 2 * MiB
    assert_same_contents("top.qcow2", "top.orig.qcow2")
    assert_same_contents("mid.qcow2", "top.orig.qcow2")
    mapped = run("qemu-img", "map", "--output=json", "top.qcow2").stdout
    assert '"depth": 0' not in mapped             # nothing left in the top image


def test_commit_errors_match_qemu_img(chain: None) -> None:
    for args in (["base.qcow2"], ["-b", "missing.qcow2", "top.qcow2"], ["missing.qcow2"]):
        theirs = run("qemu-img", "commit", *args, check=False)
        ours = imgfs("commit", *args, check=False)
        assert ours.returncode == theirs.returncode == 1, args
        assert ours.stderr.count("\n") == 1
    assert "Image does not have a backing file" in imgfs("commit", "base.qcow2",
                                                         check=False).stderr


# -- rebase ---------------------------------------------------------------------------------


def assert_rebase_like_qemu(*args: str) -> None:
    restore()
    theirs = run("qemu-img", "rebase", *args, check=False)
    shutil.copy("top.qcow2", "top.qemu.qcow2")
    restore()
    ours = imgfs("rebase", *args, check=False)
    assert (ours.returncode, without_progress(ours.stdout)) == \
        (theirs.returncode, without_progress(theirs.stdout)), ours.stderr
    assert_clean("top.qcow2")
    info = [json.loads(run("qemu-img", "info", "--output=json", "-U", image).stdout)
            for image in ("top.qcow2", "top.qemu.qcow2")]
    for key in ("backing-filename", "backing-filename-format", "virtual-size"):
        assert info[0].get(key) == info[1].get(key), key
    if "-u" not in args and theirs.returncode == 0:
        assert_same_contents("top.qcow2", "top.orig.qcow2")
    assert_same_contents("top.qcow2", "top.qemu.qcow2")


@pytest.mark.parametrize("args", [
    "-b base.qcow2 -F qcow2", "-b mid.qcow2 -F qcow2", "-b  ", "-u -b base.qcow2 -F qcow2",
    "-u -b  ", "-u -b base.qcow2 -F raw", "-p -b base.qcow2 -F qcow2",
    "-b base.qcow2", "-u -b base.qcow2", "-b missing.qcow2 -F qcow2",
])
def test_rebase_matches_qemu_img(chain: None, args: str) -> None:
    argv = args.split(" ")
    argv = [arg for arg in argv if arg != ""] if "-b  " not in args else \
        [arg for arg in argv if arg != ""] + [""]
    if "" in argv:
        argv.remove("")
        argv.insert(argv.index("-b") + 1, "")
    assert_rebase_like_qemu(*argv, "top.qcow2")


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_rebase_unsafe_rewrites_header(compat: str) -> None:
    """The new name and format replace the old ones; other extensions stay;
    the name grows past the old one and shrinks again."""
    qemu_create("base.qcow2", "1M")
    qemu_create("img.qcow2", "1M", "-o", f"compat={compat}", "-b", "base.qcow2", "-F", "qcow2")
    qemu_io("img.qcow2", "write -P 6 0 64k")
    long_name = "a" * 200 + ".qcow2"
    shutil.copy("base.qcow2", long_name)
    for name, fmt in ((long_name, "qcow2"), ("base.qcow2", "raw"), ("", "")):
        imgfs("rebase", "-u", "-b", name, *(["-F", fmt] if fmt else []), "img.qcow2")
        assert_clean("img.qcow2")
        info = json.loads(run("qemu-img", "info", "--output=json", "img.qcow2").stdout)
        assert info.get("backing-filename") == (name or None)
        assert info.get("backing-filename-format") == (fmt or None)
        assert info["format-specific"]["data"]["compat"] == compat
    run("qemu-img", "convert", "-O", "raw", "img.qcow2", "img.raw")
    assert Path("img.raw").read_bytes()[:64 * KiB] == bytes([6]) * 64 * KiB


# -- measure --------------------------------------------------------------------------------


@pytest.fixture
def measure_sources() -> None:
    """A qcow2 with data, zeros and holes (and two bitmaps), a qcow2 over
    it, a v2 qcow2 and a sparse raw file."""
    qemu_create("src.qcow2", "10M")
    qemu_io("src.qcow2", "write -P 1 0 100k", "write -z 1M 1M", "write -P 2 5000k 3k",
            "write -P 3 9M 512")
    run("qemu-img", "bitmap", "--add", "src.qcow2", "bitmap0")
    run("qemu-img", "bitmap", "--add", "-g", "4k", "src.qcow2", "a-longer-bitmap-name")
    qemu_create("over.qcow2", "12M", "-b", "src.qcow2", "-F", "qcow2")
    qemu_io("over.qcow2", "write -P 4 10M 1M")
    qemu_create("v2.qcow2", "3M", "-o", "compat=0.10")
    qemu_io("v2.qcow2", "write -P 5 64k 64k")
    run("qemu-img", "convert", "-O", "raw", "src.qcow2", "src.raw")


@pytest.mark.parametrize("args", [
    "-O qcow2 --size 10G", "-O qcow2 --size 1000", "-O qcow2 -o cluster_size=512 --size 3G",
    "-O qcow2 -o cluster_size=2M --size 100G", "-O qcow2 -o cluster_size=4k --size 1T",
    "-O qcow2 -o extended_l2=on,cluster_size=16k --size 7G",
    "-O qcow2 -o extended_l2=on,cluster_size=2M --size 7G",
    "-O qcow2 -o refcount_bits=1 --size 5G", "-O qcow2 -o refcount_bits=64 --size 5G",
    "-O qcow2 -o refcount_bits=8,cluster_size=1k --size 5G",
    "-O qcow2 -o preallocation=metadata --size 5G", "-O qcow2 -o preallocation=falloc --size 5G",
    "-O qcow2 -o preallocation=full --size 5G", "-O qcow2 -o compat=0.10 --size 5G",
    "-O qcow2 -o lazy_refcounts=on --size 5G", "-O qcow2 -o cluster_size=1k --size 16T",
    "-O raw --size 10G", "-O raw --size 1000", "--size 5M",
    "-O qcow2 src.qcow2", "-O qcow2 -o cluster_size=4k src.qcow2",
    "-O qcow2 -o cluster_size=2M src.qcow2", "-O qcow2 -o compat=0.10 src.qcow2",
    "-O qcow2 -o extended_l2=on src.qcow2", "-O qcow2 over.qcow2",
    "-O qcow2 -o backing_file=src.qcow2,backing_fmt=qcow2 over.qcow2",
    "-O qcow2 -o preallocation=full over.qcow2", "-O qcow2 v2.qcow2", "-O qcow2 src.raw",
    "-O raw src.qcow2", "-O raw over.qcow2", "src.raw", "-f raw -O qcow2 src.qcow2",
    "-O qcow --size 1G", "--size 1G src.qcow2", "",
])
def test_measure_matches_qemu_img(measure_sources: None, args: str) -> None:
    theirs, ours = both("measure", "--output", "json", *args.split())
    assert ours == theirs


@pytest.mark.parametrize("args", ["-O qcow2 src.qcow2", "-O qcow2 --size 5G", "src.raw",
                                  "-O qcow2 v2.qcow2"])
def test_measure_human_output_matches_qemu_img(measure_sources: None, args: str) -> None:
    theirs, ours = both("measure", *args.split())
    assert ours == theirs


@pytest.mark.parametrize("options", [
    "key-secret=s", "key-secret=s,cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv",
    "cipher-alg=aes-128",
])
def test_measure_luks_matches_qemu_img(measure_sources: None, options: str) -> None:
    secret = ["--object", "secret,id=s,data=pass"]
    for args in (["-O", "luks", "--size", "1G"], ["-O", "luks", "src.qcow2"]):
        theirs, ours = both("measure", *secret, *args, "-o", options)
        assert ours == theirs
    qcow2_options = ",".join(f"encrypt.{option}" for option in options.split(","))
    theirs, ours = both("measure", *secret, "-O", "qcow2", "--size", "3G", "-o",
                        f"encrypt.format=luks,{qcow2_options}", "--output=json")
    assert ours == theirs


# -- convert -S 0 ---------------------------------------------------------------------------


@pytest.mark.parametrize("out_fmt", ["qcow2", "raw"])
def test_convert_sparse_0_allocates_everything(out_fmt: str) -> None:
    """-S 0 writes holes and zero ranges out, as qemu-img convert -S 0 does."""
    qemu_create("sparse.qcow2", "4M")
    qemu_io("sparse.qcow2", "write -P 1 1M 4k", "write -z 2M 64k")
    imgfs("convert", "-S", "0", "-O", out_fmt, "sparse.qcow2", f"ours.{out_fmt}")
    run("qemu-img", "convert", "-S", "0", "-O", out_fmt, "sparse.qcow2", f"theirs.{out_fmt}")
    assert_same_contents("sparse.qcow2", f"ours.{out_fmt}")
    maps = [json.loads(run("qemu-img", "map", "--output=json", "-f", out_fmt, image).stdout)
            for image in (f"ours.{out_fmt}", f"theirs.{out_fmt}")]
    assert [(entry["start"], entry["length"], entry["data"]) for entry in maps[0]] == \
        [(entry["start"], entry["length"], entry["data"]) for entry in maps[1]] == \
        [(0, 4 * MiB, True)]
    if out_fmt == "qcow2":
        assert_clean("ours.qcow2")
    else:
        assert Path("ours.raw").stat().st_blocks * 512 >= 4 * MiB


# -- amend ----------------------------------------------------------------------------------


def amend_sources() -> dict[str, tuple[str, ...]]:
    """name -> qemu-img create options; every image then gets data, a zero
    cluster over nothing and a zero cluster over written data."""
    return {"v3": (), "v2": ("-o", "compat=0.10"), "lazy": ("-o", "lazy_refcounts=on"),
            "r8": ("-o", "refcount_bits=8"), "extl2": ("-o", "extended_l2=on"),
            "small": ("-o", "cluster_size=4k"), "over": ("-b", "base.qcow2", "-F", "qcow2")}


def make_amend_image(name: str) -> str:
    if not Path("base.qcow2").exists():
        qemu_create("base.qcow2", "2M")
        qemu_io("base.qcow2", "write -P 7 0 2M")
    image = qemu_create(f"{name}.qcow2", "2M", *amend_sources()[name])
    writes = ["write -P 1 0 128k", "write -P 2 512k 64k"]
    if name != "v2":
        writes += ["write -z 256k 64k", "write -z 512k 64k"]
    qemu_io(image, *writes)
    return image


def assert_amend_like_qemu(name: str, options: str) -> None:
    image = make_amend_image(name)
    shutil.copy(image, "theirs.qcow2")
    shutil.copy(image, "orig.qcow2")
    theirs = run("qemu-img", "amend", "-o", options, "theirs.qcow2", check=False)
    ours = imgfs("amend", "-o", options, image, check=False)
    assert ours.returncode == theirs.returncode, (ours.stderr, theirs.stderr)
    assert ours.stdout == theirs.stdout
    if ours.returncode:
        assert ours.stderr.count("\n") == 1
        assert run("cmp", image, "orig.qcow2", check=False).returncode == 0
        return
    assert_clean(image)
    info = [json.loads(run("qemu-img", "info", "--output=json", path).stdout)
            for path in (image, "theirs.qcow2")]
    for key in ("virtual-size", "backing-filename", "backing-filename-format"):
        assert info[0].get(key) == info[1].get(key), key
    assert info[0]["format-specific"] == info[1]["format-specific"]
    assert_same_contents(image, "theirs.qcow2")


@pytest.mark.parametrize("name", ["v3", "v2", "lazy", "r8", "over"])
@pytest.mark.parametrize("options", [
    "compat=0.10", "compat=1.1", "compat=v3", "lazy_refcounts=on", "lazy_refcounts=off",
    "refcount_bits=64", "refcount_bits=1", "refcount_bits=8", "size=4M", "size=1M",
    "compat=1.1,lazy_refcounts=on,refcount_bits=32", "compat=0.10,lazy_refcounts=on",
    "compat=0.10,refcount_bits=16", "compat=0.10,refcount_bits=8",
])
def test_amend_matches_qemu_img(name: str, options: str) -> None:
    assert_amend_like_qemu(name, options)


@pytest.mark.parametrize("name, options", [
    ("extl2", "compat=0.10"), ("extl2", "refcount_bits=64"), ("extl2", "size=3M"),
    ("small", "refcount_bits=1"), ("small", "compat=0.10"), ("small", "size=1000k"),
])
def test_amend_other_layouts_match_qemu_img(name: str, options: str) -> None:
    assert_amend_like_qemu(name, options)


@pytest.mark.parametrize("options", [
    "cluster_size=4k", "preallocation=full", "extended_l2=on", "encrypt.format=luks",
    "backing_file=other.qcow2", "backing_fmt=raw", "data_file=x", "foo=1",
    "refcount_bits=3", "compat=2",
])
def test_amend_refusals_match_qemu_img(options: str) -> None:
    assert_amend_like_qemu("over", options)


def test_amend_upgrade_writes_the_header_qemu_writes() -> None:
    """0.10 -> 1.1: byte for byte the header cluster qemu-img amend writes."""
    make_amend_image("v2")
    shutil.copy("v2.qcow2", "theirs.qcow2")
    imgfs("amend", "-o", "compat=1.1", "v2.qcow2")
    run("qemu-img", "amend", "-o", "compat=1.1", "theirs.qcow2")
    assert Path("v2.qcow2").read_bytes()[:64 * KiB] == Path("theirs.qcow2").read_bytes()[:64 * KiB]


def test_amend_refuses_raw_and_amend_help() -> None:
    qemu_create("plain.raw", "1M", fmt="raw")
    ours = imgfs("amend", "-f", "raw", "-o", "size=2M", "plain.raw", check=False)
    assert ours.returncode == 1
    assert "does not support option amendment" in ours.stderr
    make_amend_image("v3")
    listing = imgfs("amend", "-o", "help", "v3.qcow2").stdout
    for name in ("compat", "lazy_refcounts", "refcount_bits", "size", "encrypt.keyslot"):
        assert f"  {name}=" in listing


# -- qcow (version 1): commit and rebase ------------------------------------------------------


@pytest.fixture
def qcow_chain() -> None:
    qemu_create("base.qcow2", "1M")
    qemu_io("base.qcow2", "write -P 1 0 256k")
    qemu_create("top.qcow", "1M", "-b", "base.qcow2", "-F", "qcow2", fmt="qcow")
    qemu_io("top.qcow", "write -P 2 64k 64k", "write -P 3 700k 4k", fmt="qcow")
    shutil.copy("top.qcow", "top.orig.qcow")


def test_qcow_commit_like_qemu_img(qcow_chain: None) -> None:
    shutil.copy("base.qcow2", "base.orig.qcow2")
    run("qemu-img", "commit", "top.qcow")
    shutil.copy("base.qcow2", "base.qemu.qcow2")
    shutil.copy("base.orig.qcow2", "base.qcow2")
    shutil.copy("top.orig.qcow", "top.qcow")
    assert imgfs("commit", "top.qcow").stdout == "Image committed.\n"
    assert_clean("base.qcow2")
    assert_same_contents("base.qcow2", "base.qemu.qcow2")
    assert_same_contents("top.qcow", "top.orig.qcow")
    mapped = run("qemu-img", "map", "--output=json", "top.qcow").stdout
    assert '"depth": 0' not in mapped             # emptied, as qemu-img leaves it


def test_qcow_rebase_rewrites_the_name(qcow_chain: None) -> None:
    """QEMU cannot rebase a qcow image; imgfs can, and QEMU reads the result.
    A name longer than the room before the L1 table moves the table."""
    qemu_create("mid.qcow2", "1M", "-b", "base.qcow2", "-F", "qcow2")
    long_name = "b" * 200 + ".qcow2"
    shutil.copy("base.qcow2", long_name)
    for args in (["-b", "mid.qcow2", "-F", "qcow2"], ["-u", "-b", long_name, "-F", "qcow2"],
                 ["-b", ""], ["-u", "-b", "base.qcow2", "-F", "qcow2"]):
        imgfs("rebase", *args, "top.qcow")
        info = json.loads(run("qemu-img", "info", "--output=json", "top.qcow").stdout)
        assert info.get("backing-filename") == (args[args.index("-b") + 1] or None)
        assert_same_contents("top.qcow", "top.orig.qcow")
    qemu_io("top.qcow", "write -P 9 0 64k", fmt="qcow")
    qemu_io("top.qcow", "read -P 9 0 64k", "read -P 2 64k 64k", "read -P 3 700k 4k",
            fmt="qcow")


# -- amend: LUKS key slots ---------------------------------------------------------------------

SECRETS = ["--object", "secret,id=s0,data=pw0", "--object", "secret,id=s1,data=pw1",
           "--object", "secret,id=s2,data=pw2"]
#: each step: options, for a standalone LUKS image (qcow2 gets them as encrypt.*)
KEYSLOT_STEPS = [
    "state=active,new-secret=s1,iter-time=10",
    "state=active,new-secret=s2,keyslot=1,iter-time=10",
    "state=active,new-secret=s2,keyslot=9",
    "state=active",
    "state=active,new-secret=s2,old-secret=s1",
    "state=inactive,new-secret=s2",
    "state=inactive",
    "state=inactive,keyslot=5",
    "state=active,new-secret=s2,keyslot=6,iter-time=10",
    "state=inactive,old-secret=s2",
    "state=inactive,keyslot=1,old-secret=s0",
    "state=inactive,old-secret=s1,keyslot=1",
    "state=inactive,keyslot=0",
    "keyslot=0",
    "state=active,new-secret=s2,iter-time=10",
]


def qemu_img_retrying(*args: str) -> subprocess.CompletedProcess[str]:
    """qemu-img calibrating a PBKDF (see both())."""
    return run("qemu-img", *args, check=False, env=fast_pbkdf_environment())


def slot_states(image: str, fmt: str) -> list[bool]:
    info = json.loads(run("qemu-img", "info", "--output=json", image).stdout)
    data = info["format-specific"]["data"]
    slots = data["encrypt"]["slots"] if fmt == "qcow2" else data["slots"]
    return [slot["active"] for slot in slots]


def opens_with(image: str, fmt: str, secret: str) -> bool:
    key = "encrypt.key-secret" if fmt == "qcow2" else "key-secret"
    result = run("qemu-io", *SECRETS, "--image-opts",
                 f"driver={fmt},{key}={secret},file.filename={image}",
                 "-c", "read -P 5 0 64k", check=False)
    return result.returncode == 0 and "error" not in result.stdout.lower() + result.stderr


@pytest.mark.parametrize("fmt", ["luks", "qcow2"])
def test_amend_keyslots_like_qemu_img(fmt: str) -> None:
    """The same amend steps through qemu-img and imgfs: same exit status at
    each step, same active key slots, the same passphrases open the data."""
    prefix = "encrypt." if fmt == "qcow2" else ""
    options = f"{prefix}format=luks,{prefix}key-secret=s0,{prefix}iter-time=10" \
        if fmt == "qcow2" else "key-secret=s0,iter-time=10"
    result = qemu_img_retrying("create", "-q", "-f", fmt, *SECRETS, "-o", options,
                               "ours.img", "4M")
    assert result.returncode == 0, result.stderr
    key = f"{prefix}key-secret"
    run("qemu-io", *SECRETS, "--image-opts", f"driver={fmt},{key}=s0,file.filename=ours.img",
        "-c", "write -P 5 0 64k")
    shutil.copy("ours.img", "theirs.img")
    for step in KEYSLOT_STEPS:
        step = ",".join(prefix + option for option in step.split(","))
        opener = next(f"s{n}" for n in range(3) if opens_with("ours.img", fmt, f"s{n}"))
        theirs = qemu_img_retrying("amend", *SECRETS, "-o", step, "--image-opts",
                                   f"driver={fmt},{key}={opener},file.filename=theirs.img")
        ours = imgfs("amend", *SECRETS, "-o", step,
                     f'json:{{"driver":"{fmt}","{key}":"{opener}",'
                     '"file":{"filename":"ours.img"}}', check=False)
        assert ours.returncode == theirs.returncode, (step, ours.stderr, theirs.stderr)
        if theirs.returncode:
            assert theirs.stderr.split(": ", 1)[1].strip() in ours.stderr, step
        assert slot_states("ours.img", fmt) == slot_states("theirs.img", fmt), step
        for secret in ("s0", "s1", "s2"):
            assert opens_with("ours.img", fmt, secret) == \
                opens_with("theirs.img", fmt, secret), (step, secret)
    if fmt == "qcow2":
        opener = next(f"s{n}" for n in range(3) if opens_with("ours.img", fmt, f"s{n}"))
        run("qemu-img", "check", *SECRETS, "--image-opts",
            f"driver=qcow2,encrypt.key-secret={opener},file.filename=ours.img")
