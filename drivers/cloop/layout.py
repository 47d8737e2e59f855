"""cloop V2.0 on disk: header, offset table, chunks (pure, no I/O).

See the package docstring for the layout.  Probing imports only this module.
"""
from __future__ import annotations

import array
import functools
import re
import struct
import sys
import zlib
from types import ModuleType
from typing import NamedTuple

from imgfs.errors import CorruptImage, InvalidImage, Unsupported
from imgfs.signatures import probe_cloop

#: the shell preamble fills the first 128 bytes
PREAMBLE_SIZE = 128
#: block_size and n_blocks, big-endian, after the preamble
HEADER = struct.Struct(">II")
OFFSETS_START = PREAMBLE_SIZE + HEADER.size
SECTOR = 512
SUPPORTED_VERSION = b"2.0"
#: QEMU's limits: blocks up to 64 MiB, an offset table up to 512 MiB, a
#: compressed chunk up to twice the largest block
MAX_BLOCK_SIZE = 64 * 1024 * 1024
MAX_OFFSETS_BYTES = 512 * 1024 * 1024
MAX_CHUNK_SIZE = 2 * MAX_BLOCK_SIZE

_VERSION = re.compile(rb"#!/bin/sh\n#V(\d+\.\d+) Format\n")


class Header(NamedTuple):
    block_size: int
    n_blocks: int

    @classmethod
    def unpack(cls, raw: bytes) -> Header:
        if len(raw) < OFFSETS_START:
            raise InvalidImage(f"file too short for a cloop header ({len(raw)} bytes)")
        return cls(*HEADER.unpack_from(raw, PREAMBLE_SIZE))

    def pack(self) -> bytes:
        return HEADER.pack(*self)


def probe(head: bytes, filename: str) -> int:
    """A weak score for the shell preamble of any cloop version, as QEMU
    (the header has no magic; a version other than 2.0 is refused at open)."""
    return probe_cloop(head, filename)


def check_preamble(preamble: bytes) -> None:
    """QEMU reads any file it is told is cloop; imgfs too, but a preamble
    that names another version announces a layout it does not know."""
    match = _VERSION.match(preamble)
    if match and match.group(1) != SUPPORTED_VERSION:
        raise Unsupported(f"cloop V{match.group(1).decode()} images are not supported "
                          "(only V2.0)")


def check_header(header: Header, file_size: int) -> int:
    """The bytes of the offset table, every field that sizes it checked."""
    block_size = header.block_size
    if block_size == 0 or block_size % SECTOR or block_size > MAX_BLOCK_SIZE:
        raise InvalidImage(f"block_size {block_size} is not a non-zero multiple of {SECTOR} "
                           f"of at most {MAX_BLOCK_SIZE}")
    table_bytes = (header.n_blocks + 1) * 8
    if table_bytes > MAX_OFFSETS_BYTES:
        raise InvalidImage(f"n_blocks {header.n_blocks} needs an offset table of "
                           f"{table_bytes} bytes (at most {MAX_OFFSETS_BYTES}): try a larger "
                           "block size")
    if OFFSETS_START + table_bytes > file_size:
        raise InvalidImage(f"offset table of {header.n_blocks + 1} entries runs past the end "
                           f"of the {file_size}-byte file")
    return table_bytes


def decode_offsets(raw: bytes) -> array.array[int]:
    """The big-endian 64-bit chunk offsets, checked: chunk N is the bytes
    from offset N to offset N + 1, so they may not decrease, and no chunk
    may be larger than QEMU accepts."""
    offsets = array.array("Q", raw)
    if sys.byteorder == "little":
        offsets.byteswap()
    for index in range(1, len(offsets)):
        size = offsets[index] - offsets[index - 1]
        if size < 0:
            raise InvalidImage(f"chunk offsets decrease at index {index} "
                               f"({offsets[index - 1]:#x} then {offsets[index]:#x})")
        if size > MAX_CHUNK_SIZE:
            raise InvalidImage(f"chunk {index - 1} of {size} bytes is larger than "
                               f"{MAX_CHUNK_SIZE}")
    return offsets


@functools.cache
def inflater_library() -> ModuleType:
    """ISA-L's zlib where it is installed (faster), else zlib; imported at
    the first inflation, not when probing imports this module."""
    try:
        from isal import isal_zlib
    except ImportError:                 # (an optional speed-up: zlib does the same)
        return zlib
    return isal_zlib


def inflate_block(chunk: bytes, block_size: int, index: int) -> bytes:
    """Block `index` from its zlib stream: exactly `block_size` bytes.  A
    stream that would produce more is refused once `block_size` bytes are
    out (a decompression bomb costs no more than one block)."""
    if not chunk:
        raise CorruptImage(f"chunk {index} is empty (expected a zlib stream)")
    library = inflater_library()
    inflater = library.decompressobj()
    try:
        block = inflater.decompress(chunk, block_size)
        # a full block may stop short of the stream's end marker: one more
        # byte out means the stream holds more than a block
        if not inflater.eof and len(block) == block_size and \
                inflater.decompress(inflater.unconsumed_tail, 1):
            raise CorruptImage(f"chunk {index} inflates past the block size ({block_size})")
    except library.error as exc:
        raise CorruptImage(f"chunk {index} does not decompress: {exc}") from None
    if not inflater.eof:
        raise CorruptImage(f"chunk {index} ({len(chunk)} bytes) ends before its zlib stream")
    if len(block) != block_size:
        raise CorruptImage(f"chunk {index} inflates to {len(block)} bytes "
                           f"(expected {block_size})")
    return block
