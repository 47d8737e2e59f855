"""qcow version 1 on disk: header, geometry, table math, new images (pure).

See the package docstring for the layout.  Nothing here does I/O: probing
imports only this module.
"""
from __future__ import annotations

import array
import struct
from dataclasses import dataclass
from typing import Any, NamedTuple

from imgfs.errors import InvalidImage, Unsupported, UsageError
from imgfs.mapped import MapKind
from imgfs.options import Bool, Opt, Schema, Str, choice
from imgfs.tablecache import TableCodec

from ..qcow2.cluster import TwoLevelTables

MAGIC = b"QFI\xfb"
QCOW_VERSION = 1
QCOW_CRYPT_NONE = 0
QCOW_CRYPT_AES = 1
QCOW_OFLAG_COMPRESSED = 1 << 63
#: QEMU's limits: clusters and L2 tables of 512 bytes .. 64 KiB
MIN_CLUSTER_BITS, MAX_CLUSTER_BITS = 9, 16
MIN_L2_BITS, MAX_L2_BITS = 6, 13
#: QEMU refuses longer backing file names
MAX_BACKING_FILE_NAME = 1023
#: the biggest L1 table we load (qcow2's QCOW_MAX_L1_SIZE): 8 TiB with
#: either geometry qemu-img creates
MAX_L1_BYTES = 32 * 1024 * 1024
SECTOR = 512
#: bytes of L2 tables kept in memory
L2_CACHE_BYTES = 4 * 1024 * 1024
#: most bytes one allocating write builds in memory at once
MAX_ALLOCATION_BYTES = 32 * 1024 * 1024

# -- the header ----------------------------------------------------------------------------

HEADER = struct.Struct(">4sIQIIQBBHIQ")


class Header(NamedTuple):
    magic: bytes
    version: int
    backing_file_offset: int
    backing_file_size: int
    mtime: int
    size: int
    cluster_bits: int
    l2_bits: int
    padding: int
    crypt_method: int
    l1_table_offset: int

    @classmethod
    def unpack(cls, raw: bytes) -> Header:
        if len(raw) < HEADER.size:
            raise InvalidImage(f"file too short for a qcow header ({len(raw)} bytes)")
        return cls(*HEADER.unpack_from(raw))

    def pack(self) -> bytes:
        return HEADER.pack(*self)


def probe(head: bytes, filename: str) -> int:
    """100 for the qcow magic with version 1 (the registry's light probe)."""
    if len(head) >= 8 and head[:4] == MAGIC and struct.unpack(">I", head[4:8])[0] == 1:
        return 100
    return 0


# -- layout math (pure) ----------------------------------------------------------------------

@dataclass(frozen=True)
class Geometry(TwoLevelTables):
    """Cluster and L2 table sizes of one image."""

    cluster_bits: int
    l2_bits: int

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def l2_entries(self) -> int:
        return 1 << self.l2_bits

    @property
    def l2_bytes(self) -> int:
        return 8 << self.l2_bits



def compressed_location(entry: int, cluster_bits: int) -> tuple[int, int]:
    """(host offset, byte count) of a compressed cluster's L2 entry."""
    shift = 63 - cluster_bits
    return entry & ((1 << shift) - 1), (entry >> shift) & ((1 << cluster_bits) - 1)


def compressed_entry(host_offset: int, length: int, cluster_bits: int) -> int:
    return QCOW_OFLAG_COMPRESSED | (length << (63 - cluster_bits)) | host_offset


#: L1 and L2 tables: big-endian 64-bit entries
CODEC = TableCodec(8, big_endian=True)


def classify_entry(entry: int) -> tuple[MapKind, int]:
    """An L2 entry: 0 unallocated, bit 63 compressed, else a cluster's host offset."""
    if entry == 0:
        return MapKind.UNALLOCATED, 0
    if entry & QCOW_OFLAG_COMPRESSED:
        return MapKind.TRANSFORMED, 0
    return MapKind.DATA, entry


def plain_run(entries: array.array[int], index: int, count: int, cluster_size: int) -> int:
    """How many clusters from `index` (at most `count`) are plain and
    contiguous on the host, so one read or write covers them."""
    first = entries[index]
    run = 1
    while run < count and entries[index + run] == first + run * cluster_size:
        run += 1
    return run


def unpack_table(raw: bytes) -> array.array[int]:
    return CODEC.decode(raw)


def align_up(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


def check_header(header: Header, file_size: int) -> Geometry:
    """Every field that sizes an allocation, an offset or a loop, checked
    before any of them is used; one sentence per refusal."""
    if header.magic != MAGIC or header.version != QCOW_VERSION:
        raise InvalidImage(f"not a qcow version 1 image (magic {header.magic!r}, "
                           f"version {header.version})")
    if not MIN_CLUSTER_BITS <= header.cluster_bits <= MAX_CLUSTER_BITS:
        raise InvalidImage(f"cluster_bits {header.cluster_bits} out of range (expected "
                           f"{MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS}: 512 B .. 64 KiB clusters)")
    if not MIN_L2_BITS <= header.l2_bits <= MAX_L2_BITS:
        raise InvalidImage(f"l2_bits {header.l2_bits} out of range (expected "
                           f"{MIN_L2_BITS}..{MAX_L2_BITS}: 512 B .. 64 KiB L2 tables)")
    if header.crypt_method > QCOW_CRYPT_AES:
        raise InvalidImage(f"crypt_method {header.crypt_method} unknown (expected 0 or 1)")
    geometry = Geometry(header.cluster_bits, header.l2_bits)
    if header.size >= 1 << 63 or \
            geometry.l1_entries_for(header.size) * 8 > MAX_L1_BYTES:
        raise InvalidImage(f"size {header.size} too large (its L1 table would exceed "
                           f"{MAX_L1_BYTES} bytes)")
    l1_end = header.l1_table_offset + geometry.l1_entries_for(header.size) * 8
    if l1_end > file_size:
        raise InvalidImage(f"L1 table at {header.l1_table_offset:#x} (+"
                           f"{l1_end - header.l1_table_offset}) runs past the end of the "
                           f"{file_size}-byte file")
    if header.backing_file_offset:
        if header.backing_file_size > MAX_BACKING_FILE_NAME:
            raise InvalidImage(f"backing_file_size {header.backing_file_size} too long "
                               f"(at most {MAX_BACKING_FILE_NAME})")
        if header.backing_file_offset + header.backing_file_size > file_size:
            raise InvalidImage(f"backing file name at {header.backing_file_offset:#x} runs "
                               f"past the end of the {file_size}-byte file")
    return geometry


# -- creation (pure) ---------------------------------------------------------------------------

CREATE_OPTS = Schema(
    Opt("backing_file", Str, help="file name of a base image"),
    Opt("backing_fmt", Str, help="image format of the base image (not stored in qcow)"),
    Opt("encrypt.format", choice("aes"),
        help="encrypt the image: aes (legacy and broken, refused: use qcow2 "
             "with encrypt.format=luks)"),
    Opt("encrypt.key-secret", Str, help="ID of the secret that provides the AES key"),
    Opt("encryption", Bool, default=False,
        help="encrypt the image with format 'aes' (refused, as encrypt.format=aes)"),
)


def check_create_options(options: dict[str, Any]) -> None:
    if options["encryption"] or options["encrypt.format"]:
        raise Unsupported("legacy qcow AES encryption cannot be created (the scheme is "
                          "broken): use -f qcow2 -o encrypt.format=luks")
    if options["encrypt.key-secret"]:
        raise UsageError("encrypt.key-secret needs encrypt.format (and qcow encryption "
                         "cannot be created: use -f qcow2 -o encrypt.format=luks)")
    if options["backing_fmt"] and not options["backing_file"]:
        raise UsageError("backing_fmt requires backing_file")
    backing = options["backing_file"] or ""
    if len(backing.encode()) > MAX_BACKING_FILE_NAME:
        raise UsageError(f"backing file name longer than {MAX_BACKING_FILE_NAME} bytes")


def new_image(size: int, backing_file: str | None) -> tuple[bytes, int]:
    """Header and backing file name of a new image, and the file's length.

    As qemu-img: 512-byte clusters with 4096-entry L2 tables when there is
    a backing file (fine-grained copy-on-write), 4 KiB clusters with
    512-entry tables otherwise; the name follows the header, the L1 table
    follows at the next 8-byte boundary and is padded to whole sectors."""
    name = (backing_file or "").encode()
    geometry = Geometry(9, 12) if name else Geometry(12, 9)
    l1_bytes = geometry.l1_entries_for(size) * 8
    if l1_bytes > MAX_L1_BYTES:
        raise UsageError(f"image size {size} too large for qcow (at most "
                         f"{MAX_L1_BYTES // 8 * geometry.l1_span} bytes)")
    l1_offset = align_up(HEADER.size + len(name), 8)
    header = Header(MAGIC, QCOW_VERSION, HEADER.size if name else 0, len(name), 0, size,
                    geometry.cluster_bits, geometry.l2_bits, 0, QCOW_CRYPT_NONE, l1_offset)
    return header.pack() + name, l1_offset + align_up(l1_bytes, SECTOR)
