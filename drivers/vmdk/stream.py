"""streamOptimized as VMware writes it: grains appended in order, the
tables after them, the footer last.

Spec: VMware's "Virtual Disk Format 5.0" technote, "The Stream-Optimized
Compressed Sparse Extent", and libyal/libvmdk "Markers".  The header says
gdOffset = GD_AT_END; after the descriptor (up to `overhead`) come the
grains, each a marker (lba, compressed size) and a deflate stream padded
to a sector; then, for each grain table that maps a grain, a GT marker
and the table; a GD marker and the directory; a footer marker and a copy
of the header that names the directory; an end-of-stream marker.

`StreamWriter` appends: grain tables stay in memory, the file is cut back
to the end of its grains at the first write, and `write_tail` writes the
tables and footer at each flush, so that the file is a valid stream after
every flush (a crash between two flushes leaves one without its footer).
"""
from __future__ import annotations

import array
import errno
import zlib
from typing import Any

from imgfs.errors import Unsupported
from imgfs.mapped import MapKind, Mapping, align_up

from .layout import (
    CODEC,
    COMPRESSION_DEFLATE,
    FLAG_COMPRESSED,
    FLAG_MARKERS,
    FLAG_VALID_NEWLINE,
    GD_AT_END,
    GRAIN_MARKER,
    MARKER_FOOTER,
    MARKER_GD,
    MARKER_GT,
    METADATA_MARKER,
    SECTOR,
    VMDK4_MAGIC,
    SparseHeader,
)

GRAIN_SECTORS = 128
GTES_PER_GT = 512
NEWLINE_CHARS = b"\n \r\n"
#: the sectors before the first grain (header and descriptor), as VMware
OVERHEAD_SECTORS = 128


def metadata_marker(num_sectors: int, kind: int) -> bytes:
    return METADATA_MARKER.pack(num_sectors, 0, kind).ljust(SECTOR, b"\0")


def grain_record(lba: int, grain: bytes) -> bytes:
    """A compressed grain: marker, deflate stream, padding to a sector."""
    packed = zlib.compress(grain)
    record = GRAIN_MARKER.pack(lba, len(packed)) + packed
    return record.ljust(align_up(len(record), SECTOR), b"\0")


def stream_header(sectors: int, descriptor_sectors: int, gd_offset: int = GD_AT_END) -> \
        SparseHeader:
    return SparseHeader(VMDK4_MAGIC, 3, FLAG_VALID_NEWLINE | FLAG_COMPRESSED | FLAG_MARKERS,
                        sectors, GRAIN_SECTORS, 1, descriptor_sectors, GTES_PER_GT, 0,
                        gd_offset, OVERHEAD_SECTORS, 0, NEWLINE_CHARS, COMPRESSION_DEFLATE)


def stream_tail(header: SparseHeader, start: int, tables: dict[int, array.array[int]],
                gd_entries: int) -> bytes:
    """GT markers and tables, GD marker and directory, footer, end of
    stream, laid out from byte `start` (a sector boundary)."""
    parts: list[bytes] = []
    position = start
    directory = array.array(CODEC.typecode, bytes(gd_entries * CODEC.width))
    gt_sectors = GTES_PER_GT * CODEC.width // SECTOR
    for index in sorted(tables):
        parts.append(metadata_marker(gt_sectors, MARKER_GT))
        directory[index] = position // SECTOR + 1
        parts.append(CODEC.encode(tables[index]))
        position += SECTOR + gt_sectors * SECTOR
    gd_bytes = align_up(gd_entries * CODEC.width, SECTOR)
    parts.append(metadata_marker(gd_bytes // SECTOR, MARKER_GD))
    gd_sector = position // SECTOR + 1
    parts.append(CODEC.encode(directory).ljust(gd_bytes, b"\0"))
    parts.append(metadata_marker(1, MARKER_FOOTER))
    parts.append(header._replace(gd_offset=gd_sector).pack())
    parts.append(bytes(SECTOR))                  # end of stream: numSectors 0, type EOS
    return b"".join(parts)


def new_stream(sectors: int, descriptor: bytes) -> bytes:
    """An empty stream: header, descriptor, no grain, the tail."""
    descriptor_sectors = max(1, -(-len(descriptor) // SECTOR))
    header = stream_header(sectors, descriptor_sectors)
    head = bytearray(OVERHEAD_SECTORS * SECTOR)
    head[:SECTOR] = header.pack()
    head[SECTOR:SECTOR + len(descriptor)] = descriptor
    gd_entries = -(-sectors // (GRAIN_SECTORS * GTES_PER_GT))
    return bytes(head) + stream_tail(header, len(head), {}, gd_entries)


class StreamWriter:
    """Grains appended to a VMware-layout stream, in guest order, once."""

    def __init__(self, *, file: Any, header: SparseHeader, grain_size: int, gd_entries: int,
                 tables: dict[int, array.array[int]], end: int,
                 keep_zero_grains: bool) -> None:
        self.file = file
        self.header = header._replace(gd_offset=GD_AT_END)
        self.grain_size = grain_size
        self.gd_entries = gd_entries
        self.tables = tables
        #: where the next grain goes (the file is cut here while writing)
        self.end = end
        #: the grain being filled, not yet on disk
        self.pending_index = -1
        self.pending = bytearray()
        self.version = 0
        self.last_written = max((index * GTES_PER_GT + number
                                 for index, table in tables.items()
                                 for number, entry in enumerate(table) if entry), default=-1)
        #: the file ends with the tables and footer of what it holds
        self.tail_written = True
        #: an all-zero grain is written (it hides a backing file), not skipped
        self.keep_zero_grains = keep_zero_grains

    def entry(self, grain_index: int) -> int:
        table = self.tables.get(grain_index // GTES_PER_GT)
        return table[grain_index % GTES_PER_GT] if table is not None else 0

    def lookup(self, offset: int, length: int) -> Mapping:
        """The guest run at `offset` (within this extent) as the tables in
        memory and the pending grain say."""
        index = offset // self.grain_size
        within = offset % self.grain_size
        count = min(length, self.grain_size - within)
        if index == self.pending_index:
            return Mapping(count, MapKind.TRANSFORMED, 0, ("pending", index, self.version))
        entry = self.entry(index)
        if entry:
            return Mapping(count, MapKind.TRANSFORMED, 0, (0, entry))
        return Mapping(count, MapKind.UNALLOCATED)

    async def write(self, offset: int, data: memoryview, old_grain: Any) -> int:
        """Put a prefix of `data` (inside one grain) into the pending grain;
        return its length.  `old_grain(index)` gives a new grain's contents
        before the write (zeros, or the backing file's)."""
        index = offset // self.grain_size
        within = offset % self.grain_size
        count = min(len(data), self.grain_size - within)
        if index != self.pending_index:
            if index <= self.last_written or index < self.pending_index:
                raise Unsupported("streamOptimized images are written once, in order: grain "
                                  f"{index} is written already", errno_=errno.EIO)
            await self.flush_pending()
            self.pending_index = index
            self.pending = bytearray(await old_grain(index))
        self.pending[within:within + count] = data[:count]
        self.version += 1
        return count

    async def flush_pending(self) -> None:
        if self.pending_index < 0:
            return
        index = self.pending_index
        self.pending_index = -1
        if not self.keep_zero_grains and self.pending.count(0) == len(self.pending):
            return                       # zeros: left unallocated
        await self._cut()
        record = grain_record(index * self.grain_size // SECTOR, bytes(self.pending))
        await self.file.truncate(self.end + len(record))
        await self.file.write(self.end, record)
        table = self.tables.setdefault(index // GTES_PER_GT,
                                       array.array(CODEC.typecode, bytes(GTES_PER_GT * 4)))
        table[index % GTES_PER_GT] = self.end // SECTOR
        self.end += len(record)
        self.last_written = index

    async def _cut(self) -> None:
        """The first change since the tail was written drops the tail."""
        if self.file.size > self.end:
            await self.file.truncate(self.end)
        self.tail_written = False

    async def write_tail(self) -> None:
        await self.flush_pending()
        if self.tail_written:
            return
        await self._cut()
        tail = stream_tail(self.header, self.end, self.tables, self.gd_entries)
        await self.file.truncate(self.end + len(tail))
        await self.file.write(self.end, tail)
        await self.file.flush()
        self.tail_written = True
