"""qcow2 reference counts: entry encoding, the refcount cache and allocation.

Spec: qemu/qemu docs/interop/qcow2.txt, "Host cluster management".  A
refcount block holds cluster_size * 8 / refcount_bits entries of
refcount_bits = 1 << refcount_order bits; sub-byte entries start at the
least significant bit.  The entry helpers are pure; `RefcountStore` caches
blocks, allocates clusters (growing the refcount table when it must) and
writes dirty blocks back when the driver flushes.

Crash safety: a new refcount block or table is written and flushed before
anything points to it, so a crash can leak clusters but never leaves a
reference to a cluster whose refcount is zero.  Freed clusters are queued
by the driver and released only after the tables that stopped pointing at
them are on disk (`queue_free` / `apply_frees`).
"""
from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from imgfs.errors import CorruptImage, NoSpace

from .cluster import pack_table
from .header import QCOW_MAX_REFTABLE_SIZE

if TYPE_CHECKING:
    from imgfs.node import Node

#: spec: "Refcount table entry", bits 9-63
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
_WIDE = {4: ">H", 5: ">I", 6: ">Q"}


@dataclass(frozen=True, slots=True)
class RefcountGeometry:
    cluster_bits: int
    refcount_order: int

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def max_refcount(self) -> int:
        return (1 << self.refcount_bits) - 1

    @property
    def block_bits(self) -> int:
        """log2 of the entries per refcount block (spec: refcount_block_entries)."""
        return self.cluster_bits + 3 - self.refcount_order

    @property
    def block_entries(self) -> int:
        return 1 << self.block_bits

    def table_index(self, cluster_index: int) -> int:
        return cluster_index >> self.block_bits

    def block_index(self, cluster_index: int) -> int:
        return cluster_index & (self.block_entries - 1)


def get_refcount(block: bytes | bytearray, index: int, order: int) -> int:
    """Entry `index` of a refcount block."""
    if order == 3:
        return block[index]
    if order > 3:
        return struct.unpack_from(_WIDE[order], block, index << (order - 3))[0]
    bits = 1 << order
    per_byte_shift = 3 - order
    byte = block[index >> per_byte_shift]
    shift = (index & ((1 << per_byte_shift) - 1)) * bits
    return (byte >> shift) & ((1 << bits) - 1)


def set_refcount(block: bytearray, index: int, order: int, value: int) -> None:
    """Store `value` (already range-checked) as entry `index`."""
    if order == 3:
        block[index] = value
        return
    if order > 3:
        struct.pack_into(_WIDE[order], block, index << (order - 3), value)
        return
    bits = 1 << order
    per_byte_shift = 3 - order
    pos = index >> per_byte_shift
    shift = (index & ((1 << per_byte_shift) - 1)) * bits
    mask = ((1 << bits) - 1) << shift
    block[pos] = (block[pos] & ~mask) | (value << shift)


def first_used(block: bytes | bytearray, start: int, count: int, order: int) -> int:
    """Index of the first non-zero entry among start..start+count-1, or -1."""
    if order >= 3:
        width = 1 << (order - 3)
        if not any(memoryview(block)[start * width:(start + count) * width]):
            return -1
    for index in range(start, start + count):
        if get_refcount(block, index, order):
            return index
    return -1


def first_free(block: bytes | bytearray, start: int, order: int) -> int:
    """Index of the first zero entry at or after `start`, or -1."""
    entries = len(block) * 8 >> order
    if order >= 3:
        width = 1 << (order - 3)
        zero = bytes(width)
        pos = start * width
        while True:
            pos = block.find(zero, pos)
            if pos < 0:
                return -1
            if pos % width == 0:
                return pos // width
            pos += width - pos % width
    for index in range(start, entries):
        if get_refcount(block, index, order) == 0:
            return index
    return -1


class RefcountStore:
    """The refcount table, a cache of refcount blocks, and cluster allocation."""

    #: bytes of refcount blocks kept in memory (clean ones beyond are dropped)
    CACHE_BYTES = 4 * 1024 * 1024

    def __init__(self, file: Node, geometry: RefcountGeometry, table: list[int],
                 table_offset: int, table_clusters: int,
                 move_table: Callable[[int, int], Awaitable[None]]) -> None:
        self.file = file
        self.geometry = geometry
        self.table = table
        self.table_offset = table_offset
        self.table_clusters = table_clusters
        #: writes the header fields for a new table (offset, clusters)
        self.move_table = move_table
        self.blocks: OrderedDict[int, bytearray] = OrderedDict()
        self.dirty: set[int] = set()
        #: first cluster index that might be free
        self.free_hint = 0
        #: (cluster index, count) waiting to lose one reference
        self.pending_frees: list[tuple[int, int]] = []

    @property
    def cluster_size(self) -> int:
        return 1 << self.geometry.cluster_bits

    # -- blocks -----------------------------------------------------------------

    def _block_offset(self, table_index: int) -> int:
        if table_index >= len(self.table):
            return 0
        offset = self.table[table_index] & REFT_OFFSET_MASK
        if offset & (self.cluster_size - 1):
            raise CorruptImage(f"refcount block offset {offset:#x} (table index "
                               f"{table_index}) is not cluster aligned")
        table_end = self.table_offset + (self.table_clusters << self.geometry.cluster_bits)
        if offset and (offset < self.cluster_size or
                       self.table_offset <= offset < table_end):
            # a block over the header or the table itself would loop back
            # into the structures it describes
            raise CorruptImage(f"refcount block offset {offset:#x} (table index "
                               f"{table_index}) overlaps the header or the refcount table")
        return offset

    async def _load(self, offset: int) -> bytearray:
        block = self.blocks.get(offset)
        if block is not None:
            self.blocks.move_to_end(offset)
            return block
        if offset + self.cluster_size > self.file.size:
            raise CorruptImage(f"refcount block at {offset:#x} lies beyond the end "
                               f"of the {self.file.size}-byte file")
        data = bytearray(await self.file.read(offset, self.cluster_size))
        block = self.blocks.setdefault(offset, data)
        self._trim(keep=offset)
        return block

    def _trim(self, keep: int = -1) -> None:
        """Drop clean blocks beyond the cache size, never `keep` (the block
        the caller is about to use) nor a dirty one."""
        excess = len(self.blocks) - max(4, self.CACHE_BYTES >> self.geometry.cluster_bits)
        if excess <= 0:
            return
        victims = [off for off in self.blocks
                   if off not in self.dirty and off != keep][:excess]
        for offset in victims:
            del self.blocks[offset]

    async def get(self, cluster_index: int) -> int:
        """The refcount of host cluster `cluster_index` (0 past the table)."""
        geo = self.geometry
        offset = self._block_offset(geo.table_index(cluster_index))
        if not offset:
            return 0
        block = await self._load(offset)
        return get_refcount(block, geo.block_index(cluster_index), geo.refcount_order)

    def _spans(self, cluster_index: int, count: int) -> Iterator[tuple[int, int, int]]:
        """(table index, first entry in its block, entries) of each refcount
        block that clusters cluster_index..+count fall into."""
        geo = self.geometry
        index, end = cluster_index, cluster_index + count
        while index < end:
            table_index = geo.table_index(index)
            span = min(end, (table_index + 1) << geo.block_bits) - index
            yield table_index, geo.block_index(index), span
            index += span

    async def update(self, cluster_index: int, count: int, delta: int) -> None:
        """Add `delta` to the refcounts of `count` clusters from `cluster_index`."""
        geo = self.geometry
        order, limit = geo.refcount_order, geo.max_refcount
        for table_index, first, span in self._spans(cluster_index, count):
            offset = self._block_offset(table_index)
            if not offset:
                if delta < 0:
                    raise CorruptImage(f"freeing cluster {table_index << geo.block_bits | first}"
                                       " whose refcount is 0")
                offset = await self._create_block(table_index)
            block = await self._load(offset)
            for entry in range(first, first + span):
                value = get_refcount(block, entry, order) + delta
                if value < 0 or value > limit:
                    index = table_index << geo.block_bits | entry
                    raise CorruptImage(f"refcount of cluster {index} would become {value} "
                                       f"(range 0..{limit})")
                set_refcount(block, entry, order, value)
                if value == 0 and (table_index << geo.block_bits | entry) < self.free_hint:
                    self.free_hint = table_index << geo.block_bits | entry
            self.dirty.add(offset)

    # -- allocation ---------------------------------------------------------------

    async def allocate(self, count: int) -> int:
        """Find `count` contiguous free clusters, take them, return the host offset."""
        while True:
            start = await self._find_free_run(count)
            if await self._ensure_blocks(start, count):
                continue        # a new refcount block took a cluster: search again
            await self.update(start, count, 1)
            self.free_hint = start + count
            end = (start + count) << self.geometry.cluster_bits
            if end > self.file.size:
                await self.file.truncate(end)
            return start << self.geometry.cluster_bits

    async def _find_free_run(self, count: int) -> int:
        geo = self.geometry
        start = self.free_hint
        while True:
            table_index = geo.table_index(start)
            offset = self._block_offset(table_index)
            if not offset:
                break                    # no block: everything it covers is free
            block = await self._load(offset)
            base = table_index << geo.block_bits
            found = first_free(block, start - base, geo.refcount_order)
            if found < 0:
                start = base + geo.block_entries
                continue
            start = base + found
            run = await self._free_run_length(start, count)
            if run == count:
                break
            start += run + 1
        return start

    async def _free_run_length(self, start: int, count: int) -> int:
        """How many clusters from `start` (up to `count`) are free."""
        length = 0
        for table_index, first, span in self._spans(start, count):
            offset = self._block_offset(table_index)
            if offset:
                block = await self._load(offset)
                used = first_used(block, first, span, self.geometry.refcount_order)
                if used >= 0:
                    return length + used - first
            length += span
        return count

    async def _ensure_blocks(self, start: int, count: int) -> bool:
        """Create missing refcount blocks for the run; True if any was made."""
        geo = self.geometry
        created = False
        for table_index in range(geo.table_index(start),
                                 geo.table_index(start + count - 1) + 1):
            if not self._block_offset(table_index):
                await self._create_block(table_index, after=start + count)
                created = True
        return created

    async def _create_block(self, table_index: int, after: int = 0) -> int:
        """A new refcount block for `table_index`, placed at the end of the
        file (never over clusters that a damaged image may still use)."""
        geo = self.geometry
        if table_index >= len(self.table):
            await self._grow_table(table_index, after)
            offset = self._block_offset(table_index)
            return offset or await self._create_block(table_index, after)
        cluster_index = max(after, self.end_cluster())
        offset = cluster_index << geo.cluster_bits
        block = bytearray(self.cluster_size)
        counts_itself = geo.table_index(cluster_index) == table_index
        if counts_itself:
            set_refcount(block, geo.block_index(cluster_index), geo.refcount_order, 1)
        await self._write_block_now(offset, block)
        self.table[table_index] = offset
        await self._write_table_entry(table_index)
        if not counts_itself:
            await self.update(cluster_index, 1, 1)
        return offset

    def end_cluster(self) -> int:
        """The first cluster past the end of the file."""
        return -(-self.file.size // self.cluster_size)

    async def _write_block_now(self, offset: int, block: bytearray) -> None:
        if offset + self.cluster_size > self.file.size:
            await self.file.truncate(offset + self.cluster_size)
        await self.file.write(offset, bytes(block))
        await self.file.flush()          # before the table points at it
        self.blocks[offset] = block
        self._trim(keep=offset)

    async def _write_table_entry(self, table_index: int) -> None:
        await self.file.write(self.table_offset + table_index * 8,
                              struct.pack(">Q", self.table[table_index]))

    async def _grow_table(self, needed_index: int, after: int) -> None:
        """Move the refcount table to a bigger one at the end of the image.

        The new table and the refcount blocks that count it are placed
        together past everything in use, each block counting the clusters
        of this group that it covers, so the layout describes itself.
        """
        geo = self.geometry
        start = max(after, self.end_cluster())
        entries = max(needed_index + 1, 2 * len(self.table))
        while True:
            table_clusters = -(-entries * 8 // self.cluster_size)
            missing = self._missing_blocks(start, table_clusters)
            if max([needed_index, *missing]) < entries:
                break
            entries = 2 * entries
        if table_clusters * self.cluster_size > QCOW_MAX_REFTABLE_SIZE:
            raise NoSpace("the refcount table would exceed "
                          f"{QCOW_MAX_REFTABLE_SIZE} bytes")
        new_table = self.table + [0] * (entries - len(self.table))
        end = start + table_clusters + len(missing)
        for number, table_index in enumerate(missing):
            block_cluster = start + table_clusters + number
            block = bytearray(self.cluster_size)
            base = table_index << geo.block_bits
            for cluster in range(max(start, base), min(end, base + geo.block_entries)):
                set_refcount(block, cluster - base, geo.refcount_order, 1)
            await self._write_block_now(block_cluster << geo.cluster_bits, block)
            new_table[table_index] = block_cluster << geo.cluster_bits
        await self._switch_table(new_table, start, table_clusters)

    def _missing_blocks(self, start: int, table_clusters: int) -> list[int]:
        """Table indexes without a block among the clusters of a new table
        and of the blocks needed to count it (a fixed point)."""
        geo = self.geometry
        count = 0
        while True:
            end = start + table_clusters + count
            missing = [index for index in range(geo.table_index(start),
                                                geo.table_index(end - 1) + 1)
                       if not self._block_offset(index)]
            if len(missing) == count:
                return missing
            count = len(missing)

    async def _switch_table(self, new_table: list[int], start: int,
                            table_clusters: int) -> None:
        old_offset, old_clusters = self.table_offset, self.table_clusters
        new_offset = start << self.geometry.cluster_bits
        raw = pack_table(new_table).ljust(table_clusters * self.cluster_size, b"\0")
        if new_offset + len(raw) > self.file.size:
            await self.file.truncate(new_offset + len(raw))
        await self.file.write(new_offset, raw)
        await self.file.flush()
        await self.move_table(new_offset, table_clusters)
        await self.file.flush()
        self.table = new_table
        self.table_offset, self.table_clusters = new_offset, table_clusters
        await self.update(old_offset >> self.geometry.cluster_bits, old_clusters, -1)

    # -- frees and write-back --------------------------------------------------------

    def queue_free(self, host_offset: int, count: int = 1) -> None:
        self.pending_frees.append((host_offset >> self.geometry.cluster_bits, count))

    async def apply_frees(self) -> None:
        frees, self.pending_frees = self.pending_frees, []
        for cluster_index, count in frees:
            await self.update(cluster_index, count, -1)

    async def write_back(self) -> bool:
        """Write dirty blocks; True if anything was written."""
        if not self.dirty:
            return False
        for offset in sorted(self.dirty):
            block = self.blocks[offset]
            await self.file.write(offset, bytes(block))
        self.dirty.clear()
        self._trim()
        return True
