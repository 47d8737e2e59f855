"""Metadata machinery shared by every table-mapped format.

* `MetadataLock`: the per-node lock that serialises metadata changes; what
  runs under it is shielded from cancellation, so a cancelled request never
  stops between two writes that must both happen (data, then the entry).
* `TableCache`: decoded metadata tables (L2 tables, grain tables, block
  maps) keyed by their host offset, least recently used first, with dirty
  tracking and write-back in ascending host order.  A load that raced a
  change of any table reads again, so a table that was changed, written
  and dropped while the read was in flight never comes back stale.
* `DecodedCache`: the last few transformed blocks (decompressed clusters),
  keyed by the format's token for them.
* `TableCodec`: fixed-width integer tables, either byte order.

None of these knows a format; `imgfs.mapped` builds on them.
"""
from __future__ import annotations

import array
import sys
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, NamedTuple

import trio


class MetadataLock:
    """A trio lock whose held sections are shielded from cancellation.

    When free, it is taken without a trip through the scheduler: hot paths
    take it per request, and the round trip costs more than the request."""

    __slots__ = ("_lock", "_shields")

    def __init__(self) -> None:
        self._lock = trio.Lock()
        self._shields: list[trio.CancelScope] = []

    async def __aenter__(self) -> None:
        try:
            self._lock.acquire_nowait()
        except trio.WouldBlock:
            await self._lock.acquire()
        shield = trio.CancelScope(shield=True)
        shield.__enter__()
        self._shields.append(shield)

    def locked(self) -> bool:
        return self._lock.locked()

    async def __aexit__(self, *exc_info: Any) -> None:
        shield = self._shields.pop()
        try:
            shield.__exit__(*exc_info)
        finally:
            self._lock.release()


class TableCodec(NamedTuple):
    """Tables of `width`-byte unsigned entries (8 or 4) in one byte order."""

    width: int = 8
    big_endian: bool = True

    @property
    def typecode(self) -> str:
        return "Q" if self.width == 8 else "I"

    def _swap(self) -> bool:
        return self.big_endian != (sys.byteorder == "big")

    def decode(self, raw: bytes) -> array.array[int]:
        entries = array.array(self.typecode, raw[:len(raw) - len(raw) % self.width])
        if self._swap():
            entries.byteswap()
        return entries

    def encode(self, entries: array.array[int] | list[int]) -> bytes:
        packed = array.array(self.typecode, entries)
        if self._swap():
            packed.byteswap()
        return packed.tobytes()

    def empty(self, count: int) -> array.array[int]:
        return array.array(self.typecode, bytes(count * self.width))


class Table:
    """One cached table: where it lives, its decoded entries, and whether
    the entries in memory are newer than those on disk."""

    __slots__ = ("offset", "entries", "dirty")

    def __init__(self, offset: int, entries: array.array[int]) -> None:
        self.offset = offset
        self.entries = entries
        self.dirty = False


TableReader = Callable[[int], Awaitable["array.array[int]"]]
TableWriter = Callable[[Table], Awaitable[None]]


class TableCache:
    """Decoded tables by host offset, least recently used dropped first.

    Dirty tables are never dropped; `write_back` writes them in ascending
    host order (callers add the flushes their format's ordering needs).
    Every change bumps `changes`, which `load` uses to tell that a read
    raced one."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(capacity, 4)
        self.tables: OrderedDict[int, Table] = OrderedDict()
        self.changes = 0

    def __len__(self) -> int:
        return len(self.tables)

    def get(self, offset: int) -> Table | None:
        table = self.tables.get(offset)
        if table is not None:
            self.tables.move_to_end(offset)
        return table

    async def load(self, offset: int, read: TableReader) -> Table:
        """The table at `offset`, read by `read(offset)` when not cached."""
        while True:
            table = self.get(offset)
            if table is not None:
                return table
            changes = self.changes
            entries = await read(offset)
            table = self.get(offset)
            if table is not None:
                return table
            if self.changes == changes:
                return self.insert(Table(offset, entries))
            # a table changed while the read was in flight: read again

    def insert(self, table: Table) -> Table:
        """Add a table (keeping one already cached there) and trim clean ones."""
        existing = self.tables.get(table.offset)
        if existing is not None:
            return existing
        self.tables[table.offset] = table
        self._trim(keep=table.offset)
        return table

    def _trim(self, keep: int) -> None:
        excess = len(self.tables) - self.capacity
        if excess <= 0:
            return
        victims = []
        for offset, table in self.tables.items():
            if not table.dirty and offset != keep:
                victims.append(offset)
                if len(victims) == excess:
                    break
        for offset in victims:
            del self.tables[offset]

    def changed(self, table: Table, *, dirty: bool = False) -> None:
        """Record that `table`'s entries changed (written through, or left
        `dirty` for write-back).  A caller may have held it across a wait in
        which the clean table was dropped: it is put back, being newer than
        anything loaded since."""
        self.changes += 1
        table.dirty = table.dirty or dirty
        if self.tables.get(table.offset) is not table:
            self.tables[table.offset] = table
            self._trim(keep=table.offset)

    def dirty_tables(self) -> list[Table]:
        return sorted((table for table in self.tables.values() if table.dirty),
                      key=lambda table: table.offset)

    async def write_back(self, write: TableWriter) -> int:
        """Write every dirty table, lowest host offset first; return how many."""
        dirty = self.dirty_tables()
        for table in dirty:
            await write(table)
            table.dirty = False
            self.changes += 1
        self._trim(keep=-1)     # dirty tables may have held the cache past its capacity
        return len(dirty)

    def drop(self, offset: int) -> None:
        self.tables.pop(offset, None)
        self.changes += 1

    def clear(self) -> None:
        """Forget every table (after a repair rewrote them on disk)."""
        self.tables.clear()
        self.changes += 1


class DecodedCache:
    """The last few decoded (decompressed, decrypted) blocks by token.

    Requests that want a block while another is decoding it wait for that
    decode instead of decoding it again (a read-ahead sends several
    requests into one compressed block at once; over a network source the
    first one's read yields)."""

    def __init__(self, capacity: int = 4) -> None:
        self.capacity = max(capacity, 1)
        self.blocks: OrderedDict[Hashable, bytes] = OrderedDict()
        #: token -> set when its decode in flight ends (stored or failed)
        self.pending: dict[Hashable, trio.Event] = {}

    async def get(self, token: Hashable, decode: Callable[[Any], Awaitable[bytes]]) -> bytes:
        block = self.blocks.get(token)
        if block is None and token in self.pending:
            await self.pending[token].wait()
            block = self.blocks.get(token)      # (None: that decode failed or was forgotten)
        if block is not None:
            self.blocks.move_to_end(token)
            return block
        done = self.pending[token] = trio.Event()
        try:
            block = await decode(token)
            if self.pending.get(token) is done:     # not forgotten meanwhile
                self.blocks[token] = block
                while len(self.blocks) > self.capacity:
                    self.blocks.popitem(last=False)
        finally:
            if self.pending.get(token) is done:
                del self.pending[token]
            done.set()
        return block

    def forget(self, token: Hashable) -> None:
        self.blocks.pop(token, None)
        self.pending.pop(token, None)       # a decode in flight read the old block
