"""Persistent dirty bitmaps, judged by QEMU.

The same writes go through imgfs (a real mount, or the driver for zero
writes and discards, which FUSE has no call for) and through qemu-io on a
copy; then both images' bitmaps are read back through QEMU itself
(`qemu-nbd -B NAME` exports each bitmap as the ``qemu:dirty-bitmap:NAME``
context, which ``qemu-img map`` with ``x-dirty-bitmap`` reports as
``"data": false`` ranges) and must be equal; `qemu-img info` must show the
bitmaps consistent again (flags ``auto`` only) and `qemu-img check` clean.

Writes through the mount are page aligned: the kernel's page cache writes
whole pages, so a sub-page write sets the bits of its whole page (a
superset of QEMU's, which is safe for incremental backup).
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest

from imgfs.graph import open_image
from imgfs.node import OpenContext
from tests.conftest import daemon_pids, imgfs, mounted, need, need_root_or_fuse, pwrite_all, run
from tests.drivers.test_qcow2 import run as trio_run

KiB, MiB = 1024, 1024 * 1024


@pytest.fixture(autouse=True)
def _oracles() -> None:
    need("qemu-img", "qemu-io", "qemu-nbd")


def qemu_img(*args: str | Path) -> str:
    return run("qemu-img", *args).stdout


def make_image(path: Path, size: str, *bitmaps: tuple[str, ...],
               options: str = "") -> Path:
    """An image with bitmaps added by qemu-img (each: name, then extra
    `qemu-img bitmap --add` arguments)."""
    run("qemu-img", "create", "-q", "-f", "qcow2", *(["-o", options] if options else []),
        path, size)
    for name, *extra in bitmaps:
        qemu_img("bitmap", "--add", *extra, path, name)
    return path


def qemu_io(image: Path, *commands: str) -> None:
    args = [arg for command in commands for arg in ("-c", command)]
    output = run("qemu-io", "-f", "qcow2", *args, image).stdout
    assert "error" not in output.lower(), output


def dirty_ranges(image: Path, *names: str) -> dict[str, list[tuple[int, int]]]:
    """Each bitmap's dirty (start, length) ranges, as QEMU reads them."""
    sock = image.with_name(image.name + ".sock")
    args = [arg for name in names for arg in ("-B", name)]
    server = subprocess.Popen(["qemu-nbd", "-t", "-r", "-f", "qcow2", *args, "-k", str(sock),
                               str(image)], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert server.poll() is None, server.stderr.read() if server.stderr else ""
            assert time.monotonic() < deadline, "qemu-nbd did not start"
            time.sleep(0.02)
        result = {}
        for name in names:
            opts = f"driver=nbd,server.type=unix,server.path={sock},export=," \
                f"x-dirty-bitmap=qemu:dirty-bitmap:{name}"
            extents = json.loads(qemu_img("map", "--output=json", "--image-opts", opts))
            result[name] = [(ext["start"], ext["length"]) for ext in extents
                            if not ext["data"]]
        return result
    finally:
        server.terminate()
        server.wait(timeout=10)


def bitmap_info(image: Path) -> list[dict]:
    info = json.loads(qemu_img("info", "-U", "--output=json", image))
    return info["format-specific"]["data"].get("bitmaps", [])


def check_clean(image: Path) -> None:
    result = run("qemu-img", "check", image, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def mount_writes(image: Path, mountpoint: Path, writes: list[tuple[int, int]],
                 seed: int) -> None:
    payload = [(offset, bytes([seed + number % 200 + 1]) * length)
               for number, (offset, length) in enumerate(writes)]
    with mounted(image, mountpoint=mountpoint) as directory:
        pwrite_all(directory / (image.stem + ".raw"), payload)


def qemu_writes(image: Path, writes: list[tuple[int, int]], seed: int) -> None:
    qemu_io(image, *(f"write -P {seed + number % 200 + 1} {offset} {length}"
                     for number, (offset, length) in enumerate(writes)))


#: page-aligned writes: cluster crossing, bitmap-cluster crossing (with
#: 512-byte image clusters one bitmap cluster covers 4096 granules), and
#: the disk's last page
SESSION_ONE = [(1 * MiB, 4 * KiB), (3 * MiB - 8 * KiB, 24 * KiB), (16 * MiB - 4 * KiB, 12 * KiB),
               (5 * MiB, 3 * MiB), (40 * MiB - 4 * KiB, 4 * KiB)]
SESSION_TWO = [(2 * MiB, 4 * KiB), (33 * MiB, 128 * KiB)]


@pytest.mark.parametrize("options", ["", "cluster_size=512"])
def test_mount_writes_set_the_bits_qemu_sets(tmp_path: Path, options: str) -> None:
    need_root_or_fuse()
    bitmaps = [("en",), ("off", "--disable"), ("g4k", "-g", "4096"), ("g512", "-g", "512"),
               ("g1m", "-g", "1M")]
    ours = make_image(tmp_path / "ours.qcow2", "40M", *bitmaps, options=options)
    theirs = shutil.copyfile(ours, tmp_path / "theirs.qcow2")
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    for seed, session in enumerate([SESSION_ONE, SESSION_TWO]):
        mount_writes(ours, mountpoint, session, seed)
        qemu_writes(theirs, session, seed)
    names = [name for name, *_ in bitmaps]
    expected = dirty_ranges(theirs, *names)
    assert expected["en"] and not expected["off"]
    assert dirty_ranges(ours, *names) == expected
    assert bitmap_info(ours) == bitmap_info(theirs)
    assert [entry["flags"] for entry in bitmap_info(ours)] == \
        [["auto"], [], ["auto"], ["auto"], ["auto"]]
    check_clean(ours)
    assert run("qemu-img", "compare", ours, theirs, check=False).returncode == 0


async def _zero_and_discard(image: Path, operations: list[tuple[str, int, int]]) -> None:
    node = await open_image(str(image), OpenContext(read_only=False))
    try:
        for kind, offset, length in operations:
            if kind == "zero":
                await node.write_zeroes(offset, length)
            elif kind == "discard":
                await node.discard(offset, length)
            else:
                await node.write(offset, b"\x5a" * length)
    finally:
        await node.aclose()


@pytest.mark.parametrize("options", ["", "extended_l2=on", "cluster_size=512"])
def test_zero_writes_and_discards_set_the_bits_qemu_sets(tmp_path: Path, options: str) -> None:
    """Unaligned ranges included: the bits cover whatever range changed."""
    operations = [("write", 0, 3 * MiB), ("zero", 100 * KiB, 5000), ("zero", 1 * MiB, 1 * MiB),
                  ("discard", 2 * MiB + 512, 300 * KiB), ("write", 7 * MiB + 1, 10),
                  ("discard", 9 * MiB, 64 * KiB)]
    bitmaps = [("en",), ("g512", "-g", "512"), ("off", "--disable")]
    ours = make_image(tmp_path / "ours.qcow2", "10M", *bitmaps, options=options)
    qemu_io(ours, "write -P 7 0 10M")            # discards need something to drop
    # the write above set bits: start both images from empty bitmaps again
    for name, *_ in bitmaps:
        qemu_img("bitmap", "--clear", ours, name)
    theirs = shutil.copyfile(ours, tmp_path / "theirs.qcow2")
    trio_run(_zero_and_discard, ours, operations)
    qemu_io(theirs, *(f"{'write -z' if kind == 'zero' else kind} {offset} {length}"
                      for kind, offset, length in operations))
    names = [name for name, *_ in bitmaps]
    assert dirty_ranges(ours, *names) == dirty_ranges(theirs, *names)
    assert [entry["flags"] for entry in bitmap_info(ours)] == [["auto"], ["auto"], []]
    check_clean(ours)


def _directory_entry(image: Path, name: str) -> int:
    """File offset of bitmap `name`'s directory entry."""
    raw = image.read_bytes()
    position = struct.unpack(">I", raw[100:104])[0]
    while True:
        kind, length = struct.unpack(">II", raw[position:position + 8])
        assert kind, "no bitmaps extension"
        if kind == 0x23852875:
            _, _, size, offset = struct.unpack(">IIQQ", raw[position + 8:position + 32])
            break
        position += 8 + length + -length % 8
    entry = offset
    while entry < offset + size:
        name_size, extra = struct.unpack(">HI", raw[entry + 18:entry + 24])
        if raw[entry + 24 + extra:entry + 24 + extra + name_size].decode() == name:
            return entry
        entry += 24 + extra + name_size
        entry += -entry % 8
    raise AssertionError(f"no bitmap {name}")


def _patch(image: Path, offset: int, data: bytes) -> None:
    with open(image, "r+b") as handle:
        handle.seek(offset)
        handle.write(data)


def _set_in_use(image: Path, name: str) -> None:
    """Flag bitmap `name` in_use, as a crashed QEMU leaves it."""
    entry = _directory_entry(image, name)
    flags, = struct.unpack(">I", image.read_bytes()[entry + 12:entry + 16])
    _patch(image, entry + 12, struct.pack(">I", flags | 1))


@pytest.mark.parametrize("damage", ["granularity_bits 40", "table_size 7", "type 2",
                                    "table entry with reserved bits"])
def test_bitmap_imgfs_cannot_maintain_is_marked_in_use(tmp_path: Path, damage: str) -> None:
    """A bitmap imgfs cannot use costs neither the write nor the image: it
    gets in_use (the spec's "may be inconsistent") and stays so; the good
    one beside it is maintained."""
    image = make_image(tmp_path / "h.qcow2", "8M", ("bad",), ("good",))
    qemu_io(image, "write 0 64k")
    entry = _directory_entry(image, "bad")
    if damage == "granularity_bits 40":
        _patch(image, entry + 17, bytes([40]))
    elif damage == "table_size 7":
        _patch(image, entry + 8, struct.pack(">I", 7))
    elif damage == "type 2":
        _patch(image, entry + 16, bytes([2]))
    else:
        table, = struct.unpack(">Q", image.read_bytes()[entry:entry + 8])
        data, = struct.unpack(">Q", image.read_bytes()[table:table + 8])
        _patch(image, table, struct.pack(">Q", data | 0x2))
    before = _damage_counts(image)
    trio_run(_zero_and_discard, image, [("write", 4 * MiB, 4096)])
    entry = _directory_entry(image, "bad")          # the directory has moved
    assert struct.unpack(">I", image.read_bytes()[entry + 12:entry + 16])[0] & 1
    assert _damage_counts(image) == before          # nothing new is wrong
    if damage == "table entry with reserved bits":
        # QEMU opens this one: the good bitmap got the write
        info = {item["name"]: item["flags"] for item in bitmap_info(image)}
        assert info == {"bad": ["in-use", "auto"], "good": ["auto"]}
        assert dirty_ranges(image, "good")["good"] == [(0, 64 * KiB), (4 * MiB, 64 * KiB)]


def _damage_counts(image: Path) -> tuple[int, int, int]:
    report = json.loads(imgfs("check", "--output=json", image, check=False).stdout)
    return report.get("corruptions", 0), report.get("leaks", 0), report["check-errors"]


def test_damaged_bitmap_directory_refuses_writes_not_reads(tmp_path: Path) -> None:
    image = make_image(tmp_path / "d.qcow2", "4M", ("b",))
    qemu_io(image, "write -P 9 0 64k")
    entry = _directory_entry(image, "b")
    _patch(image, entry + 18, struct.pack(">H", 60000))     # name runs past the directory
    result = imgfs("convert", "-O", "raw", image, tmp_path / "out.raw", check=False)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out.raw").read_bytes()[:65536] == b"\x09" * 65536
    with pytest.raises(Exception, match="bitmap directory"):
        trio_run(_zero_and_discard, image, [("write", 0, 512)])


def test_inconsistent_bitmap_stays_as_it_is(tmp_path: Path) -> None:
    image = make_image(tmp_path / "i.qcow2", "8M", ("stale",), ("live",))
    qemu_io(image, "write 0 64k")
    _set_in_use(image, "stale")
    trio_run(_zero_and_discard, image, [("write", 4 * MiB, 4096)])
    info = {entry["name"]: entry["flags"] for entry in bitmap_info(image)}
    assert info == {"stale": ["in-use", "auto"], "live": ["auto"]}
    check_clean(image)
    assert dirty_ranges(image, "live")["live"] == [(0, 64 * KiB), (4 * MiB, 64 * KiB)]


def test_reads_and_read_only_opens_leave_bitmaps_alone(tmp_path: Path) -> None:
    need_root_or_fuse()
    image = make_image(tmp_path / "r.qcow2", "4M", ("en",))
    before = image.read_bytes()
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    with mounted(image, mountpoint=mountpoint) as directory:
        (directory / "r.raw").read_bytes()
    assert image.read_bytes() == before


@pytest.mark.parametrize("size", ["+30M", "-5M", "1000448"])
def test_resize_resizes_the_bitmaps_as_qemu(tmp_path: Path, size: str) -> None:
    bitmaps = [("en",), ("g512", "-g", "512"), ("off", "--disable")]
    ours = make_image(tmp_path / "ours.qcow2", "10M", *bitmaps, options="cluster_size=4k")
    qemu_io(ours, "write 0 4k", "write 3M 2M", "write 9M 1M")
    theirs = shutil.copyfile(ours, tmp_path / "theirs.qcow2")
    imgfs("resize", *(["--shrink"] if size.startswith("-") or size == "1000448" else []),
          ours, size)
    qemu_img("resize", "--shrink", theirs, size)
    names = [name for name, *_ in bitmaps]
    assert dirty_ranges(ours, *names) == dirty_ranges(theirs, *names)
    assert bitmap_info(ours) == bitmap_info(theirs)
    check_clean(ours)
    # QEMU itself opens it read-write and writes again
    qemu_io(ours, "write 512 512")
    check_clean(ours)


def test_info_lists_the_bitmaps_as_qemu_img(tmp_path: Path) -> None:
    image = make_image(tmp_path / "n.qcow2", "4M", ("en",), ("off", "--disable"),
                       ("fine", "-g", "512"))
    _set_in_use(image, "fine")
    ours = json.loads(imgfs("info", "--output=json", image).stdout)
    theirs = json.loads(qemu_img("info", "--output=json", image))
    assert ours["format-specific"]["data"]["bitmaps"] == \
        theirs["format-specific"]["data"]["bitmaps"]


def test_info_human_output_lists_the_bitmaps_as_qemu_img(tmp_path: Path) -> None:
    image = make_image(tmp_path / "h.qcow2", "4M", ("en",), ("off", "--disable"),
                       ("fine", "-g", "512"))
    _set_in_use(image, "fine")

    def bitmap_lines(report: str) -> list[str]:
        lines = report.splitlines()
        start = lines.index("    bitmaps:")
        end = next(number for number in range(start + 1, len(lines))
                   if not lines[number].startswith("        "))
        return lines[start:end]
    assert bitmap_lines(imgfs("info", image).stdout) == bitmap_lines(qemu_img("info", image))


def test_snapshot_apply_is_refused_as_qemu_does(tmp_path: Path) -> None:
    image = make_image(tmp_path / "s.qcow2", "4M", ("off", "--disable"))
    qemu_img("snapshot", "-c", "one", image)
    before = image.read_bytes()
    result = imgfs("snapshot", "-a", "one", image, check=False)
    assert result.returncode == 1
    assert "Device has active dirty bitmaps" in result.stderr
    assert image.read_bytes() == before


def test_killed_writer_leaves_bitmaps_in_use_and_no_corruption(tmp_path: Path) -> None:
    need_root_or_fuse()
    image = make_image(tmp_path / "k.qcow2", "16M", ("en",))
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    with mounted(image, mountpoint=mountpoint) as directory:
        pwrite_all(directory / "k.raw", [(0, b"a" * MiB)])
        for pid in daemon_pids(mountpoint):
            os.kill(pid, 9)
    result = run("qemu-img", "check", image, check=False)
    assert result.returncode in (0, 3), result.stdout
    assert [entry["flags"] for entry in bitmap_info(image)] == [["in-use", "auto"]]
