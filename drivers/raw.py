"""`raw`: the image is the bytes of its file, optionally a window of it.

QEMU's `offset` and `size` open options select a window (for example one
partition of a disk image).  As in QEMU, a raw format that was *probed*
rather than named refuses writes to its first sector that would make the
image look like another format next time (a guest could otherwise turn a
raw disk into a qcow2 header that points at host files).
"""
from __future__ import annotations

from typing import Any

from imgfs.block import BlockDriver, Extent, Kind, Measurement, MeasureSource
from imgfs.errors import InvalidImage, PermissionDenied
from imgfs.node import OpenContext
from imgfs.options import Bool, Opt, Schema, Size

from .file import PREALLOC

SECTOR = 512


class RawDriver(BlockDriver):
    name = "raw"
    kind = Kind.FORMAT
    description = "the disk's bytes as they are (with offset/size windows)"
    open_opts = Schema(
        Opt("offset", Size, default=0, help="start of the window in the file"),
        Opt("size", Size, help="length of the window (default: to the end of the file)"),
    )
    create_opts = Schema(
        Opt("preallocation", PREALLOC, default="off",
            help="off: sparse; falloc: reserve space; full: write zeros"),
        Opt("nocow", Bool, default=False, help="turn off copy-on-write (btrfs)"),
    )

    offset = 0
    window_fixed = False

    @staticmethod
    def probe(head: bytes, filename: str) -> int:
        return 1          # anything is raw, but everything else wins

    async def open(self, options: dict[str, Any], ctx: OpenContext) -> None:
        file_size = self.children["file"].size
        self.offset = options["offset"]
        if self.offset > file_size:
            raise InvalidImage(f"offset {self.offset} is beyond the end of the "
                               f"{file_size}-byte file")
        if options["size"] is None:
            self.size = file_size - self.offset
        else:
            self.size = options["size"]
            self.window_fixed = True
            if self.offset + self.size > file_size:
                raise InvalidImage(f"offset {self.offset} + size {self.size} is beyond "
                                   f"the end of the {file_size}-byte file")
        self.request_alignment = self.children["file"].driver.request_alignment
        self.can_resize = not self.window_fixed and not self.offset and \
            self.children["file"].driver.can_resize

    async def read(self, offset: int, length: int) -> bytes:
        return await self.children["file"].read(self.offset + offset, length)

    async def write(self, offset: int, data: bytes) -> None:
        if offset < SECTOR and self.node.probed and not self.offset:
            self._refuse_format_header(offset, data)
        await self.children["file"].write(self.offset + offset, data)

    def _refuse_format_header(self, offset: int, data: bytes) -> None:
        from imgfs.registry import probe_format
        head = data[:SECTOR - offset]
        if offset:
            return      # a partial first-sector write cannot form a whole header
        if probe_format(head, self.node.filename).name != "raw":
            raise PermissionDenied("refusing to write a format header into sector 0 of "
                                   "a probed raw image (give format=raw to allow it)")

    async def write_zeroes(self, offset: int, length: int, *, may_unmap: bool = False) -> None:
        await self.children["file"].write_zeroes(self.offset + offset, length, may_unmap=may_unmap)

    async def discard(self, offset: int, length: int) -> None:
        await self.children["file"].discard(self.offset + offset, length)

    async def block_status(self, offset: int, length: int) -> Extent:
        extent = await self.children["file"].block_status(self.offset + offset, length)
        return Extent(extent.length, extent.status, self.offset + offset)

    async def truncate(self, size: int, preallocation: str = "off") -> None:
        await self.children["file"].truncate(size, preallocation)
        self.size = size

    @classmethod
    def measure(cls, size: int, options: dict[str, Any],
                source: MeasureSource | None) -> Measurement:
        """A raw image is its disk: unallocated sectors count too."""
        total = source.size if source is not None else -(-size // SECTOR) * SECTOR
        return Measurement(total, total)

    @classmethod
    async def create(cls, target: Any, size: int, options: dict[str, Any],
                     ctx: OpenContext) -> None:
        from imgfs.graph import create_protocol_file
        node = await create_protocol_file(str(target), ctx, size=size, options=options)
        await node.aclose()


DRIVERS = [RawDriver]
