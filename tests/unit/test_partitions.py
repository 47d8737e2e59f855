"""imgfs.partitions: MBR/GPT tables against sfdisk, damaged and hostile tables.

sfdisk writes the tables and `sfdisk -J` says where each partition is (the
oracle for numbering and ranges); damage is then made by hand: a bad primary
CRC (the backup is used, as Linux does), a protective MBR alone, a hybrid
MBR, entries past the end or overlapping, an EBR chain that loops.
Hypothesis scribbles over the table sectors: only a Table may come out, its
partitions inside the disk and disjoint.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imgfs import partitions
from imgfs.partitions import Partition, Table, read_table
from tests.conftest import need, run

MiB = 1 << 20
DISK = 64 * MiB
SECTOR = 512


def table_of(data: bytes | bytearray) -> Table:
    image = bytes(data)

    async def read(offset: int, length: int) -> bytes:
        assert 0 <= offset and offset + length <= len(image)
        return image[offset:offset + length]
    return trio.run(read_table, read, len(image))


def sfdisk_image(path: Path, script: str, size: int = DISK) -> bytearray:
    need("sfdisk")
    with open(path, "wb") as image:
        image.truncate(size)
    run("sfdisk", "-q", path, input=script.encode())
    return bytearray(path.read_bytes())


def sfdisk_partitions(path: Path) -> list[Partition]:
    """Every partition sfdisk lists, but extended containers."""
    listing = json.loads(run("sfdisk", "-J", path).stdout)["partitiontable"]
    found = []
    for entry in listing["partitions"]:
        if entry["type"] in ("5", "f", "85"):
            continue
        number = int(entry["node"][len(str(path)):])
        found.append(Partition(number, entry["start"] * SECTOR, entry["size"] * SECTOR))
    return found


MBR_LOGICAL = "label: dos\n1MiB,8MiB,83\n,16MiB,83\n,,5\n,4MiB,83\n,4MiB,83\n,4MiB,83\n"
GPT_FIVE = "label: gpt\n,4MiB\n,4MiB\n,8MiB\n,4MiB\n,4MiB\n"


def test_mbr_with_logical_partitions_numbered_as_linux(tmp_path: Path) -> None:
    image = tmp_path / "mbr.img"
    data = sfdisk_image(image, MBR_LOGICAL)
    table = table_of(data)
    assert table.scheme == "mbr" and not table.warnings
    assert list(table.partitions) == sfdisk_partitions(image)
    assert [part.number for part in table.partitions] == [1, 2, 5, 6, 7]


def test_gpt_with_five_partitions(tmp_path: Path) -> None:
    image = tmp_path / "gpt.img"
    data = sfdisk_image(image, GPT_FIVE)
    table = table_of(data)
    assert table.scheme == "gpt" and not table.warnings
    assert list(table.partitions) == sfdisk_partitions(image)
    assert len(table.partitions) == 5


def test_gpt_entries_keep_their_index(tmp_path: Path) -> None:
    image = tmp_path / "gaps.img"
    data = sfdisk_image(image, "label: gpt\n1MiB,4MiB\n")
    run("sfdisk", "-q", "--append", image, input=b",4MiB\n")
    run("sfdisk", "-q", "--delete", image, "1")
    data = bytearray(image.read_bytes())
    assert [part.number for part in table_of(data).partitions] == [2]


def test_damaged_primary_gpt_uses_the_backup(tmp_path: Path) -> None:
    data = sfdisk_image(tmp_path / "gpt.img", GPT_FIVE)
    expected = table_of(data).partitions
    data[SECTOR + 60] ^= 0xFF                       # the disk GUID: CRC fails
    table = table_of(data)
    assert table.partitions == expected
    assert any("primary GPT header is invalid (header CRC mismatch)" in warning
               for warning in table.warnings)


def test_damaged_entry_array_uses_the_backup(tmp_path: Path) -> None:
    data = sfdisk_image(tmp_path / "gpt.img", GPT_FIVE)
    expected = table_of(data).partitions
    data[2 * SECTOR + 40] ^= 0x01                   # first entry's start LBA
    table = table_of(data)
    assert table.partitions == expected
    assert any("entry array CRC mismatch" in warning for warning in table.warnings)


def test_damaged_backup_gpt_is_reported(tmp_path: Path) -> None:
    data = sfdisk_image(tmp_path / "gpt.img", GPT_FIVE)
    expected = table_of(data).partitions
    data[-SECTOR + 60] ^= 0xFF
    table = table_of(data)
    assert table.partitions == expected
    assert any("backup GPT header is invalid" in warning for warning in table.warnings)


def test_protective_mbr_alone(tmp_path: Path) -> None:
    data = sfdisk_image(tmp_path / "gpt.img", GPT_FIVE)
    data[SECTOR:2 * SECTOR] = bytes(SECTOR)
    data[-SECTOR:] = bytes(SECTOR)
    table = table_of(data)
    assert table.partitions == ()
    assert any("protective MBR without a valid GPT" in warning for warning in table.warnings)


def test_hybrid_mbr_uses_the_gpt(tmp_path: Path) -> None:
    data = sfdisk_image(tmp_path / "gpt.img", GPT_FIVE)
    expected = table_of(data).partitions
    # a second MBR entry beside the protective one, as gdisk's hybrid MBRs
    struct.pack_into("<B3sB3sII", data, 446 + 16, 0, b"", 0x83, b"", 2048, 8192)
    table = table_of(data)
    assert table.partitions == expected
    assert any("hybrid MBR" in warning for warning in table.warnings)


def test_entry_past_the_end_is_not_exposed(tmp_path: Path) -> None:
    data = sfdisk_image(tmp_path / "mbr.img", "label: dos\n1MiB,8MiB\n,8MiB\n")
    struct.pack_into("<I", data, 446 + 16 + 12, DISK // SECTOR)   # partition 2's size
    table = table_of(data)
    assert [part.number for part in table.partitions] == [1]
    assert any("partition 2" in warning and "outside" in warning
               for warning in table.warnings)


def test_overlapping_entries_are_not_exposed(tmp_path: Path) -> None:
    data = sfdisk_image(tmp_path / "mbr.img", "label: dos\n1MiB,8MiB\n,8MiB\n,8MiB\n")
    struct.pack_into("<I", data, 446 + 16 + 8, 2048 + 100)        # 2 starts inside 1
    table = table_of(data)
    assert [part.number for part in table.partitions] == [3]
    assert any("partitions 1 and 2 overlap" in warning for warning in table.warnings)


def test_gpt_entry_outside_usable_lbas(tmp_path: Path) -> None:
    data = sfdisk_image(tmp_path / "gpt.img", "label: gpt\n,4MiB\n,4MiB\n")
    # partition 2 ends on the backup array; fix both CRCs so the header is valid
    entries_lba, entry_size = 2, 128
    struct.pack_into("<Q", data, entries_lba * SECTOR + entry_size + 40, DISK // SECTOR - 2)
    refresh_gpt_crcs(data, 1)
    table = table_of(data)
    assert [part.number for part in table.partitions] == [1]
    assert any("partition 2" in warning for warning in table.warnings)


def test_gpt_usable_lbas_must_leave_the_table_alone(tmp_path: Path) -> None:
    data = sfdisk_image(tmp_path / "gpt.img", "label: gpt\n,4MiB\n")
    struct.pack_into("<Q", data, SECTOR + 40, 0)              # FirstUsableLBA
    struct.pack_into("<Q", data, 2 * SECTOR + 32, 0)          # partition 1 from LBA 0
    refresh_gpt_crcs(data, 1)
    table = table_of(data)
    assert all(part.start > 0 for part in table.partitions)
    assert any("overlap the header" in warning for warning in table.warnings)


def test_ebr_chain_that_loops(tmp_path: Path) -> None:
    data = sfdisk_image(tmp_path / "mbr.img", MBR_LOGICAL)
    extended_start = struct.unpack_from("<I", data, 446 + 2 * 16 + 8)[0]
    # the second EBR links back to the first
    second_ebr = extended_start + struct.unpack_from("<I", data,
                                                     extended_start * SECTOR + 446 + 16 + 8)[0]
    struct.pack_into("<I", data, second_ebr * SECTOR + 446 + 16 + 8, 0)
    table = table_of(data)
    assert [part.number for part in table.partitions] == [1, 2, 5, 6]
    assert any("loops" in warning for warning in table.warnings)


def test_no_table() -> None:
    table = table_of(bytes(MiB))
    assert table == Table("none", (), ("no MBR or GPT partition table",))


def test_gpt_on_4096_byte_sectors() -> None:
    """A GPT written for 4 KiB sectors (a 4Kn disk's image)."""
    sector = 4096
    sectors = 2048
    data = bytearray(sectors * sector)
    struct.pack_into("<B3sB3sII", data, 446, 0, b"", 0xEE, b"", 1, sectors - 1)
    data[510:512] = b"\x55\xaa"
    for lba, alternate, entries in ((1, sectors - 1, 2), (sectors - 1, 1, sectors - 2)):
        header = bytearray(sector)
        struct.pack_into("<8sIIIIQQQQ16sQIII", header, 0, b"EFI PART", 0x10000, 92, 0, 0,
                         lba, alternate, 6, sectors - 6, bytes(16), entries, 32, 128, 0)
        entry = struct.pack("<16s16sQQQ72s", b"\x01" * 16, b"\x02" * 16, 256, 511, 0, b"")
        array = entry.ljust(32 * 128, b"\0")
        data[entries * sector:entries * sector + len(array)] = array
        data[lba * sector:(lba + 1) * sector] = header
        refresh_gpt_crcs(data, lba, sector)
    table = table_of(data)
    assert table.scheme == "gpt"
    assert table.partitions == (Partition(1, 256 * sector, 256 * sector),)


def refresh_gpt_crcs(data: bytearray, lba: int, sector: int = SECTOR) -> None:
    header = lba * sector
    entries_lba, count, size = struct.unpack_from("<QII", data, header + 72)
    array = bytes(data[entries_lba * sector:entries_lba * sector + count * size])
    struct.pack_into("<I", data, header + 88, partitions.gpt_crc(array))
    struct.pack_into("<I", data, header + 16, 0)
    header_size = struct.unpack_from("<I", data, header + 12)[0]
    struct.pack_into("<I", data, header + 16,
                     partitions.gpt_crc(bytes(data[header:header + header_size])))


# -- hostile tables -------------------------------------------------------------------

TABLE_BYTES = 40 * SECTOR           # MBR, GPT header and entries, first EBRs


#: the fields that size or place things: MBR entries' start and size, the GPT
#: header's LBAs, entry count and size, the first GPT entries' LBAs
TABLE_FIELDS = [*(446 + 16 * slot + field for slot in range(4) for field in (8, 12)),
                *(SECTOR + field for field in (12, 24, 32, 40, 48, 72, 80, 84)),
                *(2 * SECTOR + 128 * entry + field for entry in range(3) for field in (32, 40))]


@pytest.fixture(scope="module")
def sample_tables(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    directory = tmp_path_factory.mktemp("tables")
    small = 16 * MiB
    return [bytes(sfdisk_image(directory / "mbr.img",
                               "label: dos\n1MiB,2MiB\n,2MiB\n,,5\n,1MiB\n,1MiB\n", small)),
            bytes(sfdisk_image(directory / "gpt.img", "label: gpt\n" + ",1MiB\n" * 5, small))]


def assert_sane(table: Table, disk_size: int) -> None:
    ranges = sorted((part.start, part.end) for part in table.partitions)
    for start, end in ranges:
        assert 0 < start < end <= disk_size
    for (_, end), (start, _) in zip(ranges, ranges[1:], strict=False):
        assert end <= start
    assert len({part.number for part in table.partitions}) == len(table.partitions)


@settings(max_examples=300, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.integers(0, 1),
       edits=st.lists(st.tuples(st.one_of(st.integers(0, TABLE_BYTES - 8),
                                          st.sampled_from(TABLE_FIELDS)),
                                st.sampled_from([1, 4, 8]),
                                st.integers(0, 2**64 - 1)), min_size=1, max_size=12),
       fix_crc=st.booleans())
def test_hostile_tables(sample_tables: list[bytes], which: int,
                        edits: list[tuple[int, int, int]], fix_crc: bool) -> None:
    data = bytearray(sample_tables[which])
    for offset, width, value in edits:
        data[offset:offset + width] = (value % (1 << (8 * width))).to_bytes(width, "little")
    if fix_crc and data[SECTOR:SECTOR + 8] == b"EFI PART":
        header_size = struct.unpack_from("<I", data, SECTOR + 12)[0]
        entries_lba, count, size = struct.unpack_from("<QII", data, SECTOR + 72)
        if 92 <= header_size <= SECTOR and count * size <= TABLE_BYTES and entries_lba < 40:
            refresh_gpt_crcs(data, 1)
    assert_sane(table_of(data), len(data))
