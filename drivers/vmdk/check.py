"""The VMDK consistency check, as qemu-img check does it.

QEMU checks that every grain a grain table names starts inside its extent
file; the first that does not ends the check with "ERROR: cluster offset
for sector N points after EOF" and a failed check.  It has no repair, and
no counts of leaks or allocated grains for VMDK.  A seSparse directory or
table entry of no known kind ends it with "ERROR: could not get
cluster_offset for sector N", as in QEMU.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from imgfs.check import CheckResult
from imgfs.errors import CorruptImage

from .layout import GTE_ZEROED, SECTOR, Geometry
from .sesparse import INVALID_GRAIN, INVALID_TABLE

if TYPE_CHECKING:
    from imgfs.mapped import TwoLevelMap
    from imgfs.node import Node

#: (guest start, table map, geometry, file) of each sparse extent
SparseExtent = tuple[int, "TwoLevelMap | None", "Geometry | None", "Node"]


async def check_extents(extents: list[SparseExtent]) -> CheckResult:
    result = CheckResult()
    try:
        for start, tables, geometry, file in extents:
            if tables is None or geometry is None:
                continue
            found = await first_bad_grain(start, tables, geometry, file.size)
            if found is not None:
                sector, past_eof = found
                if past_eof:
                    result.messages.append(f"ERROR: cluster offset for sector {sector} "
                                           "points after EOF")
                    result.failure = "Check failed: Invalid argument"
                else:
                    result.messages.append(f"ERROR: could not get cluster_offset for "
                                           f"sector {sector}")
                    result.failure = "Check failed: Operation not permitted"
                break
    except CorruptImage as exc:
        result.failure = f"Check failed: {exc}"
    return result


async def first_bad_grain(start: int, tables: TwoLevelMap, geometry: Geometry,
                          file_size: int) -> tuple[int, bool] | None:
    """(guest sector, past the end of the file) of the first grain that
    starts past the end of its file or whose entry (seSparse's translated
    directory or table entries) is invalid, if any."""
    for l1_index, gt_sector in enumerate(tables.l1):
        if not gt_sector:
            continue
        first = l1_index * geometry.gtes_per_gt
        if gt_sector >= INVALID_TABLE:
            return (start + first * geometry.grain_size) // SECTOR, False
        table = await tables.l2_table(gt_sector * SECTOR)
        for index, entry in enumerate(table.entries):
            if entry == 0 or (entry == GTE_ZEROED and geometry.zeroed_grains):
                continue
            if entry * SECTOR >= file_size:
                grain = first + index
                return (start + grain * geometry.grain_size) // SECTOR, \
                    entry < INVALID_GRAIN
    return None
