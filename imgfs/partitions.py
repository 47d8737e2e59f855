"""MBR and GPT partition tables, read as Linux reads them (``-o partitions``).

Layouts: the MBR as in the UEFI specification, section 5.2.1 (the legacy
MBR: four 16-byte entries at byte 446, signature 0x55 0xAA at 510) with
extended partitions chained through EBRs; the GPT as in section 5.3 (header
at LBA 1, its backup at the last LBA, CRC32 over the header and over the
entry array).  Numbering follows Linux: MBR primaries keep their slot
number 1-4, logical partitions count from 5 in chain order, GPT entries are
numbered by their index in the array (empty slots keep their number).

What is not exposed, each with a warning naming the problem: entries that
reach past the end of the disk (or outside the GPT's usable LBAs), entries
that overlap another or the table itself, EBR chains that loop or leave
their extended partition, GPT headers that fail their checks (the backup
header is used instead, as Linux does).  A protective MBR whose GPT is
unusable, or a hybrid MBR, is reported too.  The extended partition itself
is a container, not a partition: its number is skipped.

LBAs count the disk's logical sectors (`BlockDriver.sector_size`: 512, or
what a host block device reports); a disk that says 512 is also searched
for a GPT written with 4096-byte sectors, as in the image of a 4Kn disk.

Parsing is pure (`parse_mbr`, `parse_gpt_header`, `parse_gpt_entries`,
`check_overlaps`); `read_table` walks a disk through an async reader and
never reads more than `MAX_GPT_ARRAY` bytes of entries or `MAX_LOGICAL`
EBRs, whatever the headers say.
"""
from __future__ import annotations

import struct
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import NamedTuple

SECTOR_SIZE = 512
#: sector sizes a GPT is looked for with, in order (4096: a 4Kn disk image)
GPT_SECTOR_SIZES = (512, 4096)

# -- MBR (UEFI 2.x, 5.2.1) ----------------------------------------------------------
MBR_SIGNATURE = b"\x55\xaa"
MBR_SIGNATURE_OFFSET = 510
MBR_ENTRIES_OFFSET = 446
MBR_ENTRY = struct.Struct("<B3sB3sII")   # boot indicator, CHS, type, CHS, LBA, sectors
MBR_SLOTS = 4
TYPE_EMPTY = 0x00
TYPE_PROTECTIVE = 0xEE
#: DOS, Windows (LBA) and Linux extended partitions
EXTENDED_TYPES = frozenset({0x05, 0x0F, 0x85})
FIRST_LOGICAL = 5
#: Linux's DISK_MAX_PARTS: a longer EBR chain is treated as a loop
MAX_LOGICAL = 256 - FIRST_LOGICAL

# -- GPT (UEFI 2.x, 5.3.2 and 5.3.3) ------------------------------------------------
GPT_SIGNATURE = b"EFI PART"
GPT_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")
GPT_ENTRY = struct.Struct("<16s16sQQQ72s")
GPT_MIN_ENTRY_SIZE = GPT_ENTRY.size
GPT_PRIMARY_LBA = 1
#: the most entry-array bytes read (sfdisk writes 16 KiB)
MAX_GPT_ARRAY = 1 << 20

Reader = Callable[[int, int], Awaitable[bytes]]


@dataclass(frozen=True, slots=True)
class Partition:
    """One exposed partition: its Linux number and its byte range."""

    number: int
    start: int
    length: int

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass(frozen=True, slots=True)
class Table:
    """What a disk's partition table exposes, and what was wrong with it."""

    scheme: str                 # "mbr", "gpt" or "none"
    partitions: tuple[Partition, ...] = ()
    warnings: tuple[str, ...] = ()


class MbrEntry(NamedTuple):
    slot: int                   # 0..3 within its sector
    boot: int
    type: int
    first_lba: int
    sectors: int

    @property
    def extended(self) -> bool:
        return self.type in EXTENDED_TYPES


class GptHeader(NamedTuple):
    signature: bytes
    revision: int
    header_size: int
    header_crc: int
    reserved: int
    my_lba: int
    alternate_lba: int
    first_usable_lba: int
    last_usable_lba: int
    disk_guid: bytes
    entries_lba: int
    entry_count: int
    entry_size: int
    entries_crc: int

    @property
    def array_bytes(self) -> int:
        return self.entry_count * self.entry_size


class BadTable(Exception):
    """A header or sector that fails its checks (the message says which)."""


# -- MBR ----------------------------------------------------------------------------


def parse_mbr(sector: bytes) -> list[MbrEntry] | None:
    """The four entries of an MBR or EBR sector; None when it is not one
    (no 0x55AA signature, or a boot indicator other than 0x00/0x80, which a
    file system's boot sector would have)."""
    if len(sector) < SECTOR_SIZE or \
            sector[MBR_SIGNATURE_OFFSET:MBR_SIGNATURE_OFFSET + 2] != MBR_SIGNATURE:
        return None
    entries = []
    for slot in range(MBR_SLOTS):
        boot, _chs, kind, _chs_end, first_lba, sectors = MBR_ENTRY.unpack_from(
            sector, MBR_ENTRIES_OFFSET + slot * MBR_ENTRY.size)
        if boot not in (0x00, 0x80):
            return None
        entries.append(MbrEntry(slot, boot, kind, first_lba, sectors))
    return entries


def used(entries: list[MbrEntry]) -> list[MbrEntry]:
    return [entry for entry in entries if entry.type != TYPE_EMPTY and entry.sectors]


def is_protective(entries: list[MbrEntry]) -> bool:
    return any(entry.type == TYPE_PROTECTIVE for entry in used(entries))


async def read_mbr_table(read: Reader, entries: list[MbrEntry], disk_sectors: int,
                         sector_size: int, warnings: list[str]) -> list[Partition]:
    """Primaries by slot, then each extended partition's logical chain."""
    found: list[Partition] = []
    next_logical = FIRST_LOGICAL
    for entry in used(entries):
        if not entry.extended:
            found.extend(in_range(entry.slot + 1, entry.first_lba, entry.sectors,
                                  1, disk_sectors - 1, sector_size, warnings))
            continue
        if entry.first_lba == 0 or entry.first_lba + entry.sectors > disk_sectors:
            warnings.append(f"extended partition {entry.slot + 1} lies outside the disk: "
                            "its logical partitions are not exposed")
            continue
        logical, next_logical = await read_logical_chain(read, entry, next_logical,
                                                         sector_size, warnings)
        found.extend(logical)
    return found


async def read_logical_chain(read: Reader, extended: MbrEntry, number: int, sector_size: int,
                             warnings: list[str]) -> tuple[list[Partition], int]:
    """Follow the EBRs of one extended partition; returns the partitions and
    the next free number.  Each EBR's data entry is relative to the EBR
    itself, its link to the next EBR relative to the extended partition."""
    area_start = extended.first_lba
    area_end = extended.first_lba + extended.sectors - 1
    found: list[Partition] = []
    ebr_lba: int | None = area_start
    seen: set[int] = set()
    while ebr_lba is not None:
        if ebr_lba in seen or len(seen) >= MAX_LOGICAL or number >= FIRST_LOGICAL + MAX_LOGICAL:
            warnings.append(f"the EBR chain of extended partition {extended.slot + 1} loops "
                            "or is too long: stopped there")
            break
        seen.add(ebr_lba)
        entries = parse_mbr(await read(ebr_lba * sector_size, SECTOR_SIZE))
        if entries is None:
            if ebr_lba != area_start:
                warnings.append(f"no valid EBR at sector {ebr_lba}: the logical partitions "
                                "after it are not exposed")
            break
        links = [entry for entry in used(entries) if entry.extended]
        for entry in used(entries):
            if not entry.extended:
                found.extend(in_range(number, ebr_lba + entry.first_lba, entry.sectors,
                                      area_start + 1, area_end, sector_size, warnings))
                number += 1
        ebr_lba = area_start + links[0].first_lba if links else None
        if ebr_lba is not None and ebr_lba not in seen and not area_start < ebr_lba <= area_end:
            warnings.append(f"an EBR link points outside extended partition "
                            f"{extended.slot + 1} (sector {ebr_lba}): stopped there")
            break
    return found, number


def in_range(number: int, first_lba: int, sectors: int, lowest_lba: int, highest_lba: int,
             sector_size: int, warnings: list[str]) -> list[Partition]:
    """The partition as a one-item list, or [] with a warning when any of it
    lies outside [lowest_lba, highest_lba] (the disk, or the GPT's usable
    LBAs, or the extended partition a logical one belongs to)."""
    last_lba = first_lba + sectors - 1
    if sectors <= 0:
        return []
    if first_lba < lowest_lba or last_lba > highest_lba:
        warnings.append(f"partition {number} (sectors {first_lba}-{last_lba}) lies outside "
                        f"sectors {lowest_lba}-{highest_lba}: not exposed")
        return []
    return [Partition(number, first_lba * sector_size, sectors * sector_size)]


def check_overlaps(partitions: list[Partition], warnings: list[str]) -> list[Partition]:
    """Drop every partition that overlaps another (both of a pair: which one
    is right cannot be known), with a warning."""
    ordered = sorted(partitions, key=lambda part: (part.start, part.number))
    bad: set[int] = set()
    furthest: Partition | None = None
    for part in ordered:
        if furthest is not None and part.start < furthest.end:
            bad.update((part.number, furthest.number))
            warnings.append(f"partitions {furthest.number} and {part.number} overlap: "
                            "neither is exposed")
        if furthest is None or part.end > furthest.end:
            furthest = part
    return sorted((part for part in partitions if part.number not in bad),
                  key=lambda part: part.number)


# -- GPT ----------------------------------------------------------------------------


def gpt_crc(data: bytes) -> int:
    """The CRC32 of the UEFI specification (the one zlib computes)."""
    return zlib.crc32(data) & 0xFFFFFFFF


def parse_gpt_header(sector: bytes, lba: int, disk_sectors: int,
                     sector_size: int) -> GptHeader:
    """Check a GPT header read at `lba` (UEFI 5.3.2); raises BadTable."""
    if len(sector) < GPT_HEADER.size or sector[:8] != GPT_SIGNATURE:
        raise BadTable("no GPT signature")
    header = GptHeader(*GPT_HEADER.unpack_from(sector))
    if not GPT_HEADER.size <= header.header_size <= min(len(sector), sector_size):
        raise BadTable(f"header size {header.header_size} outside "
                       f"{GPT_HEADER.size}-{sector_size}")
    covered = bytearray(sector[:header.header_size])
    covered[16:20] = bytes(4)
    if gpt_crc(bytes(covered)) != header.header_crc:
        raise BadTable("header CRC mismatch")
    if header.my_lba != lba:
        raise BadTable(f"header says it is at LBA {header.my_lba}, read at {lba}")
    last_lba = disk_sectors - 1
    if not header.first_usable_lba <= header.last_usable_lba <= last_lba:
        raise BadTable(f"usable LBAs {header.first_usable_lba}-{header.last_usable_lba} "
                       f"do not fit a disk of {disk_sectors} sectors")
    size = header.entry_size
    if size < GPT_MIN_ENTRY_SIZE or size & (size - 1):
        raise BadTable(f"entry size {size} is not 128 times a power of two")
    if header.array_bytes > MAX_GPT_ARRAY:
        raise BadTable(f"{header.entry_count} entries of {size} bytes: more than "
                       f"{MAX_GPT_ARRAY} bytes")
    array_sectors = -(-header.array_bytes // sector_size)
    if header.entries_lba < 2 or header.entries_lba + array_sectors - 1 > last_lba:
        raise BadTable(f"entry array at LBA {header.entries_lba} lies outside the disk")
    # the usable LBAs hold partitions only: not the MBR, this header or its array
    usable = range(header.first_usable_lba, header.last_usable_lba + 1)
    array = range(header.entries_lba, header.entries_lba + array_sectors)
    if header.first_usable_lba < 2 or lba in usable or \
            (array.start < usable.stop and usable.start < array.stop):
        raise BadTable(f"usable LBAs {usable.start}-{usable.stop - 1} overlap the header "
                       "or its entry array")
    return header


def parse_gpt_entries(array: bytes, header: GptHeader, sector_size: int,
                      warnings: list[str]) -> list[Partition]:
    """The used entries of a checked array (UEFI 5.3.3), numbered from 1."""
    found = []
    for index in range(header.entry_count):
        offset = index * header.entry_size
        type_guid, _unique, first_lba, last_lba, _attributes, _name = \
            GPT_ENTRY.unpack_from(array, offset)
        if type_guid == bytes(16):
            continue
        if last_lba < first_lba:
            warnings.append(f"partition {index + 1} ends (LBA {last_lba}) before it starts "
                            f"(LBA {first_lba}): not exposed")
            continue
        found.extend(in_range(index + 1, first_lba, last_lba - first_lba + 1,
                              header.first_usable_lba, header.last_usable_lba,
                              sector_size, warnings))
    return found


async def read_gpt_header(read: Reader, lba: int, disk_sectors: int,
                          sector_size: int) -> tuple[GptHeader, bytes]:
    """A header and its entry array, both checked; raises BadTable."""
    if not 0 < lba < disk_sectors:
        raise BadTable(f"LBA {lba} is outside the disk")
    header = parse_gpt_header(await read(lba * sector_size, sector_size), lba,
                              disk_sectors, sector_size)
    array = await read(header.entries_lba * sector_size, header.array_bytes)
    if gpt_crc(array) != header.entries_crc:
        raise BadTable("entry array CRC mismatch")
    return header, array


async def read_gpt(read: Reader, disk_size: int, sector_size: int,
                   warnings: list[str]) -> list[Partition] | None:
    """The partitions of the GPT (primary, else backup); None when neither
    header is valid.  A damaged one is named in `warnings`."""
    disk_sectors = disk_size // sector_size
    try:
        header, array = await read_gpt_header(read, GPT_PRIMARY_LBA, disk_sectors, sector_size)
    except BadTable as primary_problem:
        try:
            header, array = await read_gpt_header(read, disk_sectors - 1, disk_sectors,
                                                  sector_size)
        except BadTable:
            return None
        warnings.append(f"primary GPT header is invalid ({primary_problem}): "
                        "using the backup GPT")
    else:
        backup_problem = await check_backup(read, header, disk_sectors, sector_size)
        if backup_problem:
            warnings.append(f"backup GPT header is invalid ({backup_problem}): "
                            "using the primary GPT")
    return parse_gpt_entries(array, header, sector_size, warnings)


async def check_backup(read: Reader, primary: GptHeader, disk_sectors: int,
                       sector_size: int) -> str | None:
    try:
        await read_gpt_header(read, primary.alternate_lba, disk_sectors, sector_size)
    except BadTable as problem:
        return str(problem)
    return None


# -- the whole disk -----------------------------------------------------------------


async def read_table(read: Reader, disk_size: int, sector_size: int = SECTOR_SIZE) -> Table:
    """The partitions Linux would find on a disk of `disk_size` bytes whose
    logical sectors are `sector_size` bytes (a GPT is also looked for with
    4096-byte sectors on a disk that says 512: a 4Kn disk's image)."""
    warnings: list[str] = []
    if disk_size < 2 * sector_size:
        return Table("none", (), ("the disk is too small for a partition table",))
    mbr = parse_mbr(await read(0, SECTOR_SIZE))
    if mbr is None:
        return Table("none", (), ("no MBR or GPT partition table",))
    disk_sectors = disk_size // sector_size
    if not is_protective(mbr):
        found = await read_mbr_table(read, mbr, disk_sectors, sector_size, warnings)
        return Table("mbr", tuple(check_overlaps(found, warnings)), tuple(warnings))
    if len(used(mbr)) > 1:
        warnings.append("hybrid MBR: using the GPT, the MBR's other entries are ignored")
    for gpt_sector in GPT_SECTOR_SIZES if sector_size == SECTOR_SIZE else (sector_size,):
        if disk_size >= 2 * gpt_sector:
            gpt = await read_gpt(read, disk_size, gpt_sector, warnings)
            if gpt is not None:
                return Table("gpt", tuple(check_overlaps(gpt, warnings)), tuple(warnings))
    warnings.append("protective MBR without a valid GPT (primary and backup headers "
                    "damaged or missing): no partitions")
    return Table("none", (), tuple(warnings))

