"""The state every part of the qcow2 driver shares, as one object.

The header, the L1 table and the L2 table cache, the refcounts, the
snapshot table, the bitmap directory and the metadata lock live here,
with the operations on them that more than one module needs: header
updates, the first-write preparation, L2 lookups, the crash-safe
write-back (refcount blocks, flush, L2 tables, flush, L1 entries; clusters
that lost their last reference are released only after that) and L1
growth.  The driver, its write path (`write`), the check and repair
(`repair`), internal snapshots (`snapshot_ops`) and persistent bitmaps
(`bitmaps`) all take a `Qcow2Metadata`; none of them imports the driver.
"""
from __future__ import annotations

import array
import logging
import struct
from typing import TYPE_CHECKING

from imgfs.errors import CorruptImage, ImgfsError, InvalidImage, ReadOnly
from imgfs.tablecache import MetadataLock, Table, TableCache

from . import bitmaps
from .cluster import (
    L2E_OFFSET_MASK,
    QCOW_OFLAG_COMPRESSED,
    Geometry,
    compressed_range,
    decode_entry,
    pack_table,
    unpack_l2,
    unpack_table,
)
from .header import (
    AUTOCLEAR_BITMAPS,
    AUTOCLEAR_DATA_FILE_RAW,
    COMPAT_LAZY_REFCOUNTS,
    EXT_BITMAPS,
    INCOMPAT_CORRUPT,
    INCOMPAT_DATA_FILE,
    INCOMPAT_DIRTY,
    INCOMPAT_EXTL2,
    OFFSET_AUTOCLEAR,
    OFFSET_INCOMPAT,
    OFFSET_L1,
    OFFSET_REFCOUNT_ORDER_END,
    OFFSET_REFCOUNT_TABLE,
    OFFSET_SIZE,
    QCOW_MAX_SNAPSHOTS_SIZE,
    ImageHeader,
    pack_extensions,
)
from .refcount import RefcountGeometry, RefcountStore
from .snapshot import (
    SNAPSHOT_ENTRY,
    V3_MIN_EXTRA,
    Snapshot,
    SnapshotEntry,
    parse_snapshot_table,
)

if TYPE_CHECKING:
    from imgfs.node import Node

log = logging.getLogger("imgfs")

#: most bytes of extra data a snapshot table entry may carry (QEMU's limit)
MAX_SNAPSHOT_EXTRA_DATA = 1024


class Qcow2Metadata:
    """One open image's metadata (see the module docstring)."""

    def __init__(self, image: ImageHeader, children: dict[str, Node], *, filename: str,
                 read_only: bool, check_mode: bool, l2_cache_bytes: int) -> None:
        header = image.header
        incompat = header.incompatible_features
        self.image = image
        self.header = header
        #: the driver's children (the data file joins them at attach)
        self.children = children
        self.filename = filename
        self.read_only = read_only
        # imgfs check: damage the check reports does not refuse the open.
        # A bad snapshot table or snapshot L1 table is tolerated even for
        # -r (the repair never writes them); the L1 table past the end of
        # the file only read-only.
        self.check_mode = check_mode
        self.tolerate_tables = check_mode and read_only
        self.version = header.version
        self.geometry = Geometry(header.cluster_bits, bool(incompat & INCOMPAT_EXTL2))
        self.cluster_size = header.cluster_size
        #: the guest size
        self.size = header.size
        self.zero_flag = header.version >= 3 and not self.geometry.extended_l2
        # With no name in the image, the data file must come from the
        # option tree ({"data-file": ...}), which the core opens instead.
        self.data_file_name = image.data_file
        self.has_data_file = bool(incompat & INCOMPAT_DATA_FILE)
        self.data_child = "data-file" if self.has_data_file else "file"
        self.data_file_raw = bool(header.autoclear_features & AUTOCLEAR_DATA_FILE_RAW)
        self.l2_cache = TableCache(l2_cache_bytes // self.cluster_size)
        self.lock = MetadataLock()
        self.l1: list[int] = []
        self.l1_dirty: set[int] = set()
        #: the first write's header changes are made (prepare_for_write)
        self.prepared = False
        #: data writes under way outside the lock (frees wait for them)
        self.inflight = 0
        #: an internal snapshot is open (read-only)
        self.snapshot_view = False
        self.snapshots: list[Snapshot] = []
        self.snapshot_table_length = 0
        self.snapshot_errors: list[str] = []
        self.bitmaps: bitmaps.BitmapsExtension | None = None
        self.bitmap_directory: bitmaps.Directory | None = None
        self.refcounts: RefcountStore
        #: the tables are read (and, at close, to be written back)
        self.loaded = False

    async def load(self) -> None:
        """Read the tables the header names."""
        header = self.header
        self.l1 = unpack_table(await self.read_table(header.l1_table_offset,
                                                     header.l1_size * 8))
        self.snapshots = await self.read_snapshots()
        self.bitmaps = self.bitmaps_extension()
        self.bitmap_directory = await self.load_bitmap_directory()
        await self.open_refcounts()
        self.loaded = True

    async def read_table(self, offset: int, length: int) -> bytes:
        """A table's bytes; in check mode only the part inside the file (the
        rest reads as no entries, as in QEMU's check), whole entries only."""
        if self.tolerate_tables:
            inside = await self.read_inside(offset, length)
            return inside[:len(inside) // 8 * 8]
        return await self.children["file"].read(offset, length) if length else b""

    async def read_inside(self, offset: int, length: int) -> bytes:
        """Of `length` bytes at `offset`, the part the file holds (none past
        its end): tables that run past the end, as QEMU's check reads them."""
        file = self.children["file"]
        inside = max(0, min(length, file.size - offset))
        return await file.read(offset, inside) if inside else b""

    async def read_snapshots(self) -> list[Snapshot]:
        """Read exactly the bytes the snapshot table occupies, walking its
        entries' lengths, so a hostile count costs no big allocation.

        Past the end of the file the table reads as zeros, as QEMU reads it
        (its block layer zero-fills reads past EOF): an entry cut off there
        keeps what the file holds of it, and qemu-img info and check accept
        the image.  QEMU's check calls an entry whose fixed part is cut
        "incomplete" (one error each, `snapshot_errors`); a cut name or
        extra data goes unremarked.  Checked with cuts at every field."""
        header = self.header
        self.snapshot_table_length = 0
        self.snapshot_errors = []
        if not header.nb_snapshots:
            return []
        file = self.children["file"]
        start = position = end = header.snapshots_offset
        incomplete: set[int] = set()
        for number in range(header.nb_snapshots):
            if position - start > QCOW_MAX_SNAPSHOTS_SIZE:
                raise InvalidImage(f"snapshot table overflows: entry {number} of "
                                   f"{header.nb_snapshots} starts at {position:#x}")
            if position + SNAPSHOT_ENTRY.size > file.size:
                incomplete.add(number)
            entry = SnapshotEntry.unpack(await self.read_zero_padded(position,
                                                                     SNAPSHOT_ENTRY.size))
            if entry.extra_data_size > MAX_SNAPSHOT_EXTRA_DATA:
                raise InvalidImage(f"snapshot table entry {number}: too much extra data "
                                   f"({entry.extra_data_size} bytes, at most "
                                   f"{MAX_SNAPSHOT_EXTRA_DATA})")
            end = position + SNAPSHOT_ENTRY.size + entry.extra_data_size \
                + entry.id_str_size + entry.name_size
            position = end + -end % 8
        self.snapshot_table_length = end - start   # (QEMU leaves out the last padding)
        table = await self.read_zero_padded(start, end - start)
        snapshots = parse_snapshot_table(table, header.nb_snapshots, self.cluster_size,
                                         file.size, check=self.check_mode)
        if self.check_mode:
            if self.version >= 3:
                # as QEMU's check: v3 entries need the VM state and disk sizes
                incomplete.update(number for number, snap in enumerate(snapshots)
                                  if len(snap.extra) < V3_MIN_EXTRA)
            self.snapshot_errors = [f"ERROR snapshot table entry {number} is incomplete"
                                    for number in sorted(incomplete)]
        return snapshots

    async def read_zero_padded(self, offset: int, length: int) -> bytes:
        """`length` bytes of the file at `offset`, zeros past its end."""
        return (await self.read_inside(offset, length)).ljust(length, b"\0")

    def bitmaps_extension(self) -> bitmaps.BitmapsExtension | None:
        """The bitmaps extension, when its auto-clear bit says it is valid."""
        if not self.header.autoclear_features & AUTOCLEAR_BITMAPS:
            return None
        for ext in self.image.extensions:
            if ext.type == EXT_BITMAPS:
                found = bitmaps.BitmapsExtension.unpack(ext.data)
                bitmaps.check_extension(found, self.cluster_size, self.children["file"].size)
                return found
        return None

    async def load_bitmap_directory(self) -> bitmaps.Directory | None:
        if self.bitmaps is None:
            return None
        offset = bitmaps.extension_data_offset(self.header, self.image.extensions)
        try:
            return await bitmaps.Directory.load(self, self.bitmaps, offset)
        except InvalidImage as error:
            # readable without its bitmaps; writes refuse (_mark_bitmaps_in_use)
            log.warning("%s: %s", self.filename, error)
            return None

    async def bitmap_entries(self) -> list[bitmaps.BitmapEntry]:
        if self.bitmaps is None:
            return []
        raw = await self.children["file"].read(self.bitmaps.bitmap_directory_offset,
                                               self.bitmaps.bitmap_directory_size)
        return bitmaps.parse_directory(raw, self.bitmaps.nb_bitmaps)

    async def mark_bitmaps_in_use(self) -> None:
        """Bitmaps are synced at close only: say so before the first write."""
        if self.bitmaps is None:
            return
        if self.bitmap_directory is None:
            raise InvalidImage("the bitmap directory is damaged: refusing to write")
        await self.bitmap_directory.mark_in_use(self)

    async def open_refcounts(self) -> None:
        header = self.header
        file = self.children["file"]
        table = unpack_table(await self.read_table(header.refcount_table_offset,
                                                   header.refcount_table_clusters
                                                   << header.cluster_bits))
        geometry = RefcountGeometry(header.cluster_bits, header.refcount_order)
        self.refcounts = RefcountStore(file, geometry, table, header.refcount_table_offset,
                                       header.refcount_table_clusters, self.move_reftable)

    async def write_header_bytes(self, offset: int, data: bytes) -> None:
        file = self.children["file"]
        await file.write(offset, data)
        await file.flush()

    async def set_incompat(self, bits: int) -> None:
        if self.version < 3:
            return
        await self.write_header_bytes(OFFSET_INCOMPAT, struct.pack(">Q", bits))
        self.header = self.header._replace(incompatible_features=bits)

    async def move_reftable(self, offset: int, clusters: int) -> None:
        await self.write_header_bytes(OFFSET_REFCOUNT_TABLE,
                                      struct.pack(">QI", offset, clusters))
        self.header = self.header._replace(refcount_table_offset=offset,
                                           refcount_table_clusters=clusters)

    def header_bytes_used(self) -> int:
        header = self.header
        return max(header.backing_file_offset + header.backing_file_size,
                   (header.header_length if header.version >= 3 else 72)
                   + len(pack_extensions(list(self.image.extensions))))

    async def switch_refcount_structures(self, offset: int, clusters: int, order: int) -> None:
        """Point the header at a new refcount table (and width) in one write
        of the fields from refcount_table_offset to refcount_order."""
        header = self.header._replace(refcount_table_offset=offset,
                                      refcount_table_clusters=clusters,
                                      refcount_order=order if self.version >= 3 else 4)
        end = OFFSET_REFCOUNT_ORDER_END if self.version >= 3 else OFFSET_INCOMPAT
        await self.write_header_bytes(OFFSET_REFCOUNT_TABLE,
                                      header.pack()[OFFSET_REFCOUNT_TABLE:end])
        self.header = header
        await self.open_refcounts()

    async def prepare_for_write(self) -> None:
        """First modification: drop the auto-clear bits we do not maintain
        (spec: autoclear_features) and, with lazy refcounts, mark dirty."""
        if self.header.incompatible_features & INCOMPAT_CORRUPT:
            raise CorruptImage("the image is marked corrupt; refusing to write (repair it "
                               "with check -r all)")
        if self.prepared:
            return
        if self.snapshot_view:
            raise ReadOnly("internal snapshots are opened read-only")
        await self.mark_bitmaps_in_use()
        header = self.header
        keep = header.autoclear_features & AUTOCLEAR_DATA_FILE_RAW
        if self.bitmaps is not None:
            keep |= AUTOCLEAR_BITMAPS
        if self.version >= 3 and header.autoclear_features != keep:
            await self.write_header_bytes(OFFSET_AUTOCLEAR, struct.pack(">Q", keep))
            self.header = header._replace(autoclear_features=keep)
        if self.version >= 3 and header.compatible_features & COMPAT_LAZY_REFCOUNTS:
            await self.set_incompat(self.header.incompatible_features | INCOMPAT_DIRTY)
        self.prepared = True

    async def mark_corrupt(self, message: str) -> CorruptImage:
        """Set the corrupt bit (spec: incompatible bit 1) and return the error."""
        if not self.read_only and self.version >= 3 and not self.snapshot_view:
            try:
                await self.set_incompat(self.header.incompatible_features | INCOMPAT_CORRUPT)
            except ImgfsError:
                pass
        return CorruptImage(message)

    async def l2_table(self, l2_offset: int) -> Table:
        table = self.l2_cache.get(l2_offset)
        if table is not None:
            return table
        file = self.children["file"]
        if l2_offset & (self.cluster_size - 1) or l2_offset + self.cluster_size > file.size:
            raise await self.mark_corrupt(f"L2 table offset {l2_offset:#x} is unaligned or "
                                          f"beyond the end of the {file.size}-byte file")
        if self.overlaps_metadata(l2_offset, self.cluster_size):
            raise await self.mark_corrupt(f"L2 table offset {l2_offset:#x} overlaps the "
                                          "header, the L1 table or the refcount table")
        return await self.l2_cache.load(l2_offset, self.read_l2)

    async def read_l2(self, l2_offset: int) -> array.array[int]:
        return unpack_l2(await self.children["file"].read(l2_offset, self.cluster_size))

    async def write_l2(self, table: Table) -> None:
        await self.children["file"].write(table.offset, pack_table(table.entries))

    async def write_back(self) -> None:
        """Metadata to disk in crash-safe order (see the module docstring)."""
        file = self.children["file"]
        dirty_tables = self.l2_cache.dirty_tables()
        if await self.refcounts.write_back() and (dirty_tables or self.l1_dirty):
            await file.flush()
        if dirty_tables and self.has_data_file:
            await self.children["data-file"].flush()
        await self.l2_cache.write_back(self.write_l2)
        if self.l1_dirty:
            if dirty_tables:
                await file.flush()
            await self.write_l1()
        if self.refcounts.pending_frees and not self.inflight:
            await file.flush()
            await self.refcounts.apply_frees()
            await self.refcounts.write_back()

    async def write_l1(self) -> None:
        first, last = min(self.l1_dirty), max(self.l1_dirty)
        raw = pack_table(self.l1[first:last + 1])
        await self.children["file"].write(self.header.l1_table_offset + first * 8, raw)
        self.l1_dirty.clear()

    async def store_bitmaps(self) -> None:
        """Close: the maintained bitmaps back to the image, in_use cleared."""
        if self.bitmap_directory is None or not self.prepared:
            return
        try:
            await self.bitmap_directory.store(self)
        except ImgfsError as error:
            log.warning("%s: persistent bitmaps left in use: %s", self.filename, error)

    async def check_host_alignment(self, table: Table, offset: int) -> None:
        """As QEMU, a request that meets a misaligned host offset (see
        _misaligned_host) fails and marks the image corrupt."""
        host = self.misaligned_host(table, offset)
        if host is not None:
            raise await self.mark_corrupt(
                f"cluster allocation offset {host:#x} unaligned (L2 table at "
                f"{table.offset:#x}, index {self.geometry.l2_index(offset)})")

    def misaligned_host(self, table: Table, offset: int) -> int | None:
        """The host offset of the standard L2 entry for guest `offset` if it
        is not cluster aligned (spec: "Standard Cluster Descriptor", bits
        9..55), else None; a run of contiguous clusters is aligned when its
        first one is."""
        entry = table.entries[self.geometry.l2_index(offset)
                              * (2 if self.geometry.extended_l2 else 1)]
        host = entry & L2E_OFFSET_MASK
        if host & (self.cluster_size - 1) and not entry & QCOW_OFLAG_COMPRESSED:
            return host
        return None

    def overlaps_metadata(self, host: int, length: int) -> bool:
        """QEMU's cheapest overlap checks: a guest write must never land on
        the header, the active L1 table or the refcount table."""
        header = self.header
        regions = ((0, self.cluster_size),
                   (header.l1_table_offset, header.l1_size * 8),
                   (header.refcount_table_offset,
                    header.refcount_table_clusters << header.cluster_bits),
                   self.image.crypto_header or (0, 0))     # LUKS key material
        return any(host < start + size and start < host + length
                   for start, size in regions if size)

    def clusters_of(self, entry: int) -> list[tuple[int, int]]:
        """(host offset, cluster count) runs that an L2 entry holds a reference to."""
        if self.has_data_file or not entry:
            return []
        if entry & QCOW_OFLAG_COMPRESSED:
            host_offset, most = compressed_range(entry, self.geometry.cluster_bits)
            first = host_offset >> self.geometry.cluster_bits
            last = (host_offset + most - 1) >> self.geometry.cluster_bits
            return [(first << self.geometry.cluster_bits, last - first + 1)]
        mapping = decode_entry(entry, zero_flag=self.zero_flag)
        return [(mapping.host_offset, 1)] if mapping.host_offset else []

    def release(self, entry: int) -> None:
        """Queue the host clusters an overwritten L2 entry held."""
        for host, count in self.clusters_of(entry):
            self.refcounts.queue_free(host, count)

    async def grow_l1(self, entries: int) -> None:
        """Copy the L1 table to a bigger one, then point the header at it."""
        await self.write_back()
        file = self.children["file"]
        clusters = -(-entries * 8 // self.cluster_size)
        new_offset = await self.refcounts.allocate(clusters)
        new_l1 = self.l1 + [0] * (entries - len(self.l1))
        raw = pack_table(new_l1).ljust(clusters * self.cluster_size, b"\0")
        await file.write(new_offset, raw)
        await self.refcounts.write_back()
        await file.flush()
        old_offset, old_entries = self.header.l1_table_offset, len(self.l1)
        await self.write_header_bytes(OFFSET_L1, struct.pack(">IQ", entries, new_offset))
        self.header = self.header._replace(l1_size=entries, l1_table_offset=new_offset)
        self.l1 = new_l1
        if old_entries:
            old_clusters = -(-old_entries * 8 // self.cluster_size)
            await self.refcounts.update(old_offset >> self.geometry.cluster_bits,
                                        old_clusters, -1)

    async def set_size(self, size: int) -> None:
        await self.write_header_bytes(OFFSET_SIZE, struct.pack(">Q", size))
        self.header = self.header._replace(size=size)
        self.size = size
