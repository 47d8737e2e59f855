"""VDI on disk: header, geometry, block map entries, new images (pure, no I/O).

See the package docstring for the layout.  Probing imports only this module.
"""
from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass
from typing import Any, NamedTuple

from imgfs.errors import InvalidImage, Unsupported, UsageError
from imgfs.mapped import align_up
from imgfs.options import Bool, Opt, Schema, Str, choice

#: VDICore.h VDI_IMAGE_SIGNATURE, the little-endian u32 at offset 0x40
SIGNATURE = 0xBEDA107F
SIGNATURE_OFFSET = 0x40
#: version 1.1 (major in the high half): the only one QEMU and imgfs read
VERSION_1_1 = 0x00010001
#: VDIHEADER1 (QEMU writes it) and VDIHEADER1PLUS (VirtualBox: + LCHS geometry)
HEADER1_SIZE = 0x180
HEADER1PLUS_SIZE = 0x190
#: the pre-header: the text and the signature and version after it
PREHEADER_SIZE = 0x48
#: VDI_IMAGE_TYPE_*
TYPE_NORMAL, TYPE_FIXED, TYPE_UNDO, TYPE_DIFF = 1, 2, 3, 4
SECTOR = 512
#: the only block size VirtualBox and QEMU write
DEFAULT_BLOCK_SIZE = 1 << 20
MIN_BLOCK_SIZE, MAX_BLOCK_SIZE = SECTOR, 64 << 20
#: block map entries that are not block numbers
BLOCK_FREE = 0xFFFF_FFFF        # not in this image: zeros, or the parent's data
BLOCK_ZERO = 0xFFFF_FFFE        # reads as zeros (a discarded block)
#: QEMU's limit: the block map of the largest image it opens is just under 2 GiB
MAX_BLOCKS = 0x1FFF_FF80
QEMU_TEXT = b"<<< QEMU VM Virtual Disk Image >>>\n"
NULL_UUID = bytes(16)

HEADER = struct.Struct("<64sIIIII256sIIIIIIIQIIII16s16s16s16sIIII40x")
#: byte offset of blocks_allocated, rewritten after each new block
OFFSET_BLOCKS_ALLOCATED = 0x184


class Header(NamedTuple):
    """The 512-byte pre-header and header 1.1 (with VirtualBox's LCHS
    geometry at the end; zeros in QEMU's images)."""

    text: bytes
    signature: int
    version: int
    header_size: int
    image_type: int
    image_flags: int
    comment: bytes
    offset_bmap: int
    offset_data: int
    cylinders: int
    heads: int
    sectors: int
    sector_size: int
    unused: int
    disk_size: int
    block_size: int
    block_extra: int
    blocks_in_image: int
    blocks_allocated: int
    uuid_image: bytes
    uuid_last_modify: bytes
    uuid_link: bytes
    uuid_parent_modify: bytes
    lchs_cylinders: int
    lchs_heads: int
    lchs_sectors: int
    lchs_sector_size: int

    @classmethod
    def unpack(cls, raw: bytes) -> Header:
        if len(raw) < HEADER.size:
            raise InvalidImage(f"file too short for a VDI header ({len(raw)} bytes)")
        return cls(*HEADER.unpack_from(raw))

    def pack(self) -> bytes:
        return HEADER.pack(*self)

    @property
    def differencing(self) -> bool:
        """A child image: its free blocks read through to a parent.  (QEMU
        reads any image whose link UUID is null as a base image, whatever
        its type says, and refuses the others.)"""
        return self.uuid_link != NULL_UUID

    @property
    def static(self) -> bool:
        return self.image_type == TYPE_FIXED


def probe(head: bytes, filename: str) -> int:
    """100 for the signature at 0x40 (the text before it is free-form)."""
    field = head[SIGNATURE_OFFSET:SIGNATURE_OFFSET + 4]
    return 100 if len(field) == 4 and int.from_bytes(field, "little") == SIGNATURE else 0


def uuid_text(raw: bytes) -> str:
    """A UUID as VirtualBox shows it (RTUUID: the first three fields little-endian)."""
    return str(uuid.UUID(bytes_le=raw))


# -- layout math (pure) ----------------------------------------------------------------------

def is_power_of_two(value: int) -> bool:
    return value > 0 and not value & (value - 1)


@dataclass(frozen=True, slots=True)
class Geometry:
    """Where one image's block map and blocks are."""

    block_size: int
    blocks: int                 # entries in the block map
    offset_bmap: int
    offset_data: int

    @property
    def bmap_bytes(self) -> int:
        return 4 * self.blocks

    def host_offset(self, block_number: int) -> int:
        """The file offset of data block `block_number` (a map entry)."""
        return self.offset_data + block_number * self.block_size

    def block_number(self, host_offset: int) -> int:
        return (host_offset - self.offset_data) // self.block_size


def virtual_size(header: Header) -> int:
    """As QEMU: VBoxManage convertfromraw may write a size that is not whole
    sectors, and the last partial sector still counts."""
    return align_up(header.disk_size, SECTOR)


def check_header(header: Header, file_size: int) -> Geometry:
    """Every field that sizes an allocation, an offset or a loop, checked
    before any of them is used; one sentence per refusal."""
    if header.signature != SIGNATURE:
        raise InvalidImage(f"not a VDI image (signature {header.signature:#010x})")
    if header.version != VERSION_1_1:
        raise Unsupported(f"unsupported VDI version {header.version >> 16}."
                          f"{header.version & 0xFFFF} (only 1.1 is supported)")
    if header.sector_size != SECTOR:
        raise Unsupported(f"unsupported VDI sector size {header.sector_size} (expected "
                          f"{SECTOR})")
    block_size = header.block_size
    if not is_power_of_two(block_size) or not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE:
        raise InvalidImage(f"VDI block size {block_size} is not a power of two in "
                           f"{MIN_BLOCK_SIZE}..{MAX_BLOCK_SIZE}")
    if header.block_extra:
        raise Unsupported(f"VDI blocks with {header.block_extra} extra bytes each are not "
                          "supported")
    if header.offset_bmap % SECTOR or header.offset_data % SECTOR:
        raise InvalidImage(f"VDI block map offset {header.offset_bmap:#x} or data offset "
                           f"{header.offset_data:#x} is not sector aligned")
    blocks = header.blocks_in_image
    if blocks > MAX_BLOCKS:
        raise InvalidImage(f"VDI image has {blocks} blocks (at most {MAX_BLOCKS})")
    if header.disk_size > blocks * block_size:
        raise InvalidImage(f"VDI disk size {header.disk_size} exceeds its {blocks} blocks "
                           f"of {block_size} bytes")
    geometry = Geometry(block_size, blocks, header.offset_bmap, header.offset_data)
    _check_regions(header, geometry, file_size)
    return geometry


def _check_regions(header: Header, geometry: Geometry, file_size: int) -> None:
    """Header, block map and data area in this order, not overlapping, the
    block map inside the file."""
    header_end = PREHEADER_SIZE + HEADER1_SIZE
    bmap_end = geometry.offset_bmap + geometry.bmap_bytes
    if geometry.offset_bmap < header_end:
        raise InvalidImage(f"VDI block map at {geometry.offset_bmap:#x} overlaps the header "
                           f"(which ends at {header_end:#x})")
    if bmap_end > file_size:
        raise InvalidImage(f"VDI block map at {geometry.offset_bmap:#x} ({geometry.blocks} "
                           f"entries) runs past the end of the {file_size}-byte file")
    if geometry.offset_data < bmap_end:
        raise InvalidImage(f"VDI data area at {geometry.offset_data:#x} overlaps the block "
                           f"map (which ends at {bmap_end:#x})")
    if header.blocks_allocated > geometry.blocks:
        raise InvalidImage(f"VDI image says {header.blocks_allocated} blocks are allocated "
                           f"of {geometry.blocks}")


# -- creation (pure) ---------------------------------------------------------------------------

CREATE_OPTS = Schema(
    Opt("static", Bool, default=False, help="VDI static (pre-allocated) image"),
    Opt("preallocation", choice("off", "falloc", "full"), default="off",
        help="Preallocation mode of a static image's blocks (allowed values: off, falloc, "
             "full)"),
    Opt("backing_file", Str, help="parent VDI image: create a differencing image "
        "(a VirtualBox snapshot) linked to it by UUID"),
    Opt("backing_fmt", Str, help="format of the parent (vdi)"),
)


def check_create_options(options: dict[str, Any]) -> None:
    if options["backing_fmt"] not in (None, "vdi"):
        raise UsageError(f"a differencing VDI's parent must be a VDI image, not "
                         f"{options['backing_fmt']}")
    if options["backing_file"] and options["static"]:
        raise UsageError("a differencing VDI cannot be static")


def check_image_size(size: int) -> None:
    limit = MAX_BLOCKS * DEFAULT_BLOCK_SIZE
    if size > limit:
        raise Unsupported(f"Unsupported VDI image size (size is {size:#x}, max supported is "
                         f"{limit:#x})")


@dataclass(frozen=True, slots=True)
class Parent:
    """What a differencing image records of its parent."""

    uuid_image: bytes
    uuid_last_modify: bytes


def new_image(size: int, options: dict[str, Any], parent: Parent | None = None,
              new_uuid: Any = uuid.uuid4) -> tuple[bytes, int]:
    """Header and block map of a new image, and the file's length.  As
    qemu-img: QEMU's text, header 1.1, the block map right after the 512
    header bytes, the data after the block map's sectors; a static image
    maps every block in order and the file holds them all."""
    size = align_up(size, SECTOR)
    check_image_size(size)
    blocks = -(-size // DEFAULT_BLOCK_SIZE)
    offset_bmap = HEADER.size
    offset_data = offset_bmap + align_up(4 * blocks, SECTOR)
    static = bool(options["static"])
    image_type = TYPE_DIFF if parent else TYPE_FIXED if static else TYPE_NORMAL
    header = Header(
        QEMU_TEXT.ljust(64, b"\0"), SIGNATURE, VERSION_1_1, HEADER1_SIZE, image_type, 0,
        bytes(256), offset_bmap, offset_data, 0, 0, 0, SECTOR, 0, size, DEFAULT_BLOCK_SIZE, 0,
        blocks, blocks if static else 0, new_uuid().bytes_le, new_uuid().bytes_le,
        parent.uuid_image if parent else NULL_UUID,
        parent.uuid_last_modify if parent else NULL_UUID, 0, 0, 0, 0)
    entries = range(blocks) if static else [BLOCK_FREE] * blocks
    bmap = struct.pack(f"<{blocks}I", *entries)
    length = offset_data + (blocks * DEFAULT_BLOCK_SIZE if static else 0)
    return header.pack() + bmap, length
