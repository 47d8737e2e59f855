"""streamOptimized as VMware writes it: grains appended in order, the
tables after them, the footer last.

Spec: VMware's "Virtual Disk Format 5.0" technote, "The Stream-Optimized
Compressed Sparse Extent", and libyal/libvmdk "Markers".  The header says
gdOffset = GD_AT_END; after the descriptor (up to `overhead`) come the
grains, each a marker (lba, compressed size) and a deflate stream padded
to a sector; grain tables, each behind a GT marker (VMware interleaves them
with the grains); a GD marker and the directory; a footer marker and a
copy of the header that names the directory; an end-of-stream marker.
Readers find the footer in the last three sectors, and streaming readers
skip each metadata marker's sectors.

`StreamWriter` appends without ever cutting the footer off: new grains
wait in memory (a bounded batch) and go to the file in a commit, into the
free space after the live directory.  A commit writes the new grains, the
grain tables they change and a new directory there, flushes, then
rewrites the one footer sector so that it names the new directory: a
crash at any point leaves a stream QEMU reads, holding everything up to
the last commit.  When the free space is too small, the file first grows
by a slack of zeros, by one write of the footer block past its end (on a
plain file the new size and the block appear together; elsewhere the
node is grown first, the one moment the end is not a footer).  The GD
marker counts the free space after the directory, so streaming readers
skip it; closing the image gives the slack back (the footer block copied
behind the directory, then the file cut there).
Grain tables and directories a commit replaces stay in the file,
unreferenced, behind their metadata markers.
"""
from __future__ import annotations

import array
import errno
import zlib
from typing import Any

from imgfs.errors import CorruptImage, Unsupported
from imgfs.mapped import MapKind, Mapping, TwoLevelMap, align_up

from .layout import (
    CODEC,
    COMPRESSION_DEFLATE,
    FLAG_COMPRESSED,
    FLAG_MARKERS,
    FLAG_VALID_NEWLINE,
    GD_AT_END,
    GRAIN_MARKER,
    GTE_ZEROED,
    MARKER_FOOTER,
    MARKER_GD,
    MARKER_GT,
    METADATA_MARKER,
    SECTOR,
    VMDK4_MAGIC,
    Geometry,
    SparseHeader,
)

GRAIN_SECTORS = 128
GTES_PER_GT = 512
NEWLINE_CHARS = b"\n \r\n"
#: the sectors before the first grain (header and descriptor), as VMware
OVERHEAD_SECTORS = 128


def metadata_marker(num_sectors: int, kind: int) -> bytes:
    return METADATA_MARKER.pack(num_sectors, 0, kind).ljust(SECTOR, b"\0")


def footer_block(header: SparseHeader, gd_sector: int) -> bytes:
    """Footer marker, the header naming the directory, end of stream."""
    return metadata_marker(1, MARKER_FOOTER) + header._replace(gd_offset=gd_sector).pack() + \
        bytes(SECTOR)


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
    parts.append(footer_block(header, gd_sector))
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


#: buffered compressed grains that make a commit without a flush
BATCH_BYTES = 16 * 1024 * 1024
#: free space a growing stream gains beyond what a commit needs
SLACK_BYTES = 4 * BATCH_BYTES
#: the footer block (footer marker, footer, end of stream) stays inside one
#: page, so that copying it or rewriting its footer is one uninterrupted
#: write (a killed process never leaves half of it)
PAGE = 4096
FOOTER_BLOCK = 3 * SECTOR


def block_position(offset: int) -> int:
    """The first place from `offset` (a sector boundary) where the footer
    block does not cross a page boundary."""
    if offset % PAGE > PAGE - FOOTER_BLOCK:
        return align_up(offset, PAGE)
    return offset


class StreamWriter:
    """Grains appended to a VMware-layout stream, in guest order, once.

    `tables` are the grain tables (grain sectors), `table_sectors` where
    each sits in the file, `gd_sector` the live directory, `free_start`
    the end of everything the live directory names (new data goes there),
    `gd_marker` the byte offset of the live directory's marker (None: not
    one to rewrite)."""

    def __init__(self, *, file: Any, header: SparseHeader, grain_size: int, gd_entries: int,
                 tables: dict[int, array.array[int]], table_sectors: dict[int, int],
                 gd_sector: int, gd_marker: int | None, free_start: int,
                 keep_zero_grains: bool) -> None:
        self.file = file
        self.header = header._replace(gd_offset=GD_AT_END)
        self.grain_size = grain_size
        self.gd_entries = gd_entries
        self.gd_bytes = align_up(gd_entries * CODEC.width, SECTOR)
        self.tables = tables
        self.table_sectors = table_sectors
        self.gd_sector = gd_sector
        self.gd_marker = gd_marker
        self.free_start = free_start
        #: the grain being filled, not yet compressed
        self.pending_index = -1
        self.pending = bytearray()
        #: counts writes; the version of the pending grain last staged
        self.version = 0
        self.staged_version = -1
        #: compressed grains waiting for the next commit, in guest order
        self.batch: dict[int, bytes] = {}
        self.batch_bytes = 0
        self.last_written = max((index * GTES_PER_GT + number
                                 for index, table in tables.items()
                                 for number, entry in enumerate(table) if entry), default=-1)
        #: an all-zero grain is written (it hides a backing file), not skipped
        self.keep_zero_grains = keep_zero_grains

    def entry(self, grain_index: int) -> int:
        table = self.tables.get(grain_index // GTES_PER_GT)
        return table[grain_index % GTES_PER_GT] if table is not None else 0

    def lookup(self, offset: int, length: int) -> Mapping:
        """The guest run at `offset` (within this extent) as the tables in
        memory, the batch and the pending grain say."""
        index = offset // self.grain_size
        within = offset % self.grain_size
        count = min(length, self.grain_size - within)
        if index == self.pending_index or index in self.batch:
            return Mapping(count, MapKind.TRANSFORMED, 0, ("pending", index, self.version))
        entry = self.entry(index)
        if entry:
            return Mapping(count, MapKind.TRANSFORMED, 0, (0, entry))
        return Mapping(count, MapKind.UNALLOCATED)

    def unwritten_grain(self, index: int) -> bytes | None:
        """A grain not in the file yet (pending or in the batch), or None."""
        if index == self.pending_index:
            return bytes(self.pending)
        record = self.batch.get(index)
        if record is None:
            return None
        _, size = GRAIN_MARKER.unpack_from(record)
        return zlib.decompress(record[GRAIN_MARKER.size:GRAIN_MARKER.size + size])

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
        """The pending grain done: compressed into the batch (a commit when
        the batch is full)."""
        if self.pending_index < 0:
            return
        self._stage_pending()
        self.last_written = self.pending_index
        self.pending_index = -1
        if self.batch_bytes >= BATCH_BYTES:
            await self.commit()

    def _stage_pending(self) -> None:
        """The pending grain's contents so far into the batch; it stays
        pending (a flush in the middle of a grain commits what it holds,
        and later writes to the grain commit it again)."""
        if self.staged_version == self.version:
            return                       # (staged already, unchanged since)
        self.staged_version = self.version
        index = self.pending_index
        known = self.entry(index) or index in self.batch
        if not known and not self.keep_zero_grains and \
                self.pending.count(0) == len(self.pending):
            return                       # zeros: left unallocated
        record = grain_record(index * self.grain_size // SECTOR, bytes(self.pending))
        self.batch_bytes += len(record) - len(self.batch.get(index, b""))
        self.batch[index] = record

    async def write_tail(self) -> None:
        """Everything written so far into the file (the caller flushes)."""
        if self.pending_index >= 0:
            self._stage_pending()
        if self.batch:
            await self.commit()
            await self.file.flush()

    async def commit(self) -> None:
        """The batch, the grain tables it changes and a new directory into
        the free space, flushed; then the footer sector naming them."""
        start = self.free_start
        data, gd_marker = self._new_data(start)
        needed = start + len(data) + SECTOR + self.gd_bytes
        block_at = self.file.size - FOOTER_BLOCK
        if block_position(needed) > block_at:
            block_at = await self._grow(needed)
        gd_area = block_at - gd_marker - SECTOR
        directory = array.array(CODEC.typecode, bytes(self.gd_entries * CODEC.width))
        for index, sector in self.table_sectors.items():
            directory[index] = sector
        await self.file.write(start, data + metadata_marker(gd_area // SECTOR, MARKER_GD) +
                              CODEC.encode(directory).ljust(self.gd_bytes, b"\0"))
        await self.file.flush()
        gd_sector = gd_marker // SECTOR + 1
        await self.file.write(block_at + SECTOR, self.header._replace(gd_offset=gd_sector).pack())
        await self._fit_marker()        # (the old one no longer counts the new data)
        self.gd_sector, self.gd_marker = gd_sector, gd_marker
        self.free_start = gd_marker + SECTOR + self.gd_bytes
        self.batch.clear()
        self.batch_bytes = 0

    def _new_data(self, start: int) -> tuple[bytes, int]:
        """The batch's grains and the grain tables they change, laid out
        from byte `start` (the tables updated); where the GD marker goes."""
        parts: list[bytes] = []
        position = start
        changed: set[int] = set()
        for index, record in self.batch.items():
            table = self.tables.setdefault(index // GTES_PER_GT,
                                           array.array(CODEC.typecode,
                                                       bytes(GTES_PER_GT * CODEC.width)))
            table[index % GTES_PER_GT] = position // SECTOR
            changed.add(index // GTES_PER_GT)
            parts.append(record)
            position += len(record)
        gt_sectors = GTES_PER_GT * CODEC.width // SECTOR
        for index in sorted(changed):
            parts.append(metadata_marker(gt_sectors, MARKER_GT))
            self.table_sectors[index] = position // SECTOR + 1
            parts.append(CODEC.encode(self.tables[index]))
            position += SECTOR + gt_sectors * SECTOR
        return b"".join(parts), position

    async def _grow(self, needed: int) -> int:
        """Grow the file by a copy of the footer block past its end (a slack
        of zeros, sparse on the host, before it); return where the block
        now is."""
        size = align_up(needed + FOOTER_BLOCK + SLACK_BYTES, PAGE)
        await self.file.write_growing(size - FOOTER_BLOCK,
                                      footer_block(self.header, self.gd_sector))
        return size - FOOTER_BLOCK

    async def _fit_marker(self, end: int | None = None) -> None:
        """The live GD marker counts the directory's sectors only (or up to
        `end`), so that streaming readers do not skip what follows."""
        if self.gd_marker is None:
            return
        area = self.gd_bytes if end is None else end - self.gd_marker - SECTOR
        await self.file.write(self.gd_marker, metadata_marker(area // SECTOR, MARKER_GD))

    async def give_back_slack(self) -> None:
        """Cut the file after the live directory (at closing): the footer
        block copied there first, so that the cut itself switches to it."""
        block_at = block_position(self.free_start)
        if block_at + FOOTER_BLOCK >= self.file.size or self.gd_marker is None:
            return
        await self.file.write(block_at, footer_block(self.header, self.gd_sector))
        await self._fit_marker(block_at)
        await self.file.flush()
        await self.file.truncate(block_at + FOOTER_BLOCK)
        await self.file.flush()


async def open_writer(*, file: Any, header: SparseHeader, tables: TwoLevelMap,
                      geometry: Geometry, keep_zero_grains: bool) -> StreamWriter:
    """A writer for an open stream: its grain tables in memory, new data
    after everything the live directory names."""
    grain_tables, table_sectors = {}, {}
    free_start = max(geometry.data_start, geometry.gd_offset +
                     align_up(geometry.gd_entries * CODEC.width, SECTOR))
    for index, gt_sector in enumerate(tables.l1):
        if not gt_sector:
            continue
        table = await tables.l2_table(gt_sector * SECTOR)
        grain_tables[index] = table.entries[:]
        table_sectors[index] = gt_sector
        free_start = max(free_start, gt_sector * SECTOR + geometry.gt_bytes)
        for entry in table.entries:
            if entry > GTE_ZEROED:
                free_start = max(free_start, await grain_end(file, entry))
    return StreamWriter(file=file, header=header, grain_size=geometry.grain_size,
                        gd_entries=geometry.gd_entries, tables=grain_tables,
                        table_sectors=table_sectors, gd_sector=geometry.gd_offset // SECTOR,
                        gd_marker=await gd_marker_at(file, geometry.gd_offset),
                        free_start=free_start, keep_zero_grains=keep_zero_grains)


async def gd_marker_at(file: Any, gd_offset: int) -> int | None:
    """Where the GD marker before the directory is (None: not one)."""
    at = gd_offset - SECTOR
    if at < SECTOR:
        return None
    _, size, kind = METADATA_MARKER.unpack_from(await file.read(at, METADATA_MARKER.size))
    return at if size == 0 and kind == MARKER_GD else None


async def grain_end(file: Any, entry: int) -> int:
    """One past the sector-padded end of the compressed grain at `entry`."""
    head = await file.read(entry * SECTOR, min(GRAIN_MARKER.size, file.size - entry * SECTOR))
    if len(head) < GRAIN_MARKER.size:
        raise CorruptImage(f"compressed grain at sector {entry} is cut short")
    size = GRAIN_MARKER.unpack(head)[1]
    return align_up(entry * SECTOR + GRAIN_MARKER.size + size, SECTOR)
