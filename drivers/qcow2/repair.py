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

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .bitmaps import BME_TABLE_ENTRY_OFFSET_MASK
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
    decode_entry,
    unpack_table,
)

if TYPE_CHECKING:
    from .driver import Qcow2Driver


@dataclass
class References:
    """References to host clusters, and what the walk found wrong."""

    counts: Counter[int] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    allocated: int = 0
    fragmented: int = 0
    compressed: int = 0


@dataclass
class CheckReport:
    """qemu-img check's numbers (ImageCheck in its JSON)."""

    corruptions: int = 0
    #: of the corruptions, the clusters whose refcount is below their references
    refcount_errors: int = 0
    #: a referenced cluster has refcount 0 (QEMU: "need to rebuild refcount structures")
    needs_rebuild: bool = False
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
    """Counts references while walking the tables of one image."""

    def __init__(self, driver: Qcow2Driver) -> None:
        self.driver = driver
        self.bits = driver.geometry.cluster_bits
        self.file_size = driver.children["file"].size
        self.result = References()
        self.next_contiguous = 0

    def add(self, offset: int, length: int, what: str, *, past_end: bool = False) -> None:
        if length <= 0:
            return
        if offset + length > self.file_size and not (past_end and offset < self.file_size):
            self.result.errors.append(f"ERROR {what} at offset {offset:#x} lies beyond the "
                                      "end of the image file")
            return
        for cluster in range(offset >> self.bits, ((offset + length - 1) >> self.bits) + 1):
            self.result.counts[cluster] += 1

    async def l1_table(self, l1: list[int], *, active: bool) -> None:
        driver = self.driver
        for l1_index, l1_entry in enumerate(l1):
            if l1_entry & L1E_RESERVED:
                self.result.errors.append("ERROR found L1 entry with reserved bits set: "
                                          f"{l1_entry:x}")
            l2_offset = l1_entry & L1E_OFFSET_MASK
            if not l2_offset:
                continue
            if l2_offset & (driver.cluster_size - 1) or \
                    l2_offset + driver.cluster_size > self.file_size:
                self.result.errors.append(f"ERROR L2 table offset {l2_offset:#x} (L1 index "
                                          f"{l1_index}) is unaligned or beyond the file")
                continue
            self.add(l2_offset, driver.cluster_size, "L2 table")
            table = await driver._l2_table(l2_offset)
            self.next_contiguous = 0        # as QEMU: fragmentation is per L2 table
            self.l2_table(table.entries, active=active)

    def l2_table(self, entries: Sequence[int], *, active: bool) -> None:
        driver = self.driver
        words = 2 if driver.geometry.extended_l2 else 1
        for index in range(0, len(entries), words):
            entry = entries[index]
            if entry & L2E_STANDARD_RESERVED and not entry & QCOW_OFLAG_COMPRESSED:
                self.result.errors.append("ERROR found l2 entry with reserved bits set: "
                                          f"{entry:x}")
            if entry & QCOW_OFLAG_COMPRESSED:
                host, most = compressed_range(entry, self.bits)
                self.add(host, most, "compressed cluster", past_end=True)
                if active:
                    self.result.allocated += 1
                    self.result.compressed += 1
                    self.result.fragmented += 1      # compressed clusters always are
                continue
            mapping = decode_entry(entry, zero_flag=driver.zero_flag)
            if mapping.type is ClusterType.UNALLOCATED or \
                    mapping.type is ClusterType.ZERO and not mapping.host_offset:
                continue
            if mapping.host_offset & (driver.cluster_size - 1):
                self._unaligned(entry, entries[index + 1] if words == 2 else 0)
            if not driver.has_data_file:
                # with subclusters QEMU writes only part of a cluster: the
                # file may end inside the last one
                self.add(mapping.host_offset, driver.cluster_size, "data cluster",
                         past_end=True)
            if active:
                self.result.allocated += 1
                if self.next_contiguous and mapping.host_offset != self.next_contiguous:
                    self.result.fragmented += 1
                self.next_contiguous = mapping.host_offset + driver.cluster_size


    def _unaligned(self, entry: int, bitmap: int) -> None:
        """QEMU's check_refcounts_l2: an unaligned host offset is one
        corruption (the cluster is still counted where it points)."""
        if self.driver.geometry.extended_l2:
            holds_data = bool(bitmap & BITMAP_ALL_ALLOCATED)
        else:
            holds_data = not entry & QCOW_OFLAG_ZERO
        kind = "Data" if holds_data else "Preallocated"
        self.result.errors.append(f"ERROR offset={entry & L2E_OFFSET_MASK:x}: {kind} cluster "
                                  "is not properly aligned; L2 entry corrupted.")


async def scan_references(driver: Qcow2Driver) -> References:
    """How many references each host cluster of the image file has."""
    header = driver.header
    file = driver.children["file"]
    walk = _Walk(driver)
    bits = header.cluster_bits
    walk.add(0, driver.cluster_size, "header")
    if driver.image.crypto_header is not None:
        walk.add(*driver.image.crypto_header, "LUKS header")
    walk.add(header.refcount_table_offset, header.refcount_table_clusters << bits,
             "refcount table")
    for entry in driver.refcounts.table:
        if entry:
            walk.add(entry & ~(driver.cluster_size - 1), driver.cluster_size,
                     "refcount block")
    walk.add(header.l1_table_offset, header.l1_size * 8, "L1 table")
    await walk.l1_table(driver.l1, active=True)
    await _bitmap_references(driver, walk)
    if header.nb_snapshots:
        walk.add(header.snapshots_offset, driver.snapshot_table_length, "snapshot table",
                 past_end=True)
        for snap in driver.snapshots:
            walk.add(snap.l1_table_offset, snap.l1_size * 8, "snapshot L1 table")
            l1 = unpack_table(await file.read(snap.l1_table_offset, snap.l1_size * 8))
            await walk.l1_table(l1, active=False)
    return walk.result


async def _bitmap_references(driver: Qcow2Driver, walk: _Walk) -> None:
    """The bitmap directory, tables and data clusters (spec: "Bitmaps")."""
    if driver.bitmaps is None:
        return
    walk.add(driver.bitmaps.bitmap_directory_offset, driver.bitmaps.bitmap_directory_size,
             "bitmap directory")
    file = driver.children["file"]
    for entry in await driver.bitmap_entries():
        length = entry.table_size * 8
        if entry.table_offset % driver.cluster_size or \
                entry.table_offset + length > file.size:
            walk.result.errors.append(f"ERROR bitmap table at {entry.table_offset:#x} is "
                                      "unaligned or beyond the end of the file")
            continue
        walk.add(entry.table_offset, length, "bitmap table")
        for table_entry in unpack_table(await file.read(entry.table_offset, length)):
            data_offset = table_entry & BME_TABLE_ENTRY_OFFSET_MASK
            if data_offset:
                walk.add(data_offset, driver.cluster_size, "bitmap data cluster")


async def check_image(driver: Qcow2Driver) -> CheckReport:
    """Compare stored refcounts with references, as qemu-img check does."""
    refs = await scan_references(driver)
    report = CheckReport(messages=list(refs.errors), corruptions=len(refs.errors),
                         allocated=refs.allocated, fragmented=refs.fragmented,
                         compressed=refs.compressed)
    report.total_clusters = -(-driver.size // driver.cluster_size)
    store = driver.refcounts
    file_clusters = -(-driver.children["file"].size // driver.cluster_size)
    highest = -1
    for cluster in range(file_clusters):
        stored, wanted = await store.get(cluster), refs.counts.get(cluster, 0)
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
    report.image_end_offset = (highest + 1) * driver.cluster_size
    await _check_copied_flags(driver, report)
    return report


async def _check_copied_flags(driver: Qcow2Driver, report: CheckReport) -> None:
    """Bit 63 of active L1 and L2 entries must say whether the refcount is 1."""
    for l1_index, entry, l2_offset, refcount in await _active_l2_tables(driver):
        if bool(entry & QCOW_OFLAG_COPIED) != (refcount == 1):
            report.corruptions += 1
            report.messages.append(f"ERROR OFLAG_COPIED L2 cluster: l1_index={l1_index} "
                                   f"l1_entry={entry:x} refcount={refcount}")
        for entry, refcount in await _data_entries(driver, l2_offset):
            if bool(entry & QCOW_OFLAG_COPIED) != (refcount == 1):
                report.corruptions += 1
                report.messages.append(f"ERROR OFLAG_COPIED data cluster: l2_entry={entry:x} "
                                       f"refcount={refcount}")


async def _active_l2_tables(driver: Qcow2Driver) -> list[tuple[int, int, int, int]]:
    file_size = driver.children["file"].size
    tables = []
    for l1_index, entry in enumerate(driver.l1):
        l2_offset = entry & L1E_OFFSET_MASK
        if l2_offset and not l2_offset & (driver.cluster_size - 1) and \
                l2_offset + driver.cluster_size <= file_size:
            refcount = await driver.refcounts.get(l2_offset >> driver.geometry.cluster_bits)
            tables.append((l1_index, entry, l2_offset, refcount))
    return tables


async def _data_entries(driver: Qcow2Driver, l2_offset: int) -> list[tuple[int, int]]:
    """(entry, refcount) of the standard entries with a host cluster."""
    if driver.has_data_file:
        return []
    table = await driver._l2_table(l2_offset)
    words = 2 if driver.geometry.extended_l2 else 1
    found = []
    for entry in table.entries[::words]:
        if entry & QCOW_OFLAG_COMPRESSED:
            continue
        mapping = decode_entry(entry, zero_flag=driver.zero_flag)
        if mapping.host_offset:
            refcount = await driver.refcounts.get(mapping.host_offset
                                                  >> driver.geometry.cluster_bits)
            found.append((entry, refcount))
    return found


async def rebuild_refcounts(driver: Qcow2Driver, *, leaks_only: bool = False) -> None:
    """Rewrite refcounts from the references (only lowering them when
    `leaks_only`, as ``check -r leaks``)."""
    refs = await scan_references(driver)
    store = driver.refcounts
    file_clusters = -(-driver.children["file"].size // driver.cluster_size)
    table_clusters = {entry >> driver.geometry.cluster_bits for entry in store.table if entry}
    start = driver.header.refcount_table_offset >> driver.geometry.cluster_bits
    table_clusters.update(range(start, start + driver.header.refcount_table_clusters))
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
    await driver.children["file"].flush()


async def fix_copied_flags(driver: Qcow2Driver) -> None:
    """Set bit 63 of active L1/L2 entries from the (rebuilt) refcounts."""
    for l1_index, entry, l2_offset, refcount in await _active_l2_tables(driver):
        wanted = (entry & ~QCOW_OFLAG_COPIED) | (QCOW_OFLAG_COPIED if refcount == 1 else 0)
        if wanted != entry:
            driver.l1[l1_index] = wanted
            driver.l1_dirty.add(l1_index)
        table = await driver._l2_table(l2_offset)
        words = 2 if driver.geometry.extended_l2 else 1
        changed = False
        for index in range(0, len(table.entries), words):
            old = table.entries[index]
            mapping = decode_entry(old, zero_flag=driver.zero_flag)
            if old & QCOW_OFLAG_COMPRESSED or not mapping.host_offset or driver.has_data_file:
                continue
            refcount = await driver.refcounts.get(mapping.host_offset
                                                  >> driver.geometry.cluster_bits)
            new = (old & ~QCOW_OFLAG_COPIED) | (QCOW_OFLAG_COPIED if refcount == 1 else 0)
            if new != old:
                table.entries[index] = new
                changed = True
        if changed:
            driver.l2_cache.mark_dirty(table)
    await driver._write_back()


# -- qemu-img check's output -----------------------------------------------------------


def exit_code(report: CheckReport) -> int:
    """qemu-img check: 0 clean, 1 check failed, 2 corruptions, 3 leaks only."""
    if report.check_errors:
        return 1
    if report.corruptions:
        return 2
    return 3 if report.leaks else 0


def report_json(report: CheckReport, filename: str) -> str:
    data: dict[str, Any] = {"image-end-offset": report.image_end_offset}
    if report.compressed:
        data["compressed-clusters"] = report.compressed
    data["total-clusters"] = report.total_clusters
    if report.leaks:
        data["leaks"] = report.leaks
    if report.corruptions:
        data["corruptions"] = report.corruptions
    data.update({"check-errors": report.check_errors,
                 "allocated-clusters": report.allocated, "filename": filename,
                 "format": "qcow2"})
    if report.fragmented:          # qemu-img leaves out the zero counts
        data["fragmented-clusters"] = report.fragmented
    return json.dumps(data, indent=4)


def report_human(report: CheckReport) -> str:
    lines = []
    if not (report.corruptions or report.leaks or report.check_errors):
        lines.append("No errors were found on the image.")
    if report.corruptions:
        lines += ["", f"{report.corruptions} errors were found on the image.",
                  "Data may be corrupted, or further writes to the image may corrupt it."]
    if report.leaks:
        lines += ["", f"{report.leaks} leaked clusters were found on the image.",
                  "This means waste of disk space, but no harm to data."]
    total = report.total_clusters or 1
    allocated = report.allocated or 1
    lines.append(f"{report.allocated}/{report.total_clusters} = "
                 f"{100.0 * report.allocated / total:.2f}% allocated, "
                 f"{100.0 * report.fragmented / allocated:.2f}% fragmented, "
                 f"{100.0 * report.compressed / allocated:.2f}% compressed clusters")
    lines.append(f"Image end offset: {report.image_end_offset}")
    return "\n".join(lines)
