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
    from .metadata import Qcow2Metadata

#: header bytes 60..71: nb_snapshots, snapshots_offset
OFFSET_SNAPSHOTS = 60


async def _tree(meta: Qcow2Metadata, l1: list[int]) -> Counter[int]:
    """References (cluster index -> count) an L1 table's tree holds."""
    bits = meta.geometry.cluster_bits
    words = 2 if meta.geometry.extended_l2 else 1
    counts: Counter[int] = Counter()
    for l1_entry in l1:
        l2_offset = l1_entry & L1E_OFFSET_MASK
        if not l2_offset:
            continue
        counts[l2_offset >> bits] += 1
        table = await meta.l2_table(l2_offset)
        for entry in table.entries[::words]:
            for host, count in meta.clusters_of(entry):
                for cluster in range(host >> bits, (host >> bits) + count):
                    counts[cluster] += 1
    return counts


async def _add_references(meta: Qcow2Metadata, counts: Counter[int], sign: int) -> None:
    store = meta.refcounts
    if sign > 0:
        for cluster, count in counts.items():
            if await store.get(cluster) + count > store.geometry.max_refcount:
                raise NoSpace(f"refcount of cluster {cluster} would overflow "
                              f"{store.geometry.refcount_bits}-bit refcounts")
    for cluster, count in sorted(counts.items()):
        await store.update(cluster, 1, sign * count)


def _find(meta: Qcow2Metadata, tag: str) -> Snapshot:
    for snap in meta.snapshots:
        if tag in (snap.id, snap.name):
            return snap
    raise InvalidImage(f"no snapshot with ID or name '{tag}'")


async def _read_l1(meta: Qcow2Metadata, snap: Snapshot) -> list[int]:
    return unpack_table(await meta.children["file"].read(snap.l1_table_offset,
                                                         snap.l1_size * 8))


def _clusters(meta: Qcow2Metadata, length: int) -> int:
    return -(-length // meta.cluster_size)


async def _write_table(meta: Qcow2Metadata, snapshots: list[Snapshot]) -> None:
    """Write a new snapshot table, point the header at it, free the old one."""
    file = meta.children["file"]
    raw = b"".join(snap.pack() for snap in snapshots)
    new_offset = 0
    if raw:
        new_offset = await meta.refcounts.allocate(_clusters(meta, len(raw)))
        await file.write(new_offset, raw)
    await meta.write_back()
    await file.flush()
    old_offset, old_length = meta.header.snapshots_offset, meta.snapshot_table_length
    await meta.write_header_bytes(OFFSET_SNAPSHOTS,
                                  struct.pack(">IQ", len(snapshots), new_offset))
    meta.header = meta.header._replace(nb_snapshots=len(snapshots),
                                       snapshots_offset=new_offset)
    meta.snapshots, meta.snapshot_table_length = snapshots, len(raw)
    # (a table that ran past the end of the file, which only check -r all
    # rewrites, holds no clusters there to free)
    old_end = min(old_offset + old_length, file.size)
    if old_end > old_offset:
        await meta.refcounts.update(old_offset >> meta.geometry.cluster_bits,
                                    _clusters(meta, old_offset % meta.cluster_size
                                                + old_end - old_offset), -1)


async def rewrite_incomplete_table(meta: Qcow2Metadata, messages: list[str]) -> int:
    """``check -r all``, as QEMU: a snapshot table with incomplete entries
    (cut off by the end of the file, or v3 entries without the VM state and
    disk sizes) is written anew, complete; a missing disk size becomes the
    image's, as QEMU reads it.  Returns how many entries were repaired,
    and says which in `messages`."""
    errors = meta.snapshot_errors
    if not errors:
        return 0
    messages += ["Repairing " + message.removeprefix("ERROR ") for message in errors]
    snapshots = [_complete(snap, meta.size)
                 if meta.version >= 3 and len(snap.extra) < V3_MIN_EXTRA else snap
                 for snap in meta.snapshots]
    await _write_table(meta, snapshots)
    meta.snapshot_errors = []
    return len(errors)


def _complete(snap: Snapshot, image_size: int) -> Snapshot:
    disk_size = image_size if snap.disk_size is None else snap.disk_size
    extra = new_extra_data(disk_size, vm_state_size=snap.vm_state_size, icount=NO_ICOUNT)
    return dataclasses.replace(snap, disk_size=disk_size, icount=None, extra=extra)


async def _clear_active_copied(meta: Qcow2Metadata) -> None:
    """Every active table entry is shared with the new snapshot now."""
    words = 2 if meta.geometry.extended_l2 else 1
    for l1_index, l1_entry in enumerate(meta.l1):
        l2_offset = l1_entry & L1E_OFFSET_MASK
        if not l2_offset:
            continue
        meta.l1[l1_index] = l1_entry & ~QCOW_OFLAG_COPIED
        meta.l1_dirty.add(l1_index)
        table = await meta.l2_table(l2_offset)
        for index in range(0, len(table.entries), words):
            table.entries[index] &= ~QCOW_OFLAG_COPIED
        meta.l2_cache.changed(table, dirty=True)


async def create_snapshot(meta: Qcow2Metadata, name: str) -> None:
    if meta.has_data_file:
        raise Unsupported("images with an external data file cannot have internal snapshots")
    if any(snap.name == name for snap in meta.snapshots):
        raise UsageError(f"a snapshot named '{name}' already exists")
    await meta.prepare_for_write()
    await meta.write_back()
    active = list(meta.l1)
    await _add_references(meta, await _tree(meta, active), +1)
    await _clear_active_copied(meta)
    l1_offset = 0
    if active:
        l1_offset = await meta.refcounts.allocate(_clusters(meta, len(active) * 8))
        await meta.children["file"].write(
            l1_offset, pack_table([entry & ~QCOW_OFLAG_COPIED for entry in active]))
    ids = [int(snap.id) for snap in meta.snapshots if snap.id.isdigit()]
    now = time.time_ns()
    snap = Snapshot(id=str(max(ids, default=0) + 1), name=name, l1_table_offset=l1_offset,
                    l1_size=len(active), date_sec=now // 10**9, date_nsec=now % 10**9,
                    vm_clock_nsec=0, vm_state_size=0, disk_size=meta.size, icount=0,
                    extra=new_extra_data(meta.size))
    await _write_table(meta, [*meta.snapshots, snap])


async def delete_snapshot(meta: Qcow2Metadata, tag: str) -> None:
    snap = _find(meta, tag)
    await meta.prepare_for_write()
    await meta.write_back()
    snapshot_l1 = await _read_l1(meta, snap)
    await _write_table(meta, [other for other in meta.snapshots if other is not snap])
    tree = await _tree(meta, snapshot_l1)
    await _add_references(meta, tree, -1)
    if snap.l1_size:
        await meta.refcounts.update(snap.l1_table_offset >> meta.geometry.cluster_bits,
                                    _clusters(meta, snap.l1_size * 8), -1)
    for l1_entry in snapshot_l1:
        l2_offset = l1_entry & L1E_OFFSET_MASK
        if l2_offset and not await meta.refcounts.get(l2_offset
                                                      >> meta.geometry.cluster_bits):
            meta.l2_cache.drop(l2_offset)     # freed: never look it up again
    from .repair import fix_copied_flags  # (not loaded by every mount)
    await fix_copied_flags(meta)


async def apply_snapshot(meta: Qcow2Metadata, tag: str) -> None:
    """Make the snapshot's contents (and disk size) the active ones."""
    snap = _find(meta, tag)
    await meta.prepare_for_write()
    await meta.write_back()
    snapshot_l1 = await _read_l1(meta, snap)
    if len(snapshot_l1) > len(meta.l1):
        await meta.grow_l1(len(snapshot_l1))
    await _add_references(meta, await _tree(meta, snapshot_l1), +1)
    await meta.refcounts.write_back()
    await meta.children["file"].flush()
    old_l1 = list(meta.l1)
    meta.l1 = [entry & ~QCOW_OFLAG_COPIED for entry in snapshot_l1] + \
        [0] * (len(meta.l1) - len(snapshot_l1))
    meta.l1_dirty.update(range(len(meta.l1)))
    await meta.write_back()
    await meta.children["file"].flush()
    if snap.disk_size is not None and snap.disk_size != meta.size:
        await meta.write_header_bytes(24, struct.pack(">Q", snap.disk_size))
        meta.header = meta.header._replace(size=snap.disk_size)
        meta.size = snap.disk_size
    await _add_references(meta, await _tree(meta, old_l1), -1)
    from .repair import fix_copied_flags  # (not loaded by every mount)
    await fix_copied_flags(meta)
