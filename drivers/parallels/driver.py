"""The Parallels driver: open, the mapped layer's hooks, the in-use flag,
check, create.

A one-level catalog on `imgfs.mapped`: the layer reads (host-contiguous
runs become one read by the core) and writes in place or into new
clusters appended to the data area; this module maps guest clusters to
host offsets through `catalog.Catalog`.
"""
from __future__ import annotations

import os
import struct
from typing import Any

from imgfs.block import ChildRef, Kind
from imgfs.check import CheckResult
from imgfs.errors import CorruptImage, InvalidImage, NoSpace, Unsupported, UsageError
from imgfs.mapped import MapKind, MappedDriver, Mapping, align_up, create_image_file
from imgfs.node import OpenContext

from . import check as checks
from .bundle import (
    DESCRIPTOR,
    MAX_XML_BYTES,
    PLAIN,
    Layer,
    looks_like_descriptor,
    parse_descriptor,
    probe_descriptor,
)
from .catalog import Catalog
from .layout import (
    CREATE_OPTS,
    HEADER,
    INUSE_OPEN,
    MAX_ENTRY,
    MAX_WRITE_CLUSTER,
    OFFSET_INUSE,
    OPEN_OPTS,
    PLAIN_BLOCK,
    SECTOR,
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
    reports_dirty_flag = False      # as qemu-img info
    description = "Parallels images and .hdd bundles (read, write, create, check)"
    create_opts = CREATE_OPTS
    #: as QEMU: a cluster past the end of the file reads as zeros (`check`
    #: reports the entry)
    past_eof_reads_zero = True
    open_opts = OPEN_OPTS
    supports_backing = True
    #: this open set the in-use flag (and clears it on a clean close)
    marked = False
    #: opened through a bundle's DiskDescriptor.xml: the snapshot shown, its parent
    layer: Layer | None = None
    parent: Layer | None = None

    @staticmethod
    def probe(head: bytes, filename: str) -> int:
        return max(probe_header(head, filename), probe_descriptor(head, filename))

    # -- opening -------------------------------------------------------------------------

    async def open(self, options: dict[str, Any], ctx: OpenContext) -> None:
        file = self.children["file"]
        self.for_check = ctx.check
        head = await file.read(0, min(file.size, HEADER.size))
        if looks_like_descriptor(head):
            await self._open_descriptor(options["guid"])
            return
        if options["guid"]:
            raise UsageError("the guid option names an image of a .hdd bundle: open its "
                             f"{DESCRIPTOR}")
        self._open_image(Header.unpack(head))

    def _open_image(self, header: Header) -> None:
        """The Parallels image in the data child (the file, or a bundle's image)."""
        self.header = header
        self.geometry = check_header(header)
        self.size = self.geometry.size
        #: in_use was set when we opened it: software holding it read-write died
        self.unclean = header.inuse == INUSE_OPEN
        self.setup_mapping(self.geometry.cluster_size)
        self.catalog = Catalog(self.children[self.data_child], self.geometry)

    async def _open_descriptor(self, guid: str | None) -> None:
        """A bundle's DiskDescriptor.xml: its image opens as the data child
        (in `attach`), the parent snapshot as the backing node."""
        file = self.children["file"]
        descriptor = parse_descriptor(await file.read(0, min(file.size, MAX_XML_BYTES + 1)))
        guid = (guid or descriptor.top).lower()
        if guid not in descriptor.layers:
            raise InvalidImage(f"{DESCRIPTOR}: no snapshot {guid} on the chain from the top")
        self.layer = descriptor.layers[guid]
        self.parent = descriptor.layers.get(self.layer.parent or "")
        self.size = descriptor.disk_sectors * SECTOR
        self.data_child = "image"

    def child_refs(self) -> dict[str, ChildRef]:
        if self.layer is None:
            return {}
        refs = {"image": ChildRef(self.layer.filename, None, read_only=False)}
        if self.parent is not None and self.parent.kind == PLAIN:
            refs["backing"] = ChildRef(self.parent.filename, "raw")
        elif self.parent is not None:
            # the descriptor again, for the parent snapshot; only read, and
            # already held by this node: not locked a second time
            refs["backing"] = ChildRef(os.path.basename(self.children["file"].filename),
                                       self.name, options={"guid": self.parent.guid,
                                                           "file.locking": "off"})
        return refs

    async def attach(self) -> None:
        if self.layer is None:
            return
        image = self.children["image"]
        if self.layer.kind == PLAIN:
            self.setup_mapping(PLAIN_BLOCK)
            return
        described = self.size
        self._open_image(Header.unpack(await image.read(0, min(image.size, HEADER.size))))
        if self.size != described:
            raise InvalidImage(f"{image.filename}: {self.size} bytes, but {DESCRIPTOR} "
                               f"says {described}")

    async def activate(self) -> None:
        """As QEMU: a read-write open marks the image in use (durably,
        before any write) and refuses an image left in use, which only a
        check or read-only opens may touch."""
        if self.node.read_only or not self.children[self.data_child].driver.writable or \
                self.plain:
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
        file = self.children[self.data_child]
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

    @property
    def plain(self) -> bool:
        return self.layer is not None and self.layer.kind == PLAIN

    async def lookup(self, offset: int, length: int) -> Mapping:
        if self.plain:
            return Mapping(length, MapKind.DATA, offset)
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
        if not self.plain and host_offset < self.geometry.data_start:
            raise CorruptImage(f"data cluster at host offset {host_offset:#x} overlaps the "
                               "header or the catalog")
        super().check_in_place(host_offset, length)

    # -- check ------------------------------------------------------------------------------

    async def check(self, repair: str | None = None) -> CheckResult:
        """`imgfs check [-r leaks|all]` as qemu-img: a repairing pass, then
        a plain one whose counts are reported with what was fixed."""
        if self.plain:
            raise Unsupported(f"{self.layer and self.layer.filename}: a Plain image has no "
                              "metadata to check")
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
        file = self.children[self.data_child]
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
