"""The VHD driver: open, the mapped layer's hooks, info, create.

A fixed disk is one DATA run at host offset 0; a dynamic disk is a
one-level block map (the BAT, kept in memory) on `imgfs.mapped`, which
reads, writes in place, and fills new blocks with their old contents; a
differencing disk adds the sector bitmaps (`present_unit` = a sector).
"""
from __future__ import annotations

import array
import os
import uuid
from typing import Any

from imgfs.block import ChildRef, Kind
from imgfs.errors import CorruptImage, InvalidImage, Unsupported, UsageError
from imgfs.graph import open_image, resolve_relative
from imgfs.mapped import MapKind, MappedDriver, Mapping, align_up, create_image_file
from imgfs.node import OpenContext
from imgfs.registry import protocol_for
from imgfs.tablecache import Table, TableCache

from .layout import (
    BAT_CODEC,
    COOKIE,
    CREATE_OPTS,
    DISK_DIFFERENCING,
    DISK_FIXED,
    DYNAMIC_HEADER,
    FOOTER,
    LOCATOR_PREFERENCE,
    OPEN_OPTS,
    SECTOR,
    UNUSED_ENTRY,
    DynamicHeader,
    Footer,
    Geometry,
    bit_run,
    check_data_offset,
    check_dynamic_header,
    check_footer,
    check_locator,
    check_size,
    locator_names,
    new_differencing_image,
    new_image,
    parent_name,
    set_bits,
    vhd_time,
    virtual_size,
)
from .layout import probe as probe_head

#: sector bitmaps of a differencing disk kept in memory (one a block, each
#: cached as big-endian 32-bit words: the BAT's codec gives the bytes back)
BITMAPS_CACHED = 256


def file_timestamp(filename: str) -> int | None:
    """A local file's modification time, in the VHD's seconds since 2000."""
    if protocol_for(filename) is not None or not os.path.exists(filename):
        return None
    return vhd_time(os.stat(filename).st_mtime)


class VpcDriver(MappedDriver):
    name = "vpc"
    kind = Kind.FORMAT
    description = ("Virtual PC / Hyper-V VHD, fixed, dynamic and differencing (read, write, "
                   "create)")
    supports_backing = True
    open_opts = OPEN_OPTS
    create_opts = CREATE_OPTS
    past_eof_reads_zero = True      # a fixed disk longer than its file reads zeros there (QEMU)

    footer: Footer
    #: the footer's bytes as found (rewritten at the end when the file grows)
    footer_raw: bytes
    #: where the footer at the end starts: the end of the data
    data_end: int
    geometry: Geometry | None = None
    #: (start, end) of the footer copy, dynamic header, BAT and parent locators
    metadata: tuple[tuple[int, int], ...] = ()

    @staticmethod
    def probe(head: bytes, filename: str) -> int:
        return probe_head(head, filename)

    # -- opening -------------------------------------------------------------------------

    async def open(self, options: dict[str, Any], ctx: OpenContext) -> None:
        file = self.children["file"]
        head = await file.read(0, min(file.size, FOOTER.size))
        if head[:len(COOKIE)] == COOKIE:
            await self._open_dynamic(Footer.unpack(head), head, options)
        else:
            await self._open_fixed(options)

    async def _open_fixed(self, options: dict[str, Any]) -> None:
        """No footer copy at offset 0: a fixed disk, its footer at the end
        (512 bytes, or 511 from Virtual PC before 2004)."""
        file = self.children["file"]
        raw = b""
        for footer_size in (FOOTER.size, FOOTER.size - 1):
            if file.size >= footer_size:
                raw = await file.read(file.size - footer_size, footer_size)
                if raw.startswith(COOKIE):
                    break
        else:
            raise InvalidImage("not a VHD image (no 'conectix' footer at offset 0 or at "
                               "the end of the file)")
        footer = Footer.unpack(raw)
        check_footer(footer, "the end of the file")
        if footer.disk_type != DISK_FIXED:
            raise InvalidImage(f"a VHD footer only at the end of the file must be a fixed "
                               f"disk's (type {DISK_FIXED}), not type {footer.disk_type}")
        self.footer, self.footer_raw = footer, raw
        self.data_end = file.size - len(raw)
        self.size = virtual_size(footer, options.get("force_size_calc"))
        check_size(self.size)
        self.setup_mapping(SECTOR)

    async def _open_dynamic(self, footer: Footer, raw: bytes, options: dict[str, Any]) -> None:
        file = self.children["file"]
        check_footer(footer, "offset 0")
        if footer.disk_type == DISK_FIXED:
            raise InvalidImage("a fixed VHD has its footer only at the end of the file, "
                               "but this one has a footer copy at offset 0")
        check_data_offset(footer, file.size)
        self.footer, self.footer_raw = footer, raw
        self.size = virtual_size(footer, options.get("force_size_calc"))
        check_size(self.size)
        header = DynamicHeader.unpack(await file.read(footer.data_offset,
                                                      DYNAMIC_HEADER.size))
        geometry = check_dynamic_header(header, footer, self.size, file.size)
        self.header, self.geometry = header, geometry
        self.bat = BAT_CODEC.decode(await file.read(geometry.table_offset,
                                                    geometry.bat_bytes))
        self.metadata = ((0, FOOTER.size),
                         (footer.data_offset, footer.data_offset + DYNAMIC_HEADER.size),
                         (geometry.table_offset, geometry.table_offset + geometry.bat_bytes))
        if footer.disk_type == DISK_DIFFERENCING:
            await self._open_differencing(header)
        self.setup_mapping(geometry.block_size)
        self.data_end = await self._find_data_end()
        self.max_allocation = geometry.block_size   # blocks are not host-contiguous

    async def _open_differencing(self, header: DynamicHeader) -> None:
        """The parent's candidate names from the locators; the sector
        bitmaps decide, sector by sector, what this image holds."""
        file = self.children["file"]
        names: dict[bytes, list[str]] = {}
        for locator in header.locators:
            if locator.platform_code not in LOCATOR_PREFERENCE or not locator.data_length:
                continue
            check_locator(locator, file.size)
            self.metadata += ((locator.data_offset,
                               locator.data_offset + locator.data_length),)
            data = await file.read(locator.data_offset, locator.data_length)
            names.setdefault(locator.platform_code, []).extend(
                locator_names(locator.platform_code, data))
        self.parent_names = [name for code in LOCATOR_PREFERENCE
                             for name in names.get(code, [])] + [parent_name(header)]
        self.parent_names = [name for name in self.parent_names if name]
        if not self.parent_names:
            raise InvalidImage("differencing VHD without a parent locator or parent name")
        self.present_unit = SECTOR
        self.bitmaps = TableCache(BITMAPS_CACHED)

    def _parent_filename(self) -> str:
        """The first candidate name that exists (relative names resolved
        against the child's directory).  None existing is one error naming
        what was looked for; a name that is the child itself is refused."""
        file = self.children["file"]
        own = os.path.realpath(file.filename) if os.path.exists(file.filename) else None
        looked_for = []
        for name in self.parent_names:
            location = resolve_relative(name, file)
            if not isinstance(location, str) or protocol_for(location) is not None:
                return name         # not a local file: the protocol will say
            if os.path.exists(location):
                if own is not None and os.path.realpath(location) == own:
                    raise InvalidImage(f"the parent locator names the image itself ({name})")
                return name
            looked_for.append(location)
        raise InvalidImage(f"parent of differencing VHD not found (looked for "
                           f"{', '.join(dict.fromkeys(looked_for))})")

    def child_refs(self) -> dict[str, ChildRef]:
        if self.footer.disk_type != DISK_DIFFERENCING:
            return {}
        return {"backing": ChildRef(self._parent_filename(), "vpc")}

    async def attach(self) -> None:
        """A differencing disk's parent must be the disk it was made from:
        the unique id the child's header records, and its timestamp, which
        the spec calls the parent's modification time (writers store the
        parent footer's, as imgfs does, or the parent file's: either is
        accepted)."""
        parent = self.children.get("backing")
        if parent is None or self.footer.disk_type != DISK_DIFFERENCING:
            return
        names = f"parent {parent.filename} of {self.node.filename}"
        driver = parent.driver
        if not isinstance(driver, VpcDriver):
            raise InvalidImage(f"{names} is not a VHD")
        expected, found = self.header.parent_unique_id, driver.footer.unique_id
        if found != expected:
            raise InvalidImage(f"{names} is not the disk the child was made from (unique id "
                               f"{uuid.UUID(bytes=found)}, expected "
                               f"{uuid.UUID(bytes=expected)})")
        stamps = {driver.footer.timestamp, file_timestamp(driver.children["file"].filename)}
        if self.header.parent_timestamp not in stamps:
            raise InvalidImage(f"{names} changed after the child was made from it (its "
                               f"timestamp is not {self.header.parent_timestamp})")

    async def _find_data_end(self) -> int:
        """Where the next block goes: where the footer at the end starts, and
        after every block and table the image has."""
        file = self.children["file"]
        end = align_up(file.size, SECTOR)
        if file.size >= FOOTER.size and \
                await file.read(file.size - FOOTER.size, len(COOKIE)) == COOKIE:
            end = file.size - FOOTER.size
        used = [entry for entry in self.bat if entry != UNUSED_ENTRY]
        if used:
            last_block_end = self._block_start(max(used)) + self.block_size
            if last_block_end > file.size:
                # (QEMU refuses such an image the same way)
                raise InvalidImage(f"a BAT entry puts a block at {last_block_end:#x}, past "
                                   f"the end of the {file.size}-byte file (the image has "
                                   "been truncated)")
            end = max(end, last_block_end)
        return max(end, align_up(max(stop for _, stop in self.metadata), SECTOR))

    # -- the mapped layer's hooks -------------------------------------------------------------

    def _block_start(self, entry: int) -> int:
        """Host offset of the data of the block whose bitmap starts at sector `entry`."""
        assert self.geometry is not None
        return entry * SECTOR + self.geometry.bitmap_size

    def _overlaps_metadata(self, host_offset: int, length: int) -> bool:
        return any(start < host_offset + length and host_offset < stop
                   for start, stop in self.metadata)

    async def lookup(self, offset: int, length: int) -> Mapping:
        if self.geometry is None:
            return Mapping(min(length, self.size - offset), MapKind.DATA, offset)
        block_size = self.block_size
        index = offset >> self.geometry.block_bits
        within = offset & (block_size - 1)
        entry = self.bat[index]
        if entry == UNUSED_ENTRY:
            blocks = -(-(within + length) // block_size)
            run = 1
            while run < blocks and self.bat[index + run] == UNUSED_ENTRY:
                run += 1
            return Mapping(min(length, run * block_size - within), MapKind.UNALLOCATED)
        host_offset = self._block_start(entry)
        if self._overlaps_metadata(entry * SECTOR, host_offset + block_size - entry * SECTOR):
            raise CorruptImage(f"BAT entry {index} points at sector {entry:#x}, over the "
                               "footer copy, the dynamic header, the BAT or a locator")
        count = min(length, block_size - within)
        if not self.present_unit:
            return Mapping(count, MapKind.DATA, host_offset + within)
        bitmap = BAT_CODEC.encode((await self._bitmap(entry)).entries)
        first = within // SECTOR
        present, sectors = bit_run(bitmap, first, -(-(within + count) // SECTOR))
        count = min(count, (first + sectors) * SECTOR - within)
        kind = MapKind.DATA if present else MapKind.UNALLOCATED
        return Mapping(count, kind, host_offset + within)

    async def _bitmap(self, entry: int) -> Table:
        """The sector bitmap of the block at sector `entry`, through a
        `TableCache` (as 32-bit words), so that a read that raced a change
        of it is done again instead of caching the old bits."""
        table = self.bitmaps.get(entry * SECTOR)
        if table is None:
            table = await self.bitmaps.load(entry * SECTOR, self._read_bitmap)
        return table

    async def _read_bitmap(self, host_offset: int) -> array.array[int]:
        assert self.geometry is not None
        return BAT_CODEC.decode(await self.children["file"].read(host_offset,
                                                                 self.geometry.bitmap_size))

    async def mark_present(self, guest_offset: int, length: int) -> None:
        """Set the sectors' bits in their block's bitmap (their data is
        written), and write the bytes that changed."""
        assert self.geometry is not None
        entry = self.bat[guest_offset >> self.geometry.block_bits]
        table = await self._bitmap(entry)
        bitmap = bytearray(BAT_CODEC.encode(table.entries))
        within = guest_offset & (self.block_size - 1)
        start, end = set_bits(bitmap, within // SECTOR, -(-length // SECTOR))
        await self.children["file"].write(entry * SECTOR + start, bytes(bitmap[start:end]))
        table.entries = BAT_CODEC.decode(bytes(bitmap))
        self.bitmaps.changed(table)

    def check_in_place(self, host_offset: int, length: int) -> None:
        if host_offset + length > self.data_end or self._overlaps_metadata(host_offset, length):
            raise CorruptImage(f"data at host offset {host_offset:#x} (+{length}) would "
                               "overwrite the VHD's footer or metadata")

    async def allocate(self, length: int) -> int:
        """A new block where the footer at the end was: the footer moves past
        it first (the dynamic disk's copy at offset 0 covers the moment in
        between), then the bitmap marks every sector present."""
        assert self.geometry is not None
        file = self.children["file"]
        bitmap_start = self.data_end
        block_start = bitmap_start + self.geometry.bitmap_size
        new_end = block_start + self.block_size
        await self.grow_file(new_end + len(self.footer_raw))
        await file.write(new_end, self.footer_raw)
        await file.write(bitmap_start, b"\xff" * self.geometry.bitmap_size)
        self.data_end = new_end
        return block_start

    async def map_blocks(self, guest_offset: int, count: int, host_offset: int | None) -> None:
        assert self.geometry is not None and host_offset is not None
        index = guest_offset >> self.geometry.block_bits
        step = (self.geometry.bitmap_size + self.block_size) // SECTOR
        entries = [(host_offset - self.geometry.bitmap_size) // SECTOR + number * step
                   for number in range(count)]
        self.bat[index:index + count] = BAT_CODEC.decode(BAT_CODEC.encode(entries))
        await self.children["file"].write(self.geometry.table_offset + index * BAT_CODEC.width,
                                          BAT_CODEC.encode(entries))

    async def make_empty(self) -> None:
        """Every BAT entry unused and the file cut back to its metadata and
        footer: the whole disk then reads from the parent (what `commit`
        leaves in the top image).  The BAT is durable before the blocks go."""
        if self.geometry is None:
            raise Unsupported("a fixed VHD cannot be emptied")
        file = self.children["file"]
        async with self.lock:
            await file.write(self.geometry.table_offset, b"\xff" * self.geometry.bat_bytes)
            await file.flush()
            self.bat = BAT_CODEC.decode(b"\xff" * self.geometry.bat_bytes)
            end = align_up(max(stop for _, stop in self.metadata), SECTOR)
            await file.truncate(end + len(self.footer_raw))
            await file.write(end, self.footer_raw)
            self.data_end, self.file_end = end, end + len(self.footer_raw)
            if self.present_unit:
                self.bitmaps.clear()

    # -- information, creation -------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        if self.geometry is None:
            return {}
        return {"cluster-size": self.geometry.block_size}

    @classmethod
    async def create(cls, target: Any, size: int, options: dict[str, Any],
                     ctx: OpenContext) -> None:
        if options["backing_file"]:
            head, length, footer = await cls._differencing_image(target, size, options, ctx)
        else:
            head, length, footer = new_image(size, options)
        await create_image_file(target, ctx, head, length,
                                more=[(length - len(footer), footer)])

    @classmethod
    async def _differencing_image(cls, target: Any, size: int, options: dict[str, Any],
                                  ctx: OpenContext) -> tuple[bytes, int, bytes]:
        """A new differencing disk over the VHD `backing_file` names (opened
        through the core, relative to the new image's directory, for its
        identity and size)."""
        if options["subformat"] == "fixed" or options["force_size"]:
            raise UsageError("a differencing VHD is neither fixed nor sized apart from its "
                             "parent (subformat=fixed and force_size do not apply)")
        if options["backing_fmt"] not in (None, "vpc"):
            raise UsageError("the parent of a differencing VHD must be a VHD (backing_fmt=vpc)")
        child_path = os.fspath(target)
        parent_path = os.path.join(os.path.dirname(os.path.abspath(child_path)),
                                   options["backing_file"])
        parent = await open_image(parent_path, OpenContext(read_only=True, force_share=True),
                                  fmt="vpc")
        try:
            assert isinstance(parent.driver, VpcDriver)
            footer, parent_size = parent.driver.footer, parent.size
        finally:
            await parent.aclose()
        if size != parent_size:
            raise UsageError(f"a differencing VHD has its parent's size ({parent_size} "
                             f"bytes), not {size}")
        # the footer's timestamp, not the file's time: neither QEMU nor imgfs
        # changes it when they write the parent (commit does), or a copy does
        return new_differencing_image(footer, parent_size, parent_path, child_path,
                                      footer.timestamp)


DRIVERS = [VpcDriver]
