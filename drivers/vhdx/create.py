"""New VHDX images as qemu-img lays them out (pure, no I/O): the pieces
to write and the file's length, for dynamic, fixed and differencing
images, with qemu-img's options, defaults and rounding."""
from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from imgfs.errors import UsageError
from imgfs.options import Bool, Opt, Schema, Size, Str, choice

from .layout import (
    BAT_GUID,
    FILE_PARAMETERS,
    HAS_PARENT,
    HEADER_AREA,
    HEADER_OFFSETS,
    HEADER_SIGNATURE,
    HEADER_SIZE,
    IS_REQUIRED,
    IS_VIRTUAL_DISK,
    LOG_VERSION,
    LOGICAL_SECTOR_SIZE,
    MAX_BLOCK_SIZE,
    MAX_VIRTUAL_SIZE,
    METADATA_ENTRY,
    METADATA_GUID,
    METADATA_HEADER,
    METADATA_SIGNATURE,
    METADATA_TABLE_SIZE,
    MIN_BLOCK_SIZE,
    PAGE83_DATA,
    PARENT_LOCATOR,
    PAYLOAD_BLOCK_FULLY_PRESENT,
    PAYLOAD_BLOCK_NOT_PRESENT,
    PAYLOAD_BLOCK_ZERO,
    PHYSICAL_SECTOR_SIZE,
    REGION_ENTRY,
    REGION_HEADER,
    REGION_SIGNATURE,
    REGION_TABLE_OFFSETS,
    REGION_TABLE_SIZE,
    SIGNATURE,
    VERSION,
    VIRTUAL_DISK_SIZE,
    Geometry,
    Header,
    MiB,
    Region,
    TiB,
    build_parent_locator,
    checksummed,
    format_linkage,
    make_entry,
)

DEFAULT_LOG_SIZE = 1 * MiB
#: qemu-img leaves this much room between the metadata region and the
#: first payload block
PAYLOAD_GAP = 4 * MiB
CREATOR = "imgfs"
METADATA_ITEM_FLAGS = {FILE_PARAMETERS: IS_REQUIRED, PARENT_LOCATOR: IS_REQUIRED}


def round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def default_block_size(size: int) -> int:
    """qemu-img's choice when block_size is 0 (auto)."""
    if size > 32 * TiB:
        return 64 * MiB
    if size > 100 * (1 << 30):
        return 32 * MiB
    if size > 1 << 30:
        return 16 * MiB
    return 8 * MiB


def create_block_size(requested: int, size: int) -> int:
    """As qemu-img: 0 is auto; otherwise rounded up to whole MiB, held to
    1..256 MiB, and then it must be a power of two."""
    if not requested:
        return default_block_size(size)
    block_size = min(max(round_up(requested, MiB), MIN_BLOCK_SIZE), MAX_BLOCK_SIZE)
    if block_size & (block_size - 1):
        raise UsageError("Block size must be a power of two")
    return block_size


def metadata_region(geometry: Geometry, physical_sector_size: int, page83: bytes,
                    locator: bytes = b"") -> bytes:
    """The metadata table and its items, as qemu-img lays them out: the
    items one after the other from 64 KiB (a differencing image's parent
    locator last)."""
    items = [
        (FILE_PARAMETERS, struct.pack("<II", geometry.block_size,
                                      HAS_PARENT if geometry.has_parent else 0)),
        (VIRTUAL_DISK_SIZE, struct.pack("<Q", geometry.virtual_size)),
        (PAGE83_DATA, page83),
        (LOGICAL_SECTOR_SIZE, struct.pack("<I", geometry.logical_sector_size)),
        (PHYSICAL_SECTOR_SIZE, struct.pack("<I", physical_sector_size)),
    ]
    if locator:
        items.append((PARENT_LOCATOR, locator))
    table = bytearray(METADATA_TABLE_SIZE)
    METADATA_HEADER.pack_into(table, 0, METADATA_SIGNATURE, 0, len(items))
    data = bytearray()
    for index, (item_id, value) in enumerate(items):
        flags = METADATA_ITEM_FLAGS.get(item_id, IS_VIRTUAL_DISK | IS_REQUIRED)
        METADATA_ENTRY.pack_into(table, METADATA_HEADER.size + index * METADATA_ENTRY.size,
                                 item_id.bytes_le, METADATA_TABLE_SIZE + len(data),
                                 len(value), flags)
        data += value
    return bytes(table + data)


@dataclass(frozen=True, slots=True)
class Parent:
    """What a new differencing image records of its parent."""

    relative_path: str
    data_write_guid: bytes
    logical_sector_size: int
    physical_sector_size: int


def region_table(bat: Region, metadata: Region) -> bytes:
    table = bytearray(REGION_TABLE_SIZE)
    REGION_HEADER.pack_into(table, 0, REGION_SIGNATURE, 0, 2, 0)
    for index, region in enumerate((bat, metadata)):
        REGION_ENTRY.pack_into(table, REGION_HEADER.size + index * REGION_ENTRY.size,
                               region.guid.bytes_le, region.offset, region.length,
                               int(region.required))
    return checksummed(table)


def new_image(size: int, options: dict[str, Any], guids: Callable[[], bytes],
              parent: Parent | None = None) -> tuple[list[tuple[int, bytes]], int]:
    """The (offset, bytes) pieces of a new image (the first at offset 0,
    then the BAT and the metadata), and the file's length: qemu-img's
    layout (log after the first MiB, then the BAT, then the metadata
    region; a fixed image's blocks after a gap).  A differencing image
    (`parent`) takes its parent's sector sizes, and every block reads
    through to the parent."""
    if size > MAX_VIRTUAL_SIZE:
        raise UsageError("Image size too large; max of 64TB")
    logical, physical = (parent.logical_sector_size, parent.physical_sector_size) \
        if parent else (512, 512)
    size = round_up(size, logical)
    log_size = round_up(options["log_size"], MiB)
    if log_size < MiB:
        raise UsageError("Log size must be at least 1 MiB")
    block_size = create_block_size(options["block_size"], size)
    geometry = Geometry(block_size, logical, size, parent is not None)
    bat = Region(BAT_GUID, HEADER_AREA + log_size,
                 round_up(geometry.bat_entries * 8, MiB) or MiB, False)
    metadata = Region(METADATA_GUID, bat.end, MiB, False)
    payload_start = metadata.end + PAYLOAD_GAP
    fixed = options["subformat"] == "fixed"
    if fixed and parent:
        raise UsageError("a differencing VHDX image cannot be fixed")
    entries = fixed_bat(geometry, payload_start, options["block_state_zero"]) if fixed \
        else dynamic_bat(geometry, options["block_state_zero"] and not parent)
    head = bytearray(REGION_TABLE_OFFSETS[1] + REGION_TABLE_SIZE)
    head[:len(SIGNATURE)] = SIGNATURE
    creator = CREATOR.encode("utf-16-le")
    head[8:8 + len(creator)] = creator
    file_guid = guids()
    for number, offset in enumerate(HEADER_OFFSETS):
        header = Header(HEADER_SIGNATURE, 0, number, file_guid, guids(), bytes(16),
                        LOG_VERSION, VERSION, log_size, HEADER_AREA)
        head[offset:offset + HEADER_SIZE] = header.pack()
    for offset in REGION_TABLE_OFFSETS:
        head[offset:offset + REGION_TABLE_SIZE] = region_table(bat, metadata)
    locator = build_parent_locator({
        "parent_linkage": format_linkage(parent.data_write_guid),
        "relative_path": parent.relative_path.replace("/", "\\")}) if parent else b""
    pieces = [(0, bytes(head)), (bat.offset, entries),
              (metadata.offset, metadata_region(geometry, physical, guids(), locator))]
    # (a fixed image's last block is cut at the virtual size, as qemu-img does)
    length = payload_start + (size if fixed else 0)
    return pieces, length


def dynamic_bat(geometry: Geometry, block_state_zero: bool) -> bytes:
    """qemu-img marks the blocks of a new dynamic image zero (not present
    with block_state_zero=off)."""
    state = PAYLOAD_BLOCK_ZERO if block_state_zero else PAYLOAD_BLOCK_NOT_PRESENT
    entries = [0] * geometry.bat_entries
    for block in range(geometry.data_blocks):
        entries[geometry.payload_index(block)] = state
    return struct.pack(f"<{len(entries)}Q", *entries)


def fixed_bat(geometry: Geometry, payload_start: int, block_state_zero: bool) -> bytes:
    """Every block preallocated in order; qemu-img still marks them zero
    (with no offset) under block_state_zero=on."""
    entries = [0] * geometry.bat_entries
    for block in range(geometry.data_blocks):
        entries[geometry.payload_index(block)] = PAYLOAD_BLOCK_ZERO if block_state_zero \
            else make_entry(PAYLOAD_BLOCK_FULLY_PRESENT,
                            payload_start + block * geometry.block_size)
    return struct.pack(f"<{len(entries)}Q", *entries)


CREATE_OPTS = Schema(
    Opt("log_size", Size, default=DEFAULT_LOG_SIZE, help="Log size; min 1MB."),
    Opt("block_size", Size, default=0,
        help="Block Size; min 1MB, max 256MB. 0 means auto-calculate based on image size."),
    Opt("subformat", choice("dynamic", "fixed"), default="dynamic",
        help="VHDX format type, can be either 'dynamic' or 'fixed'. Default is 'dynamic'."),
    Opt("block_state_zero", Bool, default=True,
        help="Force use of payload blocks of type 'ZERO'."),
    Opt("backing_file", Str, help="parent image of a differencing image (a VHDX)"),
    Opt("backing_fmt", choice("vhdx"), help="format of the parent (vhdx)"),
)


