"""Creating, deleting and reverting to qcow2 internal snapshots.

Spec: qemu/qemu docs/interop/qcow2.txt, "Snapshots": taking a snapshot
copies the active L1 table and adds one reference to every L2 table and
data cluster it reaches (so later writes copy them first); bit 63 (COPIED)
of the active tables then says "refcount is 1" again only where it is.

Crash safety: everything a new snapshot table points at (the L1 copy, the
raised refcounts) is on disk before the header switches to that table, and
references are dropped only after the header (or the active L1) no longer
holds them, so an interrupted operation can only leak clusters.
"""
from __future__ import annotations

import dataclasses
import struct
import time
from collections import Counter
from typing import TYPE_CHECKING

from imgfs.errors import InvalidImage, NoSpace, Unsupported, UsageError

from .cluster import L1E_OFFSET_MASK, QCOW_OFLAG_COPIED, pack_table, unpack_table
from .snapshot import NO_ICOUNT, V3_MIN_EXTRA, Snapshot, new_extra_data

if TYPE_CHECKING:
    from .driver import Qcow2Driver

#: header bytes 60..71: nb_snapshots, snapshots_offset
OFFSET_SNAPSHOTS = 60


async def _tree(driver: Qcow2Driver, l1: list[int]) -> Counter[int]:
    """References (cluster index -> count) an L1 table's tree holds."""
    bits = driver.geometry.cluster_bits
    words = 2 if driver.geometry.extended_l2 else 1
    counts: Counter[int] = Counter()
    for l1_entry in l1:
        l2_offset = l1_entry & L1E_OFFSET_MASK
        if not l2_offset:
            continue
        counts[l2_offset >> bits] += 1
        table = await driver._l2_table(l2_offset)
        for entry in table.entries[::words]:
            for host, count in driver._clusters_of(entry):
                for cluster in range(host >> bits, (host >> bits) + count):
                    counts[cluster] += 1
    return counts


async def _add_references(driver: Qcow2Driver, counts: Counter[int], sign: int) -> None:
    store = driver.refcounts
    if sign > 0:
        for cluster, count in counts.items():
            if await store.get(cluster) + count > store.geometry.max_refcount:
                raise NoSpace(f"refcount of cluster {cluster} would overflow "
                              f"{store.geometry.refcount_bits}-bit refcounts")
    for cluster, count in sorted(counts.items()):
        await store.update(cluster, 1, sign * count)


def _find(driver: Qcow2Driver, tag: str) -> Snapshot:
    for snap in driver.snapshots:
        if tag in (snap.id, snap.name):
            return snap
    raise InvalidImage(f"no snapshot with ID or name '{tag}'")


async def _read_l1(driver: Qcow2Driver, snap: Snapshot) -> list[int]:
    return unpack_table(await driver.children["file"].read(snap.l1_table_offset,
                                                           snap.l1_size * 8))


def _clusters(driver: Qcow2Driver, length: int) -> int:
    return -(-length // driver.cluster_size)


async def _write_table(driver: Qcow2Driver, snapshots: list[Snapshot]) -> None:
    """Write a new snapshot table, point the header at it, free the old one."""
    file = driver.children["file"]
    raw = b"".join(snap.pack() for snap in snapshots)
    new_offset = 0
    if raw:
        new_offset = await driver.refcounts.allocate(_clusters(driver, len(raw)))
        await file.write(new_offset, raw)
    await driver._write_back()
    await file.flush()
    old_offset, old_length = driver.header.snapshots_offset, driver.snapshot_table_length
    await driver._write_header_bytes(OFFSET_SNAPSHOTS,
                                     struct.pack(">IQ", len(snapshots), new_offset))
    driver.header = driver.header._replace(nb_snapshots=len(snapshots),
                                           snapshots_offset=new_offset)
    driver.snapshots, driver.snapshot_table_length = snapshots, len(raw)
    # (a table that ran past the end of the file, which only check -r all
    # rewrites, holds no clusters there to free)
    old_end = min(old_offset + old_length, file.size)
    if old_end > old_offset:
        await driver.refcounts.update(old_offset >> driver.geometry.cluster_bits,
                                      _clusters(driver, old_offset % driver.cluster_size
                                                + old_end - old_offset), -1)


async def rewrite_incomplete_table(driver: Qcow2Driver, messages: list[str]) -> int:
    """``check -r all``, as QEMU: a snapshot table with incomplete entries
    (cut off by the end of the file, or v3 entries without the VM state and
    disk sizes) is written anew, complete; a missing disk size becomes the
    image's, as QEMU reads it.  Returns how many entries were repaired,
    and says which in `messages`."""
    errors = driver.snapshot_errors
    if not errors:
        return 0
    messages += ["Repairing " + message.removeprefix("ERROR ") for message in errors]
    snapshots = [_complete(snap, driver.size)
                 if driver.version >= 3 and len(snap.extra) < V3_MIN_EXTRA else snap
                 for snap in driver.snapshots]
    await _write_table(driver, snapshots)
    driver.snapshot_errors = []
    return len(errors)


def _complete(snap: Snapshot, image_size: int) -> Snapshot:
    disk_size = image_size if snap.disk_size is None else snap.disk_size
    extra = new_extra_data(disk_size, vm_state_size=snap.vm_state_size, icount=NO_ICOUNT)
    return dataclasses.replace(snap, disk_size=disk_size, icount=None, extra=extra)


async def _clear_active_copied(driver: Qcow2Driver) -> None:
    """Every active table entry is shared with the new snapshot now."""
    words = 2 if driver.geometry.extended_l2 else 1
    for l1_index, l1_entry in enumerate(driver.l1):
        l2_offset = l1_entry & L1E_OFFSET_MASK
        if not l2_offset:
            continue
        driver.l1[l1_index] = l1_entry & ~QCOW_OFLAG_COPIED
        driver.l1_dirty.add(l1_index)
        table = await driver._l2_table(l2_offset)
        for index in range(0, len(table.entries), words):
            table.entries[index] &= ~QCOW_OFLAG_COPIED
        driver.l2_cache.changed(table, dirty=True)


async def create_snapshot(driver: Qcow2Driver, name: str) -> None:
    if driver.has_data_file:
        raise Unsupported("images with an external data file cannot have internal snapshots")
    if any(snap.name == name for snap in driver.snapshots):
        raise UsageError(f"a snapshot named '{name}' already exists")
    await driver._prepare_for_write()
    await driver._write_back()
    active = list(driver.l1)
    await _add_references(driver, await _tree(driver, active), +1)
    await _clear_active_copied(driver)
    l1_offset = 0
    if active:
        l1_offset = await driver.refcounts.allocate(_clusters(driver, len(active) * 8))
        await driver.children["file"].write(
            l1_offset, pack_table([entry & ~QCOW_OFLAG_COPIED for entry in active]))
    ids = [int(snap.id) for snap in driver.snapshots if snap.id.isdigit()]
    now = time.time_ns()
    snap = Snapshot(id=str(max(ids, default=0) + 1), name=name, l1_table_offset=l1_offset,
                    l1_size=len(active), date_sec=now // 10**9, date_nsec=now % 10**9,
                    vm_clock_nsec=0, vm_state_size=0, disk_size=driver.size, icount=0,
                    extra=new_extra_data(driver.size))
    await _write_table(driver, [*driver.snapshots, snap])


async def delete_snapshot(driver: Qcow2Driver, tag: str) -> None:
    snap = _find(driver, tag)
    await driver._prepare_for_write()
    await driver._write_back()
    snapshot_l1 = await _read_l1(driver, snap)
    await _write_table(driver, [other for other in driver.snapshots if other is not snap])
    tree = await _tree(driver, snapshot_l1)
    await _add_references(driver, tree, -1)
    if snap.l1_size:
        await driver.refcounts.update(snap.l1_table_offset >> driver.geometry.cluster_bits,
                                      _clusters(driver, snap.l1_size * 8), -1)
    for l1_entry in snapshot_l1:
        l2_offset = l1_entry & L1E_OFFSET_MASK
        if l2_offset and not await driver.refcounts.get(l2_offset
                                                        >> driver.geometry.cluster_bits):
            driver.l2_cache.drop(l2_offset)     # freed: never look it up again
    from .repair import fix_copied_flags  # (not loaded by every mount)
    await fix_copied_flags(driver)


async def apply_snapshot(driver: Qcow2Driver, tag: str) -> None:
    """Make the snapshot's contents (and disk size) the active ones."""
    snap = _find(driver, tag)
    await driver._prepare_for_write()
    await driver._write_back()
    snapshot_l1 = await _read_l1(driver, snap)
    if len(snapshot_l1) > len(driver.l1):
        await driver._grow_l1(len(snapshot_l1))
    await _add_references(driver, await _tree(driver, snapshot_l1), +1)
    await driver.refcounts.write_back()
    await driver.children["file"].flush()
    old_l1 = list(driver.l1)
    driver.l1 = [entry & ~QCOW_OFLAG_COPIED for entry in snapshot_l1] + \
        [0] * (len(driver.l1) - len(snapshot_l1))
    driver.l1_dirty.update(range(len(driver.l1)))
    await driver._write_back()
    await driver.children["file"].flush()
    if snap.disk_size is not None and snap.disk_size != driver.size:
        await driver._write_header_bytes(24, struct.pack(">Q", snap.disk_size))
        driver.header = driver.header._replace(size=snap.disk_size)
        driver.size = snap.disk_size
    await _add_references(driver, await _tree(driver, old_l1), -1)
    from .repair import fix_copied_flags  # (not loaded by every mount)
    await fix_copied_flags(driver)
