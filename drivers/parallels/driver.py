"""The Parallels driver: open, the mapped layer's hooks, the in-use flag,
check, create.

A one-level catalog on `imgfs.mapped`: the layer reads (host-contiguous
runs become one read by the core) and writes in place or into new
clusters appended to the data area; this module maps guest clusters to
host offsets through `catalog.Catalog`.
"""
from __future__ import annotations

import struct
from typing import Any

from imgfs.block import Kind
from imgfs.check import CheckResult
from imgfs.errors import CorruptImage, NoSpace, Unsupported
from imgfs.mapped import MappedDriver, Mapping, align_up, create_image_file
from imgfs.node import OpenContext

from . import check as checks
from .catalog import Catalog
from .layout import (
    CREATE_OPTS,
    HEADER,
    INUSE_OPEN,
    MAX_ENTRY,
    MAX_WRITE_CLUSTER,
    OFFSET_INUSE,
    Header,
    check_header,
    new_image,
    round_size,
)
from .layout import probe as probe_header


class ParallelsDriver(MappedDriver):
    name = "parallels"
    kind = Kind.FORMAT
    can_check = True
    description = "Parallels expandable image (read, write, create, check)"
    create_opts = CREATE_OPTS
    #: as QEMU: a cluster past the end of the file reads as zeros (`check`
    #: reports the entry)
    past_eof_reads_zero = True
    #: this open set the in-use flag (and clears it on a clean close)
    marked = False

    @staticmethod
    def probe(head: bytes, filename: str) -> int:
        return probe_header(head, filename)

    # -- opening -------------------------------------------------------------------------

    async def open(self, options: dict[str, Any], ctx: OpenContext) -> None:
        file = self.children["file"]
        self.header = Header.unpack(await file.read(0, min(file.size, HEADER.size)))
        self.geometry = check_header(self.header)
        self.size = self.geometry.size
        self.for_check = ctx.check
        #: in_use was set when we opened it: software holding it read-write died
        self.unclean = self.header.inuse == INUSE_OPEN
        self.setup_mapping(self.geometry.cluster_size)
        self.catalog = Catalog(file, self.geometry)

    async def activate(self) -> None:
        """As QEMU: a read-write open marks the image in use (durably,
        before any write) and refuses an image left in use, which only a
        check or read-only opens may touch."""
        if self.node.read_only or not self.children["file"].driver.writable:
            return
        if self.block_size > MAX_WRITE_CLUSTER:
            # (a write builds whole clusters in memory)
            raise Unsupported(f"clusters of {self.block_size} bytes are too large to write "
                              f"(at most {MAX_WRITE_CLUSTER}); open read-only")
        if self.unclean and not self.for_check:
            raise CorruptImage("image was not closed correctly; cannot be opened "
                               "read/write (run 'imgfs check -r all')")
        await self._set_inuse(INUSE_OPEN)
        self.marked = True

    async def _set_inuse(self, value: int) -> None:
        file = self.children["file"]
        await file.flush()          # what the catalog names is durable before the flag says so
        await file.write(OFFSET_INUSE, struct.pack("<I", value))
        await file.flush()
        self.header = self.header._replace(inuse=value)

    async def aclose(self) -> None:
        if not self.marked:
            return
        async with self.lock:       # shielded: a clean close always finishes
            await self._set_inuse(0)
            self.marked = False

    # -- the mapped layer's hooks -------------------------------------------------------------

    async def lookup(self, offset: int, length: int) -> Mapping:
        return await self.catalog.lookup(offset, length)

    async def allocate(self, length: int) -> int:
        """New clusters at the end of the data area, a whole number of
        clusters from its start (spec "BAT"), addressable by an entry."""
        geometry = self.geometry
        if geometry.data_start % geometry.entry_unit:
            raise CorruptImage(f"data area at {geometry.data_start:#x} is not a multiple "
                               f"of the catalog's {geometry.entry_unit}-byte unit")
        start = max(self.file_end, geometry.data_start)
        host_offset = geometry.data_start + align_up(start - geometry.data_start,
                                                     self.block_size)
        if geometry.entry_for(host_offset + length - self.block_size) > MAX_ENTRY:
            raise NoSpace("the catalog cannot address clusters this far into the file")
        await self.grow_file(host_offset + length)
        return host_offset

    async def map_blocks(self, guest_offset: int, count: int, host_offset: int | None) -> None:
        assert host_offset is not None      # (no zero entries: zero_blocks is False)
        await self.catalog.set_run(guest_offset // self.block_size, count,
                                   self.geometry.entry_for(host_offset))

    def check_in_place(self, host_offset: int, length: int) -> None:
        if host_offset < self.geometry.data_start:
            raise CorruptImage(f"data cluster at host offset {host_offset:#x} overlaps the "
                               "header or the catalog")
        super().check_in_place(host_offset, length)

    # -- check ------------------------------------------------------------------------------

    async def check(self, repair: str | None = None) -> CheckResult:
        """`imgfs check [-r leaks|all]` as qemu-img: a repairing pass, then
        a plain one whose counts are reported with what was fixed."""
        async with self.lock:
            fix_errors = repair == "all"
            fix_leaks = repair is not None
            first = await checks.scan(self.catalog, unclean=self.unclean,
                                      fix_errors=fix_errors, fix_leaks=fix_leaks)
            if not repair:
                return first.result
            fixed = await self._repair(first, fix_errors=fix_errors)
            if not fixed:
                return first.result
            second = await checks.scan(self.catalog, unclean=self.unclean,
                                       fix_errors=False, fix_leaks=False)
            result = second.result
            result.messages[:0] = first.result.messages
            if fix_errors:
                result.corruptions_fixed = first.result.corruptions
            if first.result.leaks:
                result.leaks_fixed = first.result.leaks
            return result

    async def _repair(self, findings: checks.Findings, *, fix_errors: bool) -> bool:
        """Clear bad entries (and the in-use finding) with `fix_errors`, cut
        leaked space; whether anything was fixed."""
        file = self.children["file"]
        fixed = False
        if fix_errors and (findings.bad_entries or self.unclean):
            await checks.clear_entries(self.catalog, findings.bad_entries)
            self.unclean = False        # (the flag itself goes at close)
            fixed = True
        if findings.result.leaks:
            await file.flush()
            await file.truncate(findings.data_end)
            self.file_end = findings.data_end
            fixed = True
        await file.flush()
        return fixed

    # -- creation ------------------------------------------------------------------------------

    @classmethod
    async def create(cls, target: Any, size: int, options: dict[str, Any],
                     ctx: OpenContext) -> None:
        head, file_length = new_image(round_size(size), options)
        await create_image_file(target, ctx, head, file_length)


DRIVERS = [ParallelsDriver]
