"""VDI against qemu-img / qemu-io, and differencing VDIs against dissect.hypervisor.

Images are made by ``qemu-img create -f vdi`` (static=on|off) and filled by
qemu-io out of order; what imgfs reads (``convert -O raw``, ``map``,
``info``, ``check``) is compared with what qemu-img says about the same
image, also after it is rewritten in VirtualBox's own header variant.
What imgfs writes, creates and converts is judged by ``qemu-img check``
and ``qemu-img compare``.  Differencing images (which QEMU refuses) are
checked against dissect.hypervisor's VDI reader given each parent, and
against the raw bytes they must hold.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import trio
from imgfs.drivers.vdi.layout import (
    BLOCK_FREE,
    BLOCK_ZERO,
    HEADER,
    NULL_UUID,
    Header,
    check_header,
    new_image,
    probe,
)

from imgfs.errors import InvalidImage, Unsupported
from imgfs.graph import open_image
from imgfs.node import OpenContext
from tests.conftest import imgfs, need, random_bytes, write_through_api
from tests.drivers.test_qed import qemu_create as qed_qemu_create
from tests.drivers.test_qed import qemu_io as qed_qemu_io
from tests.drivers.test_qed import run

KiB = 1024
MiB = 1024 * KiB
#: where the UUIDs are (random in every new image)
UUIDS = slice(0x188, 0x1C8)


@pytest.fixture(autouse=True)
def _in_workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    need("qemu-img", "qemu-io")
    monkeypatch.chdir(tmp_path)


# -- helpers ------------------------------------------------------------------------------

def qemu_create(image: Path, size: int | str, *options: str) -> Path:
    return qed_qemu_create(image, size, *options, fmt="vdi")


def qemu_io(image: Path, *commands: str) -> None:
    qed_qemu_io(image, *commands, fmt="vdi")


def out_of_order(image: Path, size: int) -> None:
    """Unaligned, block-crossing and zero writes, in no order."""
    qemu_io(image, f"write -P 0x11 {3 * MiB + 100} {2 * MiB + 7}",
            f"write -P 0x22 {MiB // 2} {MiB}",
            f"write -P 0x33 {size - MiB - 300} {MiB + 300}",
            f"write -z {7 * MiB} {MiB}",
            f"write -P 0x44 {9 * MiB + 1} 3")


def qemu_raw(image: Path, name: str = "qemu.raw") -> bytes:
    out = image.parent / name
    run("qemu-img", "convert", "-U", "-O", "raw", image, out)
    return out.read_bytes()


def imgfs_raw(image: Path, name: str = "imgfs.raw", *options: str) -> bytes:
    out = image.parent / name
    imgfs("convert", *options, "-O", "raw", image, out)
    return out.read_bytes()


def check_clean(image: Path) -> None:
    result = run("qemu-img", "check", "--output=json", image, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not json.loads(result.stdout).get("corruptions")


def compare_raw(expected: bytes, image: Path) -> None:
    raw = image.parent / "expected.raw"
    raw.write_bytes(expected)
    run("qemu-img", "compare", "-q", "-f", "raw", "-F", "vdi", raw, image)


def map_runs(entries: list[dict]) -> list[tuple]:
    """(start, length, depth, zero, data) with neighbours merged."""
    runs: list[list] = []
    for item in entries:
        values = [item["depth"], item["present"], item["zero"], item["data"]]
        if runs and runs[-1][2:] == values:
            runs[-1][1] += item["length"]
        else:
            runs.append([item["start"], item["length"], *values])
    return [tuple(entry) for entry in runs]


def map_json(tool: str, image: Path) -> list[tuple]:
    return map_runs(json.loads(run(tool, "map", "--output=json", image).stdout))


def check_json(tool: str, image: Path, *extra: str) -> tuple[int, dict, str]:
    """(exit status, report without the file name, stderr)."""
    result = run(tool, "check", "--output=json", *extra, image, check=False)
    report = json.loads(result.stdout)
    report.pop("filename")
    return result.returncode, report, result.stderr


def patch(image: Path, offset: int, data: bytes) -> None:
    with open(image, "r+b") as handle:
        handle.seek(offset)
        handle.write(data)


def header_of(image: Path) -> Header:
    return Header.unpack(image.read_bytes()[:HEADER.size])


def as_virtualbox(image: Path, out: Path) -> Path:
    """The same disk in VirtualBox's own variant: its text, header 0x190
    with an LCHS geometry, block map at 1 MiB and data at 2 MiB."""
    data = image.read_bytes()
    header = header_of(image)
    bmap = data[header.offset_bmap:header.offset_bmap + 4 * header.blocks_in_image]
    blocks = data[header.offset_data:]
    new = header._replace(text=b"<<< Oracle VM VirtualBox Disk Image >>>\n".ljust(64, b"\0"),
                          header_size=0x190, offset_bmap=MiB, offset_data=2 * MiB,
                          lchs_cylinders=16, lchs_heads=16, lchs_sectors=63,
                          lchs_sector_size=512)
    image_bytes = bytearray(2 * MiB + len(blocks))
    image_bytes[:HEADER.size] = new.pack()
    image_bytes[MiB:MiB + len(bmap)] = bmap
    image_bytes[2 * MiB:] = blocks
    out.write_bytes(image_bytes)
    return out


# -- layout (pure) ------------------------------------------------------------------------

def test_header_struct_is_512_bytes_and_round_trips() -> None:
    assert HEADER.size == 512
    head, _ = new_image(5 * MiB, {"static": False, "preallocation": "off"})
    header = Header.unpack(head)
    assert Header.unpack(header.pack()) == header
    assert probe(head, "x") == 100 and probe(b"\0" * 72, "x") == 0
    # the magic, not the text: VirtualBox's text is another one
    assert probe(b"<<< Sun xVM VirtualBox Disk Image >>>\n".ljust(64, b"\0") + head[64:], "x")


@pytest.mark.parametrize("size", [5 * MiB, 5_000_000, 1, 3 * MiB + 512])
@pytest.mark.parametrize("static", [False, True])
def test_new_image_is_what_qemu_img_creates(tmp_path: Path, size: int, static: bool) -> None:
    image = qemu_create(tmp_path / "q.vdi", size, f"static={'on' if static else 'off'}")
    head, length = new_image(size, {"static": static, "preallocation": "off"})
    data = image.read_bytes()
    assert len(data) == length
    assert data[:UUIDS.start] == head[:UUIDS.start]
    assert data[UUIDS.stop:len(head)] == head[UUIDS.stop:]
    assert not any(data[len(head):])


BASE = Header.unpack(new_image(5 * MiB, {"static": False, "preallocation": "off"})[0])


@pytest.mark.parametrize("field, value, error", [
    ("signature", 0xBEDA107E, InvalidImage), ("version", 0x00010000, Unsupported),
    ("version", 0, Unsupported), ("sector_size", 4096, Unsupported),
    ("block_size", 0, InvalidImage), ("block_size", 3 * MiB, InvalidImage),
    ("block_size", 128 * MiB, InvalidImage), ("block_size", 256, InvalidImage),
    ("block_extra", 512, Unsupported), ("offset_bmap", 0x201, InvalidImage),
    ("offset_data", 0x401, InvalidImage), ("offset_bmap", 0, InvalidImage),
    ("offset_bmap", 0x100, InvalidImage), ("offset_bmap", 1 << 30, InvalidImage),
    ("offset_data", 0x200, InvalidImage), ("blocks_in_image", 0x2000_0000, InvalidImage),
    ("blocks_in_image", 0x1FFF_FF80, InvalidImage), ("disk_size", 6 * MiB, InvalidImage),
    ("blocks_allocated", 6, InvalidImage),
])
def test_check_header_refuses(field: str, value: int, error: type) -> None:
    with pytest.raises(error):
        check_header(BASE._replace(**{field: value}), 1024)


# -- reading ------------------------------------------------------------------------------

@pytest.mark.parametrize("static", ["off", "on"])
def test_reads_what_qemu_reads(tmp_path: Path, static: str) -> None:
    size = 12 * MiB + 512
    image = qemu_create(tmp_path / "a.vdi", size, f"static={static}")
    out_of_order(image, size)
    expected = qemu_raw(image)
    assert imgfs_raw(image) == expected
    assert map_json("imgfs", image) == map_json("qemu-img", image)
    assert check_json("imgfs", image) == check_json("qemu-img", image)
    info_agrees(image)
    # the same disk as VirtualBox lays it out
    vbox = as_virtualbox(image, tmp_path / "vbox.vdi")
    assert qemu_raw(vbox, "vbox-qemu.raw") == expected
    assert imgfs_raw(vbox, "vbox.raw") == expected
    assert map_json("imgfs", vbox) == map_json("qemu-img", vbox)


def info_agrees(image: Path) -> None:
    ours = json.loads(run("imgfs", "info", "--output=json", image).stdout)
    theirs = json.loads(run("qemu-img", "info", "--output=json", image).stdout)
    shared = set(theirs) - {"actual-size"}
    assert {key: ours.get(key) for key in shared} == {key: theirs[key] for key in shared}

    def human(tool: str) -> list[str]:
        return [line for line in run(tool, "info", image).stdout.splitlines()
                if not line.startswith("disk size:")]
    assert human("imgfs") == human("qemu-img")


def test_zero_and_odd_sized_images_read_as_qemu(tmp_path: Path) -> None:
    """A zero (discarded) entry, and a disk size that is not whole sectors
    (VBoxManage convertfromraw writes them)."""
    image = qemu_create(tmp_path / "z.vdi", 4 * MiB)
    qemu_io(image, "write -P 0x55 0 4M")
    header = header_of(image)
    patch(image, header.offset_bmap + 4, struct.pack("<I", BLOCK_ZERO))
    patch(image, 0x170, struct.pack("<Q", 4 * MiB - 700))
    assert imgfs_raw(image) == qemu_raw(image)
    assert map_json("imgfs", image) == map_json("qemu-img", image)


def test_other_block_size_reads_as_dissect(tmp_path: Path) -> None:
    """Blocks of 256 KiB: QEMU refuses them, VirtualBox's own reader (and
    dissect.hypervisor's) reads them."""
    vdi = pytest.importorskip("dissect.hypervisor.disk.vdi")
    data = random_bytes(3 * MiB, seed=9)
    raw = tmp_path / "in.raw"
    raw.write_bytes(data)
    image = tmp_path / "small.vdi"
    imgfs("convert", "-O", "vdi", raw, image)
    shrunk = reblock(image, 256 * KiB)
    assert imgfs_raw(shrunk) == data == dissect_read(vdi, [shrunk])


def reblock(image: Path, block_size: int) -> Path:
    """A dynamic image with smaller blocks, its blocks stored in reverse order."""
    header = header_of(image)
    raw = qemu_raw(image, "reblock.raw")
    blocks = len(raw) // block_size
    bmap = [BLOCK_FREE] * blocks
    stored = []
    for block in reversed(range(blocks)):
        chunk = raw[block * block_size:(block + 1) * block_size]
        if any(chunk):
            bmap[block] = len(stored)
            stored.append(chunk)
    offset_data = 0x200 + -(-4 * blocks // 512) * 512
    new = header._replace(block_size=block_size, blocks_in_image=blocks,
                          blocks_allocated=len(stored), offset_data=offset_data)
    out = image.parent / "reblocked.vdi"
    out.write_bytes(new.pack() + struct.pack(f"<{blocks}I", *bmap).ljust(
        offset_data - 0x200, b"\0") + b"".join(stored))
    return out


def dissect_read(vdi: Any, chain: list[Path]) -> bytes:
    """dissect.hypervisor's view of a chain (base first), block by block."""
    parent = None
    handles = []
    try:
        for path in chain:
            handle = open(path, "rb")
            handles.append(handle)
            parent = vdi.VDI(handle, parent).open()
        assert parent is not None
        size = parent.size
        parts = []
        for offset in range(0, size, 64 * KiB):
            parent.seek(offset)
            parts.append(parent.read(min(64 * KiB, size - offset)))
        return b"".join(parts)
    finally:
        for handle in handles:
            handle.close()


# -- writing, creating, converting ----------------------------------------------------------

@pytest.mark.parametrize("static", ["off", "on"])
def test_writes_through_the_api_pass_qemu_check(tmp_path: Path, static: str) -> None:
    """Allocating, in-place, unaligned and block-crossing writes, over data,
    zero entries and free blocks."""
    image = qemu_create(tmp_path / "w.vdi", 9 * MiB, f"static={static}")
    qemu_io(image, "write -P 0x61 8k 12k", "write -P 0x62 5M 1M")
    if static == "off":
        patch(image, header_of(image).offset_bmap + 12, struct.pack("<I", BLOCK_ZERO))
    writes = [(4 * MiB - 100, random_bytes(300, seed=1)), (5000, random_bytes(9000, seed=2)),
              (MiB + 1, random_bytes(2 * MiB, seed=5)), (9 * MiB - 1, b"\xff"),
              (100, bytes(4000)), (7 * MiB, bytes(MiB)), (5 * MiB + 10, b"x" * 10)]
    expected = bytearray(qemu_raw(image, "before.raw"))
    for offset, data in writes:
        expected[offset:offset + len(data)] = data
    write_through_api(image, writes)
    check_clean(image)
    compare_raw(bytes(expected), image)
    assert imgfs_raw(image) == bytes(expected)


def test_allocation_after_a_crash_never_maps_a_block_twice(tmp_path: Path) -> None:
    """A crash after the map entry but before the header's count: the next
    allocation goes after the highest block in the map, and sets the count."""
    image = qemu_create(tmp_path / "c.vdi", 4 * MiB)
    qemu_io(image, "write -P 0x11 0 1M", "write -P 0x22 2M 1M")
    patch(image, 0x184, struct.pack("<I", 1))         # the count of before the 2nd block
    write_through_api(image, [(MiB, b"\x33" * MiB)])
    check_clean(image)
    compare_raw(b"\x11" * MiB + b"\x33" * MiB + b"\x22" * MiB + bytes(MiB), image)


@pytest.mark.parametrize("options, size", [("static=off", "5000000"), ("static=on", "3M"),
                                           ("static=on,preallocation=full", "2M"),
                                           ("static=on,preallocation=falloc", "1")])
def test_create_agrees_with_qemu_img(tmp_path: Path, options: str, size: str) -> None:
    ours, theirs = tmp_path / "ours.vdi", tmp_path / "theirs.vdi"
    imgfs("create", "-q", "-f", "vdi", "-o", options, ours, size)
    run("qemu-img", "create", "-q", "-f", "vdi", "-o", options, theirs, size)
    mine, qemus = ours.read_bytes(), theirs.read_bytes()
    assert len(mine) == len(qemus)
    assert mine[:UUIDS.start] == qemus[:UUIDS.start] and mine[UUIDS.stop:] == qemus[UUIDS.stop:]
    check_clean(ours)
    info_agrees(ours)


def test_create_refuses_what_qemu_refuses(tmp_path: Path) -> None:
    for size in ["513T", "1P"]:
        ours = imgfs("create", "-f", "vdi", tmp_path / "big.vdi", size, check=False)
        theirs = run("qemu-img", "create", "-f", "vdi", tmp_path / "big2.vdi", size,
                     check=False)
        assert ours.returncode == 1 and theirs.returncode == 1
        assert "Unsupported VDI image size" in ours.stderr and ours.stderr.count("\n") == 1


def test_convert_to_vdi_and_back(tmp_path: Path) -> None:
    data = bytearray(6 * MiB + 512)
    data[100:5000] = random_bytes(4900, seed=1)
    data[4 * MiB:5 * MiB] = random_bytes(MiB, seed=2)
    raw = tmp_path / "in.raw"
    raw.write_bytes(data)
    for options in ["static=off", "static=on"]:
        out = tmp_path / f"{options}.vdi"
        imgfs("convert", "-O", "vdi", "-o", options, raw, out)
        check_clean(out)
        compare_raw(bytes(data), out)
        assert imgfs_raw(out) == bytes(data)
    dynamic = header_of(tmp_path / "static=off.vdi")
    assert dynamic.blocks_allocated == 2          # zero blocks stay free


def test_resize_is_refused_as_qemu(tmp_path: Path) -> None:
    image = qemu_create(tmp_path / "r.vdi", 4 * MiB)
    result = imgfs("resize", image, "8M", check=False)
    assert result.returncode == 1 and "cannot be resized" in result.stderr
    assert run("qemu-img", "resize", image, "8M", check=False).returncode == 1


# -- check ---------------------------------------------------------------------------------

@pytest.mark.parametrize("entries, count", [
    ((7, 0, 0), 0), ((0, 1, 2), 3), ((1, 1, 0xFFFF_FFFE), 1), ((4, 3, 0xFFFF_FFFD), 9),
])
def test_check_agrees_with_qemu(tmp_path: Path, entries: tuple[int, ...], count: int) -> None:
    image = qemu_create(tmp_path / "d.vdi", 5 * MiB)
    qemu_io(image, "write -P 1 0 3M")
    header = header_of(image)
    patch(image, header.offset_bmap, struct.pack(f"<{len(entries)}I", *entries))
    patch(image, 0x184, struct.pack("<I", min(count, 5)))
    assert check_json("imgfs", image) == check_json("qemu-img", image)
    ours = run("imgfs", "check", image, check=False)
    theirs = run("qemu-img", "check", image, check=False)
    assert (ours.returncode, ours.stdout, ours.stderr) == \
        (theirs.returncode, theirs.stdout, theirs.stderr)
    repair = run("imgfs", "check", "-r", "all", image, check=False)
    assert repair.returncode == 63 == run("qemu-img", "check", "-r", "all", image,
                                          check=False).returncode


# -- differencing images (VirtualBox snapshots) ---------------------------------------------

def make_chain(directory: Path) -> tuple[list[Path], bytes]:
    """base.vdi <- Snapshots/s1.vdi <- Snapshots/s2.vdi, each written (by
    imgfs) over the one below; returns the chain (base first) and the top's bytes."""
    snapshots = directory / "Snapshots"
    snapshots.mkdir()
    base = qemu_create(directory / "base.vdi", 6 * MiB)
    qemu_io(base, "write -P 0x11 0 3M", f"write -P 0x12 {5 * MiB} 100k")
    expected = bytearray(qemu_raw(base, "base.raw"))
    chain = [base]
    for number, writes in enumerate([
            [(MiB + 5, random_bytes(MiB, seed=1)), (4 * MiB, b"\x21" * 4096)],
            [(2 * MiB - 7, random_bytes(2 * MiB, seed=2)), (5 * MiB + 3, b"\0" * 4000)]]):
        child = snapshots / f"s{number + 1}.vdi"
        parent = Path("..") / base.name if number == 0 else Path(chain[-1].name)
        imgfs("create", "-q", "-f", "vdi", "-b", parent, child)
        write_through_api(child, writes)
        for offset, data in writes:
            expected[offset:offset + len(data)] = data
        chain.append(child)
    return chain, bytes(expected)


def test_differencing_chain_reads_as_dissect(tmp_path: Path) -> None:
    vdi = pytest.importorskip("dissect.hypervisor.disk.vdi")
    chain, expected = make_chain(tmp_path)
    top = chain[-1]
    assert imgfs_raw(top) == expected == dissect_read(vdi, chain)
    for parent, child in zip(chain, chain[1:], strict=False):
        linked, header = header_of(parent), header_of(child)
        assert header.image_type == 4 and header.uuid_link == linked.uuid_image
        assert header.uuid_parent_modify == linked.uuid_last_modify
    info = json.loads(run("imgfs", "info", "--output=json", top).stdout)
    assert info["backing-filename"] == "s1.vdi"
    chain_info = json.loads(run("imgfs", "info", "--backing-chain", "--output=json",
                                top).stdout)
    assert [item["backing-filename"] for item in chain_info[:2]] == ["s1.vdi", "../base.vdi"]
    assert map_json("imgfs", top)[0][2] == 2            # the base holds the first block
    # the base, still a plain VDI, is what QEMU reads too
    check_clean(chain[0])


def test_parent_named_explicitly_or_refused(tmp_path: Path) -> None:
    chain, expected = make_chain(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    moved = elsewhere / "s2.vdi"
    chain[-1].rename(moved)
    result = imgfs("info", moved, check=False)
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "not found" in result.stderr and "backing.file.filename" in result.stderr
    for backing in [{"driver": "vdi", "file": {"filename": str(chain[1])}},
                    {"file": {"filename": str(chain[1])}}]:
        tree = json.dumps({"driver": "vdi", "file": {"filename": str(moved)},
                           "backing": backing})
        imgfs("convert", "-O", "raw", f"json:{tree}", tmp_path / "json.raw")
        assert (tmp_path / "json.raw").read_bytes() == expected
    # the wrong parent: one clear line
    tree = json.dumps({"driver": "vdi", "file": {"filename": str(moved)},
                       "backing": {"file": {"filename": str(chain[0])}}})
    result = imgfs("convert", "-O", "raw", f"json:{tree}", tmp_path / "wrong.raw",
                   check=False)
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "but this image's parent is" in result.stderr


def test_uuid_loops_and_self_links_are_one_line(tmp_path: Path) -> None:
    first = qemu_create(tmp_path / "a.vdi", MiB)
    second = qemu_create(tmp_path / "b.vdi", MiB)
    a, b = header_of(first), header_of(second)
    patch(first, 0, a._replace(image_type=4, uuid_link=b.uuid_image).pack())
    patch(second, 0, b._replace(image_type=4, uuid_link=a.uuid_image).pack())
    for image in (first, second):
        # (plain info describes the top image without its parent, as
        # qemu-img info does a qcow2 whose backing chain loops)
        result = imgfs("info", "--backing-chain", image, check=False, timeout=60)
        assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    patch(first, 0, a._replace(image_type=4, uuid_link=a.uuid_image).pack())
    result = imgfs("info", first, check=False)
    assert "names itself as its parent" in result.stderr


def test_create_differencing_refusals(tmp_path: Path) -> None:
    base = qemu_create(tmp_path / "base.vdi", 2 * MiB)
    result = imgfs("create", "-f", "vdi", "-b", base, tmp_path / "c.vdi", "4M", check=False)
    assert result.returncode == 1 and "its parent's size" in result.stderr
    run("qemu-img", "create", "-q", "-f", "qcow2", tmp_path / "q.qcow2", "2M")
    for fmt in (("-F", "qcow2"), ()):
        result = imgfs("create", "-f", "vdi", "-b", tmp_path / "q.qcow2", *fmt,
                       tmp_path / "c.vdi", check=False)
        assert result.returncode == 1 and result.stderr.count("\n") == 1
    other = tmp_path / "other"
    other.mkdir()
    result = imgfs("create", "-f", "vdi", "-b", "../base.vdi", other / "c.vdi")
    assert "backing.file.filename" in result.stderr          # a warning: not beside it


def test_writes_to_a_child_leave_the_parent_alone(tmp_path: Path) -> None:
    chain, expected = make_chain(tmp_path)
    before = [path.read_bytes() for path in chain[:-1]]

    async def zero_and_write() -> None:
        node = await open_image(str(chain[-1]), OpenContext(read_only=False))
        try:
            await node.write_zeroes(0, MiB)         # a zero entry hides the parent
            await node.write(3 * MiB + 1, b"abc")
        finally:
            await node.aclose()
    trio.run(zero_and_write)
    changed = bytearray(expected)
    changed[:MiB] = bytes(MiB)
    changed[3 * MiB + 1:3 * MiB + 4] = b"abc"
    assert imgfs_raw(chain[-1]) == bytes(changed)
    assert [path.read_bytes() for path in chain[:-1]] == before
    header = header_of(chain[-1])
    assert header.uuid_link != NULL_UUID
    entry = struct.unpack_from("<I", chain[-1].read_bytes(), header.offset_bmap)[0]
    assert entry == BLOCK_ZERO


def test_convert_with_a_parent_writes_only_what_differs(tmp_path: Path) -> None:
    """convert -B PARENT -O vdi: a differencing image holding the one
    block that differs from its parent."""
    base_data = random_bytes(4 * MiB, seed=4)
    (tmp_path / "base.raw").write_bytes(base_data)
    imgfs("convert", "-O", "vdi", tmp_path / "base.raw", tmp_path / "base.vdi")
    new = bytearray(base_data)
    new[2_000_000:2_000_005] = b"hello"
    (tmp_path / "new.raw").write_bytes(new)
    top = tmp_path / "top.vdi"
    imgfs("convert", "-O", "vdi", "-B", "base.vdi", tmp_path / "new.raw", top)
    assert header_of(top).blocks_allocated == 1
    assert imgfs_raw(top) == bytes(new)
    check = run("imgfs", "check", top, check=False)
    assert check.returncode == 0, check.stderr
