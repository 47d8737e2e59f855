"""The VDI block map: one little-endian u32 per guest block, read in pages.

A map can hold up to half a billion entries, so it is never read whole:
pages of `PAGE_ENTRIES` go through a `TableCache` (keyed by their file
offset), and changed entries are written through at once (the block's
data is already in the file).  Entries are block numbers in the data
area, or FREE / ZERO.
"""
from __future__ import annotations

import array
from collections.abc import AsyncIterator

from imgfs.errors import CorruptImage
from imgfs.mapped import MapKind, Mapping
from imgfs.node import Node
from imgfs.tablecache import Table, TableCache, TableCodec

from .layout import BLOCK_FREE, BLOCK_ZERO, Geometry

CODEC = TableCodec(4, big_endian=False)
#: entries per page: 16 KiB of map, 16 GiB of guest with 1 MiB blocks
PAGE_ENTRIES = 4096
#: entries a scan of the whole map reads at once
SCAN_ENTRIES = 1 << 20
#: bytes of map pages kept in memory
CACHE_BYTES = 4 << 20


class BlockMap:
    """Lookup and change of the block map of one image."""

    def __init__(self, file: Node, geometry: Geometry, *, free: MapKind) -> None:
        self.file = file
        self.geometry = geometry
        #: what a FREE entry means: UNALLOCATED in a child, ZERO in a base image
        self.free = free
        self.cache = TableCache(CACHE_BYTES // (PAGE_ENTRIES * CODEC.width))
        self.block_bits = geometry.block_size.bit_length() - 1

    def _page_offset(self, page: int) -> int:
        return self.geometry.offset_bmap + page * PAGE_ENTRIES * CODEC.width

    async def _read_page(self, offset: int) -> array.array[int]:
        first = (offset - self.geometry.offset_bmap) // CODEC.width
        count = min(PAGE_ENTRIES, self.geometry.blocks - first)
        return CODEC.decode(await self.file.read(offset, count * CODEC.width))

    async def table(self, page: int) -> Table:
        offset = self._page_offset(page)
        table = self.cache.get(offset)
        if table is None:
            table = await self.cache.load(offset, self._read_page)
        return table

    async def page(self, page: int) -> array.array[int]:
        return (await self.table(page)).entries

    async def entries(self) -> AsyncIterator[tuple[int, int]]:
        """(block, entry) for every block, in order."""
        for page in range(-(-self.geometry.blocks // PAGE_ENTRIES)):
            first = page * PAGE_ENTRIES
            for index, entry in enumerate(await self.page(page)):
                yield first + index, entry

    def classify(self, block: int, entry: int) -> MapKind:
        if entry == BLOCK_FREE:
            return self.free
        if entry == BLOCK_ZERO:
            return MapKind.ZERO
        if entry >= self.geometry.blocks:
            raise CorruptImage(f"block map entry {block} points to block {entry}, beyond "
                               f"the image's {self.geometry.blocks} blocks")
        return MapKind.DATA

    async def lookup(self, offset: int, length: int) -> Mapping:
        """The run from guest `offset` inside one page: equal FREE/ZERO
        entries, or block numbers that follow each other (host-contiguous)."""
        block_bits = self.block_bits
        block = offset >> block_bits
        if block >= self.geometry.blocks:
            raise CorruptImage(f"guest offset {offset} lies beyond the block map")
        # (the hot path of every request: a cached page without a coroutine)
        page = block // PAGE_ENTRIES
        table = self.cache.get(self._page_offset(page))
        if table is None:
            table = await self.table(page)
        entries = table.entries
        index = block % PAGE_ENTRIES
        within = offset - (block << block_bits)
        blocks = min(-(-(within + length) >> block_bits), len(entries) - index)
        first = entries[index]
        kind = self.classify(block, first)
        step = 1 if kind is MapKind.DATA else 0
        run = 1
        while run < blocks and entries[index + run] == first + run * step:
            run += 1
        if kind is MapKind.DATA:
            # the run's last entry is valid if its first is and they follow on
            self.classify(block + run - 1, entries[index + run - 1])
        count = min(length, (run << block_bits) - within)
        if kind is MapKind.DATA:
            return Mapping(count, kind, self.geometry.host_offset(first) + within)
        return Mapping(count, kind)

    async def set_entries(self, block: int, values: list[int]) -> None:
        """Write entries from `block` on (inside the map), page by page."""
        done = 0
        while done < len(values):
            page, index = divmod(block + done, PAGE_ENTRIES)
            here = values[done:done + PAGE_ENTRIES - index]
            table = await self.table(page)
            table.entries[index:index + len(here)] = array.array(CODEC.typecode, here)
            self.cache.changed(table)
            await self.file.write(self.geometry.offset_bmap + (block + done) * CODEC.width,
                                  CODEC.encode(here))
            done += len(here)

    async def scan(self) -> tuple[int, int]:
        """(entries that hold a block, highest block number + 1) over the
        whole map: the header's count, and where the next new block goes."""
        used = top = 0
        limit = self.geometry.blocks
        for first in range(0, limit, SCAN_ENTRIES):
            count = min(SCAN_ENTRIES, limit - first)
            entries = CODEC.decode(await self.file.read(
                self.geometry.offset_bmap + first * CODEC.width, count * CODEC.width))
            blocks = [entry for entry in entries if entry < limit]
            if blocks:
                used += len(blocks)
                top = max(top, max(blocks) + 1)
        return used, top
