"""Rebuilding qcow2 refcounts from the mapping tables.

Spec: qemu/qemu docs/interop/qcow2.txt, incompatible bit 0 ("Dirty bit. If
this bit is set then refcounts may be inconsistent, make sure to scan L1/L2
tables to repair refcounts before accessing the image") and "Snapshots" (a
cluster's refcount is the number of L1 -> L2 paths that reach it).  QEMU does
this on a read-write open of a dirty image; so does imgfs.
"""
from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from imgfs.errors import CorruptImage

from .cluster import (
    L1E_OFFSET_MASK,
    QCOW_OFLAG_COMPRESSED,
    ClusterType,
    compressed_range,
    decode_entry,
    unpack_table,
)

if TYPE_CHECKING:
    from .driver import Qcow2Driver


async def count_references(driver: Qcow2Driver) -> Counter[int]:
    """How many references each host cluster of the image file has."""
    header = driver.header
    file = driver.children["file"]
    counts: Counter[int] = Counter()
    bits = header.cluster_bits

    def add(offset: int, length: int, past_end: bool = False) -> None:
        if length <= 0:
            return
        if offset + length > file.size and not (past_end and offset < file.size):
            raise CorruptImage(f"metadata at {offset:#x} (+{length}) lies beyond the end "
                               "of the file")
        for cluster in range(offset >> bits, ((offset + length - 1) >> bits) + 1):
            counts[cluster] += 1

    add(0, driver.cluster_size)
    add(header.refcount_table_offset, header.refcount_table_clusters << bits)
    for entry in driver.refcounts.table:
        if entry:
            add(entry & ~(driver.cluster_size - 1), driver.cluster_size)
    add(header.l1_table_offset, header.l1_size * 8)
    await _count_l1(driver, driver.l1, add)
    if header.nb_snapshots:
        add(header.snapshots_offset, driver.snapshot_table_length)
        for snap in driver.snapshots:
            add(snap.l1_table_offset, snap.l1_size * 8)
            l1 = unpack_table(await file.read(snap.l1_table_offset, snap.l1_size * 8))
            await _count_l1(driver, l1, add)
    return counts


async def _count_l1(driver: Qcow2Driver, l1: list[int], add) -> None:  # type: ignore[no-untyped-def]
    words = 2 if driver.geometry.extended_l2 else 1
    for l1_entry in l1:
        l2_offset = l1_entry & L1E_OFFSET_MASK
        if not l2_offset:
            continue
        add(l2_offset, driver.cluster_size)
        table = await driver._l2_table(l2_offset)
        for entry in table.entries[::words]:
            if entry & QCOW_OFLAG_COMPRESSED:
                host, most = compressed_range(entry, driver.geometry.cluster_bits)
                add(host, most, past_end=True)       # the last sector may pass EOF
                continue
            mapping = decode_entry(entry, zero_flag=driver.zero_flag)
            if mapping.host_offset and not driver.has_data_file and \
                    mapping.type in (ClusterType.NORMAL, ClusterType.ZERO):
                add(mapping.host_offset, driver.cluster_size)


async def rebuild_refcounts(driver: Qcow2Driver) -> None:
    """Recount every cluster and rewrite the refcount blocks to match."""
    counts = await count_references(driver)
    store = driver.refcounts
    for entry in store.table:
        offset = entry & ~(driver.cluster_size - 1)
        if offset:
            block = await store._load(offset)
            block[:] = bytes(len(block))
            store.dirty.add(offset)
    # Metadata clusters first: a table move during the rebuild releases the
    # old table, whose count must be there already.
    refcount_clusters = _refcount_clusters(driver)
    first = sorted(counts, key=lambda cluster: (cluster not in refcount_clusters, cluster))
    for cluster in first:
        await store.update(cluster, 1, counts[cluster])
    store.free_hint = 0
    await store.write_back()
    await driver.children["file"].flush()


def _refcount_clusters(driver: Qcow2Driver) -> set[int]:
    bits = driver.header.cluster_bits
    start = driver.header.refcount_table_offset >> bits
    clusters = set(range(start, start + driver.header.refcount_table_clusters))
    clusters.update((entry >> bits) for entry in driver.refcounts.table if entry)
    return clusters
