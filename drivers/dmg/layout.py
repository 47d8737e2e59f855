"""UDIF on disk: the ``koly`` trailer, the ``mish`` block tables (from the
XML plist or the binary resource fork) and the chunk table (pure, no I/O).

See the package docstring for the layout.  Probing imports only this module.
"""
from __future__ import annotations

import array
import bisect
import plistlib
import struct
from collections.abc import Iterator
from typing import NamedTuple
from xml.parsers.expat import ExpatError

from imgfs.errors import CorruptImage, InvalidImage, Unsupported

MAGIC = b"koly"
MISH_MAGIC = b"mish"
#: the trailer: the last 512 bytes of the file (libmodi "UDIF resource file")
TRAILER_SIZE = 512
UDIF_VERSION = 4
SECTOR = 512

#: chunk types (libmodi "block table entry", keramics "UDIF block table")
ZERO_FILL = 0x00000000
RAW = 0x00000001
IGNORE = 0x00000002
ADC = 0x80000004
ZLIB = 0x80000005
BZIP2 = 0x80000006
LZFSE = 0x80000007
LZMA = 0x80000008
COMMENT = 0x7FFFFFFE
TERMINATOR = 0xFFFFFFFF
ZERO_TYPES = (ZERO_FILL, IGNORE)
COMPRESSED_TYPES = {ADC: "ADC", ZLIB: "zlib", BZIP2: "bzip2", LZFSE: "LZFSE"}
SKIPPED_TYPES = (COMMENT, TERMINATOR)

#: as QEMU: a chunk whose bytes are read into memory (raw, compressed) is at
#: most 64 MiB stored and 64 MiB decoded; zero chunks may be any length
MAX_CHUNK_BYTES = 64 * 1024 * 1024
MAX_CHUNK_SECTORS = MAX_CHUNK_BYTES // SECTOR
#: the XML plist or resource fork is parsed in memory: a real one is well
#: under a megabyte (40 bytes a chunk), so this bounds a hostile one
MAX_METADATA_BYTES = 16 * 1024 * 1024
#: the largest virtual size a 64-bit file offset can address
MAX_SECTORS = (1 << 63) // SECTOR

TRAILER = struct.Struct(">4sIIIQQQQQII16sII128sQQ120sII128sIQ12x")
MISH_HEADER = struct.Struct(">4sIQQQII24sII128sI")
CHUNK_ENTRY = struct.Struct(">IIQQQQ")
#: classic resource fork header: data offset, map offset, data length, map length
RSRC_HEADER = struct.Struct(">IIII")


class Trailer(NamedTuple):
    magic: bytes
    version: int
    header_size: int
    flags: int
    running_data_fork_offset: int
    data_fork_offset: int
    data_fork_length: int
    rsrc_fork_offset: int
    rsrc_fork_length: int
    segment_number: int
    segment_count: int
    segment_id: bytes
    data_checksum_type: int
    data_checksum_size: int
    data_checksum: bytes
    xml_offset: int
    xml_length: int
    reserved1: bytes
    master_checksum_type: int
    master_checksum_size: int
    master_checksum: bytes
    image_variant: int
    sector_count: int

    @classmethod
    def unpack(cls, raw: bytes) -> Trailer:
        if len(raw) < TRAILER.size:
            raise InvalidImage(f"file too short for a UDIF trailer ({len(raw)} bytes)")
        return cls(*TRAILER.unpack_from(raw, len(raw) - TRAILER.size))

    def pack(self) -> bytes:
        return TRAILER.pack(*self)


class MishHeader(NamedTuple):
    magic: bytes
    version: int
    start_sector: int
    sector_count: int
    data_offset: int
    buffers_needed: int
    block_descriptors: int
    reserved: bytes
    checksum_type: int
    checksum_size: int
    checksum: bytes
    entry_count: int


# -- the trailer ----------------------------------------------------------------------------

def check_trailer(trailer: Trailer, file_size: int) -> None:
    """Every field that sizes a read, an offset or the disk."""
    if trailer.magic != MAGIC:
        raise InvalidImage(f"no UDIF trailer: the last {TRAILER_SIZE} bytes start with "
                           f"{trailer.magic!r}, not {MAGIC!r}")
    if trailer.version != UDIF_VERSION or trailer.header_size != TRAILER_SIZE:
        raise Unsupported(f"UDIF trailer version {trailer.version} of {trailer.header_size} "
                          f"bytes is not supported (version {UDIF_VERSION}, "
                          f"{TRAILER_SIZE} bytes expected)")
    if trailer.sector_count > MAX_SECTORS:
        raise CorruptImage(f"UDIF sector count {trailer.sector_count} is too large")
    if trailer.data_fork_offset > file_size:
        raise CorruptImage(f"UDIF data fork offset {trailer.data_fork_offset} lies beyond "
                           f"the end of the {file_size}-byte file")
    metadata_offset, metadata_length = metadata_range(trailer)
    if metadata_length == 0:
        raise CorruptImage("UDIF image without block tables (neither a resource fork nor "
                           "an XML plist)")
    if metadata_length > MAX_METADATA_BYTES:
        raise Unsupported(f"UDIF block tables of {metadata_length} bytes are too large "
                          f"(at most {MAX_METADATA_BYTES})")
    if metadata_offset + metadata_length > file_size:
        raise CorruptImage(f"UDIF block tables at offset {metadata_offset} "
                           f"({metadata_length} bytes) run past the end of the "
                           f"{file_size}-byte file")


def metadata_range(trailer: Trailer) -> tuple[int, int]:
    """Where the block tables are: the resource fork if there is one (as
    QEMU, which prefers it), else the XML plist."""
    if trailer.rsrc_fork_length:
        return trailer.rsrc_fork_offset, trailer.rsrc_fork_length
    return trailer.xml_offset, trailer.xml_length


# -- finding the mish block tables -----------------------------------------------------------

def mish_blocks_from_plist(document: bytes) -> list[bytes]:
    """The ``Data`` of every entry of ``resource-fork`` / ``blkx``.  plistlib
    refuses entity declarations (no entity expansion) and loads no DTD."""
    try:
        root = plistlib.loads(document, fmt=plistlib.FMT_XML)
    except (plistlib.InvalidFileException, ExpatError, ValueError,
            TypeError, KeyError, IndexError, AttributeError, OverflowError) as exc:
        raise CorruptImage(f"the UDIF XML plist is not a valid property list ({exc})") \
            from None
    if not isinstance(root, dict) or not isinstance(root.get("resource-fork"), dict):
        raise CorruptImage("the UDIF XML plist has no resource-fork dictionary")
    blkx = root["resource-fork"].get("blkx")
    if not isinstance(blkx, list):
        raise CorruptImage("the UDIF XML plist has no blkx array")
    blocks = []
    for entry in blkx:
        data = entry.get("Data") if isinstance(entry, dict) else None
        if not isinstance(data, bytes):
            raise CorruptImage("a blkx entry of the UDIF XML plist has no Data")
        blocks.append(data)
    return blocks


def mish_blocks_from_resource_fork(fork: bytes) -> list[bytes]:
    """The resources of a classic resource fork that are ``mish`` tables:
    its data area is a run of resources, each a 32-bit length and bytes."""
    if len(fork) < RSRC_HEADER.size:
        raise CorruptImage(f"UDIF resource fork of {len(fork)} bytes is too short")
    data_offset, _, data_length, _ = RSRC_HEADER.unpack_from(fork)
    if data_offset + data_length > len(fork):
        raise CorruptImage(f"UDIF resource data ({data_length} bytes at {data_offset}) "
                           f"runs past the {len(fork)}-byte resource fork")
    blocks = []
    position, end = data_offset, data_offset + data_length
    while position + 4 <= end:
        length = int.from_bytes(fork[position:position + 4], "big")
        position += 4
        if position + length > end:
            raise CorruptImage(f"UDIF resource of {length} bytes at {position} runs past "
                               "the resource data")
        if fork[position:position + 4] == MISH_MAGIC:
            blocks.append(fork[position:position + length])
        position += length
    return blocks


# -- the chunk table ---------------------------------------------------------------------

class Chunk(NamedTuple):
    """One entry of the chunk table, in disk sectors and file bytes."""

    kind: int
    first_sector: int
    sectors: int
    file_offset: int
    stored_length: int


def parse_mish(block: bytes, data_fork_offset: int, file_size: int) -> Iterator[Chunk]:
    """The chunks of one ``mish`` table, their sectors made absolute and
    their offsets made file offsets; comments and terminators dropped."""
    if len(block) < MISH_HEADER.size or block[:4] != MISH_MAGIC:
        raise CorruptImage(f"a UDIF block table does not start with {MISH_MAGIC!r}")
    header = MishHeader(*MISH_HEADER.unpack_from(block))
    room = (len(block) - MISH_HEADER.size) // CHUNK_ENTRY.size
    if header.entry_count > room:
        raise CorruptImage(f"UDIF block table claims {header.entry_count} chunks but holds "
                           f"{room}")
    for index in range(header.entry_count):
        kind, _, first, sectors, offset, length = CHUNK_ENTRY.unpack_from(
            block, MISH_HEADER.size + index * CHUNK_ENTRY.size)
        if kind in SKIPPED_TYPES or sectors == 0:
            continue
        chunk = Chunk(kind, header.start_sector + first, sectors,
                      data_fork_offset + offset, length)
        check_chunk(chunk, index, file_size)
        yield chunk


def check_chunk(chunk: Chunk, index: int, file_size: int) -> None:
    kind = chunk.kind
    if kind not in ZERO_TYPES and kind != RAW and kind not in COMPRESSED_TYPES:
        name = "LZMA" if kind == LZMA else f"{kind:#010x}"
        raise Unsupported(f"UDIF chunk {index} has type {name}, which is not supported")
    if chunk.first_sector + chunk.sectors > MAX_SECTORS:
        raise CorruptImage(f"UDIF chunk {index} ends past sector {MAX_SECTORS}")
    if kind in ZERO_TYPES:
        return
    if chunk.sectors > MAX_CHUNK_SECTORS:
        raise CorruptImage(f"UDIF chunk {index} of {chunk.sectors} sectors is larger than "
                           f"the maximum ({MAX_CHUNK_SECTORS})")
    if chunk.stored_length > MAX_CHUNK_BYTES:
        raise CorruptImage(f"UDIF chunk {index} of {chunk.stored_length} stored bytes is "
                           f"larger than the maximum ({MAX_CHUNK_BYTES})")
    if kind == RAW and chunk.stored_length < chunk.sectors * SECTOR:
        raise CorruptImage(f"raw UDIF chunk {index} stores {chunk.stored_length} bytes for "
                           f"{chunk.sectors} sectors")
    if chunk.stored_length == 0:
        raise CorruptImage(f"UDIF chunk {index} of {chunk.sectors} sectors stores no bytes")
    if chunk.file_offset + chunk.stored_length > file_size:
        raise CorruptImage(f"UDIF chunk {index} at offset {chunk.file_offset} "
                           f"({chunk.stored_length} bytes) runs past the end of the "
                           f"{file_size}-byte file")


class ChunkTable:
    """Every chunk of the disk, sorted by first sector, in compact arrays:
    a lookup is a binary search."""

    def __init__(self, chunks: list[Chunk]) -> None:
        chunks.sort(key=lambda chunk: chunk.first_sector)
        for before, after in zip(chunks, chunks[1:], strict=False):
            if before.first_sector + before.sectors > after.first_sector:
                raise CorruptImage(f"UDIF chunks overlap at sector {after.first_sector}")
        self.first = array.array("Q", (chunk.first_sector for chunk in chunks))
        self.sectors = array.array("Q", (chunk.sectors for chunk in chunks))
        self.kind = array.array("L", (chunk.kind for chunk in chunks))
        self.file_offset = array.array("Q", (chunk.file_offset for chunk in chunks))
        self.stored_length = array.array("Q", (chunk.stored_length for chunk in chunks))

    def __len__(self) -> int:
        return len(self.first)

    def find(self, sector: int) -> int:
        """The index of the chunk that holds `sector`, or -1."""
        index = bisect.bisect_right(self.first, sector) - 1
        if index >= 0 and sector < self.first[index] + self.sectors[index]:
            return index
        return -1

    def chunk(self, index: int) -> Chunk:
        return Chunk(self.kind[index], self.first[index], self.sectors[index],
                     self.file_offset[index], self.stored_length[index])

    def kinds(self) -> set[int]:
        return set(self.kind)


def chunk_table(blocks: list[bytes], data_fork_offset: int, file_size: int) -> ChunkTable:
    chunks: list[Chunk] = []
    for block in blocks:
        chunks.extend(parse_mish(block, data_fork_offset, file_size))
    return ChunkTable(chunks)
