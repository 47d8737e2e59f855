"""Corners where imgfs's qemu-img-style tools answer as qemu-img 7.2 does.

Each case runs the same command line through qemu-img and imgfs, in the
same directory on the same images, and compares the exit status and the
output (stdout; stderr is only required to be one imgfs line).
"""
from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest

from tests.conftest import fast_pbkdf_environment, imgfs, need, run

MiB = 1024 * 1024


@pytest.fixture(autouse=True)
def _in_workdir(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Relative names resolve alike for both tools."""
    need("qemu-img")
    monkeypatch.chdir(workdir)


def both(*args: str) -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
    return run("qemu-img", *args, check=False), imgfs(*args, check=False)


def assert_same(*args: str, status: int) -> None:
    """qemu-img ARGS and imgfs ARGS: exit `status`, the same stdout, and a
    failure is one imgfs line."""
    theirs, ours = both(*args)
    assert (theirs.returncode, ours.returncode) == (status, status), (theirs, ours)
    assert ours.stdout == theirs.stdout
    if status:
        lines = ours.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("imgfs: "), ours.stderr


# -- snapshot on formats without internal snapshots ------------------------------------


@pytest.mark.parametrize("fmt", ["raw", "qcow", "vmdk", "vpc", "vdi", "qed"])
def test_snapshot_on_a_format_without_snapshots(fmt: str) -> None:
    """-l lists nothing and succeeds; -c, -a, -d fail with exit 1."""
    image = f"t.{fmt}"
    run("qemu-img", "create", "-q", "-f", fmt, image, "1M")
    assert_same("snapshot", "-l", image, status=0)
    for action in ("-c", "-a", "-d"):
        assert_same("snapshot", "-f", fmt, action, "s1", image, status=1)
    assert "no internal snapshots" in imgfs("snapshot", "-c", "s1", image, check=False).stderr


# -- a backing file that cannot be opened ----------------------------------------------


@pytest.fixture
def missing_backing() -> str:
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "nonexist.qcow2", "-F", "qcow2", "-u",
        "m.qcow2", "1M")
    return "m.qcow2"


@pytest.mark.parametrize("output", ["human", "json"])
def test_info_without_the_backing_file(missing_backing: str, tmp_path: Path,
                                       output: str) -> None:
    assert_same("info", f"--output={output}", missing_backing, status=0)
    # named from elsewhere, the full backing name is resolved as qemu-img does
    assert_same("info", f"--output={output}", str(tmp_path / missing_backing), status=0)


@pytest.mark.parametrize("command", [
    ["info", "--backing-chain"], ["info", "--backing-chain", "--output=json"], ["check"],
    ["map"], ["map", "--output=json"], ["measure", "-O", "qcow2"], ["convert", "-O", "raw"]])
def test_tools_that_need_the_backing_file_refuse(missing_backing: str,
                                                 command: list[str]) -> None:
    target = ["out.raw"] if command[0] == "convert" else []
    assert_same(*command, missing_backing, *target, status=1)
    assert "nonexist.qcow2" in imgfs(*command, missing_backing, *target, check=False).stderr


def test_compare_without_the_backing_file_is_an_error(missing_backing: str) -> None:
    assert_same("compare", missing_backing, missing_backing, status=2)


def test_info_of_a_chain_that_loops(tmp_path: Path) -> None:
    """Plain info describes the top image; --backing-chain refuses the loop."""
    run("qemu-img", "create", "-q", "-f", "qcow2", "a.qcow2", "1M")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", "b.qcow2")
    run("qemu-img", "rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", "a.qcow2")
    assert_same("info", "a.qcow2", status=0)
    assert_same("info", "--backing-chain", "a.qcow2", status=1)


# -- --image-opts ------------------------------------------------------------------------


@pytest.fixture
def opts_image() -> str:
    """A qcow2 image with data and a snapshot, named by an option string."""
    need("qemu-io")
    run("qemu-img", "create", "-q", "-f", "qcow2", "a,b.qcow2", "4M")
    run("qemu-io", "-c", "write -P 1 0 64k", "-c", "write -P 2 1M 4k", "a,b.qcow2")
    run("qemu-img", "snapshot", "-c", "first", "a,b.qcow2")
    return "driver=qcow2,file.filename=a,,b.qcow2"


@pytest.mark.parametrize("command", [
    ["info"], ["info", "--output=json"], ["check"], ["check", "--output=json"],
    ["measure", "-O", "qcow2"], ["snapshot", "-l"]])
def test_image_opts_as_qemu_img(opts_image: str, command: list[str]) -> None:
    assert_same(*command, "--image-opts", opts_image, status=0)


def test_image_opts_probe_compare_and_map(opts_image: str) -> None:
    assert_same("info", "--image-opts", "file.filename=a,,b.qcow2", status=0)
    assert_same("compare", "--image-opts", opts_image, "file.filename=a,,b.qcow2", status=0)
    assert imgfs("map", "--image-opts", opts_image).stdout == imgfs("map", "a,b.qcow2").stdout
    # a string that names no image: an error for qemu-img, a usage error
    # (exit 2, as an invalid json: source) for imgfs
    theirs, ours = both("info", "--image-opts", "filename=a,,b.qcow2")
    assert (theirs.returncode, ours.returncode) == (1, 2)
    assert ours.stderr.count("\n") == 1 and "driver=" in ours.stderr


def test_image_opts_convert_and_write_tools(opts_image: str) -> None:
    run("qemu-img", "convert", "--image-opts", "-O", "raw", opts_image, "theirs.raw")
    imgfs("convert", "--image-opts", "-O", "raw", opts_image, "ours.raw")
    assert Path("ours.raw").read_bytes() == Path("theirs.raw").read_bytes()
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "a,b.qcow2", "-F", "qcow2", "top.qcow2")
    run("qemu-io", "-c", "write -P 9 2M 64k", "top.qcow2")
    top = "driver=qcow2,file.filename=top.qcow2"
    imgfs("resize", "--image-opts", top, "8M")
    imgfs("amend", "--image-opts", "-o", "lazy_refcounts=on", top)
    imgfs("snapshot", "--image-opts", "-c", "second", top)
    imgfs("commit", "--image-opts", top)
    report = json.loads(run("qemu-img", "info", "--output=json", "top.qcow2").stdout)
    assert report["virtual-size"] == 8 * MiB
    assert report["format-specific"]["data"]["lazy-refcounts"] is True
    assert [snap["name"] for snap in report["snapshots"]] == ["second"]
    assert run("qemu-io", "-c", "read -P 9 2M 64k", "a,b.qcow2").returncode == 0
    run("qemu-img", "check", "top.qcow2")
    run("qemu-img", "check", "a,b.qcow2")


def test_image_opts_excludes_a_format(opts_image: str) -> None:
    """qemu-img refuses -f with --image-opts (exit 1); for imgfs that is a
    usage error (exit 2, as every usage error)."""
    theirs, ours = both("info", "-f", "qcow2", "--image-opts", opts_image)
    assert (theirs.returncode, ours.returncode) == (1, 2)
    assert "mutually exclusive" in ours.stderr


# -- json: sources -------------------------------------------------------------------------


def test_json_source_that_names_no_image_is_refused() -> None:
    """json:{"filename":...} is neither a format nor a file to probe: qemu-img
    refuses it (exit 1), imgfs too, as a usage error (exit 2); imgfs
    used to open it as a bare protocol node, format "file"."""
    run("qemu-img", "create", "-q", "-f", "qcow2", "t.qcow2", "1M")
    theirs, ours = both("info", 'json:{"filename":"t.qcow2"}')
    assert (theirs.returncode, ours.returncode) == (1, 2)
    assert ours.stderr.count("\n") == 1 and '"driver" or "file"' in ours.stderr
    for tree in ('{"file":{"filename":"t.qcow2"}}', '{"driver":"qcow2","file.filename":"t.qcow2"}'):
        assert_same("info", f"json:{tree}", status=0)
    # (qemu-img rounds the file's size up to 512 bytes; imgfs does not)
    report = json.loads(imgfs("info", "--output=json",
                              'json:{"driver":"file","filename":"t.qcow2"}').stdout)
    assert (report["format"], report["filename"]) == ("file", "t.qcow2")
    assert_same("check", "--output=json", 'json:{"file":{"filename":"t.qcow2"}}', status=0)


# -- flags qemu-img has ----------------------------------------------------------------------


def map_entries(*args: str) -> tuple[list[dict], list[dict]]:
    """map --output=json of both tools, host offsets included."""
    theirs, ours = both("map", "--output=json", *args)
    assert (theirs.returncode, ours.returncode) == (0, 0), (theirs, ours)
    return json.loads(theirs.stdout), json.loads(ours.stdout)


@pytest.mark.parametrize("window", [
    ["--start-offset=1M", "--max-length=1100k"], ["--start-offset=1000"], ["--max-length=3"],
    ["--max-length=0"], ["--start-offset=5M"], ["--start-offset=2M", "--max-length=64M"]])
def test_map_window(window: list[str]) -> None:
    need("qemu-io")
    run("qemu-img", "create", "-q", "-f", "qcow2", "d.qcow2", "4M")
    run("qemu-io", "-c", "write -P 1 0 64k", "-c", "write -z 1M 64k", "-c", "write -P 2 2M 128k",
        "d.qcow2")
    theirs, ours = map_entries(*window, "d.qcow2")
    assert ours == theirs


def written(fmt: str, image: str, *commands: str, options: tuple[str, ...] = (),
            size: str = "4M") -> str:
    """`image` created by qemu-img and written by qemu-io's `commands`."""
    run("qemu-img", "create", "-q", "-f", fmt, *options, image, size)
    run("qemu-io", "-f", fmt, *[part for command in commands for part in ("-c", command)],
        image)
    return image


def qcow2_over_backing() -> str:
    written("qcow2", "base.qcow2", "write -P 1 0 1M", "write -P 2 2M 64k")
    return written("qcow2", "m.qcow2", "write -P 3 512k 64k", "write -z 2M 32k",
                   options=("-b", "base.qcow2", "-F", "qcow2"))


#: images written by QEMU whose maps give offsets in a file
MAPPED_IMAGES: dict[str, Callable[[], str]] = {
    "raw with holes": lambda: written("raw", "m.raw", "write -P 1 1M 64k"),
    "qcow2 over a backing file": qcow2_over_backing,
    "compressed qcow2": lambda: written("qcow2", "m.qcow2", "write -P 1 0 128k",
                                        "write -c -P 2 1M 64k"),
    "qcow2 with a data file": lambda: written("qcow2", "m.qcow2", "write -P 5 64k 64k",
                                              options=("-o", "data_file=d.raw")),
    **{f"{fmt} written out of order": partial(
        written, fmt, f"m.{fmt}", "write -P 1 2M 64k", "write -P 2 0 64k",
        "write -P 3 64k 64k", options=options)
       for fmt, options in (("qed", ()), ("vdi", ()), ("qcow", ()), ("parallels", ()),
                            ("vmdk", ("-o", "subformat=twoGbMaxExtentSparse")))},
}


@pytest.mark.parametrize("name", sorted(MAPPED_IMAGES))
def test_map_offsets_as_qemu_img(name: str) -> None:
    """Each range's offset in the file, and ranges joined where their
    bytes follow each other there, as qemu-img map prints them."""
    need("qemu-io")
    theirs, ours = map_entries(MAPPED_IMAGES[name]())
    assert any("offset" in entry for entry in theirs)
    assert ours == theirs


# -- convert into an existing image (-n) and its companions ----------------------------


@pytest.fixture
def convert_source() -> str:
    need("qemu-io")
    return written("qcow2", "src.qcow2", "write -P 1 0 64k", "write -P 2 1M 128k",
                   "write -z 2M 64k")


def noise(name: str, size: int) -> str:
    Path(name).write_bytes(bytes(range(256)) * (size // 256))
    return name


@pytest.mark.parametrize("extra", [[], ["--target-is-zero"], ["-m", "1"], ["-m", "16", "-W"],
                                   ["-S", "0"]])
def test_convert_into_an_existing_image(convert_source: str, extra: list[str]) -> None:
    """-n writes the source over what the target held (zeros where the
    source reads as zeros, unless --target-is-zero says they are there),
    leaves the target's size and what lies past the source's end."""
    for tool, target in (("qemu-img", "theirs.raw"), ("imgfs", "ours.raw")):
        noise(target, 8 * MiB)
        command = run if tool == "qemu-img" else imgfs
        command(*(["qemu-img"] if tool == "qemu-img" else []), "convert", "-n", *extra,
                "-O", "raw", convert_source, target)
    assert Path("ours.raw").read_bytes() == Path("theirs.raw").read_bytes()


def test_convert_into_image_opts(convert_source: str) -> None:
    run("qemu-img", "create", "-q", "-f", "qcow2", "ours.qcow2", "4M")
    imgfs("convert", "-n", "--target-image-opts", convert_source,
          "driver=qcow2,file.filename=ours.qcow2")
    assert run("qemu-img", "compare", convert_source, "ours.qcow2").returncode == 0


@pytest.mark.parametrize("args", [
    ["-n", "-O", "raw", "src.qcow2", "small.raw"],
    ["--target-is-zero", "-O", "raw", "src.qcow2", "new.raw"],
    ["--target-image-opts", "src.qcow2", "driver=raw,file.filename=new.raw"],
    ["-n", "--target-image-opts", "-O", "raw", "src.qcow2", "driver=raw,file.filename=big.raw"],
    ["-n", "-o", "cluster_size=4k", "-O", "qcow2", "src.qcow2", "big.raw"],
    ["-n", "-O", "raw", "src.qcow2", "missing.raw"],
    ["-m", "0", "src.qcow2", "new.raw"], ["-m", "17", "src.qcow2", "new.raw"],
    ["-F", "qcow2", "-O", "qcow2", "src.qcow2", "new.qcow2"]])
def test_convert_refusals(convert_source: str, args: list[str]) -> None:
    noise("small.raw", MiB)
    noise("big.raw", 8 * MiB)
    assert_same("convert", *args, status=1)
    assert not Path("new.raw").exists() and not Path("new.qcow2").exists()


def test_convert_backing_format(convert_source: str) -> None:
    """-B with -F: the new image names its backing file's format."""
    run("qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "4M")
    imgfs("convert", "-B", "base.qcow2", "-F", "qcow2", "-O", "qcow2", convert_source,
          "top.qcow2")
    info = json.loads(run("qemu-img", "info", "--output=json", "top.qcow2").stdout)
    assert (info["backing-filename"], info["backing-filename-format"]) == \
        ("base.qcow2", "qcow2")
    assert run("qemu-img", "compare", convert_source, "top.qcow2").returncode == 0


@pytest.fixture
def snapshotted() -> str:
    """sn.qcow2: 0x01 in snapshot 1 ("first"), 0x02 in the live image."""
    need("qemu-io")
    written("qcow2", "sn.qcow2", "write -P 1 0 64k")
    run("qemu-img", "snapshot", "-c", "first", "sn.qcow2")
    run("qemu-io", "-c", "write -P 2 0 64k", "sn.qcow2")
    return "sn.qcow2"


@pytest.mark.parametrize("selector", ["first", "1", "snapshot.name=first", "snapshot.id=1",
                                      "snapshot.id=1,snapshot.name=first"])
def test_convert_a_snapshot(snapshotted: str, selector: str) -> None:
    imgfs("convert", "-l", selector, "-O", "raw", snapshotted, "ours.raw")
    run("qemu-img", "convert", "-l", selector, "-O", "raw", snapshotted, "theirs.raw")
    assert Path("ours.raw").read_bytes() == Path("theirs.raw").read_bytes()
    assert Path("ours.raw").read_bytes()[:1] == b"\x01"


@pytest.mark.parametrize("selector", ["zz", "snapshot.id=1,snapshot.name=zz", "snapshot.foo=1"])
def test_convert_a_missing_snapshot(snapshotted: str, selector: str) -> None:
    assert_same("convert", "-l", selector, "-O", "raw", snapshotted, "out.raw", status=1)


@pytest.mark.parametrize("fmt", ["raw", "qcow2", "luks", "vdi", "qed"])
def test_create_rounds_the_size_up_to_whole_sectors(fmt: str) -> None:
    """create SIZE=1000: an image of 1024 bytes (a raw file of 1024),
    after the same "Formatting ... size=1000" line."""
    luks = ["--object", "secret,id=s,data=x", "-o", "key-secret=s,iter-time=10"] \
        if fmt == "luks" else []
    # qemu-img's own PBKDF calibration fails now and then on a busy machine
    qemu_env = fast_pbkdf_environment() if luks else None
    create = {"qemu-img": partial(run, "qemu-img", env=qemu_env), "imgfs": imgfs}
    sizes = []
    for tool, name in (("qemu-img", "theirs"), ("imgfs", "ours")):
        line = create[tool]("create", "-f", fmt, *luks, f"{name}.{fmt}", "1000").stdout
        assert "size=1000" in line
        info = run("qemu-img", "info", "--output=json", "--object", "secret,id=s,data=x",
                   "--image-opts", f"driver={fmt},file.filename={name}.{fmt}" +
                   (",key-secret=s" if luks else "")).stdout
        sizes.append((json.loads(info)["virtual-size"],
                      Path(f"{name}.{fmt}").stat().st_size if fmt == "raw" else None))
    assert sizes[0] == sizes[1] == (1024, 1024 if fmt == "raw" else None)


def test_resize_and_snapshot_quiet() -> None:
    for name in ("theirs.qcow2", "ours.qcow2"):
        run("qemu-img", "create", "-q", "-f", "qcow2", name, "1M")
    theirs = run("qemu-img", "resize", "-q", "theirs.qcow2", "2M")
    ours = imgfs("resize", "-q", "ours.qcow2", "2M")
    assert ours.stdout == theirs.stdout == ""
    run("qemu-img", "snapshot", "-c", "one", "theirs.qcow2")
    imgfs("snapshot", "-q", "-c", "one", "ours.qcow2")
    listed = [imgfs("snapshot", "-q", "-l", name).stdout.splitlines()[2].split()[:2]
              for name in ("theirs.qcow2", "ours.qcow2")]
    assert listed[0] == listed[1] == ["1", "one"]


def test_snapshot_without_an_action_opens_and_does_nothing() -> None:
    run("qemu-img", "create", "-q", "-f", "qcow2", "t.qcow2", "1M")
    run("qemu-img", "snapshot", "-c", "one", "t.qcow2")
    before = Path("t.qcow2").read_bytes()
    assert_same("snapshot", "t.qcow2", status=0)
    assert Path("t.qcow2").read_bytes() == before
    assert_same("snapshot", "none.qcow2", status=1)


def test_resize_shrinks_raw_only_with_shrink() -> None:
    """qemu-img 7.2 refuses to shrink a raw image without --shrink (exit 1;
    imgfs: a usage error, 2), also with a "--" before the size."""
    for name in ("theirs.raw", "ours.raw"):
        run("qemu-img", "create", "-q", "-f", "raw", name, "2M")
    for args in (["-1M"], ["--", "-1M"], ["1M"]):
        theirs = run("qemu-img", "resize", "-f", "raw", "theirs.raw", *args, check=False)
        ours = imgfs("resize", "-f", "raw", "ours.raw", *args, check=False)
        assert (theirs.returncode, ours.returncode) == (1, 2), (args, ours.stderr)
        assert "--shrink" in ours.stderr
    run("qemu-img", "resize", "--shrink", "-f", "raw", "theirs.raw", "--", "-1M")
    imgfs("resize", "--shrink", "-f", "raw", "ours.raw", "--", "-1M")
    assert Path("theirs.raw").stat().st_size == Path("ours.raw").stat().st_size == MiB


def test_cache_modes_are_accepted_and_honoured() -> None:
    """-t/-T none (O_DIRECT) through every tool that has them, as qemu-img."""
    need("qemu-io")
    run("qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "4M")
    run("qemu-io", "-c", "write -P 1 0 64k", "-c", "write -P 2 1000k 4k", "base.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2")
    run("qemu-io", "-c", "write -P 3 2M 64k", "top.qcow2")
    run("qemu-img", "convert", "-t", "none", "-T", "none", "-O", "qcow2", "top.qcow2",
        "theirs.qcow2")
    imgfs("convert", "-t", "none", "-T", "none", "-O", "qcow2", "top.qcow2", "ours.qcow2")
    run("qemu-img", "compare", "theirs.qcow2", "ours.qcow2")
    assert_same("check", "-T", "none", "ours.qcow2", status=0)
    assert_same("compare", "-T", "directsync", "theirs.qcow2", "ours.qcow2", status=0)
    imgfs("amend", "-t", "none", "-o", "lazy_refcounts=on", "top.qcow2")
    imgfs("rebase", "-t", "none", "-T", "none", "-b", "", "top.qcow2")
    run("qemu-img", "compare", "top.qcow2", "theirs.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "ours.qcow2", "-F", "qcow2", "o2.qcow2")
    run("qemu-io", "-c", "write -P 4 3M 64k", "o2.qcow2")
    imgfs("commit", "-t", "none", "o2.qcow2")
    run("qemu-io", "-c", "read -P 4 3M 64k", "ours.qcow2")
    run("qemu-img", "check", "ours.qcow2")
    theirs, ours = both("check", "-T", "bogus", "ours.qcow2")
    assert (theirs.returncode, ours.returncode) == (1, 2)
