"""The VHDX log ([MS-VHDX] 2.3): finding the entries to replay, and
building new entries (pure, no I/O but the `read` the scanner is given).

The log is a ring of 4 KiB-aligned entries.  An entry is a 64-byte header,
descriptors of 32 bytes (padded to 4 KiB), then one 4 KiB data sector per
data descriptor; its CRC-32C covers the whole entry.  A data descriptor
rewrites one 4 KiB sector of the file: its first 8 and last 4 bytes are in
the descriptor, the 4084 between them in the data sector; a zero
descriptor zeroes a 4 KiB-multiple range.  Each entry names the tail, the
oldest entry still to be replayed; the entries to replay are the valid
sequence (consecutive in the ring, sequence numbers one apart) whose head
has the highest sequence number and whose tail is inside it.  Anything
else (a torn entry, a bad checksum, a sequence that does not hold its
tail) is ignored, as the spec says: a torn write never reached the file.
"""
from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable
from typing import NamedTuple

from imgfs.errors import CorruptImage

from .layout import KiB, checksum_ok, checksummed

LOG_SECTOR = 4 * KiB
ENTRY_SIGNATURE = b"loge"
ZERO_SIGNATURE = b"zero"
DATA_SIGNATURE = b"desc"
SECTOR_SIGNATURE = b"data"
ENTRY_HEADER = struct.Struct("<4sIIIQII16sQQ")
DESCRIPTOR = struct.Struct("<4sIQQQ")
SECTOR_HEAD = struct.Struct("<4sI")
SECTOR_PAYLOAD = LOG_SECTOR - 12          # between the signature+high and low words
#: an entry larger than this is taken as damage (real ones are a few sectors)
MAX_ENTRY_BYTES = 32 * 1024 * 1024
#: bytes of the log read at once while looking for entries
SCAN_CHUNK = 1024 * 1024


class Write(NamedTuple):
    """One change an entry makes to the file: bytes, or zeros (data None)."""

    file_offset: int
    length: int
    data: bytes | None


class LogEntry(NamedTuple):
    offset: int                 # in the log
    length: int
    tail: int
    sequence_number: int
    flushed_file_offset: int
    last_file_offset: int
    writes: tuple[Write, ...]


def descriptor_area(count: int) -> int:
    return -(-(ENTRY_HEADER.size + count * DESCRIPTOR.size) // LOG_SECTOR) * LOG_SECTOR


def parse_entry(raw: bytes, offset: int, log_guid: bytes, log_length: int) -> LogEntry | None:
    """The entry in `raw` (its whole length, read from the ring), or None
    when anything about it is not as a completely written entry is."""
    (signature, _, length, tail, sequence, count, _, entry_guid, flushed,
     last) = ENTRY_HEADER.unpack_from(raw)
    if signature != ENTRY_SIGNATURE or entry_guid != log_guid or not sequence or \
            length != len(raw) or tail % LOG_SECTOR or tail >= log_length:
        return None
    if descriptor_area(count) > length or not checksum_ok(raw):
        return None
    writes: list[Write] = []
    sector = descriptor_area(count)
    for index in range(count):
        kind, trailing, leading, file_offset, desc_sequence = DESCRIPTOR.unpack_from(
            raw, ENTRY_HEADER.size + index * DESCRIPTOR.size)
        if desc_sequence != sequence or file_offset % LOG_SECTOR:
            return None
        if kind == ZERO_SIGNATURE:
            if leading % LOG_SECTOR or not leading:     # (the zero length)
                return None
            writes.append(Write(file_offset, leading, None))
        elif kind == DATA_SIGNATURE:
            data = data_sector(raw, sector, sequence, leading, trailing)
            if data is None:
                return None
            writes.append(Write(file_offset, LOG_SECTOR, data))
            sector += LOG_SECTOR
        else:
            return None
    if sector != length:
        return None
    return LogEntry(offset, length, tail, sequence, flushed, last, tuple(writes))


def data_sector(raw: bytes, at: int, sequence: int, leading: int,
                trailing: int) -> bytes | None:
    """The 4 KiB a data descriptor writes, from its data sector at `at`."""
    if at + LOG_SECTOR > len(raw):
        return None
    signature, high = SECTOR_HEAD.unpack_from(raw, at)
    low, = struct.unpack_from("<I", raw, at + LOG_SECTOR - 4)
    if signature != SECTOR_SIGNATURE or (high << 32 | low) != sequence:
        return None
    return (struct.pack("<Q", leading) + raw[at + 8:at + 8 + SECTOR_PAYLOAD] +
            struct.pack("<I", trailing))


Reader = Callable[[int, int], Awaitable[bytes]]


async def read_ring(read: Reader, log_offset: int, log_length: int, start: int,
                    length: int) -> bytes:
    """`length` bytes of the ring from `start`, wrapping at its end."""
    first = min(length, log_length - start)
    raw = await read(log_offset + start, first)
    if first < length:
        raw += await read(log_offset, length - first)
    return raw


async def scan(read: Reader, log_offset: int, log_length: int,
               log_guid: bytes) -> dict[int, LogEntry]:
    """Every valid entry of the log, by its offset in the ring."""
    entries: dict[int, LogEntry] = {}
    for chunk_start in range(0, log_length, SCAN_CHUNK):
        chunk = await read(log_offset + chunk_start, min(SCAN_CHUNK, log_length - chunk_start))
        for within in range(0, len(chunk) - ENTRY_HEADER.size + 1, LOG_SECTOR):
            if chunk[within:within + 4] != ENTRY_SIGNATURE or \
                    chunk[within + 32:within + 48] != log_guid:
                continue
            length, = struct.unpack_from("<I", chunk, within + 8)
            if length % LOG_SECTOR or not length or length > min(log_length, MAX_ENTRY_BYTES):
                continue
            offset = chunk_start + within
            raw = await read_ring(read, log_offset, log_length, offset, length)
            entry = parse_entry(raw, offset, log_guid, log_length)
            if entry is not None:
                entries[offset] = entry
    return entries


def active_sequence(entries: dict[int, LogEntry], log_length: int) -> list[LogEntry]:
    """The entries to replay, tail first (empty: nothing to replay)."""
    best: list[LogEntry] = []
    for head in entries.values():
        sequence = sequence_ending_at(head, entries, log_length)
        if sequence and (not best or head.sequence_number > best[-1].sequence_number):
            best = sequence
    return best


def sequence_ending_at(head: LogEntry, entries: dict[int, LogEntry],
                       log_length: int) -> list[LogEntry]:
    """The entries from `head`'s tail up to `head`, each right after the
    previous one in the ring and one sequence number higher; empty when
    the chain breaks before it reaches the tail."""
    by_end = {((entry.offset + entry.length) % log_length, entry.sequence_number): entry
              for entry in entries.values()}
    chain = [head]
    while chain[-1].offset != head.tail:
        previous = by_end.get((chain[-1].offset, chain[-1].sequence_number - 1))
        if previous is None or len(chain) > len(entries):
            return []
        chain.append(previous)
    chain.reverse()
    return chain


def check_replay(sequence: list[LogEntry], file_size: int,
                 protected: list[tuple[int, int]]) -> None:
    """Refuse a log whose entries would write where no log may (the
    headers, the log itself) or that needs more file than there is."""
    if not sequence:
        return
    flushed = sequence[-1].flushed_file_offset
    if flushed > file_size:
        raise CorruptImage(f"the log needs the file to be at least {flushed} bytes, but it "
                           f"has {file_size} (truncated?)")
    for entry in sequence:
        for write in entry.writes:
            for start, end in protected:
                if write.file_offset < end and start < write.file_offset + write.length:
                    raise CorruptImage(f"log entry {entry.sequence_number} writes at "
                                       f"{write.file_offset:#x}, inside the headers or "
                                       "the log")


def replay_writes(sequence: list[LogEntry]) -> list[Write]:
    return [write for entry in sequence for write in entry.writes]


def replay_file_size(sequence: list[LogEntry], file_size: int) -> int:
    """The file's size once the log is replayed (2.3.3: at least the last
    entry's LastFileOffset)."""
    if not sequence:
        return file_size
    return max(file_size, sequence[-1].last_file_offset)


def apply_writes(raw: bytearray, start: int, writes: list[Write]) -> None:
    """Apply `writes` (in order) to `raw`, which holds the file from `start`."""
    end = start + len(raw)
    for write in writes:
        low = max(start, write.file_offset)
        high = min(end, write.file_offset + write.length)
        if low >= high:
            continue
        if write.data is None:
            raw[low - start:high - start] = bytes(high - low)
        else:
            raw[low - start:high - start] = write.data[low - write.file_offset:
                                                       high - write.file_offset]


def build_entry(*, sequence: int, tail: int, log_guid: bytes,
                sectors: list[tuple[int, bytes]], flushed_file_offset: int,
                last_file_offset: int) -> bytes:
    """An entry that rewrites the 4 KiB `sectors` (file offset, bytes)."""
    area = descriptor_area(len(sectors))
    length = area + len(sectors) * LOG_SECTOR
    head = bytearray(area)
    ENTRY_HEADER.pack_into(head, 0, ENTRY_SIGNATURE, 0, length, tail, sequence,
                           len(sectors), 0, log_guid, flushed_file_offset, last_file_offset)
    body = bytearray()
    for index, (file_offset, data) in enumerate(sectors):
        leading, = struct.unpack_from("<Q", data)
        trailing, = struct.unpack_from("<I", data, LOG_SECTOR - 4)
        DESCRIPTOR.pack_into(head, ENTRY_HEADER.size + index * DESCRIPTOR.size,
                             DATA_SIGNATURE, trailing, leading, file_offset, sequence)
        body += SECTOR_HEAD.pack(SECTOR_SIGNATURE, sequence >> 32)
        body += data[8:8 + SECTOR_PAYLOAD]
        body += struct.pack("<I", sequence & 0xFFFFFFFF)
    return checksummed(bytes(head + body))
