"""A sparse extent's grain directory with its redundant copy kept in step.

Spec: libyal/libvmdk VMDK document, "Grain directory": with the redundant
grain table flag, a second directory (rgdOffset) names a second copy of
every grain table.  `TwoLevelMap` writes the primary tables (grain data
first, then the grain table entry, then, for a new table, the directory
entry after a flush); this subclass repeats each change in the redundant
tables afterwards, in the same order, so a crash leaves the primary copy
(the one QEMU and VMware read) consistent.
"""
from __future__ import annotations

import array
from typing import Any

from imgfs.mapped import TwoLevelMap


class MirroredMap(TwoLevelMap):
    """A `TwoLevelMap` whose grain tables have redundant copies."""

    def __init__(self, *, rgd: array.array[int], rgd_offset: int, **options: Any) -> None:
        super().__init__(**options)
        self.rgd = rgd
        self.rgd_offset = rgd_offset

    def table_offsets(self) -> set[int]:
        return super().table_offsets() | {entry * self.entry_unit for entry in self.rgd if entry}

    async def set_entries(self, guest_offset: int, values: list[int]) -> None:
        await super().set_entries(guest_offset, values)
        l1_index = self.l1_index(guest_offset)
        if l1_index >= len(self.rgd):
            return
        width = self.codec.width
        redundant = self.rgd[l1_index] * self.entry_unit
        if redundant:
            await self.file.write(redundant + self.l2_index(guest_offset) * width,
                                  self.codec.encode(values))
            return
        # a new grain table: its redundant copy whole, then the directory entry
        table = await self.l2_table(self.l1[l1_index] * self.entry_unit)
        redundant = await self.allocate(self.l2_bytes)
        await self.file.write(redundant, self.codec.encode(table.entries))
        await self.file.flush()
        self.rgd[l1_index] = redundant // self.entry_unit
        self.tables_changed()
        await self.file.write(self.rgd_offset + l1_index * width,
                              self.codec.encode([redundant // self.entry_unit]))
