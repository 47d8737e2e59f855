"""seSparse extents (ESXi 6.5+ snapshot deltas), read-only, as QEMU reads them.

There is no public VMware specification.  The layout below is the one
public readers describe (dissect.hypervisor's VMDK structures) and the one
QEMU 7.2 accepts (learned by running qemu-img on images built field by
field: tests/sesparse_images.py).  All integers are little-endian 64-bit;
offsets and sizes count 512-byte sectors.

* The constant header (sector 0): magic 0xcafebabe, version 0x200000001,
  capacity, grain size (8 sectors), grain table size (64 sectors: 4096
  entries), flags (0), four reserved fields (0), then (offset, size) pairs
  of the volatile header, the journal header, the journal, the grain
  directory, the grain tables, the free bitmap, the backmap and the grains;
  the rest of the sector is zero.
* The volatile header (at its offset): magic 0xcafecafe, the free grain
  table number, the next transaction number, a replay-journal flag (0: the
  journal holds nothing to replay); the rest of the sector is zero.
* A grain directory entry is 0 (no table) or 0x10000000 in its high 32
  bits and a table number in its low 32 bits: the table sits that many
  grain tables into the grain tables area.
* A grain table entry's top 4 bits are its type: 0 unallocated (the parent
  shows through; the whole entry must be 0), 1 unmapped and 2 zero (both
  read as zeros), 3 allocated: a cluster number whose low 12 bits are the
  entry's bits 48..59 and whose high bits are the entry's bits 0..47; the
  grain sits that many grains into the grains area.  Other types are
  invalid.

QEMU checks every constant and volatile header field above that has a
fixed value (magic, version, sizes, flags, reserved, padding, the replay
flag) and the grain directory's size, and so do `check_header`,
`check_volatile_header` and `header_geometry`; these also refuse (where
QEMU reads zeros) a directory, tables or grains past the end of the file,
and a directory too small for the capacity (QEMU fails the reads past
it).  A bad directory or table entry fails the request that meets it, as
in QEMU.  Nothing is ever written: the driver opens a disk with a
seSparse extent read-only.
"""
from __future__ import annotations

import array
import struct
from typing import Any, NamedTuple

from imgfs.errors import CorruptImage, InvalidImage, ReadOnly, Unsupported
from imgfs.mapped import MapKind, TwoLevelMap
from imgfs.tablecache import TableCodec

from .layout import GTE_ZEROED, SECTOR, Geometry, check_table_range

CONST_MAGIC = 0xCAFEBABE
VOLATILE_MAGIC = 0xCAFECAFE
VERSION = 0x200000001
GRAIN_SECTORS = 8
GT_SECTORS = 64
#: grain directory entries QEMU accepts at most (its L1 size limit)
MAX_GD_ENTRIES = 1 << 25
#: disks larger than this are refused (seSparse's own limit is 64 TB)
MAX_CAPACITY_SECTORS = (64 << 40) // SECTOR
GD_TABLE_TAG = 0x10000000
GTE_TYPE_SHIFT = 60
GTE_UNALLOCATED, GTE_UNMAPPED, GTE_ZERO, GTE_ALLOCATED = 0, 1, 2, 3
#: 64-bit little-endian entries (directory and tables)
CODEC = TableCodec(8, big_endian=False)

CONST_HEADER = struct.Struct("<26Q304s")
VOLATILE_HEADER = struct.Struct("<4Q480s")

#: translated directory entries at or past this sector name no table (a
#: bad entry); translated table entries at or past INVALID_GRAIN are bad
#: entries; allocated grains are clamped below it (they lie past any file)
INVALID_TABLE = 1 << 56
INVALID_GRAIN = 1 << 63
PAST_ANY_FILE = 1 << 62


class ConstHeader(NamedTuple):
    """The constant header (sector 0)."""

    magic: int
    version: int
    capacity: int
    grain_size: int
    grain_table_size: int
    flags: int
    reserved1: int
    reserved2: int
    reserved3: int
    reserved4: int
    volatile_header_offset: int
    volatile_header_size: int
    journal_header_offset: int
    journal_header_size: int
    journal_offset: int
    journal_size: int
    grain_directory_offset: int
    grain_directory_size: int
    grain_tables_offset: int
    grain_tables_size: int
    free_bitmap_offset: int
    free_bitmap_size: int
    backmap_offset: int
    backmap_size: int
    grains_offset: int
    grains_size: int
    pad: bytes

    @classmethod
    def unpack(cls, raw: bytes) -> ConstHeader:
        if len(raw) < CONST_HEADER.size:
            raise InvalidImage(f"file too short for a seSparse header ({len(raw)} bytes)")
        return cls(*CONST_HEADER.unpack_from(raw))

    def pack(self) -> bytes:
        return CONST_HEADER.pack(*self)


class VolatileHeader(NamedTuple):
    """The volatile header (at volatile_header_offset)."""

    magic: int
    free_gt_number: int
    next_txn_seq_number: int
    replay_journal: int
    pad: bytes

    @classmethod
    def unpack(cls, raw: bytes) -> VolatileHeader:
        return cls(*VOLATILE_HEADER.unpack_from(raw.ljust(VOLATILE_HEADER.size, b"\0")))

    def pack(self) -> bytes:
        return VOLATILE_HEADER.pack(*self)


def is_sesparse(head: bytes) -> bool:
    return len(head) >= 8 and struct.unpack_from("<Q", head)[0] == CONST_MAGIC


def check_header(header: ConstHeader) -> None:
    """The constant header's fixed fields, as QEMU checks them."""
    fixed = [("version", header.version, VERSION), ("grain size", header.grain_size,
                                                    GRAIN_SECTORS),
             ("grain table size", header.grain_table_size, GT_SECTORS),
             ("flags", header.flags, 0)]
    if header.magic != CONST_MAGIC:
        raise InvalidImage(f"seSparse constant header magic {header.magic:#x} is not "
                           f"{CONST_MAGIC:#x}")
    for name, value, expected in fixed:
        if value != expected:
            raise Unsupported(f"seSparse {name} {value:#x} is not supported (only "
                              f"{expected:#x})")
    reserved = (header.reserved1, header.reserved2, header.reserved3, header.reserved4)
    if any(reserved) or any(header.pad):
        raise Unsupported("seSparse constant header has non-zero reserved fields or padding")


def header_geometry(header: ConstHeader, file_size: int) -> Geometry:
    """Where the directory, tables and grains are; every offset and count
    that sizes a read or an allocation checked."""
    if header.capacity > MAX_CAPACITY_SECTORS:
        raise InvalidImage(f"seSparse capacity {header.capacity} sectors is larger than "
                           f"64 TiB")
    grain_size = GRAIN_SECTORS * SECTOR
    gtes_per_gt = GT_SECTORS * SECTOR // CODEC.width
    gd_entries = -(-header.capacity // (GRAIN_SECTORS * gtes_per_gt))
    gd_room = header.grain_directory_size * SECTOR // CODEC.width
    if gd_room > MAX_GD_ENTRIES:
        raise InvalidImage(f"seSparse grain directory of {header.grain_directory_size} "
                           f"sectors is too large (at most {MAX_GD_ENTRIES} entries)")
    if gd_room < gd_entries:
        raise InvalidImage(f"seSparse grain directory of {header.grain_directory_size} "
                           f"sectors does not map {header.capacity} sectors (needs "
                           f"{gd_entries} entries)")
    gd_offset = header.grain_directory_offset * SECTOR
    check_table_range("seSparse grain directory", gd_offset, gd_entries * CODEC.width,
                      file_size)
    gd_end = gd_offset + gd_entries * CODEC.width
    for what, sector in (("grain tables", header.grain_tables_offset),
                         ("grains", header.grains_offset)):
        if not 0 < sector * SECTOR <= file_size:
            raise InvalidImage(f"seSparse {what} offset {sector} lies outside the "
                               f"{file_size}-byte file")
    if header.grains_offset * SECTOR < gd_end:
        raise InvalidImage(f"seSparse grains offset {header.grains_offset} lies inside the "
                           "headers or the grain directory")
    return Geometry(grain_size, gtes_per_gt, gd_offset, gd_entries, 0,
                    header.capacity * SECTOR, header.grains_offset * SECTOR,
                    zeroed_grains=True)


def volatile_header_offset(header: ConstHeader, file_size: int) -> int:
    offset = header.volatile_header_offset * SECTOR
    if not 0 < offset <= file_size - VOLATILE_HEADER.size:
        raise InvalidImage(f"seSparse volatile header at sector "
                           f"{header.volatile_header_offset} lies outside the "
                           f"{file_size}-byte file")
    return offset


def check_volatile_header(header: VolatileHeader) -> None:
    if header.magic != VOLATILE_MAGIC:
        raise InvalidImage(f"seSparse volatile header magic {header.magic:#x} is not "
                           f"{VOLATILE_MAGIC:#x}")
    if any(header.pad):
        raise Unsupported("seSparse volatile header has non-zero padding")
    if header.replay_journal:
        raise Unsupported("seSparse image is dirty: replaying its journal is not supported")


def directory_sectors(raw: bytes, header: ConstHeader) -> array.array[int]:
    """The grain directory as the sector of each grain table (0: none,
    INVALID_TABLE and above: a bad entry, refused when a request meets it)."""
    directory = CODEC.decode(raw)
    tables_start = header.grain_tables_offset
    for index, entry in enumerate(directory):
        if not entry:
            continue
        if entry >> 32 == GD_TABLE_TAG:
            directory[index] = tables_start + (entry & 0xFFFFFFFF) * GT_SECTORS
        else:
            directory[index] = INVALID_TABLE + index
    return directory


def grain_sector(entry: int, grains_offset: int) -> int:
    """A grain table entry as the mapped layer reads it: 0 (unallocated),
    GTE_ZEROED (reads zeros), the grain's sector, or INVALID_GRAIN."""
    kind = entry >> GTE_TYPE_SHIFT
    if kind == GTE_UNALLOCATED:
        return 0 if entry == 0 else INVALID_GRAIN
    if kind in (GTE_UNMAPPED, GTE_ZERO):
        return GTE_ZEROED
    if kind != GTE_ALLOCATED:
        return INVALID_GRAIN
    cluster = ((entry >> 48) & 0xFFF) | ((entry & 0xFFFFFFFFFFFF) << 12)
    return min(grains_offset + cluster * GRAIN_SECTORS, PAST_ANY_FILE)


def table_entry(sector: int, grains_offset: int) -> int:
    """The grain table entry that puts a grain at `sector` (the inverse of
    `grain_sector`, for tests and image builders)."""
    cluster = (sector - grains_offset) // GRAIN_SECTORS
    return (GTE_ALLOCATED << GTE_TYPE_SHIFT) | ((cluster & 0xFFF) << 48) | (cluster >> 12)


class SeSparseMap(TwoLevelMap):
    """A seSparse extent's directory and tables: entries translated as they
    are read, never written."""

    def __init__(self, *, grains_offset: int, **options: Any) -> None:
        super().__init__(**options)
        self.grains_offset = grains_offset

    def decode_table(self, raw: bytes) -> array.array[int]:
        grains_offset = self.grains_offset
        return array.array("Q", [grain_sector(entry, grains_offset)
                                 for entry in CODEC.decode(raw)])

    async def set_entries(self, guest_offset: int, values: list[int]) -> None:
        raise ReadOnly("seSparse VMDK extents cannot be written")

    def overlaps_table(self, host_offset: int, length: int) -> bool:
        """(Never written: a grain over a table cannot rewrite the mapping.)"""
        return False


def classifier(file: Any, geometry: Geometry) -> Any:
    """classify() for translated entries; a grain past the end of its file
    or a bad entry fails the request that meets it."""
    def classify(entry: int) -> tuple[MapKind, int]:
        if entry == 0:
            return MapKind.UNALLOCATED, 0
        if entry == GTE_ZEROED:
            return MapKind.ZERO, 0
        if entry >= INVALID_GRAIN:
            raise CorruptImage(f"invalid grain table entry in seSparse extent "
                               f"{file.filename}")
        host_offset = entry * SECTOR
        if host_offset >= file.size:
            raise CorruptImage(f"grain at sector {entry} lies past the end of the "
                               f"{file.size}-byte seSparse extent {file.filename}")
        return MapKind.DATA, host_offset
    return classify


def table_check(file: Any) -> Any:
    table_bytes = GT_SECTORS * SECTOR

    def check_table(offset: int) -> None:
        if offset >= INVALID_TABLE * SECTOR:
            raise CorruptImage(f"invalid grain directory entry "
                               f"{offset // SECTOR - INVALID_TABLE} in seSparse extent "
                               f"{file.filename}")
        if offset < SECTOR or offset + table_bytes > file.size:
            raise CorruptImage(f"grain table at byte {offset:#x} lies outside the "
                               f"{file.size}-byte seSparse extent {file.filename}")
    return check_table


async def open_extent(file: Any, head: bytes, *, cache_bytes: int,
                      allocate: Any) -> tuple[Geometry, SeSparseMap]:
    """A seSparse extent's geometry and table map: its headers checked as
    QEMU checks them, its directory read and translated."""
    header = ConstHeader.unpack(head)
    check_header(header)
    at = volatile_header_offset(header, file.size)
    check_volatile_header(VolatileHeader.unpack(await file.read(at, SECTOR)))
    geometry = header_geometry(header, file.size)
    raw = await file.read(geometry.gd_offset, geometry.gd_entries * CODEC.width)
    tables = SeSparseMap(
        grains_offset=header.grains_offset, file=file, l1=directory_sectors(raw, header),
        l1_offset=geometry.gd_offset, block_bits=geometry.grain_bits,
        l2_bits=geometry.gt_bits, codec=CODEC, classify=classifier(file, geometry),
        check_table=table_check(file), allocate=allocate, cache_bytes=cache_bytes,
        entry_unit=SECTOR)
    return geometry, tables
