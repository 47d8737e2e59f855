"""VMDK on disk: sparse extent headers, markers, geometry (pure, no I/O).

Spec: libyal/libvmdk "VMWare Virtual Disk Format (VMDK)", sections "Sparse
extent header" (VMDK4, magic ``KDMV``), "COWD sparse extent header"
(VMDK3), "Grain directory", "Grain table", "Compressed grain" and
"Markers".  All integers little-endian; offsets and sizes in 512-byte
sectors.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple

from imgfs.errors import InvalidImage, Unsupported
from imgfs.signatures import probe_vmdk
from imgfs.tablecache import TableCodec

SECTOR = 512
VMDK4_MAGIC = b"KDMV"
VMDK3_MAGIC = b"COWD"
#: "Sparse extent header" flags
FLAG_VALID_NEWLINE = 1 << 0
FLAG_REDUNDANT_GT = 1 << 1
FLAG_ZEROED_GRAIN_GTE = 1 << 2
FLAG_COMPRESSED = 1 << 16
FLAG_MARKERS = 1 << 17
COMPRESSION_NONE, COMPRESSION_DEFLATE = 0, 1
#: gdOffset of a stream whose grain directory is found through the footer
GD_AT_END = 0xFFFFFFFFFFFFFFFF
#: a grain table entry that reads as zeros (header version 2 and later,
#: with FLAG_ZEROED_GRAIN_GTE)
GTE_ZEROED = 1
#: marker types ("Markers")
MARKER_EOS, MARKER_GT, MARKER_GD, MARKER_FOOTER = 0, 1, 2, 3
#: the COWD header's fixed grain table length
COWD_GTES_PER_GT = 4096
#: limits for hostile headers: QEMU's granularity bound, and a grain
#: directory that fits in memory
MAX_GRAIN_SECTORS = 0x20000
MAX_GTES_PER_GT = 1 << 16
MAX_GD_ENTRIES = 1 << 24
#: QEMU reads at most this much of a descriptor
MAX_DESCRIPTOR_BYTES = (1 << 20) - 1
#: grain directories and tables: little-endian 32-bit sector numbers
CODEC = TableCodec(4, big_endian=False)

SPARSE_HEADER = struct.Struct("<4sIIQQQQIQQQB4sH433x")
COWD_HEADER = struct.Struct("<4sIIIIIII")
#: a compressed grain's prefix: lba (sectors), compressed size (bytes)
GRAIN_MARKER = struct.Struct("<QI")
#: a metadata marker: numSectors, size (0), type; padded to a sector
METADATA_MARKER = struct.Struct("<QII")


class SparseHeader(NamedTuple):
    """The VMDK4 sparse extent header (512 bytes)."""

    magic: bytes
    version: int
    flags: int
    capacity: int
    grain_size: int
    descriptor_offset: int
    descriptor_size: int
    num_gtes_per_gt: int
    rgd_offset: int
    gd_offset: int
    overhead: int
    unclean_shutdown: int
    newline_chars: bytes
    compress_algorithm: int

    @classmethod
    def unpack(cls, raw: bytes) -> SparseHeader:
        if len(raw) < SPARSE_HEADER.size:
            raise InvalidImage(f"file too short for a VMDK sparse header ({len(raw)} bytes)")
        return cls(*SPARSE_HEADER.unpack_from(raw))

    def pack(self) -> bytes:
        return SPARSE_HEADER.pack(*self)


class CowdHeader(NamedTuple):
    """The VMDK3 (ESX "COWD") sparse extent header's leading fields."""

    magic: bytes
    version: int
    flags: int
    capacity: int
    grain_size: int
    gd_offset: int
    num_gd_entries: int
    free_sector: int

    @classmethod
    def unpack(cls, raw: bytes) -> CowdHeader:
        if len(raw) < COWD_HEADER.size:
            raise InvalidImage(f"file too short for a COWD header ({len(raw)} bytes)")
        return cls(*COWD_HEADER.unpack_from(raw))


def probe(head: bytes, filename: str) -> int:
    """100 for a sparse extent magic or a descriptor's text."""
    return probe_vmdk(head, filename)


def is_power_of_two(value: int) -> bool:
    return value > 0 and not value & (value - 1)


@dataclass(frozen=True, slots=True)
class Geometry:
    """Where one sparse extent keeps its tables, in bytes."""

    grain_size: int          # bytes
    gtes_per_gt: int
    gd_offset: int           # bytes
    gd_entries: int
    rgd_offset: int          # bytes, 0: none
    capacity: int            # bytes this extent maps
    data_start: int          # bytes: grains start here (after the metadata)
    compressed: bool = False
    zeroed_grains: bool = False
    markers: bool = False

    @property
    def grain_bits(self) -> int:
        return self.grain_size.bit_length() - 1

    @property
    def gt_bits(self) -> int:
        return self.gtes_per_gt.bit_length() - 1

    @property
    def gt_bytes(self) -> int:
        return self.gtes_per_gt * CODEC.width

    @property
    def gt_span(self) -> int:
        """Guest bytes one grain table maps."""
        return self.gtes_per_gt * self.grain_size


def check_sparse_header(header: SparseHeader, file_size: int) -> Geometry:
    """Every field of a VMDK4 header that sizes an allocation, an offset or
    a loop, checked before use (the footer's copy, for a stream whose
    gdOffset is GD_AT_END); one sentence per refusal."""
    if header.magic != VMDK4_MAGIC:
        raise InvalidImage(f"not a VMDK sparse extent (magic {header.magic!r})")
    if not 1 <= header.version <= 3:
        raise Unsupported(f"VMDK version {header.version} is not supported (1..3)")
    grain_sectors = header.grain_size
    if not is_power_of_two(grain_sectors) or grain_sectors > MAX_GRAIN_SECTORS:
        raise InvalidImage(f"grain size {grain_sectors} sectors is not a power of two in "
                           f"1..{MAX_GRAIN_SECTORS}")
    gtes = header.num_gtes_per_gt
    if not is_power_of_two(gtes) or gtes > MAX_GTES_PER_GT:
        raise InvalidImage(f"numGTEsPerGT {gtes} is not a power of two in "
                           f"1..{MAX_GTES_PER_GT}")
    compressed = bool(header.flags & FLAG_COMPRESSED)
    if compressed and header.compress_algorithm != COMPRESSION_DEFLATE:
        raise Unsupported(f"VMDK compression algorithm {header.compress_algorithm} is not "
                          "supported (1: deflate)")
    grain_size = grain_sectors * SECTOR
    capacity = header.capacity * SECTOR
    gd_entries = -(-header.capacity // (grain_sectors * gtes))
    if gd_entries > MAX_GD_ENTRIES:
        raise InvalidImage(f"capacity {header.capacity} sectors needs {gd_entries} grain "
                           f"directory entries (at most {MAX_GD_ENTRIES})")
    gd_offset = header.gd_offset * SECTOR
    rgd_offset = header.rgd_offset * SECTOR if header.flags & FLAG_REDUNDANT_GT else 0
    check_table_range("grain directory", gd_offset, gd_entries * CODEC.width, file_size)
    if rgd_offset:
        check_table_range("redundant grain directory", rgd_offset,
                          gd_entries * CODEC.width, file_size)
    gd_end = max(gd_offset, rgd_offset) + gd_entries * CODEC.width
    data_start = header.overhead * SECTOR if 0 < header.overhead * SECTOR <= file_size \
        else gd_end
    return Geometry(grain_size, gtes, gd_offset, gd_entries, rgd_offset, capacity, data_start,
                    compressed=compressed,
                    zeroed_grains=header.version >= 2 and
                    bool(header.flags & FLAG_ZEROED_GRAIN_GTE),
                    markers=bool(header.flags & FLAG_MARKERS))


def check_cowd_header(header: CowdHeader, file_size: int) -> Geometry:
    """The COWD (VMDK3) header's fields, checked as check_sparse_header."""
    if header.magic != VMDK3_MAGIC:
        raise InvalidImage(f"not a COWD sparse extent (magic {header.magic!r})")
    grain_sectors = header.grain_size
    if not is_power_of_two(grain_sectors) or grain_sectors > MAX_GRAIN_SECTORS:
        raise InvalidImage(f"grain size {grain_sectors} sectors is not a power of two in "
                           f"1..{MAX_GRAIN_SECTORS}")
    needed = -(-header.capacity // (grain_sectors * COWD_GTES_PER_GT))
    if header.num_gd_entries > MAX_GD_ENTRIES or header.num_gd_entries < needed:
        raise InvalidImage(f"COWD grain directory of {header.num_gd_entries} entries does "
                           f"not map {header.capacity} sectors (needs {needed}, at most "
                           f"{MAX_GD_ENTRIES})")
    gd_offset = header.gd_offset * SECTOR
    check_table_range("grain directory", gd_offset, needed * CODEC.width, file_size)
    return Geometry(grain_sectors * SECTOR, COWD_GTES_PER_GT, gd_offset, needed, 0,
                    header.capacity * SECTOR, gd_offset + needed * CODEC.width)


def check_table_range(what: str, offset: int, length: int, file_size: int) -> None:
    if offset < SECTOR or offset + length > file_size:
        raise InvalidImage(f"{what} at byte {offset:#x} (+{length}) lies outside the "
                           f"{file_size}-byte file")


def check_descriptor_range(header: SparseHeader, file_size: int) -> tuple[int, int]:
    """(offset, length) in bytes of the embedded descriptor (0, 0: none),
    bounded by what QEMU reads."""
    if not header.descriptor_offset or not header.descriptor_size:
        return 0, 0
    offset = header.descriptor_offset * SECTOR
    length = min(header.descriptor_size * SECTOR, MAX_DESCRIPTOR_BYTES)
    if offset >= file_size:
        raise InvalidImage(f"embedded descriptor at byte {offset:#x} lies past the end of "
                           f"the {file_size}-byte file")
    return offset, min(length, file_size - offset)


def footer_offset(file_size: int) -> int:
    """Where a stream's footer header sits: before the end-of-stream marker
    (the last sector), after the footer marker (spec "Stream-optimized")."""
    return file_size - 2 * SECTOR


def check_footer(footer_marker: bytes, eos_marker: bytes) -> None:
    """The two markers around the footer header of a GD_AT_END stream."""
    _, size, kind = METADATA_MARKER.unpack_from(footer_marker)
    if size or kind != MARKER_FOOTER:
        raise InvalidImage("no footer marker before the footer of a streamOptimized VMDK "
                           "whose grain directory is at its end")
    _, size, kind = METADATA_MARKER.unpack_from(eos_marker)
    if size or kind != MARKER_EOS:
        raise InvalidImage("no end-of-stream marker after the footer of a streamOptimized "
                           "VMDK")
