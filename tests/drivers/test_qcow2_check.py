"""`imgfs check` against `qemu-img check`, one class of damage at a time.

Each case takes an image made by qemu-img/qemu-io (4 KiB clusters, 16-bit
refcounts: data, a compressed and a zero cluster; optionally an internal
snapshot or a persistent bitmap), damages one field with a struct write,
and runs both tools on their own copy.  They must agree on the exit code
and on every JSON field; `-r leaks` and `-r all` must agree on the exit
code and the report, and `qemu-img check` must then judge both repaired
copies alike.  imgfs runs in-process (`imgfs.cli.main`) to keep the
table fast.
"""
from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from imgfs import cli
from tests.conftest import imgfs, need, run

CLUSTER = 4096
COPIED = 1 << 63
#: compressed descriptor with 4 KiB clusters: offset bits 0..53
COMPRESSED_OFFSET = (1 << 54) - 1
BITMAPS_EXTENSION = 0x23852875


#: base image -> (qemu-img create -o, qemu-io writes)
BASES = {
    "plain": ("cluster_size=4k", ["write -P 3 0 100k", "write -c 200k 8k", "write -z 300k 8k"]),
    "v2": ("cluster_size=4k,compat=0.10", ["write -P 3 0 100k"]),
    "lazy": ("cluster_size=4k,lazy_refcounts=on", ["write -P 3 0 100k"]),
    # the data file is named by its absolute path: every copy shares it
    # (no repair writes to it)
    "data file": ("cluster_size=4k,data_file={directory}/base.data", ["write -P 3 0 100k"]),
    # 16 KiB clusters: L2 index 16 is compressed, 20 a zero cluster
    "extended": ("cluster_size=16k,extended_l2=on",
                 ["write -P 3 0 100k", "write -c 256k 16k", "write -z 320k 16k",
                  "write 512k 1k"]),
}


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    need("qemu-img", "qemu-io")
    directory = tmp_path_factory.mktemp("bases")
    images = {}
    for kind in ("plain", "snapshot", "bitmap", "v2", "lazy", "data file", "extended"):
        image = directory / f"{kind.replace(' ', '-')}.qcow2"
        options, writes = BASES.get(kind, BASES["plain"])
        run("qemu-img", "create", "-q", "-f", "qcow2", "-o",
            options.format(directory=directory), image, "1M")
        run("qemu-io", *[arg for write in writes for arg in ("-c", write)], image)
        if kind == "snapshot":
            run("qemu-img", "snapshot", "-c", "s", image)
            run("qemu-io", "-c", "write -P 5 50k 8k", image)
        if kind == "bitmap":
            run("qemu-img", "bitmap", "--add", image, "b0")
            run("qemu-io", "-c", "write -P 6 400k 8k", image)
        images[kind] = image
    return images


class Layout:
    """Where qemu-img put things in one image."""

    def __init__(self, image: Path) -> None:
        self.image = image
        raw = self.raw = image.read_bytes()
        self.l1 = self.u64(40)
        self.reftable = self.u64(48)
        self.refblock = self.u64(self.reftable)
        self.snapshots = self.u64(64)
        self.l1_entry = self.u64(self.l1)
        self.l2 = self.l1_entry & 0x00FF_FFFF_FFFF_FE00
        self.past_end = (len(raw) // CLUSTER + 16) * CLUSTER

    def u64(self, offset: int) -> int:
        return struct.unpack(">Q", self.raw[offset:offset + 8])[0]

    def l2_entry(self, index: int) -> int:
        return self.u64(self.l2 + 8 * index)

    def patch(self, offset: int, data: bytes) -> None:
        with open(self.image, "r+b") as handle:
            handle.seek(offset)
            handle.write(data)

    def set_l1(self, entry: int) -> None:
        self.patch(self.l1, struct.pack(">Q", entry))

    def set_l2(self, index: int, entry: int) -> None:
        self.patch(self.l2 + 8 * index, struct.pack(">Q", entry))

    def set_extended(self, index: int, entry: int | None = None,
                     bitmap: int | None = None) -> None:
        """Extended L2 entry `index`: 128 bits, the allocation bitmap second."""
        old_entry, old_bitmap = self.u64(self.l2 + 16 * index), self.u64(self.l2 + 16 * index + 8)
        self.patch(self.l2 + 16 * index, struct.pack(
            ">QQ", old_entry if entry is None else entry(old_entry),
            old_bitmap if bitmap is None else bitmap(old_bitmap)))

    def set_reftable(self, index: int, entry: int) -> None:
        self.patch(self.reftable + 8 * index, struct.pack(">Q", entry))

    def set_refcount(self, offset: int, value: int) -> None:
        self.patch(self.refblock + 2 * (offset // CLUSTER), struct.pack(">H", value))

    def bitmap(self) -> tuple[int, int, int, int]:
        """(extension data offset, directory, first table, first data cluster)."""
        position = struct.unpack(">I", self.raw[100:104])[0]
        while True:
            kind, length = struct.unpack(">II", self.raw[position:position + 8])
            if kind == BITMAPS_EXTENSION:
                directory = self.u64(position + 24)
                table = self.u64(directory)
                return position + 8, directory, table, self.u64(table)
            position += 8 + length + -length % 8


def _compressed(layout: Layout, offset: int) -> None:
    entry = layout.l2_entry(50)
    layout.set_l2(50, entry & ~COMPRESSED_OFFSET | offset)


def _bitmap(change: Callable[[Layout, int, int, int, int], None]
            ) -> Callable[[Layout], None]:
    return lambda layout: change(layout, *layout.bitmap())


def _dirty_with_refcount_0(layout: Layout) -> None:
    """A lazy-refcounts image that was not closed: dirty, refcounts stale."""
    layout.set_refcount(layout.l2_entry(1) & ~COPIED, 0)
    layout.patch(72, struct.pack(">Q", 1))


#: case -> (base image, damage); guest cluster 1 (L2 index 1) holds data,
#: L2 index 50 is the compressed cluster, 75 a zero cluster (see BASES
#: for the extended L2 image)
CASES: dict[str, tuple[str, Callable[[Layout], None]]] = {
    "clean": ("plain", lambda lay: None),
    "data refcount 0": ("plain", lambda lay: lay.set_refcount(lay.l2_entry(1) & ~COPIED, 0)),
    "data refcount 2": ("plain", lambda lay: lay.set_refcount(lay.l2_entry(1) & ~COPIED, 2)),
    "L2 refcount 0": ("plain", lambda lay: lay.set_refcount(lay.l2, 0)),
    "L2 refcount 2": ("plain", lambda lay: lay.set_refcount(lay.l2, 2)),
    "L1 refcount 0": ("plain", lambda lay: lay.set_refcount(lay.l1, 0)),
    "L1 refcount 2": ("plain", lambda lay: lay.set_refcount(lay.l1, 2)),
    "refcount block refcount 0": ("plain", lambda lay: lay.set_refcount(lay.refblock, 0)),
    "refcount block refcount 2": ("plain", lambda lay: lay.set_refcount(lay.refblock, 2)),
    "refcount table refcount 0": ("plain", lambda lay: lay.set_refcount(lay.reftable, 0)),
    "refcount table refcount 2": ("plain", lambda lay: lay.set_refcount(lay.reftable, 2)),
    "header refcount 0": ("plain", lambda lay: lay.set_refcount(0, 0)),
    "header refcount 2": ("plain", lambda lay: lay.set_refcount(0, 2)),
    "compressed refcount 0": ("plain", lambda lay: lay.set_refcount(
        lay.l2_entry(50) & COMPRESSED_OFFSET, 0)),
    "snapshot clean": ("snapshot", lambda lay: None),
    "snapshot table refcount 0": ("snapshot", lambda lay: lay.set_refcount(lay.snapshots, 0)),
    "snapshot table refcount 2": ("snapshot", lambda lay: lay.set_refcount(lay.snapshots, 2)),
    "snapshot L1 refcount 0": ("snapshot", lambda lay: lay.set_refcount(
        lay.u64(lay.snapshots), 0)),
    "snapshot L1 refcount 2": ("snapshot", lambda lay: lay.set_refcount(
        lay.u64(lay.snapshots), 2)),
    "shared data refcount 1": ("snapshot", lambda lay: lay.set_refcount(
        lay.l2_entry(1) & ~COPIED, 1)),
    "COPIED on a shared cluster": ("snapshot", lambda lay: lay.set_l2(
        1, lay.l2_entry(1) | COPIED)),
    "L1 entry unaligned": ("plain", lambda lay: lay.set_l1(lay.l1_entry + 0x200)),
    "L1 entry past EOF": ("plain", lambda lay: lay.set_l1(COPIED | lay.past_end)),
    "L1 entry on the refcount table": ("plain", lambda lay: lay.set_l1(COPIED | lay.reftable)),
    "L1 entry inside the header": ("plain", lambda lay: lay.set_l1(COPIED | 0x200)),
    "L1 entry reserved bits": ("plain", lambda lay: lay.set_l1(lay.l1_entry | 0x100)),
    "L1 COPIED missing": ("plain", lambda lay: lay.set_l1(lay.l1_entry & ~COPIED)),
    "L2 COPIED missing": ("plain", lambda lay: lay.set_l2(1, lay.l2_entry(1) & ~COPIED)),
    "data past EOF": ("plain", lambda lay: lay.set_l2(1, COPIED | lay.past_end)),
    "data on the refcount table": ("plain", lambda lay: lay.set_l2(1, COPIED | lay.reftable)),
    "data on the L1 table": ("plain", lambda lay: lay.set_l2(1, COPIED | lay.l1)),
    "data inside the header": ("plain", lambda lay: lay.set_l2(1, COPIED | 0x200)),
    "data unaligned": ("plain", lambda lay: lay.set_l2(1, lay.l2_entry(1) + 0x200)),
    "data reserved bits": ("plain", lambda lay: lay.set_l2(1, lay.l2_entry(1) | 0x10)),
    "preallocated zero past EOF": ("plain", lambda lay: lay.set_l2(
        75, COPIED | 1 | lay.past_end)),
    "compressed past EOF": ("plain", lambda lay: _compressed(lay, len(lay.raw) + 0x10000)),
    "compressed across EOF": ("plain", lambda lay: _compressed(lay, len(lay.raw) - 100)),
    "compressed sector count too big": ("plain", lambda lay: lay.set_l2(
        50, lay.l2_entry(50) | 0xFF << 54)),
    "compressed with COPIED": ("plain", lambda lay: lay.set_l2(
        50, lay.l2_entry(50) | COPIED)),
    "refcount table entry reserved bits": ("plain", lambda lay: lay.set_reftable(
        0, lay.refblock | 1)),
    "refcount table entry unaligned": ("plain", lambda lay: lay.set_reftable(
        0, lay.refblock + 0x200)),
    "refcount table entry past EOF": ("plain", lambda lay: lay.set_reftable(1, 0x100000)),
    "refcount table entry on the L1 table": ("plain", lambda lay: lay.set_reftable(0, lay.l1)),
    "v2 clean": ("v2", lambda lay: None),
    "v2 data refcount 2": ("v2", lambda lay: lay.set_refcount(lay.l2_entry(1) & ~COPIED, 2)),
    "v2 data refcount 0": ("v2", lambda lay: lay.set_refcount(lay.l2_entry(1) & ~COPIED, 0)),
    "data file clean": ("data file", lambda lay: None),
    "data file COPIED missing": ("data file", lambda lay: lay.set_l2(
        1, lay.l2_entry(1) & ~COPIED)),
    "data file compressed entry": ("data file", lambda lay: lay.set_l2(1, 1 << 62 | 0x5000)),
    "extended clean": ("extended", lambda lay: None),
    "extended allocated and zero bits": ("extended", lambda lay: lay.set_extended(
        1, bitmap=lambda bitmap: bitmap | 1 << 32)),
    "extended unallocated with allocation bits": ("extended", lambda lay: lay.set_extended(
        50, bitmap=lambda bitmap: 0xFF)),
    "extended compressed with a bitmap": ("extended", lambda lay: lay.set_extended(
        16, bitmap=lambda bitmap: 1)),
    "extended preallocated unaligned": ("extended", lambda lay: lay.set_extended(
        40, entry=lambda entry: entry + 0x200)),
    "extended data unaligned": ("extended", lambda lay: lay.set_extended(
        1, entry=lambda entry: entry + 0x200)),
    "extended bit 0 set": ("extended", lambda lay: lay.set_extended(
        1, entry=lambda entry: entry | 1)),
    "bitmap clean": ("bitmap", lambda lay: None),
    "bitmap directory refcount 0": ("bitmap", _bitmap(
        lambda lay, ext, directory, table, data: lay.set_refcount(directory, 0))),
    "bitmap directory refcount 2": ("bitmap", _bitmap(
        lambda lay, ext, directory, table, data: lay.set_refcount(directory, 2))),
    "bitmap table refcount 0": ("bitmap", _bitmap(
        lambda lay, ext, directory, table, data: lay.set_refcount(table, 0))),
    "bitmap table refcount 2": ("bitmap", _bitmap(
        lambda lay, ext, directory, table, data: lay.set_refcount(table, 2))),
    "bitmap data refcount 0": ("bitmap", _bitmap(
        lambda lay, ext, directory, table, data: lay.set_refcount(data, 0))),
    "bitmap data refcount 2": ("bitmap", _bitmap(
        lambda lay, ext, directory, table, data: lay.set_refcount(data, 2))),
    "bitmap data past EOF": ("bitmap", _bitmap(
        lambda lay, ext, directory, table, data: lay.patch(
            table, struct.pack(">Q", lay.past_end)))),
    "bitmap table past EOF": ("bitmap", _bitmap(
        lambda lay, ext, directory, table, data: lay.patch(
            directory, struct.pack(">Q", lay.past_end)))),
    "bitmap directory past EOF": ("bitmap", _bitmap(
        lambda lay, ext, directory, table, data: lay.patch(
            ext + 16, struct.pack(">Q", lay.past_end)))),
    "bitmap directory unaligned": ("bitmap", _bitmap(
        lambda lay, ext, directory, table, data: lay.patch(
            ext + 16, struct.pack(">Q", directory + 8)))),
    # tables whose open QEMU's check mode (and imgfs check) tolerates
    "snapshot L1 unaligned": ("snapshot", lambda lay: lay.patch(
        lay.snapshots, struct.pack(">Q", lay.u64(lay.snapshots) + 0x200))),
    "snapshot L1 past EOF": ("snapshot", lambda lay: lay.patch(
        lay.snapshots, struct.pack(">Q", lay.past_end))),
    "snapshot L1 too large": ("snapshot", lambda lay: lay.patch(
        lay.snapshots + 8, struct.pack(">I", 0x10000000))),
    "snapshot extra data too short": ("snapshot", lambda lay: lay.patch(
        lay.snapshots + 36, struct.pack(">I", 8))),
    "snapshot table past EOF": ("snapshot", lambda lay: lay.patch(
        64, struct.pack(">Q", lay.past_end))),
    "L1 table past EOF": ("plain", lambda lay: lay.patch(40, struct.pack(">Q", lay.past_end))),
    "refcount table past EOF": ("plain", lambda lay: lay.patch(
        48, struct.pack(">Q", lay.past_end))),
    "corrupt bit": ("plain", lambda lay: lay.patch(72, struct.pack(">Q", 2))),
    "dirty bit, refcount 0": ("lazy", _dirty_with_refcount_0),
    "bitmap in use": ("bitmap", _bitmap(
        lambda lay, ext, directory, table, data: lay.patch(
            directory + 12, struct.pack(">I", 3)))),
}

#: where the repairs part ways, and why (the check itself agrees)
REPAIRS_DIFFER = {
    # QEMU's repair trips its own overlap checks and fails (exit 1)
    "L1 entry inside the header": "all",
    "snapshot L1 too large": "all",
    "refcount table entry reserved bits": "all",
    "refcount table entry unaligned": "all",
    # imgfs rebuilds the refcounts of a dirty image when it opens it
    # read-write, before the check; QEMU's check sees them stale
    "dirty bit, refcount 0": "both",
    # QEMU's read-write open of a damaged bitmap rewrites the bitmaps
    "bitmap data past EOF": "both",
    "bitmap table past EOF": "both",
    # QEMU refuses -r leaks, as imgfs, but its read-write open has stored
    # the bitmaps meanwhile, into the clusters whose refcount was 0
    "bitmap data refcount 0": "leaks",
    "bitmap table refcount 0": "leaks",
    # imgfs opens this for the check only read-only: a repair refuses the
    # image (exit 1); QEMU's repair frees every cluster behind it (exit 2)
    "L1 table past EOF": "both",
    # -r leaks: both refuse (exit 1); -r all: QEMU rebuilds the refcount
    # structures (exit 0), imgfs refuses the read-write open (exit 1)
    "refcount table past EOF": "all",
}


def damaged(bases: dict[str, Path], directory: Path, case: str) -> Path:
    base, damage = CASES[case]
    image = directory / "damaged.qcow2"
    shutil.copyfile(bases[base], image)
    damage(Layout(image))
    return image


def imgfs_check(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str]:
    capsys.readouterr()
    code = cli.main(["check", *map(str, args)])
    return code, capsys.readouterr().out


def qemu_check(*args: str | Path) -> tuple[int, str]:
    result = run("qemu-img", "check", *args, check=False)
    return result.returncode, result.stdout


def _json(text: str) -> dict | None:
    return {**json.loads(text), "filename": ""} if text.strip() else None


def _without_end_offset(report: str) -> str:
    """As in the CLI tests: QEMU rebuilds refcount structures at the end of
    the file, imgfs in place, so the files end at different offsets."""
    return "\n".join(line for line in report.splitlines()
                     if not line.startswith("Image end offset"))


@pytest.mark.parametrize("case", list(CASES))
def test_check_agrees_with_qemu_img(bases, tmp_path, capsys, case) -> None:
    image = damaged(bases, tmp_path, case)
    copy = shutil.copyfile(image, tmp_path / "copy.qcow2")
    code, out = imgfs_check(capsys, "--output=json", image)
    expected_code, expected_out = qemu_check("--output=json", copy)
    assert (code, _json(out)) == (expected_code, _json(expected_out))


@pytest.mark.parametrize("cut", [4, 12, 39, 40, 69])
def test_snapshot_entry_cut_off_by_the_end_of_file(tmp_path, capsys, cut) -> None:
    """QEMU reads a snapshot table past the end of the file as zeros: info
    opens the image, and check calls the entry incomplete only when its
    fixed 40 bytes are cut (at 4 bytes even the L1 size is lost, so the
    snapshot's clusters leak); a cut name goes unremarked, and reads up to
    its first NUL, as the C string QEMU takes it for."""
    image = tmp_path / "cut.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", image, "8M")
    run("qemu-io", "-c", "write -P 0x11 0 1M", image)
    run("qemu-img", "snapshot", "-c", "first", image)
    table = struct.unpack_from(">Q", image.read_bytes(), 64)[0]
    assert image.stat().st_size - table == 70        # the table ends the file
    with open(image, "r+b") as file:
        file.truncate(table + cut)
    copy = shutil.copyfile(image, tmp_path / "copy.qcow2")
    code, out = imgfs_check(capsys, "--output=json", image)
    expected_code, expected_out = qemu_check("--output=json", copy)
    assert (code, _json(out)) == (expected_code, _json(expected_out))
    assert cli.main(["info", str(image)]) == 0
    run("qemu-img", "info", copy)
    # -r all writes the table anew, complete, as QEMU does
    code, out = imgfs_check(capsys, "-r", "all", image)
    expected_code, expected_out = qemu_check("-r", "all", copy)
    assert (code, _without_end_offset(out)) == (expected_code, _without_end_offset(expected_out))
    assert qemu_check(image)[0] == 0
    assert run("qemu-img", "snapshot", "-l", image).stdout == \
        run("qemu-img", "snapshot", "-l", copy).stdout


def _comparable(report: str, output: str) -> object:
    if output == "json":
        data = _json(report)
        return data and {key: value for key, value in data.items()
                         if key != "image-end-offset"}
    return _without_end_offset(report)


@pytest.mark.parametrize("case, mode", [(case, mode) for case in CASES
                                        for mode in ("leaks", "all")
                                        if REPAIRS_DIFFER.get(case) not in (mode, "both")])
@pytest.mark.parametrize("output", ["human", "json"])
def test_repair_agrees_with_qemu_img(bases, tmp_path, capsys, case, mode, output) -> None:
    image = damaged(bases, tmp_path, case)
    copy = shutil.copyfile(image, tmp_path / "copy.qcow2")
    code, out = imgfs_check(capsys, f"--output={output}", "-r", mode, image)
    expected_code, expected_out = qemu_check(f"--output={output}", "-r", mode, copy)
    assert (code, _comparable(out, output)) == \
        (expected_code, _comparable(expected_out, output))
    after, after_out = qemu_check(image)
    expected_after, expected_after_out = qemu_check(copy)
    assert (after, _without_end_offset(after_out)) == \
        (expected_after, _without_end_offset(expected_after_out))


@pytest.mark.parametrize("damage", ["table unaligned", "data unaligned"])
def test_bitmap_qemu_cannot_open_is_a_corruption(bases, tmp_path, capsys, damage) -> None:
    """QEMU refuses to open these at all (its exit code 1); imgfs reports
    the damaged entry as one corruption instead."""
    image = tmp_path / "b.qcow2"
    shutil.copyfile(bases["bitmap"], image)
    layout = Layout(image)
    _, directory, table, data = layout.bitmap()
    if damage == "table unaligned":
        layout.patch(directory, struct.pack(">Q", table + 0x200))
    else:
        layout.patch(table, struct.pack(">Q", data + 0x200))
    assert qemu_check(image)[0] == 1
    code, out = imgfs_check(capsys, "--output=json", image)
    assert code == 2 and json.loads(out)["corruptions"] == 1


@pytest.mark.parametrize("case", ["refcount table entry reserved bits",
                                  "refcount table entry unaligned"])
def test_damaged_refcount_table_is_rebuilt(bases, tmp_path, capsys, case) -> None:
    """QEMU's own repair of these fails on its overlap checks; imgfs builds
    new refcount structures, after which qemu-img finds nothing wrong and
    the guest data is intact."""
    image = damaged(bases, tmp_path, case)
    before = run("qemu-img", "convert", "-U", "-O", "raw", bases["plain"],
                 tmp_path / "before.raw").returncode
    assert before == 0
    code, out = imgfs_check(capsys, "-r", "all", image)
    assert code == 0, out
    assert qemu_check(image)[0] == 0
    assert run("qemu-img", "compare", "-U", image, tmp_path / "before.raw",
               check=False).returncode == 0


def test_dirty_image_is_clean_after_repair(bases, tmp_path, capsys) -> None:
    """imgfs rebuilds a dirty image's refcounts as it opens it read-write
    (before the check runs), so the repair itself has nothing left to do."""
    image = damaged(bases, tmp_path, "dirty bit, refcount 0")
    code, _ = imgfs_check(capsys, "-r", "all", image)
    assert code == 0
    assert qemu_check(image)[0] == 0


def test_l1_entries_past_the_end_of_the_file_are_checked_quickly(tmp_path) -> None:
    """Two hundred L1 entries naming 2 MiB L2 tables past the end of the
    file (each reads as 262144 zero entries): the same report as qemu-img,
    in a second or so, not the half minute walking every zero took."""
    need("qemu-img")
    image = tmp_path / "big.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=2M", image, "100T")
    raw = bytearray(image.read_bytes())
    l1_size, l1_offset = struct.unpack_from(">IQ", raw, 36)
    for index in range(l1_size):
        struct.pack_into(">Q", raw, l1_offset + 8 * index, (1 << 40) + (index << 21))
    image.write_bytes(raw)
    theirs = run("qemu-img", "check", image, check=False)
    ours = imgfs("check", image, check=False, timeout=15)
    assert (ours.returncode, sorted(ours.stdout.splitlines() + ours.stderr.splitlines())) == \
        (theirs.returncode, sorted(theirs.stdout.splitlines() + theirs.stderr.splitlines()))
