"""Bochs redolog images on disk: header, geometry, bitmaps (pure, no I/O).

See the package docstring for the layout.  Probing imports only this module.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple

from imgfs.errors import InvalidImage, Unsupported
from imgfs.signatures import probe_bochs

MAGIC = b"Bochs Virtual HD Image"
REDOLOG_TYPE = b"Redolog"
GROWING_SUBTYPE = b"Growing"
#: header versions: 2 adds a 32-bit field (the timestamp) before the disk size
VERSION_1 = 0x00010000
VERSION_2 = 0x00020000
SECTOR = 512
#: the header QEMU and bximage write: a whole sector
HEADER_SIZE = 512
#: catalog entry of an extent never written
NOT_ALLOCATED = 0xFFFFFFFF
#: QEMU's limits: a catalog for the largest disk bximage makes (about 8
#: TB), extents of 512 bytes .. 8 MiB
MAX_CATALOG_ENTRIES = 0x100000
MIN_EXTENT_SIZE, MAX_EXTENT_SIZE = SECTOR, 8 * 1024 * 1024

#: magic, type, subtype, version, header size, catalog entries, bitmap
#: bytes, extent bytes; then version 1: disk size (64-bit); version 2:
#: timestamp (32-bit), disk size (64-bit)
COMMON = struct.Struct("<32s16s16sIIIII")
DISK_V1 = struct.Struct("<Q")
DISK_V2 = struct.Struct("<IQ")


def c_string(field: bytes) -> bytes:
    return field.split(b"\0", 1)[0]


class Header(NamedTuple):
    magic: bytes
    type: bytes
    subtype: bytes
    version: int
    header_size: int
    catalog: int          # entries
    bitmap: int           # bytes of each extent's bitmap
    extent: int           # bytes of each extent
    timestamp: int        # version 2 only
    disk: int             # bytes of the disk

    @classmethod
    def unpack(cls, raw: bytes) -> Header:
        if len(raw) < HEADER_SIZE:
            raise InvalidImage(f"file too short for a Bochs header ({len(raw)} bytes)")
        magic, kind, subtype, version, header_size, catalog, bitmap, extent = \
            COMMON.unpack_from(raw)
        if version == VERSION_1:
            timestamp, (disk,) = 0, DISK_V1.unpack_from(raw, COMMON.size)
        else:
            timestamp, disk = DISK_V2.unpack_from(raw, COMMON.size)
        return cls(c_string(magic), c_string(kind), c_string(subtype), version, header_size,
                   catalog, bitmap, extent, timestamp, disk)

    def pack(self) -> bytes:
        common = COMMON.pack(self.magic, self.type, self.subtype, self.version,
                             self.header_size, self.catalog, self.bitmap, self.extent)
        if self.version == VERSION_1:
            tail = DISK_V1.pack(self.disk)
        else:
            tail = DISK_V2.pack(self.timestamp, self.disk)
        return (common + tail).ljust(HEADER_SIZE, b"\0")


def probe(head: bytes, filename: str) -> int:
    """100 for a Bochs redolog header, whatever its subtype and version
    (an undoable redolog or an unknown version is refused at open, never
    taken for raw)."""
    return probe_bochs(head, filename)


def blocks(size: int) -> int:
    """Whole sectors holding `size` bytes (a bitmap, an extent)."""
    return -(-size // SECTOR)


@dataclass(frozen=True, slots=True)
class Geometry:
    """Where the catalog, each extent's bitmap and its sectors lie."""

    catalog_offset: int
    catalog_entries: int       # entries stored
    entries: int               # entries the disk uses (at most those stored)
    extent_size: int
    bitmap_blocks: int
    size: int                  # the disk's bytes, whole sectors

    @property
    def data_offset(self) -> int:
        """The first stored extent follows the whole catalog."""
        return self.catalog_offset + 4 * self.catalog_entries

    @property
    def extent_blocks(self) -> int:
        return blocks(self.extent_size)

    @property
    def sectors_per_extent(self) -> int:
        return self.extent_size // SECTOR

    @property
    def bitmap_bytes(self) -> int:
        """Bytes of a bitmap with one bit per sector of an extent."""
        return -(-self.sectors_per_extent // 8)

    def bitmap_offset(self, entry: int) -> int:
        """Host offset of the bitmap of the extent stored `entry`-th: each
        stored extent is its bitmap's sectors, then its own."""
        stride = (self.bitmap_blocks + self.extent_blocks) * SECTOR
        return self.data_offset + entry * stride

    def sector_offset(self, entry: int) -> int:
        """Host offset of the first sector of the extent stored `entry`-th."""
        return self.bitmap_offset(entry) + self.bitmap_blocks * SECTOR


def is_power_of_two(value: int) -> bool:
    return value > 0 and not value & (value - 1)


def check_header(header: Header, file_size: int) -> Geometry:
    """Every field that sizes an allocation, an offset or a loop, checked
    before any of them is used; one sentence per refusal."""
    if header.magic != MAGIC or header.type != REDOLOG_TYPE:
        raise InvalidImage(f"not a Bochs redolog (magic {header.magic!r}, "
                           f"type {header.type!r})")
    if header.subtype != GROWING_SUBTYPE:
        raise Unsupported(f"Bochs {header.subtype.decode(errors='replace')!r} redologs are "
                          "not supported (only growing images)")
    if header.version not in (VERSION_1, VERSION_2):
        raise Unsupported(f"Bochs redolog version {header.version:#x} is not supported "
                          f"(expected {VERSION_1:#x} or {VERSION_2:#x})")
    extent = header.extent
    if not (is_power_of_two(extent) and MIN_EXTENT_SIZE <= extent <= MAX_EXTENT_SIZE):
        raise InvalidImage(f"extent size {extent} is not a power of two in "
                           f"{MIN_EXTENT_SIZE}..{MAX_EXTENT_SIZE}")
    if header.bitmap == 0:
        raise InvalidImage("bitmap size 0 (expected one bit per sector of an extent)")
    if header.catalog > MAX_CATALOG_ENTRIES:
        raise InvalidImage(f"catalog of {header.catalog} entries is too large (at most "
                           f"{MAX_CATALOG_ENTRIES})")
    size = header.disk // SECTOR * SECTOR       # as QEMU: whole sectors
    entries = -(-size // extent)
    if header.catalog < entries:
        raise InvalidImage(f"catalog of {header.catalog} entries is too small for a "
                           f"{size}-byte disk of {extent}-byte extents ({entries} needed)")
    catalog_end = header.header_size + 4 * header.catalog
    if catalog_end > file_size:
        raise InvalidImage(f"catalog at offset {header.header_size} ({header.catalog} "
                           f"entries) runs past the end of the {file_size}-byte file")
    return Geometry(header.header_size, header.catalog, entries, extent,
                    blocks(header.bitmap), size)


# -- bitmaps (pure) --------------------------------------------------------------------

def bit_run(bits: int, first: int, limit: int) -> tuple[bool, int]:
    """(state, count): sectors `first`, `first` + 1, ... in the same state
    in the bitmap `bits` (bit n: sector n of the extent, least significant
    bit of byte 0 first), at most `limit` of them."""
    rest = bits >> first
    present = bool(rest & 1)
    if present:
        count = ((rest ^ (rest + 1)).bit_length() - 1)      # trailing ones
    else:
        count = (rest & -rest).bit_length() - 1 if rest else limit   # trailing zeros
    return present, min(count, limit)
