"""VHDX on disk: headers, region table, metadata, BAT geometry (pure, no I/O).

See the package docstring for the layout.  Probing imports only `probe`.
Every integer is little-endian; GUIDs are stored as Windows writes them
(the first three fields little-endian: `uuid.UUID.bytes_le`).
"""
from __future__ import annotations

import itertools
import struct
import uuid
from dataclasses import dataclass
from typing import NamedTuple

from imgfs.errors import CorruptImage, InvalidImage, Unsupported

KiB, MiB, TiB = 1 << 10, 1 << 20, 1 << 40

#: [MS-VHDX] 2.1 "Layout": the file type identifier, two headers, two
#: region tables, all inside the first MiB
SIGNATURE = b"vhdxfile"
HEADER_OFFSETS = (64 * KiB, 128 * KiB)
REGION_TABLE_OFFSETS = (192 * KiB, 256 * KiB)
HEADER_AREA = 1 * MiB
HEADER_SIZE = 4 * KiB
REGION_TABLE_SIZE = 64 * KiB
#: 2.2.2 header
HEADER_SIGNATURE = b"head"
VERSION = 1
LOG_VERSION = 0
#: 2.2.3 region table
REGION_SIGNATURE = b"regi"
MAX_REGION_ENTRIES = 2047
BAT_GUID = uuid.UUID("2dc27766-f623-4200-9d64-115e9bfd4a08")
METADATA_GUID = uuid.UUID("8b7ca206-4790-4b9a-b8fe-575f050f886e")
#: 2.6 metadata region
METADATA_SIGNATURE = b"metadata"
METADATA_TABLE_SIZE = 64 * KiB
MAX_METADATA_ENTRIES = 2047
FILE_PARAMETERS = uuid.UUID("caa16737-fa36-4d43-b3b6-33f0aa44e76b")
VIRTUAL_DISK_SIZE = uuid.UUID("2fa54224-cd1b-4876-b211-5dbed83bf4b8")
PAGE83_DATA = uuid.UUID("beca12ab-b2e6-4523-93ef-c309e000c746")
LOGICAL_SECTOR_SIZE = uuid.UUID("8141bf1d-a96f-4709-ba47-f233a8faab5f")
PHYSICAL_SECTOR_SIZE = uuid.UUID("cda348c7-445d-4471-9cc9-e9885251c556")
PARENT_LOCATOR = uuid.UUID("a8d35f2d-b30b-454d-abf7-d3d84834ab0c")
KNOWN_METADATA = {FILE_PARAMETERS, VIRTUAL_DISK_SIZE, PAGE83_DATA, LOGICAL_SECTOR_SIZE,
                  PHYSICAL_SECTOR_SIZE, PARENT_LOCATOR}
#: metadata entry flags
IS_USER, IS_VIRTUAL_DISK, IS_REQUIRED = 1, 2, 4
#: file parameters flags
LEAVE_BLOCKS_ALLOCATED, HAS_PARENT = 1, 2
MIN_BLOCK_SIZE, MAX_BLOCK_SIZE = 1 * MiB, 256 * MiB
SECTOR_SIZES = (512, 4096)
MAX_VIRTUAL_SIZE = 64 * TiB
#: 2.5 BAT entries: state in bits 0-2, FileOffsetMB in bits 20-63
PAYLOAD_BLOCK_NOT_PRESENT = 0
PAYLOAD_BLOCK_UNDEFINED = 1
PAYLOAD_BLOCK_ZERO = 2
PAYLOAD_BLOCK_UNMAPPED = 3
PAYLOAD_BLOCK_FULLY_PRESENT = 6
PAYLOAD_BLOCK_PARTIALLY_PRESENT = 7
SB_BLOCK_NOT_PRESENT = 0
SB_BLOCK_PRESENT = 6
STATE_MASK = 7
OFFSET_MASK = ~((1 << 20) - 1) & ((1 << 64) - 1)
#: bits the spec reserves (3..19) are ignored, as Hyper-V and QEMU do
CHUNK_SECTORS = 1 << 23

HEADER = struct.Struct("<4sIQ16s16s16sHHIQ")
REGION_HEADER = struct.Struct("<4sIII")
REGION_ENTRY = struct.Struct("<16sQII")
METADATA_HEADER = struct.Struct("<8sHH20x")
METADATA_ENTRY = struct.Struct("<16sIII4x")


def probe(head: bytes, filename: str) -> int:
    """100 for the file type identifier (the registry's light probe)."""
    return 100 if head.startswith(SIGNATURE) else 0


def crc32c(data: bytes | bytearray | memoryview) -> int:
    from crc32c import crc32c as compute  # (imported on use: probing stays light)
    return int(compute(data))


def checksummed(block: bytes | bytearray, field_offset: int = 4) -> bytes:
    """`block` with its CRC-32C (computed with the field zeroed) filled in."""
    out = bytearray(block)
    out[field_offset:field_offset + 4] = bytes(4)
    out[field_offset:field_offset + 4] = struct.pack("<I", crc32c(out))
    return bytes(out)


def checksum_ok(block: bytes, field_offset: int = 4) -> bool:
    stored = struct.unpack_from("<I", block, field_offset)[0]
    zeroed = bytearray(block)
    zeroed[field_offset:field_offset + 4] = bytes(4)
    return crc32c(zeroed) == stored


def guid(raw: bytes) -> uuid.UUID:
    return uuid.UUID(bytes_le=bytes(raw))


# -- headers (2.2.2) -----------------------------------------------------------------------

class Header(NamedTuple):
    signature: bytes
    checksum: int
    sequence_number: int
    file_write_guid: bytes
    data_write_guid: bytes
    log_guid: bytes
    log_version: int
    version: int
    log_length: int
    log_offset: int

    @classmethod
    def unpack(cls, raw: bytes) -> Header:
        return cls(*HEADER.unpack_from(raw))

    def pack(self) -> bytes:
        """The 4 KiB header with its checksum."""
        return checksummed(HEADER.pack(*self).ljust(HEADER_SIZE, b"\0"))

    @property
    def has_log(self) -> bool:
        return self.log_guid != bytes(16)


def valid_header(raw: bytes) -> Header | None:
    """The header in `raw` if its signature and checksum hold, else None."""
    if len(raw) < HEADER_SIZE or raw[:4] != HEADER_SIGNATURE or \
            not checksum_ok(raw[:HEADER_SIZE]):
        return None
    return Header.unpack(raw)


def current_header(first: bytes, second: bytes) -> tuple[Header, int]:
    """The valid header with the higher sequence number, and its index
    (2.2.2: a torn header update leaves the other one current)."""
    headers = [(header, index) for index, header in
               enumerate((valid_header(first), valid_header(second))) if header is not None]
    if not headers:
        raise InvalidImage("no valid VHDX header (both have a bad signature or checksum)")
    header, index = max(headers, key=lambda item: item[0].sequence_number)
    if header.version != VERSION:
        raise Unsupported(f"VHDX version {header.version} (expected {VERSION})")
    if header.log_version != LOG_VERSION:
        raise Unsupported(f"VHDX log version {header.log_version} (expected {LOG_VERSION})")
    return header, index


def check_log_location(header: Header, file_size: int) -> None:
    if header.log_offset % MiB or header.log_offset < HEADER_AREA or \
            header.log_length % MiB or not header.log_length or \
            header.log_offset + header.log_length > file_size:
        raise InvalidImage(f"log at {header.log_offset:#x} (+{header.log_length:#x}) is not "
                           "in 1 MiB units after the first MiB inside the "
                           f"{file_size}-byte file")


# -- region table (2.2.3) ------------------------------------------------------------------

class Region(NamedTuple):
    guid: uuid.UUID
    offset: int
    length: int
    required: bool

    @property
    def end(self) -> int:
        return self.offset + self.length


def parse_region_table(raw: bytes) -> dict[uuid.UUID, Region] | None:
    """The regions of a region table, None if its signature or checksum is bad."""
    if len(raw) < REGION_TABLE_SIZE or raw[:4] != REGION_SIGNATURE or \
            not checksum_ok(raw[:REGION_TABLE_SIZE]):
        return None
    _, _, count, _ = REGION_HEADER.unpack_from(raw)
    if count > MAX_REGION_ENTRIES:
        raise InvalidImage(f"region table has {count} entries (at most {MAX_REGION_ENTRIES})")
    regions: dict[uuid.UUID, Region] = {}
    for index in range(count):
        raw_guid, offset, length, flags = REGION_ENTRY.unpack_from(
            raw, REGION_HEADER.size + index * REGION_ENTRY.size)
        region = Region(guid(raw_guid), offset, length, bool(flags & 1))
        if region.guid in regions:
            raise InvalidImage(f"region {region.guid} appears twice in the region table")
        regions[region.guid] = region
    return regions


def check_regions(regions: dict[uuid.UUID, Region], header: Header,
                  file_size: int) -> tuple[Region, Region]:
    """The BAT and metadata regions, after checking that every region is in
    1 MiB units inside the file and that no two (nor the log) overlap."""
    for region in regions.values():
        if region.guid not in (BAT_GUID, METADATA_GUID) and region.required:
            raise Unsupported(f"unknown required region {region.guid}")
        if region.offset % MiB or region.offset < HEADER_AREA or region.length % MiB or \
                not region.length or region.end > file_size:
            raise InvalidImage(f"region {region.guid} at {region.offset:#x} "
                               f"(+{region.length:#x}) is not in 1 MiB units after the "
                               f"first MiB inside the {file_size}-byte file")
    if BAT_GUID not in regions or METADATA_GUID not in regions:
        raise InvalidImage("region table lacks the BAT or the metadata region")
    spans = sorted([(region.offset, region.end, str(region.guid))
                    for region in regions.values()] +
                   [(header.log_offset, header.log_offset + header.log_length, "log")])
    for (_, end, name), (start, _, other) in itertools.pairwise(spans):
        if start < end:
            raise InvalidImage(f"regions overlap: {name} and {other}")
    return regions[BAT_GUID], regions[METADATA_GUID]


# -- metadata (2.6) --------------------------------------------------------------------------

class MetadataItem(NamedTuple):
    offset: int          # from the start of the metadata region
    length: int
    flags: int


def parse_metadata_table(raw: bytes, region_length: int) -> dict[uuid.UUID, MetadataItem]:
    signature, _, count = METADATA_HEADER.unpack_from(raw)
    if signature != METADATA_SIGNATURE:
        raise InvalidImage(f"bad metadata table signature {signature!r}")
    if count > MAX_METADATA_ENTRIES:
        raise InvalidImage(f"metadata table has {count} entries (at most "
                           f"{MAX_METADATA_ENTRIES})")
    items: dict[uuid.UUID, MetadataItem] = {}
    for index in range(count):
        raw_guid, offset, length, flags = METADATA_ENTRY.unpack_from(
            raw, METADATA_HEADER.size + index * METADATA_ENTRY.size)
        item_id = guid(raw_guid)
        if item_id in items:
            raise InvalidImage(f"metadata item {item_id} appears twice")
        if length and (offset < METADATA_TABLE_SIZE or offset + length > region_length):
            raise InvalidImage(f"metadata item {item_id} at {offset:#x} (+{length}) lies "
                               "outside the metadata region's data")
        if item_id not in KNOWN_METADATA and flags & IS_REQUIRED:
            raise Unsupported(f"unknown required metadata item {item_id}")
        items[item_id] = MetadataItem(offset, length, flags)
    return items


@dataclass(frozen=True, slots=True)
class Metadata:
    """The system metadata items a VHDX needs (2.6.2)."""

    block_size: int
    flags: int
    virtual_size: int
    logical_sector_size: int
    physical_sector_size: int
    page83: bytes

    @property
    def has_parent(self) -> bool:
        return bool(self.flags & HAS_PARENT)

    @property
    def leave_blocks_allocated(self) -> bool:
        return bool(self.flags & LEAVE_BLOCKS_ALLOCATED)


REQUIRED_ITEMS = {FILE_PARAMETERS: 8, VIRTUAL_DISK_SIZE: 8, PAGE83_DATA: 16,
                  LOGICAL_SECTOR_SIZE: 4, PHYSICAL_SECTOR_SIZE: 4}


def decode_metadata(values: dict[uuid.UUID, bytes]) -> Metadata:
    """The system items (their bytes, by id), every field checked."""
    for item_id, length in REQUIRED_ITEMS.items():
        if len(values.get(item_id, b"")) < length:
            raise InvalidImage(f"metadata item {item_id} is missing or shorter than {length}")
    block_size, flags = struct.unpack_from("<II", values[FILE_PARAMETERS])
    virtual_size, = struct.unpack_from("<Q", values[VIRTUAL_DISK_SIZE])
    logical, = struct.unpack_from("<I", values[LOGICAL_SECTOR_SIZE])
    physical, = struct.unpack_from("<I", values[PHYSICAL_SECTOR_SIZE])
    if block_size & (block_size - 1) or not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE:
        raise InvalidImage(f"block size {block_size} is not a power of two in "
                           f"{MIN_BLOCK_SIZE}..{MAX_BLOCK_SIZE}")
    if logical not in SECTOR_SIZES or physical not in SECTOR_SIZES:
        raise InvalidImage(f"sector sizes {logical}/{physical} (logical/physical) are not "
                           "512 or 4096")
    if virtual_size % logical or virtual_size > MAX_VIRTUAL_SIZE:
        raise InvalidImage(f"virtual disk size {virtual_size} is not a multiple of "
                           f"{logical} at most {MAX_VIRTUAL_SIZE}")
    return Metadata(block_size, flags, virtual_size, logical, physical,
                    bytes(values[PAGE83_DATA][:16]))


# -- BAT geometry (2.5) ------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Geometry:
    """How payload blocks and sector bitmap blocks share the BAT."""

    block_size: int
    logical_sector_size: int
    virtual_size: int
    has_parent: bool

    @property
    def chunk_ratio(self) -> int:
        """Payload blocks per sector bitmap block."""
        return CHUNK_SECTORS * self.logical_sector_size // self.block_size

    @property
    def data_blocks(self) -> int:
        return -(-self.virtual_size // self.block_size)

    @property
    def bitmap_blocks(self) -> int:
        return -(-self.data_blocks // self.chunk_ratio)

    @property
    def bat_entries(self) -> int:
        if self.has_parent:
            return self.bitmap_blocks * (self.chunk_ratio + 1)
        blocks = self.data_blocks
        return blocks + (blocks - 1) // self.chunk_ratio if blocks else 0

    def payload_index(self, block: int) -> int:
        """The BAT index of payload block `block` (a bitmap entry follows
        every `chunk_ratio` payload entries)."""
        return block + block // self.chunk_ratio

    def bitmap_index(self, chunk: int) -> int:
        return chunk * (self.chunk_ratio + 1) + self.chunk_ratio


def entry_state(entry: int) -> int:
    return entry & STATE_MASK


def entry_offset(entry: int) -> int:
    return entry & OFFSET_MASK


def make_entry(state: int, offset: int = 0) -> int:
    return (offset & OFFSET_MASK) | state


def check_payload_entry(entry: int, block: int, geometry: Geometry, file_size: int,
                        reserved: list[tuple[int, int]]) -> None:
    """A payload BAT entry: a known state, and a present block 1 MiB
    aligned inside the file, clear of the headers, log and regions."""
    state = entry_state(entry)
    if state in (PAYLOAD_BLOCK_NOT_PRESENT, PAYLOAD_BLOCK_UNDEFINED, PAYLOAD_BLOCK_ZERO,
                 PAYLOAD_BLOCK_UNMAPPED):
        return
    if state == PAYLOAD_BLOCK_PARTIALLY_PRESENT and not geometry.has_parent:
        raise CorruptImage(f"block {block} is partially present in an image without a parent")
    if state not in (PAYLOAD_BLOCK_FULLY_PRESENT, PAYLOAD_BLOCK_PARTIALLY_PRESENT):
        raise CorruptImage(f"block {block} has the unknown BAT state {state}")
    check_block_offset(entry_offset(entry), geometry.block_size, file_size, reserved,
                       f"block {block}")


def check_block_offset(offset: int, length: int, file_size: int,
                       reserved: list[tuple[int, int]], what: str) -> None:
    """A block must start inside the file (its tail may be cut off: that
    part reads as zeros) and clear of the header area, log and regions."""
    if offset < HEADER_AREA or offset >= file_size:
        raise CorruptImage(f"{what} at {offset:#x} lies past the end of the "
                           f"{file_size}-byte file or in its header area")
    for start, end in reserved:
        if offset < end and start < offset + length:
            raise CorruptImage(f"{what} at {offset:#x} overlaps the log or a region")


# -- parent locator (2.6.2.6) -------------------------------------------------------------------

LOCATOR_TYPE = uuid.UUID("b04aefb7-d19e-4a81-b789-25b8e9445913")
LOCATOR_HEADER = struct.Struct("<16sHH")
LOCATOR_ENTRY = struct.Struct("<IIHH")
#: the keys, in the order a parent is looked for (the last two name Windows
#: volumes and drives: only their file name is tried, in the child's folder)
PATH_KEYS = ("relative_path", "absolute_win32_path", "volume_path")


def parse_parent_locator(raw: bytes) -> dict[str, str]:
    """The locator's key/value pairs (UTF-16 strings inside the item)."""
    if len(raw) < LOCATOR_HEADER.size:
        raise InvalidImage(f"parent locator of {len(raw)} bytes is too short")
    locator_type, _, count = LOCATOR_HEADER.unpack_from(raw)
    if guid(locator_type) != LOCATOR_TYPE:
        raise Unsupported(f"unknown parent locator type {guid(locator_type)}")
    if LOCATOR_HEADER.size + count * LOCATOR_ENTRY.size > len(raw):
        raise InvalidImage(f"parent locator has {count} entries, more than its "
                           f"{len(raw)} bytes hold")
    entries: dict[str, str] = {}
    for index in range(count):
        key_offset, value_offset, key_length, value_length = LOCATOR_ENTRY.unpack_from(
            raw, LOCATOR_HEADER.size + index * LOCATOR_ENTRY.size)
        key = locator_string(raw, key_offset, key_length)
        if key in entries:
            raise InvalidImage(f"parent locator key {key!r} appears twice")
        entries[key] = locator_string(raw, value_offset, value_length)
    return entries


def locator_string(raw: bytes, offset: int, length: int) -> str:
    if offset + length > len(raw) or length % 2:
        raise InvalidImage(f"parent locator string at {offset} (+{length}) lies outside "
                           "the locator or is not UTF-16")
    try:
        return raw[offset:offset + length].decode("utf-16-le")
    except UnicodeDecodeError:
        raise InvalidImage("parent locator string is not valid UTF-16") from None


def build_parent_locator(entries: dict[str, str]) -> bytes:
    table = bytearray(LOCATOR_HEADER.pack(LOCATOR_TYPE.bytes_le, 0, len(entries)))
    strings = bytearray()
    start = LOCATOR_HEADER.size + len(entries) * LOCATOR_ENTRY.size
    for key, value in entries.items():
        key_raw, value_raw = key.encode("utf-16-le"), value.encode("utf-16-le")
        key_offset = start + len(strings)
        strings += key_raw
        value_offset = start + len(strings)
        strings += value_raw
        table += LOCATOR_ENTRY.pack(key_offset, value_offset, len(key_raw), len(value_raw))
    return bytes(table + strings)


def parse_linkage(text: str) -> bytes | None:
    """A GUID as the locator writes it ("{...}"), in its on-disk form."""
    try:
        return uuid.UUID(text.strip("{}")).bytes_le
    except ValueError:
        return None


def format_linkage(raw: bytes) -> str:
    return "{" + str(guid(raw)) + "}"


def parent_filename(entries: dict[str, str]) -> str:
    """Where the parent is, relative to the child's folder unless absolute:
    relative_path first; a Windows absolute or volume path only by its
    file name."""
    relative = entries.get("relative_path")
    if relative:
        return relative.replace("\\", "/")
    for key in PATH_KEYS[1:]:
        value = entries.get(key)
        if value:
            return value.replace("\\", "/").rsplit("/", 1)[-1]
    raise InvalidImage("the parent locator names no parent path "
                       f"(none of {', '.join(PATH_KEYS)})")
