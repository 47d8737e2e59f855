"""Persistent dirty bitmaps: kept valid by marking them in use.

Spec: qemu/qemu docs/interop/qcow2.txt, "Bitmaps extension", "Bitmap
directory", "Bitmap table" and "Dirty tracking bitmaps" ("The software
doesn't have to sync the bitmap in the image file ... Flag 'in_use' should
be set while the bitmap is not synced").  imgfs does not track writes in
bitmaps, so before its first write it sets in_use on every bitmap, keeping
the bitmaps extension (and the clusters it owns) valid; QEMU then treats
those bitmaps as inconsistent instead of finding their clusters leaked.
"""
from __future__ import annotations

import struct
from typing import NamedTuple

from imgfs.errors import InvalidImage

BITMAPS_EXTENSION = struct.Struct(">IIQQ")
BITMAP_DIRECTORY_ENTRY = struct.Struct(">QIIBBHI")
#: QEMU's limits (65535 bitmaps; directory of at most 1 KiB per bitmap)
QCOW2_MAX_BITMAPS = 65535
QCOW2_MAX_BITMAP_DIRECTORY_SIZE = 1024 * QCOW2_MAX_BITMAPS
BME_FLAG_IN_USE = 1 << 0
#: bitmap table entry: bits 9-55 are the data cluster's offset
BME_TABLE_ENTRY_OFFSET_MASK = 0x00FFFFFFFFFFFE00


class BitmapsExtension(NamedTuple):
    nb_bitmaps: int
    reserved: int
    bitmap_directory_size: int
    bitmap_directory_offset: int

    @classmethod
    def unpack(cls, data: bytes) -> BitmapsExtension:
        if len(data) < BITMAPS_EXTENSION.size:
            raise InvalidImage(f"bitmaps extension of {len(data)} bytes is too short "
                               f"(expected {BITMAPS_EXTENSION.size})")
        return cls(*BITMAPS_EXTENSION.unpack_from(data))


class BitmapEntry(NamedTuple):
    """Where one directory entry is and what it points at."""

    position: int             # byte offset of the entry inside the directory
    table_offset: int
    table_size: int
    flags: int


def check_extension(ext: BitmapsExtension, cluster_size: int, file_size: int) -> None:
    if not 1 <= ext.nb_bitmaps <= QCOW2_MAX_BITMAPS:
        raise InvalidImage(f"nb_bitmaps {ext.nb_bitmaps} out of range "
                           f"(expected 1..{QCOW2_MAX_BITMAPS})")
    if ext.bitmap_directory_size > QCOW2_MAX_BITMAP_DIRECTORY_SIZE or \
            ext.bitmap_directory_offset % cluster_size or \
            ext.bitmap_directory_offset + ext.bitmap_directory_size > file_size:
        raise InvalidImage(f"bitmap directory at {ext.bitmap_directory_offset:#x} "
                           f"(+{ext.bitmap_directory_size}) is unaligned, too large or "
                           "beyond the end of the file")


def parse_directory(raw: bytes, count: int) -> list[BitmapEntry]:
    """The entries of a bitmap directory (`raw` is the whole directory)."""
    entries = []
    position = 0
    for number in range(count):
        if position + BITMAP_DIRECTORY_ENTRY.size > len(raw):
            raise InvalidImage(f"bitmap directory overflows at entry {number} of {count}")
        table_offset, table_size, flags, _type, _granularity, name_size, extra_size = \
            BITMAP_DIRECTORY_ENTRY.unpack_from(raw, position)
        entries.append(BitmapEntry(position, table_offset, table_size, flags))
        position += BITMAP_DIRECTORY_ENTRY.size + extra_size + name_size
        position += -position % 8
    if position > len(raw) + 7:
        raise InvalidImage("bitmap directory entries run past its size")
    return entries


def mark_in_use(raw: bytearray, entries: list[BitmapEntry]) -> bool:
    """Set in_use on every entry; True if anything changed."""
    changed = False
    for entry in entries:
        if not entry.flags & BME_FLAG_IN_USE:
            struct.pack_into(">I", raw, entry.position + 12, entry.flags | BME_FLAG_IN_USE)
            changed = True
    return changed
