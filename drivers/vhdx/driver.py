"""The VHDX driver: open (headers, log, regions, metadata, BAT), the parent,
the mapped layer's hooks, writes through the log, check, create, info.

VHDX is a one-level block map on `imgfs.mapped`: the BAT is kept in memory
(it is at most a few MiB for the largest disks) and checked whole at open,
so that `lookup` is index arithmetic.
"""
from __future__ import annotations

import array
import logging
import os
import sys
import uuid
from typing import Any

import numpy

from imgfs.block import ChildRef, Extent, Kind
from imgfs.check import CheckResult
from imgfs.errors import CorruptImage, InvalidImage, Unsupported
from imgfs.mapped import MapKind, MappedDriver, Mapping, align_up, create_image_file
from imgfs.node import OpenContext
from imgfs.tablecache import DecodedCache

from . import log as vlog
from .create import CREATE_OPTS, Parent, new_image
from .layout import (
    HEADER_AREA,
    HEADER_OFFSETS,
    HEADER_SIZE,
    METADATA_TABLE_SIZE,
    OFFSET_MASK,
    PARENT_LOCATOR,
    PAYLOAD_BLOCK_FULLY_PRESENT,
    PAYLOAD_BLOCK_NOT_PRESENT,
    PAYLOAD_BLOCK_PARTIALLY_PRESENT,
    PAYLOAD_BLOCK_UNMAPPED,
    PAYLOAD_BLOCK_ZERO,
    REGION_TABLE_OFFSETS,
    REGION_TABLE_SIZE,
    SB_BLOCK_NOT_PRESENT,
    SB_BLOCK_PRESENT,
    STATE_MASK,
    Geometry,
    Metadata,
    MiB,
    Region,
    check_block_offset,
    check_log_location,
    check_payload_entry,
    check_regions,
    current_header,
    decode_metadata,
    entry_offset,
    entry_state,
    format_linkage,
    make_entry,
    parent_filename,
    parse_linkage,
    parse_metadata_table,
    parse_parent_locator,
    parse_region_table,
)
from .layout import probe as probe_header

log = logging.getLogger("imgfs")

LOG_SECTOR = vlog.LOG_SECTOR
ENTRIES_PER_SECTOR = LOG_SECTOR // 8
#: sector bitmaps of partially present blocks kept in memory (at most
#: 64 KiB each)
BITMAP_CACHE_BLOCKS = 64

def payload_entries(entries: Any, geometry: Geometry) -> Any:
    """The payload entries of a BAT (a numpy array), without the sector
    bitmap entry that follows every `chunk_ratio` of them."""
    stride = geometry.chunk_ratio + 1
    padded = numpy.zeros(-(-len(entries) // stride) * stride, dtype=numpy.uint64)
    padded[:len(entries)] = entries
    return padded.reshape(-1, stride)[:, :-1].ravel()[:geometry.data_blocks]


class ReplayedView:
    """A dirty-log image opened read-only: the file as it would be after
    replaying the log, without writing it (reads of metadata go through it,
    and data reads that meet a logged range)."""

    def __init__(self, file: Any, writes: list[vlog.Write], size: int) -> None:
        self.file = file
        self.writes = writes
        self.size = size

    def touches(self, offset: int, length: int) -> bool:
        return any(write.file_offset < offset + length and
                   offset < write.file_offset + write.length for write in self.writes)

    async def read(self, offset: int, length: int) -> bytes:
        stored = min(length, max(0, self.file.size - offset))
        raw = bytearray(await self.file.read(offset, stored) if stored else b"")
        raw.extend(bytes(length - len(raw)))
        vlog.apply_writes(raw, offset, self.writes)
        return bytes(raw)


class VhdxDriver(MappedDriver):
    name = "vhdx"
    kind = Kind.FORMAT
    description = ("Hyper-V VHDX (read, write, create, check; log replay, also read-only; "
                   "differencing chains)")
    create_opts = CREATE_OPTS
    zero_blocks = True
    can_check = True
    supports_backing = True
    #: this (read-write) open replayed a log, as `check -r` reports
    log_replayed = False

    replayed: ReplayedView | None = None
    #: this open changed the image: the headers carry new write GUIDs and a
    #: log GUID, cleared again by a clean close
    writing = False
    #: where the next log entry goes, the oldest entry whose in-place
    #: writes may not be durable yet, and the last sequence number used
    log_head = 0
    log_tail = 0
    log_sequence = 0

    @staticmethod
    def probe(head: bytes, filename: str) -> int:
        return probe_header(head, filename)

    # -- opening -------------------------------------------------------------------------

    async def open(self, options: dict[str, Any], ctx: OpenContext) -> None:
        file = self.children["file"]
        headers = await file.read(0, min(file.size, HEADER_OFFSETS[1] + HEADER_SIZE))
        if len(headers) < HEADER_OFFSETS[1] + HEADER_SIZE:
            raise InvalidImage(f"file too short for VHDX headers ({file.size} bytes)")
        self.header, self.header_index = current_header(
            headers[HEADER_OFFSETS[0]:HEADER_OFFSETS[0] + HEADER_SIZE],
            headers[HEADER_OFFSETS[1]:HEADER_OFFSETS[1] + HEADER_SIZE])
        check_log_location(self.header, file.size)
        #: a log is replayed into the file only by a read-write open
        self.replay_in_place = not self.node.read_only and file.driver.writable
        if self.header.has_log:
            await self._replay_log()
        bat_region, metadata_region = await self._read_regions()
        self.metadata = await self._read_metadata(metadata_region)
        meta = self.metadata
        self.locator = self._read_locator() if meta.has_parent else {}
        self.geometry = Geometry(meta.block_size, meta.logical_sector_size,
                                 meta.virtual_size, meta.has_parent)
        self.size = meta.virtual_size
        self.sector_size = meta.logical_sector_size
        self.bat_region, self.metadata_region = bat_region, metadata_region
        self.bat = await self._read_bat(bat_region)
        self.setup_mapping(meta.block_size)
        if meta.has_parent:
            self.present_unit = meta.logical_sector_size
            self.bitmaps = DecodedCache(BITMAP_CACHE_BLOCKS)

    async def read_meta(self, offset: int, length: int) -> bytes:
        """File bytes of metadata: through the replayed log when there is one."""
        if self.replayed is not None:
            return await self.replayed.read(offset, length)
        file = self.children["file"]
        if offset + length > file.size:
            raise InvalidImage(f"metadata at {offset:#x} (+{length}) lies past the end of "
                               f"the {file.size}-byte file")
        return await file.read(offset, length)

    async def _replay_log(self) -> None:
        """Replay the log (read-write), or read through it (read-only)."""
        file = self.children["file"]
        header = self.header
        entries = await vlog.scan(file.read, header.log_offset, header.log_length,
                                  header.log_guid)
        sequence = vlog.active_sequence(entries, header.log_length)
        protected = [(0, REGION_TABLE_OFFSETS[0]),
                     (header.log_offset, header.log_offset + header.log_length)]
        vlog.check_replay(sequence, file.size, protected)
        if not sequence:
            return
        writes = vlog.replay_writes(sequence)
        size = vlog.replay_file_size(sequence, file.size)
        if not self.replay_in_place:
            self.replayed = ReplayedView(file, writes, size)
            log.info("%s: reading through %d log entries (read-only: the file is left "
                     "as it is)", self.node.filename, len(sequence))
            return
        await self._apply_log(writes, size)

    async def _apply_log(self, writes: list[vlog.Write], size: int) -> None:
        """2.3.3: the writes in order, the file grown, all made durable,
        and only then the log marked empty."""
        file = self.children["file"]
        for write in writes:
            end = write.file_offset + write.length
            if end > file.size:
                await file.truncate(end)
            await file.write(write.file_offset, write.data or bytes(write.length))
        if size > file.size:
            await file.truncate(size)
        await file.flush()
        await self.write_header(log_guid=bytes(16))
        self.log_replayed = True

    async def write_header(self, **changes: Any) -> None:
        """A new header (sequence number one higher) over the older of the
        two, made durable; a crash in between leaves the other current."""
        target = 1 - self.header_index
        header = self.header._replace(sequence_number=self.header.sequence_number + 1,
                                      **changes)
        file = self.children["file"]
        await file.write(HEADER_OFFSETS[target], header.pack())
        await file.flush()
        self.header, self.header_index = header, target

    async def _read_regions(self) -> tuple[Region, Region]:
        file = self.children["file"]
        for offset in REGION_TABLE_OFFSETS:
            regions = parse_region_table(await self.read_meta(offset, REGION_TABLE_SIZE))
            if regions is not None:
                return check_regions(regions, self.header, max(file.size, self._view_size()))
        raise InvalidImage("no valid VHDX region table (both have a bad signature or "
                           "checksum)")

    def _view_size(self) -> int:
        return self.replayed.size if self.replayed is not None else 0

    async def _read_metadata(self, region: Region) -> Metadata:
        table = await self.read_meta(region.offset, METADATA_TABLE_SIZE)
        items = parse_metadata_table(table, region.length)
        values: dict[uuid.UUID, bytes] = {}
        for item_id, item in items.items():
            if item.length and item.length <= 64 * 1024:
                values[item_id] = await self.read_meta(region.offset + item.offset, item.length)
        self.metadata_items = items
        self.metadata_values = values
        return decode_metadata(values)

    def _read_locator(self) -> dict[str, str]:
        raw = self.metadata_values.get(PARENT_LOCATOR)
        if raw is None:
            raise InvalidImage("a differencing image without a parent locator")
        locator = parse_parent_locator(raw)
        if parse_linkage(locator.get("parent_linkage", "")) is None:
            raise InvalidImage("the parent locator has no valid parent_linkage GUID")
        parent_filename(locator)        # (refuses a locator that names no path)
        return locator

    # -- the parent ------------------------------------------------------------------------

    def child_refs(self) -> dict[str, ChildRef]:
        if not self.metadata.has_parent:
            return {}
        return {"backing": ChildRef(parent_filename(self.locator), "vhdx")}

    async def attach(self) -> None:
        """2.6.2.6: the parent is the one whose data write GUID the child
        recorded (parent_linkage, or parent_linkage2 after a merge)."""
        backing = self.children.get("backing")
        if backing is None or not self.metadata.has_parent:
            return
        parent = backing.driver
        if not isinstance(parent, VhdxDriver):
            raise InvalidImage(f"parent {backing.filename} of a differencing VHDX is not "
                               "a VHDX image")
        expected = {parse_linkage(self.locator.get(key, ""))
                    for key in ("parent_linkage", "parent_linkage2")} - {None}
        if parent.header.data_write_guid not in expected:
            raise InvalidImage(
                f"parent {backing.filename} has data write GUID "
                f"{format_linkage(parent.header.data_write_guid)}, but "
                f"{self.node.filename} was made from "
                f"{self.locator.get('parent_linkage')} (the parent changed since)")

    async def _read_bat(self, region: Region) -> array.array[int]:
        geometry = self.geometry
        needed = geometry.bat_entries * 8
        if needed > region.length:
            raise InvalidImage(f"BAT region of {region.length} bytes is too small for "
                               f"{geometry.bat_entries} entries")
        bat = array.array("Q", await self.read_meta(region.offset, needed))
        if sys.byteorder != "little":
            bat.byteswap()
        self._check_bat(bat)
        return bat

    def reserved_spans(self) -> list[tuple[int, int]]:
        """Host ranges no block may overlap: the log and the regions."""
        header = self.header
        spans = [(header.log_offset, header.log_offset + header.log_length),
                 (self.bat_region.offset, self.bat_region.end)]
        metadata = self.metadata_region
        spans.append((metadata.offset, metadata.end))
        return spans

    def _check_bat(self, bat: array.array[int]) -> None:
        """Every entry (states, offsets), and no two blocks overlapping (a
        write to one guest block must never change another); vectorised,
        as a BAT may have millions of entries."""
        geometry = self.geometry
        file_size = max(self.children["file"].size, self._view_size())
        entries = numpy.frombuffer(bat, dtype=numpy.uint64)
        payload = payload_entries(entries, geometry)
        states = payload & STATE_MASK
        known = (states <= PAYLOAD_BLOCK_UNMAPPED) | (states == PAYLOAD_BLOCK_FULLY_PRESENT)
        if geometry.has_parent:
            known |= states == PAYLOAD_BLOCK_PARTIALLY_PRESENT
        unknown = numpy.flatnonzero(~known)
        if unknown.size:
            first = int(unknown[0])
            check_payload_entry(int(payload[first]), first, geometry, file_size, [])
        used = [(payload, geometry.block_size, "block")]
        if geometry.has_parent:
            bitmaps = entries[geometry.chunk_ratio::geometry.chunk_ratio + 1]
            states = bitmaps & STATE_MASK
            unknown = numpy.flatnonzero((states != SB_BLOCK_PRESENT) &
                                        (states != SB_BLOCK_NOT_PRESENT))
            if unknown.size:
                raise CorruptImage(f"sector bitmap {int(unknown[0])} has the unknown BAT "
                                   f"state {int(states[unknown[0]])}")
            used.append((bitmaps, MiB, "sector bitmap"))
        self._check_placement(used, file_size)

    def _check_placement(self, used: list[tuple[Any, int, str]], file_size: int) -> None:
        """Present blocks start inside the file, clear of the header area,
        the log, the regions and each other."""
        reserved = self.reserved_spans()
        starts, ends = [], []
        for entries, length, what in used:
            present = numpy.flatnonzero((entries & STATE_MASK) >= PAYLOAD_BLOCK_FULLY_PRESENT)
            offsets = entries[present] & OFFSET_MASK
            bad = (offsets < HEADER_AREA) | (offsets >= file_size)
            for start, end in reserved:
                bad |= (offsets < end) & (offsets + length > start)
            if bad.any():
                first = int(numpy.flatnonzero(bad)[0])
                check_block_offset(int(offsets[first]), length, file_size, reserved,
                                   f"{what} {int(present[first])}")
            starts.append(offsets)
            ends.append(offsets + length)
        start_all, end_all = numpy.concatenate(starts), numpy.concatenate(ends)
        order = numpy.argsort(start_all, kind="stable")
        start_all, end_all = start_all[order], end_all[order]
        clash = numpy.flatnonzero(start_all[1:] < end_all[:-1])
        if clash.size:
            at = int(clash[0])
            raise CorruptImage(f"the blocks at {int(start_all[at]):#x} and "
                               f"{int(start_all[at + 1]):#x} overlap")

    # -- the mapped layer's hooks -------------------------------------------------------------

    def classify(self, block: int) -> tuple[MapKind, int]:
        """A whole block's state (partially present ones: see `lookup`)."""
        entry = self.bat[self.geometry.payload_index(block)]
        state = entry_state(entry)
        if state == PAYLOAD_BLOCK_FULLY_PRESENT:
            return MapKind.DATA, entry_offset(entry)
        if state == PAYLOAD_BLOCK_NOT_PRESENT:
            return MapKind.UNALLOCATED, 0
        if state == PAYLOAD_BLOCK_PARTIALLY_PRESENT:
            return MapKind.TRANSFORMED, entry_offset(entry)     # (a marker, never returned)
        # zero, and (as QEMU) undefined and unmapped blocks, which 2.5.1
        # lets read as anything
        return MapKind.ZERO, 0

    async def lookup(self, offset: int, length: int) -> Mapping:
        block_size = self.block_size
        block, within = divmod(offset, block_size)
        kind, host = self.classify(block)
        if kind is MapKind.TRANSFORMED:
            return await self._partial_lookup(block, within, host, length)
        run = block_size - within
        while run < length and block + 1 < self.geometry.data_blocks:
            next_kind, next_host = self.classify(block + 1)
            if next_kind is not kind or (kind is MapKind.DATA and
                                         next_host != host + (run + within)):
                break
            block += 1
            run += block_size
        run = min(run, length)
        if kind is MapKind.DATA:
            return Mapping(run, kind, host + within)
        return Mapping(run, kind)

    async def _partial_lookup(self, block: int, within: int, host: int,
                              length: int) -> Mapping:
        """A partially present block: the run of sectors from `within`
        whose sector bitmap bits (2.5.2) are all set (data here) or all
        clear (the parent's, though the block has host space)."""
        sector = self.metadata.logical_sector_size
        bits = int.from_bytes(await self._block_bitmap(block), "little") >> (within // sector)
        present = bool(bits & 1)
        same = bits ^ (bits + 1) if present else bits & -bits
        sectors = same.bit_length() - 1 if same else self.block_size // sector
        run = min(length, sectors * sector - within % sector,
                  self.block_size - within)
        kind = MapKind.DATA if present else MapKind.UNALLOCATED
        return Mapping(run, kind, host + within)

    def _bitmap_span(self, block: int) -> tuple[int, int]:
        """Host offset and length of `block`'s bits in its chunk's sector
        bitmap block (one bit per logical sector, least significant first)."""
        geometry = self.geometry
        chunk, index = divmod(block, geometry.chunk_ratio)
        entry = self.bat[geometry.bitmap_index(chunk)]
        if entry_state(entry) != SB_BLOCK_PRESENT:
            raise CorruptImage(f"block {block} is partially present, but its sector bitmap "
                               "block is not")
        length = self.block_size // self.metadata.logical_sector_size // 8
        return entry_offset(entry) + index * length, length

    async def _block_bitmap(self, block: int) -> bytes:
        async def read(block: Any) -> bytes:
            offset, length = self._bitmap_span(block)
            return await self.read_meta(offset, length)
        return await self.bitmaps.get(block, read)

    async def block_status(self, offset: int, length: int) -> Extent:
        extent = await super().block_status(offset, length)
        replayed = self.replayed
        if replayed is not None and extent.host_offset is not None and \
                replayed.touches(extent.host_offset, extent.length):
            return Extent(extent.length, extent.status, token=("replayed", extent.host_offset))
        return extent

    async def read_data(self, offset: int, length: int, extent: Extent) -> bytes:
        token = extent.token
        if isinstance(token, tuple) and token[0] == "replayed" and self.replayed is not None:
            return await self.replayed.read(token[1], length)
        return await super().read_data(offset, length, extent)

    # -- writes --------------------------------------------------------------------------------

    async def write(self, offset: int, data: bytes) -> None:
        await self._start_writing()
        if self.metadata.has_parent:
            await self._give_blocks_space(offset, len(data))
        await super().write(offset, data)

    async def _give_blocks_space(self, offset: int, length: int) -> None:
        """Differencing images: a block that is not present gets host space
        and an empty sector bitmap (partially present, no sector yet), so
        that writes fill it sector by sector and the rest still reads from
        the parent, as Hyper-V does (no copy of the parent's block)."""
        first, last = offset // self.block_size, (offset + length - 1) // self.block_size
        if all(self._state(block) != PAYLOAD_BLOCK_NOT_PRESENT
               for block in range(first, last + 1)):
            return
        async with self.lock:
            geometry = self.geometry
            changed: set[int] = set()
            for block in range(first, last + 1):
                if self._state(block) != PAYLOAD_BLOCK_NOT_PRESENT:
                    continue
                bitmap_index = geometry.bitmap_index(block // geometry.chunk_ratio)
                if entry_state(self.bat[bitmap_index]) != SB_BLOCK_PRESENT:
                    self.bat[bitmap_index] = make_entry(SB_BLOCK_PRESENT,
                                                        await self.allocate(MiB))
                    changed.add(bitmap_index)
                index = geometry.payload_index(block)
                self.bat[index] = make_entry(PAYLOAD_BLOCK_PARTIALLY_PRESENT,
                                             await self.allocate(self.block_size))
                changed.add(index)
                self.bitmaps.forget(block)
            await self._log_bat_entries(changed)

    def _state(self, block: int) -> int:
        return entry_state(self.bat[self.geometry.payload_index(block)])

    async def mark_present(self, guest_offset: int, length: int) -> None:
        """Set the sector bitmap bits of the sectors just written (through
        the log, as the BAT); a block whose bits are all set becomes fully
        present."""
        block_size, sector = self.block_size, self.metadata.logical_sector_size
        end = guest_offset + length
        while guest_offset < end:
            block, within = divmod(guest_offset, block_size)
            count = min(end - guest_offset, block_size - within)
            await self._set_bits(block, within // sector, count // sector)
            guest_offset += count

    async def _set_bits(self, block: int, first: int, count: int) -> None:
        span_offset, span_length = self._bitmap_span(block)
        start = span_offset - span_offset % LOG_SECTOR
        end = align_up(span_offset + span_length, LOG_SECTOR)
        old = await self.read_meta(start, end - start)
        bits = int.from_bytes(old[span_offset - start:span_offset - start + span_length],
                              "little") | ((1 << count) - 1) << first
        new = bytearray(old)
        new[span_offset - start:span_offset - start + span_length] = \
            bits.to_bytes(span_length, "little")
        sectors = [(start + at, bytes(new[at:at + LOG_SECTOR]))
                   for at in range(0, len(new), LOG_SECTOR)
                   if new[at:at + LOG_SECTOR] != old[at:at + LOG_SECTOR]]
        if sectors:
            await self._log_and_write(sectors)
        self.bitmaps.forget(block)
        if bits == (1 << span_length * 8) - 1:
            index = self.geometry.payload_index(block)
            self.bat[index] = make_entry(PAYLOAD_BLOCK_FULLY_PRESENT,
                                         entry_offset(self.bat[index]))
            await self._log_bat_entries({index})

    async def write_zeroes(self, offset: int, length: int, *, may_unmap: bool = False) -> None:
        await self._start_writing()
        await super().write_zeroes(offset, length, may_unmap=may_unmap)

    async def _start_writing(self) -> None:
        """Before the first change (2.2.2): new file and data write GUIDs,
        and a new log GUID, so that entries of an older log never count."""
        if self.writing:
            return
        async with self.lock:
            if self.writing:
                return
            self.log_sequence = 0
            self.log_head = self.log_tail = 0
            await self.write_header(file_write_guid=uuid.uuid4().bytes_le,
                                    data_write_guid=uuid.uuid4().bytes_le,
                                    log_guid=uuid.uuid4().bytes_le)
            self.writing = True

    async def allocate(self, length: int) -> int:
        """Payload blocks go at the end of the file, 1 MiB aligned (2.5)."""
        host_offset = align_up(self.file_end, MiB)
        await self.grow_file(host_offset + length)
        return host_offset

    async def map_blocks(self, guest_offset: int, count: int, host_offset: int | None) -> None:
        """New BAT entries, through the log: the entry (with the data
        before it) made durable, then the BAT sectors written in place."""
        geometry = self.geometry
        first = guest_offset // self.block_size
        changed: set[int] = set()
        for number in range(count):
            index = geometry.payload_index(first + number)
            if host_offset is None:
                self.bat[index] = make_entry(PAYLOAD_BLOCK_ZERO)
            else:
                self.bat[index] = make_entry(PAYLOAD_BLOCK_FULLY_PRESENT,
                                             host_offset + number * self.block_size)
            changed.add(index)
        await self._log_bat_entries(changed)

    async def _log_bat_entries(self, indexes: set[int]) -> None:
        """The BAT sectors holding these entries, through the log."""
        sectors = sorted({index // ENTRIES_PER_SECTOR for index in indexes})
        await self._log_and_write([(self.bat_region.offset + sector * LOG_SECTOR,
                                    self._bat_sector(sector)) for sector in sectors])

    def _bat_sector(self, sector: int) -> bytes:
        entries = self.bat[sector * ENTRIES_PER_SECTOR:(sector + 1) * ENTRIES_PER_SECTOR]
        raw = entries.tobytes() if sys.byteorder == "little" else _swapped(entries)
        return raw.ljust(LOG_SECTOR, b"\0")

    async def _log_and_write(self, sectors: list[tuple[int, bytes]]) -> None:
        """2.3: one log entry, flushed; then the sectors in place.  Entries
        pile up from the tail until a flush makes their in-place writes
        durable; an entry that does not fit before the end of the ring
        starts it again after a flush."""
        file = self.children["file"]
        header = self.header
        length = vlog.descriptor_area(len(sectors)) + len(sectors) * LOG_SECTOR
        if length > header.log_length:
            raise Unsupported(f"a BAT update of {len(sectors)} sectors does not fit the "
                              f"{header.log_length}-byte log")
        if self.log_head + length > header.log_length:
            await file.flush()
            self.log_head = self.log_tail = 0
        self.log_sequence += 1
        entry = vlog.build_entry(sequence=self.log_sequence, tail=self.log_tail,
                                 log_guid=header.log_guid, sectors=sectors,
                                 flushed_file_offset=file.size, last_file_offset=file.size)
        await file.write(header.log_offset + self.log_head, entry)
        await file.flush()          # the data and the entry, before the BAT changes
        self.log_head += length
        for file_offset, data in sectors:
            await file.write(file_offset, data)

    async def flush(self) -> None:
        """In-place writes durable: the log may start again from its head."""
        if self.writing:
            async with self.lock:
                await self.children["file"].flush()
                self.log_tail = self.log_head

    async def aclose(self) -> None:
        """A clean close: everything durable, then the log GUID cleared so
        that nothing is left to replay."""
        if not self.writing:
            return
        async with self.lock:
            await self.children["file"].flush()
            await self.write_header(log_guid=bytes(16))
            self.writing = False

    # -- check ---------------------------------------------------------------------------------

    async def check(self, repair: str | None = None) -> CheckResult:
        """As qemu-img check: the BAT was checked at open (a bad entry
        refuses the image); a log to replay is the one corruption, which
        the read-write open of a repair has already replayed."""
        result = CheckResult()
        if self.replayed is not None:
            result.corruptions = 1
            result.messages.append("ERROR: the log has entries to replay (repair with "
                                   "imgfs check -r all)")
        elif self.log_replayed and repair is not None:
            result.corruptions_fixed = 1
        return result

    # -- creation ------------------------------------------------------------------------------

    @classmethod
    async def create(cls, target: Any, size: int, options: dict[str, Any],
                     ctx: OpenContext) -> None:
        parent = await cls._parent_of_new_image(os.fspath(target), options["backing_file"],
                                                ctx) if options["backing_file"] else None
        pieces, length = new_image(size, options, lambda: uuid.uuid4().bytes_le, parent)
        await create_image_file(target, ctx, pieces[0][1], length, more=pieces[1:])

    @staticmethod
    async def _parent_of_new_image(target: str, backing: str, ctx: OpenContext) -> Parent:
        """What the locator of a new differencing image records: the
        parent's path relative to the child's folder and its data write
        GUID (read from the parent, which must be a VHDX)."""
        from imgfs.graph import open_image  # (only creating a child needs the graph)
        folder = os.path.dirname(os.path.abspath(target))
        path = os.path.join(folder, backing)
        node = await open_image(path, OpenContext(read_only=True, force_share=True,
                                                  locking=ctx.locking), fmt="vhdx")
        try:
            driver = node.driver
            if not isinstance(driver, VhdxDriver):
                raise Unsupported("the parent of a VHDX image must be a VHDX image")
            return Parent(os.path.relpath(os.path.abspath(path), folder),
                          driver.header.data_write_guid,
                          driver.metadata.logical_sector_size,
                          driver.metadata.physical_sector_size)
        finally:
            await node.aclose()

    # -- information ----------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        return {"cluster-size": self.block_size}


def _swapped(entries: array.array[int]) -> bytes:
    copy = array.array("Q", entries)
    copy.byteswap()
    return copy.tobytes()


DRIVERS = [VhdxDriver]
