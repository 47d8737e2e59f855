"""VHDX against qemu-img / qemu-io and the Hyper-V sample images.

Images made by ``qemu-img create -f vhdx`` (every option) and written out
of order by qemu-io read as ``qemu-img convert -O raw`` reads them; the
Hyper-V samples in ../shared/sample-images read the same as QEMU reads
them (the dirty-log one, read-only, as QEMU reads a copy it repaired, and
the file is left untouched); info equals qemu-img's.  QEMU's vhdx driver
reports no block status (its map is one data extent), so `imgfs map` is
checked against the BAT: data where qemu-io wrote, zeros elsewhere.
"""
from __future__ import annotations

import bz2
import hashlib
import itertools
import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest
from imgfs.drivers.vhdx.layout import (
    HEADER,
    METADATA_ENTRY,
    METADATA_HEADER,
    REGION_ENTRY,
    REGION_HEADER,
    Geometry,
    Header,
    probe,
)

from tests.conftest import need, qemu_raw, random_bytes, write_through_api
from tests.drivers.test_qed import run

KiB = 1024
MiB = 1024 * KiB
SAMPLES = Path(__file__).resolve().parents[2].parent / "shared" / "sample-images"


@pytest.fixture(autouse=True)
def _in_workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    need("qemu-img", "qemu-io")
    monkeypatch.chdir(tmp_path)


# -- helpers ------------------------------------------------------------------------------

def qemu_create(image: Path, size: int | str, *options: str) -> Path:
    run("qemu-img", "create", "-q", "-f", "vhdx",
        *(["-o", ",".join(options)] if options else []), image, str(size))
    return image


def qemu_io(image: Path, *commands: str) -> None:
    args: list[str | Path] = ["-f", "vhdx"]
    for command in commands:
        args += ["-c", command]
    run("qemu-io", *args, image)


def out_of_order(image: Path, block: int, size: int) -> list[tuple[int, int]]:
    """Writes from the end backwards, unaligned and block-crossing; the
    (offset, length) of each."""
    writes = [(size - 3 * KiB - 512, 3 * KiB), (2 * block + 7 * KiB, 5 * KiB + 512),
              (block - 1536, 4 * KiB), (512, 2560)]
    qemu_io(image, *[f"write -P {0x21 + number} {offset} {length}"
                     for number, (offset, length) in enumerate(writes)])
    return writes


def sample(name: str, tmp_path: Path) -> Path:
    source = SAMPLES / f"{name}.bz2"
    assert source.exists(), f"sample image {source} is missing (../shared/sample-images)"
    image = tmp_path / name
    image.write_bytes(bz2.decompress(source.read_bytes()))
    return image


def imgfs_raw(image: Path, out: Path, *options: str) -> bytes:
    run("imgfs", "convert", *options, "-O", "raw", image, out)
    return out.read_bytes()


def info_json(tool: str, image: Path) -> dict[str, Any]:
    report: dict[str, Any] = json.loads(
        run(tool, "info", "--output=json", *(["-U"] if tool == "qemu-img" else []),
            image).stdout)
    return report


def data_ranges(path: Path) -> list[tuple[int, int]]:
    """The (start, end) of a sparse file's data, by SEEK_DATA/SEEK_HOLE."""
    ranges = []
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        offset = 0
        while offset < size:
            try:
                start = os.lseek(handle.fileno(), offset, os.SEEK_DATA)
            except OSError:
                break
            offset = os.lseek(handle.fileno(), start, os.SEEK_HOLE)
            ranges.append((start, offset))
    return ranges


def assert_same_sparse(got: Path, expected: Path) -> None:
    """Two large sparse files hold the same bytes (without reading the holes)."""
    assert got.stat().st_size == expected.stat().st_size
    with open(got, "rb") as first, open(expected, "rb") as second:
        for start, end in sorted(set(data_ranges(got) + data_ranges(expected))):
            assert os.pread(first.fileno(), end - start, start) == \
                os.pread(second.fileno(), end - start, start), f"differ in {start}..{end}"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- layout (pure) ---------------------------------------------------------------------------

def test_struct_sizes() -> None:
    assert HEADER.size == 80
    assert REGION_HEADER.size == 16 and REGION_ENTRY.size == 32
    assert METADATA_HEADER.size == 32 and METADATA_ENTRY.size == 32


def test_probe() -> None:
    assert probe(b"vhdxfile" + bytes(100), "x") == 100
    assert probe(b"conectix", "x") == 0


def test_bat_geometry_interleaves_bitmap_entries() -> None:
    # 512-byte sectors, 32 MiB blocks: 128 payload entries per chunk
    geometry = Geometry(32 * MiB, 512, 10 * 1024 * MiB, False)
    assert geometry.chunk_ratio == 128
    assert geometry.payload_index(127) == 127 and geometry.payload_index(128) == 129
    assert geometry.bat_entries == 320 + 2
    assert Geometry(32 * MiB, 512, 10 * 1024 * MiB, True).bat_entries == 3 * 129
    assert Geometry(1 * MiB, 4096, 64 * MiB, False).chunk_ratio == 32768


def test_header_round_trip() -> None:
    header = Header(b"head", 0, 5, bytes(range(16)), bytes(16), bytes(16), 0, 1, MiB, MiB)
    packed = header.pack()
    assert len(packed) == 4096
    from imgfs.drivers.vhdx.layout import valid_header
    assert valid_header(packed) == header._replace(checksum=valid_header(packed).checksum)


# -- reads ------------------------------------------------------------------------------------

CREATE_CASES = [
    ((), 17 * MiB + 4 * KiB),
    (("block_size=1M",), 9 * MiB),
    (("block_size=32M", "log_size=2M"), 70 * MiB),
    (("block_state_zero=off",), 20 * MiB),
    (("subformat=fixed", "block_size=1M"), 5 * MiB + 512),
    (("subformat=fixed", "block_state_zero=off", "block_size=2M"), 7 * MiB),
]


@pytest.mark.parametrize("options, size", CREATE_CASES)
def test_out_of_order_image_reads_like_qemu(tmp_path: Path, options: tuple[str, ...],
                                            size: int) -> None:
    image = qemu_create(tmp_path / "o.vhdx", size, *options)
    block = info_json("qemu-img", image)["cluster-size"]
    writes = out_of_order(image, block, size)
    qemu_io(image, f"write -z {block} 4k")
    expected = qemu_raw(image, tmp_path / "expected.raw")
    assert imgfs_raw(image, tmp_path / "got.raw") == expected
    assert info_json("imgfs", image) == info_json("qemu-img", image)
    if "subformat=fixed" not in options:
        assert_map_follows_writes(image, block, size, writes, expected)


def assert_map_follows_writes(image: Path, block: int, size: int,
                              writes: list[tuple[int, int]], expected: bytes) -> None:
    written = {offset // block for offset, _ in writes} | \
            {(offset + length - 1) // block for offset, length in writes} | {1}
    extents = json.loads(run("imgfs", "map", "--output=json", image).stdout)
    assert sum(extent["length"] for extent in extents) == size
    for extent in extents:
        first = extent["start"] // block
        last = (extent["start"] + extent["length"] - 1) // block
        if extent["data"]:
            assert set(range(first, last + 1)) <= written
        else:
            assert extent["zero"]
            assert not set(range(first, last + 1)) & written - {1}
            assert expected[extent["start"]:extent["start"] + extent["length"]].count(0) == \
                extent["length"]


def test_hyperv_dynamic_sample_reads_like_qemu(tmp_path: Path) -> None:
    image = sample("iotest-dynamic-1G.vhdx", tmp_path)
    run("qemu-img", "convert", "-O", "raw", image, tmp_path / "expected.raw")
    run("imgfs", "convert", "-O", "raw", image, tmp_path / "got.raw")
    assert_same_sparse(tmp_path / "got.raw", tmp_path / "expected.raw")
    assert info_json("imgfs", image) == info_json("qemu-img", image)


def test_dirty_log_read_only_shows_the_replayed_contents(tmp_path: Path) -> None:
    """QEMU refuses it read-only; imgfs reads through the log, writes nothing."""
    image = sample("iotest-dirtylog-10G-4M.vhdx", tmp_path)
    before = digest(image)
    refused = run("qemu-img", "info", image, check=False)
    assert refused.returncode != 0 and "log that needs to be replayed" in refused.stderr
    repaired = tmp_path / "repaired.vhdx"
    repaired.write_bytes(image.read_bytes())
    run("qemu-img", "check", "-r", "all", repaired)
    run("qemu-img", "convert", "-O", "raw", repaired, tmp_path / "expected.raw")
    run("imgfs", "convert", "-O", "raw", image, tmp_path / "got.raw")
    assert_same_sparse(tmp_path / "got.raw", tmp_path / "expected.raw")
    info = info_json("imgfs", image)
    assert info["virtual-size"] == 10 * 1024 * MiB and info["cluster-size"] == MiB
    assert digest(image) == before


def test_region_table_copy_is_used_when_the_first_is_damaged(tmp_path: Path) -> None:
    image = qemu_create(tmp_path / "r.vhdx", 8 * MiB)
    qemu_io(image, "write -P 0x5a 1M 64k")
    expected = qemu_raw(image, tmp_path / "expected.raw")
    with open(image, "r+b") as handle:
        handle.seek(192 * KiB + 100)
        handle.write(b"\xff")
    assert imgfs_raw(image, tmp_path / "got.raw") == expected


def test_older_header_is_used_when_the_newer_is_torn(tmp_path: Path) -> None:
    image = qemu_create(tmp_path / "h.vhdx", 8 * MiB)
    raw = image.read_bytes()
    sequences = [struct.unpack_from("<Q", raw, offset + 8)[0] for offset in (64 * KiB,
                                                                            128 * KiB)]
    newer = (64 * KiB, 128 * KiB)[sequences.index(max(sequences))]
    with open(image, "r+b") as handle:
        handle.seek(newer + 200)
        handle.write(b"torn")
    assert info_json("imgfs", image)["virtual-size"] == 8 * MiB


# -- log replay on a read-write open -------------------------------------------------------

def log_guids(image: Path) -> list[bytes]:
    with open(image, "rb") as handle:
        raw = handle.read(192 * KiB)
    return [raw[offset + 48:offset + 64] for offset in (64 * KiB, 128 * KiB)]


def test_dirty_log_is_replayed_by_a_read_write_open(tmp_path: Path) -> None:
    """The same file as QEMU's replay (past the headers), the log cleared."""
    image = sample("iotest-dirtylog-10G-4M.vhdx", tmp_path)
    repaired = tmp_path / "repaired.vhdx"
    repaired.write_bytes(image.read_bytes())
    run("qemu-img", "check", "-r", "all", repaired)
    write_through_api(image, [])
    run("qemu-img", "check", image)
    assert bytes(16) in log_guids(image)
    with open(image, "rb") as ours, open(repaired, "rb") as theirs:
        ours.seek(192 * KiB)
        theirs.seek(192 * KiB)
        while chunk := ours.read(MiB):
            assert chunk == theirs.read(MiB)


# -- writes and create ----------------------------------------------------------------------

def apply(expected: bytearray, writes: list[tuple[int, bytes]]) -> None:
    for offset, data in writes:
        expected[offset:offset + len(data)] = data


def check_equal(image: Path, expected_raw: Path) -> None:
    run("qemu-img", "check", image)
    run("qemu-img", "compare", "-f", "vhdx", "-F", "raw", image, expected_raw)
    assert log_guids(image)[0] == bytes(16) or log_guids(image)[1] == bytes(16)


@pytest.mark.parametrize("creator, options", [
    ("qemu-img", "block_size=1M"), ("imgfs", "block_size=1M"),
    ("imgfs", "block_size=2M,subformat=fixed,block_state_zero=off"),
    ("qemu-img", "block_size=2M,subformat=fixed")])
def test_writes_are_clean_and_equal_for_qemu(tmp_path: Path, creator: str,
                                             options: str) -> None:
    size = 9 * MiB + 512
    image = tmp_path / "w.vhdx"
    run(creator, "create", "-q", "-f", "vhdx", "-o", options, image, str(size))
    qemu_io(image, "write -P 0x33 2M 100k")
    expected = bytearray(qemu_raw(image, tmp_path / "before.raw"))
    writes = [(size - 1000, random_bytes(1000, seed=1)), (MiB - 700, random_bytes(1500, seed=2)),
              (2 * MiB + 4 * KiB, random_bytes(9000, seed=3)), (4 * MiB, random_bytes(3 * MiB))]
    write_through_api(image, writes)
    apply(expected, writes)
    (tmp_path / "expected.raw").write_bytes(expected)
    check_equal(image, tmp_path / "expected.raw")
    assert imgfs_raw(image, tmp_path / "got.raw") == expected


def test_zero_writes_make_zero_blocks(tmp_path: Path) -> None:
    image = qemu_create(tmp_path / "z.vhdx", 4 * MiB, "block_size=1M")
    qemu_io(image, "write -P 0x44 0 4M")
    run("qemu-io", "-f", "vhdx", "-c", "write -z 1M 2M", image)   # (QEMU writes zeros)
    run("imgfs", "convert", "-O", "vhdx", "-o", "block_size=1M", image, tmp_path / "c.vhdx")
    expected = qemu_raw(image, tmp_path / "expected.raw")
    check_equal(tmp_path / "c.vhdx", tmp_path / "expected.raw")
    extents = json.loads(run("imgfs", "map", "--output=json", tmp_path / "c.vhdx").stdout)
    assert [(extent["start"], extent["data"]) for extent in extents] == \
        [(0, True), (MiB, False), (3 * MiB, True)]
    assert len(expected) == 4 * MiB


CREATE_OPTION_CASES = [
    ((), "64M"), ((), "1025M"), ((), "200G"), ((), "33T"), ((), "1000"),
    (("block_size=1536k",), "10M"), (("block_size=512k",), "10M"),
    (("log_size=1500k",), "10M"), (("block_state_zero=off",), "64M"),
    (("subformat=fixed", "block_size=1M"), "5M"),
    (("subformat=fixed", "block_state_zero=off", "block_size=2M"), "7M"),
]


@pytest.mark.parametrize("options, size", CREATE_OPTION_CASES)
def test_create_matches_qemu_img(tmp_path: Path, options: tuple[str, ...], size: str) -> None:
    """Same info and file length as qemu-img's, clean, same layout."""
    ours, theirs = tmp_path / "ours.vhdx", tmp_path / "theirs.vhdx"
    opt_args = ["-o", ",".join(options)] if options else []
    run("imgfs", "create", "-q", "-f", "vhdx", *opt_args, ours, size)
    run("qemu-img", "create", "-q", "-f", "vhdx", *opt_args, theirs, size)
    mine, qemus = info_json("qemu-img", ours), info_json("qemu-img", theirs)
    for report in (mine, qemus):
        report.pop("filename")
        report.pop("actual-size")
    assert mine == qemus
    assert ours.stat().st_size == theirs.stat().st_size
    run("qemu-img", "check", ours)
    ours_raw, theirs_raw = ours.read_bytes()[192 * KiB:], theirs.read_bytes()[192 * KiB:]
    assert ours_raw[:64 * KiB] == theirs_raw[:64 * KiB]          # region table


@pytest.mark.parametrize("options, size", [(("block_size=3M",), "10M"), ((), "65T"),
                                           (("subformat=thin",), "10M")])
def test_create_refuses_what_qemu_img_refuses(tmp_path: Path, options: tuple[str, ...],
                                              size: str) -> None:
    args = ["create", "-q", "-f", "vhdx", "-o", ",".join(options)]
    assert run("qemu-img", *args, tmp_path / "q.vhdx", size, check=False).returncode
    result = run("imgfs", *args, tmp_path / "i.vhdx", size, check=False)
    assert result.returncode in (1, 2) and result.stderr.startswith("imgfs:")
    assert not (tmp_path / "i.vhdx").exists()


# -- check --------------------------------------------------------------------------------------

def check_json(tool: str, image: Path, *args: str) -> tuple[int, dict[str, Any]]:
    result = run(tool, "check", "--output=json", *args, image, check=False)
    report = json.loads(result.stdout)
    report.pop("filename")
    return result.returncode, report


def test_check_equals_qemu_img(tmp_path: Path) -> None:
    """Clean images, and the dirty-log sample repaired (-r all replays the
    log: one corruption fixed); unrepaired, QEMU cannot open it
    read-only while imgfs reports the log as the one corruption."""
    image = qemu_create(tmp_path / "c.vhdx", 8 * MiB, "block_size=1M")
    qemu_io(image, "write -P 1 0 3M")
    assert check_json("imgfs", image) == check_json("qemu-img", image)
    dirty = sample("iotest-dirtylog-10G-4M.vhdx", tmp_path)
    assert check_json("imgfs", dirty)[0] == 2
    ours, theirs = tmp_path / "ours.vhdx", tmp_path / "theirs.vhdx"
    ours.write_bytes(dirty.read_bytes())
    theirs.write_bytes(dirty.read_bytes())
    assert check_json("imgfs", ours, "-r", "all") == check_json("qemu-img", theirs, "-r", "all")
    assert check_json("qemu-img", ours) == (0, {"check-errors": 0, "format": "vhdx"})


# -- differencing images (beyond QEMU): imgfs's own chains, checked against
# libvhdi (pyvhdi) and dissect.hypervisor and the expected raw ---------------------------------

def independent_reads(image: Path, chain: list[Path], size: int) -> list[bytes]:
    """The image through pyvhdi (given its parents) and, for a child of a
    plain image, dissect.hypervisor (its 3.21 reads a partially present
    block over a partially present parent block short; libvhdi agrees
    with imgfs there)."""
    import pyvhdi
    from dissect.hypervisor.disk.vhdx import VHDX
    files = []
    for path in chain:
        handle = pyvhdi.file()
        handle.open(str(path))
        files.append(handle)
    for child, parent in itertools.pairwise(files):
        child.set_parent(parent)
    libvhdi = files[0].read_buffer_at_offset(size, 0)
    for handle in files:
        handle.close()
    if len(chain) > 2:
        return [libvhdi]
    return [libvhdi, VHDX(image.absolute()).read(size)]


def make_base(path: Path, size: int, *options: str, logical_4k: bool = False) -> bytearray:
    """A qemu-img VHDX written by qemu-io (4 KiB logical sectors: its metadata
    item changed before anything is written, which QEMU then honours)."""
    qemu_create(path, size, "block_size=1M", *options)
    writes = [(0, b"\x11" * size), (MiB, b"\x12" * 100 * KiB)]
    if not logical_4k:
        qemu_io(path, *[f"write -P {data[0]} {offset} {len(data)}" for offset, data in writes])
        return bytearray(qemu_raw(path, path.with_suffix(".raw")))
    # QEMU refuses 4 KiB logical sectors: imgfs writes and reads this one
    data = bytearray(path.read_bytes())
    metadata = struct.unpack_from("<Q", data, 192 * KiB + 64)[0]
    struct.pack_into("<I", data, metadata + 64 * KiB + 32, 4096)
    path.write_bytes(data)
    write_through_api(path, writes)
    expected = bytearray(size)
    apply(expected, writes)
    return expected


def straddling_writes(seed: int, size: int) -> list[tuple[int, bytes]]:
    """Unaligned writes across sectors, 4 KiB units and blocks."""
    return [(100, random_bytes(700, seed)), (MiB - 300, random_bytes(5000, seed + 1)),
            (3 * MiB + 512 * 7 + 3, random_bytes(4099, seed + 2)),
            (size - 10, random_bytes(10, seed + 3)), (2 * MiB, random_bytes(MiB, seed + 4)),
            (5 * MiB - 4096, random_bytes(8192, seed + 5))]


@pytest.mark.parametrize("logical_4k", [False, True])
def test_differencing_chain_three_deep(tmp_path: Path, logical_4k: bool) -> None:
    """base (qemu-img) <- mid <- top (imgfs create -b), written through
    imgfs; the same bytes for imgfs, libvhdi, dissect and the raw copy."""
    size = 6 * MiB
    base = tmp_path / "base.vhdx"
    expected = make_base(base, size, logical_4k=logical_4k)
    chain = [base]
    for number, name in enumerate(("mid.vhdx", "top.vhdx")):
        child = tmp_path / name
        run("imgfs", "create", "-q", "-f", "vhdx", "-b", chain[0].name, "-o", "block_size=1M",
            child)
        writes = straddling_writes(10 * number, size)
        write_through_api(child, writes)
        apply(expected, writes)
        chain.insert(0, child)
    top = chain[0]
    assert imgfs_raw(top, tmp_path / "got.raw") == expected
    for independent in independent_reads(top, chain, size):
        assert independent == expected
    info = json.loads(run("imgfs", "info", "--backing-chain", "--output=json", top).stdout)
    assert [Path(entry["filename"]).name for entry in info] == ["top.vhdx", "mid.vhdx",
                                                               "base.vhdx"]


def test_differencing_writes_fill_partial_blocks(tmp_path: Path) -> None:
    """A written sector makes its block partially present (the rest from
    the parent); filling every sector makes it fully present."""
    size = 4 * MiB
    base = tmp_path / "base.vhdx"
    expected = make_base(base, size)
    child = tmp_path / "child.vhdx"
    run("imgfs", "create", "-q", "-f", "vhdx", "-b", "base.vhdx", "-o", "block_size=1M", child)
    writes = [(MiB + 512, random_bytes(1000, 7)), (3 * MiB, random_bytes(MiB, 8))]
    write_through_api(child, writes)
    apply(expected, writes)
    states = bat_states(child, 4)
    assert states == [0, 7, 0, 6]
    extents = json.loads(run("imgfs", "map", "--output=json", child).stdout)
    ours = [(extent["start"], extent["length"]) for extent in extents if extent["depth"] == 0]
    assert ours == [(MiB + 512, 1024), (3 * MiB, MiB)]
    assert imgfs_raw(child, tmp_path / "got.raw") == expected
    for independent in independent_reads(child, [child, base], size):
        assert independent == expected


def bat_states(image: Path, blocks: int) -> list[int]:
    data = image.read_bytes()
    bat = struct.unpack_from("<Q", data, 192 * KiB + 32)[0]
    return [struct.unpack_from("<Q", data, bat + 8 * block)[0] & 7 for block in range(blocks)]


def test_parent_changed_since_is_refused(tmp_path: Path) -> None:
    base = tmp_path / "base.vhdx"
    make_base(base, 2 * MiB)
    child = tmp_path / "child.vhdx"
    run("imgfs", "create", "-q", "-f", "vhdx", "-b", "base.vhdx", child)
    qemu_io(base, "write -P 0x77 0 512")          # a new data write GUID
    result = run("imgfs", "info", "--backing-chain", child, check=False)
    assert result.returncode == 1
    assert "base.vhdx" in result.stderr and "child.vhdx" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_missing_parent_is_one_line_naming_both(tmp_path: Path) -> None:
    base = tmp_path / "base.vhdx"
    make_base(base, 2 * MiB)
    child = tmp_path / "child.vhdx"
    run("imgfs", "create", "-q", "-f", "vhdx", "-b", "base.vhdx", child)
    base.unlink()
    result = run("imgfs", "info", "--backing-chain", child, check=False)
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1
    assert "base.vhdx" in result.stderr and "child.vhdx" in result.stderr


def test_parent_locator_naming_the_child_itself_is_refused(tmp_path: Path) -> None:
    base = tmp_path / "base.vhdx"
    make_base(base, 2 * MiB)
    child = tmp_path / "self.vhdx"
    run("imgfs", "create", "-q", "-f", "vhdx", "-b", "base.vhdx", child)
    data = bytearray(child.read_bytes())
    at = data.find("base.vhdx".encode("utf-16-le"))
    data[at:at + 18] = "self.vhdx".encode("utf-16-le")
    child.write_bytes(data)
    result = run("imgfs", "info", "--backing-chain", child, check=False)
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1


def test_log_wraps_and_a_crash_copy_replays_in_qemu(tmp_path: Path) -> None:
    """More block allocations in one open than the 1 MiB log holds: the
    ring starts again; a copy of the file taken before the close (a crash)
    is replayed by QEMU to every write, and the closed image is clean."""
    image = tmp_path / "wrap.vhdx"
    size = 200 * MiB
    run("imgfs", "create", "-q", "-f", "vhdx", "-o", "block_size=1M", image, str(size))
    writes = [(block * MiB + 4096, random_bytes(512, block)) for block in range(200)]
    crashed = tmp_path / "crashed.vhdx"

    async def write_and_copy() -> None:
        from imgfs.graph import open_image
        from imgfs.node import OpenContext
        node = await open_image(str(image), OpenContext(read_only=False))
        try:
            for offset, data in writes:
                await node.write(offset, data)
            crashed.write_bytes(image.read_bytes())      # no flush, no close
        finally:
            await node.aclose()

    import trio
    trio.run(write_and_copy)
    expected = bytearray(size)
    apply(expected, writes)
    (tmp_path / "expected.raw").write_bytes(expected)
    check_equal(image, tmp_path / "expected.raw")
    refused = run("qemu-img", "info", crashed, check=False)
    assert refused.returncode and "log that needs to be replayed" in refused.stderr
    run("qemu-img", "check", "-r", "all", crashed)
    check_equal(crashed, tmp_path / "expected.raw")
