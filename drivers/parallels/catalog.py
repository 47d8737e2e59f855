"""The catalog (BAT) of a Parallels image: one 32-bit entry per cluster,
read in pages through a `TableCache`, so that neither a large disk nor a
hostile entry count makes opening read (or allocate) the whole catalog.

A page past the end of the file reads as zeros (unallocated), as QEMU
reads it.  Entries are written through: the layer has written the data
they point at before it maps it.
"""
from __future__ import annotations

import array
from collections.abc import AsyncIterator

from imgfs.errors import CorruptImage
from imgfs.mapped import MapKind, Mapping
from imgfs.node import Node
from imgfs.tablecache import Table, TableCache

from .layout import CODEC, HEADER, MAX_ENTRY, Geometry

#: entries per cached page
PAGE_ENTRIES = 4096
PAGE_BYTES = PAGE_ENTRIES * CODEC.width
#: bytes of catalog kept in memory
CACHE_BYTES = 4 * 1024 * 1024


def zero_run(entries: array.array[int]) -> int:
    """How many entries from the first are 0 (at C speed: a disk's worth
    of unallocated clusters is the common case)."""
    raw = entries.tobytes()
    return (len(raw) - len(raw.lstrip(b"\0"))) // entries.itemsize


def same_run(entries: array.array[int], step: int) -> int:
    """How many entries from the first go up by `step` each (clusters that
    follow each other on the host), found by comparing slices with the
    progression they would be."""
    first = entries[0]
    count = min(len(entries), (MAX_ENTRY - first) // step + 1)
    progression = array.array(entries.typecode, range(first, first + count * step, step))
    low, high = 1, count            # entries[:low] matches; entries[:high + 1] does not
    while low < high:
        middle = (low + high + 1) // 2
        if entries[:middle] == progression[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


class Catalog:
    def __init__(self, file: Node, geometry: Geometry) -> None:
        self.file = file
        self.geometry = geometry
        self.cache = TableCache(CACHE_BYTES // PAGE_BYTES)
        #: host units (sectors or clusters) from one cluster to the next
        self.step = geometry.cluster_size // geometry.entry_unit

    @staticmethod
    def page_offset(index: int) -> int:
        """Host offset of the page holding entry `index`."""
        return HEADER.size + (index - index % PAGE_ENTRIES) * CODEC.width

    async def read_page_bytes(self, offset: int) -> bytes:
        """The page's bytes that exist in the file (maybe none)."""
        end = min(offset + PAGE_BYTES, self.geometry.bat_end, self.file.size)
        return await self.file.read(offset, end - offset) if end > offset else b""

    async def _read_page(self, offset: int) -> array.array[int]:
        entries = CODEC.decode(await self.read_page_bytes(offset))
        entries.extend(CODEC.empty(PAGE_ENTRIES - len(entries)))
        return entries

    async def page(self, index: int) -> Table:
        offset = self.page_offset(index)
        table = self.cache.get(offset)
        return table if table is not None else await self.cache.load(offset, self._read_page)

    def host_offset(self, entry: int) -> int:
        host_offset = self.geometry.host_offset(entry)
        if host_offset < self.geometry.data_start:
            raise CorruptImage(f"catalog entry {entry:#x} points at {host_offset:#x}, before "
                               f"the data area at {self.geometry.data_start:#x}")
        return host_offset

    async def lookup(self, offset: int, length: int) -> Mapping:
        """The run from guest `offset` inside one page: unallocated entries,
        or entries whose clusters follow each other on the host.  (The hot
        path of every request: a cached page is used without a coroutine.)"""
        geometry = self.geometry
        cluster_size = geometry.cluster_size
        index, within = divmod(offset, cluster_size)
        if index >= geometry.bat_entries:       # past the catalog: zeros, as QEMU
            return Mapping(length, MapKind.UNALLOCATED)
        first_slot = index % PAGE_ENTRIES
        table = self.cache.get(HEADER.size + (index - first_slot) * CODEC.width)
        if table is None:
            if HEADER.size + index * CODEC.width >= self.file.size:
                # the rest of the catalog lies past the end of the file: zeros
                return Mapping(min(length, (geometry.bat_entries - index) * cluster_size -
                                   within), MapKind.UNALLOCATED)
            table = await self.page(index)
        entries = table.entries
        first = entries[first_slot]
        run = 1
        wanted = -(-(within + length) // cluster_size)
        if wanted > 1:      # (a small request stays in one cluster: no slices)
            wanted = min(wanted, PAGE_ENTRIES - first_slot, geometry.bat_entries - index)
            segment = entries[first_slot:first_slot + wanted]
            run = same_run(segment, self.step) if first else zero_run(segment)
        count = min(length, run * cluster_size - within)
        if not first:
            return Mapping(count, MapKind.UNALLOCATED)
        return Mapping(count, MapKind.DATA, self.host_offset(first) + within)

    async def set_run(self, index: int, count: int, first_entry: int) -> None:
        """Entries first_entry, first_entry + step, ... from `index`."""
        if index + count > self.geometry.bat_entries:
            raise CorruptImage(f"clusters {index}..{index + count - 1} lie beyond the "
                               f"catalog of {self.geometry.bat_entries} entries")
        while count:
            table = await self.page(index)
            slot = index % PAGE_ENTRIES
            here = min(count, PAGE_ENTRIES - slot)
            values = array.array(CODEC.typecode, (first_entry + number * self.step
                                                  for number in range(here)))
            table.entries[slot:slot + here] = values
            self.cache.changed(table)
            await self.file.write(table.offset + slot * CODEC.width, CODEC.encode(values))
            index, count, first_entry = index + here, count - here, first_entry + here * self.step

    async def allocated_pages(self) -> AsyncIterator[tuple[int, array.array[int]]]:
        """(first index, entries) of every page with an entry set, in
        order, read from the file (a check's view, not the cache's); a
        zero page costs a comparison, not a loop."""
        for first in range(0, self.geometry.bat_entries, PAGE_ENTRIES):
            raw = await self.read_page_bytes(self.page_offset(first))
            if raw.count(0) != len(raw):
                yield first, CODEC.decode(raw)
