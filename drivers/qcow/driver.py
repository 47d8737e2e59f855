"""The qcow version 1 driver: open, the mapped layer's hooks, create.

qcow is a two-level table format on `imgfs.mapped`: the layer reads
(host-contiguous runs become one read by the core; compressed clusters
are decoded by `decode_block`, AES runs by `decrypt`), writes in place or
into new clusters appended at the end of the file with copy-on-write from
the backing node, and keeps the L2 tables.  What stays here is the header,
the entry format, the checks that refuse hostile entries, and compressed
writes.
"""
from __future__ import annotations

import array
import logging
from typing import Any

from imgfs.block import ChildRef, Kind
from imgfs.errors import CorruptImage, InvalidImage, ReadOnly, Unsupported, UsageError
from imgfs.mapped import MappedDriver, Mapping, TwoLevelMap, create_image_file
from imgfs.node import OpenContext
from imgfs.options import Opt, Schema
from imgfs.tablecache import DecodedCache

from ..qcow2.compress import compress_cluster, decompress_cluster
from ..qcow2.header import COMPRESSION_ZLIB
from .layout import (
    CODEC,
    CREATE_OPTS,
    HEADER,
    L2_CACHE_BYTES,
    MAX_ALLOCATION_BYTES,
    MAX_BACKING_FILE_NAME,
    QCOW_CRYPT_AES,
    SECTOR,
    Header,
    align_up,
    check_create_options,
    check_header,
    classify_entry,
    compressed_entry,
    compressed_location,
    new_image,
    unpack_table,
)
from .layout import probe as probe_header

log = logging.getLogger("imgfs")


def _parse_encrypt(raw: Any) -> dict[str, str]:
    """``encrypt.key-secret=ID`` (and ``encrypt.format=aes``) at open."""
    from ..qcow2.crypt_options import parse_encrypt_options
    options = parse_encrypt_options(raw)
    if options.get("format", "aes") != "aes":
        raise UsageError("qcow images can only be AES encrypted (encrypt.format=aes)")
    return options


class QcowDriver(MappedDriver):
    name = "qcow"
    kind = Kind.FORMAT
    supports_backing = True
    can_write_compressed = True
    description = "QEMU copy-on-write version 1 (read, write, create; legacy AES read-only)"
    open_opts = Schema(
        Opt("encrypt", _parse_encrypt,
            help="encrypt.key-secret=ID: the secret that provides the AES key"),
        passthrough=("encrypt.",),
    )
    create_opts = CREATE_OPTS
    max_allocation = MAX_ALLOCATION_BYTES

    @staticmethod
    def probe(head: bytes, filename: str) -> int:
        return probe_header(head, filename)

    # -- opening -------------------------------------------------------------------------

    async def open(self, options: dict[str, Any], ctx: OpenContext) -> None:
        file = self.children["file"]
        header = Header.unpack(await file.read(0, min(file.size, HEADER.size)))
        self.geometry = check_header(header, file.size)
        self.header = header
        self.cluster_size = self.geometry.cluster_size
        # QEMU counts the disk in whole sectors
        self.size = header.size // SECTOR * SECTOR
        self.l1_size = self.geometry.l1_entries_for(header.size)
        l1 = unpack_table(await file.read(header.l1_table_offset, self.l1_size * 8))
        self.backing_file = await self._read_backing_name()
        self.setup_mapping(self.cluster_size)
        self.tables = self._table_map(l1)
        self.crypto: Any = None
        if header.crypt_method == QCOW_CRYPT_AES:
            self._open_aes(options, ctx)

    async def _read_backing_name(self) -> str | None:
        header = self.header
        if not header.backing_file_offset or not header.backing_file_size:
            return None
        raw = await self.children["file"].read(header.backing_file_offset,
                                               header.backing_file_size)
        raw = raw.split(b"\0", 1)[0]        # QEMU reads it as a C string
        try:
            return raw.decode() or None
        except UnicodeDecodeError:
            raise InvalidImage("backing file name is not valid UTF-8") from None

    def _open_aes(self, options: dict[str, Any], ctx: OpenContext) -> None:
        from ..qcow2.crypt import open_aes_cipher
        from ..qcow2.crypt_options import SECTOR_SIZE, legacy_aes_read_only, legacy_aes_warning
        if not self.node.read_only:
            raise ReadOnly(legacy_aes_read_only("qcow"))
        self.crypto = open_aes_cipher(options, ctx, self.node.filename)
        self.encrypted = True
        self.request_alignment = SECTOR_SIZE
        log.warning("%s", legacy_aes_warning("qcow", self.node.filename))

    def child_refs(self) -> dict[str, ChildRef]:
        if self.backing_file:
            return {"backing": ChildRef(self.backing_file, None)}
        return {}

    def _table_map(self, l1: array.array[int]) -> TwoLevelMap:
        return TwoLevelMap(
            file=self.children["file"], l1=l1, l1_offset=self.header.l1_table_offset,
            block_bits=self.geometry.cluster_bits, l2_bits=self.geometry.l2_bits,
            codec=CODEC, classify=classify_entry, check_table=self._check_l2_offset,
            allocate=self.allocate, cache_bytes=L2_CACHE_BYTES)

    # -- the mapped layer's hooks -------------------------------------------------------------

    def _overlaps_metadata(self, offset: int, length: int) -> bool:
        """The header with the backing file name, or the L1 table: never a
        guest cluster or an L2 table.  (QEMU puts the table right after the
        name; a rebase may have moved it to the end of the file.)"""
        header = self.header
        header_end = max(HEADER.size, header.backing_file_offset + header.backing_file_size)
        l1_start = header.l1_table_offset
        return offset < header_end or \
            (offset < l1_start + self.l1_size * 8 and offset + length > l1_start)

    def _check_l2_offset(self, l2_offset: int) -> None:
        file = self.children["file"]
        l2_bytes = self.geometry.l2_bytes
        if self._overlaps_metadata(l2_offset, l2_bytes) or l2_offset + l2_bytes > file.size:
            raise CorruptImage(f"L2 table offset {l2_offset:#x} overlaps the header or L1 "
                               f"table, or runs past the end of the {file.size}-byte file")

    async def lookup(self, offset: int, length: int) -> Mapping:
        return await self.tables.lookup(offset, length)

    async def map_blocks(self, guest_offset: int, count: int, host_offset: int | None) -> None:
        assert host_offset is not None      # qcow has no zero clusters
        await self.tables.map_run(guest_offset, count, host_offset, self.cluster_size)

    async def decode_block(self, token: Any) -> bytes:
        host_offset, count = compressed_location(token, self.geometry.cluster_bits)
        file = self.children["file"]
        if host_offset >= file.size:
            raise CorruptImage(f"compressed cluster at {host_offset:#x} lies beyond the end "
                               f"of the {file.size}-byte file")
        raw = await file.read(host_offset, min(count, file.size - host_offset))
        return decompress_cluster(raw, self.cluster_size, COMPRESSION_ZLIB)

    async def decrypt(self, guest_offset: int, host_offset: int, raw: bytes) -> bytes:
        return bytes(await self.crypto.decrypt(guest_offset, raw))

    def check_in_place(self, host_offset: int, length: int) -> None:
        if self._overlaps_metadata(host_offset, length):
            raise CorruptImage(f"data cluster at host offset {host_offset:#x} overlaps the "
                               "header or the L1 table")
        super().check_in_place(host_offset, length)
        if self.tables.overlaps_table(host_offset, length):
            raise CorruptImage(f"data cluster at host offset {host_offset:#x} overlaps an "
                               "L2 table")

    # -- writes --------------------------------------------------------------------------------

    async def write(self, offset: int, data: bytes) -> None:
        if self.crypto is not None:
            from ..qcow2.crypt_options import legacy_aes_read_only
            raise ReadOnly(legacy_aes_read_only("qcow"))
        await super().write(offset, data)

    async def write_compressed(self, offset: int, data: bytes) -> None:
        """`convert -c`: whole clusters of `data` stored compressed, each at
        the end of the file (unaligned, as QEMU places them); partial
        clusters and clusters that do not shrink are written normally, and
        clusters of zeros on a layer without backing are skipped."""
        view = memoryview(data)
        position, end = offset, offset + len(data)
        while position < end:
            cluster_start = position - self.geometry.offset_in_cluster(position)
            cluster_end = min(cluster_start + self.cluster_size, self.size)
            step_end = min(end, cluster_end)
            chunk = bytes(view[position - offset:step_end - offset])
            if position != cluster_start or step_end != cluster_end:
                await self.write(position, chunk)
            elif any(chunk) or self.node.backing is not None:
                await self._write_compressed_cluster(cluster_start, chunk)
            position = step_end

    async def _write_compressed_cluster(self, guest_offset: int, data: bytes) -> None:
        packed = compress_cluster(data.ljust(self.cluster_size, b"\0"), COMPRESSION_ZLIB)
        if len(packed) >= self.cluster_size:     # the entry cannot say "a whole cluster"
            await self.write(guest_offset, data)
            return
        async with self.lock:
            host_offset = self.file_end
            await self.grow_file(host_offset + len(packed))
            await self.children["file"].write(host_offset, packed)
            await self.tables.set_entries(guest_offset, [compressed_entry(
                host_offset, len(packed), self.geometry.cluster_bits)])

    # -- whole-image operations (commit, rebase) --------------------------------------------

    async def make_empty(self) -> None:
        """An all-zero L1 table, and the file cut back to its end: every
        cluster then reads from the backing file (QEMU's qcow make_empty)."""
        file = self.children["file"]
        async with self.lock:
            l1_end = self.header.l1_table_offset + self.l1_size * 8
            await file.write(self.header.l1_table_offset, bytes(self.l1_size * 8))
            await file.flush()
            await file.truncate(l1_end)
            self.tables = self._table_map(CODEC.empty(self.l1_size))
            self.decoded = DecodedCache()
            self.file_end = l1_end

    async def set_backing(self, filename: str | None, fmt: str | None) -> None:
        """The name goes where QEMU puts it, between the header and the L1
        table (which moves to the end of the file when the name outgrows
        the room); qcow has no room for a format, so `fmt` is not recorded."""
        name = (filename or "").encode()
        if len(name) > MAX_BACKING_FILE_NAME:
            raise Unsupported(f"backing file name of {len(name)} bytes is too long "
                              f"(at most {MAX_BACKING_FILE_NAME})")
        file = self.children["file"]
        async with self.lock:
            if HEADER.size + len(name) > self.header.l1_table_offset:
                await self._move_l1_to_end()
            header = self.header
            old_end = header.backing_file_offset + header.backing_file_size \
                if header.backing_file_offset else HEADER.size
            # the name first, then the header fields that point at it
            area = min(max(old_end, HEADER.size + len(name)), header.l1_table_offset)
            await file.write(HEADER.size, name.ljust(area - HEADER.size, b"\0"))
            await file.flush()
            await self._write_header(header._replace(
                backing_file_offset=HEADER.size if name else 0, backing_file_size=len(name)))
        self.backing_file = filename or None

    async def _move_l1_to_end(self) -> None:
        """A copy of the L1 table at the end of the file, then the header
        pointing at it: the old table's bytes become free for the name."""
        raw = CODEC.encode(self.tables.l1)
        offset = await self.allocate(len(raw))
        file = self.children["file"]
        await file.write(offset, raw)
        await file.flush()
        await self._write_header(self.header._replace(l1_table_offset=offset))
        self.tables.l1_offset = offset

    async def _write_header(self, header: Header) -> None:
        file = self.children["file"]
        await file.write(0, header.pack())
        await file.flush()
        self.header = header

    # -- information ---------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        report: dict[str, Any] = {"cluster-size": self.cluster_size}
        if self.header.crypt_method:
            report["encrypted"] = True
        return report

    # -- creation ------------------------------------------------------------------------------

    @classmethod
    async def create(cls, target: Any, size: int, options: dict[str, Any],
                     ctx: OpenContext) -> None:
        check_create_options(options)
        size = align_up(size, SECTOR)             # qemu-img rounds up to whole sectors
        head, file_length = new_image(size, options["backing_file"])
        await create_image_file(target, ctx, head, file_length)


DRIVERS = [QcowDriver]
