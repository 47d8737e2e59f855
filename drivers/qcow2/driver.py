"""The qcow2 format driver: open, block_status, read, write, flush.

Spec: qemu/qemu docs/interop/qcow2.txt.  Supported: versions 2 and 3,
cluster sizes 512 B .. 2 MiB, zero clusters, compressed clusters (zlib;
zstd when the `zstandard` module is installed), backing files (the core
reads them), external data files, extended L2 entries, every refcount
width, lazy refcounts and the dirty bit (a dirty image opened read-write
gets its refcounts rebuilt), internal snapshots listed and readable through
the `snapshot` open option.  Refused: encryption, writing images that have
internal snapshots, writing compressed clusters.

Layout of a write: the L2 entry decides.  A cluster that is allocated with
refcount 1 (the COPIED flag) is written in place without holding the
metadata lock.  Anything else (unallocated, zero, compressed, shared) takes
the lock, gets a fresh cluster filled with the old contents around the new
bytes (copy-on-write from the backing node), and has its L2 entry updated
in the cache.  `flush` writes metadata in the order that keeps a crashed
image consistent: refcount blocks, flush, L2 tables, flush, L1 entries;
clusters that lost their last reference are released only after that.
"""
from __future__ import annotations

import struct
import zlib
from typing import Any

import trio

from imgfs.block import DATA, UNALLOCATED, ZERO, BlockDriver, ChildRef, Extent, Kind
from imgfs.errors import CorruptImage, ImgfsError, InvalidImage, ReadOnly, Unsupported
from imgfs.node import OpenContext
from imgfs.options import Bool, Opt, Schema, Size, Str

from . import create as create_mod
from .cluster import (
    BITMAP_ALL_ALLOCATED,
    BITMAP_ALL_ZEROES,
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    QCOW_OFLAG_COMPRESSED,
    QCOW_OFLAG_COPIED,
    QCOW_OFLAG_ZERO,
    ClusterType,
    Geometry,
    L2Cache,
    L2Table,
    bitmap_range,
    compressed_range,
    decode_entry,
    l2_run,
    pack_table,
    unpack_table,
)
from .header import (
    AUTOCLEAR_DATA_FILE_RAW,
    COMPAT_LAZY_REFCOUNTS,
    COMPRESSION_NAMES,
    COMPRESSION_ZSTD,
    HEADER_V2_LENGTH,
    INCOMPAT_CORRUPT,
    INCOMPAT_DATA_FILE,
    INCOMPAT_DIRTY,
    INCOMPAT_EXTL2,
    MAGIC,
    OFFSET_AUTOCLEAR,
    OFFSET_INCOMPAT,
    OFFSET_L1,
    OFFSET_REFCOUNT_TABLE,
    OFFSET_SIZE,
    QCOW_MAX_SNAPSHOTS_SIZE,
    Header,
    parse_image_header,
)
from .refcount import RefcountGeometry, RefcountStore
from .snapshot import Snapshot, parse_snapshot_table

#: bytes read before the cluster size is known (the fixed header fits)
FIRST_READ = 4096
#: bytes of metadata cache per kind, as QEMU's default l2-cache-size
DEFAULT_L2_CACHE = 4 * 1024 * 1024
#: most clusters one allocating write takes at once
MAX_ALLOCATION_CLUSTERS = 512


class Qcow2Driver(BlockDriver):
    name = "qcow2"
    kind = Kind.FORMAT
    supports_backing = True
    description = "QEMU copy-on-write v2/v3 (read, write, create)"
    open_opts = Schema(
        Opt("l2-cache-size", Size, help="bytes of L2 tables kept in memory"),
        Opt("lazy-refcounts", Bool, help="accepted for QEMU compatibility"),
        Opt("data-file", Str, help="external data file (overrides the image's name)"),
        Opt("snapshot", Str, help="open this internal snapshot (ID or name), read-only"),
        passthrough=("encrypt.", "cache-size", "refcount-cache-size", "overlap-check",
                     "pass-discard-", "cache-clean-interval", "discard-no-unref"),
    )
    create_opts = create_mod.CREATE_OPTS

    # -- probing and opening ----------------------------------------------------------

    @staticmethod
    def probe(head: bytes, filename: str) -> int:
        if len(head) >= 8 and head[:4] == MAGIC and \
                struct.unpack(">I", head[4:8])[0] in (2, 3):
            return 100
        return 0

    async def open(self, options: dict[str, Any], ctx: OpenContext) -> None:
        file = self.children["file"]
        head = await file.read(0, min(file.size, FIRST_READ))
        header = Header.unpack(head)
        if 9 <= header.cluster_bits <= 21 and file.size > len(head):
            head = await file.read(0, min(file.size, 1 << header.cluster_bits))
        self.image = parse_image_header(head, file.size)
        self.header = self.image.header
        self._setup_state(options)
        self.l1 = unpack_table(await file.read(self.header.l1_table_offset,
                                               self.header.l1_size * 8))
        self.snapshots = await self._read_snapshots()
        await self._open_refcounts()
        if options["snapshot"]:
            await self._select_snapshot(options["snapshot"])
        elif not self.node.read_only:
            await self._open_for_writing()

    def _setup_state(self, options: dict[str, Any]) -> None:
        header = self.header
        incompat = header.incompatible_features
        self.version = header.version
        self.geometry = Geometry(header.cluster_bits, bool(incompat & INCOMPAT_EXTL2))
        self.cluster_size = header.cluster_size
        self.size = header.size
        self.zero_flag = header.version >= 3 and not self.geometry.extended_l2
        self.data_file_name = options["data-file"] or self.image.data_file
        self.has_data_file = bool(incompat & INCOMPAT_DATA_FILE)
        if self.has_data_file and not self.data_file_name:
            raise InvalidImage("the image uses an external data file but names none "
                               "(give the data-file option)")
        self.data_child = "data-file" if self.has_data_file else "file"
        self.data_file_raw = bool(header.autoclear_features & AUTOCLEAR_DATA_FILE_RAW)
        cache_bytes = options["l2-cache-size"] or DEFAULT_L2_CACHE
        self.l2_cache = L2Cache(cache_bytes // self.cluster_size)
        self.lock = trio.Lock()
        self.l1_dirty: set[int] = set()
        self.prepared = False
        self.inflight = 0
        self.compressed_cache: tuple[int, bytes] | None = None
        self.can_resize = True
        self.snapshot_view = False

    async def _read_snapshots(self) -> list[Snapshot]:
        header = self.header
        if not header.nb_snapshots:
            return []
        file = self.children["file"]
        length = min(file.size - header.snapshots_offset, QCOW_MAX_SNAPSHOTS_SIZE)
        table = await file.read(header.snapshots_offset, max(length, 0))
        return parse_snapshot_table(table, header.nb_snapshots, self.cluster_size, file.size)

    async def _open_refcounts(self) -> None:
        header = self.header
        file = self.children["file"]
        table = unpack_table(await file.read(header.refcount_table_offset,
                                             header.refcount_table_clusters
                                             << header.cluster_bits))
        geometry = RefcountGeometry(header.cluster_bits, header.refcount_order)
        self.refcounts = RefcountStore(file, geometry, table, header.refcount_table_offset,
                                       header.refcount_table_clusters, self._move_reftable)

    async def _select_snapshot(self, wanted: str) -> None:
        for snap in self.snapshots:
            if wanted in (snap.id, snap.name):
                break
        else:
            raise InvalidImage(f"no snapshot with ID or name '{wanted}'")
        if not self.node.read_only:
            raise ReadOnly("a snapshot can only be opened read-only")
        self.snapshot_view = True
        self.can_resize = False
        self.size = snap.disk_size if snap.disk_size is not None else self.size
        if snap.l1_size < self.geometry.l1_entries_for(self.size):
            raise InvalidImage(f"snapshot '{wanted}': l1_size {snap.l1_size} too small "
                               f"for its {self.size}-byte disk")
        self.l1 = unpack_table(await self.children["file"].read(
            snap.l1_table_offset, snap.l1_size * 8))

    async def _open_for_writing(self) -> None:
        incompat = self.header.incompatible_features
        if incompat & INCOMPAT_CORRUPT:
            raise CorruptImage("the image is marked corrupt (run 'qemu-img check -r all'); "
                               "it can only be opened read-only")
        if incompat & INCOMPAT_DIRTY and getattr(self.children["file"].driver,
                                                 "writable", True):
            from .repair import rebuild_refcounts
            await rebuild_refcounts(self)
            await self._set_incompat(self.header.incompatible_features & ~INCOMPAT_DIRTY)

    def child_refs(self) -> dict[str, ChildRef]:
        refs: dict[str, ChildRef] = {}
        if self.image.backing_file:
            refs["backing"] = ChildRef(self.image.backing_file, self.image.backing_format)
        if self.has_data_file:
            refs["data-file"] = ChildRef(self.data_file_name or "", "raw",
                                         read_only=self.node.read_only)
        return refs

    # -- header updates -------------------------------------------------------------------

    async def _write_header_bytes(self, offset: int, data: bytes) -> None:
        file = self.children["file"]
        await file.write(offset, data)
        await file.flush()

    async def _set_incompat(self, bits: int) -> None:
        if self.version < 3:
            return
        await self._write_header_bytes(OFFSET_INCOMPAT, struct.pack(">Q", bits))
        self.header = self.header._replace(incompatible_features=bits)

    async def _move_reftable(self, offset: int, clusters: int) -> None:
        await self._write_header_bytes(OFFSET_REFCOUNT_TABLE,
                                       struct.pack(">QI", offset, clusters))
        self.header = self.header._replace(refcount_table_offset=offset,
                                           refcount_table_clusters=clusters)

    async def _prepare_for_write(self) -> None:
        """First modification: drop the auto-clear bits we do not maintain
        (spec: autoclear_features) and, with lazy refcounts, mark dirty."""
        if self.header.incompatible_features & INCOMPAT_CORRUPT:
            raise CorruptImage("the image is marked corrupt; refusing to write")
        if self.prepared:
            return
        if self.snapshot_view:
            raise ReadOnly("internal snapshots are opened read-only")
        header = self.header
        keep = header.autoclear_features & AUTOCLEAR_DATA_FILE_RAW
        if self.version >= 3 and header.autoclear_features != keep:
            await self._write_header_bytes(OFFSET_AUTOCLEAR, struct.pack(">Q", keep))
            self.header = header._replace(autoclear_features=keep)
        if self.version >= 3 and header.compatible_features & COMPAT_LAZY_REFCOUNTS:
            await self._set_incompat(self.header.incompatible_features | INCOMPAT_DIRTY)
        self.prepared = True

    async def _mark_corrupt(self, message: str) -> CorruptImage:
        """Set the corrupt bit (spec: incompatible bit 1) and return the error."""
        if not self.node.read_only and self.version >= 3 and not self.snapshot_view:
            try:
                await self._set_incompat(self.header.incompatible_features | INCOMPAT_CORRUPT)
            except ImgfsError:
                pass
        return CorruptImage(message)

    # -- metadata lookups -------------------------------------------------------------------

    async def _l2_table(self, l2_offset: int) -> L2Table:
        table = self.l2_cache.get(l2_offset)
        if table is not None:
            return table
        file = self.children["file"]
        if l2_offset & (self.cluster_size - 1) or l2_offset + self.cluster_size > file.size:
            raise await self._mark_corrupt(f"L2 table offset {l2_offset:#x} is unaligned or "
                                           f"beyond the end of the {file.size}-byte file")
        raw = await file.read(l2_offset, self.cluster_size)
        return self.l2_cache.insert(L2Table(l2_offset, unpack_table(raw)))

    async def block_status(self, offset: int, length: int) -> Extent:
        geometry = self.geometry
        l1_index = geometry.l1_index(offset)
        span_end = (l1_index + 1) << (geometry.cluster_bits + geometry.l2_bits)
        length = min(length, span_end - offset)
        if l1_index >= len(self.l1):
            return Extent(length, UNALLOCATED)
        l2_offset = self.l1[l1_index] & L1E_OFFSET_MASK
        if not l2_offset:
            return Extent(length, UNALLOCATED)
        table = await self._l2_table(l2_offset)
        run = l2_run(table.entries, geometry, offset, length, zero_flag=self.zero_flag)
        if run.type is ClusterType.NORMAL:
            # Past the end of its file a cluster reads as zeros, as in QEMU.
            available = self.children[self.data_child].size - run.host_offset
            if available <= 0:
                return Extent(run.length, ZERO)
            return Extent(min(run.length, available), DATA, run.host_offset,
                          self.data_child)
        if run.type is ClusterType.ZERO:
            return Extent(run.length, ZERO)
        if run.type is ClusterType.COMPRESSED:
            return Extent(run.length, DATA)
        return Extent(run.length, UNALLOCATED)

    async def _entry_at(self, offset: int) -> int:
        """The (first word of the) L2 entry of guest `offset`; 0 if none."""
        l1_index = self.geometry.l1_index(offset)
        if l1_index >= len(self.l1) or not self.l1[l1_index] & L1E_OFFSET_MASK:
            return 0
        table = await self._l2_table(self.l1[l1_index] & L1E_OFFSET_MASK)
        words = 2 if self.geometry.extended_l2 else 1
        return table.entries[self.geometry.l2_index(offset) * words]

    async def read_data(self, offset: int, length: int, extent: Extent) -> bytes:
        entry = await self._entry_at(offset)
        if not entry & QCOW_OFLAG_COMPRESSED:
            raise CorruptImage(f"no compressed cluster at guest offset {offset}")
        cluster = await self._decompress(entry)
        start = self.geometry.offset_in_cluster(offset)
        return cluster[start:start + length]

    async def _decompress(self, entry: int) -> bytes:
        cached = self.compressed_cache
        if cached is not None and cached[0] == entry:
            return cached[1]
        host_offset, most = compressed_range(entry, self.geometry.cluster_bits)
        file = self.children["file"]
        if host_offset >= file.size:
            raise await self._mark_corrupt(f"compressed cluster at {host_offset:#x} lies "
                                           f"beyond the end of the {file.size}-byte file")
        raw = await file.read(host_offset, min(most, file.size - host_offset))
        cluster = decompress_cluster(raw, self.cluster_size, self.header.compression_type)
        self.compressed_cache = (entry, cluster)
        return cluster

    # -- writes ---------------------------------------------------------------------------

    async def write(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        done = 0
        while done < len(data):
            done += await self._write_step(offset + done, view[done:])

    async def _write_step(self, offset: int, data: memoryview) -> int:
        """Write a prefix of `data` at `offset`; return how many bytes."""
        async with self.lock:
            await self._prepare_for_write()
            table = await self._l2_for_write(self.geometry.l1_index(offset))
            length = min(len(data), self._table_end(offset) - offset)
            host = self._in_place_run(table, offset, length)
            if host is None:
                return await self._allocating_write(table, offset, data[:length])
            host_offset, length = host
            if not self.has_data_file and self._overlaps_metadata(host_offset, length):
                raise await self._mark_corrupt(
                    f"data cluster at host offset {host_offset:#x} overlaps the header, "
                    "L1 table or refcount table")
            self.inflight += 1
        try:
            await self.children[self.data_child].write(host_offset, bytes(data[:length]))
        finally:
            self.inflight -= 1
        return length

    def _overlaps_metadata(self, host: int, length: int) -> bool:
        """QEMU's cheapest overlap checks: a guest write must never land on
        the header, the active L1 table or the refcount table."""
        header = self.header
        regions = ((0, self.cluster_size),
                   (header.l1_table_offset, header.l1_size * 8),
                   (header.refcount_table_offset,
                    header.refcount_table_clusters << header.cluster_bits))
        return any(host < start + size and start < host + length
                   for start, size in regions if size)

    def _table_end(self, offset: int) -> int:
        geometry = self.geometry
        return (geometry.l1_index(offset) + 1) << (geometry.cluster_bits + geometry.l2_bits)

    def _in_place_run(self, table: L2Table, offset: int, length: int
                      ) -> tuple[int, int] | None:
        """(host offset, length) of the part of the range that is allocated
        with refcount 1 and can be overwritten in place, or None."""
        geometry = self.geometry
        run = l2_run(table.entries, geometry, offset, length, zero_flag=self.zero_flag)
        if run.type is not ClusterType.NORMAL:
            return None
        words = 2 if geometry.extended_l2 else 1
        first = geometry.l2_index(offset)
        last = geometry.l2_index(offset + run.length - 1)
        for index in range(first, last + 1):
            if not table.entries[index * words] & QCOW_OFLAG_COPIED:
                if index == first:
                    return None
                return run.host_offset, (index << geometry.cluster_bits) - \
                    (offset & ((geometry.l2_entries << geometry.cluster_bits) - 1))
        return run.host_offset, run.length

    async def _l2_for_write(self, l1_index: int) -> L2Table:
        """The L2 table for `l1_index`, allocated if missing (lock held)."""
        if l1_index >= len(self.l1):
            raise CorruptImage(f"L1 index {l1_index} beyond the L1 table")
        entry = self.l1[l1_index]
        l2_offset = entry & L1E_OFFSET_MASK
        if l2_offset:
            if not entry & QCOW_OFLAG_COPIED:
                if await self.refcounts.get(l2_offset >> self.geometry.cluster_bits) > 1:
                    return await self._copy_shared_l2(l1_index, l2_offset)
                self.l1[l1_index] = entry | QCOW_OFLAG_COPIED
                self.l1_dirty.add(l1_index)
            return await self._l2_table(l2_offset)
        if self.l2_cache.dirty_count() >= self.l2_cache.capacity:
            await self._write_back()
        l2_offset = await self.refcounts.allocate(1)
        table = L2Table(l2_offset, [0] * (self.cluster_size // 8))
        self.l2_cache.mark_dirty(table)
        self.l1[l1_index] = l2_offset | QCOW_OFLAG_COPIED
        self.l1_dirty.add(l1_index)
        return table

    async def _copy_shared_l2(self, l1_index: int, l2_offset: int) -> L2Table:
        """Copy-on-write of an L2 table shared with a snapshot (spec:
        "Snapshots").  A data cluster's refcount counts the L1 tables that
        reach it, which the copy does not change; its entries keep no
        COPIED flag (those clusters are still shared).  The old table loses
        the active L1's reference once the new L1 entry is on disk."""
        old = await self._l2_table(l2_offset)
        entries = list(old.entries)
        words = 2 if self.geometry.extended_l2 else 1
        for index in range(0, len(entries), words):
            entries[index] &= ~QCOW_OFLAG_COPIED
        new_offset = await self.refcounts.allocate(1)
        table = L2Table(new_offset, entries)
        self.l2_cache.mark_dirty(table)
        self.l1[l1_index] = new_offset | QCOW_OFLAG_COPIED
        self.l1_dirty.add(l1_index)
        self.refcounts.queue_free(l2_offset)
        return table

    def _clusters_of(self, entry: int) -> list[tuple[int, int]]:
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

    async def _old_contents(self, start: int, end: int) -> bytes:
        """What guest bytes start..end read as now (zeros past the disk end)."""
        if end <= start:
            return b""
        stop = min(end, self.size)
        data = await self.node.read_via_status(start, stop - start) if stop > start else b""
        return data + bytes(end - start - len(data))

    async def _allocating_write(self, table: L2Table, offset: int, data: memoryview) -> int:
        """Copy-on-write of a run of clusters that cannot be written in place."""
        if self.l2_cache.dirty_count() > self.l2_cache.capacity:
            await self._write_back()
        if self.geometry.extended_l2:
            return await self._allocating_write_extended(table, offset, data)
        geometry = self.geometry
        index = geometry.l2_index(offset)
        first = decode_entry(table.entries[index], zero_flag=self.zero_flag)
        reuse = first.type is ClusterType.ZERO and first.host_offset and \
            table.entries[index] & QCOW_OFLAG_COPIED
        count = 1 if reuse else self._clusters_to_allocate(table, offset, len(data))
        region_start = geometry.cluster_start(offset)
        region_end = region_start + (count << geometry.cluster_bits)
        written = min(len(data), region_end - offset)
        host = first.host_offset if reuse else await self._new_clusters(region_start, count)
        buffer = await self._old_contents(region_start, offset) + bytes(data[:written]) + \
            await self._old_contents(offset + written, region_end)
        await self._write_data(host, buffer)
        for number in range(count):
            old = table.entries[index + number]
            table.entries[index + number] = (host + (number << geometry.cluster_bits)) \
                | QCOW_OFLAG_COPIED
            if not reuse:
                self._release(old)
        self.l2_cache.mark_dirty(table)
        return written

    def _clusters_to_allocate(self, table: L2Table, offset: int, length: int) -> int:
        """How many clusters from `offset` need a fresh allocation (at least 1)."""
        geometry = self.geometry
        index = geometry.l2_index(offset)
        wanted = -(-(geometry.offset_in_cluster(offset) + length) >> geometry.cluster_bits)
        wanted = min(wanted, geometry.l2_entries - index, MAX_ALLOCATION_CLUSTERS)
        count = 1
        while count < wanted:
            entry = table.entries[index + count]
            mapping = decode_entry(entry, zero_flag=self.zero_flag)
            if mapping.type is ClusterType.NORMAL and entry & QCOW_OFLAG_COPIED:
                break
            if mapping.type is ClusterType.ZERO and mapping.host_offset:
                break
            count += 1
        return count

    async def _new_clusters(self, guest_start: int, count: int) -> int:
        """Host offset of `count` fresh clusters for guest `guest_start`."""
        if self.has_data_file:
            return guest_start          # external data files map guest = host
        return await self.refcounts.allocate(count)

    async def _write_data(self, host: int, data: bytes) -> None:
        child = self.children[self.data_child]
        end = host + len(data)
        if end > child.size:
            await child.truncate(end)
        await child.write(host, data)

    def _release(self, entry: int) -> None:
        """Queue the host clusters an overwritten L2 entry held."""
        for host, count in self._clusters_of(entry):
            self.refcounts.queue_free(host, count)

    async def _allocating_write_extended(self, table: L2Table, offset: int,
                                         data: memoryview) -> int:
        """Extended L2: write the touched subclusters of one cluster."""
        geometry = self.geometry
        index = geometry.l2_index(offset)
        entry, bitmap = table.entries[2 * index], table.entries[2 * index + 1]
        cluster_start = geometry.cluster_start(offset)
        cluster_end = cluster_start + self.cluster_size
        written = min(len(data), cluster_end - offset)
        compressed = bool(entry & QCOW_OFLAG_COMPRESSED)
        host = entry & L2E_OFFSET_MASK
        has_host = not compressed and bool(host or self.has_data_file and
                                           entry & QCOW_OFLAG_COPIED)
        partial = not compressed and (not has_host or bool(entry & QCOW_OFLAG_COPIED))
        if partial:
            sub = geometry.subcluster_size
            region_start = offset & ~(sub - 1)
            region_end = min(-(-(offset + written) // sub) * sub, cluster_end)
        else:
            region_start, region_end = cluster_start, cluster_end
        if not (partial and has_host):
            host = await self._new_clusters(cluster_start, 1)
        buffer = await self._old_contents(region_start, offset) + bytes(data[:written]) + \
            await self._old_contents(offset + written, region_end)
        await self._write_data(host + region_start - cluster_start, buffer)
        first_sub = (region_start - cluster_start) >> geometry.subcluster_bits
        subs = (region_end - region_start) >> geometry.subcluster_bits
        allocated = bitmap_range(first_sub, subs)
        if partial:
            bitmap = (bitmap | allocated) & ~(allocated << 32)
        else:
            bitmap = BITMAP_ALL_ALLOCATED
            self._release(entry)
        table.entries[2 * index] = host | QCOW_OFLAG_COPIED
        table.entries[2 * index + 1] = bitmap
        self.l2_cache.mark_dirty(table)
        return written

    # -- zeroes and discard ----------------------------------------------------------------

    async def write_zeroes(self, offset: int, length: int, *, may_unmap: bool = False) -> None:
        if self.data_file_raw or not (self.zero_flag or self.geometry.extended_l2):
            await super().write_zeroes(offset, length, may_unmap=may_unmap)
            return
        await self._clear_range(offset, length, zero=True, unmap=may_unmap)

    async def discard(self, offset: int, length: int) -> None:
        if self.data_file_raw:
            return
        await self._clear_range(offset, length, zero=self.version >= 3, unmap=True)

    async def _clear_range(self, offset: int, length: int, *, zero: bool, unmap: bool) -> None:
        """Make whole units (clusters, or subclusters with extended L2) read
        as zeros or unallocated; partial units get zeros written (or, for a
        discard, are left alone)."""
        unit = self.geometry.subcluster_size
        end = offset + length
        start = -(-offset // unit) * unit
        stop = end // unit * unit if end < self.size else end
        if zero:
            if start > offset:
                await self.write(offset, bytes(min(start, end) - offset))
            if stop < end and stop >= start:
                await self.write(stop, bytes(end - stop))
        position = start
        while position < stop:
            step = min(stop, self._table_end(position)) - position
            async with self.lock:
                await self._prepare_for_write()
                l1_index = self.geometry.l1_index(position)
                unmapped = l1_index < len(self.l1) and not self.l1[l1_index] & L1E_OFFSET_MASK
                if not (unmapped and (not zero or self.node.backing is None)):
                    table = await self._l2_for_write(l1_index)
                    self._clear_in_table(table, position, step, zero=zero, unmap=unmap)
            position += step

    def _clear_in_table(self, table: L2Table, offset: int, length: int, *,
                        zero: bool, unmap: bool) -> None:
        geometry = self.geometry
        position, end = offset, offset + length
        while position < end:
            index = geometry.l2_index(position)
            cluster_start = geometry.cluster_start(position)
            step_end = min(end, cluster_start + self.cluster_size)
            if geometry.extended_l2:
                self._clear_subclusters(table, index, position - cluster_start,
                                        step_end - position, zero=zero)
            else:
                self._clear_cluster(table, index, zero=zero, unmap=unmap)
            position = step_end
        self.l2_cache.mark_dirty(table)

    def _clear_cluster(self, table: L2Table, index: int, *, zero: bool, unmap: bool) -> None:
        old = table.entries[index]
        mapping = decode_entry(old, zero_flag=self.zero_flag)
        keep = not unmap and mapping.host_offset and old & QCOW_OFLAG_COPIED \
            and mapping.type is not ClusterType.COMPRESSED
        if keep:
            table.entries[index] = mapping.host_offset | QCOW_OFLAG_COPIED | QCOW_OFLAG_ZERO
            return
        table.entries[index] = QCOW_OFLAG_ZERO if zero else 0
        self._release(old)

    def _clear_subclusters(self, table: L2Table, index: int, start: int, length: int, *,
                           zero: bool) -> None:
        geometry = self.geometry
        entry, bitmap = table.entries[2 * index], table.entries[2 * index + 1]
        if entry & QCOW_OFLAG_COMPRESSED:
            if length < self.cluster_size:
                raise Unsupported("partial zero write to a compressed cluster")
            table.entries[2 * index] = 0
            table.entries[2 * index + 1] = BITMAP_ALL_ZEROES if zero else 0
            self._release(entry)
            return
        bits = bitmap_range(start >> geometry.subcluster_bits,
                            length >> geometry.subcluster_bits)
        bitmap &= ~bits
        bitmap = bitmap | bits << 32 if zero else bitmap & ~(bits << 32)
        table.entries[2 * index + 1] = bitmap

    # -- flush and close -----------------------------------------------------------------

    async def flush(self) -> None:
        async with self.lock:
            await self._write_back()

    async def _write_back(self) -> None:
        """Metadata to disk in crash-safe order (see the module docstring)."""
        file = self.children["file"]
        dirty_tables = self.l2_cache.dirty_tables()
        if await self.refcounts.write_back() and (dirty_tables or self.l1_dirty):
            await file.flush()
        if dirty_tables and self.has_data_file:
            await self.children["data-file"].flush()
        for table in sorted(dirty_tables, key=lambda tab: tab.offset):
            await file.write(table.offset, pack_table(table.entries))
            table.dirty = False
        if self.l1_dirty:
            if dirty_tables:
                await file.flush()
            await self._write_l1()
        if self.refcounts.pending_frees and not self.inflight:
            await file.flush()
            await self.refcounts.apply_frees()
            await self.refcounts.write_back()

    async def _write_l1(self) -> None:
        first, last = min(self.l1_dirty), max(self.l1_dirty)
        raw = pack_table(self.l1[first:last + 1])
        await self.children["file"].write(self.header.l1_table_offset + first * 8, raw)
        self.l1_dirty.clear()

    async def aclose(self) -> None:
        if self.node.read_only or not hasattr(self, "refcounts"):
            return
        with trio.CancelScope(shield=True):
            async with self.lock:
                await self._write_back()
                if self.refcounts.pending_frees:
                    await self._write_back()
                if self.header.incompatible_features & INCOMPAT_DIRTY and self.prepared:
                    await self.children["file"].flush()
                    await self._set_incompat(self.header.incompatible_features
                                             & ~INCOMPAT_DIRTY)

    # -- preallocation (create) ---------------------------------------------------------

    async def preallocate(self, mode: str) -> None:
        """Allocate every L2 table and data cluster of the disk (QEMU's
        preallocation=metadata|falloc|full)."""
        geometry = self.geometry
        total = -(-self.size // self.cluster_size)
        position = 0
        async with self.lock:
            await self._prepare_for_write()
            while position < total:
                table = await self._l2_for_write(position >> geometry.l2_bits)
                index = position & (geometry.l2_entries - 1)
                count = min(geometry.l2_entries - index, total - position)
                host = await self._new_clusters(position << geometry.cluster_bits, count)
                await self._reserve(host, count << geometry.cluster_bits, mode)
                for number in range(count):
                    self._set_preallocated(table, index + number,
                                           host + (number << geometry.cluster_bits), mode)
                self.l2_cache.mark_dirty(table)
                position += count
            await self._write_back()

    def _set_preallocated(self, table: L2Table, index: int, host: int, mode: str) -> None:
        if self.geometry.extended_l2:
            table.entries[2 * index] = host | QCOW_OFLAG_COPIED
            table.entries[2 * index + 1] = 0 if mode == "metadata" else BITMAP_ALL_ALLOCATED
        else:
            table.entries[index] = host | QCOW_OFLAG_COPIED

    async def _reserve(self, host: int, length: int, mode: str) -> None:
        child = self.children[self.data_child]
        if host + length > child.size:
            await child.truncate(host + length)
        if mode == "falloc":
            await child.write_zeroes(host, length)
        elif mode == "full":
            chunk = bytes(min(length, 1 << 20))
            for start in range(host, host + length, len(chunk)):
                await child.write(start, chunk[:min(len(chunk), host + length - start)])

    # -- resize ---------------------------------------------------------------------------

    async def truncate(self, size: int, preallocation: str = "off") -> None:
        if size < self.size:
            raise Unsupported("shrinking qcow2 images is not supported yet")
        async with self.lock:
            await self._prepare_for_write()
            needed = self.geometry.l1_entries_for(size)
            if needed > len(self.l1):
                await self._grow_l1(needed)
            await self._write_header_bytes(OFFSET_SIZE, struct.pack(">Q", size))
            self.header = self.header._replace(size=size)
            self.size = size

    async def _grow_l1(self, entries: int) -> None:
        """Copy the L1 table to a bigger one, then point the header at it."""
        await self._write_back()
        file = self.children["file"]
        clusters = -(-entries * 8 // self.cluster_size)
        new_offset = await self.refcounts.allocate(clusters)
        new_l1 = self.l1 + [0] * (entries - len(self.l1))
        raw = pack_table(new_l1).ljust(clusters * self.cluster_size, b"\0")
        await file.write(new_offset, raw)
        await self.refcounts.write_back()
        await file.flush()
        old_offset, old_entries = self.header.l1_table_offset, len(self.l1)
        await self._write_header_bytes(OFFSET_L1, struct.pack(">IQ", entries, new_offset))
        self.header = self.header._replace(l1_size=entries, l1_table_offset=new_offset)
        self.l1 = new_l1
        if old_entries:
            old_clusters = -(-old_entries * 8 // self.cluster_size)
            await self.refcounts.update(old_offset >> self.geometry.cluster_bits,
                                        old_clusters, -1)

    # -- information ----------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        header = self.header
        report: dict[str, Any] = {"cluster-size": self.cluster_size}
        if header.incompatible_features & INCOMPAT_DIRTY:
            report["dirty-flag"] = True
        if self.snapshots:
            report["snapshots"] = [snap.info() for snap in self.snapshots]
        report["compat"] = "0.10" if header.version < 3 else "1.1"
        report["compression-type"] = COMPRESSION_NAMES.get(header.compression_type, "?")
        if header.version >= 3:
            report["lazy-refcounts"] = bool(header.compatible_features
                                            & COMPAT_LAZY_REFCOUNTS)
        report["refcount-bits"] = 1 << header.refcount_order
        if header.version >= 3:
            report["corrupt"] = bool(header.incompatible_features & INCOMPAT_CORRUPT)
            report["extended-l2"] = self.geometry.extended_l2
        if self.has_data_file:
            report["data-file"] = self.data_file_name
            report["data-file-raw"] = self.data_file_raw
        return report

    @classmethod
    async def create(cls, target: Any, size: int, options: dict[str, Any],
                     ctx: OpenContext) -> None:
        await create_mod.create_image(target, size, options, ctx)


def decompress_cluster(raw: bytes, cluster_size: int, compression_type: int) -> bytes:
    """One cluster from its compressed bytes (spec: "Compressed Clusters
    Descriptor"; zlib clusters are raw deflate streams)."""
    if compression_type == COMPRESSION_ZSTD:
        return _decompress_zstd(raw, cluster_size)
    try:
        cluster = zlib.decompressobj(-12).decompress(raw, cluster_size)
    except zlib.error as exc:
        raise CorruptImage(f"compressed cluster does not decompress: {exc}") from None
    if len(cluster) != cluster_size:
        raise CorruptImage(f"compressed cluster decompresses to {len(cluster)} bytes "
                           f"(expected {cluster_size})")
    return cluster


def _decompress_zstd(raw: bytes, cluster_size: int) -> bytes:
    try:
        import zstandard
    except ImportError:
        raise Unsupported("zstd-compressed qcow2 clusters need the Python 'zstandard' "
                          "module, which is not installed") from None
    try:
        reader = zstandard.ZstdDecompressor().decompressobj()
        cluster = reader.decompress(raw)[:cluster_size]
    except zstandard.ZstdError as exc:
        raise CorruptImage(f"compressed cluster does not decompress: {exc}") from None
    if len(cluster) != cluster_size:
        raise CorruptImage(f"compressed cluster decompresses to {len(cluster)} bytes "
                           f"(expected {cluster_size})")
    return cluster


__all__ = ["Qcow2Driver", "HEADER_V2_LENGTH"]
