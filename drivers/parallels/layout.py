"""Parallels expandable images on disk: header, geometry, catalog entries,
new images (pure, no I/O).

See the package docstring for the layout.  Probing imports only this module.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, NamedTuple

from imgfs.errors import InvalidImage, Unsupported, UsageError
from imgfs.mapped import align_up
from imgfs.options import Opt, Schema, Size, Str
from imgfs.tablecache import TableCodec

#: spec "Header": the magic says how catalog entries count
MAGIC_SECTORS = b"WithoutFreeSpace"       # entries in sectors, 32-bit nb_sectors
MAGIC_CLUSTERS = b"WithouFreSpacExt"      # entries in clusters, 64-bit nb_sectors
MAGICS = (MAGIC_SECTORS, MAGIC_CLUSTERS)
HEADER_VERSION = 2
#: spec "in_use": written while software has the image open read-write,
#: and (by older software) when it closed it; QEMU writes 0 on close
INUSE_OPEN = 0x746F6E59
INUSE_CLOSED = 0x312E3276
SECTOR = 512
#: heads and sectors per track of the guest geometry qemu-img writes
CREATE_HEADS, CREATE_SECTORS_PER_TRACK = 16, 32
DEFAULT_CLUSTER_SIZE = 1024 * 1024
#: QEMU's limits: a cluster of more sectors, or a catalog of more entries,
#: is refused when opened ("Too big cluster", "Catalog too large")
MAX_TRACKS = 0x7FFFFFFF // 513
MAX_BAT_ENTRIES = 0x7FFFFFFF // 4
#: qemu-img create: an image of 2^32 clusters or more is "too large"
MAX_CLUSTERS = 1 << 32
MAX_ENTRY = 0xFFFFFFFF
#: the largest cluster imgfs writes (qemu-img creates up to 1 GiB)
MAX_WRITE_CLUSTER = 256 * 1024 * 1024
MAX_SECTORS = ((1 << 63) - 1) // SECTOR
#: catalog entries: little-endian 32-bit
CODEC = TableCodec(4, big_endian=False)

HEADER = struct.Struct("<16sIIIIIQIIIQ")
#: byte offset of in_use (spec "Header"), rewritten in place
OFFSET_INUSE = 44


class Header(NamedTuple):
    magic: bytes
    version: int
    heads: int
    cylinders: int
    tracks: int                  # sectors per cluster
    bat_entries: int
    nb_sectors: int
    inuse: int
    data_off: int                # sectors; 0 (old images): right after the catalog
    flags: int
    ext_off: int

    @classmethod
    def unpack(cls, raw: bytes) -> Header:
        if len(raw) < HEADER.size:
            raise InvalidImage(f"file too short for a Parallels header ({len(raw)} bytes)")
        return cls(*HEADER.unpack_from(raw))

    def pack(self) -> bytes:
        return HEADER.pack(*self)


def probe(head: bytes, filename: str) -> int:
    """100 for either magic with version 2 (QEMU takes anything else as raw)."""
    if len(head) < 20 or head[:16] not in MAGICS:
        return 0
    return 100 if struct.unpack_from("<I", head, 16)[0] == HEADER_VERSION else 0


# -- layout math (pure) ----------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Geometry:
    """Where things are in one image (spec "Header", "BAT")."""

    cluster_size: int
    bat_entries: int
    #: bytes per unit of a catalog entry: a sector, or a cluster (Ext magic)
    entry_unit: int
    #: where the data area starts
    data_start: int
    size: int
    #: the end of an image that holds no cluster, as QEMU's check counts it
    #: (with data_off 0: the catalog's end rounded up to a whole cluster)
    empty_end: int

    @property
    def bat_end(self) -> int:
        return HEADER.size + 4 * self.bat_entries

    def host_offset(self, entry: int) -> int:
        return entry * self.entry_unit

    def entry_for(self, host_offset: int) -> int:
        return host_offset // self.entry_unit

    def total_clusters(self) -> int:
        return self.bat_entries


def geometry_of(header: Header) -> Geometry:
    cluster_size = header.tracks * SECTOR
    entry_unit = cluster_size if header.magic == MAGIC_CLUSTERS else SECTOR
    bat_end = HEADER.size + 4 * header.bat_entries
    data_start = header.data_off * SECTOR if header.data_off else align_up(bat_end, SECTOR)
    empty_end = data_start if header.data_off else align_up(bat_end, cluster_size)
    return Geometry(cluster_size, header.bat_entries, entry_unit, data_start,
                    image_sectors(header) * SECTOR, empty_end)


def image_sectors(header: Header) -> int:
    """spec "nb_sectors": old images use only its low 32 bits."""
    if header.magic == MAGIC_SECTORS:
        return header.nb_sectors & 0xFFFFFFFF
    return header.nb_sectors


def check_header(header: Header) -> Geometry:
    """Every field that sizes an allocation, an offset or a loop, checked
    before any of them is used; one sentence per refusal."""
    if header.magic not in MAGICS:
        raise InvalidImage(f"not a Parallels image (magic {header.magic!r})")
    if header.version != HEADER_VERSION:
        raise InvalidImage(f"unsupported Parallels version {header.version} (expected "
                           f"{HEADER_VERSION})")
    if header.tracks == 0:
        raise InvalidImage("invalid cluster size: zero sectors per track")
    if header.tracks > MAX_TRACKS:
        raise InvalidImage(f"cluster of {header.tracks} sectors is too big (at most "
                           f"{MAX_TRACKS})")
    if header.bat_entries > MAX_BAT_ENTRIES:
        raise InvalidImage(f"catalog of {header.bat_entries} entries is too large (at "
                           f"most {MAX_BAT_ENTRIES})")
    if image_sectors(header) > MAX_SECTORS:
        raise InvalidImage(f"disk size of {header.nb_sectors} sectors is too large")
    if header.ext_off:
        raise Unsupported("Parallels format extensions (dirty bitmaps) are not supported")
    geometry = geometry_of(header)
    if geometry.data_start < geometry.bat_end:
        raise InvalidImage(f"data area at {geometry.data_start:#x} overlaps the catalog, "
                           f"which ends at {geometry.bat_end:#x}")
    return geometry


# -- creation (pure) ---------------------------------------------------------------------------

OPEN_OPTS = Schema(
    Opt("guid", Str, help="the snapshot of a .hdd bundle to open (default: its top one)"),
)
#: the block a Plain (raw) image of a bundle is mapped in
PLAIN_BLOCK = 64 * 1024

CREATE_OPTS = Schema(
    Opt("cluster_size", Size, default=DEFAULT_CLUSTER_SIZE,
        help="Parallels image cluster size"),
)


def create_geometry(size: int, cluster_size: int) -> tuple[int, int]:
    """(sectors per cluster, catalog entries) of a new image, as qemu-img
    computes them (the cluster rounded up to whole sectors)."""
    tracks = -(-cluster_size // SECTOR)
    if tracks > MAX_TRACKS:
        raise UsageError(f"cluster size {cluster_size} is too large")
    if tracks == 0 or size >= MAX_CLUSTERS * cluster_size:
        raise UsageError("image size is too large for this cluster size")
    sectors = -(-size // SECTOR)
    bat_entries = -(-sectors // tracks)
    if bat_entries > MAX_BAT_ENTRIES:
        # (qemu-img writes such an image, which it then cannot open)
        raise UsageError(f"image size needs {bat_entries} catalog entries, more than "
                         f"{MAX_BAT_ENTRIES}: use a larger cluster_size")
    return tracks, bat_entries


def new_image(size: int, options: dict[str, Any]) -> tuple[bytes, int]:
    """Header and (empty) catalog of a new image, and the file's length:
    as qemu-img, the Ext magic, the data area at the first cluster
    boundary after the catalog, nothing allocated."""
    tracks, bat_entries = create_geometry(size, options["cluster_size"])
    sectors = -(-size // SECTOR)
    cluster_size = tracks * SECTOR
    data_start = align_up(HEADER.size + 4 * bat_entries, cluster_size)
    header = Header(MAGIC_CLUSTERS, HEADER_VERSION, CREATE_HEADS, sectors //
                    (CREATE_HEADS * CREATE_SECTORS_PER_TRACK), tracks, bat_entries,
                    sectors, 0, data_start // SECTOR, 0, 0)
    return header.pack(), data_start


def round_size(size: int) -> int:
    """qemu-img rounds a new image up to whole sectors."""
    return align_up(size, SECTOR)
