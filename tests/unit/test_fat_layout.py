"""Virtual FAT: struct sizes, layout math, names and filename parsing (no I/O)."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from imgfs.drivers.fat import dirent, layout
from imgfs.drivers.fat.driver import parse_fat_filename

from imgfs.errors import ImgfsError, UsageError


def test_struct_sizes_match_the_spec():
    assert layout.BPB.size == 36
    assert layout.BPB.size + layout.EBPB16.size == 62
    assert layout.BPB.size + layout.EBPB32.size == 90
    assert layout.PARTITION_ENTRY.size == 16
    assert dirent.DIR_ENTRY.size == 32
    assert dirent.LFN_ENTRY.size == 32


@pytest.mark.parametrize("text, expected", [
    ("fat:/srv/x", {"dir": "/srv/x", "floppy": False, "rw": False, "fat-type": 0}),
    ("fat:floppy:rw:12:d", {"dir": "d", "floppy": True, "rw": True, "fat-type": 12}),
    ("fat:12:rw:floppy:d", {"dir": "d", "floppy": True, "rw": True, "fat-type": 12}),
    ("fat:rw:32:/a", {"dir": "/a", "floppy": False, "rw": True, "fat-type": 32}),
    # several types: 32 beats 16 beats 12, as in QEMU
    ("fat:12:floppy:16:d", {"dir": "d", "floppy": True, "rw": False, "fat-type": 16}),
    # a colon inside DIR stays there
    ("fat:16:/srv/a:b", {"dir": "/srv/a:b", "floppy": False, "rw": False, "fat-type": 16}),
    ("fat:x:d", {"dir": "x:d", "floppy": False, "rw": False, "fat-type": 0}),
])
def test_filename_forms(text, expected):
    assert parse_fat_filename(text) == expected


def test_filename_without_directory_is_refused():
    with pytest.raises(UsageError, match="no directory"):
        parse_fat_filename("fat:floppy:")


def test_lfn_checksum_known_value():
    # mkfs-independent check: the rotate-and-add sum of "README  TXT"
    total = 0
    for byte in b"README  TXT":
        total = ((total >> 1) | ((total & 1) << 7)) + byte & 0xFF
    assert dirent.lfn_checksum(b"README  TXT") == total


def test_long_name_entries_round_trip():
    name = "A rather long name ☃ with 𝄞 in it.txt"
    short = b"ARATHE~1TXT"
    data = dirent.long_name_entries(name, dirent.lfn_checksum(short))
    assert len(data) % 32 == 0
    entries = [dirent.LfnEntry.unpack(data[i:i + 32]) for i in range(0, len(data), 32)]
    assert entries[0].sequence & dirent.LFN_LAST
    assert [entry.sequence & 0x1F for entry in entries] == list(range(len(entries), 0, -1))
    units = b"".join(e.part1 + e.part2 + e.part3 for e in reversed(entries))
    text = units.decode("utf-16-le", errors="surrogatepass")
    assert text.split("\0")[0] == name
    assert all(entry.attributes == dirent.ATTR_LONG_NAME for entry in entries)


@pytest.mark.parametrize("name, short", [
    ("README.TXT", b"README  TXT"), ("A", b"A          "), ("ABCDEFGH.ABC", b"ABCDEFGHABC"),
    ("readme.txt", None), ("ABCDEFGHI", None), ("A.B.C", None), (".X", None), ("A B", None),
    ("A+B", None),
])
def test_clean_short_names(name, short):
    assert dirent.clean_short_name(name) == short


def test_generated_short_names_are_unique():
    names = dirent.ShortNames({b"FILE~1  TXT"})
    made = [names.generate(f"file {n}.txt") for n in range(12000)]
    assert len(set(made)) == len(made)
    assert b"FILE~1  TXT" not in made
    assert all(len(short) == 11 for short in made)
    assert names.generate(".bashrc") == b"BASHRC~1   "
    assert names.generate("ünï.tar.gz") == b"_N_TAR~1GZ "


@pytest.mark.parametrize("name", ["a:b", "x?", "tail.", "tail ", "a" * 256, "tab\there"])
def test_names_fat_cannot_hold(name):
    assert dirent.name_problem(name) is not None


def test_fat_stamp_clamps_to_fat_years():
    assert dirent.fat_stamp(0).date == (1 << 5) | 1            # before 1980
    late = dirent.fat_stamp(2 ** 40)
    assert late.date >> 9 == 127
    now = dirent.fat_stamp(1_700_000_001.5)
    assert now.tenths in (50, 150)


@given(fat_type=st.sampled_from([12, 16, 32]), per_cluster=st.sampled_from([1, 2, 4, 8, 64]),
       total=st.integers(100, 2 ** 24), align=st.sampled_from([1, 8, 64]))
def test_plan_volume_fat_covers_every_cluster(fat_type, per_cluster, total, align):
    volume = layout.plan_volume(fat_type, total, per_cluster, 512, align=align)
    entries = volume.fat_sectors * layout.SECTOR_SIZE * 8 // layout.ENTRY_BITS[fat_type]
    assert entries >= volume.cluster_count + 2
    end = volume.data_sector + volume.cluster_count * per_cluster
    assert end <= total or volume.cluster_count == 0
    assert volume.data_sector % align == 0
    # fixed point: one sector fewer per FAT would not cover the clusters
    assert layout.fat_sectors_for(fat_type, volume.cluster_count) <= volume.fat_sectors


@given(fat_type=st.sampled_from([12, 16, 32]), per_cluster=st.sampled_from([1, 8, 64]),
       clusters=st.integers(1, 2 ** 20))
def test_volume_for_clusters_is_the_inverse(fat_type, per_cluster, clusters):
    volume = layout.volume_for_clusters(fat_type, clusters, per_cluster, 512,
                                        align=max(per_cluster, 8))
    again = layout.plan_volume(fat_type, volume.total_sectors, per_cluster, 512,
                               align=max(per_cluster, 8))
    assert again.cluster_count == clusters
    assert again.fat_sectors == volume.fat_sectors


@given(used=st.integers(0, 2 ** 40), forced=st.sampled_from([None, 12, 16, 32]))
def test_auto_size_gives_a_legal_cluster_count(used, forced):
    def needed(fat_type: int, cluster_size: int) -> int:
        return -(-used // cluster_size) + 1
    try:
        volume = layout.plan_auto_size(forced, 512, needed, used,
                                       layout.free_space(used, writable=False))
    except ImgfsError:
        assert forced in (12, 16)           # only the small types run out
        return
    assert layout.type_for_clusters(volume.cluster_count) == volume.fat_type
    assert forced in (None, volume.fat_type)
    assert needed(volume.fat_type, volume.cluster_size) <= volume.cluster_count
    assert volume.cluster_size <= layout.MAX_CLUSTER_SIZE


def test_rw_disks_get_room_to_work_in():
    assert layout.free_space(10 << 20, writable=False) == 1 << 20
    assert layout.free_space(10 << 20, writable=True) == 256 << 20
    assert layout.free_space(10 << 30, writable=True) == 5 << 30


def test_fixed_size_refuses_what_does_not_fit():
    with pytest.raises(ImgfsError, match="does not fit"):
        layout.plan_fixed_size(None, 512, lambda kind, size: 10 ** 9 // size, 40960)
    with pytest.raises(ImgfsError, match="cannot hold FAT32"):
        layout.plan_fixed_size(32, 512, lambda kind, size: 1, 40960)
    volume = layout.plan_fixed_size(None, 512, lambda kind, size: 1, 1 << 21)
    assert volume.fat_type == 32 and volume.total_sectors == 1 << 21


def test_floppy_geometries():
    small = layout.plan_floppy(None, 0, lambda kind, size: 10)
    assert (small.total_sectors, small.fat_sectors, small.root_entries) == (2880, 9, 224)
    big = layout.plan_floppy(None, 0, lambda kind, size: 2000 * 1024 // size)
    assert (big.total_sectors, big.sectors_per_cluster, big.root_entries) == (5760, 2, 240)
    with pytest.raises(ImgfsError, match="does not fit on a floppy"):
        layout.plan_floppy(None, 0, lambda kind, size: 4 * 1024 * 1024 // size)
    with pytest.raises(UsageError, match="FAT32"):
        layout.plan_floppy(32, 0, lambda kind, size: 1)


def test_chs_and_partition_types():
    assert layout.chs(0) == bytes((0, 1, 0))
    assert layout.chs(2048) == bytes((32, 33, 0))
    assert layout.chs(layout.CHS_LIMIT + 5) == bytes((254, 0xFF, 0xFF))
    assert layout.partition_type(12, 2048, 20000) == layout.PART_FAT12
    assert layout.partition_type(16, 2048, 60000) == layout.PART_FAT16_SMALL
    assert layout.partition_type(16, 2048, 600000) == layout.PART_FAT16
    assert layout.partition_type(32, 2048, 2 ** 26) == layout.PART_FAT32_LBA


def test_boot_sector_fields():
    volume = layout.volume_for_clusters(32, 70000, 8, 0, align=8)
    sector = layout.boot_sector(volume, 0x12345678, b"LABEL      ")
    bpb = layout.Bpb.unpack(sector)
    assert bpb.jump == layout.JUMP_FAT32 and bpb.root_entries == 0
    assert bpb.total_sectors_32 == volume.total_sectors and bpb.fat_sectors_16 == 0
    assert sector[510:] == layout.SECTOR_SIGNATURE
    assert sector[82:90] == b"FAT32   "


def test_labels():
    assert layout.check_label("share") == b"SHARE      "
    assert layout.check_label("") == layout.NO_NAME
    with pytest.raises(UsageError):
        layout.check_label("much too long a label")
