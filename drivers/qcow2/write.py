"""The qcow2 write path: allocation, copy-on-write, zero clusters, discard,
preallocation, growth and compressed writes.

Spec: qemu/qemu docs/interop/qcow2.txt ("Cluster mapping", "Extended L2
Entries", "Snapshots", "Compressed Clusters Descriptor").  The L2 entry
decides: a cluster allocated with refcount 1 (the COPIED flag) is written
in place without holding the metadata lock; anything else (unallocated,
zero, compressed, shared with a snapshot) takes the lock and gets a fresh
cluster filled with the old contents around the new bytes (copy-on-write
from the backing node through the core).  Clusters that lose a reference
are queued and released by the driver's write-back once the tables that no
longer point at them are on disk.

`WriteMixin` is one half of `Qcow2Driver`; the state it uses is set up by
the driver's `open`.
"""
from __future__ import annotations

import array
from typing import TYPE_CHECKING, cast

from imgfs.errors import CorruptImage, Unsupported, UsageError
from imgfs.tablecache import Table

from .cluster import (
    BITMAP_ALL_ALLOCATED,
    BITMAP_ALL_ZEROES,
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    QCOW_OFLAG_COMPRESSED,
    QCOW_OFLAG_COPIED,
    QCOW_OFLAG_ZERO,
    ClusterType,
    bitmap_range,
    compressed_descriptor,
    decode_entry,
    empty_l2,
    l2_run,
)
from .compress import InflatedClusters, compress_cluster
from .header import INCOMPAT_CORRUPT

if TYPE_CHECKING:
    from imgfs.node import Node

    from .bitmaps import Directory
    from .crypt import AesCipher, ClusterCipher
    from .metadata import Qcow2Metadata

#: most bytes one allocating write takes at once (it builds them in memory)
MAX_ALLOCATION_BYTES = 32 * 1024 * 1024


def as_bytes(data: bytes | memoryview) -> bytes:
    """A guest buffer passed on without a copy: every layer below writes
    any bytes-like object (os.pwrite, socket sends, bytes joins)."""
    return cast(bytes, data)


class WriteMixin:
    """The write half of `Qcow2Driver`."""

    if TYPE_CHECKING:        # what the driver provides
        meta: Qcow2Metadata
        node: Node
        children: dict[str, Node]
        size: int
        inflated: InflatedClusters
        compressed_cursor: int
        crypto: ClusterCipher | AesCipher | None
        dirty_bitmaps: Directory | None

    # -- writes ---------------------------------------------------------------------------

    async def write(self, offset: int, data: bytes) -> None:
        if self.dirty_bitmaps is not None:
            self.dirty_bitmaps.mark(offset, len(data))
        view = memoryview(data)
        done = 0
        while done < len(data):
            done += await self._write_step(offset + done, view[done:])

    async def _write_step(self, offset: int, data: memoryview) -> int:
        """Write a prefix of `data` at `offset`; return how many bytes."""
        meta = self.meta
        host = self._cached_in_place_run(offset, len(data))
        if host is None:
            async with meta.lock:
                await meta.prepare_for_write()
                table = await self._l2_for_write(meta.geometry.l1_index(offset))
                await meta.check_host_alignment(table, offset)
                length = min(len(data), self._table_end(offset) - offset)
                host = self._in_place_run(table, offset, length)
                if host is None:
                    return await self._allocating_write(table, offset, data[:length])
                if not meta.has_data_file and meta.overlaps_metadata(*host):
                    raise await meta.mark_corrupt(
                        f"data cluster at host offset {host[0]:#x} overlaps the header, "
                        "L1 table, refcount table or LUKS header")
        host_offset, length = host
        meta.inflight += 1
        try:
            payload: bytes | memoryview = data[:length]
            if self.crypto is not None:
                payload = await self.crypto.encrypt(host_offset, bytes(payload))
            await self.children[meta.data_child].write(host_offset, as_bytes(payload))
        finally:
            meta.inflight -= 1
        return length

    def _cached_in_place_run(self, offset: int, length: int) -> tuple[int, int] | None:
        """What _write_step decides under the lock, decided without it for
        the common overwrite of a cluster whose L2 table is cached; None
        sends anything else (and anything doubtful, which the locked path
        then reports) to the locked path.  Safe while the lock is free: no
        metadata update is half done, and this runs without an await, so
        none can start.  Taking the lock showed in a 4 KiB overwrite's
        profile (bench/README.md)."""
        meta = self.meta
        if meta.lock.locked() or not meta.prepared or \
                meta.header.incompatible_features & INCOMPAT_CORRUPT:
            return None
        geometry = meta.geometry
        l1_index = geometry.l1_index(offset)
        if l1_index >= len(meta.l1) or not meta.l1[l1_index] & QCOW_OFLAG_COPIED:
            return None
        table = meta.l2_cache.get(meta.l1[l1_index] & L1E_OFFSET_MASK)
        if table is None or meta.misaligned_host(table, offset) is not None:
            return None
        host = self._in_place_run(table, offset, min(length, self._table_end(offset) - offset))
        if host is None or (not meta.has_data_file and meta.overlaps_metadata(*host)):
            return None
        return host

    def _table_end(self, offset: int) -> int:
        geometry = self.meta.geometry
        return (geometry.l1_index(offset) + 1) << (geometry.cluster_bits + geometry.l2_bits)

    def _in_place_run(self, table: Table, offset: int, length: int
                      ) -> tuple[int, int] | None:
        """(host offset, length) of the part of the range that is allocated
        with refcount 1 and can be overwritten in place, or None."""
        meta = self.meta
        geometry = meta.geometry
        in_cluster = offset & (meta.cluster_size - 1)
        if in_cluster + length <= meta.cluster_size and not geometry.extended_l2:
            # the common small request: one entry decides
            entry = table.entries[(offset >> geometry.cluster_bits) & (geometry.l2_entries - 1)]
            unusable = QCOW_OFLAG_COMPRESSED | (QCOW_OFLAG_ZERO if meta.zero_flag else 0)
            host = entry & L2E_OFFSET_MASK
            if entry & QCOW_OFLAG_COPIED and not entry & unusable and \
                    (host or meta.has_data_file):
                return host + in_cluster, length
            return None
        if not geometry.extended_l2 and not table.entries[geometry.l2_index(offset)]:
            return None             # unallocated: the usual case of a new image
        run = l2_run(table.entries, geometry, offset, length, zero_flag=meta.zero_flag)
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

    async def _l2_for_write(self, l1_index: int) -> Table:
        """The L2 table for `l1_index`, allocated if missing (lock held)."""
        meta = self.meta
        if l1_index >= len(meta.l1):
            raise CorruptImage(f"L1 index {l1_index} beyond the L1 table")
        entry = meta.l1[l1_index]
        l2_offset = entry & L1E_OFFSET_MASK
        if l2_offset:
            if not entry & QCOW_OFLAG_COPIED:
                if await meta.refcounts.get(l2_offset >> meta.geometry.cluster_bits) > 1:
                    return await self._copy_shared_l2(l1_index, l2_offset)
                meta.l1[l1_index] = entry | QCOW_OFLAG_COPIED
                meta.l1_dirty.add(l1_index)
            return await meta.l2_table(l2_offset)
        if len(meta.l2_cache.dirty_tables()) >= meta.l2_cache.capacity:
            await meta.write_back()
        l2_offset = await meta.refcounts.allocate(1)
        table = Table(l2_offset, empty_l2(meta.cluster_size // 8))
        meta.l2_cache.changed(table, dirty=True)
        meta.l1[l1_index] = l2_offset | QCOW_OFLAG_COPIED
        meta.l1_dirty.add(l1_index)
        return table

    async def _copy_shared_l2(self, l1_index: int, l2_offset: int) -> Table:
        """Copy-on-write of an L2 table shared with a snapshot (spec:
        "Snapshots").  A data cluster's refcount counts the L1 tables that
        reach it, which the copy does not change; its entries keep no
        COPIED flag (those clusters are still shared).  The old table loses
        the active L1's reference once the new L1 entry is on disk."""
        meta = self.meta
        old = await meta.l2_table(l2_offset)
        entries = array.array("Q", old.entries)
        words = 2 if meta.geometry.extended_l2 else 1
        for index in range(0, len(entries), words):
            entries[index] &= ~QCOW_OFLAG_COPIED
        new_offset = await meta.refcounts.allocate(1)
        table = Table(new_offset, entries)
        meta.l2_cache.changed(table, dirty=True)
        meta.l1[l1_index] = new_offset | QCOW_OFLAG_COPIED
        meta.l1_dirty.add(l1_index)
        meta.refcounts.queue_free(l2_offset)
        return table

    async def _old_contents(self, start: int, end: int) -> bytes:
        """What guest bytes start..end read as now (zeros past the disk end)."""
        if end <= start:
            return b""
        stop = min(end, self.size)
        data = await self.node.read_via_status(start, stop - start) if stop > start else b""
        return data + bytes(end - start - len(data))

    async def _with_old_contents(self, start: int, offset: int, data: memoryview,
                                 end: int) -> bytes | memoryview:
        """`data` (at `offset`) padded to start..end with what is there now;
        `data` itself when it covers the whole region: a 1 MiB copy per
        request was a measurable share of a sequential write."""
        head = await self._old_contents(start, offset)
        tail = await self._old_contents(offset + len(data), end)
        if not head and not tail:
            return data
        return b"".join((head, data, tail))

    async def _allocating_write(self, table: Table, offset: int, data: memoryview) -> int:
        """Copy-on-write of a run of clusters that cannot be written in place."""
        meta = self.meta
        if len(meta.l2_cache.dirty_tables()) > meta.l2_cache.capacity:
            await meta.write_back()
        if meta.geometry.extended_l2:
            return await self._allocating_write_extended(table, offset, data)
        geometry = meta.geometry
        index = geometry.l2_index(offset)
        first = decode_entry(table.entries[index], zero_flag=meta.zero_flag)
        reuse = first.type is ClusterType.ZERO and first.host_offset and \
            table.entries[index] & QCOW_OFLAG_COPIED
        count = 1 if reuse else self._clusters_to_allocate(table, offset, len(data))
        region_start = geometry.cluster_start(offset)
        region_end = region_start + (count << geometry.cluster_bits)
        written = min(len(data), region_end - offset)
        host = first.host_offset if reuse else await self._new_clusters(region_start, count)
        await self._write_data(host, await self._with_old_contents(
            region_start, offset, data[:written], region_end))
        for number in range(count):
            old = table.entries[index + number]
            table.entries[index + number] = (host + (number << geometry.cluster_bits)) \
                | QCOW_OFLAG_COPIED
            if old and not reuse:
                meta.release(old)
        meta.l2_cache.changed(table, dirty=True)
        return written

    def _clusters_to_allocate(self, table: Table, offset: int, length: int) -> int:
        """How many clusters from `offset` need a fresh allocation (at least 1)."""
        geometry = self.meta.geometry
        index = geometry.l2_index(offset)
        wanted = -(-(geometry.offset_in_cluster(offset) + length) >> geometry.cluster_bits)
        wanted = min(wanted, geometry.l2_entries - index,
                     max(1, MAX_ALLOCATION_BYTES >> geometry.cluster_bits))
        if not any(table.entries[index:index + wanted]):
            return wanted           # all unallocated (a new image)
        count = 1
        while count < wanted:
            entry = table.entries[index + count]
            mapping = decode_entry(entry, zero_flag=self.meta.zero_flag)
            if mapping.type is ClusterType.NORMAL and entry & QCOW_OFLAG_COPIED:
                break
            if mapping.type is ClusterType.ZERO and mapping.host_offset:
                break
            count += 1
        return count

    async def _new_clusters(self, guest_start: int, count: int) -> int:
        """Host offset of `count` fresh clusters for guest `guest_start`."""
        if self.meta.has_data_file:
            return guest_start          # external data files map guest = host
        return await self.meta.refcounts.allocate(count)

    async def _write_data(self, host: int, data: bytes | memoryview) -> None:
        if self.crypto is not None:
            data = await self.crypto.encrypt(host, bytes(data))
        child = self.children[self.meta.data_child]
        end = host + len(data)
        if end > child.size:
            await child.truncate(end)
        await child.write(host, as_bytes(data))

    async def _allocating_write_extended(self, table: Table, offset: int,
                                         data: memoryview) -> int:
        """Extended L2: write the touched subclusters of one cluster."""
        meta = self.meta
        geometry = meta.geometry
        index = geometry.l2_index(offset)
        entry, bitmap = table.entries[2 * index], table.entries[2 * index + 1]
        cluster_start = geometry.cluster_start(offset)
        cluster_end = cluster_start + meta.cluster_size
        written = min(len(data), cluster_end - offset)
        compressed = bool(entry & QCOW_OFLAG_COMPRESSED)
        host = entry & L2E_OFFSET_MASK
        has_host = not compressed and bool(host or meta.has_data_file and
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
            meta.release(entry)
        table.entries[2 * index] = host | QCOW_OFLAG_COPIED
        table.entries[2 * index + 1] = bitmap
        meta.l2_cache.changed(table, dirty=True)
        return written

    # -- zeroes and discard ----------------------------------------------------------------

    async def write_zeroes(self, offset: int, length: int, *, may_unmap: bool = False) -> None:
        meta = self.meta
        if self.dirty_bitmaps is not None:
            self.dirty_bitmaps.mark(offset, length)
        if meta.data_file_raw or not (meta.zero_flag or meta.geometry.extended_l2):
            await self._write_zero_bytes(offset, length)
            return
        await self._clear_range(offset, length, zero=True, unmap=may_unmap)

    async def _write_zero_bytes(self, offset: int, length: int) -> None:
        """v2 images and raw data files have no zero flag: store zeros."""
        chunk = bytes(min(length, 1 << 20))
        end = offset + length
        while offset < end:
            step = min(len(chunk), end - offset)
            await self.write(offset, chunk[:step])
            offset += step

    async def discard(self, offset: int, length: int) -> None:
        if self.dirty_bitmaps is not None:
            self.dirty_bitmaps.mark(offset, length)
        if self.meta.data_file_raw:
            return
        await self._clear_range(offset, length, zero=self.meta.version >= 3, unmap=True)

    async def _clear_range(self, offset: int, length: int, *, zero: bool, unmap: bool) -> None:
        """Make whole units (clusters, or subclusters with extended L2) read
        as zeros or unallocated; partial units get zeros written (or, for a
        discard, are left alone)."""
        meta = self.meta
        unit = meta.geometry.subcluster_size
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
            async with meta.lock:
                await meta.prepare_for_write()
                l1_index = meta.geometry.l1_index(position)
                l1 = meta.l1
                unmapped = l1_index < len(l1) and not l1[l1_index] & L1E_OFFSET_MASK
                if not (unmapped and (not zero or self.node.backing is None)):
                    table = await self._l2_for_write(l1_index)
                    self._clear_in_table(table, position, step, zero=zero, unmap=unmap)
            position += step

    def _clear_in_table(self, table: Table, offset: int, length: int, *,
                        zero: bool, unmap: bool) -> None:
        meta = self.meta
        geometry = meta.geometry
        position, end = offset, offset + length
        while position < end:
            index = geometry.l2_index(position)
            cluster_start = geometry.cluster_start(position)
            step_end = min(end, cluster_start + meta.cluster_size)
            if geometry.extended_l2:
                self._clear_subclusters(table, index, position - cluster_start,
                                        step_end - position, zero=zero)
            else:
                self._clear_cluster(table, index, zero=zero, unmap=unmap)
            position = step_end
        meta.l2_cache.changed(table, dirty=True)

    def _clear_cluster(self, table: Table, index: int, *, zero: bool, unmap: bool) -> None:
        old = table.entries[index]
        mapping = decode_entry(old, zero_flag=self.meta.zero_flag)
        keep = not unmap and mapping.host_offset and old & QCOW_OFLAG_COPIED \
            and mapping.type is not ClusterType.COMPRESSED
        if keep:
            table.entries[index] = mapping.host_offset | QCOW_OFLAG_COPIED | QCOW_OFLAG_ZERO
            return
        table.entries[index] = QCOW_OFLAG_ZERO if zero else 0
        self.meta.release(old)

    def _clear_subclusters(self, table: Table, index: int, start: int, length: int, *,
                           zero: bool) -> None:
        meta = self.meta
        geometry = meta.geometry
        entry, bitmap = table.entries[2 * index], table.entries[2 * index + 1]
        if entry & QCOW_OFLAG_COMPRESSED:
            if length < meta.cluster_size:
                raise Unsupported("partial zero write to a compressed cluster")
            table.entries[2 * index] = 0
            table.entries[2 * index + 1] = BITMAP_ALL_ZEROES if zero else 0
            meta.release(entry)
            return
        bits = bitmap_range(start >> geometry.subcluster_bits,
                            length >> geometry.subcluster_bits)
        bitmap &= ~bits
        bitmap = bitmap | bits << 32 if zero else bitmap & ~(bits << 32)
        table.entries[2 * index + 1] = bitmap

    # -- preallocation (create) ---------------------------------------------------------

    async def preallocate(self, mode: str, start: int = 0) -> None:
        """Allocate the L2 tables and data clusters of the disk from guest
        offset `start` on, where none is allocated yet (QEMU's
        preallocation=metadata|falloc|full, at create and resize)."""
        meta = self.meta
        if self.crypto is not None:
            # preallocated clusters would decrypt to noise, not zeros
            raise Unsupported(f"preallocation={mode} is not supported for encrypted images")
        geometry = meta.geometry
        total = -(-self.size // meta.cluster_size)
        position = start >> geometry.cluster_bits
        words = 2 if geometry.extended_l2 else 1
        async with meta.lock:
            await meta.prepare_for_write()
            while position < total:
                table = await self._l2_for_write(position >> geometry.l2_bits)
                index = position & (geometry.l2_entries - 1)
                limit = min(geometry.l2_entries - index, total - position)
                count = 0
                while count < limit and not table.entries[(index + count) * words]:
                    count += 1
                if count:
                    host = await self._new_clusters(position << geometry.cluster_bits, count)
                    await self._reserve(host, count << geometry.cluster_bits, mode)
                    for number in range(count):
                        self._set_preallocated(table, index + number,
                                               host + (number << geometry.cluster_bits), mode)
                    meta.l2_cache.changed(table, dirty=True)
                position += max(count, 1)
            await meta.write_back()

    def _set_preallocated(self, table: Table, index: int, host: int, mode: str) -> None:
        if self.meta.geometry.extended_l2:
            table.entries[2 * index] = host | QCOW_OFLAG_COPIED
            table.entries[2 * index + 1] = 0 if mode == "metadata" else BITMAP_ALL_ALLOCATED
        else:
            table.entries[index] = host | QCOW_OFLAG_COPIED

    async def _reserve(self, host: int, length: int, mode: str) -> None:
        child = self.children[self.meta.data_child]
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
        """Grow, or shrink (dropping the clusters past the new end), as
        qemu-img resize; the new area reads as zeros even where the old last
        cluster or a longer backing file held data."""
        meta = self.meta
        if size % 512:
            raise UsageError(f"the new size {size} is not a multiple of 512 bytes")
        preallocation = preallocation or "off"
        old_size = self.size
        if size < old_size:
            if preallocation != "off":
                raise UsageError("preallocation only applies when growing an image")
            await self._shrink(size)
            return
        async with meta.lock:
            await meta.prepare_for_write()
            needed = meta.geometry.l1_entries_for(size)
            if needed > len(meta.l1):
                await meta.grow_l1(needed)
            if meta.data_file_raw and self.children["data-file"].size < size:
                await self.children["data-file"].truncate(size)
            await meta.set_size(size)
        zero_end = old_size
        if old_size % meta.cluster_size:
            zero_end = min(size, meta.geometry.cluster_start(old_size)
                           + meta.cluster_size)
        backing = self.node.backing
        if backing is not None:
            zero_end = max(zero_end, min(size, backing.size))
        if zero_end > old_size:
            await self.write_zeroes(old_size, zero_end - old_size)
        if preallocation != "off":
            await self.preallocate(preallocation, start=old_size)

    async def _shrink(self, size: int) -> None:
        meta = self.meta
        if meta.snapshots:
            raise Unsupported("cannot shrink an image that has internal snapshots")
        keep_end = -(-size // meta.cluster_size) * meta.cluster_size
        if keep_end < self.size:
            await self._clear_range(keep_end, self.size - keep_end, zero=False, unmap=True)
        async with meta.lock:
            first_unused = meta.geometry.l1_entries_for(size)
            dropped = []
            for l1_index in range(first_unused, len(meta.l1)):
                l2_offset = meta.l1[l1_index] & L1E_OFFSET_MASK
                if l2_offset:
                    meta.refcounts.queue_free(l2_offset)
                    dropped.append(l2_offset)
                    meta.l1[l1_index] = 0
                    meta.l1_dirty.add(l1_index)
            await meta.write_back()
            for l2_offset in dropped:
                meta.l2_cache.drop(l2_offset)
            await meta.set_size(size)

    # -- compressed writes (convert -c) ------------------------------------------------

    async def write_compressed(self, offset: int, data: bytes) -> None:
        """Store whole clusters of `data` compressed (deflate or zstd, as the
        header's compression_type says); partial clusters, and clusters that
        do not shrink, are written normally.  Clusters of zeros on a layer
        without backing are skipped."""
        meta = self.meta
        if meta.has_data_file:
            raise Unsupported("compressed clusters cannot be used with an external data file")
        if self.dirty_bitmaps is not None:
            self.dirty_bitmaps.mark(offset, len(data))
        if self.crypto is not None:
            raise Unsupported("compressed clusters cannot be used in an encrypted image")
        view = memoryview(data)
        position, end = offset, offset + len(data)
        while position < end:
            cluster_start = meta.geometry.cluster_start(position)
            cluster_end = min(cluster_start + meta.cluster_size, self.size)
            step_end = min(end, cluster_end)
            chunk = view[position - offset:step_end - offset]
            if position != cluster_start or step_end != cluster_end:
                await self.write(position, bytes(chunk))
            elif any(chunk) or self.node.backing is not None:
                await self._write_compressed_cluster(cluster_start, bytes(chunk))
            position = step_end

    async def _write_compressed_cluster(self, guest_offset: int, data: bytes) -> None:
        meta = self.meta
        packed = compress_cluster(data.ljust(meta.cluster_size, b"\0"),
                                  meta.header.compression_type)
        if len(packed) >= meta.cluster_size:
            await self.write(guest_offset, data)
            return
        async with meta.lock:
            await meta.prepare_for_write()
            table = await self._l2_for_write(meta.geometry.l1_index(guest_offset))
            host = await self._allocate_bytes(len(packed))
            # (bytes freed by an old compressed cluster may be reused, and an
            # entry with the same offset and length must not read as it)
            self.inflated.clear()
            await self.children["file"].write(host, packed)
            words = 2 if meta.geometry.extended_l2 else 1
            index = meta.geometry.l2_index(guest_offset) * words
            old = table.entries[index]
            table.entries[index] = compressed_descriptor(host, len(packed),
                                                         meta.geometry.cluster_bits)
            if words == 2:
                table.entries[index + 1] = 0
            meta.l2_cache.changed(table, dirty=True)
            meta.release(old)

    async def _allocate_bytes(self, length: int) -> int:
        """Host bytes for compressed data, packed one after another; each
        host cluster holds one reference per compressed cluster touching it
        (spec: "Compressed Clusters Descriptor")."""
        meta = self.meta
        cursor = self.compressed_cursor
        cluster_bits = meta.geometry.cluster_bits
        if cursor and cursor & (meta.cluster_size - 1) and \
                (cursor & (meta.cluster_size - 1)) + length <= meta.cluster_size and \
                await meta.refcounts.get(cursor >> cluster_bits) < \
                meta.refcounts.geometry.max_refcount:
            await meta.refcounts.update(cursor >> cluster_bits, 1, 1)
            host = cursor
        else:
            host = await meta.refcounts.allocate(1)
        self.compressed_cursor = host + length
        return host
