"""The cloop driver: open and the mapped layer's lookup and decode_block.

Every block of a cloop image is TRANSFORMED (one zlib stream per block):
`lookup` names the block, `decode_block` reads and inflates its chunk,
and the layer's decoded-block cache keeps the last few inflated blocks,
so a sequential read inflates each chunk once.  Read-only, as in QEMU.
"""
from __future__ import annotations

from typing import Any

from imgfs.block import Kind
from imgfs.mapped import MapKind, MappedDriver, Mapping, run_decoder
from imgfs.node import OpenContext

from .layout import (
    OFFSETS_START,
    PREAMBLE_SIZE,
    SECTOR,
    Header,
    check_header,
    check_preamble,
    decode_offsets,
    inflate_block,
)
from .layout import probe as probe_header

#: inflated bytes the decoded-block cache holds (at least one block)
DECODED_CACHE_BYTES = 4 * 1024 * 1024


class CloopDriver(MappedDriver):
    name = "cloop"
    kind = Kind.FORMAT
    read_only_format = True
    reports_dirty_flag = False      # as qemu-img info shows it
    description = "compressed loop images, version 2.0 (Knoppix, create_compressed_fs)"
    request_alignment = SECTOR

    @staticmethod
    def probe(head: bytes, filename: str) -> int:
        return probe_header(head, filename)

    async def open(self, options: dict[str, Any], ctx: OpenContext) -> None:
        file = self.children["file"]
        head = await file.read(0, min(file.size, OFFSETS_START))
        header = Header.unpack(head)
        check_preamble(head[:PREAMBLE_SIZE])
        table_bytes = check_header(header, file.size)
        self.header = header
        self.offsets = decode_offsets(await file.read(OFFSETS_START, table_bytes))
        self.size = header.n_blocks * header.block_size
        self.setup_mapping(header.block_size, decoded_blocks=max(
            1, DECODED_CACHE_BYTES // header.block_size))

    # -- the mapped layer's hooks ---------------------------------------------------------

    async def lookup(self, offset: int, length: int) -> Mapping:
        index, within = divmod(offset, self.block_size)
        return Mapping(min(length, self.block_size - within), MapKind.TRANSFORMED, 0, index)

    async def decode_block(self, token: Any) -> bytes:
        index: int = token
        start, end = self.offsets[index], self.offsets[index + 1]
        file = self.children["file"]
        # as QEMU, a chunk may run past the end of the file (QEMU reads zeros
        # there): a stream that ends in the file still inflates
        end = min(end, file.size)
        chunk = await file.read(start, end - start) if end > start else b""
        return await run_decoder(self.block_size, inflate_block, chunk, self.block_size, index)


DRIVERS = [CloopDriver]
