"""A small UDIF (.dmg) writer for the tests, from the layout in libyal/libmodi
"Mac OS disk image types" and keramics' udif page: the data fork (chunks,
each compressed on its own), the ``mish`` block tables in an XML plist or
in a classic binary resource fork, and the 512-byte ``koly`` trailer.

It makes the chunk kinds pydmg does not write (raw, zero, ignore, bzip2,
ADC, LZFSE) and damaged images for the hostile-image tests.  Test-only: it
is no part of imgfs.
"""
from __future__ import annotations

import bz2
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

SECTOR = 512
KOLY = struct.Struct(">4sIIIQQQQQII16sII128sQQ120sII128sIQ12x")
MISH = struct.Struct(">4sIQQQII24sII128sI")
CHUNK = struct.Struct(">IIQQQQ")

ZERO, RAW, IGNORE = 0x00000000, 0x00000001, 0x00000002
ADC, ZLIB, BZIP2, LZFSE = 0x80000004, 0x80000005, 0x80000006, 0x80000007
COMMENT, TERMINATOR = 0x7FFFFFFE, 0xFFFFFFFF


def adc_compress(data: bytes) -> bytes:
    """Greedy ADC: literals, and back-references in both match forms."""
    out = bytearray()
    literals = bytearray()
    last_seen: dict[bytes, int] = {}
    pos = 0

    def flush_literals() -> None:
        for start in range(0, len(literals), 128):
            piece = literals[start:start + 128]
            out.append(0x80 | (len(piece) - 1))
            out.extend(piece)
        literals.clear()

    while pos < len(data):
        key = data[pos:pos + 3]
        candidate = last_seen.get(key) if len(key) == 3 else None
        if pos > 0 and data[pos] == data[pos - 1] and data[pos:pos + 3] == bytes([data[pos]]) * 3:
            candidate = pos - 1          # a run of one byte: distance 1
        length = 0
        if candidate is not None and 0 < pos - candidate <= 65536:
            while length < 67 and pos + length < len(data) and \
                    data[candidate + length] == data[pos + length]:
                length += 1
        if length >= 4 or (length == 3 and pos - candidate <= 1024):
            flush_literals()
            distance = pos - candidate - 1
            if length <= 18 and distance < 1024:
                out += bytes([((length - 3) << 2) | (distance >> 8), distance & 0xFF])
            else:
                out += bytes([0x40 | (length - 4)]) + distance.to_bytes(2, "big")
            for index in range(pos, pos + length):
                last_seen[data[index:index + 3]] = index
            pos += length
            continue
        if len(key) == 3:
            last_seen[key] = pos
        literals.append(data[pos])
        pos += 1
    flush_literals()
    return bytes(out)


def compress(kind: int, data: bytes) -> bytes:
    if kind == ZLIB:
        return zlib.compress(data, 6)
    if kind == BZIP2:
        return bz2.compress(data)
    if kind == ADC:
        return adc_compress(data)
    if kind == LZFSE:
        import lzfse
        return bytes(lzfse.compress(data))
    if kind == RAW:
        return data
    return b""


@dataclass
class Chunk:
    kind: int
    sectors: int
    #: the guest bytes (None: zeros); `stored` overrides what is written
    data: bytes | None = None
    stored: bytes | None = None
    #: overrides of the entry's fields (hostile images)
    offset: int | None = None
    length: int | None = None
    start: int | None = None


@dataclass
class Partition:
    chunks: list[Chunk]
    name: str = "disk image"
    #: overrides (hostile images)
    start_sector: int | None = None
    entry_count: int | None = None


@dataclass
class Image:
    partitions: list[Partition]
    resource_fork: bool = False
    xml_override: bytes | None = None
    sector_count: int | None = None
    extra: dict[str, int] = field(default_factory=dict)


def chunk_bytes(chunk: Chunk) -> bytes:
    if chunk.stored is not None:
        return chunk.stored
    data = chunk.data if chunk.data is not None else bytes(chunk.sectors * SECTOR)
    return compress(chunk.kind, data)


def build(image: Image) -> bytes:
    """The whole .dmg file."""
    fork = bytearray()
    tables = []
    sector = 0
    for partition in image.partitions:
        start = sector if partition.start_sector is None else partition.start_sector
        entries = []
        within = 0
        for chunk in partition.chunks:
            stored = chunk_bytes(chunk)
            offset = len(fork) if chunk.offset is None else chunk.offset
            fork += stored
            length = len(stored) if chunk.length is None else chunk.length
            first = within if chunk.start is None else chunk.start
            entries.append(CHUNK.pack(chunk.kind, 0, first, chunk.sectors, offset, length))
            within += chunk.sectors
        tables.append((partition.name, mish_table(start, within, entries, len(fork),
                                                  partition.entry_count)))
        sector = start + within
    values = dict(data_fork_length=len(fork), rsrc_offset=0, rsrc_length=0, xml_offset=0,
                  xml_length=0, version=4, header_size=512,
                  sector_count=sector if image.sector_count is None else image.sector_count)
    if image.resource_fork:
        rsrc = resource_fork([table for _, table in tables])
        values.update(rsrc_offset=len(fork), rsrc_length=len(rsrc))
        fork += rsrc
    else:
        xml = image.xml_override if image.xml_override is not None else plist(tables)
        values.update(xml_offset=len(fork), xml_length=len(xml))
        fork += xml
    values.update(image.extra)
    return bytes(fork) + trailer(values)


def mish_table(start: int, sectors: int, entries: list[bytes], fork_end: int,
               entry_count: int | None = None) -> bytes:
    """A block table: its header, the chunk entries and a terminator."""
    entries = [*entries, CHUNK.pack(TERMINATOR, 0, sectors, 0, fork_end, 0)]
    count = len(entries) if entry_count is None else entry_count
    head = MISH.pack(b"mish", 1, start, sectors, 0, 0, len(entries), bytes(24), 2, 32,
                     bytes(128), count)
    return head + b"".join(entries)


def trailer(values: dict[str, int]) -> bytes:
    return KOLY.pack(b"koly", values["version"], values["header_size"], 1, 0, 0,
                     values["data_fork_length"], values["rsrc_offset"], values["rsrc_length"],
                     1, 1, bytes(16), 2, 32, bytes(128), values["xml_offset"],
                     values["xml_length"], bytes(120), 2, 32, bytes(128), 1,
                     values["sector_count"])


def write_zlib_image(source: Path, target: Path, chunk_size: int = 1024 * 1024) -> None:
    """A zlib UDIF (UDZO, as hdiutil makes it: 1 MiB chunks) of a raw file,
    written as it is read (the bench's images are large)."""
    entries = []
    offset = sector = 0
    with open(source, "rb") as raw, open(target, "wb") as out:
        while data := raw.read(chunk_size):
            data += bytes(-len(data) % SECTOR)
            stored = zlib.compress(data, 6)
            out.write(stored)
            entries.append(CHUNK.pack(ZLIB, 0, sector, len(data) // SECTOR, offset,
                                      len(stored)))
            offset += len(stored)
            sector += len(data) // SECTOR
        xml = plist([("disk image", mish_table(0, sector, entries, offset))])
        out.write(xml)
        out.write(trailer(dict(data_fork_length=offset, rsrc_offset=0, rsrc_length=0,
                               xml_offset=offset, xml_length=len(xml), version=4,
                               header_size=512, sector_count=sector)))


def plist(tables: list[tuple[str, bytes]]) -> bytes:
    import plistlib
    blkx = [{"Attributes": "0x0050", "CFName": name, "Data": table, "ID": str(index - 1),
             "Name": name} for index, (name, table) in enumerate(tables)]
    return plistlib.dumps({"resource-fork": {"blkx": blkx}}, fmt=plistlib.FMT_XML)


def resource_fork(tables: list[bytes]) -> bytes:
    """A classic resource fork: a 16-byte header (data offset, map offset,
    data length, map length), the data area of length-prefixed resources,
    and a minimal map."""
    data = b"".join(len(table).to_bytes(4, "big") + table for table in tables)
    data_offset = 256
    resource_map = bytes(30)
    map_offset = data_offset + len(data)
    header = struct.pack(">IIII", data_offset, map_offset, len(data), len(resource_map))
    return header.ljust(data_offset, b"\0") + data + resource_map


def pattern(length: int, seed: int = 1) -> bytes:
    """Guest bytes that compress somewhat and differ per sector."""
    out = bytearray()
    sector = 0
    while len(out) < length:
        out += (f"sector {sector:08d} seed {seed} ".encode() * 20)[:SECTOR // 2]
        out += bytes((sector * 7 + seed + index) % 251 for index in range(SECTOR // 2))
        sector += 1
    return bytes(out[:length])
