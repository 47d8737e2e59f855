"""qcow2 through the real `imgfs` command line, with qemu-img / qemu-io as the oracle.

Every image here is created, checked, snapshotted, converted, resized or
mapped by the `imgfs` executable, and judged by qemu-img (check, info,
compare, map, snapshot -l): the same `-o` string goes to both tools, and
their JSON is compared on the keys both print.
"""
from __future__ import annotations

import json
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from tests.conftest import imgfs, need, random_bytes, run
from tests.drivers.test_qcow2 import _damaged_image as driver_damaged_image

KiB = 1024
MiB = 1024 * KiB

#: `info --output json` keys both tools print for qcow2 (actual-size and
#: filename depend on who made the file and how it was named)
SHARED_INFO_KEYS = ("virtual-size", "format", "cluster-size", "backing-filename",
                    "backing-filename-format", "dirty-flag", "encrypted")


@pytest.fixture(autouse=True)
def _in_workdir(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Relative backing and data file names resolve the same way for both
    tools when both run in the images' directory (QEMU 7.2 opens a relative
    data_file against its working directory)."""
    need("qemu-img", "qemu-io")
    monkeypatch.chdir(workdir)


# -- helpers ------------------------------------------------------------------------------

def qemu_img(*args: str | Path, check: bool = True) -> str:
    return run("qemu-img", *args, check=check).stdout


def qemu_img_in(directory: Path, *args: str) -> None:
    """qemu-img run in `directory`: QEMU 7.2 puts a relative data_file in
    its working directory, so a reference image gets its own."""
    result = subprocess.run(["qemu-img", *args], cwd=directory, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def qemu_io(image: Path, *commands: str, fmt: str = "qcow2") -> None:
    args: list[str] = []
    for command in commands:
        args += ["-c", command]
    output = run("qemu-io", "-f", fmt, *args, image).stdout
    assert "error" not in output.lower(), output


def qemu_create(image: Path, size: int | str, *options: str, fmt: str = "qcow2") -> Path:
    qemu_img("create", "-q", "-f", fmt, *(["-o", ",".join(options)] if options else []),
             image, str(size))
    return image


def info_json(tool: str, image: Path, *extra: str) -> dict | list:
    if tool == "imgfs":
        text = imgfs("info", "--output=json", *extra, image).stdout
    else:
        text = qemu_img("info", "-U", "--output=json", *extra, image)
    return json.loads(text)


def shared_info(report: dict) -> dict:
    """The keys both tools print, and qcow2's format-specific data."""
    shared = {key: report[key] for key in SHARED_INFO_KEYS if key in report}
    shared["format-specific"] = report.get("format-specific", {}).get("data", {})
    # qemu-img shows the backing file name as written, and adds its
    # absolute form under another key: only the former is shared
    return shared


def assert_info_agrees(image: Path) -> None:
    assert shared_info(info_json("imgfs", image)) == shared_info(info_json("qemu-img", image))


def check_clean(image: Path) -> None:
    result = run("qemu-img", "check", "--output=json", image, check=False)
    report = json.loads(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert report["check-errors"] == 0 and not report.get("corruptions") \
        and not report.get("leaks"), report


def compare(first: Path, second: Path, *extra: str) -> None:
    """`qemu-img compare` (strict on size unless told otherwise)."""
    result = run("qemu-img", "compare", "-U", *extra, first, second, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def out_of_order_writes(image: Path, cluster: int) -> None:
    """Unaligned, cluster-crossing, zero, compressed and discarded ranges."""
    qemu_io(image, f"write -P 0x11 {3 * cluster + 100} {2 * cluster + 7}",
            f"write -P 0x22 {cluster // 2} {cluster}",
            f"write -z {3 * cluster} {cluster}",
            f"write -c -P 0x33 {8 * cluster} {cluster}",
            f"discard {4 * cluster} {cluster}",
            f"write -P 0x44 {12 * cluster + 1} 3")


# -- create -------------------------------------------------------------------------------

CREATE_CASES = {
    "compat 0.10": ["compat=0.10"],
    "compat 1.1": ["compat=1.1"],
    "512 B clusters": ["cluster_size=512"],
    "2 MiB clusters": ["cluster_size=2M"],
    "prealloc off": ["preallocation=off"],
    "prealloc metadata": ["preallocation=metadata"],
    "prealloc falloc": ["preallocation=falloc"],
    "prealloc full": ["preallocation=full"],
    "lazy refcounts": ["lazy_refcounts=on"],
    "refcount 1 bit": ["refcount_bits=1"],
    "refcount 64 bits": ["refcount_bits=64"],
    "extended l2": ["extended_l2=on", "cluster_size=32k"],
    "zstd": ["compression_type=zstd"],
    "data file": ["data_file=img.data"],
    "data file raw": ["data_file=img.data", "data_file_raw=on"],
    "nocow": ["nocow=on"],
}


@pytest.mark.parametrize("case", sorted(CREATE_CASES))
def test_create_option_agrees_with_qemu_img(workdir: Path, case: str) -> None:
    """The image imgfs creates passes qemu-img check, reads as zeros, and
    qemu-img describes it exactly as it describes its own image made with the
    same -o string."""
    options = ",".join(CREATE_CASES[case])
    ours, theirs = workdir / "img.qcow2", workdir / "ref" / "img.qcow2"
    theirs.parent.mkdir()
    imgfs("create", "-q", "-f", "qcow2", "-o", options, ours, "24M")
    qemu_img_in(theirs.parent, "create", "-q", "-f", "qcow2", "-o", options, "img.qcow2", "24M")
    check_clean(ours)
    assert_info_agrees(ours)
    assert shared_info(info_json("qemu-img", ours)) == shared_info(info_json("qemu-img", theirs))
    assert _layout(ours) == _layout(theirs)
    qemu_io(ours, "write -P 0x5a 1000 70000", "read -P 0x5a 1000 70000")
    check_clean(ours)


def test_create_data_file_raw_maps_the_whole_data_file(workdir: Path) -> None:
    """data_file_raw=on: bytes put straight into the data file read through
    the qcow2 image (QEMU preallocates the metadata for that)."""
    image = workdir / "img.qcow2"
    imgfs("create", "-q", "-f", "qcow2", "-o", "data_file=img.data,data_file_raw=on", image, "8M")
    payload = random_bytes(100_000, seed=3)
    with open(workdir / "img.data", "r+b") as handle:
        handle.seek(3 * MiB + 5)
        handle.write(payload)
    check_clean(image)
    contents = qemu_raw_bytes(image, workdir / "img.raw")
    assert contents[3 * MiB + 5:3 * MiB + 5 + len(payload)] == payload


def _layout(image: Path) -> list[tuple]:
    """qemu-img map without host offsets: preallocation shows here."""
    return [tuple(item[key] for key in ("start", "length", "depth", "present", "zero", "data"))
            for item in json.loads(qemu_img("map", "--output=json", image))]


def test_create_with_backing(workdir: Path) -> None:
    base = qemu_create(workdir / "base.qcow2", "16M")
    qemu_io(base, "write -P 0x7 100k 300k")
    top = workdir / "top.qcow2"
    imgfs("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    check_clean(top)
    assert_info_agrees(top)
    report = info_json("qemu-img", top)
    assert (report["virtual-size"], report["backing-filename"],
            report["backing-filename-format"]) == (16 * MiB, "base.qcow2", "qcow2")
    compare(top, base)


def test_create_unsafe_does_not_open_the_backing_file(workdir: Path) -> None:
    top = workdir / "top.qcow2"
    imgfs("create", "-q", "-f", "qcow2", "-u", "-b", "missing.raw", "-F", "raw", top, "8M")
    report = info_json("qemu-img", top)
    assert (report["virtual-size"], report["backing-filename"]) == (8 * MiB, "missing.raw")


def test_create_without_unsafe_opens_the_backing_file(workdir: Path) -> None:
    """qemu-img: "Could not open backing image", exit 1, even with a SIZE."""
    result = imgfs("create", "-q", "-f", "qcow2", "-b", "missing.raw", "-F", "raw",
                   workdir / "other.qcow2", "8M", check=False)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr


def test_info_backing_chain_three_deep(workdir: Path) -> None:
    qemu_create(workdir / "base.raw", "4M", fmt="raw")
    qemu_io(workdir / "base.raw", "write -P 1 0 64k", fmt="raw")
    qemu_create(workdir / "mid.qcow2", "6M", "backing_file=base.raw", "backing_fmt=raw",
                "cluster_size=4k")
    top = qemu_create(workdir / "top.qcow2", "8M", "backing_file=mid.qcow2",
                      "backing_fmt=qcow2", "compat=0.10")
    ours = info_json("imgfs", top, "--backing-chain")
    theirs = info_json("qemu-img", top, "--backing-chain")
    assert isinstance(ours, list) and isinstance(theirs, list)
    assert [shared_info(item) for item in ours] == [shared_info(item) for item in theirs]
    human = imgfs("info", "--backing-chain", "top.qcow2").stdout
    expected = qemu_img("info", "--backing-chain", "top.qcow2")
    assert _image_lines(human) == _image_lines(expected) == \
        ["image: top.qcow2", "image: mid.qcow2", "image: base.raw"]


def _image_lines(report: str) -> list[str]:
    return [line for line in report.splitlines() if line.startswith("image:")]


@pytest.mark.parametrize("options", ["compat=0.10", "extended_l2=on,lazy_refcounts=on",
                                     "data_file=img.data,data_file_raw=on",
                                     "backing_file=base.raw,backing_fmt=raw"])
def test_info_human_output_agrees(workdir: Path, options: str) -> None:
    qemu_create(workdir / "base.raw", "4M", fmt="raw")
    image = qemu_create(workdir / "img.qcow2", "4M", options)
    qemu_io(image, "write -P 1 0 100k")
    ours = imgfs("info", "img.qcow2").stdout
    theirs = run("qemu-img", "info", "img.qcow2").stdout
    if "data_file" in options:
        # QEMU 7.2 counts only the qcow2 file as disk size; later QEMUs
        # sum every data-bearing child, as imgfs does
        ours, theirs = _without_disk_size(ours), _without_disk_size(theirs)
    assert ours == theirs


def _without_disk_size(report: str) -> str:
    return "\n".join(line for line in report.splitlines() if not line.startswith("disk size"))


def test_info_human_lists_snapshots_as_qemu_img(workdir: Path) -> None:
    image = qemu_create(workdir / "img.qcow2", "4M")
    qemu_img("snapshot", "-c", "first", image)
    assert imgfs("info", "img.qcow2").stdout == run("qemu-img", "info", "img.qcow2").stdout


# -- check --------------------------------------------------------------------------------

def _refcount_block(image: Path) -> int:
    raw = image.read_bytes()
    table = struct.unpack(">Q", raw[48:56])[0]
    return struct.unpack(">Q", raw[table:table + 8])[0]


def patch_bytes(image: Path, offset: int, data: bytes) -> None:
    with open(image, "r+b") as handle:
        handle.seek(offset)
        handle.write(data)


def damaged_image(workdir: Path, damage: str) -> Path:
    """4 KiB clusters, 16-bit refcounts.  "leaks", "corruption", "both":
    the driver tests' images (two leaked clusters past the end; an in-use
    data cluster with refcount 0, which QEMU must rebuild the refcounts to
    fix); "low refcount": a cluster shared with a snapshot with refcount 1
    instead of 2; "l2 ...": a damaged L2 entry."""
    if damage in ("none", "leaks", "corruption", "both"):
        return driver_damaged_image(workdir, damage)
    image = qemu_create(workdir / "k.qcow2", "1M", "cluster_size=4k")
    qemu_io(image, "write -P 3 0 100k", "write -c 200k 8k", "write -z 300k 8k")
    if damage == "low refcount":
        qemu_img("snapshot", "-c", "s", image)
        patch_bytes(image, _refcount_block(image) + 2 * 10, struct.pack(">H", 1))
    else:
        _damage_l2_entry(image, damage)
    return image


def _damage_l2_entry(image: Path, damage: str) -> None:
    """Guest cluster 1's L2 entry: pointing at cluster 0's host cluster, at
    an unaligned offset inside it, past the end of the file, or with one of
    the reserved bits 1..8 set."""
    with open(image, "rb") as handle:
        raw = handle.read()
    l1_offset = struct.unpack(">Q", raw[40:48])[0]
    l2_offset = struct.unpack(">Q", raw[l1_offset:l1_offset + 8])[0] & 0x00FF_FFFF_FFFF_FE00
    first = struct.unpack(">Q", raw[l2_offset:l2_offset + 8])[0]
    past_end = -(-len(raw) // 4096) * 4096 + 0x10000
    entry = {"l2 shared": first, "l2 unaligned": first + 0x200,
             "l2 past eof": 1 << 63 | past_end, "l2 reserved bits": first | 0x10}[damage]
    patch_bytes(image, l2_offset + 8, struct.pack(">Q", entry))


def both_check(image: Path, *args: str) -> tuple[tuple[int, str, str], tuple[int, str, str]]:
    """(exit code, stdout, stderr) of imgfs check and of qemu-img check on a
    copy, so a repair by one tool does not change what the other sees."""
    copy = image.with_name("copy-" + image.name)
    shutil.copyfile(image, copy)
    ours = imgfs("check", *args, image, check=False)
    theirs = run("qemu-img", "check", *args, copy, check=False)
    return (ours.returncode, ours.stdout, ours.stderr), \
        (theirs.returncode, theirs.stdout, theirs.stderr)


@pytest.mark.parametrize("damage", ["none", "leaks", "corruption", "both", "low refcount",
                                    "l2 shared", "l2 unaligned", "l2 past eof",
                                    "l2 reserved bits"])
def test_check_json_and_exit_code_agree(workdir: Path, damage: str) -> None:
    image = damaged_image(workdir, damage)
    (code, out, _), (expected_code, expected_out, _) = both_check(image, "--output=json")
    assert code == expected_code
    assert json.loads(out) | {"filename": ""} == json.loads(expected_out) | {"filename": ""}


@pytest.mark.parametrize("damage", ["none", "leaks", "corruption", "both", "low refcount"])
def test_check_human_output_agrees(workdir: Path, damage: str) -> None:
    image = damaged_image(workdir, damage)
    ours, theirs = both_check(image)
    assert ours == theirs


@pytest.mark.parametrize("damage, repair", [("leaks", "leaks"), ("leaks", "all"),
                                            ("both", "all"), ("low refcount", "all"),
                                            ("corruption", "all"), ("both", "leaks"),
                                            ("low refcount", "leaks"), ("l2 shared", "all"),
                                            ("l2 unaligned", "all"), ("l2 past eof", "all"),
                                            ("l2 reserved bits", "all"),
                                            ("l2 shared", "leaks")])
def test_check_repair_agrees(workdir: Path, damage: str, repair: str) -> None:
    image = damaged_image(workdir, damage)
    # QEMU refuses to read through an unaligned data cluster
    readable = damage != "l2 unaligned"
    before = qemu_raw_bytes(image, workdir / "before.raw") if readable else b""
    (code, out, _), (expected_code, expected_out, _) = both_check(image, "-r", repair)
    assert code == expected_code, out
    assert _without_end_offset(out) == _without_end_offset(expected_out)
    copy = image.with_name("copy-" + image.name)
    after_ours = run("qemu-img", "check", image, check=False)
    after_theirs = run("qemu-img", "check", copy, check=False)
    assert (after_ours.returncode, _without_end_offset(after_ours.stdout)) == \
        (after_theirs.returncode, _without_end_offset(after_theirs.stdout))
    if readable:
        assert qemu_raw_bytes(image, workdir / "after.raw") == before


def _without_end_offset(report: str) -> str:
    """A check report without "Image end offset": to rebuild refcounts QEMU
    writes new refcount structures at the end of the file, imgfs fixes them
    in place, so the files end at different offsets."""
    return "\n".join(line for line in report.splitlines()
                     if not line.startswith("Image end offset"))


def qemu_raw_bytes(image: Path, out: Path) -> bytes:
    qemu_img("convert", "-U", "-O", "raw", image, out)
    return out.read_bytes()


# -- snapshot -----------------------------------------------------------------------------

def _snapshot_rows(listing: str) -> list[tuple[str, str]]:
    """(ID, TAG) of each row of a `snapshot -l` listing."""
    return [tuple(line.split()[:2]) for line in listing.splitlines()[2:]]  # type: ignore[misc]


def test_snapshot_create_list_apply_delete(workdir: Path) -> None:
    image = qemu_create(workdir / "snap.qcow2", "8M", "cluster_size=16k")
    contents: dict[str, bytes] = {}
    for number, tag in enumerate(("first", "second", "third")):
        qemu_io(image, f"write -P {number + 1} {number * 300}k 500k")
        imgfs("snapshot", "-c", tag, image)
        contents[tag] = qemu_raw_bytes(image, workdir / f"{tag}.raw")
    qemu_io(image, "write -z 0 2M")
    check_clean(image)
    assert _snapshot_rows(imgfs("snapshot", "-l", image).stdout) == \
        _snapshot_rows(qemu_img("snapshot", "-l", image)) == \
        [("1", "first"), ("2", "second"), ("3", "third")]
    for tag, expected in contents.items():
        qemu_img("convert", "-l", f"snapshot.name={tag}", "-O", "raw", image, workdir / "s.raw")
        assert (workdir / "s.raw").read_bytes() == expected
    imgfs("snapshot", "-a", "second", image)
    check_clean(image)
    assert qemu_raw_bytes(image, workdir / "now.raw") == contents["second"]
    imgfs("snapshot", "-d", "first", image)
    check_clean(image)
    assert _snapshot_rows(qemu_img("snapshot", "-l", image)) == [("2", "second"), ("3", "third")]
    qemu_img("convert", "-l", "snapshot.name=third", "-O", "raw", image, workdir / "s.raw")
    assert (workdir / "s.raw").read_bytes() == contents["third"]


def test_snapshot_unknown_tag_is_one_line(workdir: Path) -> None:
    image = qemu_create(workdir / "snap.qcow2", "1M")
    result = imgfs("snapshot", "-a", "nope", image, check=False)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "nope" in result.stderr


# -- convert ------------------------------------------------------------------------------

@pytest.fixture
def source_qcow2(workdir: Path) -> Path:
    image = qemu_create(workdir / "src.qcow2", "8M", "cluster_size=4k")
    out_of_order_writes(image, 4 * KiB)
    qemu_io(image, "write -P 0x66 1M 1M", "write -P 0 3M 64k")
    return image


def test_convert_qcow2_to_raw(workdir: Path, source_qcow2: Path) -> None:
    imgfs("convert", "-O", "raw", source_qcow2, workdir / "out.raw")
    assert (workdir / "out.raw").read_bytes() == qemu_raw_bytes(source_qcow2,
                                                                  workdir / "ref.raw")


def test_convert_raw_to_qcow2(workdir: Path) -> None:
    raw = workdir / "in.raw"
    raw.write_bytes(random_bytes(3 * MiB, seed=4) + bytes(2 * MiB) + b"end" * 100)
    out = workdir / "out.qcow2"
    imgfs("convert", "-f", "raw", "-O", "qcow2", raw, out)
    check_clean(out)
    compare(raw, out, "-f", "raw", "-F", "qcow2")
    # the zero run was left unallocated (-S 4k is the default)
    mapped = json.loads(qemu_img("map", "--output=json", out))
    assert any(not item["data"] and item["start"] <= 3 * MiB
               and item["start"] + item["length"] >= 5 * MiB for item in mapped), mapped


@pytest.mark.parametrize("options", ["compression_type=zlib", "compression_type=zstd",
                                     "compat=0.10,cluster_size=4k",
                                     "extended_l2=on,cluster_size=32k"])
def test_convert_compressed(workdir: Path, source_qcow2: Path, options: str) -> None:
    out = workdir / "out.qcow2"
    imgfs("convert", "-c", "-O", "qcow2", "-o", options, source_qcow2, out)
    check_clean(out)
    compare(source_qcow2, out)
    report = json.loads(qemu_img("check", "--output=json", out))
    assert report.get("compressed-clusters", 0) > 0, report


@pytest.mark.parametrize("sparse", ["64k", "8k", "0"])
def test_convert_sparse_size(workdir: Path, sparse: str) -> None:
    """-S leaves the same runs of zeros unallocated as qemu-img's -S."""
    raw = workdir / "in.raw"
    raw.write_bytes(b"\1" * 64 * KiB + bytes(128 * KiB) + b"\2" * 64 * KiB + bytes(8 * KiB)
                    + b"\3" * 56 * KiB + bytes(192 * KiB) + b"\4")
    ours, theirs = workdir / "ours.qcow2", workdir / "theirs.qcow2"
    options = "-o", "cluster_size=4k"
    imgfs("convert", "-S", sparse, "-f", "raw", "-O", "qcow2", *options, raw, ours)
    qemu_img("convert", "-S", sparse, "-f", "raw", "-O", "qcow2", *options, raw, theirs)
    check_clean(ours)
    compare(raw, ours, "-f", "raw")
    assert _data_ranges(ours) == _data_ranges(theirs)


def _data_ranges(image: Path) -> list[tuple[int, int]]:
    """(start, end) of the allocated data runs, neighbours merged."""
    ranges: list[tuple[int, int]] = []
    for item in json.loads(qemu_img("map", "--output=json", image)):
        if not item["data"]:
            continue
        start, end = item["start"], item["start"] + item["length"]
        if ranges and ranges[-1][1] == start:
            start = ranges.pop()[0]
        ranges.append((start, end))
    return ranges


def test_convert_progress(workdir: Path, source_qcow2: Path) -> None:
    result = imgfs("convert", "-p", "-O", "qcow2", source_qcow2, workdir / "out.qcow2")
    assert "100.00/100%" in result.stdout + result.stderr
    compare(source_qcow2, workdir / "out.qcow2")


def test_convert_with_backing(workdir: Path, source_qcow2: Path) -> None:
    """-B: the result names the backing file and reads as the source."""
    base = workdir / "base.qcow2"
    qemu_img("convert", "-O", "qcow2", source_qcow2, base)
    qemu_io(source_qcow2, "write -P 0x99 2M 8k")
    out = workdir / "out.qcow2"
    imgfs("convert", "-O", "qcow2", "-B", "base.qcow2", "-o", "backing_fmt=qcow2",
          source_qcow2, out)
    check_clean(out)
    report = info_json("qemu-img", out)
    assert (report["backing-filename"], report["backing-filename-format"]) == \
        ("base.qcow2", "qcow2")
    compare(source_qcow2, out)


def test_convert_with_backing_that_differs(workdir: Path, source_qcow2: Path) -> None:
    """qemu-img convert -B writes zero clusters where the source reads zeros
    and the backing file does not."""
    base = qemu_create(workdir / "base.qcow2", "8M")
    qemu_io(base, "write -P 0x77 0 8M")
    out = workdir / "out.qcow2"
    imgfs("convert", "-O", "qcow2", "-B", "base.qcow2", "-o", "backing_fmt=qcow2",
          source_qcow2, out)
    check_clean(out)
    compare(source_qcow2, out)


def test_convert_cluster_size_option(workdir: Path, source_qcow2: Path) -> None:
    out = workdir / "out.qcow2"
    imgfs("convert", "-O", "qcow2", "-o", "cluster_size=2M", source_qcow2, out)
    check_clean(out)
    assert info_json("qemu-img", out)["cluster-size"] == 2 * MiB
    compare(source_qcow2, out)


@pytest.mark.parametrize("options", ["preallocation=metadata", "preallocation=full",
                                     "data_file=out.data", "data_file=out.data,data_file_raw=on",
                                     "compat=0.10", "lazy_refcounts=on,refcount_bits=1",
                                     "extended_l2=on,cluster_size=128k"])
def test_convert_target_options_match_qemu_img(workdir: Path, source_qcow2: Path,
                                               options: str) -> None:
    """The target has the layout qemu-img gives it with the same -o."""
    ours, theirs = workdir / "out.qcow2", workdir / "ref" / "out.qcow2"
    theirs.parent.mkdir()
    imgfs("convert", "-O", "qcow2", "-o", options, source_qcow2, ours)
    qemu_img_in(theirs.parent, "convert", "-O", "qcow2", "-o", options, str(source_qcow2),
                "out.qcow2")
    check_clean(ours)
    compare(source_qcow2, ours)
    assert shared_info(info_json("qemu-img", ours)) == shared_info(info_json("qemu-img", theirs))
    assert _layout(ours) == _layout(theirs)


def test_convert_zstd_image_to_raw(workdir: Path) -> None:
    """An image QEMU compressed with zstd reads back through convert."""
    pytest.importorskip("zstandard")
    raw = workdir / "in.raw"
    raw.write_bytes(random_bytes(256 * KiB, seed=8) + b"zstd" * (MiB // 4))
    image = workdir / "z.qcow2"
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
             "compression_type=zstd,cluster_size=16k", raw, image)
    imgfs("convert", "-O", "raw", image, workdir / "out.raw")
    assert (workdir / "out.raw").read_bytes() == raw.read_bytes()


@pytest.mark.parametrize("compression", ["zlib", "zstd"])
def test_damaged_compressed_cluster_is_one_clean_error(workdir: Path, compression: str) -> None:
    """Garbage in a compressed cluster: convert fails with one line, as
    qemu-img's does."""
    if compression == "zstd":
        pytest.importorskip("zstandard")
    message = _convert_damaged_compressed(workdir, compression)
    assert message.count("\n") == 1 and "decompress" in message, message


def _convert_damaged_compressed(workdir: Path, compression: str) -> str:
    """imgfs convert's stderr for an image whose first compressed cluster
    starts with garbage."""
    raw = workdir / "in.raw"
    raw.write_bytes(b"compress me " * (MiB // 12))
    image = workdir / "c.qcow2"
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
             f"compression_type={compression},cluster_size=4k", raw, image)
    data = image.read_bytes()
    l1_offset = struct.unpack(">Q", data[40:48])[0]
    l2_offset = struct.unpack(">Q", data[l1_offset:l1_offset + 8])[0] & 0x00FF_FFFF_FFFF_FE00
    descriptor = struct.unpack(">Q", data[l2_offset:l2_offset + 8])[0]
    host = descriptor & ((1 << (62 - (12 - 8))) - 1)
    patch_bytes(image, host, b"\xff" * 16)
    assert run("qemu-img", "convert", "-O", "raw", image, workdir / "q.raw",
               check=False).returncode == 1
    result = imgfs("convert", "-O", "raw", image, workdir / "out.raw", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    return result.stderr


def test_io_error_names_the_file(workdir: Path) -> None:
    assert "c.qcow2" in _convert_damaged_compressed(workdir, "zlib")


# -- resize -------------------------------------------------------------------------------

@pytest.mark.parametrize("options", ["cluster_size=64k", "compat=0.10,cluster_size=4k",
                                     "extended_l2=on,cluster_size=32k"])
def test_resize_grow_and_shrink(workdir: Path, options: str) -> None:
    image = qemu_create(workdir / "r.qcow2", "8M", options)
    qemu_io(image, "write -P 1 0 1M", "write -P 2 6M 1M")
    expected = bytearray(qemu_raw_bytes(image, workdir / "before.raw"))
    imgfs("resize", image, "+24M")
    check_clean(image)
    assert info_json("qemu-img", image)["virtual-size"] == 32 * MiB
    qemu_io(image, "write -P 3 30M 64k")
    expected += bytes(24 * MiB)
    expected[30 * MiB:30 * MiB + 64 * KiB] = b"\3" * 64 * KiB
    assert qemu_raw_bytes(image, workdir / "grown.raw") == expected
    refused = imgfs("resize", image, "4M", check=False)
    assert refused.returncode != 0 and "--shrink" in refused.stderr
    imgfs("resize", "--shrink", image, "4M")
    check_clean(image)
    assert info_json("qemu-img", image)["virtual-size"] == 4 * MiB
    assert qemu_raw_bytes(image, workdir / "shrunk.raw") == expected[:4 * MiB]
    imgfs("resize", image, "+4M")        # what was cut off does not come back
    assert qemu_raw_bytes(image, workdir / "regrown.raw") == \
        expected[:4 * MiB] + bytes(4 * MiB)


@pytest.mark.parametrize("mode", ["falloc", "full"])
def test_resize_with_preallocation_matches_qemu_img(workdir: Path, mode: str) -> None:
    ours = qemu_create(workdir / "ours.qcow2", "4M", "cluster_size=64k")
    qemu_io(ours, "write -P 1 1M 100k")
    theirs = workdir / "theirs.qcow2"
    shutil.copyfile(ours, theirs)
    imgfs("resize", f"--preallocation={mode}", ours, "8M")
    qemu_img("resize", "-q", f"--preallocation={mode}", theirs, "8M")
    check_clean(ours)
    assert _layout(ours) == _layout(theirs)
    compare(ours, theirs)


def test_resize_with_metadata_preallocation(workdir: Path) -> None:
    ours = qemu_create(workdir / "ours.qcow2", "4M")
    theirs = qemu_create(workdir / "theirs.qcow2", "4M")
    imgfs("resize", "--preallocation=metadata", ours, "8M")
    qemu_img("resize", "-q", "--preallocation=metadata", theirs, "8M")
    assert _layout(ours) == _layout(theirs)


# -- map ----------------------------------------------------------------------------------

def _map_runs(entries: list[dict], *, depth_everywhere: bool = False) -> list[tuple]:
    """(start, length, depth, zero, data) runs, neighbours with equal values
    merged (qemu-img splits runs where host offsets stop being contiguous:
    we compare contents, not host layout).  `zero` is only compared where
    there is no data: inside a data cluster, qemu-img also reports holes of
    the host file (QEMU's copy-on-write of zeros punches them), which says
    something about the host filesystem, not about the image.  `depth` is
    only compared where some layer holds the range, unless asked."""
    runs: list[list] = []
    for item in entries:
        depth = item["depth"] if item["present"] or depth_everywhere else None
        values = [depth, item["zero"] and not item["data"], item["data"]]
        if runs and runs[-1][2:] == values and runs[-1][0] + runs[-1][1] == item["start"]:
            runs[-1][1] += item["length"]
        else:
            runs.append([item["start"], item["length"], *values])
    return [tuple(run) for run in runs]


#: (format, size) of the chain's base: as long as the top, shorter, sparse qcow2
MAP_BASES = [("raw", "4M"), ("raw", "3M"), ("qcow2", "4M")]


def _map_chain(workdir: Path, base_fmt: str, base_size: str) -> Path:
    """base <- qcow2 (4k) <- qcow2 (64k): zero, compressed, partial clusters."""
    base = qemu_create(workdir / f"base.{base_fmt}", base_size, fmt=base_fmt)
    qemu_io(base, "write -P 1 0 1M", fmt=base_fmt)
    mid = qemu_create(workdir / "mid.qcow2", "4M", f"backing_file={base.name}",
                      f"backing_fmt={base_fmt}", "cluster_size=4k")
    qemu_io(mid, "write -c -P 2 512k 64k", "write -z 768k 16k", "write -P 3 2M 100k")
    top = qemu_create(workdir / "top.qcow2", "4M", "backing_file=mid.qcow2",
                      "backing_fmt=qcow2", "cluster_size=64k")
    qemu_io(top, "write -P 4 64k 64k", "write -z 2M 64k", "write -c -P 5 3M 128k",
            "write -P 6 3500k 1", "write -z 1M 64k")
    return top


@pytest.mark.parametrize("base_fmt, base_size", MAP_BASES)
def test_map_agrees_on_a_chain_with_zero_and_compressed_clusters(workdir: Path, base_fmt: str,
                                                                 base_size: str) -> None:
    top = _map_chain(workdir, base_fmt, base_size)
    ours = json.loads(imgfs("map", "--output=json", top).stdout)
    theirs = json.loads(qemu_img("map", "--output=json", top))
    assert _map_runs(ours) == _map_runs(theirs)


@pytest.mark.parametrize("base_fmt, base_size", MAP_BASES[1:])
def test_map_depth_of_unallocated_ranges(workdir: Path, base_fmt: str, base_size: str) -> None:
    top = _map_chain(workdir, base_fmt, base_size)
    ours = json.loads(imgfs("map", "--output=json", top).stdout)
    theirs = json.loads(qemu_img("map", "--output=json", top))
    assert _map_runs(ours, depth_everywhere=True) == _map_runs(theirs, depth_everywhere=True)
