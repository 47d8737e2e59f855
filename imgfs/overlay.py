"""A throw-away write overlay for ``-o snapshot`` (QEMU's ``-snapshot``).

The image below is opened read-only; writes land in an unlinked temporary
file at the same offsets, and a bitmap of 64 KiB granules says which parts
of it are valid.  Everything the overlay does not hold is reported as not
allocated, so the core reads it from the image below (its backing node),
exactly as for any format with a backing file.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any

import trio

from .block import DATA, UNALLOCATED, BlockDriver, Extent, Kind
from .node import Node, OpenContext

GRANULE = 64 * 1024


class SnapshotOverlay(BlockDriver):
    name = "snapshot"
    kind = Kind.FORMAT
    supports_backing = True

    fd = -1

    async def open(self, options: dict[str, Any], ctx: OpenContext) -> None:
        raise NotImplementedError("use SnapshotOverlay.wrap")

    @classmethod
    def wrap(cls, base: Node) -> Node:
        driver = cls()
        node = Node(driver, base.filename, False, base.ctx)
        driver.children["backing"] = base
        driver.size = base.size
        directory = os.environ.get("TMPDIR") or "/var/tmp"
        with tempfile.TemporaryFile(dir=directory, prefix="imgfs-snapshot-") as temp:
            driver.fd = os.dup(temp.fileno())     # the file is already unlinked
        driver.allocated = bytearray(-(-base.size // GRANULE))
        driver.lock = trio.Lock()
        return node

    allocated: bytearray
    lock: trio.Lock

    async def block_status(self, offset: int, length: int) -> Extent:
        index = offset // GRANULE
        state = self.allocated[index]
        end = min(offset + length, self.size)
        boundary = (index + 1) * GRANULE
        while boundary < end and self.allocated[boundary // GRANULE] == state:
            boundary += GRANULE
        return Extent(min(boundary, end) - offset, DATA if state else UNALLOCATED)

    async def read_data(self, offset: int, length: int, extent: Extent) -> bytes:
        data = os.pread(self.fd, length, offset)
        return data.ljust(length, b"\0")

    async def write(self, offset: int, data: bytes) -> None:
        async with self.lock:
            first = offset // GRANULE
            last = (offset + len(data) - 1) // GRANULE
            for index in {first, last}:
                await self._copy_up(index, offset, offset + len(data))
            os.pwrite(self.fd, data, offset)
            for index in range(first, last + 1):
                self.allocated[index] = 1

    async def _copy_up(self, index: int, start: int, end: int) -> None:
        """Fill a granule the write covers only partly from the image below."""
        granule_start = index * GRANULE
        granule_end = min(granule_start + GRANULE, self.size)
        if self.allocated[index] or (start <= granule_start and end >= granule_end):
            return
        old = await self.node.read_unallocated(granule_start, granule_end - granule_start)
        os.pwrite(self.fd, old, granule_start)
        self.allocated[index] = 1

    def allocated_bytes(self) -> int | None:
        return self.children["backing"].allocated_bytes()

    async def aclose(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)
