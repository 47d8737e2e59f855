"""The qcow version 1 driver: open, block_status, read, write, create.

Reads are `block_status` alone for plain clusters (host-contiguous runs
become one read by the core); compressed and AES clusters go through
`read_data`.  Writes hold the metadata lock: clusters already allocated
are written in place, anything else gets new clusters at the end of the
file, filled around the new bytes with the old contents.
"""
from __future__ import annotations

import array
import bisect
import logging
import os
import struct
from collections import OrderedDict
from typing import Any

import trio

from imgfs.block import DATA, UNALLOCATED, ZERO, BlockDriver, ChildRef, Extent, Kind
from imgfs.errors import CorruptImage, InvalidImage, ReadOnly, Unsupported, UsageError
from imgfs.node import OpenContext
from imgfs.options import Opt, Schema

from ..qcow2.compress import compress_cluster, decompress_cluster
from ..qcow2.header import COMPRESSION_ZLIB
from .layout import (
    CREATE_OPTS,
    HEADER,
    L2_CACHE_BYTES,
    MAX_ALLOCATION_BYTES,
    MAX_BACKING_FILE_NAME,
    QCOW_CRYPT_AES,
    QCOW_OFLAG_COMPRESSED,
    SECTOR,
    Header,
    align_up,
    check_create_options,
    check_header,
    compressed_entry,
    compressed_location,
    is_plain,
    new_image,
    pack_table,
    plain_run,
    unallocated_run,
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


class QcowDriver(BlockDriver):
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
        self.l1 = unpack_table(await file.read(header.l1_table_offset, self.l1_size * 8))
        self.backing_file = await self._read_backing_name()
        self.file_end = file.size
        self.l2_cache: OrderedDict[int, array.array[int]] = OrderedDict()
        self.l2_cache_tables = max(4, L2_CACHE_BYTES // self.geometry.l2_bytes)
        self.lock = trio.Lock()
        self.compressed_cache: tuple[int, bytes] | None = None
        self.l2_offsets: list[int] | None = None
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
        self.request_alignment = SECTOR_SIZE
        log.warning("%s", legacy_aes_warning("qcow", self.node.filename))

    def child_refs(self) -> dict[str, ChildRef]:
        if self.backing_file:
            return {"backing": ChildRef(self.backing_file, None)}
        return {}

    # -- metadata lookups ----------------------------------------------------------------------

    async def _l2_table(self, l2_offset: int) -> array.array[int]:
        table = self.l2_cache.get(l2_offset)
        if table is not None:
            self.l2_cache.move_to_end(l2_offset)
            return table
        async with self.lock:        # a write may be loading (and changing) it too
            table = self.l2_cache.get(l2_offset)
            if table is None:
                table = await self._load_l2(l2_offset)
            return table

    async def _load_l2(self, l2_offset: int) -> array.array[int]:
        file = self.children["file"]
        l2_bytes = self.geometry.l2_bytes
        if self._overlaps_metadata(l2_offset, l2_bytes) or l2_offset + l2_bytes > file.size:
            raise CorruptImage(f"L2 table offset {l2_offset:#x} overlaps the header or L1 "
                               f"table, or runs past the end of the {file.size}-byte file")
        table = unpack_table(await file.read(l2_offset, l2_bytes))
        self._cache_l2(l2_offset, table)
        return table

    def _cache_l2(self, l2_offset: int, table: array.array[int]) -> None:
        self.l2_cache[l2_offset] = table
        while len(self.l2_cache) > self.l2_cache_tables:
            self.l2_cache.popitem(last=False)

    async def _table_for(self, offset: int) -> array.array[int] | None:
        l1_index = self.geometry.l1_index(offset)
        if l1_index >= len(self.l1) or not self.l1[l1_index]:
            return None
        return await self._l2_table(self.l1[l1_index])

    # -- reads ---------------------------------------------------------------------------------

    async def block_status(self, offset: int, length: int) -> Extent:
        geometry = self.geometry
        span_end = (geometry.l1_index(offset) + 1) * geometry.l1_span
        length = min(length, span_end - offset)
        table = await self._table_for(offset)
        if table is None:
            return Extent(length, UNALLOCATED)
        index = geometry.l2_index(offset)
        within = geometry.offset_in_cluster(offset)
        clusters = -(-(within + length) // self.cluster_size)
        entry = table[index]
        if entry == 0:
            run = unallocated_run(table, index, clusters)
            return Extent(min(length, run * self.cluster_size - within), UNALLOCATED)
        if entry & QCOW_OFLAG_COMPRESSED:
            return Extent(min(length, self.cluster_size - within), DATA)
        run = plain_run(table, index, clusters, self.cluster_size)
        count = min(length, run * self.cluster_size - within)
        host_offset = entry + within
        # Past the end of its file a cluster reads as zeros, as in QEMU.
        available = self.children["file"].size - host_offset
        if available <= 0:
            return Extent(count, ZERO)
        if self.crypto is not None:             # read_data decrypts it
            return Extent(min(count, available), DATA)
        return Extent(min(count, available), DATA, host_offset)

    async def read_data(self, offset: int, length: int, extent: Extent) -> bytes:
        table = await self._table_for(offset)
        entry = table[self.geometry.l2_index(offset)] if table is not None else 0
        within = self.geometry.offset_in_cluster(offset)
        if is_plain(entry):                     # an AES cluster run
            raw = await self.children["file"].read(entry + within, length)
            return bytes(await self.crypto.decrypt(offset, raw))
        if not entry & QCOW_OFLAG_COMPRESSED:
            raise CorruptImage(f"no data cluster at guest offset {offset}")
        cluster = await self._decompress(entry)
        return cluster[within:within + length]

    async def _decompress(self, entry: int) -> bytes:
        cached = self.compressed_cache
        if cached is not None and cached[0] == entry:
            return cached[1]
        host_offset, count = compressed_location(entry, self.geometry.cluster_bits)
        file = self.children["file"]
        if host_offset >= file.size:
            raise CorruptImage(f"compressed cluster at {host_offset:#x} lies beyond the end "
                               f"of the {file.size}-byte file")
        raw = await file.read(host_offset, min(count, file.size - host_offset))
        cluster = decompress_cluster(raw, self.cluster_size, COMPRESSION_ZLIB)
        self.compressed_cache = (entry, cluster)
        return cluster

    # -- writes --------------------------------------------------------------------------------

    async def write(self, offset: int, data: bytes) -> None:
        if self.crypto is not None:
            from ..qcow2.crypt_options import legacy_aes_read_only
            raise ReadOnly(legacy_aes_read_only("qcow"))
        view = memoryview(data)
        done = 0
        async with self.lock:
            while done < len(data):
                done += await self._write_step(offset + done, view[done:])

    async def _write_step(self, offset: int, data: memoryview) -> int:
        """Write a prefix of `data` inside one L2 table; return its length."""
        geometry = self.geometry
        span_end = (geometry.l1_index(offset) + 1) * geometry.l1_span
        length = min(len(data), span_end - offset)
        table = await self._table_for_write(offset)
        index = geometry.l2_index(offset)
        within = geometry.offset_in_cluster(offset)
        clusters = -(-(within + length) // self.cluster_size)
        entries = table if table is not None else array.array("Q", bytes(8 * clusters))
        first = 0 if table is None else index
        if is_plain(entries[first]):
            run = plain_run(entries, first, clusters, self.cluster_size)
            count = min(length, run * self.cluster_size - within)
            await self._write_in_place(entries[first] + within, data[:count])
            return count
        run = 1
        while run < clusters and not is_plain(entries[first + run]):
            run += 1
        run = min(run, max(1, MAX_ALLOCATION_BYTES >> geometry.cluster_bits))
        count = min(length, run * self.cluster_size - within)
        await self._allocating_write(offset, data[:count], entries[first:first + run])
        return count

    async def _table_for_write(self, offset: int) -> array.array[int] | None:
        l1_index = self.geometry.l1_index(offset)
        l2_offset = self.l1[l1_index]
        if not l2_offset:
            return None
        table = self.l2_cache.get(l2_offset)
        return table if table is not None else await self._load_l2(l2_offset)

    def _overlaps_metadata(self, offset: int, length: int) -> bool:
        """The header with the backing file name, or the L1 table: never a
        guest cluster or an L2 table.  (QEMU puts the table right after the
        name; a rebase may have moved it to the end of the file.)"""
        header = self.header
        header_end = max(HEADER.size, header.backing_file_offset + header.backing_file_size)
        l1_start = header.l1_table_offset
        return offset < header_end or \
            (offset < l1_start + self.l1_size * 8 and offset + length > l1_start)

    async def _write_in_place(self, host_offset: int, data: memoryview) -> None:
        if self._overlaps_metadata(host_offset, len(data)):
            raise CorruptImage(f"data cluster at host offset {host_offset:#x} overlaps the "
                               "header or the L1 table")
        file_end = align_up(self.children["file"].size, self.cluster_size)
        if host_offset + len(data) > file_end:
            raise CorruptImage(f"data cluster at host offset {host_offset:#x} lies beyond "
                               f"the end of the {file_end}-byte file")
        if self._overlaps_l2_table(host_offset, len(data)):
            raise CorruptImage(f"data cluster at host offset {host_offset:#x} overlaps an "
                               "L2 table")
        await self._grow_file(host_offset + len(data))
        await self.children["file"].write(host_offset, bytes(data))

    def _overlaps_l2_table(self, host_offset: int, length: int) -> bool:
        """A hostile L2 entry may point at a table: the write would rewrite
        the mapping itself.  The sorted table offsets are built at the first
        in-place write (one pass over L1) and kept up to date."""
        if self.l2_offsets is None:
            self.l2_offsets = sorted({entry for entry in self.l1 if entry})
        index = bisect.bisect_left(self.l2_offsets, host_offset + length)
        return index > 0 and self.l2_offsets[index - 1] + self.geometry.l2_bytes > host_offset

    async def _allocating_write(self, offset: int, data: memoryview,
                                old_entries: array.array[int]) -> None:
        """New clusters for `data` (which starts in the first of them), filled
        around it with the old contents: the compressed cluster's, else the
        backing node's, else zeros."""
        cluster_size = self.cluster_size
        start = offset - self.geometry.offset_in_cluster(offset)
        end = align_up(offset + len(data), cluster_size)
        clusters = (end - start) // cluster_size
        if self.node.backing is None and not any(old_entries[:clusters]) and \
                data == bytes(len(data)):
            return                  # zeros over unallocated clusters: nothing to do
        buffer = bytearray(end - start)
        if offset > start:
            buffer[:cluster_size] = await self._old_cluster(start, old_entries[0])
        if offset + len(data) < end and (clusters > 1 or offset == start):
            buffer[-cluster_size:] = await self._old_cluster(end - cluster_size,
                                                             old_entries[clusters - 1])
        buffer[offset - start:offset - start + len(data)] = data
        host_offset = await self._allocate(len(buffer))
        await self.children["file"].write(host_offset, bytes(buffer))
        await self._map_clusters(start, [host_offset + number * cluster_size
                                         for number in range(clusters)])

    async def _old_cluster(self, guest_offset: int, entry: int) -> bytes:
        if entry & QCOW_OFLAG_COMPRESSED:
            return await self._decompress(entry)
        length = min(self.cluster_size, self.size - guest_offset)
        old = await self.node.read_unallocated(guest_offset, length)
        return old.ljust(self.cluster_size, b"\0")

    async def _allocate(self, length: int) -> int:
        """Host space at the end of the file, cluster aligned (as QEMU)."""
        host_offset = align_up(self.file_end, self.cluster_size)
        await self._grow_file(host_offset + length)
        return host_offset

    async def _grow_file(self, end: int) -> None:
        """The file node refuses requests past its size: grow it first."""
        file = self.children["file"]
        if end > file.size:
            await file.truncate(end)
        self.file_end = max(self.file_end, end)

    async def _map_clusters(self, guest_offset: int, host_offsets: list[int]) -> None:
        """Point the L2 entries at new clusters (data already written), then,
        for a new L2 table, the L1 entry at the table."""
        geometry = self.geometry
        file = self.children["file"]
        l1_index = geometry.l1_index(guest_offset)
        index = geometry.l2_index(guest_offset)
        l2_offset = self.l1[l1_index]
        if l2_offset:
            table = await self._table_for_write(guest_offset)
            assert table is not None
            table[index:index + len(host_offsets)] = array.array("Q", host_offsets)
            await file.write(l2_offset + index * 8,
                             pack_table(table[index:index + len(host_offsets)]))
            return
        table = array.array("Q", bytes(geometry.l2_bytes))
        table[index:index + len(host_offsets)] = array.array("Q", host_offsets)
        l2_offset = await self._allocate(geometry.l2_bytes)
        await file.write(l2_offset, pack_table(table))
        await file.flush()          # the table is on disk before the L1 entry names it
        self.l1[l1_index] = l2_offset
        if self.l2_offsets is not None:
            bisect.insort(self.l2_offsets, l2_offset)
        await file.write(self.header.l1_table_offset + l1_index * 8,
                         struct.pack(">Q", l2_offset))
        self._cache_l2(l2_offset, table)

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
            self.l1 = array.array("Q", bytes(self.l1_size * 8))
            self.l2_cache.clear()
            self.l2_offsets = None
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
        raw = pack_table(self.l1)
        offset = await self._allocate(len(raw))
        file = self.children["file"]
        await file.write(offset, raw)
        await file.flush()
        await self._write_header(self.header._replace(l1_table_offset=offset))

    async def _write_header(self, header: Header) -> None:
        file = self.children["file"]
        await file.write(0, header.pack())
        await file.flush()
        self.header = header

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
            await self._grow_file(host_offset + len(packed))
            await self.children["file"].write(host_offset, packed)
            await self._map_clusters(guest_offset, [compressed_entry(
                host_offset, len(packed), self.geometry.cluster_bits)])

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
        from imgfs.graph import create_protocol_file
        check_create_options(options)
        size = align_up(size, SECTOR)             # qemu-img rounds up to whole sectors
        head, file_length = new_image(size, options["backing_file"])
        node = await create_protocol_file(os.fspath(target), ctx, size=0)
        try:
            await node.truncate(file_length)
            await node.write(0, head)
            await node.flush()
        finally:
            await node.aclose()


DRIVERS = [QcowDriver]
