"""Raw images through a real FUSE mount, checked with qemu-img / qemu-io."""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import imgfs, mounted, need, pwrite_all, qemu_raw, random_bytes, run

MiB = 1 << 20


@pytest.fixture
def raw_image(workdir: Path) -> Path:
    need("qemu-img", "qemu-io")
    image = workdir / "disk.img"
    run("qemu-img", "create", "-f", "raw", image, "16M")
    # Data written out of order and unaligned by QEMU itself.
    for pattern, offset, length in ((0x11, 0, 4096), (0x22, 5 * MiB + 3, 70000),
                                    (0x33, 16 * MiB - 1000, 1000), (0x44, 65535, 2)):
        run("qemu-io", "-f", "raw", "-c", f"write -P {pattern} {offset} {length}", image)
    return image


def test_reads_match_qemu(raw_image: Path, mnt: Path, workdir: Path) -> None:
    expected = qemu_raw(raw_image, workdir / "expected.raw")
    with mounted(raw_image, mountpoint=mnt):
        exposed = mnt / "disk.raw"
        assert exposed.stat().st_size == 16 * MiB
        assert exposed.read_bytes() == expected
        with open(exposed, "rb") as handle:
            for offset, length in ((1, 4095), (5 * MiB, 70010), (16 * MiB - 1001, 5000)):
                handle.seek(offset)
                assert handle.read(length) == expected[offset:offset + length]


def test_unaligned_writes_reach_the_image(raw_image: Path, mnt: Path, workdir: Path) -> None:
    expected = bytearray(qemu_raw(raw_image, workdir / "before.raw"))
    writes = [(3, b"abc"), (4093, random_bytes(10, 2)), (MiB - 7, random_bytes(300001, 3)),
              (16 * MiB - 5, b"tail!")]
    with mounted(raw_image, mountpoint=mnt):
        pwrite_all(mnt / "disk.raw", writes, expected)
    (workdir / "expected.raw").write_bytes(expected)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", raw_image, workdir / "expected.raw")
    # and qemu-io agrees on one of them, byte for byte
    run("qemu-io", "-f", "raw", "-c", "read -P 0x61 3 1", raw_image)


def test_reads_across_eof(raw_image: Path, mnt: Path) -> None:
    with mounted(raw_image, mountpoint=mnt, options="ro"):
        fd = os.open(mnt / "disk.raw", os.O_RDONLY)
        try:
            assert len(os.pread(fd, 100, 16 * MiB - 10)) == 10
            assert os.pread(fd, 100, 16 * MiB) == b""
            assert os.pread(fd, 100, 20 * MiB) == b""
        finally:
            os.close(fd)


def test_write_past_end_grows_a_raw_image(raw_image: Path, mnt: Path) -> None:
    """raw can resize, so the raw view behaves like a file: it grows."""
    with mounted(raw_image, mountpoint=mnt):
        fd = os.open(mnt / "disk.raw", os.O_RDWR)
        try:
            assert os.pwrite(fd, b"x" * 10, 16 * MiB + 5) == 10
            os.fsync(fd)
        finally:
            os.close(fd)
        assert (mnt / "disk.raw").stat().st_size == 16 * MiB + 15
    assert raw_image.stat().st_size == 16 * MiB + 15
    assert raw_image.read_bytes()[-15:] == b"\0" * 5 + b"x" * 10


def test_write_past_end_of_a_fixed_window_fails(raw_image: Path, mnt: Path) -> None:
    """A raw window (offset/size) cannot grow: the write fails, nothing leaks."""
    before = raw_image.read_bytes()
    with mounted(raw_image, mountpoint=mnt, options=f"format=raw,size={MiB}"):
        fd = os.open(mnt / "disk.raw", os.O_RDWR)
        try:
            with pytest.raises(OSError) as info:
                os.pwrite(fd, b"x" * 10, MiB)      # the write itself fails
            assert info.value.errno == errno.ENOSPC
            assert os.pwrite(fd, b"y" * 10, MiB - 4) == 4   # a short write up to the end
            os.fsync(fd)
        finally:
            os.close(fd)
        assert (mnt / "disk.raw").stat().st_size == MiB
    assert raw_image.read_bytes() == before[:MiB - 4] + b"yyyy" + before[MiB:]


def test_writes_bypass_the_page_cache_and_cached_readers_see_them(raw_image: Path,
                                                                   mnt: Path) -> None:
    """Opens for writing are direct (each write reaches imgfs at once); pages
    a read-only open has cached, and keeps across opens, are dropped where
    such a write lands."""
    with mounted(raw_image, mountpoint=mnt):
        exposed = mnt / "disk.raw"
        reader = os.open(exposed, os.O_RDONLY)
        writer = os.open(exposed, os.O_RDWR)
        try:
            assert os.pread(reader, 8192, 0) == b"\x11" * 4096 + bytes(4096)   # now cached
            os.pwrite(writer, b"A" * 4096, 0)
            os.pwrite(writer, b"B" * 100, 5000)          # unaligned, inside a cached page
            expected = b"A" * 4096 + bytes(904) + b"B" * 100 + bytes(3092)
            assert os.pread(reader, 8192, 0) == expected
            assert exposed.read_bytes()[:8192] == expected          # a new open
            # what a direct write cannot offer: a shared writable mapping
            with pytest.raises(OSError) as info:
                mmap.mmap(writer, 4096, mmap.MAP_SHARED)
            assert info.value.errno == errno.ENODEV
            # the image file has the writes before any fsync
            with open(raw_image, "rb") as image:
                assert image.read(8192) == expected
        finally:
            os.close(reader)
            os.close(writer)


def test_parallel_processes(raw_image: Path, mnt: Path, workdir: Path) -> None:
    """Several processes write disjoint regions and read each other's back."""
    script = (
        "import os, sys\n"
        "path, index = sys.argv[1], int(sys.argv[2])\n"
        "fd = os.open(path, os.O_RDWR)\n"
        "data = bytes([index + 1]) * 65537\n"
        "for round in range(20):\n"
        "    offset = (index * 20 + round) * 70000 + 11\n"
        "    os.pwrite(fd, data, offset)\n"
        "    assert os.pread(fd, len(data), offset) == data\n"
        "os.fsync(fd)\n"
    )
    with mounted(raw_image, mountpoint=mnt):
        procs = [subprocess.Popen([sys.executable, "-c", script, str(mnt / "disk.raw"), str(i)])
                 for i in range(6)]
        assert all(proc.wait(timeout=120) == 0 for proc in procs)
    content = raw_image.read_bytes()
    for index in range(6):
        for round_ in range(20):
            offset = (index * 20 + round_) * 70000 + 11
            assert content[offset:offset + 65537] == bytes([index + 1]) * 65537


def test_read_only_mount_refuses_writes(raw_image: Path, mnt: Path) -> None:
    before = raw_image.read_bytes()
    with mounted(raw_image, mountpoint=mnt, options="ro"):
        exposed = mnt / "disk.raw"
        assert exposed.read_bytes() == before
        with pytest.raises(OSError) as info:
            os.open(exposed, os.O_WRONLY)
        assert info.value.errno in (errno.EROFS, errno.EACCES)
    assert raw_image.read_bytes() == before


def test_snapshot_mode_discards_writes(raw_image: Path, mnt: Path) -> None:
    before = raw_image.read_bytes()
    with mounted(raw_image, mountpoint=mnt, options="snapshot"):
        fd = os.open(mnt / "disk.raw", os.O_RDWR)
        try:
            os.pwrite(fd, b"Z" * 100000, 12345)
            os.fsync(fd)
            assert os.pread(fd, 100000, 12345) == b"Z" * 100000
            # untouched parts of a copied-up granule still read from the image
            assert os.pread(fd, 12345, 0) == before[:12345]
        finally:
            os.close(fd)
    assert raw_image.read_bytes() == before


def test_regular_file_mountpoint(raw_image: Path, workdir: Path) -> None:
    target = workdir / "view.raw"
    target.write_bytes(b"")
    expected = raw_image.read_bytes()
    with mounted(raw_image, mountpoint=target):
        assert target.stat().st_size == 16 * MiB
        assert target.read_bytes() == expected


def test_several_sources_and_names(workdir: Path, mnt: Path) -> None:
    need("qemu-img")
    first, second = workdir / "a.img", workdir / "b.qcow"
    first.write_bytes(b"A" * MiB)
    second.write_bytes(b"B" * MiB)
    with mounted(first, second, mountpoint=mnt, options="format=raw"):
        assert sorted(os.listdir(mnt)) == ["a.raw", "b.raw"]
        assert (mnt / "b.raw").read_bytes() == b"B" * MiB
    with mounted(first, mountpoint=mnt, options="name=custom"):
        assert os.listdir(mnt) == ["custom.raw"]


def test_size_and_blocks_in_stat(workdir: Path, mnt: Path) -> None:
    image = workdir / "sparse.img"
    with open(image, "wb") as handle:
        handle.truncate(64 * MiB)
        handle.seek(MiB)
        handle.write(b"x" * MiB)
    with mounted(image, mountpoint=mnt):
        info = (mnt / "sparse.raw").stat()
        assert info.st_size == 64 * MiB
        # st_blocks is the space the image really uses, not its virtual size
        assert info.st_blocks * 512 == os.stat(image).st_blocks * 512
        assert info.st_blocks * 512 < 4 * MiB


def test_truncate_resizes_raw(workdir: Path, mnt: Path) -> None:
    image = workdir / "grow.img"
    image.write_bytes(b"g" * MiB)
    with mounted(image, mountpoint=mnt):
        os.truncate(mnt / "grow.raw", 2 * MiB)
        assert (mnt / "grow.raw").stat().st_size == 2 * MiB
    assert image.stat().st_size == 2 * MiB


def test_truncate_refused_where_the_format_cannot_resize(raw_image: Path, mnt: Path) -> None:
    with mounted(raw_image, mountpoint=mnt, options=f"format=raw,offset=1M,size={4 * MiB}"):
        with pytest.raises(OSError) as info:
            os.truncate(mnt / "disk.raw", 2 * MiB)
        assert info.value.errno == errno.EOPNOTSUPP
        assert (mnt / "disk.raw").stat().st_size == 4 * MiB


def test_cache_none_and_dotted_driver_options(raw_image: Path, mnt: Path, workdir: Path) -> None:
    """cache=none (O_DIRECT below) and a dotted option for the file node."""
    expected = qemu_raw(raw_image, workdir / "expected.raw")
    with mounted(raw_image, mountpoint=mnt, options="cache=none,file.locking=off"):
        exposed = mnt / "disk.raw"
        assert exposed.read_bytes() == expected
        fd = os.open(exposed, os.O_RDWR)
        try:
            os.pwrite(fd, b"direct", 4097)
            assert os.pread(fd, 6, 4097) == b"direct"
        finally:
            os.close(fd)
        # file.locking=off: QEMU can open the image while it is mounted
        run("qemu-io", "-f", "raw", "-c", "read -P 0x64 4097 1", raw_image)


def host_dirty_bytes(path: Path) -> int:
    """Bytes of `path` dirty in the host page cache (cachestat(2), Linux 6.5)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    whole_file = ctypes.create_string_buffer(struct.pack("QQ", 0, 0))
    stat = ctypes.create_string_buffer(5 * 8)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.syscall(451, fd, whole_file, stat, 0) != 0:     # __NR_cachestat
            pytest.skip(f"no cachestat: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(fd)
    return struct.unpack("5Q", stat.raw)[1] * os.sysconf("SC_PAGE_SIZE")


def test_long_write_streams_start_the_host_writeback(workdir: Path, mnt: Path) -> None:
    """After 64 MiB written to a file, imgfs starts the host's writeback of it
    (WriteBehind) instead of leaving it all to the final fsync; the kernel by
    itself would hold it for 30 s."""
    image = workdir / "stream.img"
    with open(image, "wb") as new:
        new.truncate(96 * MiB)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_long, ctypes.c_long, ctypes.c_uint]
    with mounted(image, mountpoint=mnt):
        # kept open: closing the file flushes it, and that would clean it anyway
        fd = os.open(mnt / "stream.raw", os.O_WRONLY)
        try:
            block = random_bytes(MiB)
            for n in range(80):
                os.pwrite(fd, block, n * MiB)
            # the kernel writes its cache back to imgfs, but asks for no fsync
            assert libc.sync_file_range(fd, 0, 0, 7) == 0       # WAIT_BEFORE|WRITE|WAIT_AFTER
            deadline = time.monotonic() + 10
            while host_dirty_bytes(image) > 16 * MiB and time.monotonic() < deadline:
                time.sleep(0.1)
            assert host_dirty_bytes(image) <= 16 * MiB
        finally:
            os.close(fd)


def test_info_matches_qemu(raw_image: Path) -> None:
    import json
    ours = json.loads(imgfs("info", "--output", "json", raw_image).stdout)
    theirs = json.loads(run("qemu-img", "info", "--output", "json", raw_image).stdout)
    for key in ("virtual-size", "format", "actual-size", "dirty-flag", "filename"):
        assert ours[key] == theirs[key], key
