"""The VDI driver: open, the mapped layer's hooks, the parent of a
differencing image, check, create.

VDI is a one-level block map on `imgfs.mapped`: the layer reads
(host-contiguous runs become one read by the core), writes in place or
into new blocks appended to the data area with copy-on-write from the
parent, and turns whole-block zero writes over a parent's data into zero
entries.
"""
from __future__ import annotations

import logging
import os
import struct
from typing import Any

from imgfs.block import DATA, ChildRef, Extent, Kind, Status
from imgfs.check import CheckResult
from imgfs.errors import CorruptImage, InvalidImage, NoSpace, Unsupported, UsageError
from imgfs.mapped import MapKind, MappedDriver, Mapping, create_image_file
from imgfs.node import OpenContext

from .blockmap import BlockMap
from .layout import (
    BLOCK_ZERO,
    CREATE_OPTS,
    HEADER,
    OFFSET_BLOCKS_ALLOCATED,
    Header,
    Parent,
    check_create_options,
    check_header,
    new_image,
    uuid_text,
    virtual_size,
)
from .layout import probe as probe_header
from .parent import HOW_TO_NAME, find_parent, search_folders

log = logging.getLogger("imgfs")


class VdiDriver(MappedDriver):
    name = "vdi"
    kind = Kind.FORMAT
    supports_backing = True
    can_check = True
    can_repair = False          # as qemu-img: VDI has a check, but no repair
    description = ("VirtualBox disk image: static, dynamic and differencing "
                   "(read, write, create, check)")
    create_opts = CREATE_OPTS
    zero_blocks = True
    #: as QEMU: a block past the end of a truncated file reads as zeros
    past_eof_reads_zero = True

    header: Header
    block_map: BlockMap
    #: where the next new block goes, and how many entries hold a block:
    #: both from one scan of the map (at a read-write open; None before)
    next_block: int | None = None
    used_blocks: int = 0
    #: the parent's file name, as found or as given
    parent_name: str | None = None

    @staticmethod
    def probe(head: bytes, filename: str) -> int:
        return probe_header(head, filename)

    # -- opening -------------------------------------------------------------------------

    async def open(self, options: dict[str, Any], ctx: OpenContext) -> None:
        file = self.children["file"]
        header = Header.unpack(await file.read(0, min(file.size, HEADER.size)))
        self.geometry = check_header(header, file.size)
        if header.differencing and header.uuid_link == header.uuid_image:
            raise InvalidImage(f"VDI image {{{uuid_text(header.uuid_image)}}} names itself "
                               "as its parent")
        self.header = header
        self.size = virtual_size(header)
        self.setup_mapping(header.block_size)
        # a free block of a base image reads as zeros; of a child, as its parent
        free = MapKind.UNALLOCATED if header.differencing else MapKind.ZERO
        self.block_map = BlockMap(file, self.geometry, free=free)
        if not self.node.read_only and file.driver.writable and not ctx.check:
            await self._count_blocks()

    async def _count_blocks(self) -> None:
        """Before the first write: where new blocks go, and the header's
        count of allocated blocks made right if a crash left it behind the
        map (the one step of an allocation that may be missing)."""
        self.used_blocks, self.next_block = await self.block_map.scan()
        if self.used_blocks != self.header.blocks_allocated:
            log.warning("%s: the header counted %d allocated blocks, the block map %d: "
                        "corrected", self.node.filename, self.header.blocks_allocated,
                        self.used_blocks)
            await self._write_blocks_allocated()

    async def _write_blocks_allocated(self) -> None:
        await self.children["file"].write(OFFSET_BLOCKS_ALLOCATED,
                                          struct.pack("<I", self.used_blocks))
        self.header = self.header._replace(blocks_allocated=self.used_blocks)

    def child_refs(self) -> dict[str, ChildRef]:
        if not self.header.differencing:
            return {}
        return {"backing": ChildRef(self.parent_name or "", "vdi",
                                    locate=self._locate_parent)}

    async def _locate_parent(self) -> str:
        file = self.children["file"]
        if file.driver.name != "file":
            raise Unsupported(f"the parent of a differencing VDI on {file.driver.name} "
                              f"cannot be searched for; {HOW_TO_NAME}")
        self.parent_name = find_parent(file.filename, self.header.uuid_link)
        return self.parent_name

    async def attach(self) -> None:
        """The parent, found or given, must be the one the image links to."""
        parent = self.children.get("backing")
        if parent is None:
            return
        if self.parent_name is None:
            self.parent_name = parent.filename
        if not isinstance(parent.driver, VdiDriver):
            return                  # (a parent of another format has no VDI UUIDs)
        theirs, ours = parent.driver.header, self.header
        if theirs.uuid_image != ours.uuid_link:
            raise InvalidImage(f"parent {parent.filename} is VDI "
                               f"{{{uuid_text(theirs.uuid_image)}}}, but this image's "
                               f"parent is {{{uuid_text(ours.uuid_link)}}}")
        if theirs.uuid_last_modify != ours.uuid_parent_modify:
            log.warning("%s: the parent %s was modified after this differencing image "
                        "was made from it", self.node.filename, parent.filename)

    # -- the mapped layer's hooks -------------------------------------------------------------

    async def lookup(self, offset: int, length: int) -> Mapping:
        return await self.block_map.lookup(offset, length)

    async def block_status(self, offset: int, length: int) -> Extent:
        """As QEMU, a static image's blocks are looked through to the file:
        where the file has a hole, they read as zeros."""
        extent = await super().block_status(offset, length)
        if not self.header.static or extent.host_offset is None:
            return extent
        hole = await self.children["file"].block_status(extent.host_offset, extent.length)
        count = min(hole.length, extent.length)
        if hole.status & Status.ZERO:
            return Extent(count, DATA | Status.ZERO, extent.host_offset)
        return Extent(count, DATA, extent.host_offset)

    async def allocate(self, length: int) -> int:
        """The next block numbers after the highest in use: new blocks go
        at the end of the data area, over whatever a crash left there."""
        if self.next_block is None:
            await self._count_blocks()
        assert self.next_block is not None
        count = length // self.block_size
        if self.next_block + count > self.geometry.blocks:
            raise NoSpace(f"no free VDI block number left (the block map uses numbers up "
                          f"to {self.next_block - 1} of {self.geometry.blocks})")
        host_offset = self.geometry.host_offset(self.next_block)
        await self.grow_file(host_offset + length)
        self.next_block += count
        return host_offset

    async def map_blocks(self, guest_offset: int, count: int, host_offset: int | None) -> None:
        """Block data is written; now the map entries, then the header's count."""
        first = guest_offset // self.block_size
        if host_offset is None:
            await self.block_map.set_entries(first, [BLOCK_ZERO] * count)
            return
        number = self.geometry.block_number(host_offset)
        await self.block_map.set_entries(first, list(range(number, number + count)))
        self.used_blocks += count
        await self._write_blocks_allocated()

    # -- information and check ----------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        return {"cluster-size": self.block_size}

    async def check(self, repair: str | None = None) -> CheckResult:
        """qemu-img's check: every block number in range and used once, and
        the header's count of allocated blocks right."""
        if repair is not None:
            raise Unsupported("VDI images cannot be repaired")
        async with self.lock:
            return await self._scan_for_check()

    async def _scan_for_check(self) -> CheckResult:
        blocks = self.geometry.blocks
        result = CheckResult()
        used = bytearray(blocks)
        allocated = 0
        async for block, entry in self.block_map.entries():
            if entry >= BLOCK_ZERO:
                continue
            if entry >= blocks:
                result.messages.append(f"ERROR: block index {block} too large, is {entry}")
                result.corruptions += 1
                continue
            allocated += 1
            if used[entry]:
                result.messages.append(f"ERROR: block index {entry} also used by {entry}")
                result.corruptions += 1
            used[entry] = 1
        if allocated != self.header.blocks_allocated:
            result.messages.append(f"ERROR: allocated blocks mismatch, is {allocated}, "
                                   f"should be {self.header.blocks_allocated}")
            result.corruptions += 1
        return result

    # -- creation ------------------------------------------------------------------------------

    @classmethod
    async def create(cls, target: Any, size: int, options: dict[str, Any],
                     ctx: OpenContext) -> None:
        check_create_options(options)
        parent = None
        if options["backing_file"]:
            parent, parent_size = await _read_parent(os.fspath(target),
                                                     options["backing_file"], ctx)
            if size != parent_size:
                raise UsageError(f"a differencing VDI has its parent's size ({parent_size} "
                                 f"bytes), not {size}")
        head, file_length = new_image(size, options, parent)
        await create_image_file(target, ctx, head, file_length,
                                preallocation=options["preallocation"])


async def _read_parent(target: str, name: str, ctx: OpenContext) -> tuple[Parent, int]:
    """The UUIDs a new differencing image links to, and the parent's size;
    a warning when VirtualBox's search would not find the parent."""
    from imgfs.graph import open_image, resolve_location
    path = resolve_location(target, name)
    node = await open_image(path, OpenContext(read_only=True, force_share=True,
                                              locking=ctx.locking, no_io=True), fmt="vdi")
    try:
        header = node.driver.header if isinstance(node.driver, VdiDriver) else None
        if header is None:
            raise CorruptImage(f"{name}: not a VDI image")
        size = node.size
    finally:
        await node.aclose()
    folders = [os.path.realpath(folder) for folder in search_folders(target)]
    if os.path.dirname(os.path.realpath(path)) not in folders:
        log.warning("%s: the parent %s is not beside it: open it with "
                    "-o backing.file.filename=%s", target, name, name)
    return Parent(header.uuid_image, header.uuid_last_modify), size


DRIVERS = [VdiDriver]
