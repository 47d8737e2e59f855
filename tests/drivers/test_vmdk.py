"""VMDK against qemu-img / qemu-io.

Images of every subformat are made by ``qemu-img create -f vmdk -o
subformat=...`` and filled by qemu-io out of order; what imgfs reads
(``convert -O raw``, ``map``, ``info``) is compared with what qemu-img
says about the same image.  Layouts QEMU does not write (VMware's
stream with its footer, hand-written ESX descriptors, COWD extents) are
read from the ESXi sample or built from the spec in a few lines.
"""
from __future__ import annotations

import bz2
import importlib
import json
import random
import re
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
import trio
from imgfs.drivers.vmdk.descriptor import parse_descriptor
from imgfs.drivers.vmdk.layout import (
    SPARSE_HEADER,
    SparseHeader,
    check_sparse_header,
    probe,
)

from imgfs.errors import CorruptImage, InvalidImage, ReadOnly, Unsupported
from imgfs.graph import open_image
from imgfs.node import OpenContext
from tests.conftest import REQUIRE_ORACLES, imgfs, need, random_bytes, write_through_api
from tests.drivers.test_qed import (
    human_info,
    imgfs_raw,
    info_json,
    map_json,
    qemu_create,
    qemu_io,
    run,
)

KiB = 1024
MiB = 1024 * KiB
GRAIN = 64 * KiB
SAMPLES = Path(__file__).resolve().parents[2].parent / "shared" / "sample-images"
SUBFORMATS = ("monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse",
              "twoGbMaxExtentFlat")


@pytest.fixture(autouse=True)
def _in_workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Relative extent and parent names resolve the same way for both tools."""
    need("qemu-img", "qemu-io")
    monkeypatch.chdir(tmp_path)


# -- helpers ------------------------------------------------------------------------------

def vmdk_create(image: Path, size: int | str | None = None, *options: str) -> Path:
    return qemu_create(image, size, *options, fmt="vmdk")


def vmdk_io(image: Path, *commands: str) -> None:
    qemu_io(image, *commands, fmt="vmdk")


def out_of_order(image: Path, size: int) -> None:
    """Unaligned, grain-crossing and zero writes, in no order."""
    vmdk_io(image, f"write -P 0x11 {3 * GRAIN + 100} {2 * GRAIN + 7}",
            f"write -P 0x22 {GRAIN // 2} {GRAIN}",
            f"write -P 0x33 {size - GRAIN - 300} {GRAIN + 300}",
            f"write -z {6 * GRAIN} {2 * GRAIN}",
            f"write -P 0x44 {9 * GRAIN + 1} 3",
            f"write -z {10 * GRAIN + 5} {GRAIN}",
            f"write -P 0x55 {12 * GRAIN + 17} {GRAIN}")


def qemu_raw(image: Path, name: str = "qemu.raw") -> bytes:
    out = image.parent / name
    run("qemu-img", "convert", "-U", "-O", "raw", image, out)
    return out.read_bytes()


def assert_same_content(image: Path) -> None:
    """imgfs's conversion equals the image as QEMU reads it (compared by
    qemu-img, which skips holes: the ESXi sample is 16 GiB)."""
    out = image.parent / "imgfs.raw"
    imgfs("convert", "-O", "raw", image, out)
    run("qemu-img", "compare", "-q", "-f", "raw", "-F", "vmdk", out, image)


def assert_reads_like_qemu(image: Path) -> None:
    assert_same_content(image)
    assert map_json("imgfs", image) == map_json("qemu-img", image)
    assert info_json("imgfs", image) == info_json("qemu-img", image)


def esxi_sample(directory: Path, name: str = "iotest-version3.vmdk") -> Path:
    image = directory / name
    image.write_bytes(bz2.decompress((SAMPLES / "iotest-version3.vmdk.bz2").read_bytes()))
    return image


async def read_range(image: Path, offset: int, length: int) -> bytes:
    node = await open_image(str(image), OpenContext(read_only=True))
    try:
        return await node.read(offset, length)
    finally:
        await node.aclose()


def refusal(image: Path) -> str:
    """The one line `imgfs info` prints for an image it refuses."""
    result = imgfs("info", image, check=False)
    assert result.returncode == 1, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("imgfs: "), result.stderr
    return lines[0]


# -- layout (pure) ------------------------------------------------------------------------

def test_header_struct_is_one_sector() -> None:
    assert SPARSE_HEADER.size == 512


def test_probe_recognises_magics_and_descriptors() -> None:
    assert probe(b"KDMV\1\0\0\0", "x") == 100
    assert probe(b"COWD", "x") == 100
    assert probe(b"# Disk DescriptorFile\nversion=1\n", "x") == 100
    assert probe(b"QFI\xfb", "x") == 0


def header(**fields: int) -> SparseHeader:
    values = dict(magic=b"KDMV", version=1, flags=3, capacity=8192, grain_size=128,
                  descriptor_offset=1, descriptor_size=20, num_gtes_per_gt=512,
                  rgd_offset=21, gd_offset=22, overhead=128, unclean_shutdown=0,
                  newline_chars=b"\n \r\n", compress_algorithm=0)
    values.update(fields)
    return SparseHeader(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize("fields, error", [
    ({"grain_size": 100}, InvalidImage),
    ({"grain_size": 1 << 30}, InvalidImage),
    ({"num_gtes_per_gt": 1000}, InvalidImage),
    ({"num_gtes_per_gt": 1 << 30}, InvalidImage),
    ({"gd_offset": 1 << 40}, InvalidImage),
    ({"capacity": 1 << 60}, InvalidImage),
    ({"version": 4}, Unsupported),
    ({"flags": 3 | 1 << 16, "compress_algorithm": 2}, Unsupported),
])
def test_hostile_header_fields_are_refused(fields: dict[str, int],
                                           error: type[Exception]) -> None:
    with pytest.raises(error):
        check_sparse_header(header(**fields), 1 * MiB)


def test_descriptor_spellings() -> None:
    text = (b'# Disk DescriptorFile\r\nversion=1\r\nCID = "0000abcd"\r\n'
            b'parentCID=ffffffff\r\n  createType = "twoGbMaxExtentFlat"\r\n'
            b'RW 2048 FLAT "a b.vmdk" 0 extra fields\r\nRDONLY 10 ZERO\r\n'
            b'ddb.adapterType = "lsilogic"\r\n' + b" " * 300)
    descriptor = parse_descriptor(text)
    assert descriptor.cid == 0xABCD and descriptor.create_type == "twoGbMaxExtentFlat"
    assert [(e.kind, e.filename, e.sectors) for e in descriptor.extents] == \
        [("FLAT", "a b.vmdk", 2048), ("ZERO", "", 10)]
    assert descriptor.ddb["ddb.adapterType"] == "lsilogic"


# -- reads against qemu-img ----------------------------------------------------------------

@pytest.mark.parametrize("subformat", SUBFORMATS)
def test_subformat_written_out_of_order_reads_like_qemu(tmp_path: Path,
                                                        subformat: str) -> None:
    size = 20 * GRAIN + 512
    image = vmdk_create(tmp_path / "d.vmdk", size, f"subformat={subformat}")
    out_of_order(image, size)
    assert_reads_like_qemu(image)


@pytest.mark.parametrize("options", [("zeroed_grain=on",), ("adapter_type=lsilogic",
                                                            "hwversion=6"),
                                     ("compat6=on",)])
def test_options_read_like_qemu(tmp_path: Path, options: tuple[str, ...]) -> None:
    size = 20 * GRAIN
    image = vmdk_create(tmp_path / "o.vmdk", size, *options)
    out_of_order(image, size)
    vmdk_io(image, f"write -z {GRAIN} {4 * GRAIN}")
    assert_reads_like_qemu(image)


def test_stream_written_by_qemu_reads_like_qemu(tmp_path: Path) -> None:
    image = vmdk_create(tmp_path / "s.vmdk", 2 * MiB, "subformat=streamOptimized")
    vmdk_io(image, "write -P 1 0 64k", f"write -P 2 {3 * GRAIN} {2 * GRAIN}",
            f"write -P 3 {GRAIN} {GRAIN}")
    assert_reads_like_qemu(image)


def test_esxi_stream_with_footer_reads_like_qemu(tmp_path: Path) -> None:
    image = esxi_sample(tmp_path)
    assert_same_content(image)
    assert map_json("imgfs", image) == map_json("qemu-img", image)
    assert info_json("imgfs", image) == info_json("qemu-img", image)


@pytest.mark.parametrize("make", ["monolithicSparse", "streamOptimized", "esxi"])
def test_renamed_single_file_image_opens(tmp_path: Path, make: str) -> None:
    """The extent name inside a single-file image is not trusted."""
    if make == "esxi":
        image = esxi_sample(tmp_path, "renamed.vmdk")
    else:
        image = vmdk_create(tmp_path / "orig.vmdk", MiB, f"subformat={make}")
        vmdk_io(image, "write -P 7 0 64k")
        image = image.rename(tmp_path / "renamed.img")
    assert_same_content(image)


def test_two_gb_extents_crossing_the_boundary(tmp_path: Path) -> None:
    """A 2112 MiB twoGb image: a request across the 2 GiB extent boundary."""
    for subformat in ("twoGbMaxExtentSparse", "twoGbMaxExtentFlat"):
        image = vmdk_create(tmp_path / f"{subformat}.vmdk", "2112M", f"subformat={subformat}")
        boundary = 2048 * MiB
        vmdk_io(image, f"write -P 0x5a {boundary - 5000} 70000",
                f"write -P 0x6b {boundary + 3 * MiB} 512")
        data = trio.run(read_range, image, boundary - 8192, 80000)
        expected = bytes(3192) + b"\x5a" * 70000 + bytes(80000 - 73192)
        assert data == expected
        assert trio.run(read_range, image, boundary + 3 * MiB, 512) == b"\x6b" * 512
        assert map_json("imgfs", image) == map_json("qemu-img", image)
        write_through_api(image, [(boundary - 3000, b"\x77" * 10000)])
        vmdk_io(image, f"read -P 0x77 {boundary - 3000} 10000",
                f"read -P 0x5a {boundary + 7000} {65000 - 12000}")
        check_clean(image)


ESX_DESCRIPTOR = """# Disk DescriptorFile
version=1
encoding="UTF-8"
CID=12345678
parentCID=ffffffff
createType="vmfs"

# Extent description
RW 2048 VMFS "esx-flat.vmdk"
RW 2048 FLAT "esx-flat.vmdk" 1024 extra fields

# The Disk Data Base
#DDB
ddb.adapterType = "lsilogic"
"""


def test_esx_descriptor_with_vmfs_and_flat_extents(tmp_path: Path) -> None:
    flat = bytes(range(256)) * (3072 * 512 // 256)
    (tmp_path / "esx-flat.vmdk").write_bytes(flat)
    image = tmp_path / "esx.vmdk"
    image.write_bytes(ESX_DESCRIPTOR.replace("\n", "\r\n").encode())
    assert imgfs_raw(image) == qemu_raw(image) == flat[:MiB] + flat[512 * KiB:]
    assert info_json("imgfs", image) == info_json("qemu-img", image)


def test_zero_extent_reads_zeros(tmp_path: Path) -> None:
    """(QEMU 7.2 drops ZERO lines, moving the extents after them: imgfs
    places them, as the spec says.)"""
    (tmp_path / "f.vmdk").write_bytes(b"\x77" * MiB)
    image = tmp_path / "z.vmdk"
    image.write_text('# Disk DescriptorFile\nversion=1\ncreateType="monolithicFlat"\n'
                     'RW 1024 ZERO\nRW 2048 FLAT "f.vmdk" 0\n')
    assert imgfs_raw(image) == bytes(512 * KiB) + b"\x77" * MiB


@pytest.mark.parametrize("line", ['RW 2048 FLAT "f.vmdk"', 'RW 2048 VMFS "f.vmdk" 0',
                                  'RW 2048 SPARSE "f.vmdk" 0', 'RW 0 FLAT "f.vmdk" 0',
                                  'RW 2048 flat "f.vmdk" 0', 'RW 2048 VMFSRDM "f.vmdk"'])
def test_invalid_extent_lines_are_refused(tmp_path: Path, line: str) -> None:
    (tmp_path / "f.vmdk").write_bytes(bytes(MiB))
    image = tmp_path / "bad.vmdk"
    image.write_text(f'# Disk DescriptorFile\nversion=1\ncreateType="vmfs"\n{line}\n')
    assert "extent" in refusal(image)


def test_chain_three_deep_reads_like_qemu(tmp_path: Path) -> None:
    base = vmdk_create(tmp_path / "base.vmdk", 2 * MiB)
    vmdk_io(base, "write -P 1 0 2M")
    middle = vmdk_create(tmp_path / "mid.vmdk", None, "backing_file=base.vmdk",
                         "backing_fmt=vmdk")
    vmdk_io(middle, f"write -P 2 {GRAIN + 7} 100000")
    top = vmdk_create(tmp_path / "top.vmdk", None, "backing_file=mid.vmdk",
                      "backing_fmt=vmdk", "subformat=twoGbMaxExtentSparse")
    vmdk_io(top, f"write -P 3 {5 * GRAIN - 3} 9")
    assert imgfs_raw(top) == qemu_raw(top)
    assert map_json("imgfs", top) == map_json("qemu-img", top)


def test_parent_cid_mismatch_is_one_clear_error(tmp_path: Path) -> None:
    base = vmdk_create(tmp_path / "p.vmdk", MiB)
    child = vmdk_create(tmp_path / "c.vmdk", None, "backing_file=p.vmdk", "backing_fmt=vmdk")
    vmdk_io(base, "write -P 2 0 64k")        # QEMU gives the parent a new CID
    assert run("qemu-img", "convert", "-O", "raw", child, "q.raw", check=False).returncode
    result = imgfs("convert", "-O", "raw", child, "i.raw", check=False)
    assert result.returncode == 1
    assert "parent CID" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_cowd_extent_reads_zeros_and_info(tmp_path: Path) -> None:
    image = tmp_path / "delta.vmdk"
    head = struct.pack("<4sIIIIIII", b"COWD", 1, 3, 8192, 16, 40, 1, 5).ljust(512, b"\0")
    image.write_bytes((head + b"CID=12345678\nparentCID=ffffffff\n").ljust(41 * 512, b"\0"))
    assert imgfs_raw(image) == qemu_raw(image)
    assert info_json("imgfs", image) == info_json("qemu-img", image)
    with pytest.raises(Unsupported, match="COWD"):
        write_through_api(image, [(0, b"x")])


def test_info_json_names_extents(tmp_path: Path) -> None:
    image = vmdk_create(tmp_path / "t.vmdk", 3 * MiB, "subformat=twoGbMaxExtentFlat")
    report = json.loads(imgfs("info", "--output=json", image).stdout)
    extents = report["format-specific"]["data"]["extents"]
    assert [extent["format"] for extent in extents] == ["FLAT"]


# -- writes -----------------------------------------------------------------------------------

def writes_out_of_order(size: int, seed: int = 5) -> list[tuple[int, bytes]]:
    """Unaligned, grain-crossing and sector-sized writes, in no order."""
    rng = random.Random(seed)
    writes = [(3 * GRAIN + 100, bytes([0x11]) * (2 * GRAIN + 7)),
              (GRAIN // 2, bytes([0x22]) * GRAIN), (size - GRAIN - 300, b"\x33" * (GRAIN + 300)),
              (9 * GRAIN + 1, b"\x44" * 3), (0, b"\x55" * 512), (3 * GRAIN + 50, b"\x66" * 10)]
    for _ in range(6):
        offset = rng.randrange(0, size - 5000)
        writes.append((offset, rng.randbytes(rng.randrange(1, 5000))))
    return writes


def apply_writes(expected: bytearray, writes: list[tuple[int, bytes]]) -> None:
    for offset, data in writes:
        expected[offset:offset + len(data)] = data


def check_clean(image: Path) -> None:
    result = run("qemu-img", "check", "--output=json", image, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert not report.get("corruptions") and not report.get("leaks"), report


def compare_raw(expected: bytes, image: Path) -> None:
    raw = image.parent / "expected.raw"
    raw.write_bytes(expected)
    run("qemu-img", "compare", "-q", "-f", "raw", "-F", "vmdk", raw, image)


@pytest.mark.parametrize("subformat", SUBFORMATS)
def test_writes_pass_qemu_check_and_compare(tmp_path: Path, subformat: str) -> None:
    size = 20 * GRAIN + 512
    image = vmdk_create(tmp_path / "w.vmdk", size, f"subformat={subformat}")
    out_of_order(image, size)
    expected = bytearray(qemu_raw(image))
    writes = writes_out_of_order(size)
    write_through_api(image, writes)
    apply_writes(expected, writes)
    check_clean(image)
    compare_raw(bytes(expected), image)
    assert imgfs_raw(image) == expected


def test_zero_writes_become_zeroed_grains(tmp_path: Path) -> None:
    """Whole grains over the parent's data become zeroed-grain entries."""
    base = vmdk_create(tmp_path / "base.vmdk", 2 * MiB)
    vmdk_io(base, "write -P 1 0 2M")
    image = vmdk_create(tmp_path / "z.vmdk", None, "zeroed_grain=on",
                        "backing_file=base.vmdk", "backing_fmt=vmdk")

    async def zero() -> None:
        node = await open_image(str(image), OpenContext(read_only=False))
        try:
            await node.write_zeroes(GRAIN, 4 * GRAIN)
            await node.write_zeroes(10 * GRAIN + 5, 100)
        finally:
            await node.aclose()
    trio.run(zero)
    expected = bytearray(b"\1" * 2 * MiB)
    expected[GRAIN:5 * GRAIN] = bytes(4 * GRAIN)
    expected[10 * GRAIN + 5:10 * GRAIN + 105] = bytes(100)
    check_clean(image)
    compare_raw(bytes(expected), image)
    zeroed = [entry for entry in json.loads(run("qemu-img", "map", "--output=json",
                                                image).stdout)
              if entry["zero"] and entry["present"] and not entry["data"]]
    assert zeroed and zeroed[0]["start"] == GRAIN and zeroed[0]["length"] == 4 * GRAIN


def test_zero_writes_over_held_grains_map_as_qemu(tmp_path: Path) -> None:
    """With zeroed grains, QEMU turns whole grains it holds into zeroed
    grains too: so does imgfs (the same map afterwards)."""
    ours = vmdk_create(tmp_path / "ours.vmdk", 2 * MiB, "zeroed_grain=on")
    vmdk_io(ours, "write -P 1 0 2M")
    theirs = tmp_path / "theirs.vmdk"
    theirs.write_bytes(ours.read_bytes())

    async def zero() -> None:
        node = await open_image(str(ours), OpenContext(read_only=False))
        try:
            await node.write_zeroes(GRAIN - 512, 4 * GRAIN + 1024)
        finally:
            await node.aclose()
    trio.run(zero)
    vmdk_io(theirs, f"write -z {GRAIN - 512} {4 * GRAIN + 1024}")
    check_clean(ours)
    run("qemu-img", "compare", "-q", "-f", "vmdk", "-F", "vmdk", ours, theirs)
    assert map_json("imgfs", ours) == map_json("qemu-img", theirs)


def test_writes_copy_on_write_from_the_parent(tmp_path: Path) -> None:
    base = vmdk_create(tmp_path / "base.vmdk", 2 * MiB)
    vmdk_io(base, "write -P 7 0 2M")
    top = vmdk_create(tmp_path / "top.vmdk", None, "backing_file=base.vmdk",
                      "backing_fmt=vmdk")
    writes = [(GRAIN + 100, b"\x42" * 300), (5 * GRAIN - 10, b"\x43" * 20)]
    write_through_api(top, writes)
    expected = bytearray(b"\7" * 2 * MiB)
    apply_writes(expected, writes)
    check_clean(top)
    compare_raw(bytes(expected), top)
    # the parent is untouched, and its CID still matches
    assert qemu_raw(base) == b"\7" * 2 * MiB


def test_first_write_changes_the_cid(tmp_path: Path) -> None:
    """As QEMU: an image made on a parent that was written since is refused."""
    base = vmdk_create(tmp_path / "p.vmdk", MiB)
    child = vmdk_create(tmp_path / "c.vmdk", None, "backing_file=p.vmdk", "backing_fmt=vmdk")
    before = info_json("qemu-img", base)["format-specific"]["data"]["cid"]
    write_through_api(base, [(0, b"x" * 512)])
    assert info_json("qemu-img", base)["format-specific"]["data"]["cid"] != before
    assert run("qemu-img", "convert", "-O", "raw", child, "q.raw", check=False).returncode


def test_redundant_grain_directory_kept_in_step(tmp_path: Path) -> None:
    """Both grain directories name tables with the same entries."""
    image = vmdk_create(tmp_path / "r.vmdk", 4 * MiB)
    write_through_api(image, [(GRAIN * 3, b"\x99" * 5000), (3 * MiB, b"\x98" * 70000)])
    data = image.read_bytes()
    head = SparseHeader.unpack(data[:512])
    assert head.flags & 2 and head.rgd_offset
    for gd_sector_a, gd_sector_b in [(head.gd_offset, head.rgd_offset)]:
        gt_a = struct.unpack_from("<I", data, gd_sector_a * 512)[0] * 512
        gt_b = struct.unpack_from("<I", data, gd_sector_b * 512)[0] * 512
        assert gt_a != gt_b
        assert data[gt_a:gt_a + 2048] == data[gt_b:gt_b + 2048]
        assert any(data[gt_a:gt_a + 2048])


def test_stream_writes_are_refused(tmp_path: Path) -> None:
    """The ESXi sample: its last grain is written already."""
    image = esxi_sample(tmp_path)
    with pytest.raises(Unsupported, match="in order"):
        write_through_api(image, [(0, b"x" * 512)])


def test_extent_outside_the_directory_is_read_only(tmp_path: Path) -> None:
    (tmp_path / "f.vmdk").write_bytes(bytes(MiB))
    (tmp_path / "sub").mkdir()
    image = tmp_path / "sub" / "d.vmdk"
    image.write_text('# Disk DescriptorFile\nversion=1\ncreateType="monolithicFlat"\n'
                     'RW 2048 FLAT "../f.vmdk" 0\n')
    assert imgfs_raw(image) == bytes(MiB)
    with pytest.raises(ReadOnly, match="outside"):
        write_through_api(image, [(0, b"x")])


# -- create and convert -------------------------------------------------------------------------

def without_cids(data: bytes) -> bytes:
    """The file with its random CID left out (in an embedded descriptor,
    sectors 1..20, the text after it shifts: its padding is dropped)."""
    def normal(text: bytes) -> bytes:
        return re.sub(rb"\nCID=[0-9a-f]{1,8}\n", b"\nCID=x\n", text)
    if data.startswith(b"KDMV"):
        return data[:512] + normal(data[512:21 * 512].rstrip(b"\0")) + data[21 * 512:]
    return normal(data)


def created_files(directory: Path) -> dict[str, bytes | int]:
    """Each file's bytes, or its size when it is large (flat extents are GiB
    of zeros)."""
    return {path.name: without_cids(path.read_bytes()) if path.stat().st_size < MiB
            else path.stat().st_size for path in sorted(directory.iterdir())}


@pytest.mark.parametrize("options", [
    "subformat=monolithicSparse", "subformat=monolithicSparse,zeroed_grain=on,compat6=on",
    "subformat=monolithicFlat,adapter_type=lsilogic",
    "subformat=twoGbMaxExtentSparse,adapter_type=buslogic,hwversion=7",
    "subformat=twoGbMaxExtentFlat,adapter_type=legacyESX,toolsversion=123"])
def test_create_is_byte_equal_to_qemu_img(tmp_path: Path, options: str) -> None:
    """2112 MiB: the split subformats get a second extent."""
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir()
    theirs.mkdir()
    imgfs("create", "-q", "-f", "vmdk", "-o", options, ours / "d.vmdk", "2112M")
    run("qemu-img", "create", "-q", "-f", "vmdk", "-o", options, theirs / "d.vmdk", "2112M")
    assert created_files(ours) == created_files(theirs)
    assert info_json("imgfs", ours / "d.vmdk")["virtual-size"] == 2112 * MiB


@pytest.mark.parametrize("options, message", [
    ("compat6=on,hwversion=6", "compat6 cannot be enabled with hwversion set"),
    ("subformat=monolithicFlat,zeroed_grain=on", "Flat image can't enable zeroed grain"),
    ("subformat=twoGbMaxExtentFlat,backing_file=b.vmdk,backing_fmt=vmdk",
     "Flat image can't have backing file"),
    ("backing_file=b.vmdk,backing_fmt=raw", "backing_file must be a vmdk image"),
    ("backing_fmt=raw", "backing_file must be a vmdk image"),
    ("adapter_type=scsi", "scsi"), ("subformat=sparse", "sparse"),
    ("compat6=maybe", "compat6"), ("zeroed_grain=x", "zeroed_grain"), ("foo=1", "foo")])
def test_create_refuses_as_qemu_img(tmp_path: Path, options: str, message: str) -> None:
    """One line and exit status 1, as qemu-img create; nothing is made."""
    vmdk_create(tmp_path / "b.vmdk", MiB)
    theirs = run("qemu-img", "create", "-f", "vmdk", "-o", options, "q.vmdk", "1M", check=False)
    assert theirs.returncode == 1 and message in theirs.stderr
    ours = imgfs("create", "-f", "vmdk", "-o", options, "i.vmdk", "1M", check=False)
    assert ours.returncode == 1 and message in ours.stderr
    assert len(ours.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "i.vmdk").exists()
    converted = imgfs("convert", "-O", "vmdk", "-o", options, "b.vmdk", "c.vmdk", check=False)
    assert converted.returncode == 1 and message in converted.stderr


def test_create_accepts_what_qemu_img_accepts(tmp_path: Path) -> None:
    """A backing format without a backing file is ignored, as qemu-img does."""
    for tool in ("qemu-img", "imgfs"):
        (tmp_path / tool).mkdir()
        run(tool, "create", "-q", "-f", "vmdk", "-o", "backing_fmt=vmdk,hwversion=abc",
            tmp_path / tool / "d.vmdk", "1M")
    assert created_files(tmp_path / "imgfs") == created_files(tmp_path / "qemu-img")


def test_create_with_backing_file_names_its_cid(tmp_path: Path) -> None:
    base = vmdk_create(tmp_path / "base.vmdk", 2 * MiB)
    vmdk_io(base, "write -P 9 0 1M")
    imgfs("create", "-q", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", "top.vmdk")
    vmdk_io(tmp_path / "top.vmdk", "write -P 8 512k 4k")
    assert qemu_raw(tmp_path / "top.vmdk") == imgfs_raw(tmp_path / "top.vmdk")
    assert info_json("qemu-img", tmp_path / "top.vmdk")["backing-filename"] == "base.vmdk"
    raw = base.with_suffix(".notvmdk")
    raw.write_bytes(bytes(MiB))
    result = imgfs("create", "-f", "vmdk", "-b", raw.name, "-F", "raw", "x.vmdk", check=False)
    assert result.returncode != 0 and "vmdk image" in result.stderr


@pytest.mark.parametrize("subformat", SUBFORMATS + ("streamOptimized",))
def test_convert_to_vmdk(tmp_path: Path, subformat: str) -> None:
    size = 20 * GRAIN + 512
    source = vmdk_create(tmp_path / "src.vmdk", size)
    out_of_order(source, size)
    target = tmp_path / "out.vmdk"
    imgfs("convert", "-O", "vmdk", "-o", f"subformat={subformat}", source, target)
    check_clean(target)
    run("qemu-img", "compare", "-q", "-f", "vmdk", "-F", "vmdk", source, target)
    assert info_json("qemu-img", target)["format-specific"]["data"]["create-type"] == subformat


# -- VMware-style streams -------------------------------------------------------------------

def dissect_vmdk() -> Any:
    """dissect.hypervisor's VMDK reader (an oracle independent of QEMU)."""
    try:
        return importlib.import_module("dissect.hypervisor.disk.vmdk")
    except ImportError:
        if REQUIRE_ORACLES:
            pytest.fail("oracle module not installed: dissect.hypervisor")
        pytest.skip("oracle module not installed: dissect.hypervisor")


def stream_header_of(image: Path) -> SparseHeader:
    return SparseHeader.unpack(image.read_bytes()[:512])


@pytest.mark.parametrize("options", ["", "hwversion=14,adapter_type=lsilogic"])
def test_stream_output_is_vmware_layout_read_by_qemu_and_dissect(tmp_path: Path,
                                                                 options: str) -> None:
    size = 3 * MiB + 512 * KiB
    source = vmdk_create(tmp_path / "src.vmdk", size)
    out_of_order(source, size)
    target = tmp_path / "stream.vmdk"
    imgfs("convert", "-O", "vmdk", "-o", ",".join(filter(None, ["subformat=streamOptimized",
                                                                options])), source, target)
    header = stream_header_of(target)
    assert header.version == 3 and header.gd_offset == (1 << 64) - 1
    assert header.flags & (1 << 16) and header.flags & (1 << 17)
    data = target.read_bytes()
    assert data[-512:] == bytes(512)                       # end-of-stream marker
    assert struct.unpack_from("<QII", data, len(data) - 1536)[2] == 3    # footer marker
    check_clean(target)
    run("qemu-img", "compare", "-q", "-f", "vmdk", "-F", "vmdk", source, target)
    assert info_json("imgfs", target) == info_json("qemu-img", target)
    expected = qemu_raw(source)
    assert streamed(data, size) == expected
    with open(target, "rb") as handle:
        disk = dissect_vmdk().VMDK(handle)
        assert disk.size == size and disk.read(size) == expected
    if options:
        assert b'ddb.virtualHWVersion = "14"' in data and b'"lsilogic"' in data


def test_stream_appends_in_order_and_refuses_going_back(tmp_path: Path) -> None:
    image = tmp_path / "s.vmdk"
    imgfs("create", "-q", "-f", "vmdk", "-o", "subformat=streamOptimized", image, "2M")
    write_through_api(image, [(100, b"a" * 1000), (GRAIN + 5, b"b" * 70000)])
    write_through_api(image, [(5 * GRAIN, b"c" * GRAIN)])       # a second open appends
    expected = bytearray(2 * MiB)
    apply_writes(expected, [(100, b"a" * 1000), (GRAIN + 5, b"b" * 70000),
                            (5 * GRAIN, b"c" * GRAIN)])
    check_clean(image)
    compare_raw(bytes(expected), image)
    with pytest.raises(Unsupported, match="in order"):
        write_through_api(image, [(GRAIN, b"x")])
    compare_raw(bytes(expected), image)


def test_stream_appends_are_readable_at_every_step(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Every write and cut imgfs makes to a VMware-layout stream, replayed
    one at a time (a crash after each): qemu-img checks each state clean and
    reads the old data with a prefix, in write order, of the new grains.
    Small batches and slack make several commits, growths and a give-back."""
    from imgfs.drivers import file as file_driver
    from imgfs.drivers.vmdk import stream as stream_module
    image = tmp_path / "s.vmdk"
    imgfs("create", "-q", "-f", "vmdk", "-o", "subformat=streamOptimized", image, "4M")
    write_through_api(image, [(0, random_bytes(100 * KiB, seed=1))])
    before = image.read_bytes()
    old_content = qemu_raw(image, "old.raw")
    operations: list[tuple[int, bytes | None]] = []
    real_write, real_truncate = file_driver.FileDriver.write, file_driver.FileDriver.truncate

    async def write(self: Any, offset: int, data: bytes) -> None:
        operations.append((offset, bytes(data)))     # (write_past_end comes here too)
        await real_write(self, offset, data)

    async def truncate(self: Any, size: int, preallocation: str = "off") -> None:
        operations.append((size, None))
        await real_truncate(self, size, preallocation)

    monkeypatch.setattr(file_driver.FileDriver, "write", write)
    monkeypatch.setattr(file_driver.FileDriver, "truncate", truncate)
    monkeypatch.setattr(stream_module, "BATCH_BYTES", 100 * KiB)
    monkeypatch.setattr(stream_module, "SLACK_BYTES", 160 * KiB)
    writes = [(2 * GRAIN + 5, random_bytes(5 * GRAIN, seed=2)),
              (MiB, random_bytes(3 * GRAIN, seed=3)), (3 * MiB - 7, random_bytes(9, seed=4))]
    write_through_api(image, writes)
    monkeypatch.undo()
    new_content = bytearray(old_content)
    apply_writes(new_content, writes)
    changed = [index for index in range(len(new_content) // GRAIN)
               if new_content[index * GRAIN:(index + 1) * GRAIN] !=
               old_content[index * GRAIN:(index + 1) * GRAIN]]
    allowed = []
    for count in range(len(changed) + 1):
        state = bytearray(old_content)
        for index in changed[:count]:
            state[index * GRAIN:(index + 1) * GRAIN] = new_content[index * GRAIN:
                                                                   (index + 1) * GRAIN]
        allowed.append(bytes(state))
    crashed = bytearray(before)
    assert len(operations) > 10
    for offset, data in operations:
        if data is None:
            crashed = crashed[:offset].ljust(offset, b"\0")
        else:
            crashed[len(crashed):offset + len(data)] = bytes(max(0, offset + len(data) -
                                                                 len(crashed)))
            crashed[offset:offset + len(data)] = data
        (tmp_path / "crash.vmdk").write_bytes(crashed)
        check_clean(tmp_path / "crash.vmdk")
        assert qemu_raw(tmp_path / "crash.vmdk", "crash.raw") in allowed
    assert qemu_raw(image, "final.raw") == bytes(new_content)
    data = image.read_bytes()
    assert struct.unpack_from("<QII", data, len(data) - 1536)[2] == 3
    footer = SparseHeader.unpack(data[-1024:-512])
    # the slack given back: the footer block follows the one-sector directory
    assert len(data) - 1536 - (footer.gd_offset + 1) * 512 < 4 * KiB
    assert streamed(data, len(new_content)) == bytes(new_content)
    with open(image, "rb") as handle:
        assert dissect_vmdk().VMDK(handle).read(len(new_content)) == bytes(new_content)


def test_stream_grain_continued_after_a_flush(tmp_path: Path) -> None:
    """A flush in the middle of a grain commits what it holds; the rest of
    the grain may still be written (the grain is committed again)."""
    image = tmp_path / "s.vmdk"
    imgfs("create", "-q", "-f", "vmdk", "-o", "subformat=streamOptimized", image, "1M")
    pieces = [(100, b"a" * 1000), (5000, b"b" * 3000), (GRAIN - 10, b"c" * 20)]

    async def main() -> None:
        node = await open_image(str(image), OpenContext(read_only=False))
        try:
            for offset, data in pieces:
                await node.write(offset, data)
                await node.flush()
                assert await node.read(offset, len(data)) == data
        finally:
            await node.aclose()
    trio.run(main)
    expected = bytearray(MiB)
    apply_writes(expected, pieces)
    check_clean(image)
    compare_raw(bytes(expected), image)
    assert streamed(image.read_bytes(), MiB) == bytes(expected)


def streamed(data: bytes, size: int) -> bytes:
    """The disk a streaming reader sees: markers read in order from the
    overhead (grains placed at their lba, metadata skipped by its count)
    to the end-of-stream marker, which must be the last sector."""
    disk = bytearray(size)
    position = SparseHeader.unpack(data[:512]).overhead * 512
    while True:
        count, length = struct.unpack_from("<QI", data, position)
        if length:
            grain = zlib.decompress(data[position + 12:position + 12 + length])
            disk[count * 512:count * 512 + len(grain)] = grain
            position += -(-(12 + length) // 512) * 512
            continue
        kind = struct.unpack_from("<I", data, position + 12)[0]
        if kind == 0 and count == 0:
            break
        position += 512 + count * 512
    assert position == len(data) - 512
    return bytes(disk[:size])


def test_qemu_layout_stream_takes_whole_grains_once_as_qemu(tmp_path: Path) -> None:
    """QEMU's stream (directory in the header): whole grains in any order,
    each once; a partial grain or a second write fails (EIO)."""
    image = vmdk_create(tmp_path / "q.vmdk", MiB, "subformat=streamOptimized")
    vmdk_io(image, f"write -P 1 {2 * GRAIN} {GRAIN}")
    writes = [(5 * GRAIN, b"\x55" * 2 * GRAIN), (0, b"\x66" * GRAIN)]
    write_through_api(image, writes)
    expected = bytearray(MiB)
    apply_writes(expected, [(2 * GRAIN, b"\1" * GRAIN), *writes])
    check_clean(image)
    compare_raw(bytes(expected), image)
    for offset, length in [(0, GRAIN), (7 * GRAIN, 512)]:
        with pytest.raises(Unsupported, match="streamOptimized"):
            write_through_api(image, [(offset, b"x" * length)])
    vmdk_io(image, f"write -P 7 {8 * GRAIN} {GRAIN}")      # QEMU appends after us
    expected[8 * GRAIN:9 * GRAIN] = b"\7" * GRAIN
    compare_raw(bytes(expected), image)


# -- check and human info ------------------------------------------------------------------------

@pytest.mark.parametrize("subformat", SUBFORMATS + ("streamOptimized",))
def test_check_and_human_info_as_qemu_img(tmp_path: Path, subformat: str) -> None:
    image = vmdk_create(tmp_path / "c.vmdk", 2 * MiB, f"subformat={subformat}")
    vmdk_io(image, "write -P 1 0 64k")
    for args in (["check"], ["check", "--output=json"]):
        ours, theirs = imgfs(*args, image, check=False), run("qemu-img", *args, image)
        assert (ours.returncode, ours.stdout) == (0, theirs.stdout)
    assert human_info("imgfs", image) == human_info("qemu-img", image)


def test_check_reports_a_grain_past_eof_as_qemu_img(tmp_path: Path) -> None:
    image = vmdk_create(tmp_path / "e.vmdk", 2 * MiB)
    vmdk_io(image, "write 0 128k")
    data = bytearray(image.read_bytes())
    header = SparseHeader.unpack(bytes(data[:512]))
    gt = struct.unpack_from("<I", data, header.gd_offset * 512)[0] * 512
    struct.pack_into("<I", data, gt + 4, 1 << 28)
    image.write_bytes(bytes(data))
    ours, theirs = imgfs("check", image, check=False), run("qemu-img", "check", image,
                                                           check=False)
    assert ours.returncode == theirs.returncode == 1
    assert ours.stderr.splitlines()[0] == theirs.stderr.splitlines()[0] == \
        "ERROR: cluster offset for sector 128 points after EOF"


def test_first_write_rewrites_a_short_cid_in_a_descriptor_file(tmp_path: Path) -> None:
    """A descriptor file grows or shrinks with its new CID, and still parses."""
    (tmp_path / "f.vmdk").write_bytes(bytes(MiB))
    image = tmp_path / "d.vmdk"
    image.write_text('# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\n'
                     'createType="monolithicFlat"\nRW 2048 FLAT "f.vmdk" 0\n')
    write_through_api(image, [(0, b"\x42" * 512)])
    assert info_json("qemu-img", image)["format-specific"]["data"]["cid"] != 1
    assert qemu_raw(image)[:513] == b"\x42" * 512 + b"\0"


# -- images from other writers ------------------------------------------------------------------

SYSTEM_PYTHON = "/usr/bin/python3"


def need_vmdkstream() -> None:
    """Debian's python3-vmdkstream (a VMware-layout stream writer), run by
    the system Python it is installed for."""
    need(SYSTEM_PYTHON)
    found = run(SYSTEM_PYTHON, "-c", "import VMDKstream", check=False).returncode == 0
    if not found:
        if REQUIRE_ORACLES:
            pytest.fail("oracle module not installed: python3-vmdkstream")
        pytest.skip("oracle module not installed: python3-vmdkstream")


def test_vmdkstream_output_reads_like_qemu(tmp_path: Path) -> None:
    need_vmdkstream()
    raw = tmp_path / "in.raw"
    data = bytearray(3 * MiB)
    rng = random.Random(3)
    for _ in range(20):
        offset = rng.randrange(0, len(data) - 5000)
        data[offset:offset + 5000] = rng.randbytes(5000)
    raw.write_bytes(bytes(data))
    image = tmp_path / "vs.vmdk"
    run(SYSTEM_PYTHON, "-m", "VMDKstream", raw, image)
    assert imgfs_raw(image) == bytes(data) == qemu_raw(image)
    assert map_json("imgfs", image) == map_json("qemu-img", image)


def test_bximage_vmware4_reads_and_writes_like_qemu(tmp_path: Path) -> None:
    need("bximage")
    image = tmp_path / "bx.vmdk"
    run("bximage", "-func=create", "-hd=10M", "-imgmode=vmware4", "-q", image)
    size = info_json("qemu-img", image)["virtual-size"]
    out_of_order(image, size)
    assert_reads_like_qemu(image)
    expected = bytearray(qemu_raw(image))
    writes = writes_out_of_order(size, seed=9)
    write_through_api(image, writes)
    apply_writes(expected, writes)
    check_clean(image)
    compare_raw(bytes(expected), image)


def test_grain_over_a_grain_table_is_refused_not_written(tmp_path: Path) -> None:
    """A hostile grain table placed after the metadata area, one of whose
    entries names the table's own sector: reading or writing that grain is
    refused (a write would rewrite the mapping itself), and the table is
    left as it was."""
    image = tmp_path / "gt.vmdk"
    qemu_create(image, 4 * MiB, fmt="vmdk")
    qemu_io(image, "write -P 0x11 0 64k", fmt="vmdk")
    raw = bytearray(image.read_bytes())
    gtes, _rgd, gd = struct.unpack_from("<IQQ", raw, 44)
    table_sector = struct.unpack_from("<I", raw, gd * 512)[0]
    table = bytearray(raw[table_sector * 512:table_sector * 512 + gtes * 4])
    moved = len(raw) // 512                       # appended, past the data area's start
    struct.pack_into("<I", table, 4, moved)       # grain 1 -> the table itself
    raw += table.ljust(-(-len(table) // 512) * 512, b"\0")
    struct.pack_into("<I", raw, gd * 512, moved)
    image.write_bytes(raw)
    with pytest.raises(CorruptImage, match="overlaps a grain table"):
        write_through_api(image, [(GRAIN + 100, b"\xee" * 512)])
    assert image.read_bytes()[moved * 512:] == bytes(table.ljust(len(raw) - moved * 512, b"\0"))
    refused = imgfs("convert", "-O", "raw", image, tmp_path / "out.raw", check=False)
    assert refused.returncode == 1 and "overlaps a grain table" in refused.stderr
