"""VHD on disk: footer, dynamic header, BAT, geometry, new images (pure, no I/O).

See the package docstring for the layout.  Probing imports only this module
(and imgfs.signatures).
"""
from __future__ import annotations

import os
import struct
import time
import urllib.parse
import uuid
from typing import Any, NamedTuple

from imgfs.errors import InvalidImage, Unsupported, UsageError
from imgfs.mapped import align_up
from imgfs.options import Bool, Opt, Schema, Str, choice
from imgfs.signatures import probe_vpc as probe
from imgfs.signatures import probe_vpc_tail as probe_tail
from imgfs.tablecache import TableCodec

__all__ = ["probe", "probe_tail"]

SECTOR = 512
COOKIE = b"conectix"
DYNAMIC_COOKIE = b"cxsparse"
#: spec "Hard Disk Footer Format": Disk Type
DISK_FIXED, DISK_DYNAMIC, DISK_DIFFERENCING = 2, 3, 4
DISK_TYPES = {DISK_FIXED: "fixed", DISK_DYNAMIC: "dynamic",
              DISK_DIFFERENCING: "differencing"}
#: "No data offset": a fixed disk's footer data offset
NO_OFFSET = 0xFFFF_FFFF_FFFF_FFFF
#: a BAT entry for a block not stored in the file
UNUSED_ENTRY = 0xFFFF_FFFF
#: footer "Features": the reserved bit the spec says is always set
FEATURE_RESERVED = 2
FORMAT_VERSION = 0x0001_0000
HEADER_VERSION = 0x0001_0000
#: the footer's timestamp counts seconds from 2000-01-01 00:00:00 UTC
EPOCH_2000 = 946684800
#: CHS limits of the spec's geometry algorithm ("CHS Calculation")
MAX_CYLINDERS, MAX_HEADS, MAX_SECTORS_PER_TRACK = 65535, 16, 255
MAX_GEOMETRY = MAX_CYLINDERS * MAX_HEADS * MAX_SECTORS_PER_TRACK
#: QEMU refuses images larger than 2040 GiB
MAX_SIZE = 0xFF00_0000 * SECTOR
#: creators whose images QEMU sizes by the footer's current size, not CHS
#: (Hyper-V, QEMU with force_size, disk2vhd, XenConverter, XenServer)
CURRENT_SIZE_CREATORS = frozenset({b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0"})
DEFAULT_BLOCK_SIZE = 2 * 1024 * 1024
#: block sizes imgfs accepts: an allocating write builds one block in memory
MIN_BLOCK_SIZE, MAX_BLOCK_SIZE = SECTOR, 256 * 1024 * 1024
#: BAT entries kept in memory at most (16 MiB of table)
MAX_BAT_ENTRIES = 1 << 22
#: QEMU refuses a larger max_table_entries, whatever the disk size
MAX_TABLE_ENTRIES = (1 << 29) - 1
#: the BAT: big-endian 32-bit sector numbers
BAT_CODEC = TableCodec(4, big_endian=True)

FOOTER = struct.Struct(">8sIIQI4sI4sQQHBBII16sB427s")
DYNAMIC_HEADER = struct.Struct(">8sQQIIII16sII512s192s256s")
LOCATOR = struct.Struct(">4sIIIQ")
LOCATOR_COUNT = 8
#: byte offset of the checksum field in both structures
FOOTER_CHECKSUM_AT, DYNAMIC_CHECKSUM_AT = 64, 36


def checksum(raw: bytes, field_offset: int) -> int:
    """spec: the one's complement of the sum of all bytes, the checksum
    field itself counted as zeros."""
    total = sum(raw) - sum(raw[field_offset:field_offset + 4])
    return ~total & 0xFFFF_FFFF


class Footer(NamedTuple):
    cookie: bytes
    features: int
    version: int
    data_offset: int
    timestamp: int
    creator_app: bytes
    creator_version: int
    creator_os: bytes
    original_size: int
    current_size: int
    cylinders: int
    heads: int
    sectors_per_track: int
    disk_type: int
    checksum: int
    unique_id: bytes
    saved_state: int
    reserved: bytes

    @classmethod
    def unpack(cls, raw: bytes) -> Footer:
        """A 512-byte footer (or the 511 bytes Virtual PC before 2004 wrote)."""
        return cls(*FOOTER.unpack(raw.ljust(FOOTER.size, b"\0")[:FOOTER.size]))

    def pack(self) -> bytes:
        """The footer with its checksum computed."""
        raw = FOOTER.pack(*self._replace(checksum=0))
        return FOOTER.pack(*self._replace(checksum=checksum(raw, FOOTER_CHECKSUM_AT)))

    @property
    def chs_sectors(self) -> int:
        return self.cylinders * self.heads * self.sectors_per_track

    def valid_checksum(self) -> bool:
        return checksum(FOOTER.pack(*self), FOOTER_CHECKSUM_AT) == self.checksum


class Locator(NamedTuple):
    """A parent locator entry (spec "Dynamic Disk Header Format")."""

    platform_code: bytes
    data_space: int
    data_length: int
    reserved: int
    data_offset: int


class DynamicHeader(NamedTuple):
    cookie: bytes
    data_offset: int
    table_offset: int
    header_version: int
    max_table_entries: int
    block_size: int
    checksum: int
    parent_unique_id: bytes
    parent_timestamp: int
    reserved1: int
    parent_name: bytes
    locators_raw: bytes
    reserved2: bytes

    @classmethod
    def unpack(cls, raw: bytes) -> DynamicHeader:
        if len(raw) < DYNAMIC_HEADER.size:
            raise InvalidImage(f"file too short for a VHD dynamic header ({len(raw)} bytes)")
        return cls(*DYNAMIC_HEADER.unpack_from(raw))

    def pack(self) -> bytes:
        raw = DYNAMIC_HEADER.pack(*self._replace(checksum=0))
        return DYNAMIC_HEADER.pack(*self._replace(
            checksum=checksum(raw, DYNAMIC_CHECKSUM_AT)))

    @property
    def locators(self) -> list[Locator]:
        return [Locator(*LOCATOR.unpack_from(self.locators_raw, index * LOCATOR.size))
                for index in range(LOCATOR_COUNT)]


# -- layout math (pure) ----------------------------------------------------------------------

def bitmap_size(block_size: int) -> int:
    """Bytes of a block's sector bitmap: one bit a sector, padded to a sector."""
    return align_up(block_size // SECTOR // 8, SECTOR)


def virtual_size(footer: Footer, force_size_calc: str | None = None) -> int:
    """The disk size as QEMU 7.2 reads it: Virtual PC (and most creators)
    size a disk by its CHS geometry; Hyper-V, disk2vhd, Xen and QEMU's
    force_size images by the footer's current size, and so does every disk
    whose geometry is the largest CHS can say.  `force_size_calc` ("chs",
    "current_size") overrides the creator, not the maximal geometry."""
    use_chs = footer.creator_app not in CURRENT_SIZE_CREATORS
    if force_size_calc is not None:
        use_chs = force_size_calc == "chs"
    if use_chs and footer.chs_sectors != MAX_GEOMETRY:
        return footer.chs_sectors * SECTOR
    return footer.current_size // SECTOR * SECTOR


def chs_geometry(total_sectors: int) -> tuple[int, int, int]:
    """(cylinders, heads, sectors per track) for a disk of `total_sectors`,
    by the spec's appendix "CHS Calculation"."""
    total_sectors = min(total_sectors, MAX_GEOMETRY)
    if total_sectors >= MAX_CYLINDERS * MAX_HEADS * 63:
        sectors, heads = 255, 16
        cylinders_times_heads = total_sectors // sectors
    else:
        sectors = 17
        cylinders_times_heads = total_sectors // sectors
        heads = max((cylinders_times_heads + 1023) // 1024, 4)
        if cylinders_times_heads >= heads * 1024 or heads > 16:
            sectors, heads = 31, 16
            cylinders_times_heads = total_sectors // sectors
        if cylinders_times_heads >= heads * 1024:
            sectors, heads = 63, 16
            cylinders_times_heads = total_sectors // sectors
    return cylinders_times_heads // heads, heads, sectors


def create_geometry(size: int, force_size: bool) -> tuple[tuple[int, int, int], int]:
    """((C, H, S), disk size) of a new image as qemu-img makes it: without
    force_size the size grows to the first CHS geometry that holds it;
    with it (or past what CHS can say) the geometry is the maximal one and
    the size is the requested size in whole sectors (rounded up, as
    qemu-img rounds every new image's size)."""
    size = align_up(size, SECTOR)
    if force_size:
        geometry = (MAX_CYLINDERS, MAX_HEADS, MAX_SECTORS_PER_TRACK)
    else:
        wanted = min(MAX_GEOMETRY, size // SECTOR)
        extra = 0
        geometry = chs_geometry(wanted)
        while geometry[0] * geometry[1] * geometry[2] < wanted:
            extra += 1
            geometry = chs_geometry(wanted + extra)
    cylinders, heads, sectors = geometry
    if cylinders * heads * sectors == MAX_GEOMETRY:
        disk_size = size // SECTOR * SECTOR
        if disk_size > MAX_SIZE:
            raise UsageError("Disk size is too large, max size is 2040 GiB")
    else:
        disk_size = cylinders * heads * sectors * SECTOR
    return geometry, disk_size


# -- validation --------------------------------------------------------------------------------

def check_footer(footer: Footer, where: str) -> None:
    """The fields every VHD's footer must get right."""
    if footer.cookie != COOKIE:
        raise InvalidImage(f"not a VHD image (no 'conectix' footer at {where})")
    if not footer.valid_checksum():
        raise InvalidImage(f"footer checksum {footer.checksum:#010x} at {where} is wrong "
                           "(Incorrect header checksum)")
    if footer.disk_type not in DISK_TYPES:
        raise InvalidImage(f"unknown VHD disk type {footer.disk_type} (expected 2 fixed, "
                           "3 dynamic or 4 differencing)")


class Geometry(NamedTuple):
    """Where a dynamic disk's metadata lies and how its blocks are sized."""

    block_size: int
    bitmap_size: int
    table_offset: int
    bat_entries: int           # entries read (those the disk size needs)
    metadata_end: int          # the end of the footer copy, header and BAT

    @property
    def block_bits(self) -> int:
        return self.block_size.bit_length() - 1

    @property
    def bat_bytes(self) -> int:
        return self.bat_entries * BAT_CODEC.width


def check_dynamic_header(header: DynamicHeader, footer: Footer, size: int,
                         file_size: int) -> Geometry:
    """Every field that sizes an allocation, an offset or a loop, checked
    before any of them is used; one sentence per refusal."""
    if header.cookie != DYNAMIC_COOKIE:
        raise InvalidImage(f"no 'cxsparse' dynamic header at {footer.data_offset:#x} "
                           f"(found {header.cookie!r})")
    block_size = header.block_size
    if block_size < MIN_BLOCK_SIZE or block_size & (block_size - 1):
        raise InvalidImage(f"block size {block_size} is not a power of two of at least "
                           f"{MIN_BLOCK_SIZE}")
    if block_size > MAX_BLOCK_SIZE:
        raise Unsupported(f"block size {block_size} is larger than imgfs supports "
                          f"({MAX_BLOCK_SIZE})")
    if header.max_table_entries > MAX_TABLE_ENTRIES:
        raise InvalidImage(f"max_table_entries {header.max_table_entries} is larger than "
                           f"{MAX_TABLE_ENTRIES} (Max Table Entries too large)")
    if header.max_table_entries * block_size < size:
        raise InvalidImage(f"the BAT's {header.max_table_entries} entries of {block_size}-"
                           f"byte blocks cannot map the {size}-byte disk (Page table too "
                           "small)")
    needed = -(-size // block_size)
    if needed > MAX_BAT_ENTRIES:
        raise Unsupported(f"a BAT of {needed} entries is larger than imgfs keeps in memory "
                          f"(at most {MAX_BAT_ENTRIES}: use larger blocks)")
    header_end = footer.data_offset + DYNAMIC_HEADER.size
    table_offset = header.table_offset
    bat_end = table_offset + needed * BAT_CODEC.width
    if table_offset < FOOTER.size or bat_end > file_size or \
            (table_offset < header_end and footer.data_offset < bat_end):
        raise InvalidImage(f"BAT at {table_offset:#x} (+{needed * BAT_CODEC.width} bytes) "
                           "overlaps the footer or the dynamic header, or runs past the "
                           f"end of the {file_size}-byte file")
    return Geometry(block_size, bitmap_size(block_size), table_offset, needed,
                    max(bat_end, header_end))


def check_data_offset(footer: Footer, file_size: int) -> None:
    """A dynamic disk's header must lie after the footer copy, in the file."""
    offset = footer.data_offset
    if offset < FOOTER.size or offset + DYNAMIC_HEADER.size > file_size:
        raise InvalidImage(f"dynamic header offset {offset:#x} lies inside the footer or "
                           f"past the end of the {file_size}-byte file")


def check_size(size: int) -> None:
    if size > MAX_SIZE:
        raise InvalidImage(f"disk size {size} is larger than the 2040 GiB a VHD can hold "
                           "(File too large)")


# -- creation (pure) ---------------------------------------------------------------------------

OPEN_OPTS = Schema(
    Opt("force_size_calc", choice("chs", "current_size"),
        help="size the disk by its CHS geometry or by the footer's current size, "
             "whatever the creator application says"),
)

CREATE_OPTS = Schema(
    Opt("subformat", choice("dynamic", "fixed"), default="dynamic",
        help="type of virtual hard disk: dynamic or fixed"),
    Opt("force_size", Bool, default=False,
        help="use the size asked for, not the nearest CHS geometry's"),
    Opt("backing_file", Str, help="file name of a parent image (a differencing VHD)"),
    Opt("backing_fmt", Str, help="image format of the parent image (vpc)"),
)


def vhd_time(seconds: float) -> int:
    """Seconds since 2000-01-01 UTC, as the footer and header store times."""
    return max(int(seconds) - EPOCH_2000, 0) & 0xFFFF_FFFF


def new_footer(disk_size: int, geometry: tuple[int, int, int], disk_type: int,
               force_size: bool, data_offset: int) -> Footer:
    """A footer as qemu-img writes it ("qem2" marks a forced size)."""
    cylinders, heads, sectors = geometry
    return Footer(COOKIE, FEATURE_RESERVED, FORMAT_VERSION, data_offset,
                  vhd_time(time.time()),
                  b"qem2" if force_size else b"qemu", 0x0005_0003, b"Wi2k",
                  disk_size, disk_size, cylinders, heads, sectors, disk_type, 0,
                  uuid.uuid4().bytes, 0, bytes(427))


def new_dynamic_header(disk_size: int, table_offset: int, *,
                       parent_unique_id: bytes = bytes(16), parent_timestamp: int = 0,
                       parent_name: bytes = bytes(512),
                       locators_raw: bytes = bytes(LOCATOR.size * LOCATOR_COUNT)
                       ) -> DynamicHeader:
    entries = -(-disk_size // DEFAULT_BLOCK_SIZE)
    return DynamicHeader(DYNAMIC_COOKIE, NO_OFFSET, table_offset, HEADER_VERSION, entries,
                         DEFAULT_BLOCK_SIZE, 0, parent_unique_id, parent_timestamp, 0,
                         parent_name, locators_raw, bytes(256))


def new_image(size: int, options: dict[str, Any]) -> tuple[bytes, int, bytes]:
    """(head, file length, footer) of a new image, as qemu-img lays it out:
    a fixed disk is its data and the footer; a dynamic one the footer copy,
    the dynamic header, the BAT (all unused, padded to a sector) and the
    footer at the end."""
    force_size = bool(options["force_size"])
    geometry, disk_size = create_geometry(size, force_size)
    if options["subformat"] == "fixed":
        footer = new_footer(disk_size, geometry, DISK_FIXED, force_size, NO_OFFSET)
        return b"", disk_size + FOOTER.size, footer.pack()
    table_offset = FOOTER.size + DYNAMIC_HEADER.size
    footer = new_footer(disk_size, geometry, DISK_DYNAMIC, force_size, FOOTER.size)
    header = new_dynamic_header(disk_size, table_offset)
    bat = b"\xff" * align_up(header.max_table_entries * BAT_CODEC.width, SECTOR)
    head = footer.pack() + header.pack() + bat
    return head, len(head) + FOOTER.size, footer.pack()


# -- differencing disks (pure) -----------------------------------------------------------------

#: parent locator platform codes (spec "Dynamic Disk Header Format"): Windows
#: absolute and relative paths in UTF-16LE, a file URL in UTF-8
PLATFORM_W2KU, PLATFORM_W2RU, PLATFORM_MACX = b"W2ku", b"W2ru", b"MacX"
#: the order in which a parent is looked for: relative first
LOCATOR_PREFERENCE = (PLATFORM_W2RU, PLATFORM_MACX, PLATFORM_W2KU)
#: longest locator imgfs reads (a path; the spec's parent name holds 256 characters)
MAX_LOCATOR_BYTES = 64 * 1024


def sector_bit(bitmap: bytes, sector: int) -> bool:
    """Whether a sector is present in this image: one bit a sector, the most
    significant bit of a byte first (spec "Mapping a Disk Sector...")."""
    return bool(bitmap[sector >> 3] & (0x80 >> (sector & 7)))


def bit_run(bitmap: bytes, first: int, limit: int) -> tuple[bool, int]:
    """(the bit of sector `first`, how many sectors from it, before `limit`,
    share it).  Whole bytes are compared at C speed."""
    value = sector_bit(bitmap, first)
    sector = first + 1
    while sector < limit and sector & 7:
        if sector_bit(bitmap, sector) != value:
            return value, sector - first
        sector += 1
    byte, byte_end = sector >> 3, limit >> 3
    if byte < byte_end:
        segment = bitmap[byte:byte_end]
        sector = (byte + len(segment) - len(segment.lstrip(b"\xff" if value else b"\0"))) * 8
    while sector < limit and sector_bit(bitmap, sector) == value:
        sector += 1
    return value, sector - first


def set_bits(bitmap: bytearray, first: int, count: int) -> tuple[int, int]:
    """Set the bits of sectors first..first+count; return the byte range changed."""
    for sector in range(first, first + count):
        bitmap[sector >> 3] |= 0x80 >> (sector & 7)
    return first >> 3, ((first + count - 1) >> 3) + 1


def locator_names(code: bytes, data: bytes) -> list[str]:
    """File names a parent locator offers, to try relative to the child's
    directory: a Windows absolute path offers its last component (a POSIX
    absolute path, as imgfs writes it, itself first)."""
    if code in (PLATFORM_W2KU, PLATFORM_W2RU):
        text = data.decode("utf-16-le", errors="replace")
    elif code == PLATFORM_MACX:
        text = data.decode("utf-8", errors="replace")
        text = text.removeprefix("file://").removeprefix("localhost")
        text = urllib.parse.unquote(text)
    else:
        return []
    text = text.rstrip("\0")
    if not text:
        return []
    if text.startswith("/") and code != PLATFORM_W2RU:
        return [text, text.rsplit("/", 1)[-1]]
    windows = text.replace("\\", "/")
    if code == PLATFORM_W2KU or (len(windows) > 1 and windows[1] == ":"):
        return [windows.rsplit("/", 1)[-1]]
    while windows.startswith("./"):
        windows = windows[2:]
    return [windows]


def parent_name(header: DynamicHeader) -> str:
    """The header's parent name (UTF-16BE), its last component."""
    text = header.parent_name.decode("utf-16-be", errors="replace").split("\0", 1)[0]
    return text.replace("\\", "/").rsplit("/", 1)[-1]


def check_locator(locator: Locator, file_size: int) -> None:
    end = locator.data_offset + locator.data_length
    if locator.data_length > MAX_LOCATOR_BYTES or end > file_size or \
            locator.data_offset < FOOTER.size:
        raise InvalidImage(f"parent locator {locator.platform_code!r} at "
                           f"{locator.data_offset:#x} (+{locator.data_length} bytes) lies "
                           "outside the file or is too long")


def new_locators(parent_path: str, child_path: str, start: int) -> tuple[bytes, bytes]:
    """(the header's 8 locator entries, their data from `start`): W2ru (the
    parent relative to the child's directory), W2ku (its absolute path,
    as POSIX knows it) and MacX (its file URL), each in whole sectors."""
    absolute = os.path.abspath(parent_path)
    relative = os.path.relpath(absolute, os.path.dirname(os.path.abspath(child_path)))
    payloads = [(PLATFORM_W2RU, (".\\" + relative.replace("/", "\\")).encode("utf-16-le")),
                (PLATFORM_W2KU, absolute.encode("utf-16-le")),
                (PLATFORM_MACX, ("file://" + urllib.parse.quote(absolute)).encode())]
    entries, data = b"", b""
    for code, payload in payloads:
        space = align_up(len(payload), SECTOR)
        # data space in bytes, as Windows writes it (the spec says sectors;
        # readers go by the data length)
        entries += LOCATOR.pack(code, space, len(payload), 0, start + len(data))
        data += payload.ljust(space, b"\0")
    return entries.ljust(LOCATOR.size * LOCATOR_COUNT, b"\0"), data


def new_differencing_image(parent: Footer, parent_size: int, parent_path: str,
                           child_path: str, parent_timestamp: int
                           ) -> tuple[bytes, int, bytes]:
    """(head, file length, footer) of a differencing disk over `parent`: its
    size and geometry, its identity (unique id, `parent_timestamp`) in the
    header,
    the locators between the header and the BAT (QEMU, which knows nothing
    of locators, appends blocks after the BAT and would overwrite them
    there)."""
    geometry = (parent.cylinders, parent.heads, parent.sectors_per_track)
    footer = new_footer(parent_size, geometry, DISK_DIFFERENCING, True, FOOTER.size)
    locators_start = FOOTER.size + DYNAMIC_HEADER.size
    locators, locator_data = new_locators(parent_path, child_path, locators_start)
    table_offset = locators_start + len(locator_data)
    entries = -(-parent_size // DEFAULT_BLOCK_SIZE)
    bat = b"\xff" * align_up(entries * BAT_CODEC.width, SECTOR)
    name = os.path.abspath(parent_path).encode("utf-16-be")[:512]
    header = new_dynamic_header(parent_size, table_offset, parent_unique_id=parent.unique_id,
                                parent_timestamp=parent_timestamp,
                                parent_name=name.ljust(512, b"\0"), locators_raw=locators)
    head = footer.pack() + header.pack() + locator_data + bat
    return head, len(head) + FOOTER.size, footer.pack()
