"""qcow2 driver against qemu-img / qemu-io: reads, writes, creation, hostile images.

Every image is built here by qemu-img and qemu-io (or by imgfs and then
judged by qemu-img check / compare / map).  `qemu-img convert -O raw` is
the reference for what an image contains.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest
import trio

from imgfs.block import Status
from imgfs.check import render_human, render_json
from imgfs.errors import CorruptImage, ImgfsError, OptionRefused, ReadOnly, Unsupported
from imgfs.graph import create_image, open_image
from imgfs.node import OpenContext
from imgfs.options import parse_size
from tests.conftest import imgfs

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None or
                                shutil.which("qemu-io") is None,
                                reason="qemu-img / qemu-io not installed")

KiB = 1024
MiB = 1024 * KiB


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    """QEMU 7.2 opens a relative data_file name against its working directory,
    imgfs against the image's directory: run both where they agree."""
    monkeypatch.chdir(tmp_path)


def qemu_img(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False,
                          cwd=cwd)


def qemu_io(path: Path, *commands: str, fmt: str = "qcow2") -> None:
    args = ["qemu-io", "-f", fmt]
    for command in commands:
        args += ["-c", command]
    result = subprocess.run([*args, str(path)], capture_output=True, text=True, check=False,
                            cwd=path.parent)
    assert result.returncode == 0 and "error" not in result.stdout.lower(), result


def create(path: Path, size: int | str, *options: str, fmt: str = "qcow2") -> Path:
    args = ["create", "-q", "-f", fmt]
    if options:
        args += ["-o", ",".join(options)]
    result = qemu_img(*args, str(path), str(size), cwd=path.parent)
    assert result.returncode == 0, result.stderr
    return path


def reference(path: Path, *extra: str) -> bytes:
    raw = path.with_suffix(".ref")
    result = qemu_img("convert", *extra, "-O", "raw", str(path), str(raw))
    assert result.returncode == 0, result.stderr
    return raw.read_bytes()


def run(func, *args):
    return trio.run(func, *args)


async def read_all(path: Path, open_options: dict | None = None) -> bytes:
    node = await open_image(str(path), OpenContext(read_only=True), fmt="qcow2",
                            options=open_options)
    try:
        return await node.read(0, node.size)
    finally:
        await node.aclose()


async def map_of(path: Path) -> list[tuple[int, int, bool, bool, int | None]]:
    """imgfs's own-layer map in qemu-img map's terms (start, length, data, zero, offset)."""
    node = await open_image(str(path), OpenContext(read_only=True))
    runs: list[tuple[int, int, bool, bool, int | None]] = []
    try:
        offset = 0
        while offset < node.size:
            length, status, depth = await node.block_status_above(offset, node.size - offset)
            extent = await node.block_status(offset, length) if depth == 0 else None
            host = extent.host_offset if extent is not None else None
            data = bool(status & Status.DATA)
            zero = bool(status & Status.ZERO) or not status & Status.ALLOCATED
            _append_run(runs, (offset, length, data, zero, host if data else None))
            offset += length
    finally:
        await node.aclose()
    return runs


def _append_run(runs: list[tuple[int, int, bool, bool, int | None]],
                item: tuple[int, int, bool, bool, int | None]) -> None:
    """Coalesce as qemu-img map does: same flags, and host-contiguous data
    (or data with no host offset on both sides, such as compressed runs)."""
    last = runs[-1] if runs else None
    if last and last[2:4] == item[2:4]:
        if not item[2] or (last[4] is None and item[4] is None) or \
                (last[4] is not None and item[4] is not None and last[4] + last[1] == item[4]):
            runs[-1] = (last[0], last[1] + item[1], *last[2:])
            return
    runs.append(item)


def qemu_map(path: Path) -> list[tuple[int, int, bool, bool, int | None]]:
    result = qemu_img("map", "--output=json", str(path))
    assert result.returncode == 0, result.stderr
    runs: list[tuple[int, int, bool, bool, int | None]] = []
    for item in json.loads(result.stdout):
        data = item["data"]
        zero = item["zero"] and not data
        host = item.get("offset") if data and item["depth"] == 0 else None
        _append_run(runs, (item["start"], item["length"], data, zero, host))
    return runs


def out_of_order_writes(path: Path, cluster_size: int, size: int) -> None:
    """Unaligned, cluster-crossing, zero and discard writes, out of order."""
    c = cluster_size
    commands = [
        f"write -P 0x11 {3 * c + 100} {2 * c + 7}",
        f"write -P 0x22 {c // 2} {c}",
        f"write -P 0x33 {size - c - 300} {c + 300}",
        f"write -z {3 * c} {c}",
        f"write -P 0x44 {7 * c + 1} 3",
        f"discard {5 * c} {c}",
        f"write -z -u {9 * c} {2 * c}",
        f"write -P 0x55 {10 * c + 17} {c}",
    ]
    qemu_io(path, *[cmd for cmd in commands])


def check_clean(path: Path) -> None:
    result = qemu_img("check", "--output=json", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["check-errors"] == 0 and not report.get("corruptions") \
        and not report.get("leaks"), report


def assert_same(path: Path, expected: bytes, tmp: Path) -> None:
    raw = tmp / "expected.raw"
    raw.write_bytes(expected)
    result = qemu_img("compare", "-q", "-F", "raw", str(path), str(raw))
    assert result.returncode == 0, result.stdout + result.stderr


# -- reads -----------------------------------------------------------------------------

@pytest.mark.parametrize("compat", ["0.10", "1.1"])
@pytest.mark.parametrize("cluster_size", [512, 4 * KiB, 64 * KiB, 2 * MiB])
def test_read_matches_qemu(tmp_path, compat, cluster_size):
    size = max(16 * cluster_size, 1 * MiB) + 1536
    image = create(tmp_path / "img.qcow2", size, f"compat={compat}",
                   f"cluster_size={cluster_size}")
    out_of_order_writes(image, cluster_size, size)
    assert run(read_all, image) == reference(image)
    assert run(map_of, image) == qemu_map(image)


@pytest.mark.parametrize("options", [["cluster_size=4k"], ["compat=0.10"],
                                     ["extended_l2=on", "cluster_size=32k"]])
def test_compressed_read_matches_qemu(tmp_path, options):
    source = create(tmp_path / "src.qcow2", 2 * MiB, "cluster_size=4k")
    qemu_io(source, "write -P 0x61 0 300k", "write 1M 200k", "write -P 0x7 1500k 5k")
    image = tmp_path / "comp.qcow2"
    result = qemu_img("convert", "-c", "-O", "qcow2", "-o", ",".join(options),
                      str(source), str(image))
    assert result.returncode == 0, result.stderr
    assert run(read_all, image) == reference(source)
    assert run(map_of, image) == qemu_map(image)


@pytest.mark.parametrize("compression", ["zlib", "zstd"])
def test_compressed_reads_of_any_size_and_at_once(tmp_path, compression):
    """Reads of parts of clusters (inflated only that far, resumed later),
    of many clusters (inflated in threads), and several at once."""
    if compression == "zstd":
        pytest.importorskip("zstandard")
    rng = random.Random(7)
    source = tmp_path / "src.raw"
    source.write_bytes(b"".join(rng.randbytes(rng.randrange(1, 40000)) + bytes(30000)
                                for _ in range(120))[:4 * MiB])
    image = tmp_path / "comp.qcow2"
    result = qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
                      f"compression_type={compression}", str(source), str(image))
    assert result.returncode == 0, result.stderr
    expected = source.read_bytes()
    requests = [(100 * KiB, 4 * KiB), (0, MiB), (MiB + 512, 700 * KiB), (0, 4 * MiB)]
    requests += [(offset, rng.randrange(1, 600 * KiB)) for offset in
                 (rng.randrange(0, 3 * MiB) for _ in range(30))]

    async def check() -> None:
        node = await open_image(str(image), OpenContext(read_only=True))
        try:
            for offset, length in requests:
                assert await node.read(offset, length) == expected[offset:offset + length]

            async def one(offset: int, length: int) -> None:
                assert await node.read(offset, length) == expected[offset:offset + length]
            async with trio.open_nursery() as nursery:
                for offset, length in requests[::-1]:
                    nursery.start_soon(one, offset, length)
        finally:
            await node.aclose()
    run(check)


def test_zstd_compressed_read(tmp_path):
    source = create(tmp_path / "src.raw", 1 * MiB, fmt="raw")
    source.write_bytes(os.urandom(100 * KiB) + b"z" * (MiB - 100 * KiB))
    image = tmp_path / "zstd.qcow2"
    result = qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
                      "compression_type=zstd", str(source), str(image))
    assert result.returncode == 0, result.stderr
    try:
        import zstandard  # noqa: F401
    except ImportError:
        with pytest.raises(Unsupported, match="zstd"):
            run(read_all, image)
    else:
        assert run(read_all, image) == source.read_bytes()


def test_backing_chain_three_deep_raw_and_qcow2(tmp_path, monkeypatch):
    base = tmp_path / "base.raw"
    base.write_bytes(os.urandom(1 * MiB))                   # shorter than the top
    mid = create(tmp_path / "mid.qcow2", 2 * MiB, "backing_file=base.raw",
                 "backing_fmt=raw", "cluster_size=4k")
    qemu_io(mid, "write -P 0x22 100k 300k", "write -z 500k 64k")
    top = create(tmp_path / "top.qcow2", 3 * MiB, "backing_file=mid.qcow2",
                 "backing_fmt=qcow2", "extended_l2=on", "cluster_size=64k")
    qemu_io(top, "write -P 0x33 150k 10k", "write -z 700k 8k", "discard 128k 64k")
    monkeypatch.chdir("/")              # relative names resolve against the image
    assert run(read_all, top) == reference(top)
    assert run(map_of, top) == qemu_map(top)


@pytest.mark.parametrize("raw_flag", ["off", "on"])
def test_external_data_file_read(tmp_path, raw_flag):
    image = create(tmp_path / "ext.qcow2", 2 * MiB, "data_file=ext.data",
                   f"data_file_raw={raw_flag}")
    qemu_io(image, "write -P 0x5a 4k 200k", "write -z 64k 64k", "write -P 1 1M 1")
    assert run(read_all, image) == reference(image)
    assert run(map_of, image) == qemu_map(image)
    if raw_flag == "on":
        assert (tmp_path / "ext.data").read_bytes() == reference(image)


def test_internal_snapshot_read_and_info(tmp_path):
    image = create(tmp_path / "snap.qcow2", 1 * MiB)
    qemu_io(image, "write -P 0x1 0 100k")
    assert qemu_img("snapshot", "-c", "first", str(image)).returncode == 0
    qemu_io(image, "write -P 0x2 50k 100k")
    assert run(read_all, image) == reference(image)
    assert run(read_all, image, {"snapshot": "first"}) == \
        reference(image, "-l", "snapshot.name=first")

    snapshot_data = reference(image, "-l", "snapshot.name=first")

    async def check_info_and_write():
        node = await open_image(str(image), OpenContext(read_only=False))
        try:
            assert [s["name"] for s in node.driver.info()["snapshots"]] == ["first"]
            await node.write(4000, b"x" * 70000)
            await node.write_zeroes(0, 4096)
            await node.discard(512 * KiB, 64 * KiB)
        finally:
            await node.aclose()
    expected = bytearray(reference(image))
    run(check_info_and_write)
    expected[4000:74000] = b"x" * 70000
    expected[0:4096] = bytes(4096)
    check_clean(image)
    assert reference(image) == bytes(expected)
    assert reference(image, "-l", "snapshot.name=first") == snapshot_data


# -- writes ----------------------------------------------------------------------------

WRITE_CASES = {
    "default": ["cluster_size=64k"],
    "v2": ["compat=0.10", "cluster_size=4k"],
    "small clusters, refcount table growth": ["cluster_size=512", "refcount_bits=64"],
    "refcount_bits=1": ["refcount_bits=1", "cluster_size=4k"],
    "refcount_bits=8": ["refcount_bits=8", "cluster_size=1k"],
    "extended L2": ["extended_l2=on", "cluster_size=32k"],
    "lazy refcounts": ["lazy_refcounts=on", "cluster_size=4k"],
    "data file": ["data_file=w.data", "cluster_size=4k"],
    "data file raw": ["data_file=w.data", "data_file_raw=on", "cluster_size=4k"],
    "2M clusters": ["cluster_size=2M"],
    "snapshot": ["cluster_size=4k"],
    "snapshot extended L2": ["extended_l2=on", "cluster_size=16k"],
}


async def random_writes(path: Path, expected: bytearray, seed: int, tasks: int = 6) -> None:
    """Concurrent tasks, each owning interleaved 1000-byte stripes, so that
    they share clusters but never bytes; every kind of request."""
    node = await open_image(str(path), OpenContext(read_only=False))
    size = node.size
    stripe = 1000

    async def worker(task: int) -> None:
        rnd = random.Random(seed * 100 + task)
        for _ in range(25):
            index = rnd.randrange(size // stripe // tasks) * tasks + task
            offset = index * stripe + rnd.randrange(stripe // 2)
            length = rnd.randrange(1, (index + 1) * stripe - offset + 1)
            if rnd.random() < 0.2:
                await node.write_zeroes(offset, length, may_unmap=rnd.random() < 0.5)
                expected[offset:offset + length] = bytes(length)
            else:
                data = rnd.randbytes(length)
                await node.write(offset, data)
                expected[offset:offset + length] = data
            if rnd.random() < 0.1:
                await node.flush()

    try:
        async with trio.open_nursery() as nursery:
            for task in range(tasks):
                nursery.start_soon(worker, task)
        big = 3 * size // 4
        await node.write(big, bytes(range(256)) * 64)          # a whole-cluster-ish run
        expected[big:big + 16384] = bytes(range(256)) * 64
        await node.discard(0, size // 8)           # contents unspecified: re-read
        expected[:size // 8] = await node.read(0, size // 8)
        assert await node.read(0, size) == bytes(expected)
    finally:
        await node.aclose()


@pytest.mark.parametrize("case", sorted(WRITE_CASES))
def test_writes_pass_qemu_check_and_compare(tmp_path, case):
    size = 4 * MiB if "2M" in case else 1 * MiB + 512
    image = create(tmp_path / "w.qcow2", size, *WRITE_CASES[case])
    out_of_order_writes(image, 4096, size)
    if "snapshot" in case:
        assert qemu_img("snapshot", "-c", "before", str(image)).returncode == 0
        snapshot_data = reference(image, "-l", "snapshot.name=before")
    expected = bytearray(reference(image))
    run(random_writes, image, expected, len(case))
    if "snapshot" in case:
        assert reference(image, "-l", "snapshot.name=before") == snapshot_data
    check_clean(image)
    assert_same(image, bytes(expected), tmp_path)
    info = json.loads(qemu_img("info", "--output=json", str(image)).stdout)
    assert info.get("dirty-flag") is False


@pytest.mark.parametrize("options", [["cluster_size=64k"], ["extended_l2=on"],
                                     ["compat=0.10", "cluster_size=4k"],
                                     ["data_file=top.data", "cluster_size=4k"]])
def test_writes_over_backing_copy_on_write(tmp_path, options):
    base = create(tmp_path / "base.qcow2", 2 * MiB, "cluster_size=4k")
    qemu_io(base, "write -P 0x42 0 2M")
    top = create(tmp_path / "top.qcow2", 2 * MiB, "backing_file=base.qcow2",
                 "backing_fmt=qcow2", *options)
    expected = bytearray(reference(top))
    run(random_writes, top, expected, 7)
    check_clean(top)
    assert_same(top, bytes(expected), tmp_path)
    assert reference(base) == b"\x42" * 2 * MiB


def test_overwriting_compressed_clusters(tmp_path):
    source = create(tmp_path / "src.qcow2", 1 * MiB, "cluster_size=4k")
    qemu_io(source, "write -P 0x61 0 1M")
    image = tmp_path / "comp.qcow2"
    assert qemu_img("convert", "-c", "-O", "qcow2", "-o", "cluster_size=4k",
                    str(source), str(image)).returncode == 0
    expected = bytearray(reference(image))
    run(random_writes, image, expected, 3)
    check_clean(image)
    assert_same(image, bytes(expected), tmp_path)


def test_zero_writes_become_zero_clusters(tmp_path):
    image = create(tmp_path / "z.qcow2", 1 * MiB, "cluster_size=4k")
    qemu_io(image, "write -P 0x1 0 1M")

    async def zero():
        node = await open_image(str(image), OpenContext(read_only=False))
        await node.write_zeroes(8192, 16384, may_unmap=True)
        await node.write_zeroes(65536, 8192)
        await node.aclose()
    run(zero)
    check_clean(image)
    zero_runs = [item for item in json.loads(qemu_img("map", "--output=json",
                                                      str(image)).stdout)
                 if item["zero"] and not item["data"]]
    assert [(item["start"], item["length"]) for item in zero_runs] == \
        [(8192, 16384), (65536, 8192)]


def test_dirty_lazy_refcount_image_is_repaired_on_open(tmp_path):
    image = create(tmp_path / "lazy.qcow2", 1 * MiB, "lazy_refcounts=on", "cluster_size=4k")
    # qemu-io's abort leaves the image dirty, with refcounts not written.
    subprocess.run(["qemu-io", "-c", "write -P 0x9 0 300k", "-c", "abort", str(image)],
                   capture_output=True, check=False)
    info = json.loads(qemu_img("info", "--output=json", "-U", str(image)).stdout)
    assert info["dirty-flag"] is True
    expected = run(read_all, image)

    async def open_rw():
        node = await open_image(str(image), OpenContext(read_only=False))
        await node.aclose()
    run(open_rw)
    check_clean(image)
    assert reference(image) == expected


def test_dirty_bit_is_set_while_writing_with_lazy_refcounts(tmp_path):
    image = create(tmp_path / "lazy.qcow2", 1 * MiB, "lazy_refcounts=on")

    async def write_and_look():
        node = await open_image(str(image), OpenContext(read_only=False))
        await node.write(0, b"x" * 5000)
        await node.flush()
        incompat = struct.unpack(">Q", image.read_bytes()[72:80])[0]
        await node.aclose()
        return incompat
    assert run(write_and_look) & 1
    assert struct.unpack(">Q", image.read_bytes()[72:80])[0] & 1 == 0
    check_clean(image)


def test_corrupt_bit_refuses_writes(tmp_path):
    image = create(tmp_path / "c.qcow2", 1 * MiB)
    with open(image, "r+b") as handle:
        handle.seek(72)
        handle.write(struct.pack(">Q", 2))
    with pytest.raises(CorruptImage):
        run(_write, image, 0, b"x")
    assert run(read_all, image) == bytes(MiB)


def test_inconsistency_found_during_io_sets_the_corrupt_bit(tmp_path):
    image = create(tmp_path / "c.qcow2", 1 * MiB, "cluster_size=4k")
    qemu_io(image, "write -P 1 0 8k")
    raw = image.read_bytes()
    l1_offset = struct.unpack(">Q", raw[40:48])[0]
    _patch(image, l1_offset, struct.pack(">Q", 1 << 63 | 1 << 45))   # L2 past EOF

    async def try_write():
        node = await open_image(str(image), OpenContext(read_only=False))
        try:
            with pytest.raises(CorruptImage):
                await node.write(0, b"x")
            with pytest.raises(CorruptImage, match="marked corrupt"):
                await node.write(0, b"x")
        finally:
            await node.aclose()
    run(try_write)
    assert struct.unpack(">Q", image.read_bytes()[72:80])[0] & 2


async def _resize(image: Path, *sizes: int) -> None:
    node = await open_image(str(image), OpenContext(read_only=False))
    try:
        for size in sizes:
            await node.truncate(size)
    finally:
        await node.aclose()


def test_grow(tmp_path):
    image = create(tmp_path / "g.qcow2", 1 * MiB, "cluster_size=512")
    qemu_io(image, "write -P 3 0 1M")

    async def grow():
        node = await open_image(str(image), OpenContext(read_only=False))
        await node.truncate(64 * MiB)
        await node.write(60 * MiB, b"y" * 1000)
        await node.aclose()
    run(grow)
    check_clean(image)
    data = reference(image)
    assert len(data) == 64 * MiB and data[60 * MiB:60 * MiB + 1000] == b"y" * 1000


@pytest.mark.parametrize("options", [["cluster_size=64k"], ["compat=0.10"],
                                     ["extended_l2=on"]])
def test_shrink_then_grow_reads_zeros(tmp_path, options):
    image = create(tmp_path / "s.qcow2", 4 * MiB, *options)
    qemu_io(image, "write -c -P 5 3M 64k", "write -P 7 0 3M")
    before = reference(image)
    run(_resize, image, MiB + 1536)
    check_clean(image)
    assert reference(image) == before[:MiB + 1536]
    run(_resize, image, 3 * MiB)
    check_clean(image)
    assert reference(image) == before[:MiB + 1536] + bytes(3 * MiB - MiB - 1536)


@pytest.mark.parametrize("mode", ["metadata", "falloc", "full"])
def test_grow_with_preallocation(tmp_path, mode):
    image = create(tmp_path / "p.qcow2", 1 * MiB + 512, "cluster_size=4k")
    qemu_io(image, "write -P 4 0 1M")

    async def grow():
        node = await open_image(str(image), OpenContext(read_only=False))
        try:
            await node.truncate(3 * MiB, mode)
        finally:
            await node.aclose()
    run(grow)
    check_clean(image)
    assert reference(image) == b"\x04" * MiB + bytes(2 * MiB)
    assert all(item["data"] for item in json.loads(
        qemu_img("map", "--output=json", str(image)).stdout) if item["start"] >= MiB + 4096)


def test_grow_over_a_longer_backing_file_reads_zeros(tmp_path):
    base = create(tmp_path / "base.qcow2", 2 * MiB)
    qemu_io(base, "write -P 9 0 2M")
    top = create(tmp_path / "top.qcow2", 1 * MiB, "backing_file=base.qcow2",
                 "backing_fmt=qcow2")
    run(_resize, top, 2 * MiB)
    check_clean(top)
    assert reference(top) == b"\x09" * MiB + bytes(MiB)


# -- creation -----------------------------------------------------------------------------

CREATE_CASES = {
    "default": ({}, {"compat": "1.1", "refcount-bits": 16}),
    "compat=0.10": ({"compat": "0.10"}, {"compat": "0.10"}),
    "cluster_size=512": ({"cluster_size": "512"}, {}),
    "cluster_size=2M": ({"cluster_size": "2M"}, {}),
    "lazy_refcounts": ({"lazy_refcounts": "on"}, {"lazy-refcounts": True}),
    "refcount_bits=1": ({"refcount_bits": "1"}, {"refcount-bits": 1}),
    "refcount_bits=64": ({"refcount_bits": "64"}, {"refcount-bits": 64}),
    "extended_l2": ({"extended_l2": "on"}, {"extended-l2": True}),
    "zstd": ({"compression_type": "zstd"}, {"compression-type": "zstd"}),
    "metadata": ({"preallocation": "metadata"}, {}),
    "metadata 512": ({"preallocation": "metadata", "cluster_size": "512"}, {}),
    "metadata extended_l2": ({"preallocation": "metadata", "extended_l2": "on"}, {}),
    "falloc": ({"preallocation": "falloc"}, {}),
    "full": ({"preallocation": "full", "cluster_size": "4k"}, {}),
    "data_file": ({"data_file": "new.data"}, {"data-file": "new.data"}),
    "data_file_raw": ({"data_file": "new.data", "data_file_raw": "on"},
                      {"data-file-raw": True}),
    "nocow": ({"nocow": "on"}, {}),
}


@pytest.mark.parametrize("case", sorted(CREATE_CASES))
def test_created_images_pass_qemu_check(tmp_path, case):
    options, shown = CREATE_CASES[case]
    image = tmp_path / "new.qcow2"
    size = 8 * MiB + 500
    run(create_image, str(image), "qcow2", size, options, OpenContext())
    check_clean(image)
    info = json.loads(qemu_img("info", "--output=json", str(image)).stdout)
    assert info["virtual-size"] == 8 * MiB + 512         # rounded up to a sector
    if "cluster_size" in options:
        assert info["cluster-size"] == parse_size(options["cluster_size"])
    data = info["format-specific"]["data"]
    for key, value in shown.items():
        assert data[key] == value, (key, data)
    if options.get("preallocation") in ("metadata", "falloc", "full"):
        assert all(item["data"] for item in json.loads(
            qemu_img("map", "--output=json", str(image)).stdout)) or "extended_l2" in options
    # QEMU can write it, imgfs reads QEMU's writes back.
    qemu_io(image, "write -P 0x77 4095 70000")
    assert run(read_all, image) == reference(image)


def test_created_image_with_backing(tmp_path):
    base = create(tmp_path / "base.qcow2", 2 * MiB)
    qemu_io(base, "write -P 0x1 0 2M")
    image = tmp_path / "top.qcow2"
    run(create_image, str(image), "qcow2", None,
        {"backing_file": "base.qcow2", "backing_fmt": "qcow2"}, OpenContext())
    check_clean(image)
    info = json.loads(qemu_img("info", "--output=json", str(image)).stdout)
    assert info["backing-filename"] == "base.qcow2"
    assert info["backing-filename-format"] == "qcow2"
    assert info["virtual-size"] == 2 * MiB
    assert run(read_all, image) == b"\x01" * 2 * MiB


@pytest.mark.parametrize("options, error", [
    ({"compat": "0.10", "lazy_refcounts": "on"}, OptionRefused),
    ({"compat": "0.10", "extended_l2": "on"}, OptionRefused),
    ({"extended_l2": "on", "cluster_size": "4k"}, OptionRefused),
    ({"data_file_raw": "on"}, OptionRefused),
    ({"cluster_size": "1000"}, OptionRefused),
    ({"refcount_bits": "3"}, OptionRefused),
    ({"encrypt.format": "luks"}, OptionRefused),     # no secret given
    ({"encryption": "on"}, Unsupported),
])
def test_create_refusals(tmp_path, options, error):
    with pytest.raises(error) as info:
        run(create_image, str(tmp_path / "bad.qcow2"), "qcow2", MiB, options, OpenContext())
    assert str(info.value)


# -- hostile images --------------------------------------------------------------------------

def _patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(data)


def _first_l2_entry_offset(path: Path) -> int:
    raw = path.read_bytes()
    l1_offset = struct.unpack(">Q", raw[40:48])[0]
    l2_offset = struct.unpack(">Q", raw[l1_offset:l1_offset + 8])[0] & 0x00FFFFFFFFFFFE00
    return l2_offset


def test_refcount_block_over_the_refcount_table_is_refused(tmp_path):
    image = create(tmp_path / "r.qcow2", 1 * MiB, "cluster_size=4k")
    raw = image.read_bytes()
    table = struct.unpack(">Q", raw[48:56])[0]
    _patch(image, table, struct.pack(">Q", table))        # block 0 = the table itself
    with pytest.raises(CorruptImage, match="overlaps"):
        run(_write, image, 0, b"x" * 5000)


HOSTILE_PATCHES = {
    "l1 offset past EOF": (40, struct.pack(">Q", 1 << 50)),
    "l1 offset unaligned": (40, struct.pack(">Q", 0x30008)),
    "huge l1_size": (36, struct.pack(">I", 0xFFFFFFF0)),
    "cluster_bits 30": (20, struct.pack(">I", 30)),
    "cluster_bits 2": (20, struct.pack(">I", 2)),
    "refcount table past EOF": (48, struct.pack(">Q", 1 << 50)),
    "backing name length absurd": (8, struct.pack(">QI", 512, 0xFFFFFFFF)),
    "unknown incompatible bit": (72, struct.pack(">Q", 1 << 33)),
    "snapshot table overflow": (60, struct.pack(">IQ", 60000, 0x10000)),
    "not qcow2": (0, b"QFI\xfc"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_PATCHES))
def test_hostile_headers_fail_cleanly(tmp_path, case):
    image = create(tmp_path / "h.qcow2", 1 * MiB)
    qemu_io(image, "write -P 1 0 100k")
    offset, data = HOSTILE_PATCHES[case]
    _patch(image, offset, data)
    start = time.monotonic()
    with pytest.raises(ImgfsError) as info:
        run(read_all, image)
    assert time.monotonic() - start < 2
    assert str(info.value)


@pytest.mark.parametrize("what", ["l2 past EOF", "l2 unaligned", "compressed outside",
                                  "data past EOF", "l2 on the refcount table",
                                  "l2 on the l1"])
def test_hostile_tables_fail_per_request(tmp_path, what):
    image = create(tmp_path / "h.qcow2", 1 * MiB, "cluster_size=4k")
    qemu_io(image, "write -P 1 0 100k")
    raw = image.read_bytes()
    l1_offset = struct.unpack(">Q", raw[40:48])[0]
    l2_offset = _first_l2_entry_offset(image)
    copied = 1 << 63
    if what == "l2 past EOF":
        _patch(image, l1_offset, struct.pack(">Q", copied | 1 << 45))
    elif what == "l2 unaligned":
        _patch(image, l1_offset, struct.pack(">Q", copied | (l2_offset + 512)))
    elif what == "l2 on the refcount table":
        _patch(image, l1_offset, struct.pack(">Q", copied | struct.unpack(">Q", raw[48:56])[0]))
    elif what == "l2 on the l1":
        _patch(image, l1_offset, struct.pack(">Q", copied | l1_offset))
    elif what == "compressed outside":
        _patch(image, l2_offset, struct.pack(">Q", 1 << 62 | (1 << 40)))
    else:
        _patch(image, l2_offset, struct.pack(">Q", copied | 1 << 45))

    async def read_first():
        node = await open_image(str(image), OpenContext(read_only=True))
        try:
            return await node.read(0, 4096)
        finally:
            await node.aclose()
    if what == "data past EOF":
        assert run(read_first) == bytes(4096)          # QEMU reads zeros there too
    else:
        with pytest.raises(CorruptImage):
            run(read_first)


def test_read_only_open_refuses_writes(tmp_path):
    image = create(tmp_path / "r.qcow2", 1 * MiB)

    async def try_write():
        node = await open_image(str(image), OpenContext(read_only=True))
        try:
            await node.write(0, b"x")
        finally:
            await node.aclose()
    with pytest.raises(ReadOnly):
        run(try_write)


# -- crash safety ----------------------------------------------------------------------------

CRASH_WRITER = r"""
import os, random, sys, trio
from imgfs.graph import open_image
from imgfs.node import OpenContext

async def main(path, seed):
    rnd = random.Random(seed)
    node = await open_image(path, OpenContext(read_only=False))
    size = node.size
    round_ = 0
    while True:
        round_ += 1
        segment = size // 16
        for _ in range(rnd.randrange(1, 20)):
            # anywhere but the promised stripes at the start of each segment
            offset = rnd.randrange(16) * segment + 8192 + rnd.randrange(segment // 2)
            length = rnd.randrange(1, segment // 2 - 8192)
            if rnd.random() < 0.15:
                await node.write_zeroes(offset, length, may_unmap=True)
            elif rnd.random() < 0.05:
                await node.discard(offset, length)
            else:
                await node.write(offset, bytes([round_ % 251 + 1]) * length)
        # after a flush, this stripe's contents are promised
        stripe = (round_ % 16) * (size // 16)
        await node.write(stripe, round_.to_bytes(8, "big") * 512)
        await node.flush()
        print(round_, flush=True)

trio.run(main, sys.argv[1], int(sys.argv[2]))
"""


@pytest.mark.parametrize("options", [["cluster_size=4k"], ["cluster_size=512",
                                                              "refcount_bits=8"],
                                     ["extended_l2=on", "cluster_size=16k"]])
def test_sigkill_during_writes_leaves_no_corruption(tmp_path, options):
    import signal
    import sys
    image = create(tmp_path / "crash.qcow2", 4 * MiB, *options)
    script = tmp_path / "writer.py"
    script.write_text(CRASH_WRITER)
    writer = subprocess.Popen([sys.executable, str(script), str(image), "5"],
                              stdout=subprocess.PIPE, text=True)
    assert writer.stdout is not None
    synced = []
    deadline = time.monotonic() + 20
    while len(synced) < 40 and time.monotonic() < deadline:
        line = writer.stdout.readline()
        if not line:
            break
        synced.append(int(line))
    time.sleep(0.01 * (len(options) + 1))     # land somewhere inside a write stream
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert len(synced) >= 20
    result = qemu_img("check", "--output=json", str(image))
    report = json.loads(result.stdout)
    assert report["check-errors"] == 0 and not report.get("corruptions"), result.stdout
    data = reference(image)
    # Each stripe holds at least the last round that wrote it before a flush returned.
    last = synced[-1]
    for round_ in range(max(1, last - 15), last + 1):
        stripe = (round_ % 16) * (4 * MiB // 16)
        found = int.from_bytes(data[stripe:stripe + 8], "big")
        assert found >= round_, (round_, found)


# -- compressed writes ----------------------------------------------------------------------

@pytest.mark.parametrize("options", [{}, {"cluster_size": "512"}, {"refcount_bits": "1"},
                                     {"extended_l2": "on"}, {"compat": "0.10",
                                                             "cluster_size": "4k"}])
def test_write_compressed_passes_qemu_check(tmp_path, options):
    size = 3 * MiB + 1024
    source = bytearray(size)
    source[0:300 * KiB] = b"compressible text " * (300 * KiB // 18) + b"x" * (300 * KiB % 18)
    source[MiB:MiB + 100 * KiB] = os.urandom(100 * KiB)
    source[size - 5000:] = b"tail" * 1250
    image = tmp_path / "c.qcow2"

    async def write():
        await create_image(str(image), "qcow2", size, options, OpenContext())
        node = await open_image(str(image), OpenContext(read_only=False))
        try:
            for offset in range(0, size, 192 * KiB + 7):      # unaligned chunks
                chunk = bytes(source[offset:offset + 192 * KiB + 7])
                await node.driver.write_compressed(offset, chunk)
            await node.write(20 * KiB, b"overwrite")          # a compressed cluster
            source[20 * KiB:20 * KiB + 9] = b"overwrite"
        finally:
            await node.aclose()
    run(write)
    result = qemu_img("check", "--output=json", str(image))
    report = json.loads(result.stdout)
    assert result.returncode == 0 and report["check-errors"] == 0, result.stdout
    assert report.get("compressed-clusters", 0) > 0
    assert_same(image, bytes(source), tmp_path)
    assert run(read_all, image) == bytes(source)


# -- check ------------------------------------------------------------------------------------

def _damaged_image(tmp_path: Path, damage: str) -> Path:
    image = create(tmp_path / "k.qcow2", 1 * MiB, "cluster_size=4k")
    qemu_io(image, "write -P 3 0 100k", "write -c 200k 8k", "write -z 300k 8k")
    raw = image.read_bytes()
    table = struct.unpack(">Q", raw[48:56])[0]
    block = struct.unpack(">Q", raw[table:table + 8])[0]
    clusters = -(-len(raw) // 4096)
    if damage in ("leaks", "both"):
        with open(image, "r+b") as handle:
            handle.truncate((clusters + 2) * 4096)
        for cluster in (clusters, clusters + 1):
            _patch(image, block + 2 * cluster, struct.pack(">H", 1))
    if damage in ("corruption", "both"):
        _patch(image, block + 2 * 10, struct.pack(">H", 0))
    return image


async def _imgfs_check(image: Path, repair: str | None, output: str) -> int:
    """The driver's check, printed as the command prints it."""
    node = await open_image(str(image), OpenContext(read_only=repair is None))
    try:
        result = await node.check(repair)
    finally:
        await node.aclose()
    print(render_json(result, str(image), "qcow2") if output == "json" else
          render_human(result))
    return result.exit_code


@pytest.mark.parametrize("damage", ["none", "leaks", "corruption", "both"])
def test_check_agrees_with_qemu_img(tmp_path, damage, capsys):
    image = _damaged_image(tmp_path, damage)
    expected = qemu_img("check", "--output=json", str(image))
    code = run(_imgfs_check, image, None, "json")
    report = json.loads(capsys.readouterr().out)
    assert code == expected.returncode
    assert report == json.loads(expected.stdout) | {"filename": str(image)}


@pytest.mark.parametrize("damage, repair", [("leaks", "leaks"), ("both", "all"),
                                            ("corruption", "all")])
def test_check_repairs(tmp_path, damage, repair, capsys):
    image = _damaged_image(tmp_path, damage)
    before = reference(image)
    run(_imgfs_check, image, repair, "human")
    assert "repaired" in capsys.readouterr().out
    check_clean(image)
    assert reference(image) == before


@pytest.mark.parametrize("options", [["compat=0.10"], ["extended_l2=on"],
                                     ["data_file=d.data"], ["cluster_size=512"],
                                     ["snapshot"]])
def test_check_json_matches_qemu_on_varied_images(tmp_path, options, capsys):
    image = create(tmp_path / "v.qcow2", 2 * MiB, *[o for o in options if o != "snapshot"])
    qemu_io(image, "write -P 1 0 300k", "write -z 400k 64k", "write -P 2 1M 10k")
    if "snapshot" in options:
        assert qemu_img("snapshot", "-c", "s", str(image)).returncode == 0
        qemu_io(image, "write -P 5 100k 100k")
    expected = qemu_img("check", "--output=json", str(image))
    assert run(_imgfs_check, image, None, "json") == expected.returncode
    assert json.loads(capsys.readouterr().out) == \
        json.loads(expected.stdout) | {"filename": str(image)}


# -- internal snapshots ---------------------------------------------------------------------

def _snapshot(image: Path, action: str, tag: str | None = None) -> str:
    """`imgfs snapshot -c|-a|-d TAG` or `-l`: its standard output."""
    return imgfs("snapshot", action, *([tag] if tag else []), image).stdout


async def _write(image: Path, offset: int, data: bytes) -> None:
    node = await open_image(str(image), OpenContext(read_only=False))
    try:
        await node.write(offset, data)
    finally:
        await node.aclose()


@pytest.mark.parametrize("options", [["cluster_size=4k"], ["compat=0.10"],
                                     ["extended_l2=on"], ["cluster_size=512"]])
def test_snapshot_create_apply_delete(tmp_path, options, capsys):
    image = create(tmp_path / "s.qcow2", 2 * MiB, *options)
    qemu_io(image, "write -P 1 0 300k", "write -c 1M 64k", "write -z 1500k 64k")
    first = reference(image)
    _snapshot(image, "-c", "one")
    check_clean(image)
    run(_write, image, 100 * KiB, b"\x02" * 200 * KiB)
    second = reference(image)
    _snapshot(image, "-c", "two")
    run(_write, image, 0, b"\x03" * 50 * KiB)
    check_clean(image)
    listed = qemu_img("snapshot", "-l", str(image)).stdout
    assert "one" in listed and "two" in listed
    assert _snapshot(image, "-l") == listed
    assert reference(image, "-l", "snapshot.name=one") == first
    assert reference(image, "-l", "snapshot.name=two") == second
    _snapshot(image, "-a", "one")
    check_clean(image)
    assert reference(image) == first
    _snapshot(image, "-d", "one")
    check_clean(image)
    assert "one" not in qemu_img("snapshot", "-l", str(image)).stdout
    assert reference(image, "-l", "snapshot.name=two") == second
    _snapshot(image, "-d", "two")
    check_clean(image)
    assert reference(image) == first


# -- mutated images --------------------------------------------------------------------------

@pytest.mark.parametrize("options, seed", [(["cluster_size=4k"], 1), (["cluster_size=512"], 2),
                                           (["extended_l2=on", "cluster_size=16k"], 3),
                                           (["compat=0.10", "snapshot"], 4)])
def test_mutated_metadata_gives_only_clean_errors(tmp_path, options, seed):
    """Random byte changes in the metadata clusters: every failure must be an
    ImgfsError, quickly, whatever is read, written or discarded."""
    image = create(tmp_path / "m.qcow2", 1 * MiB, *[o for o in options if o != "snapshot"])
    qemu_io(image, "write -P 1 0 100k", "write -c 256k 64k", "write -z 400k 16k")
    if "snapshot" in options:
        assert qemu_img("snapshot", "-c", "s", str(image)).returncode == 0
        qemu_io(image, "write -P 3 0 8k")
    pristine = image.read_bytes()
    rnd = random.Random(seed)
    mutated = tmp_path / "mutated.qcow2"

    async def exercise(read_only: bool) -> None:
        try:
            node = await open_image(str(mutated), OpenContext(read_only=read_only), fmt="qcow2")
        except ImgfsError:
            return
        try:
            length = min(node.size, 2 * MiB)
            for action in ("read", "write", "discard"):
                if read_only and action != "read":
                    break
                try:
                    if action == "read":
                        await node.read(0, length)
                    elif action == "write":
                        await node.write(0, b"w" * min(length, 70000))
                    else:
                        await node.discard(0, length)
                except ImgfsError:
                    pass
        finally:
            try:
                await node.aclose()
            except ImgfsError:
                pass

    for _ in range(40):
        data = bytearray(pristine)
        for _ in range(rnd.randrange(1, 5)):
            position = rnd.randrange(min(len(data), 12 * 4096))
            data[position] = rnd.randrange(256)
        mutated.write_bytes(bytes(data))
        start = time.monotonic()
        run(exercise, True)
        run(exercise, False)
        assert time.monotonic() - start < 5


def test_data_file_given_in_the_option_tree(tmp_path):
    image = create(tmp_path / "e.qcow2", 1 * MiB, "data_file=first.data")
    qemu_io(image, "write -P 0x5a 4k 200k")
    expected = reference(image)
    (tmp_path / "first.data").rename(tmp_path / "moved.data")
    got = run(read_all, image, {"data-file": str(tmp_path / "moved.data")})
    assert got == expected


def test_persistent_bitmaps_are_stored_back_not_leaked(tmp_path, capsys):
    image = create(tmp_path / "b.qcow2", 1 * MiB)
    assert qemu_img("bitmap", "--add", str(image), "b0").returncode == 0
    qemu_io(image, "write 0 64k")
    expected = qemu_img("check", "--output=json", str(image))
    assert run(_imgfs_check, image, None, "json") == 0
    assert json.loads(capsys.readouterr().out) == \
        json.loads(expected.stdout) | {"filename": str(image)}
    run(_write, image, 100 * KiB, b"x" * 5000)
    check_clean(image)
    info = json.loads(qemu_img("info", "--output=json", str(image)).stdout)
    flags = info["format-specific"]["data"]["bitmaps"][0]["flags"]
    assert flags == ["auto"]        # maintained and stored at close, as QEMU does


@pytest.mark.parametrize("options", [["cluster_size=512", "refcount_bits=2"],
                                     ["extended_l2=on", "cluster_size=16k"]])
def test_concurrent_writes_with_io_that_yields(tmp_path, monkeypatch, options):
    """Local file I/O never yields to other tasks; network children do.  Make
    every file request yield a random number of times so that concurrent
    requests interleave inside the driver, then judge with qemu-img."""
    from imgfs.drivers import file as file_driver
    rnd = random.Random(9)

    def yielding(method):
        async def wrapper(self, *args):
            for _ in range(rnd.randrange(3)):
                await trio.sleep(0)
            return await method(self, *args)
        return wrapper
    for name in ("read", "write", "flush", "truncate"):
        monkeypatch.setattr(file_driver.FileDriver, name,
                            yielding(getattr(file_driver.FileDriver, name)))
    image = create(tmp_path / "y.qcow2", 2 * MiB, *options)
    qemu_io(image, "write -P 1 0 1M", "write -c 1536k 64k")
    expected = bytearray(reference(image))
    run(random_writes, image, expected, 11)
    check_clean(image)
    assert_same(image, bytes(expected), tmp_path)
