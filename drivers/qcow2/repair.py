"""Checking and repairing qcow2 refcounts against the mapping tables.

Spec: qemu/qemu docs/interop/qcow2.txt, incompatible bit 0 ("Dirty bit. If
this bit is set then refcounts may be inconsistent, make sure to scan L1/L2
tables to repair refcounts before accessing the image"), "Host cluster
management" and "Snapshots" (a cluster's refcount is the number of L1 -> L2
paths that reach it; bit 63 of active L1/L2 entries says "refcount is 1").

`scan_references` walks every table and counts references; `check_image`
compares them with the stored refcounts in qemu-img check's terms (its
counts, messages and JSON keys); `rebuild_refcounts` rewrites the refcounts
from the references (QEMU does that on a read-write open of a dirty image,
and for ``check -r``), and `fix_copied_flags` repairs bit 63.
"""
from __future__ import annotations

import struct
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from imgfs.check import CheckResult
from imgfs.errors import CorruptImage, ImgfsError, InvalidImage

from .bitmaps import (
    BME_MAX_TABLE_SIZE,
    BME_TABLE_ENTRY_ALL_ONES,
    BME_TABLE_ENTRY_OFFSET_MASK,
    BME_TABLE_ENTRY_RESERVED,
)
from .cluster import (
    BITMAP_ALL_ALLOCATED,
    L1E_OFFSET_MASK,
    L1E_RESERVED,
    L2E_OFFSET_MASK,
    L2E_STANDARD_RESERVED,
    QCOW_OFLAG_COMPRESSED,
    QCOW_OFLAG_COPIED,
    QCOW_OFLAG_ZERO,
    ClusterType,
    compressed_range,
    pack_table,
    unpack_l2,
    unpack_table,
)
from .refcount import REFT_OFFSET_MASK, RefcountGeometry, set_refcount
from .snapshot import l1_table_problem

#: refcount table entry bits 0-8 are reserved (spec: "Host cluster management")
REFT_RESERVED_MASK = 0x1FF
#: bytes of a bitmap table read at once by the check
BITMAP_TABLE_CHUNK = 1 << 20

if TYPE_CHECKING:
    from imgfs.tablecache import Table

    from .metadata import Qcow2Metadata
    from .snapshot import Snapshot


@dataclass
class References:
    """References to host clusters, and what the walk found wrong."""

    counts: Counter[int] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    #: the refcount structures themselves are damaged (QEMU: rebuild them)
    rebuild: bool = False
    #: refcount table entries pointing past the end of the file
    outside_blocks: int = 0
    allocated: int = 0
    fragmented: int = 0
    compressed: int = 0


@dataclass
class CheckReport:
    """qemu-img check's numbers (ImageCheck in its JSON)."""

    corruptions: int = 0
    #: of the corruptions, the clusters whose refcount is below their references
    refcount_errors: int = 0
    #: of the corruptions, the wrong bit-63 (COPIED) flags
    copied_errors: int = 0
    #: a referenced cluster has refcount 0, or the refcount structures are
    #: damaged (QEMU: "need to rebuild refcount structures")
    needs_rebuild: bool = False
    #: the refcount table or blocks themselves are damaged
    damaged_structures: bool = False
    #: refcount blocks past the end of the file (QEMU's repair adopts each
    #: one, which it counts as one more corruption fixed)
    outside_blocks: int = 0
    leaks: int = 0
    check_errors: int = 0
    messages: list[str] = field(default_factory=list)
    leaked: list[tuple[int, int, int]] = field(default_factory=list)
    total_clusters: int = 0
    allocated: int = 0
    fragmented: int = 0
    compressed: int = 0
    image_end_offset: int = 0


class _Walk:
    """Counts references while walking the tables of one image, in the
    order and with the messages of QEMU's check (calculate_refcounts)."""

    def __init__(self, meta: Qcow2Metadata) -> None:
        self.meta = meta
        self.bits = meta.geometry.cluster_bits
        self.cluster_size = meta.cluster_size
        self.file = meta.children["file"]
        self.file_size = self.file.size
        self.max_refcount = meta.refcounts.geometry.max_refcount
        self.result = References()
        self.next_contiguous = 0

    def error(self, message: str) -> None:
        self.result.errors.append(message)

    def add(self, offset: int, length: int) -> None:
        """One reference to each cluster of offset..offset+length.  As QEMU,
        a region may end less than a cluster past the end of the file (the
        last cluster of an image is often written only in part)."""
        if length <= 0:
            return
        if offset + length - self.file_size >= self.cluster_size:
            self.error("ERROR: counting reference for region exceeding the end of the file "
                       f"by one cluster or more: offset {offset:#x} size {length:#x}")
            return
        counts = self.result.counts
        for cluster in range(offset >> self.bits, ((offset + length - 1) >> self.bits) + 1):
            if counts[cluster] >= self.max_refcount:
                self.error(f"ERROR: overflow cluster offset={cluster << self.bits:#x}")
                continue
            counts[cluster] += 1

    async def l1_table(self, l1: list[int], *, active: bool) -> None:
        for l1_entry in l1:
            if not l1_entry:
                continue
            if l1_entry & L1E_RESERVED:
                self.error(f"ERROR found L1 entry with reserved bits set: {l1_entry:x}")
            l2_offset = l1_entry & L1E_OFFSET_MASK
            self.add(l2_offset, self.cluster_size)
            if l2_offset & (self.cluster_size - 1):
                self.error(f"ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; "
                           "L1 entry corrupted")
            # as QEMU, the table is read where the entry says, whatever that is
            entries = await read_l2(self.meta, l2_offset)
            self.next_contiguous = 0        # as QEMU: fragmentation is per L2 table
            if any(entries):    # (a table of zeros, as past the end of the file, holds nothing)
                self.l2_table(entries, active=active)

    def l2_table(self, entries: Sequence[int], *, active: bool) -> None:
        words = 2 if self.meta.geometry.extended_l2 else 1
        for index in range(0, len(entries), words):
            entry = entries[index]
            bitmap = entries[index + 1] if words == 2 else 0
            kind = cluster_type(self.meta, entry)
            if kind is not ClusterType.COMPRESSED and entry & L2E_STANDARD_RESERVED:
                self.error(f"ERROR found l2 entry with reserved bits set: {entry:x}")
            if kind is ClusterType.COMPRESSED:
                self._compressed(index // words, entry, bitmap, active)
            elif kind is ClusterType.NORMAL:
                self._allocated(entry, bitmap, active)
            elif kind is ClusterType.UNALLOCATED and bitmap & BITMAP_ALL_ALLOCATED:
                self.error("ERROR: Unallocated cluster has non-zero subcluster allocation "
                           f"bitmap, entry={entry:#x}")

    def _compressed(self, index: int, entry: int, bitmap: int, active: bool) -> None:
        if entry & QCOW_OFLAG_COPIED:
            host, _ = compressed_range(entry, self.bits)
            self.error(f"ERROR: coffset={host:#x}: copied flag must never be set for "
                       "compressed clusters")
            entry &= ~QCOW_OFLAG_COPIED
        if self.meta.has_data_file:
            self.error(f"ERROR compressed cluster {index} with data file, entry={entry:#x}")
            return
        if bitmap:
            self.error(f"ERROR compressed cluster {index} with non-zero subcluster "
                       f"allocation bitmap, entry={entry:#x}")
            return
        self.add(*compressed_range(entry, self.bits))
        if active:
            self.result.allocated += 1
            self.result.compressed += 1
            self.result.fragmented += 1      # compressed clusters always are

    def _allocated(self, entry: int, bitmap: int, active: bool) -> None:
        """A standard cluster with a host offset (data, or preallocated zeros)."""
        host = entry & L2E_OFFSET_MASK
        if (bitmap >> 32) & bitmap:
            self.error(f"ERROR offset={host:x}: Allocated cluster has corrupted subcluster "
                       "allocation bitmap")
        if host & (self.cluster_size - 1):
            self._unaligned(entry, bitmap)
        if active:
            self.result.allocated += 1
            if self.next_contiguous and host != self.next_contiguous:
                self.result.fragmented += 1
            self.next_contiguous = host + self.cluster_size
        if not self.meta.has_data_file:
            self.add(host, self.cluster_size)

    def _unaligned(self, entry: int, bitmap: int) -> None:
        """QEMU's check_refcounts_l2: an unaligned host offset is one
        corruption (the cluster is still counted where it points)."""
        if self.meta.geometry.extended_l2:
            holds_data = bool(bitmap & BITMAP_ALL_ALLOCATED)
        else:
            holds_data = not entry & QCOW_OFLAG_ZERO
        kind = "Data" if holds_data else "Preallocated"
        self.error(f"ERROR offset={entry & L2E_OFFSET_MASK:x}: {kind} cluster "
                   "is not properly aligned; L2 entry corrupted.")


def cluster_type(meta: Qcow2Metadata, entry: int) -> ClusterType:
    """QEMU's classification of an L2 entry (qcow2_get_cluster_type); a
    zero cluster with a host offset is NORMAL here (it holds a cluster)."""
    if entry & QCOW_OFLAG_COMPRESSED:
        return ClusterType.COMPRESSED
    if entry & QCOW_OFLAG_ZERO and not meta.geometry.extended_l2:
        return ClusterType.NORMAL if entry & L2E_OFFSET_MASK else ClusterType.ZERO
    if entry & L2E_OFFSET_MASK or meta.has_data_file and entry & QCOW_OFLAG_COPIED:
        return ClusterType.NORMAL
    return ClusterType.UNALLOCATED


async def read_l2(meta: Qcow2Metadata, l2_offset: int) -> Sequence[int]:
    """The L2 table at `l2_offset` as the file holds it, aligned or not
    (zeros past the end of the file), without the driver's cache."""
    file = meta.children["file"]
    length = max(0, min(meta.cluster_size, file.size - l2_offset))
    raw = await file.read(l2_offset, length) if length else b""
    return unpack_l2(raw.ljust(meta.cluster_size, b"\0"))


async def scan_references(meta: Qcow2Metadata, *,
                          refcount_structures: bool = True) -> References:
    """How many references each host cluster of the image file has (the
    refcount table and blocks left out when not `refcount_structures`)."""
    header = meta.header
    walk = _Walk(meta)
    for message in meta.snapshot_errors:
        walk.error(message)
    walk.add(0, meta.cluster_size)
    walk.add(header.l1_table_offset, header.l1_size * 8)
    await walk.l1_table(meta.l1, active=True)
    if meta.has_data_file and header.nb_snapshots:
        walk.error(f"ERROR {header.nb_snapshots} snapshots in image with data file")
    for snap in meta.snapshots:
        # only an image opened for the check gets here with such a table
        problem = l1_table_problem(snap, meta.cluster_size)
        if problem:
            walk.error(problem)
            continue
        walk.add(snap.l1_table_offset, snap.l1_size * 8)
        await walk.l1_table(await _snapshot_l1(meta, snap), active=False)
    if header.nb_snapshots:
        walk.add(header.snapshots_offset, meta.snapshot_table_length)
    if refcount_structures:
        walk.add(header.refcount_table_offset, header.refcount_table_clusters << walk.bits)
    if meta.image.crypto_header is not None:
        walk.add(*meta.image.crypto_header)
    await _bitmap_references(meta, walk)
    if refcount_structures:
        _refcount_blocks(meta, walk)
    return walk.result


async def _snapshot_l1(meta: Qcow2Metadata, snap: Snapshot) -> list[int]:
    """A snapshot's L1 table (its size checked by `l1_table_problem`): as
    in QEMU's check, the part past the end of the file has no entries."""
    inside = await meta.read_inside(snap.l1_table_offset, snap.l1_size * 8)
    return unpack_table(inside[:len(inside) // 8 * 8])


def _refcount_blocks(meta: Qcow2Metadata, walk: _Walk) -> None:
    """The refcount blocks: each must be referenced exactly once (QEMU's
    check_refblocks; anything else needs the refcounts rebuilt)."""
    file_clusters = -(-walk.file_size // meta.cluster_size)
    for index, entry in enumerate(meta.refcounts.table):
        offset = entry & REFT_OFFSET_MASK
        cluster = offset >> walk.bits
        if entry & REFT_RESERVED_MASK:
            walk.error(f"ERROR refcount table entry {index} has reserved bits set")
            walk.result.rebuild = True
            continue
        if offset & (meta.cluster_size - 1):
            walk.error(f"ERROR refcount block {index} is not cluster aligned; refcount "
                       "table entry corrupted")
            walk.result.rebuild = True
            continue
        if cluster >= file_clusters:
            # as QEMU, not a reason to refuse -r leaks; -r all rebuilds
            walk.error(f"ERROR refcount block {index} is outside image")
            walk.result.outside_blocks += 1
            continue
        if offset:
            walk.add(offset, meta.cluster_size)
            if walk.result.counts[cluster] != 1:
                walk.error(f"ERROR refcount block {index} "
                           f"refcount={walk.result.counts[cluster]}")
                walk.result.rebuild = True


async def _bitmap_references(meta: Qcow2Metadata, walk: _Walk) -> None:
    """The bitmap directory, tables and data clusters (spec: "Bitmaps";
    QEMU's qcow2_check_bitmaps_refcounts)."""
    if meta.bitmaps is None:
        return
    walk.add(meta.bitmaps.bitmap_directory_offset, meta.bitmaps.bitmap_directory_size)
    try:
        entries = await meta.bitmap_entries()
    except InvalidImage as error:
        walk.error(f"ERROR bitmap directory: {error}")
        return
    for entry in entries:
        length = entry.table_size * 8
        walk.add(entry.table_offset, length)
        if entry.table_offset % meta.cluster_size:
            walk.error(f"ERROR bitmap table at {entry.table_offset:#x} is not cluster "
                       "aligned")
            continue
        if entry.table_size > BME_MAX_TABLE_SIZE:
            walk.error(f"ERROR bitmap table of {entry.table_size} entries is too large")
            continue
        await _bitmap_table(meta, walk, entry.table_offset, length)


async def _bitmap_table(meta: Qcow2Metadata, walk: _Walk, offset: int, length: int) -> None:
    """The data clusters one bitmap table references, read a piece at a time;
    as QEMU, the part past the end of the file reads as zeros (no entries)."""
    file = meta.children["file"]
    end = min(offset + length, file.size)
    for start in range(offset, end, BITMAP_TABLE_CHUNK):
        raw = await file.read(start, min(BITMAP_TABLE_CHUNK, end - start))
        for table_entry in unpack_table(raw[:len(raw) // 8 * 8]):
            data_offset = table_entry & BME_TABLE_ENTRY_OFFSET_MASK
            if table_entry & BME_TABLE_ENTRY_RESERVED or data_offset and (
                    table_entry & BME_TABLE_ENTRY_ALL_ONES
                    or data_offset % meta.cluster_size):
                walk.error(f"ERROR bitmap table entry {table_entry:#x} is invalid")
                continue
            if data_offset:
                walk.add(data_offset, meta.cluster_size)


async def check_image(meta: Qcow2Metadata) -> CheckReport:
    """Compare stored refcounts with references, as qemu-img check does."""
    refs = await scan_references(meta)
    report = CheckReport(messages=list(refs.errors), corruptions=len(refs.errors),
                         allocated=refs.allocated, fragmented=refs.fragmented,
                         compressed=refs.compressed, needs_rebuild=refs.rebuild,
                         damaged_structures=refs.rebuild or bool(refs.outside_blocks),
                         outside_blocks=refs.outside_blocks)
    report.total_clusters = -(-meta.size // meta.cluster_size)
    store = meta.refcounts
    file_clusters = -(-meta.children["file"].size // meta.cluster_size)
    clusters = max([file_clusters, *(cluster + 1 for cluster in refs.counts)])
    highest = 0             # as QEMU: the end offset is at least one cluster
    for cluster in range(clusters):
        try:
            stored = await store.get(cluster)
        except CorruptImage as error:
            report.check_errors += 1
            report.messages.append(f"Can't get refcount for cluster {cluster}: {error}")
            continue
        wanted = refs.counts.get(cluster, 0)
        if stored or wanted:
            highest = cluster
        if stored < wanted:
            report.corruptions += 1
            report.refcount_errors += 1
            report.needs_rebuild |= stored == 0
            report.messages.append(f"ERROR cluster {cluster} refcount={stored} "
                                   f"reference={wanted}")
        elif stored > wanted:
            report.leaks += 1
            report.leaked.append((cluster, stored, wanted))
            report.messages.append(f"Leaked cluster {cluster} refcount={stored} "
                                   f"reference={wanted}")
    report.image_end_offset = (highest + 1) * meta.cluster_size
    await _check_copied_flags(meta, report)
    return report


async def _refcount_or_zero(meta: Qcow2Metadata, host_offset: int) -> int | None:
    """The stored refcount of the cluster at `host_offset` (None if unreadable)."""
    try:
        return await meta.refcounts.get(host_offset >> meta.geometry.cluster_bits)
    except CorruptImage:
        return None


async def _l2_tables_with_refcounts(meta: Qcow2Metadata
                                    ) -> AsyncIterator[tuple[int, int, int, int]]:
    """(L1 index, L1 entry, L2 offset, the L2 cluster's refcount) of every
    active L2 table whose refcount can be read."""
    for l1_index, entry in enumerate(meta.l1):
        l2_offset = entry & L1E_OFFSET_MASK
        if not l2_offset:
            continue
        refcount = await _refcount_or_zero(meta, l2_offset)
        if refcount is not None:
            yield l1_index, entry, l2_offset, refcount


async def _check_copied_flags(meta: Qcow2Metadata, report: CheckReport) -> None:
    """Bit 63 of active L1 and L2 entries must say whether the refcount is 1."""
    words = 2 if meta.geometry.extended_l2 else 1
    async for l1_index, entry, l2_offset, refcount in _l2_tables_with_refcounts(meta):
        if bool(entry & QCOW_OFLAG_COPIED) != (refcount == 1):
            report.corruptions += 1
            report.copied_errors += 1
            report.messages.append(f"ERROR OFLAG_COPIED L2 cluster: l1_index={l1_index} "
                                   f"l1_entry={entry:x} refcount={refcount}")
        entries = await read_l2(meta, l2_offset)
        if not any(entries):
            continue            # (nothing to check: a table past the end of the file)
        for l2_entry in entries[::words]:
            if cluster_type(meta, l2_entry) is not ClusterType.NORMAL:
                continue
            data_refcount = 1 if meta.has_data_file else \
                await _refcount_or_zero(meta, l2_entry & L2E_OFFSET_MASK)
            if data_refcount is None:
                continue
            if bool(l2_entry & QCOW_OFLAG_COPIED) != (data_refcount == 1):
                report.corruptions += 1
                report.copied_errors += 1
                report.messages.append(f"ERROR OFLAG_COPIED data cluster: "
                                       f"l2_entry={l2_entry:x} refcount={data_refcount}")


async def _active_l2_tables(meta: Qcow2Metadata) -> list[tuple[int, int, int, int]]:
    """Active L2 tables the repair may rewrite: aligned, inside the file,
    and clear of the header, L1 and refcount tables."""
    file_size = meta.children["file"].size
    tables = []
    for l1_index, entry in enumerate(meta.l1):
        l2_offset = entry & L1E_OFFSET_MASK
        if l2_offset and not l2_offset & (meta.cluster_size - 1) and \
                l2_offset + meta.cluster_size <= file_size and \
                not meta.overlaps_metadata(l2_offset, meta.cluster_size):
            refcount = await meta.refcounts.get(l2_offset >> meta.geometry.cluster_bits)
            tables.append((l1_index, entry, l2_offset, refcount))
    return tables


async def rebuild_refcounts(meta: Qcow2Metadata, *, leaks_only: bool = False) -> None:
    """Rewrite refcounts from the references (only lowering them when
    `leaks_only`, as ``check -r leaks``)."""
    refs = await scan_references(meta)
    store = meta.refcounts
    file_clusters = -(-meta.children["file"].size // meta.cluster_size)
    table_clusters = {entry >> meta.geometry.cluster_bits for entry in store.table if entry}
    start = meta.header.refcount_table_offset >> meta.geometry.cluster_bits
    table_clusters.update(range(start, start + meta.header.refcount_table_clusters))
    # Refcount structures first: a table move during the rebuild releases the
    # old table, whose count must be right by then.
    order = sorted(set(refs.counts) | set(range(file_clusters)),
                   key=lambda cluster: (cluster not in table_clusters, cluster))
    for cluster in order:
        stored, wanted = await store.get(cluster), refs.counts.get(cluster, 0)
        if stored != wanted and not (leaks_only and stored < wanted):
            await store.update(cluster, 1, wanted - stored)
    store.free_hint = 0
    await store.write_back()
    await meta.children["file"].flush()


async def rebuild_refcount_structures(meta: Qcow2Metadata,
                                      refcount_order: int | None = None) -> None:
    """``check -r all`` when the refcount table or blocks themselves are
    damaged (QEMU: "Rebuilding refcount structure"), and ``amend -o
    refcount_bits`` (a new `refcount_order`): new refcount blocks and a
    new table after the end of the file, made from the references alone;
    the header then points at them, and the old structures are left
    unreferenced (free space)."""
    refs = await scan_references(meta, refcount_structures=False)
    counts = refs.counts
    file = meta.children["file"]
    order = meta.header.refcount_order if refcount_order is None else refcount_order
    geometry = RefcountGeometry(meta.geometry.cluster_bits, order)
    for cluster, value in counts.items():
        if value > geometry.max_refcount:
            raise ImgfsError(f"Cannot decrease refcount entry width to "
                             f"{geometry.refcount_bits} bits: cluster {cluster} has a "
                             f"refcount of {value}")
    bits, cluster_size = meta.geometry.cluster_bits, meta.cluster_size
    end = max([-(-file.size // cluster_size), *(cluster + 1 for cluster in counts)])
    blocks, table_clusters = _structure_sizes(end, geometry.block_entries, cluster_size)
    for cluster in range(end, end + blocks + table_clusters):
        counts[cluster] += 1
    contents = [bytearray(cluster_size) for _ in range(blocks)]
    for cluster, value in counts.items():
        block, index = divmod(cluster, geometry.block_entries)
        set_refcount(contents[block], index, geometry.refcount_order, value)
    await file.truncate((end + blocks + table_clusters) << bits)
    for number, content in enumerate(contents):
        await file.write((end + number) << bits, bytes(content))
    table = [(end + number) << bits for number in range(blocks)]
    table_offset = (end + blocks) << bits
    await file.write(table_offset,
                     pack_table(table).ljust(table_clusters << bits, b"\0"))
    await file.flush()
    await meta.switch_refcount_structures(table_offset, table_clusters, order)


def _structure_sizes(end: int, block_entries: int, cluster_size: int) -> tuple[int, int]:
    """(refcount blocks, table clusters) to cover clusters 0..end and the
    new structures placed right after them."""
    blocks = table_clusters = 0
    while True:
        total = end + blocks + table_clusters
        wanted = -(-total // block_entries)
        wanted_table = -(-wanted * 8 // cluster_size)
        if (wanted, wanted_table) == (blocks, table_clusters):
            return blocks, table_clusters
        blocks, table_clusters = wanted, wanted_table


async def zero_unaligned_preallocated(meta: Qcow2Metadata, messages: list[str]) -> int:
    """``check -r all``, as QEMU: an L2 entry with an unaligned host offset
    that holds no data (a preallocated zero cluster) becomes a plain zero
    cluster (unallocated with extended L2).  Returns how many, and says
    which in `messages`."""
    fixed = 0
    file = meta.children["file"]
    # a snapshot whose L1 table the check could not walk is left alone
    tables = [meta.l1] + [await _snapshot_l1(meta, snap) for snap in meta.snapshots
                          if not l1_table_problem(snap, meta.cluster_size)]
    words = 2 if meta.geometry.extended_l2 else 1
    for l1 in tables:
        for l1_entry in l1:
            l2_offset = l1_entry & L1E_OFFSET_MASK
            if not l1_entry or l2_offset + meta.cluster_size > file.size:
                continue
            entries = await read_l2(meta, l2_offset)
            for index in range(0, len(entries), words):
                entry = entries[index]
                if cluster_type(meta, entry) is not ClusterType.NORMAL or \
                        not entry & L2E_OFFSET_MASK & (meta.cluster_size - 1):
                    continue
                if words == 2:
                    if entries[index + 1] & BITMAP_ALL_ALLOCATED:
                        continue
                    new = 0
                elif entry & QCOW_OFLAG_ZERO:
                    new = QCOW_OFLAG_ZERO
                else:
                    continue
                position = l2_offset + index * 8
                if meta.overlaps_metadata(position, 8):
                    continue
                messages.append(f"Repairing offset={entry & L2E_OFFSET_MASK:x}: Preallocated "
                                "cluster is not properly aligned; L2 entry corrupted.")
                await file.write(position, struct.pack(">Q", new))
                fixed += 1
    if fixed:
        await file.flush()
        meta.l2_cache.clear()
    return fixed


async def fix_copied_flags(meta: Qcow2Metadata) -> None:
    """Set bit 63 of active L1/L2 entries from the (rebuilt) refcounts; the
    entries of an L2 table that is misplaced (unaligned, past the end,
    over other metadata) are left alone."""
    sane = {l2_offset for _, _, l2_offset, _ in await _active_l2_tables(meta)}
    async for l1_index, entry, l2_offset, refcount in _l2_tables_with_refcounts(meta):
        wanted = (entry & ~QCOW_OFLAG_COPIED) | (QCOW_OFLAG_COPIED if refcount == 1 else 0)
        if wanted != entry:
            meta.l1[l1_index] = wanted
            meta.l1_dirty.add(l1_index)
        if l2_offset in sane:
            await _fix_copied_in_table(meta, await meta.l2_table(l2_offset))
    await meta.write_back()


async def _fix_copied_in_table(meta: Qcow2Metadata, table: Table) -> None:
    words = 2 if meta.geometry.extended_l2 else 1
    changed = False
    for index in range(0, len(table.entries), words):
        old = table.entries[index]
        if cluster_type(meta, old) is not ClusterType.NORMAL:
            continue
        if meta.has_data_file:
            refcount: int | None = 1
        else:
            refcount = await _refcount_or_zero(meta, old & L2E_OFFSET_MASK)
        if refcount is None:
            continue
        new = (old & ~QCOW_OFLAG_COPIED) | (QCOW_OFLAG_COPIED if refcount == 1 else 0)
        if new != old:
            table.entries[index] = new
            changed = True
    if changed:
        meta.l2_cache.changed(table, dirty=True)


# -- qemu-img check's output -----------------------------------------------------------


def as_result(report: CheckReport, repair_messages: list[str], *,
              fixed: tuple[int, int] = (0, 0), failure: str | None = None) -> CheckResult:
    """The core's CheckResult: what the repair said, then what the last
    check found; `fixed` is (leaks fixed, corruptions fixed)."""
    return CheckResult(
        corruptions=report.corruptions, leaks=report.leaks, check_errors=report.check_errors,
        leaks_fixed=fixed[0], corruptions_fixed=fixed[1],
        total_clusters=report.total_clusters, allocated_clusters=report.allocated,
        fragmented_clusters=report.fragmented, compressed_clusters=report.compressed,
        image_end_offset=report.image_end_offset,
        messages=[*repair_messages, *report.messages], failure=failure)
