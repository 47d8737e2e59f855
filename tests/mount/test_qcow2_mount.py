"""qcow2 images through a real FUSE mount, with qemu-img / qemu-io as the oracle.

Images are built and written by qemu-img and qemu-io (out of order,
unaligned, zero writes, discards, compression, every cluster size, both
versions, chains, external data files, snapshots) and must read through
`imgfs mount` exactly as `qemu-img convert -O raw` reads them; what is
written through the mount must pass `qemu-img check` and `qemu-img compare`
once unmounted.  Damaged images fail at mount time with one line, or with
EIO for the one request that meets the damage.
"""
from __future__ import annotations

import errno
import json
import os
import struct
import subprocess
import threading
from pathlib import Path

import pytest

from tests.conftest import (
    exposed,
    imgfs,
    is_mounted,
    kill_daemon_mid_writes,
    mounted,
    need,
    need_root,
    pwrite_all,
    qemu_raw,
    random_bytes,
    run,
    sha256,
)
from tests.drivers.test_qcow2_cli import check_clean, patch_bytes, qemu_create, qemu_io

KiB = 1024
MiB = 1024 * KiB


@pytest.fixture(autouse=True)
def _oracles(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both tools run in the images' directory, where relative backing and
    data file names mean the same thing to them."""
    need("qemu-img", "qemu-io")
    monkeypatch.chdir(workdir)


# -- helpers ------------------------------------------------------------------------------

def out_of_order_writes(image: Path, cluster: int, size: int) -> None:
    """Unaligned, cluster-crossing, zero, discarded and compressed ranges,
    written in no particular order."""
    qemu_io(image, f"write -P 0x11 {3 * cluster + 100} {2 * cluster + 7}",
            f"write -P 0x22 {cluster // 2} {cluster}",
            f"write -P 0x33 {size - cluster - 300} {cluster + 300}",
            f"write -z {3 * cluster} {cluster}",
            f"write -P 0x44 {7 * cluster + 1} 3",
            f"discard {5 * cluster} {cluster}",
            f"write -z -u {9 * cluster} {2 * cluster}",
            f"write -c -P 0x66 {12 * cluster} {2 * cluster}",
            f"write -P 0x55 {10 * cluster + 17} {cluster}")



def assert_reads_like_qemu(image: Path, mnt: Path, workdir: Path, *,
                           options: str | None = None) -> bytes:
    """The whole raw view, and a few unaligned pieces, equal QEMU's reading."""
    expected = qemu_raw(image, workdir / "expected.raw")
    with mounted(image, mountpoint=mnt, options=options):
        view = exposed(mnt, image)
        assert view.stat().st_size == len(expected)
        assert view.read_bytes() == expected
        with open(view, "rb") as handle:
            for offset in (1, 4095, len(expected) // 3 + 511, len(expected) - 777):
                assert os.pread(handle.fileno(), 70001, offset) == \
                    expected[offset:offset + 70001]
    return expected


def compare_with(image: Path, expected: bytes, workdir: Path) -> None:
    raw = workdir / "want.raw"
    raw.write_bytes(expected)
    result = run("qemu-img", "compare", "-F", "raw", image, raw, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def _be64(path: Path, offset: int) -> int:
    with open(path, "rb") as handle:
        handle.seek(offset)
        return int(struct.unpack(">Q", handle.read(8))[0])


# -- reads --------------------------------------------------------------------------------

@pytest.mark.parametrize("compat", ["0.10", "1.1"])
@pytest.mark.parametrize("cluster_size", [512, 4 * KiB, 64 * KiB, 2 * MiB])
def test_reads_match_qemu(workdir: Path, mnt: Path, compat: str, cluster_size: int) -> None:
    size = max(24 * cluster_size, 8 * MiB) + 1536
    image = qemu_create(workdir / "disk.qcow2", size, f"compat={compat}",
                        f"cluster_size={cluster_size}")
    out_of_order_writes(image, cluster_size, size)
    assert_reads_like_qemu(image, mnt, workdir)


@pytest.mark.parametrize("cluster_size", [32 * KiB, 2 * MiB])
def test_extended_l2_subclusters_read(workdir: Path, mnt: Path, cluster_size: int) -> None:
    """Subcluster-sized and -unaligned writes, zero writes and discards
    leave clusters partly allocated, partly zero, partly unallocated."""
    size = max(24 * cluster_size, 8 * MiB)
    image = qemu_create(workdir / "ext.qcow2", size, "extended_l2=on",
                        f"cluster_size={cluster_size}")
    sub = cluster_size // 32
    out_of_order_writes(image, cluster_size, size)
    qemu_io(image, f"write -P 0x77 {sub + 5} {sub}", f"write -z {4 * sub} {3 * sub}",
            f"discard {cluster_size + 8 * sub} {2 * sub}", f"write -P 0x78 {40 * sub - 1} 2")
    assert_reads_like_qemu(image, mnt, workdir)


@pytest.mark.parametrize("options", ["compression_type=zlib,cluster_size=4k",
                                     "compression_type=zlib,compat=0.10",
                                     "compression_type=zstd,cluster_size=4k",
                                     "compression_type=zstd,extended_l2=on,cluster_size=32k"])
def test_compressed_images_read(workdir: Path, mnt: Path, options: str) -> None:
    """convert -c: whole images of compressed clusters, zlib and zstd."""
    if "zstd" in options:
        pytest.importorskip("zstandard")
    source = qemu_create(workdir / "src.qcow2", "8M", "cluster_size=4k")
    out_of_order_writes(source, 4 * KiB, 8 * MiB)
    qemu_io(source, "write -P 0x70 1M 2M")
    image = workdir / "packed.qcow2"
    run("qemu-img", "convert", "-c", "-O", "qcow2", "-o", options, source, image)
    assert json.loads(run("qemu-img", "check", "--output=json", image).stdout) \
        .get("compressed-clusters", 0) > 0
    assert assert_reads_like_qemu(image, mnt, workdir) == \
        qemu_raw(source, workdir / "source.raw")


def _chain(workdir: Path) -> Path:
    """raw <- qcow2 (4k clusters) <- qcow2 (extended L2), relative names,
    each layer longer than the one below (short layers read as zeros)."""
    base = workdir / "base.raw"
    base.write_bytes(random_bytes(3 * MiB, seed=11))
    mid = qemu_create(workdir / "mid.qcow2", "6M", "backing_file=base.raw",
                      "backing_fmt=raw", "cluster_size=4k", "compat=0.10")
    qemu_io(mid, "write -P 0x22 100k 300k", "write -z 500k 64k", "write -P 0x23 4M 5k")
    top = qemu_create(workdir / "top.qcow2", "8M", "backing_file=mid.qcow2",
                      "backing_fmt=qcow2", "extended_l2=on", "cluster_size=64k")
    qemu_io(top, "write -P 0x33 150k 10k", "write -z 700k 8k", "discard 128k 64k",
            "write -P 0x34 5M 1", "write -z 2M 64k")
    return top


def test_chain_three_deep_raw_and_qcow2(workdir: Path, mnt: Path) -> None:
    assert_reads_like_qemu(_chain(workdir), mnt, workdir)


def test_read_only_mount_of_a_chain(workdir: Path, mnt: Path) -> None:
    top = _chain(workdir)
    before = [sha256(path) for path in sorted(workdir.glob("*.*"))]
    expected = qemu_raw(top, workdir / "expected.raw")
    with mounted(top, mountpoint=mnt, options="ro"):
        view = exposed(mnt, top)
        assert view.read_bytes() == expected
        with pytest.raises(OSError) as info:
            os.open(view, os.O_WRONLY)
        assert info.value.errno in (errno.EROFS, errno.EACCES, errno.EPERM)
        # readers may share a read-only mount's image
        run("qemu-io", "-r", "-f", "qcow2", "-c", "read 0 4k", top)
    (workdir / "expected.raw").unlink()
    assert [sha256(path) for path in sorted(workdir.glob("*.*"))] == before


@pytest.mark.parametrize("raw_flag", ["off", "on"])
def test_external_data_file(workdir: Path, mnt: Path, raw_flag: str) -> None:
    image = qemu_create(workdir / "ext.qcow2", "8M", "data_file=ext.data",
                        f"data_file_raw={raw_flag}")
    qemu_io(image, "write -P 0x5a 4k 200k", "write -z 64k 64k", "write -P 1 1M 1",
            "discard 3M 64k", "write -P 2 7M 100k")
    assert_reads_like_qemu(image, mnt, workdir)


def test_internal_snapshots(workdir: Path, mnt: Path) -> None:
    """The live image and, with -o snapshots, each snapshot beside it."""
    image = qemu_create(workdir / "snap.qcow2", "8M", "cluster_size=16k")
    expected: dict[str, bytes] = {}
    for number, tag in enumerate(("first", "second")):
        qemu_io(image, f"write -P {number + 1} {number * 700}k 1M", "write -z 5M 64k")
        run("qemu-img", "snapshot", "-c", tag, image)
        run("qemu-img", "convert", "-l", f"snapshot.name={tag}", "-O", "raw", image,
            workdir / f"{tag}.raw")
        expected[tag] = (workdir / f"{tag}.raw").read_bytes()
    qemu_io(image, "write -P 9 100k 3M", "discard 6M 1M")
    live = assert_reads_like_qemu(image, mnt, workdir)
    with mounted(image, mountpoint=mnt, options="snapshots,ro"):
        for tag, contents in expected.items():
            assert (mnt / f"snap@{tag}.raw").read_bytes() == contents
        assert (mnt / "snap.raw").read_bytes() == live


# -- writes -------------------------------------------------------------------------------

#: qemu-img create options of the images written through the mount
WRITE_CASES = {
    "defaults": [],
    "compat 0.10, 4k": ["compat=0.10", "cluster_size=4k"],
    "512 B clusters": ["cluster_size=512"],
    "2 MiB clusters": ["cluster_size=2M"],
    "extended l2": ["extended_l2=on", "cluster_size=64k"],
    "lazy refcounts, 1-bit": ["lazy_refcounts=on", "refcount_bits=1", "cluster_size=4k"],
    "data file": ["data_file=w.data"],
}

#: (offset, length): unaligned, crossing clusters, past previous data
UNALIGNED_WRITES = [(3, 5), (4093, 10), (65535, 3 * 65536 + 7), (1 * MiB - 7, 300001),
                    (5 * MiB + 12345, 4096), (16 * MiB - 5, 5)]


def _dd(payload: Path, target: Path, offset: int) -> None:
    run("dd", f"if={payload}", f"of={target}", "bs=64k", "oflag=seek_bytes",
        f"seek={offset}", "conv=notrunc,fsync", "status=none")


def _parallel_pwrites(target: Path, expected: bytearray, seed: int) -> None:
    """Four threads, each with its own fd, writing disjoint unaligned pieces
    (so the expected result does not depend on the order), then fsync."""
    pieces = [(8 * MiB + writer * 777_777 + index * 31_337 + 1, random_bytes(20_000 + index,
               seed + writer * 100 + index)) for writer in range(4) for index in range(8)]
    for offset, data in pieces:
        expected[offset:offset + len(data)] = data

    def writer(number: int) -> None:
        pwrite_all(target, pieces[number * 8:(number + 1) * 8])
    threads = [threading.Thread(target=writer, args=(number,)) for number in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


@pytest.mark.parametrize("case", sorted(WRITE_CASES))
def test_writes_through_the_mount(workdir: Path, mnt: Path, case: str) -> None:
    image = qemu_create(workdir / "w.qcow2", "16M", *WRITE_CASES[case])
    qemu_io(image, "write -P 0x10 0 1M", "write -z 2M 1M", "write -P 0x11 12M 100k")
    expected = bytearray(qemu_raw(image, workdir / "before.raw"))
    with mounted(image, mountpoint=mnt):
        view = exposed(mnt, image)
        for number, (offset, length) in enumerate(UNALIGNED_WRITES):
            payload = workdir / "payload.bin"
            data = random_bytes(length, seed=number)
            payload.write_bytes(data)
            _dd(payload, view, offset)
            expected[offset:offset + length] = data
        _parallel_pwrites(view, expected, seed=50)
        assert view.read_bytes() == expected
    check_clean(image)
    compare_with(image, bytes(expected), workdir)


@pytest.mark.parametrize("options", [["cluster_size=64k"], ["extended_l2=on", "cluster_size=64k"]])
def test_parallel_writers_share_clusters(workdir: Path, mnt: Path, options: list[str]) -> None:
    """Eight writers fill disjoint 1000-byte pieces of the same clusters,
    unallocated over a backing file: every copy-on-write keeps the others'
    bytes."""
    base = workdir / "base.raw"
    base.write_bytes(random_bytes(2 * MiB, seed=21))
    image = qemu_create(workdir / "top.qcow2", "2M", "backing_file=base.raw",
                        "backing_fmt=raw", *options)
    expected = bytearray(base.read_bytes())
    pieces = {writer: [(writer * 1000 + round_ * 8000 + 3, random_bytes(1000, writer * 97 + round_))
                       for round_ in range(40)] for writer in range(8)}
    for writes in pieces.values():
        for offset, data in writes:
            expected[offset:offset + len(data)] = data
    with mounted(image, mountpoint=mnt):
        view = exposed(mnt, image)

        def writer(number: int) -> None:
            fd = os.open(view, os.O_WRONLY)
            try:
                for offset, data in pieces[number]:
                    os.pwrite(fd, data, offset)
                os.fsync(fd)
            finally:
                os.close(fd)
        threads = [threading.Thread(target=writer, args=(number,)) for number in pieces]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    check_clean(image)
    compare_with(image, bytes(expected), workdir)


@pytest.mark.parametrize("options", [None, "cache=none", "cache=writethrough"])
def test_direct_io_through_the_mount(workdir: Path, mnt: Path, options: str | None) -> None:
    """O_DIRECT (what QEMU's cache=none uses on the raw view) reads and writes."""
    image = qemu_create(workdir / "d.qcow2", "8M", "cluster_size=4k")
    payload = workdir / "payload.bin"
    payload.write_bytes(random_bytes(1 * MiB, seed=31))
    expected = bytearray(8 * MiB)
    expected[3 * 65536:3 * 65536 + MiB] = payload.read_bytes()
    with mounted(image, mountpoint=mnt, options=options):
        view = exposed(mnt, image)
        run("dd", f"if={payload}", f"of={view}", "bs=64k", "seek=3", "oflag=direct",
            "conv=notrunc", "status=none")
        run("dd", f"if={view}", f"of={workdir / 'back.bin'}", "bs=64k", "skip=3", "count=16",
            "iflag=direct", "status=none")
        assert (workdir / "back.bin").read_bytes() == payload.read_bytes()
    check_clean(image)
    compare_with(image, bytes(expected), workdir)


def test_writes_over_a_backing_chain(workdir: Path, mnt: Path) -> None:
    """Copy-on-write from the chain below; the backing files stay untouched."""
    top = _chain(workdir)
    lower = {path.name: sha256(path) for path in (workdir / "base.raw", workdir / "mid.qcow2")}
    expected = bytearray(qemu_raw(top, workdir / "before.raw"))
    with mounted(top, mountpoint=mnt):
        view = exposed(mnt, top)
        fd = os.open(view, os.O_WRONLY)
        try:
            for offset, length in UNALIGNED_WRITES[:-1]:
                data = random_bytes(length, seed=offset)
                assert os.pwrite(fd, data, offset) == length
                expected[offset:offset + length] = data
            os.fsync(fd)
        finally:
            os.close(fd)
    check_clean(top)
    compare_with(top, bytes(expected), workdir)
    assert {name: sha256(workdir / name) for name in lower} == lower


@pytest.mark.parametrize("compression", ["zlib", "zstd"])
def test_compressed_clusters_overwritten_through_the_mount(workdir: Path, mnt: Path,
                                                           compression: str) -> None:
    if compression == "zstd":
        pytest.importorskip("zstandard")
    source = qemu_create(workdir / "src.qcow2", "8M", "cluster_size=4k")
    qemu_io(source, "write -P 0x61 0 4M")
    image = workdir / "packed.qcow2"
    run("qemu-img", "convert", "-c", "-O", "qcow2", "-o",
        f"cluster_size=4k,compression_type={compression}", source, image)
    expected = bytearray(qemu_raw(image, workdir / "before.raw"))
    with mounted(image, mountpoint=mnt):
        fd = os.open(exposed(mnt, image), os.O_WRONLY)
        try:
            for offset in (5, 4096 * 7 + 4000, 3 * MiB - 3):
                expected[offset:offset + 9] = b"overwrite"
                os.pwrite(fd, b"overwrite", offset)
            os.fsync(fd)
        finally:
            os.close(fd)
    check_clean(image)
    compare_with(image, bytes(expected), workdir)


def test_dirty_lazy_refcount_image_is_repaired_by_a_rw_mount(workdir: Path, mnt: Path) -> None:
    """QEMU killed (qemu-io abort) with lazy_refcounts leaves the dirty bit
    and stale refcounts; a read-write mount rebuilds them, as QEMU does."""
    image = qemu_create(workdir / "lazy.qcow2", "8M", "lazy_refcounts=on", "cluster_size=4k")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 7 0 1M", "-c",
                    "write -P 8 3M 100k", "-c", "abort", str(image)], capture_output=True)
    assert json.loads(run("qemu-img", "info", "--output=json", image).stdout)["dirty-flag"]
    expected = bytearray(qemu_raw(image, workdir / "before.raw"))
    with mounted(image, mountpoint=mnt):
        with open(exposed(mnt, image), "r+b") as handle:
            assert handle.read() == expected
            handle.seek(5 * MiB + 1)
            handle.write(b"after the crash")
            expected[5 * MiB + 1:5 * MiB + 16] = b"after the crash"
    check_clean(image)
    assert not json.loads(run("qemu-img", "info", "--output=json", image).stdout)["dirty-flag"]
    compare_with(image, bytes(expected), workdir)


def test_writes_to_an_image_with_internal_snapshots(workdir: Path, mnt: Path) -> None:
    """Clusters shared with snapshots are copied on write; the snapshots,
    shown beside the live image with -o snapshots, keep their contents."""
    image = qemu_create(workdir / "snap.qcow2", "8M", "cluster_size=4k")
    qemu_io(image, "write -P 1 0 2M", "write -c -P 2 4M 64k")
    run("qemu-img", "snapshot", "-c", "before", image)
    snapshot = qemu_raw(image, workdir / "before.raw")
    expected = bytearray(snapshot)
    with mounted(image, mountpoint=mnt, options="snapshots"):
        fd = os.open(mnt / "snap.raw", os.O_WRONLY)
        try:
            for offset, length in UNALIGNED_WRITES[:-1] + [(4 * MiB + 100, 5000)]:
                data = random_bytes(length, seed=length)
                os.pwrite(fd, data, offset)
                expected[offset:offset + length] = data
            os.fsync(fd)
        finally:
            os.close(fd)
        assert (mnt / "snap@before.raw").read_bytes() == snapshot
        assert (mnt / "snap.raw").read_bytes() == expected
    check_clean(image)
    compare_with(image, bytes(expected), workdir)
    run("qemu-img", "convert", "-l", "snapshot.name=before", "-O", "raw", image,
        workdir / "snap-after.raw")
    assert (workdir / "snap-after.raw").read_bytes() == snapshot


def test_snapshot_option_discards_writes(workdir: Path, mnt: Path) -> None:
    image = qemu_create(workdir / "s.qcow2", "8M", "cluster_size=4k")
    qemu_io(image, "write -P 0x42 0 2M")
    before = sha256(image)
    with mounted(image, mountpoint=mnt, options="snapshot"):
        view = exposed(mnt, image)
        with open(view, "r+b") as handle:
            handle.seek(1 * MiB + 3)
            handle.write(b"gone at unmount" * 1000)
            handle.flush()
            os.fsync(handle.fileno())
        with open(view, "rb") as handle:
            handle.seek(1 * MiB + 3)
            assert handle.read(15) == b"gone at unmount"      # visible while mounted
    assert sha256(image) == before
    check_clean(image)


def test_ext4_on_the_raw_view(workdir: Path, mnt: Path) -> None:
    """losetup + mkfs.ext4 + files on the raw view of a qcow2; then e2fsck on
    QEMU's raw copy of the image (no qemu-nbd needed)."""
    need_root()
    need("losetup", "mkfs.ext4", "e2fsck", "debugfs")
    image = qemu_create(workdir / "fs.qcow2", "64M", "cluster_size=64k", "lazy_refcounts=on")
    fs_dir = workdir / "fs"
    fs_dir.mkdir()
    files = {f"file{number}.bin": random_bytes(300_000 + number * 7777, seed=number)
             for number in range(6)}
    with mounted(image, mountpoint=mnt):
        loop = run("losetup", "--show", "-f", exposed(mnt, image)).stdout.strip()
        try:
            run("mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", loop)
            run("mount", loop, fs_dir)
            try:
                for name, data in files.items():
                    (fs_dir / name).write_bytes(data)
                (fs_dir / "file1.bin").unlink()
            finally:
                run("umount", fs_dir)
        finally:
            run("losetup", "-d", loop)
    check_clean(image)
    raw = workdir / "fs.raw"
    qemu_raw(image, raw)
    run("e2fsck", "-fn", raw)
    for name, data in files.items():
        dumped = subprocess.run(["debugfs", "-R", f"cat /{name}", str(raw)],
                                capture_output=True, check=True).stdout
        assert (dumped == data) == (name != "file1.bin"), name


# -- locks and damage ---------------------------------------------------------------------

def test_qemu_io_cannot_write_a_mounted_image(workdir: Path, mnt: Path) -> None:
    image = qemu_create(workdir / "l.qcow2", "8M")
    with mounted(image, mountpoint=mnt):
        result = run("qemu-io", "-f", "qcow2", "-c", "write 0 4k", image, check=False)
        assert result.returncode != 0 and "lock" in result.stderr, result.stderr
        run("qemu-io", "-U", "-r", "-f", "qcow2", "-c", "read 0 4k", image)
    run("qemu-io", "-f", "qcow2", "-c", "write 0 4k", image)       # released at unmount


def test_imgfs_tools_respect_a_mounts_lock(workdir: Path, mnt: Path) -> None:
    """check and snapshot are refused on a mounted image, as qemu-img's are;
    check -U reads anyway."""
    image = qemu_create(workdir / "l.qcow2", "8M")
    with mounted(image, mountpoint=mnt):
        for args in (["check", image], ["snapshot", "-c", "s", image], ["resize", image, "+1M"]):
            result = imgfs(*args, check=False)
            assert result.returncode == 1 and "lock" in result.stderr, (args, result.stderr)
            assert result.stderr.count("\n") == 1
        assert imgfs("check", "-U", image).returncode == 0
    assert run("qemu-img", "snapshot", "-l", image).stdout == ""


def test_hostile_image_is_refused_at_mount(workdir: Path, mnt: Path) -> None:
    image = qemu_create(workdir / "h.qcow2", "8M")
    qemu_io(image, "write -P 1 0 100k")
    patch_bytes(image, 40, struct.pack(">Q", 1 << 50))        # l1_table_offset past EOF
    before = sha256(image)
    result = imgfs("mount", image, mnt, check=False, timeout=30)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("imgfs: "), result.stderr
    assert "Traceback" not in result.stderr
    assert not is_mounted(mnt)
    assert sha256(image) == before


@pytest.mark.parametrize("damage", ["compressed past EOF", "unaligned data cluster"])
def test_damage_found_after_mount_fails_that_read_only(workdir: Path, mnt: Path,
                                                       damage: str) -> None:
    """With 4 KiB clusters an L2 table covers 2 MiB: damage a table the
    mount has not read yet, then only reads through it fail (qemu-io fails
    the same reads with EIO)."""
    image = qemu_create(workdir / "d.qcow2", "8M", "cluster_size=4k")
    qemu_io(image, "write -P 0x31 0 8M")
    expected = qemu_raw(image, workdir / "expected.raw")
    l1_offset = _be64(image, 40)
    l2_offset = _be64(image, l1_offset + 3 * 8) & 0x00FF_FFFF_FFFF_FE00     # 6..8 MiB
    with mounted(image, mountpoint=mnt):
        view = exposed(mnt, image)
        with open(view, "rb") as handle:
            assert os.pread(handle.fileno(), 1 * MiB, 0) == expected[:1 * MiB]
            damaged = _damaged_entry(image, l2_offset, damage)
            patch_bytes(image, l2_offset, struct.pack(">Q", damaged))
            with pytest.raises(OSError) as info:
                os.pread(handle.fileno(), 4096, 6 * MiB)
            assert info.value.errno == errno.EIO
            assert os.pread(handle.fileno(), 4096, 6 * MiB + 4096) == \
                expected[6 * MiB + 4096:6 * MiB + 8192]
            assert os.pread(handle.fileno(), 1 * MiB, 2 * MiB) == expected[2 * MiB:3 * MiB]
        assert is_mounted(mnt)
        assert subprocess.run(["cat", str(view)], capture_output=True).returncode != 0
        assert os.stat(view).st_size == len(expected)


@pytest.mark.parametrize("damage", ["unaligned data cluster", "data cluster on the L1 table"])
def test_write_to_a_damaged_cluster_marks_the_image_corrupt(workdir: Path, mnt: Path,
                                                            damage: str) -> None:
    """A write meeting an L2 entry whose host offset is not cluster aligned,
    or lies on the L1 table, fails with EIO and marks the image corrupt, as
    in QEMU, also when the table is already cached (the overwrite decided
    without the lock must leave it to the locked path); the mount stays up."""
    image = qemu_create(workdir / "m.qcow2", "8M", "cluster_size=4k")
    qemu_io(image, "write -P 0x31 0 8M")
    l1_offset = _be64(image, 40)
    l2_offset = _be64(image, l1_offset + 3 * 8) & 0x00FF_FFFF_FFFF_FE00     # 6..8 MiB
    entry = _damaged_entry(image, l2_offset, damage) if damage.startswith("unaligned") \
        else 1 << 63 | l1_offset & ~0xFFF                   # COPIED, on the L1's cluster
    patch_bytes(image, l2_offset, struct.pack(">Q", entry))
    with mounted(image, mountpoint=mnt):
        fd = os.open(exposed(mnt, image), os.O_WRONLY)
        try:
            os.pwrite(fd, b"x" * 4096, 6 * MiB + 4096)      # caches the table
            with pytest.raises(OSError) as info:
                os.pwrite(fd, b"y" * 4096, 6 * MiB)
            assert info.value.errno == errno.EIO
        finally:
            os.close(fd)
        assert is_mounted(mnt)
    info_json = json.loads(run("qemu-img", "info", "--output=json", image).stdout)
    assert info_json["format-specific"]["data"]["corrupt"] is True


def _damaged_entry(image: Path, l2_offset: int, damage: str) -> int:
    if damage == "compressed past EOF":
        return 1 << 62 | 1 << 40           # a descriptor far past the end of the file
    return _be64(image, l2_offset) + 0x200    # inside the cluster it pointed at


@pytest.mark.parametrize("options", [["cluster_size=4k"], ["cluster_size=64k", "compat=0.10"]])
def test_sigkill_mid_writes_leaves_no_corruption(workdir: Path, mnt: Path,
                                                 options: list[str]) -> None:
    """The daemon killed while a writer is busy: qemu-img check finds no
    corruption (leaks are allowed), and every write fsync returned for is
    in the image."""
    image = qemu_create(workdir / "k.qcow2", "16M", *options)
    expected = bytearray(16 * MiB)
    with mounted(image, mountpoint=mnt):
        view = exposed(mnt, image)
        fd = os.open(view, os.O_WRONLY)
        try:
            for number in range(40):             # durable: the first 8 MiB
                offset, data = number * 200_017 + 3, random_bytes(30_001, seed=number)
                os.pwrite(fd, data, offset)
                expected[offset:offset + len(data)] = data
            os.fsync(fd)
        finally:
            os.close(fd)
        kill_daemon_mid_writes(mnt, view, 8 * MiB, 8 * MiB, writes_first=20)
    result = run("qemu-img", "check", "--output=json", image, check=False)
    report = json.loads(result.stdout)
    assert result.returncode in (0, 3) and not report.get("corruptions"), report
    assert qemu_raw(image, workdir / "after.raw")[:8 * MiB] == expected[:8 * MiB]


