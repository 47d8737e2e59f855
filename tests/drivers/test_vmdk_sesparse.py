"""seSparse extents (ESXi snapshot deltas) against qemu-img and dissect.hypervisor.

No tool here writes seSparse: tests/sesparse_images.py builds the extents
(with and without a monolithicSparse parent made by qemu-img) and the
descriptors naming them.  What imgfs reads (`convert -O raw`, `map`,
`info`, `check`) is compared with qemu-img's answers for the same
descriptor and, where it reads them, with dissect.hypervisor's; every
image is also compared with the bytes the builder meant.  Writes are
refused as QEMU refuses them: the image opens read-only.
"""
from __future__ import annotations

import struct
from pathlib import Path

import pytest
from imgfs.drivers.vmdk.sesparse import (
    CONST_HEADER,
    VOLATILE_HEADER,
    grain_sector,
    table_entry,
)

from imgfs.errors import Unsupported
from tests.conftest import imgfs, need, run, write_through_api
from tests.drivers.test_qed import human_info, imgfs_raw, info_json, map_json
from tests.drivers.test_vmdk import dissect_vmdk, qemu_raw, refusal, vmdk_create, vmdk_io
from tests.sesparse_images import (
    FIELD_OFFSET,
    GT_SPAN_SECTORS,
    UNMAPPED,
    ZERO,
    SeSparse,
    allocated_entry,
    descriptor,
    sesparse_disk,
)

KiB = 1024
MiB = 1024 * KiB
GRAIN = 4 * KiB
#: two grain tables and a bit: the last table is partly past the disk's end
CAPACITY = 2 * GT_SPAN_SECTORS + 16


@pytest.fixture(autouse=True)
def _in_workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    need("qemu-img", "qemu-io")
    monkeypatch.chdir(tmp_path)


def pattern(seed: int, length: int = GRAIN) -> bytes:
    return bytes((seed * 7 + index) % 251 for index in range(length))


def mixed_extent() -> SeSparse:
    """Every entry kind: allocated grains (clusters out of order, some past
    cluster 4096 so both halves of the entry's cluster number count), zero
    and unmapped grains, a short last grain, three grain tables."""
    grains: dict[int, bytes | str | int] = {
        0: pattern(1), 1: pattern(2), 2: pattern(3, 100), 3: ZERO, 5: UNMAPPED,
        4095: pattern(4), 4096: pattern(5), 4097: pattern(6), 6000: ZERO,
        8192: pattern(7), 8193: pattern(8)}
    return SeSparse(CAPACITY, grains, clusters={4096: 5000, 4097: 5001, 8192: 4095, 1: 4200})


def assert_reads_like_qemu(image: Path, expected: bytes) -> None:
    assert qemu_raw(image) == expected
    assert imgfs_raw(image) == expected
    assert map_json("imgfs", image) == map_json("qemu-img", image)
    assert info_json("imgfs", image) == info_json("qemu-img", image)
    assert human_info("imgfs", image) == human_info("qemu-img", image)


# -- layout (pure) -----------------------------------------------------------------------

def test_header_structs_are_one_sector() -> None:
    assert CONST_HEADER.size == VOLATILE_HEADER.size == 512


@pytest.mark.parametrize("cluster", [0, 1, 4095, 4096, 5001, (1 << 40) + 17])
def test_allocated_entry_round_trips(cluster: int) -> None:
    entry = allocated_entry(cluster)
    assert grain_sector(entry, 1000) == 1000 + cluster * 8
    assert table_entry(1000 + cluster * 8, 1000) == entry


def test_entry_kinds() -> None:
    assert grain_sector(0, 99) == 0                         # the parent's
    assert grain_sector(1 << 60, 99) == grain_sector(2 << 60, 99) == 1    # zeros
    assert grain_sector((1 << 60) | 77, 99) == 1
    for bad in (5, 4 << 60, 0xF << 60):
        assert grain_sector(bad, 99) >= 1 << 63


# -- reads against qemu-img ------------------------------------------------------------------

def test_sesparse_reads_like_qemu(tmp_path: Path) -> None:
    extent = mixed_extent()
    image = sesparse_disk(tmp_path, extent)
    assert_reads_like_qemu(image, extent.expected())


def test_empty_sesparse_reads_zeros(tmp_path: Path) -> None:
    extent = SeSparse(GT_SPAN_SECTORS)
    image = sesparse_disk(tmp_path, extent)
    assert_reads_like_qemu(image, bytes(16 * MiB))


def test_capacity_comes_from_the_header_as_qemu(tmp_path: Path) -> None:
    """Two extents whose descriptor lines say other sizes: each is as long
    as its header's capacity."""
    first = SeSparse(GT_SPAN_SECTORS + 8, {0: pattern(1), 4096: pattern(2)})
    second = SeSparse(8 * 100, {1: pattern(3), 99: pattern(4)})
    first.write(tmp_path / "a-sesparse.vmdk")
    second.write(tmp_path / "b-sesparse.vmdk")
    image = descriptor(tmp_path / "two.vmdk", [(8, "a-sesparse.vmdk"),
                                               (1 << 20, "b-sesparse.vmdk")])
    assert_reads_like_qemu(image, first.expected() + second.expected())


def base_image(tmp_path: Path) -> tuple[Path, int]:
    """A monolithicSparse parent made and written by qemu-img; its CID."""
    base = vmdk_create(tmp_path / "base.vmdk", CAPACITY * 512)
    vmdk_io(base, "write -P 0x55 0 128k", f"write -P 0x66 {16 * MiB - 6 * KiB} 20k",
            f"write -P 0x77 {CAPACITY * 512 - 8 * KiB} 8k")
    return base, info_json("qemu-img", base)["format-specific"]["data"]["cid"]


def test_sesparse_over_a_parent_reads_like_qemu(tmp_path: Path) -> None:
    """Unallocated grains show the parent, zero and unmapped ones hide it."""
    base, cid = base_image(tmp_path)
    extent = mixed_extent()
    image = sesparse_disk(tmp_path, extent, name="snap", parent="base.vmdk", parent_cid=cid)
    assert_reads_like_qemu(image, extent.expected(qemu_raw(base, "base.raw")))


def test_chain_of_snapshots_reads_like_qemu(tmp_path: Path) -> None:
    """base (qemu-img) <- seSparse snapshot <- seSparse snapshot."""
    base, cid = base_image(tmp_path)
    first = mixed_extent()
    middle = sesparse_disk(tmp_path, first, name="snap1", parent="base.vmdk", parent_cid=cid,
                           cid=0xABCD0001)
    second = SeSparse(CAPACITY, {1: ZERO, 2: pattern(20), 4097: UNMAPPED, 8193: pattern(21)})
    top = sesparse_disk(tmp_path, second, name="snap2", parent=middle.name,
                        parent_cid=0xABCD0001, cid=0xABCD0002)
    expected = second.expected(first.expected(qemu_raw(base, "base.raw")))
    assert_reads_like_qemu(top, expected)


def test_parent_cid_mismatch_fails_reads_as_qemu(tmp_path: Path) -> None:
    base_image(tmp_path)
    image = sesparse_disk(tmp_path, mixed_extent(), name="snap", parent="base.vmdk",
                          parent_cid=0x1234)
    assert run("qemu-img", "convert", "-O", "raw", image, "q.raw", check=False).returncode
    result = imgfs("convert", "-O", "raw", image, "i.raw", check=False)
    assert result.returncode == 1 and "parent CID" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_dissect_reads_what_imgfs_reads(tmp_path: Path) -> None:
    """An independent reader (it takes an unmapped grain for the parent's,
    where QEMU reads zeros: this extent has none over the parent's data)."""
    base, cid = base_image(tmp_path)
    extent = mixed_extent()
    del extent.grains[5]
    image = sesparse_disk(tmp_path, extent, name="snap", parent="base.vmdk", parent_cid=cid)
    module = dissect_vmdk()
    disk = module.VMDK(image)
    ours = imgfs_raw(image)
    assert disk.size == len(ours)
    assert disk.read(disk.size) == ours


def test_bare_extent_is_refused_in_one_line(tmp_path: Path) -> None:
    """QEMU opens a seSparse extent only through its descriptor, and so
    does imgfs (without it the parent and CIDs are unknown)."""
    sesparse_disk(tmp_path, mixed_extent())
    assert "descriptor" in refusal(tmp_path / "disk-sesparse.vmdk")
    assert run("qemu-img", "info", "-f", "vmdk", "disk-sesparse.vmdk", check=False).returncode


@pytest.mark.parametrize("kind", ["SPARSE", "VMFSSPARSE"])
def test_extent_type_must_match_the_header(tmp_path: Path, kind: str) -> None:
    image = sesparse_disk(tmp_path, mixed_extent())
    image.write_text(image.read_text().replace("SESPARSE", kind))
    assert run("qemu-img", "info", image, check=False).returncode == 1
    assert "does not match" in refusal(image)


# -- read-only, as QEMU ----------------------------------------------------------------------

def test_writes_are_refused_as_qemu(tmp_path: Path) -> None:
    image = sesparse_disk(tmp_path, mixed_extent())
    before = (tmp_path / "disk-sesparse.vmdk").read_bytes()
    qemu = run("qemu-io", "-c", "write 0 4k", image, check=False)
    assert "No write support for seSparse" in qemu.stderr
    with pytest.raises(Unsupported, match="can only be opened read-only"):
        write_through_api(image, [(0, b"x" * 512)])
    for command in (["resize", image, "64M"], ["check", "-r", "all", image]):
        theirs = run("qemu-img", *command, check=False)
        assert theirs.returncode == 1 and "No write support" in theirs.stderr
        ours = imgfs(*command, check=False)
        assert ours.returncode == 1 and len(ours.stderr.strip().splitlines()) == 1
        assert "can only be opened read-only" in ours.stderr
    for command in (["commit", image], ["amend", "-o", "x=1", image]):
        result = imgfs(*command, check=False)
        assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert (tmp_path / "disk-sesparse.vmdk").read_bytes() == before


def test_check_as_qemu_img(tmp_path: Path) -> None:
    """Clean; a grain past the end of the file; an entry of no known type."""
    def both(image: Path) -> list[tuple[int, list[str]]]:
        answers = []
        for tool in ("qemu-img", "imgfs"):
            result = run(tool, "check", image, check=False)
            lines = [line.replace(f"{tool}: ", "").replace(f"{image}: ", "") for line in
                     (result.stdout + result.stderr).splitlines()]
            answers.append((result.returncode, lines))
        return answers

    for grains in ({}, {4097: allocated_entry(1 << 30)}, {4097: 4 << 60}, {4097: 5}):
        extent = mixed_extent()
        extent.grains.update(grains)
        image = sesparse_disk(tmp_path, extent)
        ours, theirs = both(image)
        assert ours == theirs


# -- damage that fails a request, as in QEMU ---------------------------------------------------

def patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(data)


@pytest.mark.parametrize("entry", [5, 4 << 60, 0xF << 60])
def test_bad_grain_table_entry_fails_its_read(tmp_path: Path, entry: int) -> None:
    extent = mixed_extent()
    extent.grains[4098] = entry
    image = sesparse_disk(tmp_path, extent)
    assert run("qemu-img", "convert", "-O", "raw", image, "q.raw", check=False).returncode == 1
    result = imgfs("convert", "-O", "raw", image, "i.raw", check=False)
    assert result.returncode == 1 and "invalid grain table entry" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("entry", [5, 2 << 60, 0x1000000100000000])
def test_bad_grain_directory_entry_fails_its_read(tmp_path: Path, entry: int) -> None:
    extent = mixed_extent()
    image = sesparse_disk(tmp_path, extent)
    layout = extent.layout()
    patch(tmp_path / "disk-sesparse.vmdk", layout["grain_directory_offset"] * 512 + 8,
          struct.pack("<Q", entry))
    assert run("qemu-img", "convert", "-O", "raw", image, "q.raw", check=False).returncode == 1
    result = imgfs("convert", "-O", "raw", image, "i.raw", check=False)
    assert result.returncode == 1 and "invalid grain directory entry 1" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("field, value, message", [
    ("version", 0x200000002, "Unsupported version"),
    ("grain_size", 16, "Unsupported grain size"),
    ("grain_table_size", 128, "Unsupported grain table size"),
    ("flags", 1, "Unsupported flags"),
    ("reserved3", 1, "Unsupported reserved bits"),
    ("volatile_header_offset", 2, "Bad volatile header magic"),
    ("grain_directory_size", 1 << 20, "L1 size too big"),
])
def test_header_fields_refused_as_qemu(tmp_path: Path, field: str, value: int,
                                       message: str) -> None:
    extent = mixed_extent()
    image = sesparse_disk(tmp_path, extent)
    patch(tmp_path / "disk-sesparse.vmdk", FIELD_OFFSET[field], struct.pack("<Q", value))
    qemu = run("qemu-img", "info", image, check=False)
    assert qemu.returncode == 1 and message in qemu.stderr
    refusal(image)


@pytest.mark.parametrize("volatile, message", [
    ((0xCAFEBABE, 0, 1, 0), "Bad volatile header magic"),
    ((0xCAFECAFE, 0, 1, 1), "Replaying journal not supported"),
])
def test_volatile_header_refused_as_qemu(tmp_path: Path, volatile: tuple[int, ...],
                                         message: str) -> None:
    extent = mixed_extent()
    extent.volatile = volatile  # type: ignore[assignment]
    image = sesparse_disk(tmp_path, extent)
    qemu = run("qemu-img", "info", image, check=False)
    assert qemu.returncode == 1 and message in qemu.stderr
    refusal(image)
