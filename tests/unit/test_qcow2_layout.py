"""qcow2 layout math, struct sizes and header validation (no I/O)."""
from __future__ import annotations

import struct
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from imgfs.drivers.qcow2 import cluster, create, header, refcount, snapshot

from imgfs.errors import ImgfsError, InvalidImage, Unsupported


def test_struct_sizes_match_the_spec():
    assert header.HEADER_V2.size == 72
    assert header.HEADER_V2.size + header.HEADER_V3_FIELDS.size == 104
    assert header.FEATURE_NAME_ENTRY.size == 48
    assert header.EXTENSION_HEADER.size == 8
    assert snapshot.SNAPSHOT_ENTRY.size == 40


@given(cluster_bits=st.integers(9, 21), extended=st.booleans(),
       offset=st.integers(0, 2**56))
def test_l1_l2_indexes_rebuild_the_offset(cluster_bits, extended, offset):
    if extended and cluster_bits < 14:
        extended = False
    geo = cluster.Geometry(cluster_bits, extended)
    rebuilt = (((geo.l1_index(offset) << geo.l2_bits) + geo.l2_index(offset))
               << cluster_bits) + geo.offset_in_cluster(offset)
    assert rebuilt == offset
    assert geo.l2_entries * (16 if extended else 8) == geo.cluster_size


@given(cluster_bits=st.integers(9, 21), data=st.data())
def test_compressed_descriptor_round_trip(cluster_bits, data):
    cluster_size = 1 << cluster_bits
    offset_bits = 62 - (cluster_bits - 8)
    host = data.draw(st.integers(0, min(2**offset_bits, 2**56) - 1))
    length = data.draw(st.integers(1, cluster_size + cluster_size // 8))
    if (host + length - 1) // 512 - host // 512 >= 1 << (cluster_bits - 8):
        length = 1
    entry = cluster.compressed_descriptor(host, length, cluster_bits)
    got_host, most = cluster.compressed_range(entry, cluster_bits)
    assert got_host == host
    assert most >= length
    assert most - length < 512
    assert cluster.decode_entry(entry, zero_flag=True).type is cluster.ClusterType.COMPRESSED


@given(order=st.integers(0, 6), data=st.data())
def test_refcount_entries_round_trip(order, data):
    cluster_bits = 9
    geo = refcount.RefcountGeometry(cluster_bits, order)
    block = bytearray(1 << cluster_bits)
    values = {}
    for _ in range(20):
        index = data.draw(st.integers(0, geo.block_entries - 1))
        value = data.draw(st.integers(0, geo.max_refcount))
        refcount.set_refcount(block, index, order, value)
        values[index] = value
    for index, value in values.items():
        assert refcount.get_refcount(block, index, order) == value
    free = refcount.first_free(block, 0, order)
    expected = next((i for i in range(geo.block_entries)
                     if refcount.get_refcount(block, i, order) == 0), -1)
    assert free == expected


def test_sub_byte_refcounts_start_at_the_least_significant_bit():
    block = bytearray(4)
    refcount.set_refcount(block, 0, 0, 1)
    refcount.set_refcount(block, 9, 0, 1)
    assert block[:2] == bytes([0x01, 0x02])
    block = bytearray(4)
    refcount.set_refcount(block, 1, 2, 0xA)
    assert block[0] == 0xA0


def _entries(*values):
    return list(values) + [0] * (512 // 8 - len(values))


def test_l2_run_coalesces_host_contiguous_clusters():
    geo = cluster.Geometry(9)
    copied = cluster.QCOW_OFLAG_COPIED
    entries = _entries(0x1000 | copied, 0x1200 | copied, 0x1400 | copied, 0x3000 | copied)
    run = cluster.l2_run(entries, geo, 100, 10**6, zero_flag=True)
    assert run == cluster.Run(3 * 512 - 100, cluster.ClusterType.NORMAL, 0x1000 + 100)
    run = cluster.l2_run(entries, geo, 3 * 512, 10**6, zero_flag=True)
    assert run.host_offset == 0x3000 and run.length == 512
    run = cluster.l2_run(entries, geo, 4 * 512, 10**6, zero_flag=True)
    assert run.type is cluster.ClusterType.UNALLOCATED and run.length == 60 * 512


def test_l2_run_zero_flag_only_on_v3():
    geo = cluster.Geometry(9)
    entries = _entries(cluster.QCOW_OFLAG_ZERO, cluster.QCOW_OFLAG_ZERO)
    assert cluster.l2_run(entries, geo, 0, 1024, zero_flag=True).type is cluster.ClusterType.ZERO
    assert cluster.l2_run(entries, geo, 0, 1024,
                          zero_flag=False).type is cluster.ClusterType.UNALLOCATED


def test_l2_run_extended_follows_subclusters():
    geo = cluster.Geometry(14, True)
    sub = geo.subcluster_size
    entries = [0] * (geo.l2_entries * 2)
    entries[0] = 0x10000 | cluster.QCOW_OFLAG_COPIED
    entries[1] = 0b0110 | (0b1000 << 32)        # subclusters 1, 2 data; 3 zero
    run = cluster.l2_run(entries, geo, 0, 10**6, zero_flag=False)
    assert run == cluster.Run(sub, cluster.ClusterType.UNALLOCATED, 0)
    run = cluster.l2_run(entries, geo, sub + 5, 10**6, zero_flag=False)
    assert run == cluster.Run(2 * sub - 5, cluster.ClusterType.NORMAL, 0x10000 + sub + 5)
    run = cluster.l2_run(entries, geo, 3 * sub, 10**6, zero_flag=False)
    assert run == cluster.Run(sub, cluster.ClusterType.ZERO, 0)


@given(size=st.integers(0, 2**40), cluster_bits=st.integers(9, 21), order=st.integers(0, 6))
@settings(max_examples=60)
def test_initial_layout_counts_itself(size, cluster_bits, order):
    settings_ = create.CreateSettings(3, cluster_bits, order, False, False, 0, None, None,
                                      None, False, "off")
    if header.l1_entries_needed(size, cluster_bits, False) > header.QCOW_MAX_L1_SIZE // 8:
        return
    layout = create.initial_layout(size, settings_)
    geo = refcount.RefcountGeometry(cluster_bits, order)
    assert layout.refcount_blocks * geo.block_entries >= layout.total_clusters
    assert layout.refcount_table_clusters << (cluster_bits - 3) >= layout.refcount_blocks
    assert layout.l1_size == header.l1_entries_needed(size, cluster_bits, False)


def test_header_round_trip():
    hdr = header.Header(header.MAGIC, 3, 0, 0, 16, 1 << 30, 0, 2, 0x30000, 0x10000, 1, 0, 0,
                        header.INCOMPAT_EXTL2, 1, 0, 4, 112, 0)
    packed = hdr.pack()
    assert len(packed) == 112
    assert header.Header.unpack(packed) == hdr


# -- hostile headers ---------------------------------------------------------------

def _valid_head(**changes) -> bytearray:
    hdr = header.Header(header.MAGIC, 3, 0, 0, 16, 1 << 20, 0, 1, 0x30000, 0x10000, 1, 0, 0,
                        0, 0, 0, 4, 112, 0)._replace(**changes)
    return bytearray(hdr.pack() + header.pack_extensions([header.feature_table_extension()]))


FILE_SIZE = 4 << 16

HOSTILE = {
    "cluster_bits too small": dict(cluster_bits=8),
    "cluster_bits too large": dict(cluster_bits=22),
    "l1 offset past EOF": dict(l1_table_offset=1 << 40),
    "l1 offset unaligned": dict(l1_table_offset=0x30008),
    "huge l1_size": dict(l1_size=0xFFFFFFFF),
    "l1_size too small": dict(l1_size=0, size=1 << 40),
    "refcount table past EOF": dict(refcount_table_offset=1 << 40),
    "refcount table unaligned": dict(refcount_table_offset=0x10001),
    "huge refcount table": dict(refcount_table_clusters=0xFFFFFFFF),
    "no refcount table": dict(refcount_table_clusters=0),
    "refcount_order": dict(refcount_order=7),
    "header_length odd": dict(header_length=105),
    "header_length huge": dict(header_length=1 << 20),
    "backing name too long": dict(backing_file_offset=512, backing_file_size=100000),
    "backing name outside": dict(backing_file_offset=65530, backing_file_size=100),
    "unknown incompatible bit": dict(incompatible_features=1 << 40),
    "snapshot table past EOF": dict(nb_snapshots=5, snapshots_offset=1 << 40),
    "too many snapshots": dict(nb_snapshots=1 << 30, snapshots_offset=0x20000),
    "version": dict(version=4),
    "encrypted": dict(crypt_method=2),
    "bad crypt method": dict(crypt_method=9),
    "compression type without bit": dict(compression_type=1),
    "extended L2 with small clusters": dict(incompatible_features=header.INCOMPAT_EXTL2,
                                            cluster_bits=12, l1_table_offset=0x3000,
                                            refcount_table_offset=0x1000),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_header_fields_are_refused(name):
    head = _valid_head(**HOSTILE[name])
    start = time.monotonic()
    with pytest.raises(ImgfsError) as info:
        header.parse_image_header(bytes(head), FILE_SIZE)
    assert time.monotonic() - start < 0.5
    assert isinstance(info.value, (InvalidImage, Unsupported))
    assert str(info.value)


def test_unknown_incompatible_bit_is_named_from_the_feature_table():
    head = _valid_head(incompatible_features=1 << 7)
    ext = header.Extension(header.EXT_FEATURE_TABLE,
                           header.FEATURE_NAME_ENTRY.pack(0, 7, b"time travel"))
    head = bytearray(head[:112] + header.pack_extensions([ext]))
    with pytest.raises(Unsupported, match="time travel"):
        header.parse_image_header(bytes(head), FILE_SIZE)


def test_extension_overrunning_the_cluster_is_refused():
    head = bytearray(_valid_head()[:112] + struct.pack(">II", 0x12345678, 1 << 30))
    with pytest.raises(InvalidImage, match="overruns"):
        header.parse_image_header(bytes(head), FILE_SIZE)


def test_valid_header_parses_with_unknown_extension_kept():
    ext = header.Extension(0x0BADC0DE, b"opaque")
    head = _valid_head()[:112] + header.pack_extensions([ext])
    image = header.parse_image_header(bytes(head), FILE_SIZE)
    assert image.extensions == (ext,)
    assert image.header.cluster_size == 65536


def test_snapshot_table_overflow_is_refused():
    entry = snapshot.SNAPSHOT_ENTRY.pack(0x30000, 1, 1, 1, 0, 0, 0, 0, 1 << 30)
    with pytest.raises(InvalidImage, match="overflows"):
        snapshot.parse_snapshot_table(entry + b"x" * 8, 1, 65536, FILE_SIZE)
    with pytest.raises(InvalidImage, match="overflows"):
        snapshot.parse_snapshot_table(b"", 3, 65536, FILE_SIZE)


def test_bitmap_directory_in_use_flag():
    from imgfs.drivers.qcow2 import bitmaps
    entry = bitmaps.BITMAP_DIRECTORY_ENTRY.pack(0x50000, 1, 2, 1, 16, 2, 0) + b"b0"
    raw = bytearray(entry + bytes(-len(entry) % 8))
    entries = bitmaps.parse_directory(bytes(raw), 1)
    assert entries == [bitmaps.BitmapEntry(0, 0x50000, 1, 2)]
    assert bitmaps.mark_in_use(raw, entries)
    assert bitmaps.parse_directory(bytes(raw), 1)[0].flags == 3
    with pytest.raises(InvalidImage):
        bitmaps.parse_directory(bytes(raw), 2)
    with pytest.raises(InvalidImage):
        bitmaps.check_extension(bitmaps.BitmapsExtension(1, 0, 1 << 40, 0x10000),
                                65536, FILE_SIZE)
    with pytest.raises(InvalidImage):
        bitmaps.check_extension(bitmaps.BitmapsExtension(0, 0, 8, 0x10000), 65536, FILE_SIZE)


# Names are C strings to QEMU (read up to the first NUL), and so to imgfs.
C_STRING_TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\0"),
                        min_size=1, max_size=20)


@given(st.lists(st.tuples(C_STRING_TEXT, st.integers(0, 2**32 - 1)), max_size=5))
@settings(max_examples=40)
def test_snapshot_entries_round_trip(items):
    snaps = [snapshot.Snapshot(str(number + 1), name, 0x10000 * (number + 1), number, 1, 2,
                               3 * 10**9 + 4, size, 1 << 20, 0,
                               snapshot.new_extra_data(1 << 20))
             for number, (name, size) in enumerate(items)]
    table = b"".join(snap.pack() for snap in snaps)
    assert len(table) % 8 == 0
    parsed = snapshot.parse_snapshot_table(table, len(snaps), 65536, 1 << 40)
    assert [(s.id, s.name, s.l1_table_offset, s.disk_size) for s in parsed] == \
        [(s.id, s.name, s.l1_table_offset, s.disk_size) for s in snaps]
