"""The VMDK driver: descriptor and extents, the mapped layer's hooks, info.

A VMDK disk is a list of extents placed end to end: sparse extents (a
grain directory and grain tables: a `TwoLevelMap` each, in sectors),
flat extents (bytes at an offset of a file) and zero extents.  The file
the user names is either a sparse extent with its descriptor embedded
(monolithicSparse, streamOptimized: the extent is the file itself, whatever
name the descriptor gives it) or a descriptor whose extent files the core
opens as children ``extent0``, ``extent1``, ... relative to it.
"""
from __future__ import annotations

import bisect
import errno
import functools
import os
import re
import secrets
import zlib
from dataclasses import dataclass
from typing import Any

from imgfs.block import ChildRef, Kind
from imgfs.check import CheckResult
from imgfs.errors import CorruptImage, InvalidImage, OptionRefused, Unsupported
from imgfs.mapped import (
    MapKind,
    MappedDriver,
    Mapping,
    TwoLevelMap,
    align_up,
    create_image_file,
)
from imgfs.node import Node, OpenContext
from imgfs.signatures import is_vmdk_descriptor

from .check import check_extents
from .create import (
    CREATE_OPTS,
    check_create_options,
    descriptor_text,
    new_sparse_extent,
    plan_extents,
)
from .descriptor import (
    CID_NONE,
    FLAT_TYPES,
    Descriptor,
    ExtentLine,
    check_extent_paths,
    check_standalone,
    parse_descriptor,
)
from .layout import (
    CODEC,
    GD_AT_END,
    GRAIN_MARKER,
    GTE_ZEROED,
    MAX_DESCRIPTOR_BYTES,
    SECTOR,
    SPARSE_HEADER,
    VMDK3_MAGIC,
    VMDK4_MAGIC,
    CowdHeader,
    Geometry,
    SparseHeader,
    check_cowd_header,
    check_descriptor_range,
    check_footer,
    check_sparse_header,
    footer_offset,
)
from .layout import probe as probe_head
from .sesparse import is_sesparse
from .sesparse import open_extent as open_sesparse
from .stream import StreamWriter, grain_record, new_stream, open_writer
from .tables import MirroredMap

#: bytes of grain tables kept in memory per sparse extent
GT_CACHE_BYTES = 2 * 1024 * 1024
#: how much QEMU reads of the text after a COWD header
COWD_TEXT_BYTES = 20 * SECTOR
#: the mapped layer's block size when no extent is sparse
FLAT_BLOCK_SIZE = 64 * 1024


@dataclass(slots=True)
class VmdkExtent:
    """One extent of the disk, placed at guest byte `start`."""

    index: int
    start: int
    size: int
    kind: str                    # "flat", "zero", "sparse"
    child: str                   # the child node holding it ("" for zero)
    flat_offset: int = 0         # bytes into the file (flat)
    type_name: str = ""          # as the descriptor spells it (FLAT, VMFS, ...)
    geometry: Geometry | None = None
    tables: TwoLevelMap | None = None
    cowd: bool = False
    #: a seSparse extent (read-only; its header's capacity is its size)
    sesparse: bool = False
    #: one past the last byte allocated in the extent's file (sparse)
    file_end: int = 0


class VmdkDriver(MappedDriver):
    name = "vmdk"
    kind = Kind.FORMAT
    supports_backing = True
    description = ("VMware disk: monolithicSparse/Flat, twoGbMaxExtent* (read, write), "
                   "streamOptimized (both layouts), ESX VMFS/COWD extents (read), "
                   "seSparse (read-only)")
    zero_blocks = True
    create_opts = CREATE_OPTS
    can_check = True
    #: a flat extent file shorter than the extent reads as zeros past its end
    past_eof_reads_zero = True

    descriptor: Descriptor
    extents: list[VmdkExtent]
    #: the parent's CID matches ours (reads through to it are allowed)
    parent_cid_ok: bool = True
    #: (offset, bytes) of the descriptor text in the file child
    descriptor_text: tuple[int, bytes] = (0, b"")
    #: this open gave the image a new CID (QEMU does at the first write)
    cid_updated: bool = False
    #: an extent holds compressed grains (a stream)
    compressed: bool = False
    #: the header of a VMware-layout stream (directory at the end), which
    #: imgfs appends to; None: not one
    stream_header: SparseHeader | None = None
    #: appends to that stream, once the first write came
    stream: StreamWriter | None = None

    @staticmethod
    def probe(head: bytes, filename: str) -> int:
        return probe_head(head, filename)

    # -- opening -------------------------------------------------------------------------

    async def open(self, options: dict[str, Any], ctx: OpenContext) -> None:
        file = self.children["file"]
        head = await file.read(0, min(file.size, SECTOR))
        self.extents = []
        self.single_file = head[:4] in (VMDK4_MAGIC, VMDK3_MAGIC)
        if head[:4] == VMDK4_MAGIC:
            await self._open_monolithic(file)
        elif head[:4] == VMDK3_MAGIC:
            # as QEMU: CID and parentCID from text in the sector after the header
            text = await file.read(SECTOR, max(0, min(file.size - SECTOR, COWD_TEXT_BYTES)))
            self.descriptor = parse_descriptor(text)
            self.descriptor.extents = []
            extent = VmdkExtent(0, 0, 0, "sparse", "file")
            await self._open_sparse(extent)
            extent.size = extent.geometry.capacity if extent.geometry else 0
            self.extents.append(extent)
        elif is_sesparse(head):
            # (it has no descriptor: neither its parent nor its CIDs are known)
            raise Unsupported("a seSparse VMDK extent opens only through the descriptor "
                              "that names it")
        else:
            await self._open_descriptor(file)
        self._place_extents()
        if self.single_file:
            self._setup_layer()

    async def _open_monolithic(self, file: Node) -> None:
        header = SparseHeader.unpack(await file.read(0, min(file.size, SPARSE_HEADER.size)))
        offset, length = check_descriptor_range(header, file.size)
        text = await file.read(offset, length) if length else b""
        self.descriptor = parse_descriptor(text)
        self.descriptor_text = (offset, text)
        extent = VmdkExtent(0, 0, 0, "sparse", "file")
        await self._open_sparse(extent)
        extent.size = extent.geometry.capacity if extent.geometry else 0
        self.extents.append(extent)

    async def _open_descriptor(self, file: Node) -> None:
        raw = await file.read(0, min(file.size, MAX_DESCRIPTOR_BYTES))
        if not is_vmdk_descriptor(raw):
            raise InvalidImage("not a VMDK image (no sparse header, no descriptor)")
        descriptor = parse_descriptor(raw)
        check_standalone(descriptor)
        if not self.node.read_only:
            check_extent_paths(descriptor)
        self.descriptor = descriptor
        self.descriptor_text = (0, raw)
        start = 0
        for index, line in enumerate(descriptor.extents):
            self.extents.append(_extent_from_line(index, start, line))
            start += line.size

    def child_refs(self) -> dict[str, ChildRef]:
        refs: dict[str, ChildRef] = {}
        if not self.single_file:
            for extent, line in zip(self.extents, self.descriptor.extents, strict=True):
                if extent.child:
                    refs[extent.child] = ChildRef(line.filename, read_only=False)
        if self.descriptor.parent_hint:
            # (QEMU opens a VMDK's parent as a VMDK, and says so in info)
            refs["backing"] = ChildRef(self.descriptor.parent_hint, "vmdk")
        return refs

    async def attach(self) -> None:
        if not self.single_file:
            for extent in self.extents:
                if extent.kind == "sparse":
                    await self._open_sparse(extent)
            self._place_extents()
            self._setup_layer()
        backing = self.children.get("backing")
        if backing is not None and isinstance(backing.driver, VmdkDriver):
            self.parent_cid_ok = backing.driver.descriptor.cid == self.descriptor.parent_cid

    def _place_extents(self) -> None:
        """Extents end to end (a seSparse extent is as long as its header
        says, whatever its descriptor line says, as in QEMU)."""
        start = 0
        for extent in self.extents:
            extent.start = start
            start += extent.size
        self.size = start
        self.starts = [extent.start for extent in self.extents]

    def _setup_layer(self) -> None:
        grain_sizes = {extent.geometry.grain_size for extent in self.extents
                       if extent.geometry is not None}
        if len(grain_sizes) > 1:
            raise Unsupported("VMDK sparse extents of different grain sizes are not "
                              "supported")
        self.setup_mapping(grain_sizes.pop() if grain_sizes else FLAT_BLOCK_SIZE)
        sparse = [extent.geometry for extent in self.extents if extent.geometry is not None]
        # zero writes become zeroed-grain entries only where every extent has them
        self.zero_blocks = bool(sparse) and all(geometry.zeroed_grains for geometry in sparse)
        self.compressed = any(geometry.compressed for geometry in sparse)

    async def _open_sparse(self, extent: VmdkExtent) -> None:
        """Check a sparse extent's header and build its table map."""
        file = self.children[extent.child]
        head = await file.read(0, min(file.size, SPARSE_HEADER.size))
        if (extent.type_name == "SESPARSE") != is_sesparse(head):
            raise InvalidImage(f"{file.filename}: the descriptor's extent type "
                               f"{extent.type_name} does not match the extent's header")
        if extent.type_name == "SESPARSE":
            await self._open_sesparse(extent, file, head)
            return
        if head[:4] == VMDK3_MAGIC:
            extent.cowd = True
            geometry = check_cowd_header(CowdHeader.unpack(head), file.size)
        else:
            header = await self._effective_header(file, head)
            geometry = check_sparse_header(header, file.size)
            if self.single_file and geometry.compressed and \
                    SparseHeader.unpack(head).gd_offset == GD_AT_END:
                self.stream_header = header
        if geometry.compressed and not geometry.markers:
            raise Unsupported("compressed VMDK grains without markers are not supported")
        gd_bytes = geometry.gd_entries * CODEC.width
        gd = CODEC.decode(await file.read(geometry.gd_offset, gd_bytes))
        extent.geometry = geometry
        extent.file_end = file.size
        options: dict[str, Any] = dict(
            file=file, l1=gd, l1_offset=geometry.gd_offset, block_bits=geometry.grain_bits,
            l2_bits=geometry.gt_bits, codec=CODEC,
            classify=self._classifier(file, geometry),
            check_table=self._table_check(file, geometry),
            allocate=functools.partial(self._allocate_in, extent),
            cache_bytes=max(GT_CACHE_BYTES, geometry.gt_bytes), entry_unit=SECTOR)
        if geometry.rgd_offset:
            rgd = CODEC.decode(await file.read(geometry.rgd_offset, gd_bytes))
            extent.tables = MirroredMap(rgd=rgd, rgd_offset=geometry.rgd_offset, **options)
        else:
            extent.tables = TwoLevelMap(**options)

    async def _open_sesparse(self, extent: VmdkExtent, file: Node, head: bytes) -> None:
        """A seSparse extent: checked as QEMU checks it, its tables
        translated as they are read; the disk becomes read-only."""
        extent.geometry, extent.tables = await open_sesparse(
            file, head, cache_bytes=GT_CACHE_BYTES,
            allocate=functools.partial(self._allocate_in, extent))
        extent.sesparse = True
        extent.size = extent.geometry.capacity
        extent.file_end = file.size
        # as QEMU: "No write support for seSparse images"
        self.read_only_format = True
        self.read_only_what = "VMDK images with seSparse extents"

    async def _effective_header(self, file: Node, head: bytes) -> SparseHeader:
        """The header, or for a stream whose directory is at its end, the
        footer's copy (spec "Stream-optimized": footer marker, footer,
        end-of-stream marker)."""
        header = SparseHeader.unpack(head)
        if header.gd_offset != GD_AT_END:
            return header
        at = footer_offset(file.size)
        if at < 2 * SECTOR:
            raise InvalidImage("streamOptimized VMDK too short for its footer")
        tail = await file.read(at - SECTOR, 3 * SECTOR)
        check_footer(tail[:SECTOR], tail[2 * SECTOR:])
        footer = SparseHeader.unpack(tail[SECTOR:2 * SECTOR])
        if footer.magic != VMDK4_MAGIC or footer.gd_offset == GD_AT_END:
            raise InvalidImage("the footer of a streamOptimized VMDK has no grain directory")
        return footer

    @staticmethod
    def _classifier(file: Node, geometry: Geometry) -> Any:
        compressed = geometry.compressed
        zeroed = geometry.zeroed_grains

        def classify(entry: int) -> tuple[MapKind, int]:
            if entry == 0:
                return MapKind.UNALLOCATED, 0
            if entry == GTE_ZEROED and zeroed:
                return MapKind.ZERO, 0
            host_offset = entry * SECTOR
            if not geometry.data_start <= host_offset < file.size:
                raise CorruptImage(f"grain at sector {entry} lies inside the metadata or "
                                   f"past the end of the {file.size}-byte extent file "
                                   f"{file.filename}")
            return (MapKind.TRANSFORMED if compressed else MapKind.DATA), host_offset
        return classify

    @staticmethod
    def _table_check(file: Node, geometry: Geometry) -> Any:
        def check_table(offset: int) -> None:
            if offset < SECTOR or offset + geometry.gt_bytes > file.size:
                raise CorruptImage(f"grain table at byte {offset:#x} lies outside the "
                                   f"{file.size}-byte extent file {file.filename}")
        return check_table

    # -- the mapped layer's hooks -------------------------------------------------------

    def _extent_at(self, offset: int) -> VmdkExtent:
        return self.extents[bisect.bisect_right(self.starts, offset) - 1]

    async def lookup(self, offset: int, length: int) -> Mapping:
        extent = self._extent_at(offset)
        within = offset - extent.start
        length = min(length, extent.size - within)
        if self.stream is not None:
            return self.stream.lookup(within, length)
        if extent.kind == "zero":
            return Mapping(length, MapKind.ZERO)
        if extent.kind == "flat":
            return Mapping(length, MapKind.DATA, extent.flat_offset + within,
                           child=extent.child)
        assert extent.tables is not None
        mapping = await extent.tables.lookup(within, length)
        if mapping.kind is MapKind.UNALLOCATED and not self.parent_cid_ok:
            raise CorruptImage(f"parent CID {self.descriptor.parent_cid:08x} does not match "
                               "the CID of the backing file")
        if mapping.kind is MapKind.TRANSFORMED:
            return mapping._replace(token=(extent.index, mapping.token))
        if mapping.kind is MapKind.DATA and \
                extent.tables.overlaps_table(mapping.host_offset, mapping.length):
            # (a write there would rewrite the mapping itself)
            raise CorruptImage(f"grain at byte {mapping.host_offset:#x} of extent {extent.index} "
                               "overlaps a grain table")
        return mapping._replace(child=extent.child)

    async def _allocate_in(self, extent: VmdkExtent, length: int) -> int:
        """Space at the end of a sparse extent's file (sector aligned, as
        QEMU allocates).  Called under `lock`."""
        host_offset = align_up(extent.file_end, SECTOR)
        await self.grow_file(host_offset + length, extent.child)
        extent.file_end = host_offset + length
        return host_offset

    async def allocate_for(self, guest_offset: int, length: int) -> tuple[str, int]:
        extent = self._extent_at(guest_offset)
        if extent.kind != "sparse":
            raise Unsupported(f"the {extent.type_name} extent at byte {extent.start} cannot "
                              "be written")
        if extent.cowd:
            # (its header's free-sector count would have to follow)
            raise Unsupported("new grains in COWD (ESX sparse) extents are not supported")
        return extent.child, await self._allocate_in(extent, length)

    async def map_blocks(self, guest_offset: int, count: int, host_offset: int | None) -> None:
        extent = self._extent_at(guest_offset)
        assert extent.tables is not None and extent.geometry is not None
        within = guest_offset - extent.start
        if host_offset is None:
            await extent.tables.map_run(within, count, GTE_ZEROED, 0)
        else:
            await extent.tables.map_run(within, count, host_offset // SECTOR,
                                        extent.geometry.grain_size // SECTOR)

    def check_in_place(self, host_offset: int, length: int) -> None:
        """Nothing more to check: `lookup` refuses grains inside the metadata,
        over a grain table or past the end of their file, and flat extents
        have no metadata."""

    # -- writes ---------------------------------------------------------------------------

    async def write(self, offset: int, data: bytes) -> None:
        await self._before_write()
        if self.stream_header is not None:
            await self._stream_write(offset, data)
        elif self.compressed:
            await self._append_grains(offset, data)
        else:
            await super().write(offset, data)

    async def write_zeroes(self, offset: int, length: int, *, may_unmap: bool = False) -> None:
        """As QEMU: with zeroed grains, whole grains become zeroed-grain
        entries even where the image holds them (their old space leaks)."""
        await self._before_write()
        if not self.zero_blocks or self.compressed:
            await super().write_zeroes(offset, length, may_unmap=may_unmap)
            return
        end = offset + length
        while offset < end:
            extent = self._extent_at(offset)
            piece_end = min(end, extent.start + extent.size)
            first = align_up(offset, self.block_size)
            last = piece_end - (piece_end - extent.start) % self.block_size
            if extent.kind != "sparse" or first >= last:
                await super().write_zeroes(offset, piece_end - offset, may_unmap=may_unmap)
            else:
                if offset < first:
                    await super().write_zeroes(offset, first - offset, may_unmap=may_unmap)
                async with self.lock:
                    await self.map_blocks(first, (last - first) // self.block_size, None)
                if last < piece_end:
                    await super().write_zeroes(last, piece_end - last, may_unmap=may_unmap)
            offset = piece_end

    async def _before_write(self) -> None:
        """Refuse stream images; give the image a new CID at the first
        write (as QEMU: an image made on top of this one sees the change)."""
        if self.cid_updated:
            return
        async with self.lock:
            if not self.cid_updated:
                await self._write_cid(secrets.randbits(32))
                self.cid_updated = True

    async def _write_cid(self, cid: int) -> None:
        offset, text = self.descriptor_text
        file = self.children["file"]
        if not text or (not self.single_file and len(text) != file.size):
            return          # (a descriptor longer than QEMU reads keeps its CID)
        new_text, found = _CID_LINE.subn(f"CID={cid:x}".encode(), text, count=1)
        if not found:
            return
        if self.single_file:
            new_text = new_text.ljust(len(text), b"\0")[:len(text)]
        # (a longer text: grow first, the old one then ends in NULs, which the
        # parser stops at; a shorter one: cut after, leaving a stray line end)
        if not self.single_file and len(new_text) > file.size:
            await file.truncate(len(new_text))
        await file.write(offset, new_text)
        if not self.single_file and len(new_text) < file.size:
            await file.truncate(len(new_text))
        await file.flush()
        self.descriptor_text = (offset, new_text)
        self.descriptor.cid = cid

    # -- appending to a QEMU-layout stream -------------------------------------------

    async def _append_grains(self, offset: int, data: bytes) -> None:
        """As QEMU: whole grains, each written once, compressed, at the end
        of the file (a grain's worth of space each), then its table entry."""
        grain_size = self.block_size
        if offset % grain_size or (len(data) % grain_size and offset + len(data) != self.size):
            raise Unsupported("streamOptimized VMDK images take only whole-grain writes",
                              errno_=errno.EIO)
        extent = self.extents[0]
        assert extent.tables is not None
        for start in range(0, len(data), grain_size):
            grain = data[start:start + grain_size].ljust(grain_size, b"\0")
            async with self.lock:
                mapping = await self.lookup(offset + start, grain_size)
                if mapping.kind is not MapKind.UNALLOCATED:
                    raise Unsupported("could not write to allocated cluster for "
                                      "streamOptimized", errno_=errno.EIO)
                record = grain_record((offset + start) // SECTOR, grain)
                host_offset = await self._allocate_in(extent, align_up(len(record),
                                                                       grain_size))
                await self.children["file"].write(host_offset, record)
                await extent.tables.map_run(offset + start, 1, host_offset // SECTOR, 0)

    # -- appending to a VMware-layout stream -----------------------------------------

    async def _stream_write(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        done = 0
        async with self.lock:
            stream = await self._stream_writer()
            while done < len(data):
                done += await stream.write(offset + done, view[done:], self._old_grain)

    async def _old_grain(self, index: int) -> bytes:
        start = index * self.block_size
        old = await self.node.read_unallocated(start, min(self.block_size, self.size - start))
        return old.ljust(self.block_size, b"\0")

    async def _stream_writer(self) -> StreamWriter:
        """The writer, made at the first write."""
        if self.stream is None:
            extent = self.extents[0]
            assert extent.tables is not None and extent.geometry is not None
            assert self.stream_header is not None
            self.stream = await open_writer(
                file=self.children["file"], header=self.stream_header,
                tables=extent.tables, geometry=extent.geometry,
                keep_zero_grains=self.node.backing is not None)
        return self.stream

    async def flush(self) -> None:
        if self.stream is not None:
            async with self.lock:
                await self.stream.write_tail()

    async def aclose(self) -> None:
        await self.flush()
        if self.stream is not None:
            async with self.lock:
                await self.stream.give_back_slack()

    async def decode_block(self, token: Any) -> bytes:
        """A compressed grain: its marker (lba, size), then a zlib stream
        (or the grain a stream writer is filling)."""
        if token[0] == "pending":
            assert self.stream is not None
            grain = self.stream.unwritten_grain(token[1])
            if grain is not None:
                return grain
            token = (0, self.stream.entry(token[1]))
            if not token[1]:
                return bytes(self.block_size)
        index, entry = token
        extent = self.extents[index]
        file = self.children[extent.child]
        grain_size = self.block_size
        host_offset = entry * SECTOR
        head = await file.read(host_offset, min(GRAIN_MARKER.size, file.size - host_offset))
        if len(head) < GRAIN_MARKER.size:
            raise CorruptImage(f"compressed grain at sector {entry} is cut short")
        _, size = GRAIN_MARKER.unpack(head)
        start = host_offset + GRAIN_MARKER.size
        if size > 2 * grain_size + SECTOR or start + size > file.size:
            raise CorruptImage(f"compressed grain at sector {entry}: size {size} is too "
                               "large or runs past the end of the file")
        try:
            inflater = zlib.decompressobj()
            grain = inflater.decompress(await file.read(start, size), grain_size)
        except zlib.error as exc:
            raise CorruptImage(f"compressed grain at sector {entry}: {exc}") from None
        if len(grain) != grain_size:
            raise CorruptImage(f"compressed grain at sector {entry} inflates to "
                               f"{len(grain)} bytes, not {grain_size}")
        return grain

    @classmethod
    async def create(cls, target: Any, size: int, options: dict[str, Any],
                     ctx: OpenContext) -> None:
        await create_vmdk(target, size, options, ctx)

    # -- check ----------------------------------------------------------------------------

    async def check(self, repair: str | None = None) -> CheckResult:
        """As qemu-img check (QEMU has no repair for VMDK)."""
        return await check_extents(
            [(extent.start, extent.tables, extent.geometry, self.children[extent.child])
             for extent in self.extents if extent.kind == "sparse"])

    # -- information ----------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        report: dict[str, Any] = {}
        first = self.extents[0] if self.extents else None
        if first is not None and first.geometry is not None:
            report["cluster-size"] = first.geometry.grain_size
        report.update({"cid": self.descriptor.cid,
                       "parent-cid": self.descriptor.parent_cid,
                       "create-type": self.descriptor.create_type,
                       "extents": [self._extent_info(extent) for extent in self.extents]})
        return report

    def _extent_info(self, extent: VmdkExtent) -> dict[str, Any]:
        entry: dict[str, Any] = {}
        if extent.geometry is not None and extent.geometry.compressed:
            entry["compressed"] = True
        entry["virtual-size"] = extent.size
        if extent.child:
            entry["filename"] = self.children[extent.child].filename
        if extent.geometry is not None:
            entry["cluster-size"] = extent.geometry.grain_size
        entry["format"] = "" if self.single_file else extent.type_name
        return entry


_CID_LINE = re.compile(rb"^[ \t]*CID[ \t]*=[ \t]*\"?[0-9a-fA-F]+\"?", re.MULTILINE)


async def create_vmdk(target: Any, size: int, options: dict[str, Any],
                      ctx: OpenContext) -> None:
    """A new disk as qemu-img makes it: extent files first, the file that
    holds the descriptor last."""
    check_create_options(options)
    sectors = -(-size // SECTOR)
    subformat = options["subformat"]
    parent_cid, parent_hint = CID_NONE, ""
    if options["backing_file"]:
        parent_hint = options["backing_file"]
        parent_cid = await _parent_cid(os.fspath(target), parent_hint, ctx)
    target_name = os.fspath(target)
    extents = plan_extents(target_name, sectors, subformat)
    text = descriptor_text(cid=secrets.randbits(32), parent_cid=parent_cid,
                           create_type=subformat, parent_hint=parent_hint, extents=extents,
                           sectors=sectors, options=options)
    if subformat == "streamOptimized":
        # the layout VMware writes (directory and footer at the end)
        head = new_stream(sectors, text)
        await create_image_file(target, ctx, head, len(head))
        return
    if subformat == "monolithicSparse":
        head, length = new_sparse_extent(sectors, text, zeroed_grain=options["zeroed_grain"])
        await create_image_file(target, ctx, head, length)
        return
    directory = os.path.dirname(target_name)
    for extent in extents:
        if extent.sparse:
            head, length = new_sparse_extent(extent.sectors, b"",
                                             zeroed_grain=options["zeroed_grain"])
        else:
            head, length = b"", extent.sectors * SECTOR
        await create_image_file(os.path.join(directory, extent.filename), ctx, head, length)
    await create_image_file(target, ctx, text, len(text))


async def _parent_cid(target: str, backing: str, ctx: OpenContext) -> int:
    """The CID of the backing file, which must be a VMDK (as qemu-img)."""
    from imgfs.graph import open_image  # (only creating opens another image)
    if not os.path.isabs(backing) and "://" not in backing:
        backing = os.path.join(os.path.dirname(target), backing)
    node = await open_image(backing, OpenContext(read_only=True, force_share=True,
                                                 locking=ctx.locking))
    try:
        if not isinstance(node.driver, VmdkDriver):
            raise OptionRefused("backing_file must be a vmdk image")
        return node.driver.descriptor.cid
    finally:
        await node.aclose()


def _extent_from_line(index: int, start: int, line: ExtentLine) -> VmdkExtent:
    if line.kind == "ZERO":
        return VmdkExtent(index, start, line.size, "zero", "", type_name="ZERO")
    child = f"extent{index}"
    if line.kind in FLAT_TYPES:
        return VmdkExtent(index, start, line.size, "flat", child,
                          flat_offset=line.offset * SECTOR, type_name=line.kind)
    return VmdkExtent(index, start, line.size, "sparse", child, type_name=line.kind)


DRIVERS = [VmdkDriver]
