"""rw mode of the virtual FAT: reading entries back and planning host changes."""
from __future__ import annotations

import time

from imgfs.drivers.fat import dirent, writeback
from imgfs.drivers.fat.writeback import FatFile, plan_changes


def entry(name: bytes, case: int = 0) -> dirent.DirEntry:
    return dirent.DirEntry(name[:8], name[8:], dirent.ATTR_ARCHIVE, case, 0, 0, 0, 0, 0, 0,
                           0, 0, 0)


def test_short_names_honour_nt_case_flags():
    assert writeback._short_text(entry(b"README  TXT")) == "README.TXT"
    flags = writeback.CASE_LOWER_BASE | writeback.CASE_LOWER_EXT
    assert writeback._short_text(entry(b"KEEP    TXT", flags)) == "keep.txt"
    assert writeback._short_text(entry(b"MAKEFILE   ", writeback.CASE_LOWER_BASE)) == "makefile"
    assert writeback._short_text(entry(b"\x05BC     TXT")) == "\u03c3BC.TXT"   # 0xE5 in cp437


def test_long_names_read_back():
    name = "Nouveau fichier ☃ 𝄞.txt"
    data = dirent.long_name_entries(name, 0)
    parts = {}
    for offset in range(0, len(data), 32):
        lfn = dirent.LfnEntry.unpack(data[offset:offset + 32])
        parts[lfn.sequence & 0x1F] = lfn.part1 + lfn.part2 + lfn.part3
    assert writeback._long_name(parts) == name
    del parts[1]
    assert writeback._long_name(parts) is None


def test_plan_changes():
    old = {
        "a": FatFile("a", False, 10, (2,)),
        "b": FatFile("b", False, 10, (3,)),
        "d": FatFile("d", True, 0, (4,)),
        "d/c": FatFile("d/c", False, 10, (5,)),
        "e": FatFile("e", True, 0, (6,)),
    }
    new = {
        "a": FatFile("a", False, 10, (2,)),            # untouched
        "b2": FatFile("b2", False, 10, (3,)),          # renamed
        "d": FatFile("d", True, 0, (4,)),
        "d/c": FatFile("d/c", False, 10, (5,)),        # rewritten in place
        "e": FatFile("e", False, 0, ()),               # directory became a file
        "n": FatFile("n", True, 0, (7,)),
        "n/m": FatFile("n/m", True, 0, (8,)),
    }
    changes = plan_changes(old, new, lambda chain: 5 in chain)
    assert changes.remove_files == []
    assert changes.moves == [("b", "b2")]
    assert changes.remove_dirs == ["e"]
    assert changes.make_dirs == ["n", "n/m"]
    assert [item.path for item in changes.write_files] == ["d/c", "e"]
    assert changes.replaced(old) == ["d/c"]
    assert plan_changes(old, old, lambda chain: False).empty()


def test_a_swap_is_two_moves_and_a_rewritten_source_is_no_move():
    old = {"a": FatFile("a", False, 10, (2,)), "b": FatFile("b", False, 20, (3, 4))}
    swapped = {"a": FatFile("a", False, 20, (3, 4)), "b": FatFile("b", False, 10, (2,))}
    changes = plan_changes(old, swapped, lambda chain: False)
    assert sorted(changes.moves) == [("a", "b"), ("b", "a")]
    assert not changes.write_files and not changes.remove_files
    assert changes.replaced(old) == []
    renamed = {"c": FatFile("c", False, 10, (2,)), "b": old["b"]}
    changes = plan_changes(old, renamed, lambda chain: 2 in chain)
    assert changes.moves == [] and changes.remove_files == ["a"]
    assert [item.path for item in changes.write_files] == ["c"]


def test_fat_mtime_round_trips_fat_stamps():
    moment = time.mktime((2021, 6, 7, 8, 9, 10, 0, 0, -1))
    stamp = dirent.fat_stamp(moment)
    item = FatFile("x", False, 0, (), stamp.time, stamp.date)
    assert writeback.fat_mtime(item) == moment
    assert writeback.fat_mtime(FatFile("x", False, 0, (), 0, 0)) is None
