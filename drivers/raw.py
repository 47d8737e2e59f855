"""`raw`: the image is the bytes of its file, optionally a window of it.

QEMU's `offset` and `size` open options select a window (for example one
partition of a disk image).

As in QEMU, a raw format that was *probed* rather than named refuses (EPERM)
a write that would make the image probe as another format next time: a
guest could otherwise turn a raw disk into a qcow2 header or a VMDK
descriptor that names host files as its backing or extents.  A write is
judged by what probing will read after it, old bytes merged with new, so a
header cut into several writes is caught by the write that completes it.
Judged are the bytes probing reads: the first `HEAD_BYTES` (QEMU judges only
the first sector, because that is all it probes) and, when the image ends at
the file's end, the last `TAIL_BYTES`, where imgfs (unlike QEMU) finds a fixed
VHD's footer or a DMG's trailer.  Zeroing and discarding are judged as writes
of zeros; resizing is not judged.
"""
from __future__ import annotations

import errno
from typing import Any

import trio

from imgfs.block import BlockDriver, Extent, Kind, Measurement, MeasureSource
from imgfs.errors import InvalidImage, PermissionDenied
from imgfs.node import OpenContext
from imgfs.options import Bool, Opt, Schema, Size
from imgfs.registry import probe_name
from imgfs.signatures import HEAD_BYTES, TAIL_BYTES

from .file import PREALLOC

#: qemu-img measure rounds a raw image's size up to whole sectors
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
    #: serialises the writes that reach the bytes probing reads, so that two
    #: of them cannot each pass alone and form a header together
    probe_guard: trio.Lock

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
        self.sector_size = self.children["file"].sector_size
        self.can_resize = not self.window_fixed and not self.offset and \
            self.children["file"].driver.can_resize
        self.probe_guard = trio.Lock()

    async def read(self, offset: int, length: int) -> bytes:
        return await self.children["file"].read(self.offset + offset, length)

    async def write(self, offset: int, data: bytes) -> None:
        if not self._reaches_probed_bytes(offset, len(data)):
            await self.children["file"].write(self.offset + offset, data)
            return
        async with self.probe_guard:
            await self._refuse_new_format(offset, len(data), data)
            await self.children["file"].write(offset, data)

    async def write_parts(self, offset: int, parts: tuple[bytes, ...]) -> None:
        length = sum(map(len, parts))
        if self._reaches_probed_bytes(offset, length):
            await self.write(offset, b"".join(parts))
            return
        await self.children["file"].write_parts(self.offset + offset, parts)

    async def write_zeroes(self, offset: int, length: int, *, may_unmap: bool = False) -> None:
        if not self._reaches_probed_bytes(offset, length):
            await self.children["file"].write_zeroes(self.offset + offset, length,
                                                     may_unmap=may_unmap)
            return
        async with self.probe_guard:
            await self._refuse_new_format(offset, length, None)
            await self.children["file"].write_zeroes(offset, length, may_unmap=may_unmap)

    async def discard(self, offset: int, length: int) -> None:
        if not self._reaches_probed_bytes(offset, length):
            await self.children["file"].discard(self.offset + offset, length)
            return
        async with self.probe_guard:
            await self._refuse_new_format(offset, length, None)
            await self.children["file"].discard(offset, length)

    # -- the probed-raw guard (`offset` is 0 below: only then does it apply) ---------

    def _probed_windows(self) -> list[tuple[int, int, bool]]:
        """(start, end, is_tail) of the bytes probing reads: the head, and the
        tail when this node ends where the file ends."""
        windows = [(0, min(self.size, HEAD_BYTES), False)]
        if not self.window_fixed:
            windows.append((max(0, self.size - TAIL_BYTES), self.size, True))
        return windows

    def _reaches_probed_bytes(self, offset: int, length: int) -> bool:
        """Whether a request meets `_probed_windows` (on every write: cheap)."""
        if not self.node.probed or self.offset or length <= 0:
            return False
        return offset < HEAD_BYTES or \
            (not self.window_fixed and offset + length > self.size - TAIL_BYTES)

    async def _refuse_new_format(self, offset: int, length: int, data: bytes | None) -> None:
        """EPERM if, after writing `data` (None: zeros) at `offset`, probing
        would find another format in the bytes it reads."""
        for start, end, is_tail in self._probed_windows():
            if not overlaps(start, end, offset, length):
                continue
            old = await self.children["file"].read(start, end - start)
            new = merged_window(old, start, offset, length, data)
            head, tail = (b"", new) if is_tail else (new, b"")
            claimed = probe_name(head, self.node.filename, tail)
            if claimed != "raw":
                raise PermissionDenied(
                    f"refusing a write that would make this probed raw image look like "
                    f"{claimed} (give format=raw to allow it)", errno_=errno.EPERM)

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


def overlaps(start: int, end: int, offset: int, length: int) -> bool:
    """Whether [offset, offset + length) meets [start, end)."""
    return offset < end and start < offset + length and length > 0


def merged_window(old: bytes, start: int, offset: int, length: int,
                  data: bytes | None) -> bytes:
    """What the bytes `old`, found at `start`, hold after `length` bytes are
    written at `offset`: `data`, or zeros when `data` is None."""
    window = bytearray(old)
    low, high = max(offset, start), min(offset + length, start + len(old))
    if low < high:
        window[low - start:high - start] = (bytes(high - low) if data is None
                                            else data[low - offset:high - offset])
    return bytes(window)


DRIVERS = [RawDriver]
