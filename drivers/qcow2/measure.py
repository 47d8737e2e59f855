"""How large a new qcow2 image is (`imgfs measure -O qcow2`).

Spec: qemu/qemu docs/interop/qcow2.txt ("Host cluster management", "Cluster
mapping", "Bitmaps").  The fully allocated size is a header cluster, the L2
and L1 tables for every cluster of the disk, the refcount blocks and table
that count all of that, and the data; QEMU reports "required" as that
minus the data clusters the image would not hold.  Pure functions only.
"""
from __future__ import annotations

from typing import Any

from imgfs.block import Measurement, MeasureSource
from imgfs.errors import ImgfsError

from .header import QCOW_MAX_L1_SIZE

L1_ENTRY = 8
REFTABLE_ENTRY = 8
#: a bitmap directory entry's fixed part and a bitmap table entry (spec: Bitmaps)
BITMAP_DIR_ENTRY = 24
BITMAP_TABLE_ENTRY = 8


def div_round_up(value: int, unit: int) -> int:
    return -(-value // unit)


def round_up(value: int, unit: int) -> int:
    return div_round_up(value, unit) * unit


def refcount_metadata_size(clusters: int, cluster_size: int, refcount_order: int) -> int:
    """Bytes of refcount blocks and table that count `clusters` clusters and themselves."""
    blocks_per_table_cluster = cluster_size // REFTABLE_ENTRY
    refcounts_per_block = cluster_size * 8 >> refcount_order
    table = blocks = 0
    total = -1
    while True:
        blocks = -(-(clusters + table + blocks) // refcounts_per_block)
        table = -(-blocks // blocks_per_table_cluster)
        if clusters + blocks + table == total:
            return (blocks + table) * cluster_size
        total = clusters + blocks + table


def fully_allocated_size(virtual_size: int, cluster_size: int, refcount_order: int,
                         extended_l2: bool) -> int:
    """Header, L2 tables, L1 table, refcount metadata and every data cluster."""
    l2_entry = 16 if extended_l2 else 8
    data = round_up(virtual_size, cluster_size)
    l2_entries = round_up(data // cluster_size, cluster_size // l2_entry)
    l1_entries = round_up(l2_entries * l2_entry // cluster_size, cluster_size // L1_ENTRY)
    metadata = cluster_size + l2_entries * l2_entry + l1_entries * L1_ENTRY
    metadata += refcount_metadata_size((metadata + data) // cluster_size, cluster_size,
                                       refcount_order)
    return metadata + data


def data_clusters_bytes(data: tuple[tuple[int, int], ...], cluster_size: int) -> int:
    """Bytes of the clusters the data ranges touch, counted as QEMU counts
    them (each range widened to cluster boundaries, ranges in order)."""
    total, covered = 0, 0
    for offset, length in data:
        start = max(offset, covered)
        end = offset + length
        if end <= start:
            continue
        stop = round_up(end, cluster_size)
        total += start % cluster_size + (stop - start)
        covered = stop
    return total


def bitmaps_size(bitmaps: tuple[tuple[str, int], ...], disk_size: int, cluster_size: int) -> int:
    """Every bitmap fully allocated, its table, and the directory."""
    total = directory = 0
    for name, granularity in bitmaps:
        bitmap_bytes = div_round_up(div_round_up(disk_size, granularity), 8)
        clusters = div_round_up(bitmap_bytes, cluster_size)
        total += clusters * cluster_size + round_up(clusters * BITMAP_TABLE_ENTRY, cluster_size)
        directory += round_up(BITMAP_DIR_ENTRY + len(name.encode()), 8)
    return total + round_up(directory, cluster_size)


def measure(size: int, options: dict[str, Any], source: MeasureSource | None,
            luks_header_bytes: int) -> Measurement:
    """qemu-img measure for qcow2 create `options` (parsed)."""
    cluster_size = options["cluster_size"]
    extended_l2 = bool(options["extended_l2"])
    refcount_order = options["refcount_bits"].bit_length() - 1
    version = 2 if options["compat"] in ("0.10", "v2") else 3
    virtual_size = round_up(size, cluster_size)
    l2_entry = 16 if extended_l2 else 8
    l2_tables = -(-(virtual_size // cluster_size) // (cluster_size // l2_entry))
    if l2_tables * L1_ENTRY > QCOW_MAX_L1_SIZE:
        raise ImgfsError("The image size is too large (try using a larger cluster size)")
    required = 0
    if source is not None:
        virtual_size = round_up(source.size, cluster_size)
        required = virtual_size if options["backing_file"] else \
            data_clusters_bytes(source.data, cluster_size)
    if options["preallocation"] in ("full", "falloc"):
        required = virtual_size
    fully = round_up(luks_header_bytes, cluster_size) + fully_allocated_size(
        virtual_size, cluster_size, refcount_order, extended_l2)
    bitmaps = None
    if version >= 3 and source is not None and source.bitmaps is not None:
        bitmaps = bitmaps_size(source.bitmaps, source.size, cluster_size)
    return Measurement(fully - virtual_size + required, fully, bitmaps)
