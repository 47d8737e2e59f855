"""`file` / `host_device`: regular files and host block devices.

The leaf under every local image.  Reads and writes are positioned
(`os.pread`/`os.pwrite`, never a shared offset) and run on the trio thread:
they are page-cache hits or short disk waits, and handing each request to a
worker thread multiplied its latency (bench/README.md).  `cache=none` opens with
O_DIRECT and bounces data through page-aligned buffers, since O_DIRECT wants
aligned memory, offsets and lengths.  Locking takes QEMU's lock bytes
(`imgfs.locking`).  Holes are reported with SEEK_DATA / SEEK_HOLE.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import stat
import struct
import threading
from typing import Any

import trio

from imgfs import locking
from imgfs.block import DATA, ZERO, BlockDriver, Extent, Kind
from imgfs.errors import ImgfsError, InvalidImage, Unsupported, from_oserror
from imgfs.node import OpenContext
from imgfs.options import Bool, Opt, Schema, Str, choice

# linux/falloc.h
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
# linux/fs.h
BLKGETSIZE64 = 0x80081272
BLKSSZGET = 0x1268
FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_NOCOW_FL = 0x00800000
#: alignment used for O_DIRECT on regular files (safe for 4Kn disks)
DIRECT_ALIGNMENT = 4096
# linux/fs.h
SYNC_FILE_RANGE_WRITE = 2
#: start the host's writeback of a file after this many bytes written to it
#: (0: never; see WriteBehind)
WRITE_BEHIND_BYTES = 64 << 20

# the C library Python itself runs on (find_library would spawn ldconfig)
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_long, ctypes.c_long, ctypes.c_uint]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class WriteBehind:
    """Starts the host's writeback of a file every WRITE_BEHIND_BYTES written.

    Left alone, the host kernel holds a burst of writes below its background
    threshold (10% of RAM) in the page cache until the fsync that ends it
    (the user's sync, umount, fio's end_fsync), which then waits for the
    whole burst to reach the disk.  Starting the writeback as we go lets the
    disk work while we still translate requests; a new 1 GiB qcow2 written
    sequentially then synced took 1.0-1.1 s in most runs instead of
    1.4-2.8 s here (bench/README explains the slow outliers both see).  The
    call (sync_file_range, SYNC_FILE_RANGE_WRITE) only queues I/O but can
    wait for room in the disk's queue, so it runs in a worker thread and a
    kick is skipped while the previous one runs.  Dirty data rewritten
    within seconds may reach the disk twice; the kernel would write it after
    30 s anyway.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.unkicked = 0
        self.idle = threading.Lock()      # held while a kick runs

    def wrote(self, count: int) -> None:
        self.unkicked += count
        if self.unkicked < WRITE_BEHIND_BYTES or not WRITE_BEHIND_BYTES:
            return
        if self.idle.acquire(blocking=False):
            self.unkicked = 0
            trio.lowlevel.start_thread_soon(self._kick, lambda outcome: None)

    def _kick(self) -> None:
        try:
            _libc.sync_file_range(self.fd, 0, 0, SYNC_FILE_RANGE_WRITE)
        finally:
            self.idle.release()

    def wait(self) -> None:
        """Until no kick runs (before the descriptor is closed and its number
        can be reused)."""
        with self.idle:
            pass


def set_nocow(fd: int) -> None:
    """Ask btrfs (and others with FS_NOCOW_FL) not to copy-on-write the file;
    quietly nothing where the filesystem has no such flag."""
    try:
        flags = struct.unpack("i", fcntl.ioctl(fd, FS_IOC_GETFLAGS, b"\0" * 4))[0]
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("i", flags | FS_NOCOW_FL))
    except OSError:
        pass


def preallocate(fd: int, start: int, end: int, mode: str) -> None:
    """Reserve (falloc) or write (full) the bytes from `start` to `end`."""
    if end <= start or mode == "off":
        return
    if mode == "falloc":
        os.posix_fallocate(fd, start, end - start)
        return
    chunk = bytes(1 << 20)
    offset = start
    while offset < end:
        offset += os.pwrite(fd, chunk[:min(len(chunk), end - offset)], offset)


PREALLOC = choice("off", "falloc", "full")


def _open_without_waiting(path: str, flags: int) -> int:
    """os.open that cannot block: a FIFO (a backing file name inside a
    hostile image may name one) would wait for a writer forever.  O_NONBLOCK
    changes nothing else for files and disks; it is cleared again so the
    descriptor behaves as usual, and open() then refuses what is neither."""
    fd = os.open(path, flags | os.O_NONBLOCK)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


class FileDriver(BlockDriver):
    name = "file"
    kind = Kind.PROTOCOL
    description = "regular files (and host devices) on this machine"
    path_opts = frozenset({"filename"})
    open_opts = Schema(
        Opt("filename", Str, help="path of the file"),
        Opt("locking", choice("auto", "on", "off"), help="image locking (QEMU-compatible)"),
        Opt("aio", choice("threads", "native", "io_uring"), default="threads",
            help="accepted for QEMU compatibility"),
    )
    create_opts = Schema(
        Opt("preallocation", PREALLOC, default="off",
            help="off: sparse; falloc: reserve space; full: write zeros"),
        Opt("nocow", Bool, default=False, help="turn off copy-on-write (btrfs)"),
    )

    fd: int = -1
    writable: bool = False
    is_device: bool = False
    direct: bool = False
    locking: bool = False
    write_behind: WriteBehind | None = None

    @classmethod
    def absolute_filename(cls, filename: str) -> str:
        return "file:" + os.path.abspath(filename.partition(":")[2])

    async def open(self, options: dict[str, Any], ctx: OpenContext) -> None:
        path = options["filename"]
        if not path:
            raise InvalidImage("no filename given")
        if "\0" in path:
            # a name read from inside an image (a backing file) may hold
            # anything; os.open would raise ValueError on it
            raise InvalidImage(f"file name {path!r} contains a NUL byte")
        self.direct = ctx.cache == "none"
        self.fd, self.writable = self._open_fd(
            path, True if self.node.read_only else ctx.read_only)
        info = os.fstat(self.fd)
        if stat.S_ISDIR(info.st_mode):
            raise InvalidImage("is a directory")
        self.is_device = stat.S_ISBLK(info.st_mode)
        if self.is_device:
            self.size = os.lseek(self.fd, 0, os.SEEK_END)
        elif stat.S_ISREG(info.st_mode):
            self.size = info.st_size
        else:
            raise Unsupported("not a regular file or block device")
        self.can_resize = self.can_write_past_end = not self.is_device
        if self.is_device:
            sector = self._device_sector_size()
            self.sector_size = sector if sector in (512, 1024, 2048, 4096) else 512
        self.request_alignment = self._alignment() if self.direct else 1
        self.locking = options["locking"] != "off" if options["locking"] else ctx.locking != "off"
        if self.writable and not self.direct:
            self.write_behind = WriteBehind(self.fd)

    def _open_fd(self, path: str, read_only: bool | None) -> tuple[int, bool]:
        flags = os.O_CLOEXEC | (os.O_DIRECT if self.direct else 0)
        if read_only:
            return _open_without_waiting(path, flags | os.O_RDONLY), False
        try:
            return _open_without_waiting(path, flags | os.O_RDWR), True
        except OSError as exc:
            # Undecided (read_only None) opens fall back to read-only; the
            # core refuses later if the image really had to be written.
            if read_only is None and exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
                return _open_without_waiting(path, flags | os.O_RDONLY), False
            raise

    def _alignment(self) -> int:
        sector = self._device_sector_size() if self.is_device else None
        return max(512, sector) if sector else DIRECT_ALIGNMENT

    def _device_sector_size(self) -> int | None:
        """A block device's logical sector size (None if it will not say)."""
        try:
            sector = struct.unpack("i", fcntl.ioctl(self.fd, BLKSSZGET, b"\0" * 4))[0]
        except OSError:
            return None
        return sector if sector > 0 else None

    async def activate(self) -> None:
        if not self.locking or self.fd < 0:
            return
        held, shared = locking.wanted_perms(self.node.read_only, self.node.ctx.force_share)
        locking.apply_locks(self.fd, held, shared)

    async def aclose(self) -> None:
        if self.write_behind:
            self.write_behind.wait()
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)        # closing the descriptor drops its OFD locks

    # -- I/O --------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes:
        if self.direct:
            return self._read_direct(offset, length)
        data = os.pread(self.fd, length, offset)
        if len(data) < length:
            data = self._read_rest(data, offset, length)
        return data

    def _read_rest(self, data: bytes, offset: int, length: int) -> bytes:
        """Short read: keep reading; past the real end of file reads zeros."""
        parts = [data]
        done = len(data)
        while done < length:
            more = os.pread(self.fd, length - done, offset + done)
            if not more:
                parts.append(bytes(length - done))
                break
            parts.append(more)
            done += len(more)
        return b"".join(parts)

    def _read_direct(self, offset: int, length: int) -> bytes:
        with mmap.mmap(-1, length) as buffer:     # page-aligned, as O_DIRECT needs
            done = os.preadv(self.fd, [buffer], offset)
            data = buffer[:done]
        return data if done == length else data + bytes(length - done)

    async def write(self, offset: int, data: bytes) -> None:
        if self.direct:
            with mmap.mmap(-1, len(data)) as buffer:
                buffer.write(data)
                written = os.pwritev(self.fd, [buffer], offset)
        else:
            written = os.pwrite(self.fd, data, offset)
        while written < len(data):
            written += os.pwrite(self.fd, data[written:], offset + written)
        if self.write_behind:
            self.write_behind.wrote(written)

    async def write_past_end(self, offset: int, data: bytes) -> None:
        await self.write(offset, data)
        self.size = max(self.size, offset + len(data))

    async def write_zeroes(self, offset: int, length: int, *, may_unmap: bool = False) -> None:
        mode = (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE) if may_unmap else FALLOC_FL_ZERO_RANGE
        if not self.is_device:
            try:
                fallocate(self.fd, mode, offset, length)
                return
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
        await super().write_zeroes(offset, length)

    async def discard(self, offset: int, length: int) -> None:
        if self.is_device:
            return
        try:
            fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise

    async def flush(self) -> None:
        os.fdatasync(self.fd)

    async def truncate(self, size: int, preallocation: str = "off") -> None:
        if preallocation not in ("off", "falloc", "full"):
            raise Unsupported(f"preallocation={preallocation} is not supported for files")
        old = self.size
        os.ftruncate(self.fd, size)
        preallocate(self.fd, old, size, preallocation)
        self.size = size

    async def block_status(self, offset: int, length: int) -> Extent:
        if self.is_device:
            return Extent(length, DATA)
        try:
            data_start = os.lseek(self.fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:       # only a hole up to the end
                return Extent(length, ZERO)
            return Extent(length, DATA)
        if data_start > offset:
            return Extent(min(length, data_start - offset), ZERO)
        hole_start = os.lseek(self.fd, offset, os.SEEK_HOLE)
        return Extent(min(length, max(hole_start - offset, 1)), DATA)

    def allocated_bytes(self) -> int | None:
        if self.fd < 0 or self.is_device:
            return None
        return os.fstat(self.fd).st_blocks * 512

    def info(self) -> dict[str, Any]:
        return {}

    # -- creation -----------------------------------------------------------------

    @classmethod
    async def create(cls, target: Any, size: int, options: dict[str, Any],
                     ctx: OpenContext) -> None:
        path = str(target)
        if path.startswith("file:"):
            path = path[5:]
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise from_oserror(exc) from None
        try:
            if stat.S_ISBLK(os.fstat(fd).st_mode):
                if os.lseek(fd, 0, os.SEEK_END) < size:
                    raise InvalidImage("the device is smaller than the requested size")
                return
            if ctx.locking != "off":
                locking.apply_locks(fd, *locking.wanted_perms(False, False))
            os.ftruncate(fd, 0)
            if options.get("nocow"):
                set_nocow(fd)
            os.ftruncate(fd, size)
            preallocate(fd, 0, size, options.get("preallocation") or "off")
        except ImgfsError:
            raise
        except OSError as exc:
            raise from_oserror(exc) from None
        finally:
            os.close(fd)


class HostDeviceDriver(FileDriver):
    """`host_device`: the same code; QEMU's name for block-device sources."""

    name = "host_device"
    description = "host block devices (/dev/sdX, /dev/loopN, /dev/cdrom)"


DRIVERS = [FileDriver, HostDeviceDriver]
