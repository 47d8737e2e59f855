"""The DMG driver: open (trailer, block tables, chunk table) and the mapped
layer's hooks.

Raw chunks are DATA runs read in place (the core reads a host-contiguous
run in one call); zero-fill and ignore chunks are ZERO runs; a compressed
chunk is one TRANSFORMED block, decoded by `decode_block` through the
layer's decoded-block cache.
"""
from __future__ import annotations

from typing import Any

from imgfs.block import Kind
from imgfs.errors import CorruptImage
from imgfs.mapped import MapKind, MappedDriver, Mapping, run_decoder
from imgfs.node import OpenContext

from .codecs import DECODERS
from .layout import (
    RAW,
    SECTOR,
    TRAILER_SIZE,
    ZERO_FILL,
    ZERO_TYPES,
    ChunkTable,
    Trailer,
    check_trailer,
    chunk_table,
    metadata_range,
    mish_blocks_from_plist,
    mish_blocks_from_resource_fork,
)

#: decoded chunks kept: enough for the chunk being read and its neighbours,
#: within this many bytes (chunks are usually 1 MiB, at most 64 MiB)
DECODED_CACHE_BYTES = 32 * 1024 * 1024
MIN_DECODED_CHUNKS, MAX_DECODED_CHUNKS = 2, 16


class DmgDriver(MappedDriver):
    name = "dmg"
    kind = Kind.FORMAT
    read_only_format = True
    description = "Apple disk image, UDIF (read-only: raw, zero, zlib, bzip2, ADC, LZFSE)"
    past_eof_reads_zero = False     # every chunk is checked to lie inside the file
    reports_dirty_flag = False      # as qemu-img info

    # -- opening -------------------------------------------------------------------------

    async def open(self, options: dict[str, Any], ctx: OpenContext) -> None:
        file = self.children["file"]
        file_size = file.size
        tail_length = min(file_size, TRAILER_SIZE)
        trailer = Trailer.unpack(await file.read(file_size - tail_length, tail_length))
        check_trailer(trailer, file_size)
        self.trailer = trailer
        offset, length = metadata_range(trailer)
        metadata = await file.read(offset, length)
        if trailer.rsrc_fork_length:
            blocks = mish_blocks_from_resource_fork(metadata)
        else:
            blocks = mish_blocks_from_plist(metadata)
        self.chunks = chunk_table(blocks, trailer.data_fork_offset, file_size)
        self.size = trailer.sector_count * SECTOR
        self.setup_mapping(SECTOR, decoded_blocks=self._decoded_chunks())

    def _decoded_chunks(self) -> int:
        table = self.chunks
        largest = max((table.sectors[index] * SECTOR for index in range(len(table))
                       if table.kind[index] in DECODERS), default=SECTOR)
        return max(MIN_DECODED_CHUNKS, min(MAX_DECODED_CHUNKS,
                                           DECODED_CACHE_BYTES // largest))

    # -- the mapped layer's hooks -------------------------------------------------------------

    async def lookup(self, offset: int, length: int) -> Mapping:
        table: ChunkTable = self.chunks
        sector = offset // SECTOR
        index = table.find(sector)
        if index < 0:
            raise CorruptImage(f"no UDIF chunk maps sector {sector} (guest offset {offset})")
        chunk = table.chunk(index)
        start = chunk.first_sector * SECTOR
        count = min(length, start + chunk.sectors * SECTOR - offset)
        if chunk.kind in DECODERS:
            return Mapping(count, MapKind.TRANSFORMED, 0, index)
        kind = MapKind.DATA if chunk.kind == RAW else MapKind.ZERO
        host_offset = chunk.file_offset + offset - start
        count += self._continued(index, offset + count, length - count, host_offset + count)
        if kind is MapKind.DATA:
            return Mapping(count, kind, host_offset)
        return Mapping(count, kind)

    def _continued(self, index: int, offset: int, length: int, host_offset: int) -> int:
        """How far the run of chunk `index` goes on through the next chunks
        (zero after zero, raw chunks contiguous on the host)."""
        table = self.chunks
        kind = ZERO_FILL if table.kind[index] in ZERO_TYPES else RAW
        extra = 0
        index += 1
        while extra < length and index < len(table):
            chunk = table.chunk(index)
            same = ZERO_FILL if chunk.kind in ZERO_TYPES else chunk.kind
            if chunk.first_sector * SECTOR != offset + extra or same != kind or \
                    (kind == RAW and chunk.file_offset != host_offset + extra):
                break
            extra += min(length - extra, chunk.sectors * SECTOR)
            index += 1
        return extra

    def transformed_start(self, offset: int, token: Any) -> int:
        return int(self.chunks.first[token]) * SECTOR

    async def decode_block(self, token: Any) -> bytes:
        chunk = self.chunks.chunk(token)
        stored = await self.children["file"].read(chunk.file_offset, chunk.stored_length)
        try:
            size = chunk.sectors * SECTOR
            return await run_decoder(size, DECODERS[chunk.kind], stored, size)
        except CorruptImage as exc:
            raise CorruptImage(f"UDIF chunk at sector {chunk.first_sector}: {exc}") from None


DRIVERS = [DmgDriver]
