"""QED on disk: header, geometry, entries, new images (pure, no I/O).

See the package docstring for the layout.  Probing imports only this module.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, NamedTuple

from imgfs.errors import InvalidImage, Unsupported, UsageError
from imgfs.mapped import MapKind, align_up
from imgfs.options import Opt, Schema, Size, Str, power_of_two
from imgfs.tablecache import TableCodec

MAGIC = b"QED\0"
#: spec "Feature bits"
QED_F_BACKING_FILE = 0x01
QED_F_NEED_CHECK = 0x02
QED_F_BACKING_FORMAT_NO_PROBE = 0x04
QED_FEATURE_MASK = QED_F_BACKING_FILE | QED_F_NEED_CHECK | QED_F_BACKING_FORMAT_NO_PROBE
#: spec "Field descriptions"
MIN_CLUSTER_SIZE, MAX_CLUSTER_SIZE = 1 << 12, 1 << 26
MIN_TABLE_SIZE, MAX_TABLE_SIZE = 1, 16
DEFAULT_CLUSTER_SIZE = 64 * 1024
DEFAULT_TABLE_SIZE = 4
SECTOR = 512
#: "Data cluster offsets": 1 reads as zeros
ZERO_CLUSTER = 1
#: QEMU refuses longer backing file names
MAX_BACKING_FILE_NAME = 1023
#: the header and what follows it (the backing name) within its clusters;
#: QEMU writes one cluster, and a larger one would only be padding
MAX_HEADER_BYTES = 64 * 1024 * 1024
#: bytes of L2 tables kept in memory
L2_CACHE_BYTES = 4 * 1024 * 1024
#: L1 and L2 tables: little-endian 64-bit entries
CODEC = TableCodec(8, big_endian=False)

HEADER = struct.Struct("<4sIIIQQQQQII")


class Header(NamedTuple):
    magic: bytes
    cluster_size: int
    table_size: int
    header_size: int
    features: int
    compat_features: int
    autoclear_features: int
    l1_table_offset: int
    image_size: int
    backing_filename_offset: int
    backing_filename_size: int

    @classmethod
    def unpack(cls, raw: bytes) -> Header:
        if len(raw) < HEADER.size:
            raise InvalidImage(f"file too short for a QED header ({len(raw)} bytes)")
        return cls(*HEADER.unpack_from(raw))

    def pack(self) -> bytes:
        return HEADER.pack(*self)


def probe(head: bytes, filename: str) -> int:
    """100 for the QED magic (the registry's light probe)."""
    return 100 if head[:4] == MAGIC else 0


# -- layout math (pure) ----------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Geometry:
    """Cluster and table sizes of one image (spec "Tables")."""

    cluster_size: int
    table_size: int              # clusters per table

    @property
    def cluster_bits(self) -> int:
        return self.cluster_size.bit_length() - 1

    @property
    def table_bytes(self) -> int:
        return self.table_size * self.cluster_size

    @property
    def table_entries(self) -> int:
        return self.table_bytes // 8

    @property
    def table_bits(self) -> int:
        return self.table_entries.bit_length() - 1

    @property
    def max_image_size(self) -> int:
        """spec: image_size <= TABLE_NOFFSETS * TABLE_NOFFSETS * cluster_size"""
        return self.table_entries * self.table_entries * self.cluster_size

    def total_clusters(self, image_size: int) -> int:
        return -(-image_size // self.cluster_size)


def is_power_of_two(value: int) -> bool:
    return value > 0 and not value & (value - 1)


def valid_cluster_offset(offset: int, geometry: Geometry, header_end: int,
                         file_size: int) -> bool:
    """A data cluster or table may start here: cluster aligned, after the
    header clusters, inside the file."""
    return not offset & (geometry.cluster_size - 1) and header_end <= offset < file_size


def classify_entry(entry: int) -> tuple[MapKind, int]:
    """An L2 entry: 0 unallocated, 1 a zero cluster, else a cluster's offset."""
    if entry == 0:
        return MapKind.UNALLOCATED, 0
    if entry == ZERO_CLUSTER:
        return MapKind.ZERO, 0
    return MapKind.DATA, entry


def check_header(header: Header, file_size: int) -> Geometry:
    """Every field that sizes an allocation, an offset or a loop, checked
    before any of them is used; one sentence per refusal."""
    if header.magic != MAGIC:
        raise InvalidImage(f"not a QED image (magic {header.magic!r})")
    if not (is_power_of_two(header.cluster_size) and
            MIN_CLUSTER_SIZE <= header.cluster_size <= MAX_CLUSTER_SIZE):
        raise InvalidImage(f"cluster_size {header.cluster_size} is not a power of two in "
                           f"{MIN_CLUSTER_SIZE}..{MAX_CLUSTER_SIZE}")
    if not (is_power_of_two(header.table_size) and
            MIN_TABLE_SIZE <= header.table_size <= MAX_TABLE_SIZE):
        raise InvalidImage(f"table_size {header.table_size} is not a power of two in "
                           f"{MIN_TABLE_SIZE}..{MAX_TABLE_SIZE}")
    geometry = Geometry(header.cluster_size, header.table_size)
    header_end = header.header_size * header.cluster_size
    if header.header_size < 1 or header_end > MAX_HEADER_BYTES:
        raise InvalidImage(f"header_size {header.header_size} clusters out of range "
                           f"(expected 1..{MAX_HEADER_BYTES // header.cluster_size})")
    unknown = header.features & ~QED_FEATURE_MASK
    if unknown:
        raise Unsupported(f"unsupported QED features {unknown:#x}")
    if header.image_size % SECTOR or header.image_size > geometry.max_image_size:
        raise InvalidImage(f"image_size {header.image_size} is not a multiple of {SECTOR} "
                           f"at most {geometry.max_image_size}")
    l1 = header.l1_table_offset
    if not valid_cluster_offset(l1, geometry, header_end, file_size) or \
            l1 + geometry.table_bytes > file_size:
        raise InvalidImage(f"L1 table offset {l1:#x} is unaligned, inside the header, or "
                           f"its {geometry.table_bytes} bytes run past the end of the "
                           f"{file_size}-byte file")
    if header.features & QED_F_BACKING_FILE:
        name_end = header.backing_filename_offset + header.backing_filename_size
        if header.backing_filename_size > MAX_BACKING_FILE_NAME:
            raise InvalidImage(f"backing_filename_size {header.backing_filename_size} too "
                               f"long (at most {MAX_BACKING_FILE_NAME})")
        if name_end > min(header_end, file_size):
            raise InvalidImage(f"backing file name at {header.backing_filename_offset:#x} "
                               f"(+{header.backing_filename_size}) lies outside the header "
                               "clusters or the file")
    return geometry


def decode_backing_name(raw: bytes) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise InvalidImage("backing file name is not valid UTF-8") from None


# -- creation (pure) ---------------------------------------------------------------------------

CREATE_OPTS = Schema(
    Opt("backing_file", Str, help="file name of a base image"),
    Opt("backing_fmt", Str, help="image format of the base image (raw: never probed)"),
    Opt("cluster_size", Size, default=DEFAULT_CLUSTER_SIZE,
        check=power_of_two(MIN_CLUSTER_SIZE, MAX_CLUSTER_SIZE), help="cluster size (in bytes)"),
    Opt("table_size", Size, check=power_of_two(MIN_TABLE_SIZE, MAX_TABLE_SIZE),
        help=f"L1/L2 table size (in clusters; default {DEFAULT_TABLE_SIZE})"),
)


def check_create_options(options: dict[str, Any]) -> None:
    if options["backing_fmt"] and not options["backing_file"]:
        raise UsageError("backing_fmt requires backing_file")
    if len((options["backing_file"] or "").encode()) > MAX_BACKING_FILE_NAME:
        raise UsageError(f"backing file name longer than {MAX_BACKING_FILE_NAME} bytes")


def check_image_size(size: int, geometry: Geometry) -> None:
    if size % SECTOR or size > geometry.max_image_size:
        raise UsageError(f"QED image size {size} must be a multiple of {SECTOR} and at "
                         f"most {geometry.max_image_size} bytes")


def new_image(size: int, options: dict[str, Any]) -> tuple[bytes, int]:
    """Header (with the backing name after it) of a new image, and the
    file's length.  As qemu-img: one header cluster, the backing name right
    after the header struct, the L1 table in the next clusters, nothing
    more; a raw backing file is marked never to be probed."""
    geometry = Geometry(options["cluster_size"], options["table_size"] or DEFAULT_TABLE_SIZE)
    check_image_size(size, geometry)
    name = (options["backing_file"] or "").encode()
    features = 0
    if name:
        features |= QED_F_BACKING_FILE
        if options["backing_fmt"] == "raw":
            features |= QED_F_BACKING_FORMAT_NO_PROBE
    l1_offset = geometry.cluster_size
    header = Header(MAGIC, geometry.cluster_size, geometry.table_size, 1, features, 0, 0,
                    l1_offset, size, HEADER.size if name else 0, len(name))
    return header.pack() + name, l1_offset + geometry.table_bytes


def round_size(size: int) -> int:
    """qemu-img rounds a new image up to whole sectors."""
    return align_up(size, SECTOR)
