"""Bochs growing images against QEMU: the sample image Bochs' tools made,
images bximage makes from disks with data, and images written from the
redolog layout (version 1 headers, extents stored out of order, extents
with only some sectors written, catalogs larger than the disk needs).
What imgfs reads (``convert -O raw``, ``info``) is compared with
``qemu-img``; ``map`` with the bitmaps (QEMU's driver reports everything
as data, and says so: one run)."""
from __future__ import annotations

import bz2
import json
from pathlib import Path

import pytest
import trio
from imgfs.drivers.bochs.layout import (
    COMMON,
    DISK_V2,
    HEADER_SIZE,
    Geometry,
    Header,
    bit_run,
    check_header,
)

from imgfs.errors import InvalidImage, Unsupported
from tests.conftest import IMGFS, imgfs, need, qemu_raw, run
from tests.probe_samples import SAMPLE_IMAGES
from tests.roformat_images import (
    BochsLayout,
    KiB,
    MiB,
    bochs_header,
    bximage_empty,
    bximage_growing,
    raw_disk,
)

# -- layout (pure) ------------------------------------------------------------------------


def test_header_struct_sizes() -> None:
    assert COMMON.size == 84 and COMMON.size + DISK_V2.size == 96


@pytest.mark.parametrize("version", [0x00010000, 0x00020000])
def test_header_round_trip(version: int) -> None:
    raw = bochs_header(version, 512, 1024, 2, 8192, 5 * MiB)
    header = Header.unpack(raw)
    assert (header.version, header.catalog, header.bitmap, header.extent, header.disk) == \
        (version, 1024, 2, 8192, 5 * MiB)
    assert header.pack() == raw


def geometry_of(raw: bytes, file_size: int = 1 << 30) -> Geometry:
    return check_header(Header.unpack(raw), file_size)


def test_geometry() -> None:
    geometry = geometry_of(bochs_header(0x00020000, 512, 512, 2, 8192, 3 * MiB + 1000))
    assert geometry.size == 3 * MiB + 512                  # whole sectors, as QEMU
    assert geometry.entries == 385 and geometry.data_offset == 512 + 4 * 512
    assert geometry.bitmap_offset(3) == geometry.data_offset + 3 * (1 + 16) * 512
    assert geometry.sector_offset(0) == geometry.data_offset + 512
    assert geometry.bitmap_bytes == 2


@pytest.mark.parametrize("fields, refusal", [
    ({"subtype": b"Undoable"}, "only growing"),
    ({"version": 0x00030000}, "version 0x30000"),
    ({"extent": 256}, "extent size 256"),
    ({"extent": 12288}, "extent size 12288"),
    ({"extent": 16 * MiB}, "extent size"),
    ({"bitmap": 0}, "bitmap size 0"),
    ({"catalog": 0x100001}, "too large"),
    ({"catalog": 10}, "too small"),
    ({"header_size": 1 << 31}, "past the end"),
])
def test_header_refusals(fields: dict, refusal: str) -> None:
    values = {"version": 0x00020000, "header_size": 512, "catalog": 512, "bitmap": 2,
              "extent": 8192, "disk": 3 * MiB, "subtype": b"Growing"}
    values.update(fields)
    raw = bochs_header(values["version"], values["header_size"], values["catalog"],
                       values["bitmap"], values["extent"], values["disk"],
                       subtype=values["subtype"])
    with pytest.raises((InvalidImage, Unsupported), match=refusal):
        geometry_of(raw, 1 * MiB)


def test_bit_runs() -> None:
    bits = 0b0111_0001
    assert bit_run(bits, 0, 8) == (True, 1)
    assert bit_run(bits, 1, 8) == (False, 3)
    assert bit_run(bits, 4, 8) == (True, 3)
    assert bit_run(bits, 4, 2) == (True, 2)
    assert bit_run(bits, 7, 1) == (False, 1)
    assert bit_run(0, 0, 16) == (False, 16)
    assert bit_run((1 << 16) - 1, 3, 16) == (True, 13)


def test_short_header_is_refused() -> None:
    with pytest.raises(InvalidImage, match="too short"):
        Header.unpack(bytes(HEADER_SIZE - 1))


# -- against QEMU -----------------------------------------------------------------------------


def convert_both(image: Path, workdir: Path) -> bytes:
    """imgfs convert -O raw equal to qemu-img's; the bytes."""
    expected = qemu_raw(image, workdir / "qemu.raw")
    ours = workdir / "imgfs.raw"
    imgfs("convert", "-O", "raw", image, ours)
    assert ours.read_bytes() == expected
    return expected


def assert_info_equal(image: Path) -> None:
    """`info`, JSON and human, equal to qemu-img's (but the disk size line)."""
    ours = imgfs("info", "--output=json", image).stdout
    theirs = run("qemu-img", "info", "-U", "--output=json", image).stdout
    assert json.loads(ours) == json.loads(theirs)

    def human(tool: str) -> list[str]:
        args = ["-U"] if tool == "qemu-img" else []
        text = run(tool, "info", *args, image).stdout
        return [line for line in text.splitlines() if not line.startswith("disk size:")]
    assert human(IMGFS) == human("qemu-img")


def our_map(image: Path) -> list[tuple[int, int, bool]]:
    """(start, length, data) of imgfs map's runs, neighbours merged
    wherever their bytes lie in the file."""
    runs: list[tuple[int, int, bool]] = []
    for entry in json.loads(imgfs("map", "--output=json", image).stdout):
        if runs and runs[-1][2] == entry["data"]:
            start, length, data = runs.pop()
            runs.append((start, length + entry["length"], data))
        else:
            runs.append((entry["start"], entry["length"], entry["data"]))
    return runs


def assert_qemu_maps_all_data(image: Path, size: int) -> None:
    """QEMU's bochs driver has no block status: one data run."""
    theirs = json.loads(run("qemu-img", "map", "-U", "--output=json", image).stdout)
    assert [(entry["start"], entry["length"], entry["data"]) for entry in theirs] == \
        [(0, size, True)]


def data_runs(disk_map: list[tuple[int, int, bool]]) -> list[tuple[int, int]]:
    return [(start, length) for start, length, data in disk_map if data]


def test_sample_image(tmp_path: Path) -> None:
    need("qemu-img")
    image = tmp_path / "empty.bochs"
    image.write_bytes(bz2.decompress((SAMPLE_IMAGES / "empty.bochs.bz2").read_bytes()))
    assert convert_both(image, tmp_path) == bytes(1032192)
    assert_info_equal(image)
    assert our_map(image) == [(0, 1032192, False)]
    assert_qemu_maps_all_data(image, 1032192)


@pytest.mark.parametrize("size", [3 * MiB, 9 * MiB + 4 * KiB])
def test_bximage_growing_image_with_data(tmp_path: Path, size: int) -> None:
    """bximage picks the extent and bitmap sizes from the disk size."""
    need("qemu-img")
    flat = tmp_path / "flat.img"
    disk = raw_disk(flat, size)
    image = tmp_path / "disk.bochs"
    bximage_growing(flat, image)
    assert convert_both(image, tmp_path) == disk
    assert_info_equal(image)
    ours = our_map(image)
    assert_qemu_maps_all_data(image, size)
    # bximage stores the sectors that are not zero: those are our data
    for start, length, data in ours:
        if not data:
            assert not any(disk[start:start + length])
    assert sum(length for _start, length in data_runs(ours)) < size


def test_bximage_empty_image(tmp_path: Path) -> None:
    need("qemu-img")
    image = tmp_path / "empty.bochs"
    bximage_empty(image, 40)
    disk = convert_both(image, tmp_path)
    assert len(disk) > 39 * MiB and not any(disk)
    assert_info_equal(image)
    assert our_map(image) == [(0, len(disk), False)]


#: layouts bximage does not write: version 1, extents stored out of order,
#: half-written extents, a bitmap larger than needed, an odd disk size
LAYOUTS = {
    "v2-out-of-order": BochsLayout(disk=1 * MiB, stored=[(200, 0xFF), (3, 0b1011_0001),
                                                        (0, 0x0F), (255, 0x80)]),
    "v1": BochsLayout(disk=1 * MiB, version=0x00010000, stored=[(1, 0xFF), (0, 0x3C)]),
    "v2-64k-extents": BochsLayout(disk=2 * MiB, extent=64 * KiB,
                                  stored=[(31, (1 << 128) - 1), (2, 0x5555 << 60),
                                          (30, 1 << 127)]),
    "v2-large-bitmap-odd-disk": BochsLayout(disk=1 * MiB + 3 * 512 + 100, bitmap=1024,
                                            stored=[(256, 0b11), (0, 0xFF)],
                                            spare_entries=40),
    "v2-larger-header": BochsLayout(disk=256 * KiB, header_size=1024,
                                    stored=[(5, 0xF0), (6, 0x0F)]),
}


def expected_runs(layout: BochsLayout) -> list[tuple[int, int]]:
    """(start, length) of the written sectors, neighbours merged."""
    sectors = layout.extent // 512
    written = sorted(guest * layout.extent + sector * 512
                     for guest, bits in layout.stored for sector in range(sectors)
                     if bits >> sector & 1 and guest * layout.extent + sector * 512
                     < layout.disk // 512 * 512)
    runs: list[list[int]] = []
    for start in written:
        if runs and runs[-1][0] + runs[-1][1] == start:
            runs[-1][1] += 512
        else:
            runs.append([start, 512])
    return [(start, length) for start, length in runs]


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_layouts_bximage_does_not_write(tmp_path: Path, name: str) -> None:
    need("qemu-img")
    layout = LAYOUTS[name]
    image = tmp_path / "disk.bochs"
    disk = layout.write(image)
    assert convert_both(image, tmp_path) == disk
    if name in ("v1", "v2-large-bitmap-odd-disk"):       # (the sizes as QEMU takes them)
        assert_info_equal(image)
    assert data_runs(our_map(image)) == expected_runs(layout)


def test_extents_past_the_end_of_the_file_read_as_zeros(tmp_path: Path) -> None:
    """As QEMU: a catalog entry far past the end, and a file cut inside an
    extent (its bitmap read, its sectors partly gone)."""
    need("qemu-img")
    image = tmp_path / "cut.bochs"
    layout = BochsLayout(disk=1 * MiB, stored=[(0, 0xFF), (1, 0xFF)])
    layout.write(image)
    data = bytearray(image.read_bytes())
    catalog = layout.header_size
    data[catalog + 4 * 9:catalog + 4 * 10] = (100000).to_bytes(4, "little")
    image.write_bytes(data[:-1000])
    disk = convert_both(image, tmp_path)
    assert disk[4 * KiB:8 * KiB - 1024] != bytes(3 * KiB) and disk[-(8 * KiB):] == bytes(8 * KiB)


def test_convert_to_qcow2(tmp_path: Path) -> None:
    need("qemu-img")
    flat = tmp_path / "flat.img"
    raw_disk(flat, 3 * MiB, seed=5)
    image = tmp_path / "disk.bochs"
    bximage_growing(flat, image)
    target = tmp_path / "copy.qcow2"
    imgfs("convert", "-O", "qcow2", image, target)
    run("qemu-img", "compare", "-f", "bochs", "-F", "qcow2", image, target)
    run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", flat, target)


def test_read_only_format(tmp_path: Path) -> None:
    """Not created, not written, not resized: one line naming the format."""
    image = tmp_path / "disk.bochs"
    BochsLayout(disk=1 * MiB, stored=[(0, 0xFF)]).write(image)
    before = image.read_bytes()
    result = imgfs("create", "-f", "bochs", tmp_path / "new.bochs", "1M", check=False)
    assert (result.returncode, result.stderr) == \
        (1, "imgfs: format 'bochs' does not support image creation\n")
    assert not (tmp_path / "new.bochs").exists()
    result = imgfs("resize", image, "2M", check=False)
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "bochs" in result.stderr
    assert image.read_bytes() == before
    listing = imgfs("formats").stdout
    assert "\n  bochs        ro " in listing
    # neither tool checks the format (qemu-img check's exit status 63)
    assert imgfs("check", image, check=False).returncode == 63
    assert run("qemu-img", "check", image, check=False).returncode == 63


def test_probe_and_subtypes(tmp_path: Path) -> None:
    """An undoable redolog is recognised (never raw) and refused in one line."""
    image = tmp_path / "undo.bochs"
    image.write_bytes(bochs_header(0x00020000, 512, 512, 1, 4096, 1 * MiB,
                                   subtype=b"Undoable") + bytes(2048))
    result = imgfs("info", image, check=False)
    assert (result.returncode, result.stderr) == (
        1, f"imgfs: {image}: Bochs 'Undoable' redologs are not supported (only growing "
        "images)\n")


def test_block_status_in_process(tmp_path: Path) -> None:
    """The bitmaps are read once each (cached) however the disk is walked."""
    from imgfs.graph import open_image
    from imgfs.node import OpenContext
    layout = LAYOUTS["v2-out-of-order"]
    image = tmp_path / "disk.bochs"
    disk = layout.write(image)

    async def main() -> None:
        node = await open_image(str(image), OpenContext(read_only=True))
        try:
            driver = node.driver
            for offset in range(0, node.size, 4 * KiB):
                assert await node.read(offset, 4 * KiB) == disk[offset:offset + 4 * KiB]
            assert len(driver.bitmaps) == len(layout.stored)
        finally:
            await node.aclose()
    trio.run(main)
