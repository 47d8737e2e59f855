"""QED against qemu-img / qemu-io.

Images are made by ``qemu-img create -f qed`` and filled by qemu-io out of
order (unaligned, cluster-crossing, zero writes, discards); what imgfs
reads (``convert -O raw``, ``map``, ``info``, ``check``) is compared with
what qemu-img says about the same image, and what imgfs writes, creates,
converts, resizes or repairs is judged by ``qemu-img check`` and
``qemu-img compare``.
"""
from __future__ import annotations

import json
import random
import struct
from pathlib import Path
from typing import Any

import pytest
import trio
from imgfs.drivers.qed.layout import (
    HEADER,
    QED_F_NEED_CHECK,
    Geometry,
    Header,
    check_header,
    new_image,
    probe,
)

from imgfs.errors import InvalidImage, Unsupported
from imgfs.graph import open_image
from imgfs.node import OpenContext
from tests.conftest import IMGFS, imgfs, need, random_bytes, write_through_api
from tests.conftest import run as run_tool

KiB = 1024
MiB = 1024 * KiB


@pytest.fixture(autouse=True)
def _in_workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Relative backing names resolve the same way for both tools."""
    need("qemu-img", "qemu-io")
    monkeypatch.chdir(tmp_path)


# -- helpers ------------------------------------------------------------------------------

def run(tool: str | Path, *args: str | Path, check: bool = True) -> Any:
    """A tool by name; "imgfs" is the one beside this Python."""
    return run_tool(IMGFS if tool == "imgfs" else tool, *args, check=check)


def qemu_create(image: Path, size: int | str | None = None, *options: str,
                fmt: str = "qed") -> Path:
    run("qemu-img", "create", "-q", "-f", fmt,
        *(["-o", ",".join(options)] if options else []), image,
        *([str(size)] if size is not None else []))
    return image


def qemu_io(image: Path, *commands: str, fmt: str = "qed") -> None:
    args: list[str] = []
    for command in commands:
        args += ["-c", command]
    output = run("qemu-io", "-f", fmt, *args, image).stdout
    assert "error" not in output.lower() and "failed" not in output.lower(), output


def out_of_order(image: Path, cluster: int, size: int, fmt: str = "qed") -> None:
    """Unaligned, cluster-crossing, zero and discarded ranges, in no order."""
    qemu_io(image, f"write -P 0x11 {3 * cluster + 100} {2 * cluster + 7}",
            f"write -P 0x22 {cluster // 2} {cluster}",
            f"write -P 0x33 {size - cluster - 300} {cluster + 300}",
            f"write -z {6 * cluster} {2 * cluster}",
            f"write -P 0x44 {9 * cluster + 1} 3",
            f"discard {3 * cluster} {cluster}",
            f"write -z {10 * cluster + 5} {cluster}",
            f"write -P 0x55 {12 * cluster + 17} {cluster}", fmt=fmt)


def qemu_raw(image: Path, name: str = "qemu.raw") -> bytes:
    out = image.parent / name
    run("qemu-img", "convert", "-U", "-O", "raw", image, out)
    return out.read_bytes()


def imgfs_raw(image: Path, name: str = "imgfs.raw") -> bytes:
    out = image.parent / name
    imgfs("convert", "-O", "raw", image, out)
    return out.read_bytes()


def check_clean(image: Path) -> None:
    result = run("qemu-img", "check", "--output=json", image, check=False)
    report = json.loads(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not report.get("corruptions") and not report.get("leaks"), report


def compare_raw(expected: bytes, image: Path) -> None:
    raw = image.parent / "expected.raw"
    raw.write_bytes(expected)
    run("qemu-img", "compare", "-q", "-f", "raw", "-F", "qed", raw, image)


def map_runs(entries: list[dict]) -> list[tuple]:
    """(start, length, depth, zero, data) with neighbours merged: host
    layout is not compared, and depth only where a layer holds the range."""
    runs: list[list] = []
    for item in entries:
        depth = item["depth"] if item["present"] else None
        values = [depth, item["zero"] and not item["data"], item["data"]]
        if runs and runs[-1][2:] == values:
            runs[-1][1] += item["length"]
        else:
            runs.append([item["start"], item["length"], *values])
    return [tuple(entry) for entry in runs]


def map_json(tool: str, image: Path) -> list[tuple]:
    return map_runs(json.loads(run(tool, "map", "--output=json", image).stdout))


def info_json(tool: str, image: Path) -> dict:
    return json.loads(run(tool, "info", "--output=json", image).stdout)


def human_info(tool: str, image: Path) -> list[str]:
    """`info` as text, but the disk size (the tools count it differently)."""
    return [line for line in run(tool, "info", image).stdout.splitlines()
            if not line.startswith("disk size:")]


def check_json(tool: str, image: Path, *extra: str) -> tuple[int, dict]:
    """(exit status, report without the file name)."""
    result = run(tool, "check", "--output=json", *extra, image, check=False)
    report = json.loads(result.stdout)
    report.pop("filename")
    return result.returncode, report


def patch(image: Path, offset: int, data: bytes) -> None:
    with open(image, "r+b") as handle:
        handle.seek(offset)
        handle.write(data)


def le64(image: Path, offset: int) -> int:
    with open(image, "rb") as handle:
        handle.seek(offset)
        return int(struct.unpack("<Q", handle.read(8))[0])


def first_l2(image: Path) -> int:
    return le64(image, le64(image, 40))


# -- layout (pure) ------------------------------------------------------------------------

def test_header_struct_is_64_bytes_and_round_trips() -> None:
    assert HEADER.size == 64
    header = Header(b"QED\0", 65536, 4, 1, 1, 0, 0, 65536, 1 << 30, 64, 8)
    assert Header.unpack(header.pack()) == header
    assert probe(header.pack(), "x") == 100 and probe(b"QFI\xfb", "x") == 0


def test_geometry() -> None:
    geometry = Geometry(65536, 4)
    assert geometry.table_entries == 32768 and geometry.table_bits == 15
    assert geometry.max_image_size == 32768 * 32768 * 65536
    assert geometry.total_clusters(1024) == 1


def test_new_image_is_what_qemu_img_creates(tmp_path: Path) -> None:
    (tmp_path / "base.raw").write_bytes(bytes(MiB))
    qemu_create(tmp_path / "b.qcow2", MiB, fmt="qcow2")
    for options, args in [({}, ()), ({"cluster_size": 4096, "table_size": 2},
                                     ("cluster_size=4k", "table_size=2")),
                          ({"backing_file": "base.raw", "backing_fmt": "raw"},
                           ("backing_file=base.raw", "backing_fmt=raw")),
                          ({"backing_file": "b.qcow2", "backing_fmt": "qcow2"},
                           ("backing_file=b.qcow2", "backing_fmt=qcow2"))]:
        full = {"cluster_size": 65536, "table_size": None, "backing_file": None,
                "backing_fmt": None, **options}
        image = qemu_create(tmp_path / "q.qed", 100 * MiB, *args)
        head, length = new_image(100 * MiB, full)
        data = image.read_bytes()
        assert len(data) == length
        assert data[:len(head)] == head and not any(data[len(head):])
        image.unlink()


@pytest.mark.parametrize("field, value, error", [
    ("cluster_size", 2048, InvalidImage), ("cluster_size", 3 << 12, InvalidImage),
    ("cluster_size", 1 << 27, InvalidImage), ("table_size", 0, InvalidImage),
    ("table_size", 32, InvalidImage), ("table_size", 3, InvalidImage),
    ("header_size", 0, InvalidImage), ("header_size", 1 << 31, InvalidImage),
    ("features", 8, Unsupported), ("l1_table_offset", 65536 + 512, InvalidImage),
    ("l1_table_offset", 0, InvalidImage), ("l1_table_offset", 1 << 40, InvalidImage),
    ("image_size", 1000, InvalidImage), ("image_size", 1 << 62, InvalidImage),
    ("backing_filename_size", 4096, InvalidImage),
])
def test_check_header_refuses(field: str, value: int, error: type) -> None:
    header = Header(b"QED\0", 65536, 4, 1, 1, 0, 0, 65536, 1 << 30, 64, 8)
    with pytest.raises(error):
        check_header(header._replace(**{field: value}), 65536 * 5)


# -- reading ------------------------------------------------------------------------------

@pytest.mark.parametrize("options", [(), ("cluster_size=4k", "table_size=2"),
                                     ("cluster_size=1M", "table_size=16")])
def test_reads_what_qemu_reads(tmp_path: Path, options: tuple[str, ...]) -> None:
    cluster = 4096 if "cluster_size=4k" in options else MiB if options else 65536
    size = 20 * cluster + 512
    image = qemu_create(tmp_path / "a.qed", size, *options)
    out_of_order(image, cluster, size)
    assert imgfs_raw(image) == qemu_raw(image)
    assert map_json("imgfs", image) == map_json("qemu-img", image)
    assert check_json("imgfs", image) == check_json("qemu-img", image)


def test_backing_chain_three_deep_mixing_formats(tmp_path: Path) -> None:
    """raw <- qcow2 <- qed <- qed, each layer written out of order, the
    bottom one shorter than the top."""
    base = tmp_path / "base.raw"
    base.write_bytes(random_bytes(3 * MiB, seed=7))
    middle = qemu_create(tmp_path / "mid.qcow2", 4 * MiB, "backing_file=base.raw",
                         "backing_fmt=raw", "cluster_size=4k", fmt="qcow2")
    out_of_order(middle, 4096, 4 * MiB, fmt="qcow2")
    lower = qemu_create(tmp_path / "low.qed", 5 * MiB, "backing_file=mid.qcow2",
                        "backing_fmt=qcow2", "cluster_size=4k", "table_size=2")
    out_of_order(lower, 8192, 5 * MiB)
    top = qemu_create(tmp_path / "top.qed", 6 * MiB, "backing_file=low.qed",
                      "backing_fmt=qed")
    out_of_order(top, 65536, 6 * MiB)
    assert imgfs_raw(top) == qemu_raw(top)
    assert map_json("imgfs", top) == map_json("qemu-img", top)


def test_info_agrees_with_qemu_img(tmp_path: Path) -> None:
    (tmp_path / "base.raw").write_bytes(bytes(MiB))
    for name, options in [("plain.qed", ()), ("raw-backed.qed", ("backing_file=base.raw",
                                                                  "backing_fmt=raw")),
                          ("small.qed", ("cluster_size=4k", "table_size=8"))]:
        image = qemu_create(tmp_path / name, 4 * MiB, *options)
        ours, theirs = info_json("imgfs", image), info_json("qemu-img", image)
        shared = set(theirs) - {"actual-size"}
        assert {key: ours.get(key) for key in shared} == {key: theirs[key] for key in shared}
        assert human_info("imgfs", image) == human_info("qemu-img", image)


# -- writing, creating, converting, resizing --------------------------------------------------

def test_writes_through_the_api_pass_qemu_check(tmp_path: Path) -> None:
    """Allocating, in-place, unaligned, cluster-crossing and table-crossing
    writes, over data, zero clusters, unallocated ranges and a backing file."""
    base = tmp_path / "base.raw"
    base.write_bytes(random_bytes(2 * MiB, seed=3))
    image = qemu_create(tmp_path / "w.qed", 9 * MiB, "backing_file=base.raw",
                        "backing_fmt=raw", "cluster_size=4k", "table_size=2")
    qemu_io(image, "write -P 0x61 8k 12k", "write -z 64k 64k")
    writes = [(4 * MiB - 100, random_bytes(300, seed=1)), (5000, random_bytes(9000, seed=2)),
              (64 * KiB + 4096, b"z" * 4096), (70 * KiB, random_bytes(50, seed=4)),
              (MiB + 1, random_bytes(3 * MiB, seed=5)), (9 * MiB - 1, b"\xff"),
              (100, bytes(4000))]
    expected = bytearray(qemu_raw(image, "before.raw"))
    for offset, data in writes:
        expected[offset:offset + len(data)] = data
    write_through_api(image, writes)
    check_clean(image)
    compare_raw(bytes(expected), image)
    assert le64(image, 16) & QED_F_NEED_CHECK == 0     # a clean close cleared it


def test_zero_writes_make_zero_clusters_as_qemu(tmp_path: Path) -> None:
    image = qemu_create(tmp_path / "z.qed", 4 * MiB)
    qemu_io(image, "write -P 1 0 256k")
    ours = qemu_create(tmp_path / "ours.qed", 4 * MiB)
    qemu_io(ours, "write -P 1 0 256k")
    qemu_io(image, "write -z 64k 128k", "write -z 1M 128k")

    async def zero() -> None:
        node = await open_image(str(ours), OpenContext(read_only=False))
        try:
            await node.write_zeroes(64 * KiB, 128 * KiB)
            await node.write_zeroes(MiB, 128 * KiB)
            await node.write_zeroes(2 * MiB + 5, 100 * KiB)     # partial: reads as zeros
        finally:
            await node.aclose()
    trio.run(zero)
    check_clean(ours)
    assert map_json("imgfs", ours) == map_json("qemu-img", image)
    assert qemu_raw(ours, "o.raw") == qemu_raw(image, "q.raw")


def test_create_agrees_with_qemu_img(tmp_path: Path) -> None:
    (tmp_path / "base.raw").write_bytes(bytes(MiB))
    for options in ["cluster_size=4k,table_size=2", "backing_file=base.raw,backing_fmt=raw",
                    "cluster_size=128k"]:
        ours, theirs = tmp_path / "ours.qed", tmp_path / "theirs.qed"
        said = imgfs("create", "-f", "qed", "-o", options, ours, "3M").stdout
        expected = run("qemu-img", "create", "-f", "qed", "-o", options, theirs, "3M").stdout
        assert said.replace("ours", "theirs") == expected
        assert ours.read_bytes() == theirs.read_bytes()
        check_clean(ours)
        ours.unlink()
        theirs.unlink()


def test_create_refuses_what_qemu_refuses(tmp_path: Path) -> None:
    for options in ["cluster_size=2k", "table_size=3", "table_size=32"]:
        result = imgfs("create", "-f", "qed", "-o", options, tmp_path / "x.qed", "1M",
                       check=False)
        assert result.returncode != 0 and result.stderr.count("\n") == 1, result.stderr
    result = imgfs("create", "-f", "qed", "-o", "cluster_size=4k,table_size=1",
                   tmp_path / "y.qed", "2G", check=False)
    assert result.returncode != 0 and "at most" in result.stderr


def test_convert_to_qed_and_back(tmp_path: Path) -> None:
    source = tmp_path / "src.raw"
    data = bytearray(6 * MiB)
    data[100:3 * MiB] = random_bytes(3 * MiB - 100, seed=9)
    data[5 * MiB:5 * MiB + 5] = b"tail!"
    source.write_bytes(bytes(data))
    image = tmp_path / "c.qed"
    imgfs("convert", "-O", "qed", "-o", "cluster_size=16k", source, image)
    check_clean(image)
    run("qemu-img", "compare", "-q", "-f", "raw", "-F", "qed", source, image)
    assert info_json("qemu-img", image)["cluster-size"] == 16 * KiB
    assert imgfs_raw(image) == bytes(data)


def test_resize_grows_and_refuses_shrinking(tmp_path: Path) -> None:
    image = qemu_create(tmp_path / "r.qed", 4 * MiB)
    qemu_io(image, f"write -P 7 {4 * MiB - 4096} 4k")
    imgfs("resize", image, "+1M")
    assert info_json("qemu-img", image)["virtual-size"] == 5 * MiB
    check_clean(image)
    raw = qemu_raw(image)
    assert raw[4 * MiB - 4096:4 * MiB] == b"\7" * 4096 and not any(raw[4 * MiB:])
    for args in [("--shrink", image, "1M"), (image, "5000000")]:
        result = imgfs("resize", *args, check=False)
        assert result.returncode != 0 and result.stderr.count("\n") == 1, result.stderr
    assert info_json("qemu-img", image)["virtual-size"] == 5 * MiB


def test_resize_zeroes_the_old_last_cluster_past_its_end(tmp_path: Path) -> None:
    """Bytes a hostile (or careless) writer left in the last cluster past
    the end of the disk do not appear when the disk grows."""
    image = qemu_create(tmp_path / "t.qed", 65536 + 512)
    qemu_io(image, "write -P 9 65536 512")
    host = le64(image, first_l2(image) + 8)
    patch(image, host + 512, b"\xee" * 1024)
    imgfs("resize", image, "+64k")
    raw = qemu_raw(image)
    assert raw[65536:66048] == b"\t" * 512 and not any(raw[66048:])
    check_clean(image)


def test_resize_never_uncovers_a_longer_backing_file(tmp_path: Path) -> None:
    """Growing over a backing file longer than the image would show its
    bytes in the new area: refused (QEMU refuses any backed QED growth);
    over a backing file no longer than the image it grows."""
    (tmp_path / "long.raw").write_bytes(random_bytes(4 * MiB, seed=1))
    (tmp_path / "short.raw").write_bytes(random_bytes(MiB, seed=2))
    refused = qemu_create(tmp_path / "r.qed", MiB, "backing_file=long.raw", "backing_fmt=raw")
    result = imgfs("resize", refused, "4M", check=False)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    grown = qemu_create(tmp_path / "g.qed", MiB, "backing_file=short.raw", "backing_fmt=raw")
    imgfs("resize", grown, "3M")
    raw = qemu_raw(grown)
    assert raw[:MiB] == (tmp_path / "short.raw").read_bytes() and not any(raw[MiB:])
    check_clean(grown)


# -- check and the need-check flag ------------------------------------------------------------

def damaged(tmp_path: Path, name: str = "d.qed") -> Path:
    """Past-EOF, unaligned, duplicate and on-the-L1 entries, a bad L1 entry,
    and a leaked cluster at the end."""
    image = qemu_create(tmp_path / name, 100 * MiB)
    qemu_io(image, "write -P 0x11 0 4k", "write -P 0x22 1M 100k")
    l1_offset = le64(image, 40)
    l2 = first_l2(image)
    data0 = le64(image, l2)
    for index, entry in [(5, 1 << 28), (6, data0 + 512), (7, data0), (8, l1_offset)]:
        patch(image, l2 + index * 8, struct.pack("<Q", entry))
    patch(image, l1_offset + 3 * 8, struct.pack("<Q", 1 << 29))
    with open(image, "ab") as handle:
        handle.write(bytes(65536))
    return image


def test_check_counts_as_qemu(tmp_path: Path) -> None:
    image = damaged(tmp_path)
    assert check_json("imgfs", image) == check_json("qemu-img", image)
    ours = run("imgfs", "check", image, check=False)
    theirs = run("qemu-img", "check", image, check=False)
    assert (ours.returncode, ours.stdout) == (theirs.returncode, theirs.stdout)


@pytest.mark.parametrize("mode", ["leaks", "all"])
def test_repair_as_qemu(tmp_path: Path, mode: str) -> None:
    ours, theirs = damaged(tmp_path, "ours.qed"), damaged(tmp_path, "theirs.qed")
    assert ours.read_bytes() == theirs.read_bytes()
    first = run("imgfs", "check", "-r", mode, ours, check=False)
    second = run("qemu-img", "check", "-r", mode, theirs, check=False)
    assert (first.returncode, first.stdout) == (second.returncode, second.stdout)
    assert ours.read_bytes() == theirs.read_bytes()
    assert check_json("imgfs", ours) == check_json("qemu-img", theirs)


def test_check_json_after_repair(tmp_path: Path) -> None:
    ours, theirs = damaged(tmp_path, "ours.qed"), damaged(tmp_path, "theirs.qed")
    assert check_json("imgfs", ours, "-r", "all") == check_json("qemu-img", theirs,
                                                                  "-r", "all")


def test_read_write_open_of_a_dirty_image_repairs_it(tmp_path: Path) -> None:
    """The need-check flag left by a crash: a read-only open leaves it, a
    read-write open checks, repairs and clears it, as QEMU does."""
    ours, theirs = damaged(tmp_path, "ours.qed"), damaged(tmp_path, "theirs.qed")
    for image in (ours, theirs):
        patch(image, 16, struct.pack("<Q", QED_F_NEED_CHECK))
    imgfs("info", ours)
    imgfs("check", ours, check=False)
    assert le64(ours, 16) == QED_F_NEED_CHECK
    write_through_api(ours, [])
    qemu_io(theirs, "read 0 512")
    assert le64(ours, 16) == le64(theirs, 16) == 0
    assert ours.read_bytes() == theirs.read_bytes()


def test_writes_set_need_check_until_closed(tmp_path: Path) -> None:
    image = qemu_create(tmp_path / "n.qed", 4 * MiB)
    seen = []

    async def write() -> None:
        node = await open_image(str(image), OpenContext(read_only=False))
        try:
            await node.write(0, b"x" * 4096)
            seen.append(le64(image, 16))
            await node.write(0, b"y" * 4096)       # in place: no header write
        finally:
            await node.aclose()
    trio.run(write)
    assert seen == [QED_F_NEED_CHECK] and le64(image, 16) == 0
    check_clean(image)


# -- damage -----------------------------------------------------------------------------------

@pytest.mark.parametrize("offset, value", [(4, 1000), (8, 0), (12, 0), (16, 1 << 10),
                                           (40, 12345), (48, 1 << 60), (60, 1 << 20)])
def test_damaged_header_is_one_line(tmp_path: Path, offset: int, value: int) -> None:
    (tmp_path / "x.raw").write_bytes(bytes(MiB))
    image = qemu_create(tmp_path / "h.qed", 4 * MiB, "backing_file=x.raw",
                        "backing_fmt=raw")
    width = 4 if offset in (4, 8, 12, 56, 60) else 8
    patch(image, offset, value.to_bytes(width, "little"))
    for command in (["info"], ["convert", "-O", "raw"], ["map"], ["check"]):
        args = [*command, image] + ([tmp_path / "o.raw"] if "convert" in command else [])
        result = imgfs(*args, check=False)
        assert result.returncode == 1, (command, result.stdout)
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


@pytest.mark.parametrize("entry", [1 << 40, 65536 * 5 + 512, 100])
def test_damaged_entry_fails_the_request_and_writes_nothing(tmp_path: Path,
                                                            entry: int) -> None:
    """An L2 entry past the end of the file, unaligned, or in the header:
    reading and writing that cluster fail (QEMU: EINVAL), the file stays."""
    image = qemu_create(tmp_path / "e.qed", 4 * MiB)
    qemu_io(image, "write -P 1 0 64k")
    patch(image, first_l2(image), struct.pack("<Q", entry))
    result = imgfs("convert", "-O", "raw", image, tmp_path / "o.raw", check=False)
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    before = image.read_bytes()
    with pytest.raises(Exception, match="cluster offset"):
        write_through_api(image, [(0, b"x" * 512)])
    assert image.read_bytes() == before


def randomly_damaged(directory: Path, seed: int) -> bytes:
    """An image qemu-io wrote a few clusters into, then L1 and L2 entries
    set to values a damaged image holds: 0, 1, the file's end, the L1
    table, other tables and data clusters, unaligned and header offsets;
    sometimes leaked clusters at the end."""
    rng = random.Random(seed)
    cluster, tables = rng.choice([4096, 65536]), rng.choice([2, 4])
    image = qemu_create(directory / "base.qed", 64 * MiB, f"cluster_size={cluster}",
                        f"table_size={tables}")
    writes = []
    for _ in range(rng.randrange(1, 6)):
        offset = rng.randrange(0, 64 * MiB - 3 * cluster, 512)
        writes.append(f"write -P {rng.randrange(1, 255)} {offset} "
                      f"{rng.choice([512, cluster, 3 * cluster])}")
    qemu_io(image, *writes)
    data = bytearray(image.read_bytes())
    image.unlink()
    l1 = le64_of(data, 40)
    table_bytes = cluster * tables
    l2_tables = [offset for offset in struct.unpack_from(f"<{table_bytes // 8}Q", data, l1)
                 if offset]
    values = [0, 1, len(data), len(data) + cluster, l1, l1 + cluster, cluster // 2, 4096,
              3 * cluster + 512, len(data) - table_bytes, *l2_tables]
    for table in l2_tables:
        values += [entry for entry in struct.unpack_from(f"<{table_bytes // 8}Q", data, table)
                   if entry > 1]
    for _ in range(rng.randrange(1, 5)):
        if l2_tables and rng.random() < 0.8:
            where = rng.choice(l2_tables) + 8 * rng.randrange(min(64, table_bytes // 8))
        else:
            where = l1 + 8 * rng.randrange(4)
        struct.pack_into("<Q", data, where, rng.choice(values))
    if rng.random() < 0.3:
        data += bytes(cluster * rng.randrange(1, 3))
    return bytes(data)


def le64_of(data: bytes | bytearray, offset: int) -> int:
    return int(struct.unpack_from("<Q", data, offset)[0])


@pytest.mark.parametrize("first", range(0, 30, 10))
def test_check_and_repair_of_random_damage_agree_with_qemu(tmp_path: Path,
                                                           first: int) -> None:
    """Differential: for randomly damaged tables (duplicates, tables on
    tables, on the L1 table or past the end, unaligned entries, leaks),
    `check` and `check -r leaks|all` say what qemu-img says, and a repair
    leaves the file byte for byte as qemu-img's repair does; so does the
    repair a read-write open of a need-check image runs."""
    for seed in range(first, first + 10):
        damaged_bytes = randomly_damaged(tmp_path, seed)
        ours, theirs = tmp_path / "ours.qed", tmp_path / "theirs.qed"
        for extra in ((), ("-r", "leaks"), ("-r", "all")):
            ours.write_bytes(damaged_bytes)
            theirs.write_bytes(damaged_bytes)
            assert check_json("imgfs", ours, *extra) == \
                check_json("qemu-img", theirs, *extra), (seed, extra)
            assert ours.read_bytes() == theirs.read_bytes(), (seed, extra)
        dirty = bytearray(damaged_bytes)
        dirty[16] |= QED_F_NEED_CHECK
        ours.write_bytes(dirty)
        theirs.write_bytes(dirty)
        write_through_api(ours, [])
        run("qemu-io", "-f", "qed", "-c", "read 0 512", theirs, check=False)
        assert ours.read_bytes() == theirs.read_bytes(), (seed, "open")

