"""qcow2 cluster mapping: L1/L2 layout math and L2 entry decoding.

Spec: qemu/qemu docs/interop/qcow2.txt, "Cluster mapping" and "Extended L2
Entries".  The math is pure (`Geometry`, `decode_entry`, `compressed_range`,
`l2_run`); the decoded L2 tables are kept by the core's
`imgfs.tablecache.TableCache`, as for every table-mapped format.
"""
from __future__ import annotations

import array
import enum
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

# L1 / L2 entry bits (spec: "L1 table entry", "L2 table entry")
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
QCOW_OFLAG_COPIED = 1 << 63
QCOW_OFLAG_COMPRESSED = 1 << 62
QCOW_OFLAG_ZERO = 1 << 0
#: bits of a standard cluster descriptor that must be zero (1-8 and 56-61)
L2E_STANDARD_RESERVED = 0x3F000000000001FE
L1E_RESERVED = 0x7F000000000001FF
#: extended L2: 32 subclusters per cluster, alloc bits low, zero bits high
SUBCLUSTERS_PER_CLUSTER = 32
BITMAP_ALL_ALLOCATED = 0xFFFFFFFF
BITMAP_ALL_ZEROES = 0xFFFFFFFF << 32
#: compressed clusters are counted in 512-byte sectors
COMPRESSED_SECTOR_SIZE = 512


class ClusterType(enum.Enum):
    UNALLOCATED = "unallocated"
    ZERO = "zero"                 # reads as zeros (may keep a preallocated host offset)
    NORMAL = "normal"
    COMPRESSED = "compressed"


class TwoLevelTables:
    """Guest offset -> (L1 index, L2 index, offset in cluster) for any
    two-level table format (qcow2, qcow); the subclass gives cluster_bits,
    l2_bits, cluster_size and l2_entries."""

    __slots__ = ()
    if TYPE_CHECKING:
        @property
        def cluster_bits(self) -> int: ...
        @property
        def l2_bits(self) -> int: ...
        @property
        def cluster_size(self) -> int: ...
        @property
        def l2_entries(self) -> int: ...

    @property
    def l1_span(self) -> int:
        """Guest bytes one L1 entry (one L2 table) maps."""
        return 1 << (self.cluster_bits + self.l2_bits)

    def l1_index(self, offset: int) -> int:
        return offset >> (self.cluster_bits + self.l2_bits)

    def l2_index(self, offset: int) -> int:
        return (offset >> self.cluster_bits) & (self.l2_entries - 1)

    def offset_in_cluster(self, offset: int) -> int:
        return offset & (self.cluster_size - 1)

    def l1_entries_for(self, size: int) -> int:
        return -(-size // self.l1_span)


@dataclass(frozen=True, slots=True)
class Geometry(TwoLevelTables):
    """Sizes derived from cluster_bits and the L2 entry format."""

    cluster_bits: int
    extended_l2: bool = False

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def l2_bits(self) -> int:
        """log2 of the L2 entries per table (an entry is 8 or 16 bytes)."""
        return self.cluster_bits - (4 if self.extended_l2 else 3)

    @property
    def l2_entries(self) -> int:
        return 1 << self.l2_bits

    @property
    def subcluster_bits(self) -> int:
        return self.cluster_bits - 5 if self.extended_l2 else self.cluster_bits

    @property
    def subcluster_size(self) -> int:
        return 1 << self.subcluster_bits


    def cluster_start(self, offset: int) -> int:
        return offset & ~(self.cluster_size - 1)


class Mapping(NamedTuple):
    """What one L2 entry says about its guest cluster."""

    type: ClusterType
    host_offset: int          # 0 when there is none


def decode_entry(entry: int, *, zero_flag: bool) -> Mapping:
    """Classify a standard (first 64-bit word) L2 entry.

    `zero_flag` is False for v2 images and extended L2 entries, where bit 0
    is reserved.  A host offset of 0 with the COPIED bit means offset 0 of an
    external data file.
    """
    if entry & QCOW_OFLAG_COMPRESSED:
        return Mapping(ClusterType.COMPRESSED, 0)
    host_offset = entry & L2E_OFFSET_MASK
    if zero_flag and entry & QCOW_OFLAG_ZERO:
        return Mapping(ClusterType.ZERO, host_offset)
    if host_offset or entry & QCOW_OFLAG_COPIED:
        return Mapping(ClusterType.NORMAL, host_offset)
    return Mapping(ClusterType.UNALLOCATED, 0)


def compressed_range(entry: int, cluster_bits: int) -> tuple[int, int]:
    """(host offset, most bytes) of a compressed cluster descriptor.

    Spec: x = 62 - (cluster_bits - 8); bits 0..x-1 are the host offset,
    bits x..61 the number of additional 512-byte sectors.
    """
    offset_bits = 62 - (cluster_bits - 8)
    host_offset = entry & ((1 << offset_bits) - 1)
    sector_field = (entry >> offset_bits) & ((1 << (cluster_bits - 8)) - 1)
    sector_start = host_offset & ~(COMPRESSED_SECTOR_SIZE - 1)
    end = sector_start + (sector_field + 1) * COMPRESSED_SECTOR_SIZE
    return host_offset, end - host_offset


def compressed_descriptor(host_offset: int, length: int, cluster_bits: int) -> int:
    """The L2 entry for `length` compressed bytes stored at `host_offset`."""
    offset_bits = 62 - (cluster_bits - 8)
    first_sector = host_offset // COMPRESSED_SECTOR_SIZE
    last_sector = (host_offset + length - 1) // COMPRESSED_SECTOR_SIZE
    return QCOW_OFLAG_COMPRESSED | (last_sector - first_sector) << offset_bits | host_offset


def subcluster_state(bitmap: int, index: int) -> ClusterType:
    """State of subcluster `index` from an extended L2 allocation bitmap."""
    if bitmap >> index & 1:
        return ClusterType.NORMAL
    if bitmap >> (32 + index) & 1:
        return ClusterType.ZERO
    return ClusterType.UNALLOCATED


def bitmap_range(first: int, count: int) -> int:
    """Allocation-bitmap bits for subclusters first..first+count-1."""
    return ((1 << count) - 1) << first


class Run(NamedTuple):
    """A stretch of guest bytes inside one L2 table with one state."""

    length: int
    type: ClusterType
    host_offset: int          # host offset of the run's first byte (NORMAL only)


def l2_run(entries: Sequence[int], geometry: Geometry, offset: int, length: int, *,
           zero_flag: bool) -> Run:
    """The run that starts at guest `offset`, from the L2 table `entries`.

    Stops at the end of the table, at `length`, at a change of state, or
    where NORMAL clusters stop being contiguous on the host.  Compressed
    clusters are one run each (each needs its own decompression).
    """
    if geometry.extended_l2:
        return _l2_run_extended(entries, geometry, offset, length)
    cluster_size = geometry.cluster_size
    index = geometry.l2_index(offset)
    in_cluster = offset & (cluster_size - 1)
    first = decode_entry(entries[index], zero_flag=zero_flag)
    covered = cluster_size - in_cluster
    if first.type is ClusterType.NORMAL:
        next_host = first.host_offset + cluster_size
        while covered < length and index + 1 < geometry.l2_entries:
            index += 1
            mapping = decode_entry(entries[index], zero_flag=zero_flag)
            if mapping.type is not ClusterType.NORMAL or mapping.host_offset != next_host:
                break
            covered += cluster_size
            next_host += cluster_size
        return Run(min(covered, length), first.type, first.host_offset + in_cluster)
    if first.type is not ClusterType.COMPRESSED:
        while covered < length and index + 1 < geometry.l2_entries:
            index += 1
            if decode_entry(entries[index], zero_flag=zero_flag).type is not first.type:
                break
            covered += cluster_size
    return Run(min(covered, length), first.type, 0)


def _extended_state(entries: Sequence[int], index: int, sub: int) -> tuple[ClusterType, int]:
    entry = entries[2 * index]
    if entry & QCOW_OFLAG_COMPRESSED:
        return ClusterType.COMPRESSED, 0
    state = subcluster_state(entries[2 * index + 1], sub)
    return state, entry & L2E_OFFSET_MASK


def _l2_run_extended(entries: Sequence[int], geometry: Geometry, offset: int,
                     length: int) -> Run:
    """`l2_run` for extended L2 entries: state changes per subcluster."""
    sub_size = geometry.subcluster_size
    index = geometry.l2_index(offset)
    in_cluster = offset & (geometry.cluster_size - 1)
    sub = in_cluster >> geometry.subcluster_bits
    state, host = _extended_state(entries, index, sub)
    if state is ClusterType.COMPRESSED:
        return Run(min(geometry.cluster_size - in_cluster, length), state, 0)
    start_host = host + in_cluster if state is ClusterType.NORMAL else 0
    next_host = host + (sub + 1) * sub_size
    covered = sub_size - (in_cluster & (sub_size - 1))
    while covered < length:
        sub += 1
        if sub == SUBCLUSTERS_PER_CLUSTER:
            sub, index = 0, index + 1
            if index == geometry.l2_entries:
                break
        next_state, host = _extended_state(entries, index, sub)
        if next_state is not state:
            break
        if state is ClusterType.NORMAL:
            if host + sub * sub_size != next_host:
                break
            next_host += sub_size
        covered += sub_size
    return Run(min(covered, length), state, start_host)


# -- table encoding ----------------------------------------------------------------


def unpack_table(data: bytes) -> list[int]:
    """Big-endian 64-bit entries (L1 and refcount tables)."""
    return list(struct.unpack(f">{len(data) // 8}Q", data))


def unpack_l2(data: bytes) -> array.array[int]:
    """An L2 table as 8 bytes per entry (a list of ints costs several times
    the memory, which matters for 2 MiB tables)."""
    entries = array.array("Q", data[:len(data) - len(data) % 8])
    if sys.byteorder == "little":
        entries.byteswap()
    return entries


def empty_l2(entries: int) -> array.array[int]:
    return array.array("Q", bytes(entries * 8))


def pack_table(entries: Sequence[int]) -> bytes:
    if isinstance(entries, array.array):
        packed = array.array("Q", entries)
        if sys.byteorder == "little":
            packed.byteswap()
        return packed.tobytes()
    return struct.pack(f">{len(entries)}Q", *entries)
