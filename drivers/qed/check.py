"""QED consistency check and repair (spec "Consistency checking").

Every cluster the header, the L1 table, the L2 tables and the data use is
marked, in L1 order, each table before its entries.  An entry that is
unaligned, inside the header or past the end of the file is a corruption
that a repair clears (the guest then sees the backing file, or zeros,
there); a cluster used twice is a corruption a repair cannot fix (an L2
table counts one per cluster already in use, and is then not walked); a
cluster of the file nobody uses is a leak, which QED has no way to give
back (as QEMU, a repair leaves it).  Allocated and
fragmented counts are qemu-img's: every non-zero data entry, and each one
not right after the previous one of its table.
"""
from __future__ import annotations

import array
from dataclasses import dataclass

from imgfs.check import CheckResult
from imgfs.node import Node

from .layout import CODEC, ZERO_CLUSTER, Geometry, Header, valid_cluster_offset


@dataclass(frozen=True, slots=True)
class Fix:
    """A damaged entry: the table holding it (L1 or an L2) and its index."""

    table_offset: int
    index: int


class _Scan:
    def __init__(self, geometry: Geometry, header: Header, file_size: int) -> None:
        self.geometry = geometry
        self.header_end = header.header_size * geometry.cluster_size
        self.file_size = file_size
        self.used = bytearray(file_size // geometry.cluster_size)
        self.result = CheckResult(total_clusters=geometry.total_clusters(header.image_size))
        self.fixes: list[Fix] = []

    def use(self, offset: int, length: int) -> int:
        """Mark the clusters used; return how many already were."""
        first = offset // self.geometry.cluster_size
        last = min(-(-(offset + length) // self.geometry.cluster_size), len(self.used))
        before = self.used[first:last].count(1)
        self.used[first:last] = b"\1" * (last - first)
        return before

    def valid_table(self, offset: int) -> bool:
        return valid_cluster_offset(offset, self.geometry, self.header_end, self.file_size) \
            and offset + self.geometry.table_bytes <= self.file_size

    def l2_table(self, table_offset: int, entries: array.array[int]) -> None:
        result = self.result
        cluster_size = self.geometry.cluster_size
        last = 0
        for index, entry in enumerate(entries):
            if entry == 0 or entry == ZERO_CLUSTER:
                continue
            result.allocated_clusters += 1
            if last and entry != last + cluster_size:
                result.fragmented_clusters += 1
            last = entry
            if not valid_cluster_offset(entry, self.geometry, self.header_end,
                                        self.file_size):
                result.corruptions += 1
                self.fixes.append(Fix(table_offset, index))
            elif self.use(entry, cluster_size):
                result.corruptions += 1


async def scan(file: Node, geometry: Geometry, header: Header,
               l1: array.array[int]) -> tuple[CheckResult, list[Fix]]:
    """Walk the tables; return qemu-img's counts and the entries to clear."""
    walk = _Scan(geometry, header, file.size)
    walk.use(0, walk.header_end)
    walk.use(header.l1_table_offset, geometry.table_bytes)
    for index, l2_offset in enumerate(l1):
        if not l2_offset:
            continue
        if not walk.valid_table(l2_offset):
            walk.result.corruptions += 1
            walk.fixes.append(Fix(header.l1_table_offset, index))
            continue
        collisions = walk.use(l2_offset, geometry.table_bytes)
        if collisions:
            # as QEMU: each cluster in use already is a corruption, and the
            # table is not walked (its entries are not to be trusted)
            walk.result.corruptions += collisions
            continue
        walk.l2_table(l2_offset, CODEC.decode(await file.read(l2_offset,
                                                             geometry.table_bytes)))
    walk.result.leaks = walk.used.count(0)
    return walk.result, walk.fixes


async def clear_entries(file: Node, fixes: list[Fix]) -> None:
    """Repair: each damaged entry becomes 0 (unallocated)."""
    zero = CODEC.encode([0])
    for fix in fixes:
        await file.write(fix.table_offset + fix.index * len(zero), zero)
    await file.flush()
