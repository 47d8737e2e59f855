"""Persistent dirty bitmaps, maintained as QEMU maintains them.

Spec: qemu/qemu docs/interop/qcow2.txt, "Bitmaps extension", "Bitmap
directory", "Bitmap table", "Bitmap data" and "Dirty tracking bitmaps".

A read-write open decodes the directory and gives every bitmap that is
consistent (in_use clear), enabled (auto) and well-formed a `DirtyTracker`.
The write paths call `Directory.mark` for each guest range they change;
that only sets bits in memory, in the bitmap clusters the range touches
(no I/O).  Before the first write every bitmap gets in_use in the image (a
crash leaves them flagged inconsistent, as the spec wants), and at close
`Directory.store` writes the touched bitmap clusters and new tables into
fresh clusters, then a new directory with in_use cleared, then the header
extension pointing at it, and only then frees what the old directory
reached.  Disabled bitmaps keep their bits (QEMU marks and stores them the
same way); bitmaps that were in_use at open, or that imgfs cannot use, are
left in_use.  Resizing the disk resizes every stored bitmap (new bits
clean, bits past a shrunk end dropped), as QEMU does.
"""
from __future__ import annotations

import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from imgfs.errors import ImgfsError, InvalidImage

from .header import EXT_BITMAPS, EXTENSION_HEADER, HEADER_V2_LENGTH, Extension, Header

if TYPE_CHECKING:
    from imgfs.node import Node

    from .metadata import Qcow2Metadata

BITMAPS_EXTENSION = struct.Struct(">IIQQ")
BITMAP_DIRECTORY_ENTRY = struct.Struct(">QIIBBHI")
#: QEMU's limits (65535 bitmaps; directory of at most 1 KiB per bitmap)
QCOW2_MAX_BITMAPS = 65535
QCOW2_MAX_BITMAP_DIRECTORY_SIZE = 1024 * QCOW2_MAX_BITMAPS
BME_FLAG_IN_USE = 1 << 0
BME_FLAG_AUTO = 1 << 1
BME_FLAG_EXTRA_DATA_COMPATIBLE = 1 << 2
BME_RESERVED_FLAGS = 0xFFFFFFFF & ~7
BME_TYPE_DIRTY_TRACKING = 1
#: granularities QEMU can load (the spec allows 0..63)
BME_MIN_GRANULARITY_BITS = 9
BME_MAX_GRANULARITY_BITS = 31
BME_MAX_NAME_SIZE = 1023
#: QEMU's limits on one bitmap: table entries, and bytes of bitmap data
BME_MAX_TABLE_SIZE = 0x8000000
BME_MAX_PHYS_SIZE = 0x20000000
#: bitmap table entry: bits 9-55 are the data cluster's offset
BME_TABLE_ENTRY_OFFSET_MASK = 0x00FFFFFFFFFFFE00
#: with no offset, bit 0 says the cluster reads as all ones
BME_TABLE_ENTRY_ALL_ONES = 1
BME_TABLE_ENTRY_RESERVED = 0xFF000000000001FE

log = logging.getLogger("imgfs")


class BitmapsExtension(NamedTuple):
    nb_bitmaps: int
    reserved: int
    bitmap_directory_size: int
    bitmap_directory_offset: int

    @classmethod
    def unpack(cls, data: bytes) -> BitmapsExtension:
        if len(data) < BITMAPS_EXTENSION.size:
            raise InvalidImage(f"bitmaps extension of {len(data)} bytes is too short "
                               f"(expected {BITMAPS_EXTENSION.size})")
        return cls(*BITMAPS_EXTENSION.unpack_from(data))


class BitmapEntry(NamedTuple):
    """Where one directory entry is and what it points at."""

    position: int             # byte offset of the entry inside the directory
    table_offset: int
    table_size: int
    flags: int


class Bitmap(NamedTuple):
    """One bitmap directory entry, decoded."""

    position: int
    table_offset: int
    table_size: int
    flags: int
    type: int
    granularity_bits: int
    name: str
    extra_data_size: int

    def info(self) -> dict[str, object]:
        """qemu-img info's format-specific.data.bitmaps[] entry."""
        flags = []
        if self.flags & BME_FLAG_IN_USE:
            flags.append("in-use")
        if self.flags & BME_FLAG_AUTO:
            flags.append("auto")
        return {"flags": flags, "name": self.name,
                "granularity": 1 << min(self.granularity_bits, 63)}


def check_extension(ext: BitmapsExtension, cluster_size: int, file_size: int) -> None:
    if not 1 <= ext.nb_bitmaps <= QCOW2_MAX_BITMAPS:
        raise InvalidImage(f"nb_bitmaps {ext.nb_bitmaps} out of range "
                           f"(expected 1..{QCOW2_MAX_BITMAPS})")
    if ext.bitmap_directory_size > QCOW2_MAX_BITMAP_DIRECTORY_SIZE or \
            ext.bitmap_directory_offset % cluster_size or \
            ext.bitmap_directory_offset + ext.bitmap_directory_size > file_size:
        raise InvalidImage(f"bitmap directory at {ext.bitmap_directory_offset:#x} "
                           f"(+{ext.bitmap_directory_size}) is unaligned, too large or "
                           "beyond the end of the file")


def extension_data_offset(header: Header, extensions: Sequence[Extension]) -> int:
    """Where the bitmaps extension's data sits in the header cluster: the
    extensions follow one another from header_length (spec: "Header
    extensions"), each padded to 8 bytes."""
    position = header.header_length if header.version >= 3 else HEADER_V2_LENGTH
    for ext in extensions:
        if ext.type == EXT_BITMAPS:
            return position + EXTENSION_HEADER.size
        position += EXTENSION_HEADER.size + len(ext.data) + -len(ext.data) % 8
    raise InvalidImage("no bitmaps extension")


def read_directory(raw: bytes, count: int) -> list[Bitmap]:
    """The decoded entries of a bitmap directory (`raw` is the whole directory)."""
    entries = []
    position = 0
    for number in range(count):
        if position + BITMAP_DIRECTORY_ENTRY.size > len(raw):
            raise InvalidImage(f"bitmap directory overflows at entry {number} of {count}")
        table_offset, table_size, flags, kind, granularity, name_size, extra_size = \
            BITMAP_DIRECTORY_ENTRY.unpack_from(raw, position)
        name_start = position + BITMAP_DIRECTORY_ENTRY.size + extra_size
        name = raw[name_start:name_start + name_size].decode("utf-8", "replace")
        entries.append(Bitmap(position, table_offset, table_size, flags, kind, granularity,
                              name, extra_size))
        position = name_start + name_size
        position += -position % 8
    if position > len(raw) + 7:
        raise InvalidImage("bitmap directory entries run past its size")
    return entries


def parse_directory(raw: bytes, count: int) -> list[BitmapEntry]:
    """Where the entries of a bitmap directory are and what they point at."""
    return [BitmapEntry(bitmap.position, bitmap.table_offset, bitmap.table_size, bitmap.flags)
            for bitmap in read_directory(raw, count)]


def mark_in_use(raw: bytearray, entries: list[BitmapEntry]) -> bool:
    """Set in_use on every entry; True if anything changed."""
    changed = False
    for entry in entries:
        if not entry.flags & BME_FLAG_IN_USE:
            struct.pack_into(">I", raw, entry.position + 12, entry.flags | BME_FLAG_IN_USE)
            changed = True
    return changed


def table_size_for(disk_size: int, granularity_bits: int, cluster_size: int) -> int:
    """Bitmap table entries a disk of `disk_size` bytes needs (spec: "Bitmaps":
    one bit per granule, stored in clusters)."""
    bits = -(-disk_size >> granularity_bits)
    return -(-bits // (8 * cluster_size))


def unusable_reason(bitmap: Bitmap, disk_size: int, cluster_size: int,
                    file_size: int) -> str | None:
    """Why imgfs cannot maintain `bitmap` (None if it can)."""
    if bitmap.type != BME_TYPE_DIRTY_TRACKING:
        return f"type {bitmap.type} is not a dirty tracking bitmap"
    if bitmap.flags & BME_RESERVED_FLAGS:
        return f"reserved flags {bitmap.flags:#x}"
    if bitmap.extra_data_size:
        return "it has extra data"
    if not BME_MIN_GRANULARITY_BITS <= bitmap.granularity_bits <= BME_MAX_GRANULARITY_BITS:
        return f"granularity_bits {bitmap.granularity_bits} out of range"
    expected = table_size_for(disk_size, bitmap.granularity_bits, cluster_size)
    if bitmap.table_size != expected or bitmap.table_size > BME_MAX_TABLE_SIZE or \
            bitmap.table_size * cluster_size > BME_MAX_PHYS_SIZE:
        return f"bitmap_table_size {bitmap.table_size} (expected {expected}, at most " \
            f"{BME_MAX_PHYS_SIZE // cluster_size})"
    if bitmap.table_offset % cluster_size or \
            bitmap.table_offset + bitmap.table_size * 8 > file_size:
        return f"bitmap table at {bitmap.table_offset:#x} unaligned or beyond the file"
    return None


def set_bits(buffer: bytearray, first: int, last: int) -> None:
    """Set bits first..last (inclusive) of `buffer`; bit n is bit n % 8 of
    byte n // 8 (spec: "Bitmap data")."""
    first_byte, last_byte = first >> 3, last >> 3
    low = (0xFF << (first & 7)) & 0xFF
    high = 0xFF >> (7 - (last & 7))
    if first_byte == last_byte:
        buffer[first_byte] |= low & high
        return
    buffer[first_byte] |= low
    if last_byte > first_byte + 1:
        buffer[first_byte + 1:last_byte] = b"\xff" * (last_byte - first_byte - 1)
    buffer[last_byte] |= high


def merge_bits(stored: bytes, gained: bytes | bytearray) -> bytes:
    """`stored` OR `gained` (bitmap clusters of equal length)."""
    merged = int.from_bytes(stored, "little") | int.from_bytes(gained, "little")
    return merged.to_bytes(len(stored), "little")


class DirtyTracker:
    """The bits one enabled bitmap gained since open, per bitmap cluster."""

    def __init__(self, bitmap: Bitmap, cluster_size: int) -> None:
        self.bitmap = bitmap
        self.granularity_bits = bitmap.granularity_bits
        self.cluster_size = cluster_size
        self.bits_per_cluster = cluster_size * 8
        #: bitmap table index -> bits to OR into that bitmap cluster
        self.changes: dict[int, bytearray] = {}

    def mark(self, offset: int, end: int) -> None:
        first = offset >> self.granularity_bits
        last = (end - 1) >> self.granularity_bits
        per_cluster = self.bits_per_cluster
        while first <= last:
            index = first // per_cluster
            base = index * per_cluster
            stop = min(last, base + per_cluster - 1)
            bits = self.changes.get(index)
            if bits is None:
                bits = self.changes[index] = bytearray(self.cluster_size)
            set_bits(bits, first - base, stop - base)
            first = stop + 1


@dataclass
class Directory:
    """The bitmaps of one image: what the directory says, and what changed."""

    extension: BitmapsExtension
    #: where the extension's data sits in the header cluster
    extension_offset: int
    raw: bytes
    bitmaps: list[Bitmap]
    #: the virtual disk size the tables were made for
    disk_size: int
    trackers: dict[int, DirtyTracker] = field(default_factory=dict)
    #: positions of the bitmaps that were consistent at open and whose
    #: in_use flag imgfs set: store clears it again
    maintained: set[int] = field(default_factory=set)
    #: in_use is set in the image: store must run at close
    marked: bool = False
    #: name -> why imgfs cannot maintain that bitmap (it stays in_use)
    unusable: dict[str, str] = field(default_factory=dict)

    @classmethod
    async def load(cls, meta: Qcow2Metadata, extension: BitmapsExtension,
                   extension_offset: int) -> Directory:
        raw = await meta.children["file"].read(extension.bitmap_directory_offset,
                                               extension.bitmap_directory_size)
        return cls(extension, extension_offset, raw, read_directory(raw, extension.nb_bitmaps),
                   meta.size)

    def start_tracking(self, meta: Qcow2Metadata) -> None:
        """Read-write open: choose the bitmaps imgfs maintains."""
        file_size = meta.children["file"].size
        for bitmap in self.bitmaps:
            if bitmap.flags & BME_FLAG_IN_USE:
                continue            # inconsistent already: left as it is
            reason = unusable_reason(bitmap, meta.size, meta.cluster_size, file_size)
            if reason is not None:
                self.unusable[bitmap.name] = reason
                continue
            self.maintained.add(bitmap.position)
            if bitmap.flags & BME_FLAG_AUTO:
                self.trackers[bitmap.position] = DirtyTracker(bitmap, meta.cluster_size)

    def mark(self, offset: int, length: int) -> None:
        """A guest range changed: the write paths' hook."""
        if length <= 0:
            return
        end = offset + length
        for tracker in self.trackers.values():
            tracker.mark(offset, end)

    async def mark_in_use(self, meta: Qcow2Metadata) -> None:
        """Before the first write: every bitmap says it may be out of date."""
        for name, reason in self.unusable.items():
            log.warning("%s: bitmap '%s' cannot be maintained (%s): marked in use",
                        meta.filename, name, reason)
        raw = bytearray(self.raw)
        if mark_in_use(raw, parse_directory(self.raw, self.extension.nb_bitmaps)):
            await meta.write_header_bytes(self.extension.bitmap_directory_offset,
                                          bytes(raw))
            self.raw = bytes(raw)
        self.marked = True

    # -- storing at close --------------------------------------------------------------

    async def store(self, meta: Qcow2Metadata) -> None:
        """Write the maintained bitmaps back with in_use clear (crash-safe:
        new clusters, refcounts, directory, header, then frees)."""
        if not self.marked:
            return
        raw = bytearray(self.raw)
        frees: list[tuple[int, int]] = []
        for bitmap in self.bitmaps:
            if bitmap.position not in self.maintained:
                continue
            try:
                table_offset, table_size = await self._store_bitmap(meta, bitmap, frees)
            except ImgfsError as error:
                log.warning("%s: bitmap '%s' left in use: %s", meta.filename,
                            bitmap.name, error)
                continue
            struct.pack_into(">QII", raw, bitmap.position, table_offset, table_size,
                             bitmap.flags & ~BME_FLAG_IN_USE)
        await self._switch_directory(meta, bytes(raw), frees)
        self.marked = False
        self.disk_size = meta.size
        for tracker in self.trackers.values():
            tracker.changes.clear()

    async def _switch_directory(self, meta: Qcow2Metadata, raw: bytes,
                                frees: list[tuple[int, int]]) -> None:
        file = meta.children["file"]
        refcounts = meta.refcounts
        clusters = -(-len(raw) // meta.cluster_size)
        offset = await refcounts.allocate(clusters)
        await file.write(offset, raw)
        await refcounts.write_back()
        await file.flush()
        old = self.extension
        self.extension = old._replace(bitmap_directory_offset=offset)
        await meta.write_header_bytes(self.extension_offset,
                                      BITMAPS_EXTENSION.pack(*self.extension))
        meta.bitmaps = self.extension
        self.raw = raw
        self.bitmaps = read_directory(raw, self.extension.nb_bitmaps)
        frees.append((old.bitmap_directory_offset,
                      -(-old.bitmap_directory_size // meta.cluster_size)))
        for host, count in frees:
            await refcounts.update(host >> meta.geometry.cluster_bits, count, -1)
        await refcounts.write_back()
        await file.flush()

    async def _store_bitmap(self, meta: Qcow2Metadata, bitmap: Bitmap,
                            frees: list[tuple[int, int]]) -> tuple[int, int]:
        """(table offset, table size) of `bitmap` with its new bits and the
        disk's current size; what the old table reached and no longer
        needs is added to `frees`."""
        cluster_size = meta.cluster_size
        file = meta.children["file"]
        old_table = await self._read_table(meta, bitmap)
        new_size = table_size_for(meta.size, bitmap.granularity_bits, cluster_size)
        tracker = self.trackers.get(bitmap.position)
        rewrite = {index for index in (tracker.changes if tracker else ())
                   if index < new_size}
        if meta.size != self.disk_size and new_size:
            rewrite.add(new_size - 1)       # its unused tail bits must be zero
        if not rewrite and new_size == len(old_table):
            return bitmap.table_offset, bitmap.table_size
        table = old_table[:new_size] + [0] * (new_size - len(old_table))
        for index in sorted(rewrite):
            content = await self._cluster_content(file, table[index], cluster_size)
            if tracker is not None and index in tracker.changes:
                content = merge_bits(content, tracker.changes[index])
            if index == new_size - 1:
                content = self._clear_tail(content, meta.size, bitmap.granularity_bits,
                                           index, cluster_size)
            if table[index] & BME_TABLE_ENTRY_OFFSET_MASK:
                frees.append((table[index] & BME_TABLE_ENTRY_OFFSET_MASK, 1))
            table[index] = await self._new_data_cluster(meta, content)
        for entry in old_table[new_size:]:
            if entry & BME_TABLE_ENTRY_OFFSET_MASK:
                frees.append((entry & BME_TABLE_ENTRY_OFFSET_MASK, 1))
        table_offset = 0
        if new_size:
            raw_table = struct.pack(f">{new_size}Q", *table)
            table_clusters = -(-len(raw_table) // cluster_size)
            table_offset = await meta.refcounts.allocate(table_clusters)
            await file.write(table_offset, raw_table.ljust(table_clusters * cluster_size,
                                                           b"\0"))
        if bitmap.table_size:
            frees.append((bitmap.table_offset, -(-bitmap.table_size * 8 // cluster_size)))
        return table_offset, new_size

    @staticmethod
    async def _read_table(meta: Qcow2Metadata, bitmap: Bitmap) -> list[int]:
        file = meta.children["file"]
        raw = await file.read(bitmap.table_offset, bitmap.table_size * 8)
        table = list(struct.unpack(f">{bitmap.table_size}Q", raw))
        for entry in table:
            host = entry & BME_TABLE_ENTRY_OFFSET_MASK
            if entry & BME_TABLE_ENTRY_RESERVED or host and entry & BME_TABLE_ENTRY_ALL_ONES \
                    or host % meta.cluster_size or host + meta.cluster_size > file.size:
                raise InvalidImage(f"bitmap table entry {entry:#x} is invalid")
        return table

    @staticmethod
    async def _cluster_content(file: Node, entry: int, cluster_size: int) -> bytes:
        host = entry & BME_TABLE_ENTRY_OFFSET_MASK
        if host:
            return await file.read(host, cluster_size)
        return (b"\xff" if entry & BME_TABLE_ENTRY_ALL_ONES else b"\0") * cluster_size

    @staticmethod
    def _clear_tail(content: bytes, disk_size: int, granularity_bits: int, index: int,
                    cluster_size: int) -> bytes:
        """Zero the bits of the last bitmap cluster past the disk's end."""
        bits = -(-disk_size >> granularity_bits) - index * cluster_size * 8
        if bits >= cluster_size * 8:
            return content
        data = bytearray(content)
        whole, rest = divmod(bits, 8)
        if rest:
            data[whole] &= (1 << rest) - 1
            whole += 1
        data[whole:] = bytes(len(data) - whole)
        return bytes(data)

    @staticmethod
    async def _new_data_cluster(meta: Qcow2Metadata, content: bytes) -> int:
        """The table entry for a bitmap cluster holding `content` (QEMU
        stores no cluster for one that is all zeros)."""
        if not any(content):
            return 0
        host = await meta.refcounts.allocate(1)
        await meta.children["file"].write(host, content)
        return host
