"""FAT directory entries: 8.3 short names, VFAT long names, timestamps.

Spec: libyal/libfsfat ``documentation/File Allocation Table (FAT)
format.asciidoc``, sections "Directory entry", "Short (8.3) file name",
"File attributes" and "VFAT long file name entry".  Pure functions only.

A name that is already a valid upper-case 8.3 name is stored as it is; any
other name gets VFAT long-name entries (UTF-16, the highest sequence number
first) followed by a generated short name ``BASE~N.EXT``, unique in its
directory, whose checksum every long-name entry carries.
"""
from __future__ import annotations

import struct
import time
from typing import NamedTuple

# "File attributes"
ATTR_READ_ONLY = 0x01
ATTR_HIDDEN = 0x02
ATTR_SYSTEM = 0x04
ATTR_VOLUME_ID = 0x08
ATTR_DIRECTORY = 0x10
ATTR_ARCHIVE = 0x20
ATTR_LONG_NAME = ATTR_READ_ONLY | ATTR_HIDDEN | ATTR_SYSTEM | ATTR_VOLUME_ID
#: "VFAT long file name sequence number": bit 6 marks the last (first stored)
LFN_LAST = 0x40
LFN_CHARS = 13                     # 5 + 6 + 2 UTF-16 units per entry
LFN_MAX_UNITS = 255
DOT_NAME = b".          "
DOTDOT_NAME = b"..         "
#: characters a short name may hold besides A-Z and 0-9 ("Short (8.3) file name")
SHORT_EXTRA = set("$%'-_@~`!(){}^#& ")
SHORT_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") | SHORT_EXTRA
#: characters no FAT long name may hold
LONG_FORBIDDEN = set('"*/:<>?\\|') | {chr(code) for code in range(32)}
FAT_EPOCH_YEAR = 1980
FAT_LAST_YEAR = 2107

# "FAT-12, FAT-16 and FAT-32 directory entry"
DIR_ENTRY = struct.Struct("<8s3sBBBHHHHHHHI")
# "VFAT long file name entry"
LFN_ENTRY = struct.Struct("<B10sBBB12sH4s")


class DirEntry(NamedTuple):
    name: bytes
    extension: bytes
    attributes: int
    case_flags: int
    create_tenths: int
    create_time: int
    create_date: int
    access_date: int
    cluster_high: int
    write_time: int
    write_date: int
    cluster_low: int
    size: int

    def pack(self) -> bytes:
        return DIR_ENTRY.pack(*self)

    @classmethod
    def unpack(cls, data: bytes) -> DirEntry:
        return cls(*DIR_ENTRY.unpack_from(data))


class LfnEntry(NamedTuple):
    sequence: int
    part1: bytes
    attributes: int
    kind: int
    checksum: int
    part2: bytes
    cluster: int
    part3: bytes

    def pack(self) -> bytes:
        return LFN_ENTRY.pack(*self)

    @classmethod
    def unpack(cls, data: bytes) -> LfnEntry:
        return cls(*LFN_ENTRY.unpack_from(data))


class Stamp(NamedTuple):
    """FAT date and time of one instant (2-second resolution plus tenths)."""

    time: int
    date: int
    tenths: int                    # 10 ms units within the 2 seconds


def fat_stamp(timestamp: float) -> Stamp:
    """Local time, as FAT stores it, clamped to 1980..2107."""
    try:
        moment = time.localtime(timestamp)
    except (OverflowError, OSError, ValueError):
        moment = time.localtime(0 if timestamp < 0 else 2 ** 31 - 1)
    if moment.tm_year < FAT_EPOCH_YEAR:
        return Stamp(0, (1 << 5) | 1, 0)
    if moment.tm_year > FAT_LAST_YEAR:
        return Stamp((23 << 11) | (59 << 5) | 29, (127 << 9) | (12 << 5) | 31, 199)
    second = min(moment.tm_sec, 59)
    fat_time = (moment.tm_hour << 11) | (moment.tm_min << 5) | (second // 2)
    fat_date = ((moment.tm_year - FAT_EPOCH_YEAR) << 9) | (moment.tm_mon << 5) | moment.tm_mday
    fraction = timestamp - int(timestamp) if timestamp >= 0 else 0.0
    tenths = (second % 2) * 100 + int(fraction * 100)
    return Stamp(fat_time, fat_date, min(tenths, 199))


def lfn_checksum(short_name: bytes) -> int:
    """The checksum of the 11-byte short name each long-name entry carries:
    rotate right by one, add the next byte (fatgen103 "ChkSum")."""
    total = 0
    for byte in short_name:
        total = (((total & 1) << 7) + (total >> 1) + byte) & 0xFF
    return total


def name_problem(name: str) -> str | None:
    """Why `name` cannot be a FAT long name, or None when it can."""
    if any(char in LONG_FORBIDDEN for char in name):
        return "contains a character FAT names cannot hold"
    if name.endswith((".", " ")):
        return "ends with a dot or a space, which FAT drops"
    try:
        units = len(name.encode("utf-16-le")) // 2
    except UnicodeEncodeError:
        return "is not valid Unicode"
    if units > LFN_MAX_UNITS:
        return f"is longer than {LFN_MAX_UNITS} UTF-16 characters"
    return None


def clean_short_name(name: str) -> bytes | None:
    """The 11-byte short name when `name` is exactly a valid upper-case 8.3
    name (stored without long-name entries), else None."""
    base, dot, extension = name.partition(".")
    if not base or len(base) > 8 or len(extension) > 3 or "." in extension:
        return None
    if dot and not extension:
        return None
    if " " in name:
        return None                    # legal, but every tool shows it differently
    if not set(base) <= SHORT_CHARS or not set(extension) <= SHORT_CHARS:
        return None
    return (base.ljust(8) + extension.ljust(3)).encode("ascii")


def lfn_slots(name: str) -> int:
    """Directory entries the long name takes (0 for a clean 8.3 name)."""
    if clean_short_name(name) is not None:
        return 0
    units = len(name.encode("utf-16-le")) // 2
    return -(-units // LFN_CHARS)


def _short_chars(text: str) -> str:
    """Upper-case `text` and replace what a short name cannot hold with '_'."""
    out = []
    for char in text.upper():
        if char == " ":
            continue                   # spaces are dropped, as Windows does
        out.append(char if char in SHORT_CHARS else "_")
    return "".join(out)


def short_basis(name: str) -> tuple[str, str]:
    """The base (<= 8) and extension (<= 3) a generated short name starts from."""
    stripped = name.lstrip(".")
    base, dot, extension = stripped.rpartition(".")
    if not dot:
        base, extension = stripped, ""
    base = _short_chars(base.replace(".", ""))[:8] or "_"
    return base, _short_chars(extension)[:3]


class ShortNames:
    """Unique short names for one directory."""

    def __init__(self, taken: set[bytes]) -> None:
        #: every 11-byte short name in use in the directory
        self.taken = taken
        #: next tail number to try per (prefix, extension, tail width): all
        #: names whose candidates look alike share one increasing sequence,
        #: so "photo 0001.jpg".."photo 9999.jpg" cost O(n), not O(n^2)
        self.next_tail: dict[tuple[str, str, int], int] = {}

    def generate(self, name: str) -> bytes:
        """``BASE~N.EXT`` with the smallest free N, widening the tail as needed."""
        base, extension = short_basis(name)
        for width in range(2, 8):          # "~1".."~9", then "~10".."~99", ...
            prefix = base[:8 - width]
            group = (prefix, extension, width)
            number = self.next_tail.get(group, 10 ** (width - 2))
            while number < 10 ** (width - 1):
                short = (f"{prefix}~{number}".ljust(8) + extension.ljust(3)).encode("ascii")
                number += 1
                if short not in self.taken:
                    self.taken.add(short)
                    self.next_tail[group] = number
                    return short
            self.next_tail[group] = number
        raise ValueError(f"no free short name for {name!r}")


def long_name_entries(name: str, checksum: int) -> bytes:
    """The VFAT entries of `name`, last part first as they are stored."""
    units = name.encode("utf-16-le")
    count = -(-len(units) // (2 * LFN_CHARS))
    # A name that does not fill its last entry ends with a NUL, then 0xFFFF.
    padded = units + b"\0\0" if len(units) < count * 2 * LFN_CHARS else units
    padded = padded.ljust(count * 2 * LFN_CHARS, b"\xff")
    parts = []
    for sequence in range(count, 0, -1):
        chunk = padded[(sequence - 1) * 26:sequence * 26]
        marker = LFN_LAST if sequence == count else 0
        parts.append(LfnEntry(sequence | marker, chunk[0:10], ATTR_LONG_NAME, 0, checksum,
                              chunk[10:22], 0, chunk[22:26]).pack())
    return b"".join(parts)


def short_entry(short_name: bytes, attributes: int, cluster: int, size: int,
                write: Stamp, create: Stamp, access: Stamp) -> bytes:
    """One short directory entry; the cluster's high half only exists on FAT-32
    and is 0 on the others, which is what any cluster below 65536 gives."""
    return DirEntry(short_name[:8], short_name[8:], attributes, 0, create.tenths,
                    create.time, create.date, access.date, cluster >> 16,
                    write.time, write.date, cluster & 0xFFFF, size).pack()
