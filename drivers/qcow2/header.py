"""qcow2 header, header extensions and their validation.

Spec: qemu/qemu docs/interop/qcow2.txt, sections "Header", "Additional
fields", "Header extensions", "Feature name table".  Everything here is
pure: `parse_image_header` takes the first cluster of the image and the file
size and either returns a checked `ImageHeader` or raises one `ImgfsError`
naming the field, its value and what was expected.  Every field that later
sizes an allocation, an offset or a loop is checked here first.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import NamedTuple

from imgfs.errors import InvalidImage, Unsupported

MAGIC = b"QFI\xfb"

# cluster_bits: the spec's minimum, and QEMU's 2 MiB implementation limit
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
#: extended L2 entries need clusters of at least 16 KiB (spec: cluster_bits)
MIN_CLUSTER_BITS_EXTENDED_L2 = 14
#: QEMU's implementation limits (spec notes under size and refcount table)
QCOW_MAX_L1_SIZE = 32 * 1024 * 1024
QCOW_MAX_REFTABLE_SIZE = 8 * 1024 * 1024
QCOW_MAX_SNAPSHOTS = 65536
QCOW_MAX_SNAPSHOTS_SIZE = 1024 * QCOW_MAX_SNAPSHOTS
#: spec: "Must not be longer than 1023 bytes"
MAX_BACKING_FILE_NAME = 1023
MAX_REFCOUNT_ORDER = 6

HEADER_V2_LENGTH = 72
HEADER_V3_MIN_LENGTH = 104
#: header_length QEMU writes since the compression_type field exists
HEADER_V3_LENGTH = 112

# crypt_method
QCOW_CRYPT_NONE = 0
QCOW_CRYPT_AES = 1
QCOW_CRYPT_LUKS = 2

# incompatible_features bits
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = (INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE
                  | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2)
# compatible_features bits
COMPAT_LAZY_REFCOUNTS = 1 << 0
# autoclear_features bits
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

# compression_type
COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

# header extension types
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO_HEADER = 0x0537BE77
EXT_DATA_FILE = 0x44415441
#: spec: "Full disk encryption header pointer": offset, length
CRYPTO_HEADER_EXT = struct.Struct(">QQ")

#: feature-name table entry types
FEATURE_INCOMPAT = 0
FEATURE_COMPAT = 1
FEATURE_AUTOCLEAR = 2
FEATURE_NAME_ENTRY = struct.Struct(">BB46s")

#: the names QEMU writes in its feature-name table (spec: feature bits)
FEATURE_NAMES: tuple[tuple[int, int, str], ...] = (
    (FEATURE_INCOMPAT, 0, "dirty bit"),
    (FEATURE_INCOMPAT, 1, "corrupt bit"),
    (FEATURE_INCOMPAT, 2, "external data file"),
    (FEATURE_INCOMPAT, 3, "compression type"),
    (FEATURE_INCOMPAT, 4, "extended L2 entries"),
    (FEATURE_COMPAT, 0, "lazy refcounts"),
    (FEATURE_AUTOCLEAR, 0, "bitmaps"),
    (FEATURE_AUTOCLEAR, 1, "raw external data"),
)

# Byte offsets of the header fields imgfs rewrites in place.
OFFSET_BACKING_FILE = 8          # backing_file_offset, backing_file_size
OFFSET_SIZE = 24
OFFSET_L1 = 36                    # l1_size, l1_table_offset
OFFSET_REFCOUNT_TABLE = 48        # refcount_table_offset, refcount_table_clusters
OFFSET_INCOMPAT = 72
OFFSET_AUTOCLEAR = 88
OFFSET_REFCOUNT_ORDER_END = 100   # end of refcount_order (v3)

HEADER_V2 = struct.Struct(">4sIQIIQIIQQIIQ")
HEADER_V3_FIELDS = struct.Struct(">QQQII")
EXTENSION_HEADER = struct.Struct(">II")


class Header(NamedTuple):
    """The fixed header fields (spec: "Header"), v2 fields then v3 ones."""

    magic: bytes
    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = HEADER_V2_LENGTH
    compression_type: int = COMPRESSION_ZLIB

    @classmethod
    def unpack(cls, data: bytes) -> Header:
        """Decode the header; v2 fields are given the spec's implied values."""
        if len(data) < HEADER_V2.size or data[:4] != MAGIC:
            raise InvalidImage("not a qcow2 image (no QFI\\xfb magic)")
        v2 = HEADER_V2.unpack_from(data)
        if v2[1] < 3:
            return cls(*v2)
        if len(data) < HEADER_V3_MIN_LENGTH:
            raise InvalidImage("qcow2 v3 header is truncated")
        v3 = HEADER_V3_FIELDS.unpack_from(data, HEADER_V2.size)
        header_length = v3[4]
        compression_type = data[104] if header_length > 104 and len(data) > 104 else 0
        return cls._make((*v2, *v3, compression_type))

    def pack(self) -> bytes:
        """Encode the header (header_length bytes, padding zeroed)."""
        v2 = HEADER_V2.pack(*self[:13])
        if self.version < 3:
            return v2
        v3 = HEADER_V3_FIELDS.pack(*self[13:18])
        tail = bytes([self.compression_type]) if self.header_length > 104 else b""
        return (v2 + v3 + tail).ljust(self.header_length, b"\0")

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits


class Extension(NamedTuple):
    """One header extension as stored (spec: "Header extensions")."""

    type: int
    data: bytes

    def pack(self) -> bytes:
        raw = EXTENSION_HEADER.pack(self.type, len(self.data)) + self.data
        return raw + bytes(-len(raw) % 8)


@dataclass(frozen=True)
class ImageHeader:
    """A validated header with its extensions decoded."""

    header: Header
    backing_file: str | None = None
    backing_format: str | None = None
    data_file: str | None = None
    feature_names: dict[tuple[int, int], str] = field(default_factory=dict)
    extensions: tuple[Extension, ...] = ()
    #: (offset, length) of the embedded LUKS header (crypt_method 2)
    crypto_header: tuple[int, int] | None = None

    @property
    def incompatible(self) -> int:
        return self.header.incompatible_features


def feature_table_extension() -> Extension:
    """The feature-name table QEMU writes into new images."""
    data = b"".join(FEATURE_NAME_ENTRY.pack(kind, bit, name.encode())
                    for kind, bit, name in FEATURE_NAMES)
    return Extension(EXT_FEATURE_TABLE, data)


def string_extension(ext_type: int, text: str) -> Extension:
    return Extension(ext_type, text.encode())


def pack_extensions(extensions: list[Extension]) -> bytes:
    """The extension area, terminated by the end marker."""
    return b"".join(ext.pack() for ext in extensions) + EXTENSION_HEADER.pack(EXT_END, 0)


def with_backing(head: bytes, image: ImageHeader, backing_file: str | None,
                 backing_fmt: str | None) -> bytes:
    """The header cluster's used bytes with a new backing file name and
    format: the header fields as they are (only backing_file_offset and
    backing_file_size change), every other extension kept, the backing
    format extension first, the name right after the end marker."""
    header = image.header
    fixed = bytearray(head[:HEADER_V2_LENGTH if header.version < 3 else header.header_length])
    extensions = [ext for ext in image.extensions if ext.type != EXT_BACKING_FORMAT]
    if backing_file and backing_fmt:
        extensions.insert(0, string_extension(EXT_BACKING_FORMAT, backing_fmt))
    name = (backing_file or "").encode()
    if len(name) > MAX_BACKING_FILE_NAME:
        raise Unsupported(f"backing file name of {len(name)} bytes is too long "
                          f"(at most {MAX_BACKING_FILE_NAME})")
    body = bytes(fixed) + pack_extensions(extensions)
    struct.pack_into(">QI", fixed, OFFSET_BACKING_FILE, len(body) if name else 0, len(name))
    body = bytes(fixed) + pack_extensions(extensions) + name
    if len(body) > header.cluster_size:
        raise Unsupported(f"header, extensions and backing file name need {len(body)} "
                          f"bytes, more than the {header.cluster_size}-byte cluster")
    return body


# -- validation -------------------------------------------------------------------


def l2_entries_per_table(cluster_bits: int, extended_l2: bool) -> int:
    """Spec: l2_entries = cluster_size / sizeof(uint64_t) (twice that for extended L2)."""
    return (1 << cluster_bits) // (16 if extended_l2 else 8)


def l1_entries_needed(size: int, cluster_bits: int, extended_l2: bool) -> int:
    """How many L1 entries a virtual disk of `size` bytes needs."""
    bytes_per_l2 = l2_entries_per_table(cluster_bits, extended_l2) << cluster_bits
    return -(-size // bytes_per_l2)


def parse_image_header(head: bytes, file_size: int, *, check: bool = False,
                       repair: bool = False) -> ImageHeader:
    """Check every header field of `head` (the image's first cluster, or as
    much of it as the file holds) and decode the header extensions.  For
    `imgfs check` (`check`), tables may lie past the end of the file: the
    check reports that as a corruption, as qemu-img check does (not, for a
    `repair`, the L1 and refcount tables, which the repair rewrites)."""
    header = Header.unpack(head)
    _check_fixed_fields(header)
    _check_tables(header, file_size, check=check, repair=repair)
    extensions = _parse_extensions(head, header)
    names = _feature_names(extensions)
    _check_features(header, names)
    backing_file = _backing_file_name(head, header, file_size)
    by_type = {ext.type: ext.data for ext in extensions}
    data_file = _ext_string(by_type, EXT_DATA_FILE, "external data file name")
    if data_file is not None and not header.incompatible_features & INCOMPAT_DATA_FILE:
        data_file = None            # the name is only meaningful with the feature bit
    return ImageHeader(
        header=header, backing_file=backing_file,
        backing_format=_ext_string(by_type, EXT_BACKING_FORMAT, "backing format name"),
        data_file=data_file, feature_names=names, extensions=tuple(extensions),
        crypto_header=_crypto_header(header, by_type.get(EXT_CRYPTO_HEADER), file_size))


def _crypto_header(header: Header, data: bytes | None, file_size: int
                   ) -> tuple[int, int] | None:
    """Spec: "Full disk encryption header pointer" (offset, length; u64
    each), present exactly when crypt_method is 2 (LUKS)."""
    if header.crypt_method != QCOW_CRYPT_LUKS:
        return None
    if data is None:
        raise InvalidImage("crypt_method 2 (LUKS) but no full disk encryption header "
                           "pointer extension (0x0537be77)")
    if len(data) < CRYPTO_HEADER_EXT.size:
        raise InvalidImage(f"full disk encryption header pointer extension is "
                           f"{len(data)} bytes (expected {CRYPTO_HEADER_EXT.size})")
    offset, length = CRYPTO_HEADER_EXT.unpack_from(data)
    if offset % header.cluster_size or not length or offset + length > file_size:
        raise InvalidImage(f"LUKS header at {offset:#x} (+{length} bytes) is unaligned, "
                           f"empty or beyond the end of the {file_size}-byte file")
    return offset, length


def _check_fixed_fields(header: Header) -> None:
    if header.version not in (2, 3):
        raise Unsupported(f"qcow2 version {header.version} is not supported "
                          "(expected 2 or 3)")
    if not MIN_CLUSTER_BITS <= header.cluster_bits <= MAX_CLUSTER_BITS:
        raise InvalidImage(f"cluster_bits {header.cluster_bits} out of range "
                           f"(expected {MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS})")
    if header.version >= 3:
        if header.header_length < HEADER_V3_MIN_LENGTH or header.header_length % 8 \
                or header.header_length > header.cluster_size:
            raise InvalidImage(f"header_length {header.header_length} invalid (expected a "
                               f"multiple of 8 from {HEADER_V3_MIN_LENGTH} to the "
                               f"cluster size {header.cluster_size})")
        if header.refcount_order > MAX_REFCOUNT_ORDER:
            raise InvalidImage(f"refcount_order {header.refcount_order} out of range "
                               f"(expected 0..{MAX_REFCOUNT_ORDER})")
    if header.crypt_method not in (QCOW_CRYPT_NONE, QCOW_CRYPT_AES, QCOW_CRYPT_LUKS):
        raise InvalidImage(f"crypt_method {header.crypt_method} unknown (expected 0, 1 or 2)")
    if header.size >= 1 << 63:
        raise InvalidImage(f"size {header.size} too large")


def _check_aligned_table(name: str, offset: int, length: int, header: Header,
                         file_size: int | None) -> None:
    """The table is aligned and (unless `file_size` is None) inside the file."""
    if offset % header.cluster_size:
        raise InvalidImage(f"{name} offset {offset:#x} is not aligned to the "
                           f"{header.cluster_size}-byte cluster size")
    if file_size is not None and offset + length > file_size:
        raise InvalidImage(f"{name} at {offset:#x} (+{length} bytes) lies beyond "
                           f"the end of the {file_size}-byte file")


def _check_tables(header: Header, file_size: int, *, check: bool, repair: bool) -> None:
    # the L1 and refcount tables: past the end only for a read-only check
    rewritten_end = None if check and not repair else file_size
    snapshots_end = None if check else file_size
    extended_l2 = bool(header.incompatible_features & INCOMPAT_EXTL2)
    if header.l1_size > QCOW_MAX_L1_SIZE // 8:
        raise InvalidImage(f"l1_size {header.l1_size} too large (at most "
                           f"{QCOW_MAX_L1_SIZE // 8} entries)")
    needed = l1_entries_needed(header.size, header.cluster_bits, extended_l2)
    if header.l1_size < needed:
        raise InvalidImage(f"l1_size {header.l1_size} too small for the virtual size "
                           f"{header.size} (expected at least {needed})")
    if header.l1_size:
        _check_aligned_table("L1 table", header.l1_table_offset, header.l1_size * 8,
                             header, rewritten_end)
    reftable_bytes = header.refcount_table_clusters << header.cluster_bits
    if header.refcount_table_clusters == 0 or reftable_bytes > QCOW_MAX_REFTABLE_SIZE:
        raise InvalidImage(f"refcount_table_clusters {header.refcount_table_clusters} out "
                           f"of range (expected 1..{QCOW_MAX_REFTABLE_SIZE} bytes worth)")
    _check_aligned_table("refcount table", header.refcount_table_offset, reftable_bytes,
                         header, rewritten_end)
    if header.nb_snapshots > QCOW_MAX_SNAPSHOTS:
        raise InvalidImage(f"nb_snapshots {header.nb_snapshots} too large "
                           f"(at most {QCOW_MAX_SNAPSHOTS})")
    if header.nb_snapshots:
        _check_aligned_table("snapshot table", header.snapshots_offset, 0, header,
                             snapshots_end)


def _parse_extensions(head: bytes, header: Header) -> list[Extension]:
    """Extensions run from header_length to the end marker, inside cluster 0."""
    if header.version < 3:
        offset = HEADER_V2_LENGTH
    else:
        offset = header.header_length
    limit = min(len(head), header.cluster_size)
    if header.backing_file_offset:
        limit = min(limit, header.backing_file_offset)
    extensions: list[Extension] = []
    while offset + EXTENSION_HEADER.size <= limit:
        ext_type, length = EXTENSION_HEADER.unpack_from(head, offset)
        if ext_type == EXT_END:
            break
        start = offset + EXTENSION_HEADER.size
        if start + length > limit:
            raise InvalidImage(f"header extension {ext_type:#010x} of length {length} "
                               f"overruns the header cluster (ends at {start + length}, "
                               f"limit {limit})")
        extensions.append(Extension(ext_type, bytes(head[start:start + length])))
        offset = start + length + (-length % 8)
    return extensions


def _feature_names(extensions: list[Extension]) -> dict[tuple[int, int], str]:
    names: dict[tuple[int, int], str] = {}
    for ext in extensions:
        if ext.type != EXT_FEATURE_TABLE:
            continue
        usable = len(ext.data) - len(ext.data) % FEATURE_NAME_ENTRY.size
        for pos in range(0, usable, FEATURE_NAME_ENTRY.size):
            kind, bit, raw = FEATURE_NAME_ENTRY.unpack_from(ext.data, pos)
            names[(kind, bit)] = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
    return names


def _check_features(header: Header, names: dict[tuple[int, int], str]) -> None:
    unknown = header.incompatible_features & ~INCOMPAT_KNOWN
    if unknown:
        described = []
        for bit in range(64):
            if unknown >> bit & 1:
                name = names.get((FEATURE_INCOMPAT, bit))
                described.append(f"{name} (bit {bit})" if name else f"unknown bit {bit}")
        raise Unsupported("unsupported qcow2 incompatible feature(s): " + ", ".join(described))
    incompat = header.incompatible_features
    if incompat & INCOMPAT_EXTL2 and header.cluster_bits < MIN_CLUSTER_BITS_EXTENDED_L2:
        raise InvalidImage(f"cluster_bits {header.cluster_bits} too small for extended L2 "
                           f"entries (expected at least {MIN_CLUSTER_BITS_EXTENDED_L2})")
    if incompat & INCOMPAT_COMPRESSION:
        if header.compression_type not in COMPRESSION_NAMES or header.compression_type == 0:
            raise InvalidImage(f"compression_type {header.compression_type} invalid with the "
                               "compression type bit set (expected 1 for zstd)")
    elif header.compression_type != COMPRESSION_ZLIB:
        raise InvalidImage(f"compression_type {header.compression_type} set without the "
                           "compression type feature bit (expected 0)")


def _backing_file_name(head: bytes, header: Header, file_size: int) -> str | None:
    if not header.backing_file_offset:
        return None
    length = header.backing_file_size
    if length > MAX_BACKING_FILE_NAME:
        raise InvalidImage(f"backing_file_size {length} too large "
                           f"(at most {MAX_BACKING_FILE_NAME} bytes)")
    end = header.backing_file_offset + length
    if end > header.cluster_size or end > len(head) or end > file_size:
        raise InvalidImage(f"backing file name at {header.backing_file_offset} "
                           f"(+{length}) lies outside the header cluster")
    raw = bytes(head[header.backing_file_offset:end])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidImage("backing file name is not valid UTF-8") from None


def _ext_string(by_type: dict[int, bytes], ext_type: int, what: str) -> str | None:
    raw = by_type.get(ext_type)
    if raw is None:
        return None
    if len(raw) > MAX_BACKING_FILE_NAME:
        raise InvalidImage(f"{what} extension of {len(raw)} bytes is too long "
                           f"(at most {MAX_BACKING_FILE_NAME})")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidImage(f"{what} is not valid UTF-8") from None


def probe(head: bytes, filename: str) -> int:
    """100 for the qcow2 magic with version 2 or 3 (the registry's light probe)."""
    if len(head) >= 8 and head[:4] == MAGIC and struct.unpack(">I", head[4:8])[0] in (2, 3):
        return 100
    return 0
