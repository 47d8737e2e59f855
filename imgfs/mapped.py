"""The table-mapped format layer: what qcow, QED and every format that maps
a guest block to a host offset through a table have in common.

A format driver subclasses `MappedDriver` and provides four hooks:

* ``lookup(offset, length) -> Mapping``: the run of guest bytes from
  `offset` that is in one state (unallocated, zero, stored plainly and
  contiguous on the host, or transformed: one compressed block);
* ``map_blocks(guest_offset, count, host_offset)``: point `count` guest
  blocks at new host blocks (or, with None, mark them as zero blocks),
  after the data is written;
* ``allocate(length)``: host space for new blocks (default: append at the
  cluster-aligned end of the file; qcow2 plugs in its refcounts);
* ``decode_block(token)``: the bytes of one transformed block (blocks of
  varying length also say where each starts: ``transformed_start``).

and `MappedDriver` implements `block_status`, `read_data`, allocating
writes with copy-on-write from the backing node, zero writes, and the
decoded-block cache.  Crash-safe order: guest data, then the table entry,
then (after a flush) the higher-level table that names a new table; a
crash leaks space at worst.

`TwoLevelMap` is the lookup and mapping of any two-level table (qcow and
QED L1/L2, VMDK grain directory and grain tables): a format gives it its
entry codec and a classifier for entries.
"""
from __future__ import annotations

import array
import bisect
import enum
import os
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import trio

from .block import DATA, UNALLOCATED, ZERO, BlockDriver, Extent
from .errors import CorruptImage, ReadOnly, Unsupported
from .tablecache import DecodedCache, MetadataLock, Table, TableCache, TableCodec

if TYPE_CHECKING:
    from .node import Node, OpenContext


class MapKind(enum.Enum):
    #: not in this layer: the backing node, or zeros.  With a non-zero
    #: `host_offset`, the block is allocated but these bytes are not
    #: present in it (a differencing image's sector bitmap has them clear):
    #: a write goes in place at `host_offset`, then `mark_present`.
    UNALLOCATED = "unallocated"
    ZERO = "zero"                   # reads as zeros, hides the backing node
    DATA = "data"                   # stored as is at host_offset
    TRANSFORMED = "transformed"     # one block, decoded by decode_block(token)


class Mapping(NamedTuple):
    """A run of guest bytes in one state; DATA runs are host-contiguous.
    (NamedTuples, not dataclasses, here and below: every request makes
    one, and probing imports this module.)"""

    length: int
    kind: MapKind
    host_offset: int = 0
    token: Hashable = None
    #: the child a DATA run lives in ("": `data_child`; VMDK: an extent file)
    child: str = ""


def align_up(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


#: a transformed block larger than this is decoded on a worker thread:
#: inflating it on the trio thread would hold up every other request
DECODE_INLINE_LIMIT = 1 << 20


async def run_decoder(size: int, decoder: Callable[..., bytes], *args: Any) -> bytes:
    """``decoder(*args)``, which produces a block of `size` bytes; on a
    worker thread when the block is large (zlib, bz2 and C decoders called
    through ctypes let go of the GIL while they work)."""
    if size <= DECODE_INLINE_LIMIT:
        return decoder(*args)
    return await trio.to_thread.run_sync(decoder, *args)


async def create_image_file(target: Any, ctx: OpenContext, head: bytes, length: int, *,
                            more: Sequence[tuple[int, bytes]] = (),
                            preallocation: str = "off") -> None:
    """A format's `create`: a new protocol file of `length` bytes (zeros)
    that starts with `head` (header, names, tables) and has the (offset,
    bytes) of `more` further on (tables after a hole), made durable;
    `preallocation` (falloc, full) reserves its bytes on the host."""
    from .graph import create_protocol_file  # (only creating needs the graph)
    node = await create_protocol_file(os.fspath(target), ctx, size=0)
    try:
        await node.truncate(length, preallocation)
        await node.write(0, head)
        for offset, data in more:
            await node.write(offset, data)
        await node.flush()
    finally:
        await node.aclose()


class HostRun(NamedTuple):
    """What `MappedDriver.read_data` finds in an encrypted DATA extent's token."""

    host_offset: int


class MappedDriver(BlockDriver):
    """Base class of table-mapped formats (see the module docstring).

    A subclass's `open` calls `setup_mapping(block_size)` once the header
    is checked, and implements the hooks below."""

    #: most bytes one allocating write builds in memory
    max_allocation: int = 32 * 1024 * 1024
    #: a DATA run past the end of the file reads as zeros (qcow, qcow2 as
    #: QEMU); False: the format's lookup refuses such entries
    past_eof_reads_zero: bool = True
    #: the format can mark whole blocks as reading zeros (map_blocks(None))
    zero_blocks: bool = False
    #: DATA runs are encrypted: read through `decrypt`, never written
    encrypted: bool = False
    #: the child that holds guest data
    data_child: str = "file"
    #: the unit in which a block can be partially present (a differencing
    #: image's sector); 0: blocks are present whole
    present_unit: int = 0

    block_size: int
    lock: MetadataLock
    decoded: DecodedCache
    #: one past the last byte the allocator has handed out
    file_end: int

    def setup_mapping(self, block_size: int, *, decoded_blocks: int = 4) -> None:
        self.block_size = block_size
        self.lock = MetadataLock()
        self.decoded = DecodedCache(decoded_blocks)
        self.file_end = self.children[self.data_child].size

    # -- the hooks -----------------------------------------------------------------------

    async def lookup(self, offset: int, length: int) -> Mapping:
        """The run from guest `offset` (at most `length` bytes, > 0)."""
        raise NotImplementedError

    async def map_blocks(self, guest_offset: int, count: int, host_offset: int | None) -> None:
        """Point `count` blocks from block-aligned `guest_offset` at the host
        blocks from `host_offset` (their data already written), or at
        nothing that reads as zeros (None).  Called under `lock`."""
        raise NotImplementedError

    async def allocate(self, length: int) -> int:
        """Host space for `length` bytes: at the end of the file, aligned to
        the block size.  Called under `lock`."""
        host_offset = align_up(self.file_end, self.block_size)
        await self.grow_file(host_offset + length)
        return host_offset

    async def allocate_for(self, guest_offset: int, length: int) -> tuple[str, int]:
        """(child, host offset) of space for new blocks from `guest_offset`:
        `allocate` in `data_child` unless a format keeps several data files
        (VMDK's extents).  Called under `lock`."""
        return self.data_child, await self.allocate(length)

    async def decode_block(self, token: Any) -> bytes:
        """The `block_size` bytes of a transformed block."""
        raise Unsupported(f"{self.name}: no transformed blocks")

    def transformed_start(self, offset: int, token: Any) -> int:
        """The guest offset where the transformed block `token` (which holds
        guest `offset`) starts: block-aligned, unless the format's blocks
        vary in length (DMG chunks)."""
        return offset - offset % self.block_size

    async def decrypt(self, guest_offset: int, host_offset: int, raw: bytes) -> bytes:
        raise Unsupported(f"{self.name}: not encrypted")

    async def mark_present(self, guest_offset: int, length: int) -> None:
        """Record that the `present_unit`-aligned guest bytes of an allocated
        block now hold data here (their data already written).  Called
        under `lock`, for formats with `present_unit`."""
        raise NotImplementedError

    async def prepare_metadata_change(self) -> None:
        """Called under `lock` before every change to the tables (QED sets
        its need-check flag at the first)."""

    def check_in_place(self, host_offset: int, length: int) -> None:
        """Refuse an in-place write a hostile entry aims at metadata."""
        file_end = align_up(self.children[self.data_child].size, self.block_size)
        if host_offset + length > file_end:
            raise CorruptImage(f"data cluster at host offset {host_offset:#x} lies beyond "
                               f"the end of the {file_end}-byte file")

    # -- shared helpers ----------------------------------------------------------------

    async def grow_file(self, end: int, child: str = "") -> None:
        """The file node refuses requests past its size: grow it first."""
        file = self.children[child or self.data_child]
        if end > file.size:
            await file.truncate(end)
        self.file_end = max(self.file_end, end)

    # -- reads ---------------------------------------------------------------------------

    async def block_status(self, offset: int, length: int) -> Extent:
        mapping = await self.lookup(offset, length)
        kind = mapping.kind
        if kind is MapKind.DATA:
            child = mapping.child or self.data_child
            available = self.children[child].size - mapping.host_offset
            count = mapping.length
            if self.past_eof_reads_zero:
                if available <= 0:
                    return Extent(count, ZERO)
                count = min(count, available)
            if self.encrypted:
                return Extent(count, DATA, token=HostRun(mapping.host_offset))
            return Extent(count, DATA, mapping.host_offset, child)
        if kind is MapKind.TRANSFORMED:
            return Extent(mapping.length, DATA, token=mapping)
        if kind is MapKind.ZERO:
            return Extent(mapping.length, ZERO)
        return Extent(mapping.length, UNALLOCATED)

    async def read_data(self, offset: int, length: int, extent: Extent) -> bytes:
        token = extent.token
        if isinstance(token, HostRun):
            raw = await self.children[self.data_child].read(token.host_offset, length)
            return await self.decrypt(offset, token.host_offset, raw)
        if not isinstance(token, Mapping):
            token = await self.lookup(offset, length)
            if token.kind is not MapKind.TRANSFORMED:
                raise CorruptImage(f"no transformed block at guest offset {offset}")
        block = await self.decoded.get(token.token, self.decode_block)
        within = offset - self.transformed_start(offset, token.token)
        return block[within:within + length]

    # -- writes --------------------------------------------------------------------------

    async def write(self, offset: int, data: bytes) -> None:
        if self.encrypted:      # the layer has no `encrypt` hook (yet)
            raise ReadOnly(f"encrypted {self.name} images cannot be written")
        view = memoryview(data)
        done = 0
        while done < len(data):
            done += await self._write_step(offset + done, view[done:])

    async def _write_step(self, offset: int, data: memoryview) -> int:
        """Write a prefix of `data` in one state; return its length."""
        mapping = await self.lookup(offset, len(data))
        if mapping.kind is MapKind.DATA:
            return await self._write_in_place(mapping, data)
        async with self.lock:
            mapping = await self.lookup(offset, len(data))   # another writer may have won
            if mapping.kind is MapKind.DATA:
                return await self._write_in_place(mapping, data)
            if mapping.kind is MapKind.UNALLOCATED and mapping.host_offset:
                return await self._write_making_present(offset, data, mapping)
            return await self._allocating_write(offset, data, mapping)

    async def _write_making_present(self, offset: int, data: memoryview,
                                    mapping: Mapping) -> int:
        """Bytes of an allocated block that are not present here: whole
        `present_unit`s (the new bytes merged into the backing node's)
        written in place, then marked present.  Lock held."""
        count = min(len(data), mapping.length)
        unit = self.present_unit
        start = offset - offset % unit
        end = min(align_up(offset + count, unit), self.size)
        payload = bytes(data[:count])
        if start < offset or offset + count < end:
            merged = bytearray(await self.node.read_unallocated(start, end - start))
            merged[offset - start:offset - start + count] = payload
            payload = bytes(merged)
        host_offset = mapping.host_offset - (offset - start)
        self.check_in_place(host_offset, len(payload))
        await self.children[self.data_child].write(host_offset, payload)
        await self.prepare_metadata_change()
        await self.mark_present(start, end - start)
        return count

    async def _write_in_place(self, mapping: Mapping, data: memoryview) -> int:
        count = min(len(data), mapping.length)
        self.check_in_place(mapping.host_offset, count)
        file = self.children[mapping.child or self.data_child]
        if mapping.host_offset + count > file.size:
            async with self.lock:
                await self.grow_file(mapping.host_offset + count, mapping.child)
        await file.write(mapping.host_offset, bytes(data[:count]))
        return count

    def _reads_zeros(self, mapping: Mapping) -> bool:
        return mapping.kind is MapKind.ZERO or \
            (mapping.kind is MapKind.UNALLOCATED and self.node.backing is None)

    async def _allocating_write(self, offset: int, data: memoryview, mapping: Mapping) -> int:
        """New blocks for the run: old contents around the new bytes (the
        backing node's, zeros, or the decoded block), written once, then
        mapped.  Lock held."""
        block_size = self.block_size
        start = offset - offset % block_size
        end = min(offset + len(data), offset + mapping.length,
                  start + max(block_size, self.max_allocation))
        count = end - offset
        new = bytes(data[:count])   # (compared as bytes: memcmp, not a Python loop)
        if self._reads_zeros(mapping) and new == bytes(count):
            return count            # zeros over what reads as zeros: nothing to do
        block_end = align_up(end, block_size)
        blocks = (block_end - start) // block_size
        partial = offset > start or end < block_end
        zeros_around = partial and self._reads_zeros(mapping)
        payload = new
        if partial and not zeros_around:
            payload = await self._with_old_contents(start, block_end, offset, new, mapping)
        await self.prepare_metadata_change()
        sizes = {name: node.size for name, node in self.children.items()}
        child, host_offset = await self.allocate_for(start, block_end - start)
        if zeros_around and host_offset >= sizes[child]:
            # space the file grew by reads as zeros: write the new bytes alone
            await self.children[child].write(host_offset + offset - start, payload)
        else:
            if zeros_around:    # reused space may hold old bytes: write the zeros too
                payload = await self._with_old_contents(start, block_end, offset, new, mapping)
            await self.children[child].write(host_offset, payload)
        await self.map_blocks(start, blocks, host_offset)
        if mapping.kind is MapKind.TRANSFORMED:
            self.decoded.forget(mapping.token)
        return count

    async def _with_old_contents(self, start: int, end: int, offset: int, new: bytes,
                                 mapping: Mapping) -> bytes:
        """Blocks start..end: `new` at `offset`, the partial first and last
        blocks filled with their old contents (copy-on-write)."""
        block_size = self.block_size
        buffer = bytearray(end - start)
        if offset > start:
            buffer[:block_size] = await self._old_block(start, mapping)
        if offset + len(new) < end and (end - start > block_size or offset == start):
            buffer[-block_size:] = await self._old_block(end - block_size, mapping)
        buffer[offset - start:offset - start + len(new)] = new
        return bytes(buffer)

    async def _old_block(self, guest_offset: int, mapping: Mapping) -> bytes:
        block_size = self.block_size
        if mapping.kind is MapKind.TRANSFORMED:
            return await self.decoded.get(mapping.token, self.decode_block)
        if mapping.kind is MapKind.ZERO:
            return bytes(block_size)
        length = min(block_size, self.size - guest_offset)
        old = await self.node.read_unallocated(guest_offset, length)
        return old.ljust(block_size, b"\0")

    async def write_zeroes(self, offset: int, length: int, *, may_unmap: bool = False) -> None:
        """Whole blocks not stored here become zero blocks (if the format
        has them); stored blocks and partial blocks get zero bytes."""
        if not self.zero_blocks:
            await super().write_zeroes(offset, length, may_unmap=may_unmap)
            return
        end = offset + length
        while offset < end:
            offset += await self._zero_step(offset, end - offset)

    async def _zero_step(self, offset: int, length: int) -> int:
        block_size = self.block_size
        head = -offset % block_size
        if head or length < block_size:
            count = min(length, head or length)
            await self.write(offset, bytes(count))
            return count
        async with self.lock:
            mapping = await self.lookup(offset, length - length % block_size)
            count = mapping.length - mapping.length % block_size or block_size
            count = min(count, length)
            if mapping.kind is MapKind.ZERO:
                return count
            if mapping.kind is MapKind.DATA:
                count = min(count, self.max_allocation)
                self.check_in_place(mapping.host_offset, count)
                await self.children[mapping.child or self.data_child].write(
                    mapping.host_offset, bytes(count))
                return count
            await self.prepare_metadata_change()
            await self.map_blocks(offset, count // block_size, None)
            if mapping.kind is MapKind.TRANSFORMED:
                self.decoded.forget(mapping.token)
            return count


# -- two-level tables ---------------------------------------------------------------------

#: classify(entry) -> (kind, host offset for DATA)
Classifier = Callable[[int], tuple[MapKind, int]]
Allocator = Callable[[int], Awaitable[int]]


class TwoLevelMap:
    """Guest block -> L1 entry (an L2 table's host offset, 0: none) -> L2
    entry, for any format laid out so.  L1 is kept in memory; L2 tables go
    through a `TableCache`; entries are written through (the data is
    already on disk), a new L2 table is written whole and flushed before
    the L1 entry names it.  Entries count host bytes in units of
    `entry_unit` (1; VMDK: 512-byte sectors); `classify` turns an L2 entry
    into a byte offset."""

    def __init__(self, *, file: Node, l1: array.array[int], l1_offset: int, block_bits: int,
                 l2_bits: int, codec: TableCodec, classify: Classifier,
                 check_table: Callable[[int], None], allocate: Allocator,
                 cache_bytes: int = 4 * 1024 * 1024, entry_unit: int = 1) -> None:
        self.file = file
        self.entry_unit = entry_unit
        self.l1 = l1
        self.l1_offset = l1_offset
        self.block_bits = block_bits
        self.l2_bits = l2_bits
        self.codec = codec
        self.classify = classify
        self.check_table = check_table
        self.allocate = allocate
        self.l2_bytes = codec.width << l2_bits
        self.cache = TableCache(cache_bytes // self.l2_bytes)
        #: sorted host offsets of the L2 tables, built when first needed
        self._table_offsets: list[int] | None = None

    @property
    def block_size(self) -> int:
        return 1 << self.block_bits

    @property
    def l1_span(self) -> int:
        """Guest bytes one L2 table maps."""
        return 1 << (self.block_bits + self.l2_bits)

    def l1_index(self, offset: int) -> int:
        return offset >> (self.block_bits + self.l2_bits)

    def l2_index(self, offset: int) -> int:
        return (offset >> self.block_bits) & ((1 << self.l2_bits) - 1)

    async def _read_table(self, offset: int) -> array.array[int]:
        self.check_table(offset)
        return self.decode_table(await self.file.read(offset, self.l2_bytes))

    def decode_table(self, raw: bytes) -> array.array[int]:
        """An L2 table's entries as `classify` takes them: the codec's
        integers (a subclass may translate a format's packed entries)."""
        return self.codec.decode(raw)

    async def l2_table(self, l2_offset: int) -> Table:
        return await self.cache.load(l2_offset, self._read_table)

    async def lookup(self, offset: int, length: int) -> Mapping:
        """The run from `offset` inside one L2 table: entries equal (or, for
        DATA, host-contiguous); a transformed block is a run of its own.
        (The hot path of every request: the table comes from the cache
        without a coroutine when it is there.)"""
        span_bits = self.block_bits + self.l2_bits
        l1_index = offset >> span_bits
        length = min(length, ((l1_index + 1) << span_bits) - offset)
        l2_offset = self.l1[l1_index] * self.entry_unit if l1_index < len(self.l1) else 0
        if not l2_offset:
            return Mapping(length, MapKind.UNALLOCATED)
        table = self.cache.get(l2_offset)
        if table is None:
            table = await self.l2_table(l2_offset)
        entries = table.entries
        block_size = 1 << self.block_bits
        index = (offset >> self.block_bits) & ((1 << self.l2_bits) - 1)
        within = offset & (block_size - 1)
        blocks = -(-(within + length) // block_size)
        first = entries[index]
        kind, host_offset = self.classify(first)
        if kind is MapKind.TRANSFORMED:
            return Mapping(min(length, block_size - within), kind, 0, first)
        step = block_size // self.entry_unit if kind is MapKind.DATA else 0
        run = 1
        while run < blocks and entries[index + run] == first + run * step:
            run += 1
        count = min(length, run * block_size - within)
        if kind is MapKind.DATA:
            return Mapping(count, kind, host_offset + within)
        return Mapping(count, kind)

    async def set_entries(self, guest_offset: int, values: list[int]) -> None:
        """Write `values` into the L2 entries from `guest_offset` (inside one
        table), allocating the table if there is none."""
        l1_index = self.l1_index(guest_offset)
        index = self.l2_index(guest_offset)
        if l1_index >= len(self.l1):
            raise CorruptImage(f"guest offset {guest_offset} lies beyond the L1 table")
        new_entries = array.array(self.codec.typecode, values)
        l2_offset = self.l1[l1_index] * self.entry_unit
        if l2_offset:
            table = await self.l2_table(l2_offset)
            table.entries[index:index + len(values)] = new_entries
            self.cache.changed(table)
            await self.file.write(l2_offset + index * self.codec.width,
                                  self.codec.encode(new_entries))
            return
        entries = self.codec.empty(1 << self.l2_bits)
        entries[index:index + len(values)] = new_entries
        l2_offset = await self.allocate(self.l2_bytes)
        await self.file.write(l2_offset, self.codec.encode(entries))
        await self.file.flush()         # the table is on disk before the L1 entry names it
        self.l1[l1_index] = l2_offset // self.entry_unit
        self.tables_changed()
        await self.file.write(self.l1_offset + l1_index * self.codec.width,
                              self.codec.encode([l2_offset // self.entry_unit]))
        self.cache.changed(Table(l2_offset, entries))

    def table_offsets(self) -> set[int]:
        """The host offsets of the L2 tables (a subclass adds copies it keeps)."""
        return {entry * self.entry_unit for entry in self.l1 if entry}

    def tables_changed(self) -> None:
        """A table was added: `overlaps_table` looks again."""
        self._table_offsets = None

    def overlaps_table(self, host_offset: int, length: int) -> bool:
        """Whether host bytes overlap an L2 table: a hostile entry aimed at
        one would make a data write rewrite the mapping itself."""
        if self._table_offsets is None:
            self._table_offsets = sorted(self.table_offsets())
        index = bisect.bisect_left(self._table_offsets, host_offset + length)
        return index > 0 and self._table_offsets[index - 1] + self.l2_bytes > host_offset

    async def map_run(self, guest_offset: int, count: int, first_value: int, step: int) -> None:
        """Entries first_value, first_value + step, ... for `count` blocks,
        split at L2 table boundaries."""
        while count:
            room = (1 << self.l2_bits) - self.l2_index(guest_offset)
            here = min(count, room)
            await self.set_entries(guest_offset, [first_value + number * step
                                                  for number in range(here)])
            guest_offset += here << self.block_bits
            first_value += here * step
            count -= here
