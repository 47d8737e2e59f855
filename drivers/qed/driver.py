"""The QED driver: open, the mapped layer's hooks, need-check, check,
resize, create.

QED is a two-level table format on `imgfs.mapped`: the layer reads
(host-contiguous runs become one read by the core), writes in place or
into new clusters at the end of the file with copy-on-write from the
backing node, and turns whole-cluster zero writes into zero entries.
"""
from __future__ import annotations

import logging
import struct
from typing import Any

from imgfs.block import ChildRef, Kind
from imgfs.check import CheckResult
from imgfs.errors import CorruptImage, Unsupported, UsageError
from imgfs.mapped import (
    MapKind,
    MappedDriver,
    Mapping,
    TwoLevelMap,
    align_up,
    create_image_file,
)
from imgfs.node import OpenContext

from . import check as checks
from .layout import (
    CODEC,
    CREATE_OPTS,
    HEADER,
    L2_CACHE_BYTES,
    QED_F_BACKING_FILE,
    QED_F_BACKING_FORMAT_NO_PROBE,
    QED_F_NEED_CHECK,
    SECTOR,
    ZERO_CLUSTER,
    Header,
    check_create_options,
    check_header,
    classify_entry,
    decode_backing_name,
    new_image,
    round_size,
    valid_cluster_offset,
)
from .layout import probe as probe_header

log = logging.getLogger("imgfs")

#: byte offsets of header fields rewritten in place (spec "Header")
OFFSET_FEATURES = 16
OFFSET_AUTOCLEAR = 32
OFFSET_IMAGE_SIZE = 48


class QedDriver(MappedDriver):
    name = "qed"
    kind = Kind.FORMAT
    supports_backing = True
    can_check = True
    description = "QEMU enhanced disk (read, write, create, check, resize)"
    create_opts = CREATE_OPTS
    past_eof_reads_zero = False     # QEMU fails a request that meets such an entry
    zero_blocks = True
    can_resize = True
    #: this open set the need-check flag (and clears it on a clean close)
    marked = False

    @staticmethod
    def probe(head: bytes, filename: str) -> int:
        return probe_header(head, filename)

    # -- opening -------------------------------------------------------------------------

    async def open(self, options: dict[str, Any], ctx: OpenContext) -> None:
        file = self.children["file"]
        header = Header.unpack(await file.read(0, min(file.size, HEADER.size)))
        self.geometry = check_header(header, file.size)
        self.header = header
        self.header_end = header.header_size * header.cluster_size
        self.size = header.image_size
        self.backing_file = await self._read_backing_name()
        l1 = CODEC.decode(await file.read(header.l1_table_offset, self.geometry.table_bytes))
        self.setup_mapping(header.cluster_size)
        self.tables = TwoLevelMap(
            file=file, l1=l1, l1_offset=header.l1_table_offset,
            block_bits=self.geometry.cluster_bits, l2_bits=self.geometry.table_bits,
            codec=CODEC, classify=self._classify, check_table=self._check_l2_offset,
            allocate=self.allocate, cache_bytes=L2_CACHE_BYTES)
        writable = not self.node.read_only and file.driver.writable
        if writable and header.features & QED_F_NEED_CHECK and not ctx.check:
            # as QEMU: a read-write open of an image left dirty repairs it
            await self._repair_at_open()

    async def _read_backing_name(self) -> str | None:
        header = self.header
        if not header.features & QED_F_BACKING_FILE or not header.backing_filename_size:
            return None
        raw = await self.children["file"].read(header.backing_filename_offset,
                                               header.backing_filename_size)
        return decode_backing_name(raw) or None

    def child_refs(self) -> dict[str, ChildRef]:
        if not self.backing_file:
            return {}
        raw = self.header.features & QED_F_BACKING_FORMAT_NO_PROBE
        return {"backing": ChildRef(self.backing_file, "raw" if raw else None)}

    async def _repair_at_open(self) -> None:
        result = await self._check_and_repair(repair=True)
        if result.corruptions:
            log.warning("%s: the QED consistency check left %d errors (see 'imgfs check')",
                        self.node.filename, result.corruptions)

    # -- header updates -----------------------------------------------------------------

    async def _write_header_field(self, offset: int, value: int, header: Header) -> None:
        """One 64-bit field of the header, made durable; `header` is the new one."""
        file = self.children["file"]
        await file.write(offset, struct.pack("<Q", value))
        await file.flush()
        self.header = header

    async def _set_features(self, features: int) -> None:
        await self._write_header_field(OFFSET_FEATURES, features,
                                       self.header._replace(features=features))

    # -- the mapped layer's hooks -------------------------------------------------------------

    def _classify(self, entry: int) -> tuple[MapKind, int]:
        if entry > ZERO_CLUSTER and not valid_cluster_offset(
                entry, self.geometry, self.header_end, self.children["file"].size):
            raise CorruptImage(f"cluster offset {entry:#x} is unaligned, inside the header "
                               "or past the end of the file")
        return classify_entry(entry)

    def _check_l2_offset(self, l2_offset: int) -> None:
        file_size = self.children["file"].size
        if not valid_cluster_offset(l2_offset, self.geometry, self.header_end, file_size) \
                or l2_offset + self.geometry.table_bytes > file_size:
            raise CorruptImage(f"L2 table offset {l2_offset:#x} is unaligned, inside the "
                               f"header, or runs past the end of the {file_size}-byte file")

    async def lookup(self, offset: int, length: int) -> Mapping:
        return await self.tables.lookup(offset, length)

    async def map_blocks(self, guest_offset: int, count: int, host_offset: int | None) -> None:
        if host_offset is None:
            await self.tables.map_run(guest_offset, count, ZERO_CLUSTER, 0)
        else:
            await self.tables.map_run(guest_offset, count, host_offset, self.block_size)

    async def prepare_metadata_change(self) -> None:
        """Set the need-check flag before the first table change, so a crash
        in the middle is repaired by the next read-write open; unknown
        auto-clear bits go first (spec: "Header")."""
        if self.marked:
            return
        if self.header.autoclear_features:
            await self._write_header_field(OFFSET_AUTOCLEAR, 0,
                                           self.header._replace(autoclear_features=0))
        if not self.header.features & QED_F_NEED_CHECK:
            await self._set_features(self.header.features | QED_F_NEED_CHECK)
        self.marked = True

    def check_in_place(self, host_offset: int, length: int) -> None:
        l1_offset = self.header.l1_table_offset
        if host_offset < self.header_end or (
                host_offset < l1_offset + self.geometry.table_bytes and
                l1_offset < host_offset + length):
            raise CorruptImage(f"data cluster at host offset {host_offset:#x} overlaps the "
                               "header or the L1 table")
        super().check_in_place(host_offset, length)
        if self.tables.overlaps_table(host_offset, length):
            raise CorruptImage(f"data cluster at host offset {host_offset:#x} overlaps an "
                               "L2 table")

    # -- close, resize ------------------------------------------------------------------------

    async def aclose(self) -> None:
        if not self.marked:
            return
        async with self.lock:       # shielded: a clean close always finishes
            await self.children["file"].flush()     # tables durable before the flag goes
            await self._set_features(self.header.features & ~QED_F_NEED_CHECK)
            self.marked = False

    async def truncate(self, size: int, preallocation: str = "off") -> None:
        if preallocation != "off":
            raise Unsupported(f"preallocation={preallocation} is not supported for QED")
        if size < self.size:
            raise Unsupported("shrinking QED images is not supported")
        backing = self.node.backing
        if size > self.size and backing is not None and backing.size > self.size:
            # the backing file would show through the new area (QEMU refuses
            # to grow a QED image with a backing file at all)
            raise Unsupported("growing a QED image over a longer backing file is not "
                              "supported")
        if size % SECTOR or size > self.geometry.max_image_size:
            raise UsageError(f"invalid QED image size {size} (a multiple of {SECTOR}, at "
                             f"most {self.geometry.max_image_size})")
        old_size = self.size
        async with self.lock:
            await self._write_header_field(OFFSET_IMAGE_SIZE, size,
                                           self.header._replace(image_size=size))
            self.size = size
        # whatever the last cluster held past the old end now reads as zeros
        tail_end = min(size, align_up(old_size, self.block_size))
        if tail_end > old_size:
            await self.write(old_size, bytes(tail_end - old_size))

    # -- information and check ----------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        return {"cluster-size": self.geometry.cluster_size}

    async def _check_and_repair(self, *, repair: bool) -> CheckResult:
        """The consistency check; with `repair`, damaged entries are cleared,
        the image checked again, and the need-check flag cleared."""
        file = self.children["file"]
        async with self.lock:
            result, fixes = await checks.scan(file, self.geometry, self.header,
                                              self.tables.l1)
            if not repair:
                return result
            if fixes:
                await checks.clear_entries(file, fixes)
                for fix in fixes:
                    if fix.table_offset == self.header.l1_table_offset:
                        self.tables.l1[fix.index] = 0
                self.tables.cache.clear()
                result, _ = await checks.scan(file, self.geometry, self.header,
                                              self.tables.l1)
                result.corruptions_fixed = len(fixes)
            # as QEMU, a repair pass clears the flag even if errors remain
            if self.header.features & QED_F_NEED_CHECK and not self.marked:
                await self._set_features(self.header.features & ~QED_F_NEED_CHECK)
            return result

    async def check(self, repair: str | None = None) -> CheckResult:
        """`imgfs check [-r leaks|all]`: both modes clear damaged entries
        (QED cannot give leaked clusters back), as qemu-img does."""
        return await self._check_and_repair(repair=repair is not None)

    # -- creation ------------------------------------------------------------------------------

    @classmethod
    async def create(cls, target: Any, size: int, options: dict[str, Any],
                     ctx: OpenContext) -> None:
        check_create_options(options)
        head, file_length = new_image(round_size(size), options)
        await create_image_file(target, ctx, head, file_length)


DRIVERS = [QedDriver]
