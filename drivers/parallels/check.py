"""The consistency check and repair of a Parallels image, with qemu-img's
counts and words.

Findings, in QEMU's order: the image was not closed correctly (in_use
set: a corruption, fixed by `-r all`); a catalog entry whose cluster lies
outside the file (or, as the spec forbids, before the data area): a
corruption, cleared by `-r all`; space past the end of the last cluster:
leaked clusters, cut off by `-r leaks` or `-r all`.  Allocated clusters
are the non-zero entries, fragmented ones those not right after the
previous entry (an unallocated entry between breaks no run), and the
image end offset is the end of the last cluster (at least the start of
the data area; with data_off 0, QEMU rounds the catalog's end up to a
whole cluster for it).
"""
from __future__ import annotations

import array
from dataclasses import dataclass, field

from imgfs.check import CheckResult
from imgfs.mapped import align_up

from .catalog import Catalog
from .layout import SECTOR


@dataclass
class Findings:
    result: CheckResult
    data_end: int
    #: catalog indexes of entries outside the image
    bad_entries: list[int] = field(default_factory=list)


def _verb(fixing: bool) -> str:
    return "Repairing" if fixing else "ERROR"


class _Walk:
    def __init__(self, catalog: Catalog, file_size: int) -> None:
        geometry = catalog.geometry
        self.catalog = catalog
        self.file_size = file_size
        self.findings = Findings(CheckResult(total_clusters=geometry.total_clusters()),
                                 geometry.empty_end)
        self.previous = 0

    def outside(self, host_offset: int) -> bool:
        geometry = self.catalog.geometry
        return host_offset < geometry.data_start or \
            host_offset + geometry.cluster_size > self.file_size

    def page(self, first: int, entries: array.array[int], fix_errors: bool) -> None:
        geometry = self.catalog.geometry
        findings, result = self.findings, self.findings.result
        for slot, entry in enumerate(entries):
            if not entry:
                self.previous = 0
                continue
            host_offset = geometry.host_offset(entry)
            if self.outside(host_offset):
                result.corruptions += 1
                result.messages.append(f"{_verb(fix_errors)} cluster {first + slot} is "
                                       "outside image")
                findings.bad_entries.append(first + slot)
                if fix_errors:
                    self.previous = 0
                    continue
            result.allocated_clusters += 1
            if self.previous and self.previous + geometry.cluster_size != host_offset:
                result.fragmented_clusters += 1
            self.previous = host_offset
            findings.data_end = max(findings.data_end, host_offset + geometry.cluster_size)


async def scan(catalog: Catalog, *, unclean: bool, fix_errors: bool,
               fix_leaks: bool) -> Findings:
    """One pass over the header and the catalog; qemu-img's counts and
    lines, and what a repair is to clear or cut."""
    # (QEMU measures the file in whole sectors)
    walk = _Walk(catalog, align_up(catalog.file.size, SECTOR))
    result = walk.findings.result
    if unclean:
        result.corruptions += 1
        result.messages.append(f"{_verb(fix_errors)} image was not closed correctly")
    async for first, entries in catalog.allocated_pages():
        walk.page(first, entries, fix_errors)
    data_end = walk.findings.data_end
    result.image_end_offset = data_end
    if walk.file_size > data_end:
        leaked = walk.file_size - data_end
        result.leaks = -(-leaked // catalog.geometry.cluster_size)
        result.messages.append(f"{_verb(fix_leaks)} space leaked at the end of the image "
                               f"{leaked}")
    return walk.findings


async def clear_entries(catalog: Catalog, indexes: list[int]) -> None:
    """Repair: each entry outside the image becomes 0 (unallocated)."""
    for index in indexes:
        await catalog.set_run(index, 1, 0)
