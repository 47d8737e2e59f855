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
import json
import struct
from pathlib import Path

import pytest
import trio
from imgfs.drivers.vmdk.descriptor import parse_descriptor
from imgfs.drivers.vmdk.layout import (
    SPARSE_HEADER,
    SparseHeader,
    check_sparse_header,
    probe,
)

from imgfs.errors import InvalidImage, Unsupported
from imgfs.graph import open_image
from imgfs.node import OpenContext
from tests.conftest import imgfs, need
from tests.drivers.test_qed import imgfs_raw, info_json, map_json, qemu_create, qemu_io, run

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


def test_sesparse_is_refused_in_one_line(tmp_path: Path) -> None:
    image = tmp_path / "se.vmdk"
    image.write_bytes(struct.pack("<QQQQQ", 0xCAFEBABE, 0x200000001, 8192, 8, 64)
                      .ljust(4096, b"\0"))
    assert "seSparse" in refusal(image)


def test_cowd_extent_reads_zeros_and_info(tmp_path: Path) -> None:
    image = tmp_path / "delta.vmdk"
    head = struct.pack("<4sIIIIIII", b"COWD", 1, 3, 8192, 16, 40, 1, 5).ljust(512, b"\0")
    image.write_bytes((head + b"CID=12345678\nparentCID=ffffffff\n").ljust(41 * 512, b"\0"))
    assert imgfs_raw(image) == qemu_raw(image)
    assert info_json("imgfs", image) == info_json("qemu-img", image)


def test_info_json_names_extents(tmp_path: Path) -> None:
    image = vmdk_create(tmp_path / "t.vmdk", 3 * MiB, "subformat=twoGbMaxExtentFlat")
    report = json.loads(imgfs("info", "--output=json", image).stdout)
    extents = report["format-specific"]["data"]["extents"]
    assert [extent["format"] for extent in extents] == ["FLAT"]
