"""New VMDK images as qemu-img makes them (pure, no I/O).

`qemu-img create -f vmdk` writes, for a sparse extent: the header, the
descriptor in sectors 1..20 (empty in the extent files of a
twoGbMaxExtentSparse disk), the redundant grain directory at sector 21
followed by its grain tables, then the grain directory and its tables,
everything up to a whole grain (the overhead); for flat extents, a file
of the extent's size; for split disks, extents of at most 2 GiB named
``NAME-s001.vmdk`` / ``NAME-f001.vmdk``; for a monolithicFlat disk
``NAME-flat.vmdk``.  The descriptor's text, geometry and disk database are
qemu-img's, byte for byte (tests/drivers/test_vmdk.py compares them).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from imgfs.errors import OptionRefused
from imgfs.mapped import align_up
from imgfs.options import Bool, Opt, Schema, Str, choice

from .layout import (
    COMPRESSION_DEFLATE,
    FLAG_COMPRESSED,
    FLAG_MARKERS,
    FLAG_REDUNDANT_GT,
    FLAG_VALID_NEWLINE,
    FLAG_ZEROED_GRAIN_GTE,
    SECTOR,
    VMDK4_MAGIC,
    SparseHeader,
)

SUBFORMATS = ("monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse",
              "twoGbMaxExtentFlat", "streamOptimized")
ADAPTER_TYPES = ("ide", "buslogic", "lsilogic", "legacyESX")
#: qemu-img's new sparse extents
GRAIN_SECTORS = 128
GTES_PER_GT = 512
DESCRIPTOR_SECTORS = 20
#: extents of a twoGbMaxExtent* disk
SPLIT_SECTORS = (2 << 30) // SECTOR
DEFAULT_TOOLS_VERSION = "2147483647"
NEWLINE_CHARS = b"\n \r\n"

CREATE_OPTS = Schema(
    Opt("adapter_type", choice(*ADAPTER_TYPES), default="ide",
        help="virtual adapter type: ide, lsilogic, buslogic or legacyESX"),
    Opt("backing_file", Str, help="file name of a base image"),
    Opt("backing_fmt", Str, help="must be 'vmdk' if present"),
    Opt("compat6", Bool, default=False, help="VMDK version 6 image"),
    Opt("hwversion", Str, help="VMDK hardware version (default 4, 6 with compat6)"),
    Opt("subformat", choice(*SUBFORMATS), default="monolithicSparse",
        help="monolithicSparse, monolithicFlat, twoGbMaxExtentSparse, "
             "twoGbMaxExtentFlat or streamOptimized"),
    Opt("toolsversion", Str, help=f"VMware guest tools version (default "
                                  f"{DEFAULT_TOOLS_VERSION})"),
    Opt("zeroed_grain", Bool, default=False,
        help="efficient zero writes with the zeroed-grain GTE feature"),
)


def check_create_options(options: dict[str, Any]) -> None:
    """qemu-img's refusals, with its words and its exit status (1); a
    backing_fmt without a backing_file is ignored, as qemu-img does."""
    flat = options["subformat"] in ("monolithicFlat", "twoGbMaxExtentFlat")
    if options["compat6"] and options["hwversion"]:
        raise OptionRefused("compat6 cannot be enabled with hwversion set")
    if options["backing_fmt"] and options["backing_fmt"] != "vmdk":
        raise OptionRefused("backing_file must be a vmdk image")
    if flat and options["backing_file"]:
        raise OptionRefused("Flat image can't have backing file")
    if flat and options["zeroed_grain"]:
        raise OptionRefused("Flat image can't enable zeroed grain")


@dataclass(frozen=True, slots=True)
class PlannedExtent:
    filename: str      # beside the descriptor
    sectors: int
    sparse: bool


def plan_extents(target: str, sectors: int, subformat: str) -> list[PlannedExtent]:
    """The extent files of a new disk (the embedded extent is the target)."""
    directory, name = os.path.split(target)
    stem, dot, suffix = name.rpartition(".")
    if not dot:
        stem, suffix = name, ""
    else:
        suffix = "." + suffix
    if subformat in ("monolithicSparse", "streamOptimized"):
        return [PlannedExtent(name, sectors, True)]
    if subformat == "monolithicFlat":
        return [PlannedExtent(f"{stem}-flat{suffix}", sectors, False)]
    sparse = subformat == "twoGbMaxExtentSparse"
    letter = "s" if sparse else "f"
    planned = []
    for number, start in enumerate(range(0, max(sectors, 1), SPLIT_SECTORS), start=1):
        planned.append(PlannedExtent(f"{stem}-{letter}{number:03d}{suffix}",
                                     min(SPLIT_SECTORS, sectors - start), sparse))
    return planned


def geometry(sectors: int, adapter_type: str) -> tuple[int, int]:
    """(cylinders, heads) of ddb.geometry: qemu-img's, 63 sectors a track."""
    heads = 16 if adapter_type == "ide" else 255
    return sectors // (heads * 63), heads


def descriptor_text(*, cid: int, parent_cid: int, create_type: str, parent_hint: str,
                    extents: list[PlannedExtent], sectors: int,
                    options: dict[str, Any]) -> bytes:
    """The descriptor, laid out as qemu-img writes it."""
    lines = []
    for extent in extents:
        kind = "SPARSE" if extent.sparse else "FLAT"
        offset = "" if extent.sparse else " 0"
        lines.append(f'RW {extent.sectors} {kind} "{extent.filename}"{offset}\n')
    hwversion = options["hwversion"] or ("6" if options["compat6"] else "4")
    cylinders, heads = geometry(sectors, options["adapter_type"])
    parent_line = f'parentFileNameHint="{parent_hint}"' if parent_hint else ""
    return (f"# Disk DescriptorFile\nversion=1\nCID={cid:x}\nparentCID={parent_cid:x}\n"
            f'createType="{create_type}"\n{parent_line}\n# Extent description\n'
            f"{''.join(lines)}\n# The Disk Data Base\n#DDB\n\n"
            f'ddb.virtualHWVersion = "{hwversion}"\n'
            f'ddb.geometry.cylinders = "{cylinders}"\n'
            f'ddb.geometry.heads = "{heads}"\n'
            f'ddb.geometry.sectors = "63"\n'
            f'ddb.adapterType = "{options["adapter_type"]}"\n'
            f'ddb.toolsVersion = "{options["toolsversion"] or DEFAULT_TOOLS_VERSION}"\n'
            ).encode()


def new_sparse_extent(sectors: int, descriptor: bytes, *, zeroed_grain: bool = False,
                      stream: bool = False) -> tuple[bytes, int]:
    """(head, file length) of a new sparse extent: header, descriptor,
    redundant directory and tables, directory and tables, as qemu-img."""
    gd_entries = -(-sectors // (GRAIN_SECTORS * GTES_PER_GT))
    gd_sectors = -(-gd_entries * 4 // SECTOR)
    gt_sectors = GTES_PER_GT * 4 // SECTOR
    tables = gd_entries * gt_sectors
    rgd_offset = 1 + DESCRIPTOR_SECTORS
    gd_offset = rgd_offset + gd_sectors + tables
    overhead = align_up(gd_offset + gd_sectors + tables, GRAIN_SECTORS)
    flags = FLAG_VALID_NEWLINE | FLAG_REDUNDANT_GT
    version = 1
    if zeroed_grain:
        flags |= FLAG_ZEROED_GRAIN_GTE
        version = 2
    if stream:
        flags |= FLAG_COMPRESSED | FLAG_MARKERS
        version = 3
    if len(descriptor) > DESCRIPTOR_SECTORS * SECTOR:
        raise OptionRefused(f"VMDK descriptor of {len(descriptor)} bytes does not fit in "
                         f"{DESCRIPTOR_SECTORS} sectors (backing file name too long?)")
    header = SparseHeader(VMDK4_MAGIC, version, flags, sectors, GRAIN_SECTORS, 1,
                          DESCRIPTOR_SECTORS, GTES_PER_GT, rgd_offset, gd_offset, overhead, 0,
                          NEWLINE_CHARS, COMPRESSION_DEFLATE if stream else 0)
    head = bytearray(gd_offset * SECTOR + gd_sectors * SECTOR)
    head[:SECTOR] = header.pack()
    head[SECTOR:SECTOR + len(descriptor)] = descriptor
    for directory in (rgd_offset, gd_offset):
        first_table = directory + gd_sectors
        for index in range(gd_entries):
            entry = first_table + index * gt_sectors
            head[directory * SECTOR + index * 4:directory * SECTOR + index * 4 + 4] = \
                entry.to_bytes(4, "little")
    return bytes(head), overhead * SECTOR
