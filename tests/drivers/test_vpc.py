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
from tests.conftest import IMGFS, imgfs, need
from tests.conftest import run as run_tool

KiB = 1024
MiB = 1024 * KiB
BLOCK = 2 * MiB
SAMPLES = Path("/work/shared/sample-images")


@pytest.fixture(autouse=True)
def _in_workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    need("qemu-img", "qemu-io")
    monkeypatch.chdir(tmp_path)


# -- helpers ------------------------------------------------------------------------------

def run(tool: str | Path, *args: str | Path, check: bool = True) -> Any:
    """A tool by name; "imgfs" is the one beside this Python."""
    return run_tool(IMGFS if tool == "imgfs" else tool, *args, check=check)


def qemu_create(image: Path, size: int | str, *options: str) -> Path:
    run("qemu-img", "create", "-q", "-f", "vpc",
        *(["-o", ",".join(options)] if options else []), image, str(size))
    return image


def qemu_io(image: Path, *commands: str) -> None:
    args: list[str] = []
    for command in commands:
        args += ["-c", command]
    output = run("qemu-io", "-f", "vpc", *args, image).stdout
    assert "error" not in output.lower() and "failed" not in output.lower(), output


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
