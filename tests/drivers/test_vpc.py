"""VHD (vpc) against qemu-img / qemu-io.

Images are made by ``qemu-img create -f vpc`` (dynamic and fixed), filled
by qemu-io out of order, or crafted from them (other creator applications,
geometries and sizes); what imgfs reads (``convert -O raw``, ``map``,
``info``) is compared with what qemu-img says about the same image, and
what imgfs writes, creates or converts is judged by ``qemu-img compare``
(QEMU has no check for VHD) and by qemu-img's ``info``.
"""
from __future__ import annotations

import bz2
import json
from pathlib import Path
from typing import Any

import pytest
import trio
from imgfs.drivers.vpc.layout import (
    DYNAMIC_HEADER,
    FOOTER,
    DynamicHeader,
    Footer,
    chs_geometry,
    create_geometry,
    new_image,
    virtual_size,
)

from imgfs.errors import InvalidImage
from imgfs.graph import open_image
from imgfs.node import OpenContext
from tests.conftest import imgfs, need, random_bytes, write_through_api
from tests.drivers.test_qed import qemu_create as qed_qemu_create
from tests.drivers.test_qed import qemu_io as qed_qemu_io
from tests.drivers.test_qed import run

KiB = 1024
MiB = 1024 * KiB
BLOCK = 2 * MiB
SAMPLES = Path("/work/shared/sample-images")


@pytest.fixture(autouse=True)
def _in_workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    need("qemu-img", "qemu-io")
    monkeypatch.chdir(tmp_path)


# -- helpers ------------------------------------------------------------------------------

def qemu_create(image: Path, size: int | str, *options: str) -> Path:
    return qed_qemu_create(image, size, *options, fmt="vpc")


def qemu_io(image: Path, *commands: str) -> None:
    qed_qemu_io(image, *commands, fmt="vpc")


def out_of_order(image: Path, size: int, block: int = BLOCK) -> None:
    """Unaligned, block-crossing, zero and discarded ranges, in no order."""
    qemu_io(image, f"write -P 0x11 {3 * block + 100} {block + 7}",
            f"write -P 0x22 {block // 2} {block}",
            f"write -P 0x33 {size - 300} 300",
            f"write -z {2 * block + 4096} 8192",
            f"write -P 0x44 {block + 1} 3",
            f"discard {3 * block} 4096",
            f"write -P 0x55 17 {block // 4}")


def qemu_raw(image: Path, name: str = "qemu.raw") -> bytes:
    out = image.parent / name
    run("qemu-img", "convert", "-U", "-f", "vpc", "-O", "raw", image, out)
    return out.read_bytes()


def imgfs_raw(image: Path, name: str = "imgfs.raw") -> bytes:
    out = image.parent / name
    imgfs("convert", "-O", "raw", image, out)
    return out.read_bytes()


def compare_raw(expected: bytes, image: Path) -> None:
    raw = image.parent / "expected.raw"
    raw.write_bytes(expected)
    run("qemu-img", "compare", "-q", "-f", "raw", "-F", "vpc", raw, image)


def map_runs(entries: list[dict]) -> list[tuple]:
    """(start, length, zero, data) with neighbours merged: host layout and
    presence (QEMU says present for what reads as zeros) not compared."""
    runs: list[list] = []
    for item in entries:
        values = [item["zero"] and not item["data"], item["data"]]
        if runs and runs[-1][2:] == values:
            runs[-1][1] += item["length"]
        else:
            runs.append([item["start"], item["length"], *values])
    return [tuple(entry) for entry in runs]


def map_json(tool: str, image: Path) -> list[tuple]:
    fmt = ["-f", "vpc"] if tool == "qemu-img" else []
    return map_runs(json.loads(run(tool, "map", "--output=json", *fmt, image).stdout))


def info_json(tool: str, image: Path) -> dict:
    fmt = ["-f", "vpc"] if tool == "qemu-img" else []
    return json.loads(run(tool, "info", "--output=json", *fmt, image).stdout)


def human_info(tool: str, image: Path) -> list[str]:
    """`info` as text, but the disk size (the tools count it differently)."""
    fmt = ["-f", "vpc"] if tool == "qemu-img" else []
    return [line for line in run(tool, "info", *fmt, image).stdout.splitlines()
            if not line.startswith("disk size:")]


def assert_info_agrees(image: Path) -> None:
    ours, theirs = info_json("imgfs", image), info_json("qemu-img", image)
    shared = set(theirs) - {"actual-size"}
    assert {key: ours.get(key) for key in shared} == {key: theirs[key] for key in shared}
    assert human_info("imgfs", image) == human_info("qemu-img", image)


def footers(data: bytes | bytearray) -> list[int]:
    """Offsets of the footer copy (if any) and the footer at the end."""
    found = [0] if data[:8] == b"conectix" else []
    return found + [len(data) - 512]


def craft(source: Path, target: Path, **fields: Any) -> Path:
    """A copy of `source` with footer fields changed (checksums recomputed)."""
    data = bytearray(source.read_bytes())
    for offset in footers(data):
        footer = Footer.unpack(bytes(data[offset:offset + 512]))._replace(**fields)
        data[offset:offset + 512] = footer.pack()
    target.write_bytes(data)
    return target


def patch(image: Path, offset: int, data: bytes) -> None:
    with open(image, "r+b") as handle:
        handle.seek(offset)
        handle.write(data)


def sample(name: str, directory: Path) -> Path:
    target = directory / name
    target.write_bytes(bz2.decompress((SAMPLES / f"{name}.bz2").read_bytes()))
    return target


# -- layout (pure) ------------------------------------------------------------------------

def test_structs_are_their_spec_sizes_and_round_trip() -> None:
    assert FOOTER.size == 512 and DYNAMIC_HEADER.size == 1024
    head, length, footer_raw = new_image(10 * MiB, {"subformat": "dynamic",
                                                     "force_size": False})
    footer = Footer.unpack(footer_raw)
    assert footer.valid_checksum() and Footer.unpack(footer.pack()) == footer
    header = DynamicHeader.unpack(head[512:1536])
    assert DynamicHeader.unpack(header.pack()) == header
    assert length == len(head) + 512 and head[:512] == footer_raw


def test_chs_geometry_follows_the_spec() -> None:
    assert chs_geometry(20480) == (301, 4, 17)
    assert chs_geometry(65535 * 16 * 255 + 1) == (65535, 16, 255)
    assert chs_geometry(65535 * 16 * 63) == (65535 // 255 * 63, 16, 255)
    assert create_geometry(10 * MiB, True) == ((65535, 16, 255), 10 * MiB)


@pytest.mark.parametrize("creator, geometry, current_size", [
    (b"vpc ", (302, 4, 17), 302 * 4 * 17 * 512),
    (b"win ", (302, 4, 17), 10 * MiB + 4096),
    (b"vpc ", (65535, 16, 255), 10 * MiB + 4096),
])
def test_virtual_size_rules(creator: bytes, geometry: tuple[int, int, int],
                            current_size: int) -> None:
    footer = Footer.unpack(new_image(10 * MiB, {"subformat": "fixed",
                                               "force_size": False})[2])
    footer = footer._replace(creator_app=creator, cylinders=geometry[0], heads=geometry[1],
                             sectors_per_track=geometry[2], current_size=10 * MiB + 4096)
    assert virtual_size(footer) == current_size


# -- reading ------------------------------------------------------------------------------

@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_reads_what_qemu_reads(tmp_path: Path, subformat: str) -> None:
    image = qemu_create(tmp_path / "a.vhd", 9 * MiB + 5000, f"subformat={subformat}")
    size = info_json("qemu-img", image)["virtual-size"]
    out_of_order(image, size)
    assert imgfs_raw(image) == qemu_raw(image)
    assert map_json("imgfs", image) == map_json("qemu-img", image)
    assert_info_agrees(image)


def imgfs_size(image: Path) -> int:
    """The disk size imgfs opens `image` with (in process: the matrix below
    is large)."""
    async def main() -> int:
        node = await open_image(str(image), OpenContext(read_only=True))
        try:
            return node.size
        finally:
            await node.aclose()
    return trio.run(main)


CREATORS = [b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0", b"vpc ", b"qemu", b"tap ", b"vbox"]
GEOMETRIES = [(302, 4, 17), (65535, 16, 255), (302, 16, 17)]


@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_virtual_size_as_qemu_by_creator_and_geometry(tmp_path: Path, subformat: str) -> None:
    """The footer's current size (a little below the CHS size, not a
    multiple of a sector) or the CHS size, as QEMU 7.2 picks, for every
    creator QEMU knows and some it does not, and maximal CHS."""
    base = qemu_create(tmp_path / "base.vhd", 10 * MiB, f"subformat={subformat}")
    qemu_io(base, "write -P 0x61 0 64k", f"write -P 0x62 {10 * MiB - 4096} 4096")
    for creator in CREATORS:
        for cylinders, heads, sectors in GEOMETRIES:
            image = craft(base, tmp_path / "c.vhd", creator_app=creator, cylinders=cylinders,
                          heads=heads, sectors_per_track=sectors,
                          current_size=10 * MiB - 8192 + 100)
            expected = run("qemu-img", "info", "--output=json", "-f", "vpc", image,
                           check=False)
            if expected.returncode:     # more CHS than the BAT maps: both refuse
                assert "Page table too small" in expected.stderr
                with pytest.raises(InvalidImage, match="Page table too small"):
                    imgfs_size(image)
                continue
            assert imgfs_size(image) == json.loads(expected.stdout)["virtual-size"], \
                (creator, cylinders, heads, sectors)
    image = craft(base, tmp_path / "c.vhd", creator_app=b"win ",
                  current_size=10 * MiB - 8192 + 100)
    assert imgfs_raw(image) == qemu_raw(image)


@pytest.mark.parametrize("name", ["hyperv2012r2-dynamic.vhd", "virtualpc-dynamic.vhd"])
def test_native_tools_images_read_as_qemu(tmp_path: Path, name: str) -> None:
    image = sample(name, tmp_path)
    assert_info_agrees(image)
    assert map_json("imgfs", image) == map_json("qemu-img", image)


def test_fixed_vhd_is_probed_as_vpc(tmp_path: Path) -> None:
    image = qemu_create(tmp_path / "f.vhd", 3 * MiB, "subformat=fixed")
    assert info_json("imgfs", image)["format"] == "vpc"
    assert info_json("imgfs", image)["virtual-size"] == \
        info_json("qemu-img", image)["virtual-size"]


def test_force_size_calc_open_option(tmp_path: Path) -> None:
    base = qemu_create(tmp_path / "base.vhd", 10 * MiB)
    image = craft(base, tmp_path / "c.vhd", creator_app=b"win ", current_size=9 * MiB)
    for calc in ("chs", "current_size"):
        spec = json.dumps({"driver": "vpc", "force_size_calc": calc,
                           "file": {"driver": "file", "filename": str(image)}})
        assert info_json("imgfs", Path(f"json:{spec}"))["virtual-size"] == \
            info_json("qemu-img", Path(f"json:{spec}"))["virtual-size"]


# -- writing, creating, converting ------------------------------------------------------------

def apply(raw: bytearray, writes: list[tuple[int, bytes]]) -> bytes:
    for offset, data in writes:
        raw[offset:offset + len(data)] = data
    return bytes(raw)


def assert_footers_agree(image: Path) -> None:
    """The footer at the end is intact (and, for a dynamic disk, equal to
    its copy at offset 0)."""
    data = image.read_bytes()
    footer = Footer.unpack(data[-512:])
    assert footer.cookie == b"conectix" and footer.valid_checksum()
    if data[:8] == b"conectix":
        assert data[:512] == data[-512:]


@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_writes_read_back_in_qemu(tmp_path: Path, subformat: str) -> None:
    """Allocating, in-place, unaligned and block-crossing writes, over data
    qemu-io wrote and over unallocated blocks; then qemu-io writes more."""
    image = qemu_create(tmp_path / "w.vhd", 9 * MiB, f"subformat={subformat}")
    qemu_io(image, f"write -P 0x11 {BLOCK + 100} 5000")
    size = info_json("qemu-img", image)["virtual-size"]
    writes = [(BLOCK + 4000, random_bytes(10_000, seed=1)),       # over qemu's data
              (3 * BLOCK - 700, random_bytes(1500, seed=2)),       # two new blocks
              (5, random_bytes(100, seed=3)),
              (size - 9, random_bytes(9, seed=4)),                 # the last, partial block
              (2 * BLOCK, bytes(4096)),                            # zeros
              (BLOCK // 2, random_bytes(BLOCK + 17, seed=5))]      # across blocks
    expected = apply(bytearray(qemu_raw(image)), writes)
    write_through_api(image, writes)
    assert_footers_agree(image)
    compare_raw(expected, image)
    qemu_io(image, f"write -P 0x66 {4 * BLOCK - 3} 6", "write -P 0x67 0 512")
    expected = apply(bytearray(expected), [(4 * BLOCK - 3, b"\x66" * 6), (0, b"\x67" * 512)])
    assert imgfs_raw(image) == expected
    assert map_json("imgfs", image) == map_json("qemu-img", image)


def test_writes_to_the_native_tools_images(tmp_path: Path) -> None:
    for name in ("hyperv2012r2-dynamic.vhd", "virtualpc-dynamic.vhd"):
        image = sample(name, tmp_path)
        size = info_json("qemu-img", image)["virtual-size"]
        writes = [(0, random_bytes(69_632, seed=6)), (size - 4096, random_bytes(4096, seed=7))]
        write_through_api(image, writes)
        assert_footers_agree(image)
        for offset, data in writes:
            assert run_raw_range(image, offset, len(data)) == data


def run_raw_range(image: Path, offset: int, length: int) -> bytes:
    """Bytes of the disk as QEMU reads them, without converting all of it."""
    out = image.parent / "range.raw"
    spec = json.dumps({"driver": "raw", "offset": offset, "size": length,
                       "file": {"driver": "vpc", "file": {"driver": "file",
                                                          "filename": str(image)}}})
    run("qemu-img", "convert", "-U", "-O", "raw", f"json:{spec}", out)
    return out.read_bytes()


CREATE_OPTIONS = [(), ("subformat=fixed",), ("force_size=on",),
                  ("subformat=fixed", "force_size=on")]


def parsed(options: tuple[str, ...]) -> dict[str, Any]:
    return {"subformat": "fixed" if "subformat=fixed" in options else "dynamic",
            "force_size": "force_size=on" in options}


@pytest.mark.parametrize("options", CREATE_OPTIONS)
def test_new_image_is_what_qemu_img_creates(tmp_path: Path, options: tuple[str, ...]) -> None:
    """Same bytes as qemu-img's image but the timestamp, unique id and
    checksums; sizes rounded up to a CHS geometry as qemu-img rounds them."""
    for size in (MiB, 10 * MiB + 1, 100 * MiB - 512, 3 * 1024 * MiB + 12345):
        if "subformat=fixed" in options and size > 200 * MiB:
            continue
        theirs = qemu_create(tmp_path / "theirs.vhd", size, *options)
        head, length, footer = new_image(size, parsed(options))
        ours = bytearray(length)
        ours[:len(head)] = head
        ours[-512:] = footer
        assert without_identity(ours) == without_identity(theirs.read_bytes()), size
        theirs.unlink()


@pytest.mark.parametrize("options", CREATE_OPTIONS)
def test_create_agrees_with_qemu_img(tmp_path: Path, options: tuple[str, ...]) -> None:
    ours, theirs = tmp_path / "ours.vhd", tmp_path / "theirs.vhd"
    run("imgfs", "create", "-q", "-f", "vpc",
        *(["-o", ",".join(options)] if options else []), ours, str(10 * MiB + 1))
    qemu_create(theirs, 10 * MiB + 1, *options)
    assert_info_agrees(ours)
    assert info_json("imgfs", ours)["virtual-size"] == \
        info_json("qemu-img", theirs)["virtual-size"]
    assert without_identity(ours.read_bytes()) == without_identity(theirs.read_bytes())


def without_identity(data: bytes | bytearray) -> bytes:
    """The image with every footer's timestamp, checksum and unique id blanked."""
    image = bytearray(data)
    for offset in footers(image):
        image[offset + 24:offset + 28] = bytes(4)
        image[offset + 64:offset + 84] = bytes(20)
    if image[:8] == b"conectix":
        image[512 + 36:512 + 40] = bytes(4)
    return bytes(image)


def test_create_refuses_what_qemu_refuses(tmp_path: Path) -> None:
    for options in ("subformat=sparse", "force_size=maybe"):
        result = run("imgfs", "create", "-q", "-f", "vpc", "-o", options,
                     tmp_path / "x.vhd", "1M", check=False)
        assert result.returncode != 0 and result.stderr.startswith("imgfs:")
    result = run("imgfs", "create", "-q", "-f", "vpc", "-o", "force_size=on",
                 tmp_path / "x.vhd", "2041G", check=False)
    assert result.returncode != 0 and "2040 GiB" in result.stderr
    assert run("qemu-img", "create", "-q", "-f", "vpc", "-o", "force_size=on",
               tmp_path / "y.vhd", "2041G", check=False).returncode == 1


@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_convert_to_vpc_and_back(tmp_path: Path, subformat: str) -> None:
    raw = tmp_path / "src.raw"
    data = bytearray(5 * MiB)
    data[100:70_000] = random_bytes(69_900, seed=8)
    data[3 * MiB:3 * MiB + 4096] = b"\x5a" * 4096
    raw.write_bytes(data)
    image = tmp_path / "c.vhd"
    run("imgfs", "convert", "-f", "raw", "-O", "vpc", "-o", f"subformat={subformat}", raw,
        image)
    assert_footers_agree(image)
    expected = qemu_raw(image)
    assert expected[:len(data)] == bytes(data) and not any(expected[len(data):])
    assert imgfs_raw(image) == expected
    if subformat == "dynamic":      # blocks with no data were left out
        assert map_json("imgfs", image) == map_json("qemu-img", image)
        assert image.stat().st_size < 3 * BLOCK
