"""The Bochs driver: open and the mapped layer's lookup.

A growing redolog is a one-level map on `imgfs.mapped`: the catalog
(in memory) names the stored extent of each guest extent, and each
stored extent's bitmap (cached in a `TableCache`) says which of its
sectors were written.  Written sectors are DATA runs (host-contiguous
within an extent, so the core reads them in one call); the rest is
UNALLOCATED, which reads as zeros (a growing image has no backing file).
Read-only, as in QEMU.
"""
from __future__ import annotations

import array
from typing import Any

from imgfs.block import Kind
from imgfs.mapped import MapKind, MappedDriver, Mapping
from imgfs.node import OpenContext
from imgfs.tablecache import TableCache, TableCodec

from .layout import (
    HEADER_SIZE,
    NOT_ALLOCATED,
    SECTOR,
    Header,
    bit_run,
    check_header,
)
from .layout import probe as probe_header

#: the catalog: little-endian 32-bit entries
CATALOG_CODEC = TableCodec(4, big_endian=False)
#: bytes of extent bitmaps kept in memory
BITMAP_CACHE_BYTES = 1024 * 1024
TABLE_OVERHEAD_BYTES = 256


class BochsDriver(MappedDriver):
    name = "bochs"
    kind = Kind.FORMAT
    read_only_format = True
    reports_dirty_flag = False      # as qemu-img info shows it
    description = "Bochs growing images (redologs, as bximage makes them)"
    request_alignment = SECTOR

    @staticmethod
    def probe(head: bytes, filename: str) -> int:
        return probe_header(head, filename)

    async def open(self, options: dict[str, Any], ctx: OpenContext) -> None:
        file = self.children["file"]
        header = Header.unpack(await file.read(0, min(file.size, HEADER_SIZE)))
        self.geometry = geometry = check_header(header, file.size)
        self.header = header
        self.size = geometry.size
        raw = await file.read(geometry.catalog_offset, 4 * geometry.entries)
        self.catalog = CATALOG_CODEC.decode(raw)
        self.setup_mapping(geometry.extent_size)
        # (a table costs some hundred bytes beside its bits: count that too)
        self.bitmaps = TableCache(BITMAP_CACHE_BYTES //
                                  max(geometry.bitmap_bytes, TABLE_OVERHEAD_BYTES))

    # -- the mapped layer's hook ----------------------------------------------------------

    async def lookup(self, offset: int, length: int) -> Mapping:
        geometry = self.geometry
        index, within = divmod(offset, geometry.extent_size)
        entry = self.catalog[index]
        if entry == NOT_ALLOCATED:
            return Mapping(self._unallocated_run(index, offset, length), MapKind.UNALLOCATED)
        bits = await self._bitmap(entry)
        length = min(length, geometry.extent_size - within)
        first = within // SECTOR
        last = -(-(within + length) // SECTOR)
        written, count = bit_run(bits, first, last - first)
        run = min(length, (first + count) * SECTOR - within)
        if not written:
            return Mapping(run, MapKind.UNALLOCATED)
        return Mapping(run, MapKind.DATA, geometry.sector_offset(entry) + within)

    def _unallocated_run(self, index: int, offset: int, length: int) -> int:
        """Bytes from `offset` in extents never written, at most `length`."""
        extent_size = self.geometry.extent_size
        end = min(offset + length, self.size)
        following = index + 1
        while following * extent_size < end and self.catalog[following] == NOT_ALLOCATED:
            following += 1
        return min(end, following * extent_size) - offset

    async def _bitmap(self, entry: int) -> int:
        """The bitmap of the `entry`-th stored extent, as an integer."""
        offset = self.geometry.bitmap_offset(entry)
        table = self.bitmaps.get(offset)
        if table is None:
            table = await self.bitmaps.load(offset, self._read_bitmap)
        return int.from_bytes(table.entries, "little")

    async def _read_bitmap(self, offset: int) -> array.array[int]:
        """The bitmap at host `offset` (or what of it lies inside the file:
        as in QEMU, bytes past the end of the file read as zeros, so the
        sectors they stand for read as zeros)."""
        file = self.children["file"]
        length = max(0, min(self.geometry.bitmap_bytes, file.size - offset))
        raw = await file.read(offset, length) if length else b""
        return array.array("B", raw.ljust(self.geometry.bitmap_bytes, b"\0"))


DRIVERS = [BochsDriver]
