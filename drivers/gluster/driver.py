"""The ``gluster`` protocol driver: a file on a GlusterFS volume.

Reads, writes, flushes, discards and zero-fills go to libgfapi's
asynchronous calls, many in flight at once; the blocking calls (connect,
open, seek, truncate, close) run on a worker thread with a time limit, so
a volume that stops answering gives EIO, never a hang.  Unmounting does not
wait for libgfapi's shutdown (glfs_fini), which takes seconds.
"""
from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import Any, TypeVar

import trio

from imgfs.block import DATA, ZERO, Extent, Kind
from imgfs.errors import (
    ImgfsError,
    NotFound,
    PermissionDenied,
    Unreachable,
    UsageError,
    from_oserror,
)
from imgfs.foreign_io import LibraryDriver, blocking_call
from imgfs.node import OpenContext
from imgfs.options import Int, Opt, Schema, Str, in_range

from . import gfapi
from .uri import Server, describe, parse_gluster_filename, parse_servers

T = TypeVar("T")

#: seconds a request may take before it fails with EIO
DEFAULT_TIMEOUT = 30
#: libgfapi's log level (QEMU's default: warnings and worse)
DEFAULT_DEBUG = 4
#: largest request handed to the library at once
MAX_TRANSFER = 1 << 20
#: reads longer than this go to the library one at a time: with a second
#: one in flight libgfapi maps fresh buffer pools for them (its pool keeps
#: only two buffers of 1 MiB) and unmaps them after, a page fault per
#: 4 KiB: twice the CPU per MiB, and no faster (bench/README.md)
LARGE_READ = 256 << 10
LARGE_READS_IN_FLIGHT = 1


class GlusterDriver(LibraryDriver):
    name = "gluster"
    kind = Kind.PROTOCOL
    read_only_message = "the file is read-only on the volume"
    description = "files on GlusterFS volumes (gluster://, gluster+unix://), through libgfapi"
    can_resize = True
    #: with the callback in C; one in Python would wait on libgfapi's
    #: thread for the GIL that the polling trio thread holds
    busy_poll = gfapi.CALLBACK_IN_C
    open_opts = Schema(
        Opt("volume", Str, help="the volume's name"),
        Opt("path", Str, help="the image's path in the volume"),
        Opt("server", parse_servers,
            help="servers tried in order: type=tcp with host and port, or type=unix "
                 "with socket"),
        Opt("debug", Int, default=DEFAULT_DEBUG, check=in_range(0, 9),
            help="libgfapi's log level, 0 (none) to 9 (trace)"),
        Opt("logfile", Str, default="/dev/null",
            help="where libgfapi logs ('-' for standard error)"),
        Opt("timeout", Int, default=DEFAULT_TIMEOUT, check=in_range(1, 3600),
            help="seconds after which a request that got no answer fails"),
        Opt("filename", Str, help="a gluster:// URI"),
    )
    create_opts = Schema(
        Opt("preallocation", Str, default="off", help="off only (as a sparse file)"),
    )

    volume: gfapi.Volume | None = None
    file: gfapi.File | None = None
    _large_reads: trio.Semaphore
    source = "gluster"
    timeout = DEFAULT_TIMEOUT

    @classmethod
    def parse_filename(cls, filename: str) -> dict[str, Any]:
        return parse_gluster_filename(filename)

    @classmethod
    def source_path(cls, filename: str) -> str:
        return str(parse_gluster_filename(filename)["path"])

    # -- life cycle -------------------------------------------------------------------

    async def open(self, options: dict[str, Any], ctx: OpenContext) -> None:
        target = _target(options)
        self.source = describe(target.volume, target.path, target.servers)
        self.timeout = options["timeout"]
        self.volume = await self._blocking(_connect, target, options)
        file, self.writable = await self._blocking(
            _open_file, self.volume, target, not ctx.read_only)
        file.timeout = self.timeout
        self.file = file
        self.size = await self._blocking(file.seek, 0, os.SEEK_END)
        self.max_transfer = MAX_TRANSFER
        self._large_reads = trio.Semaphore(LARGE_READS_IN_FLIGHT)
        self.read_only_reason = "the file cannot be written on the volume; use -o ro"

    async def aclose(self) -> None:
        file, volume, self.file, self.volume = self.file, self.volume, None, None
        try:
            if file is not None:
                await self._blocking(file.close)
        finally:
            if volume is not None:
                volume.release()

    async def _blocking(self, call: Callable[..., T], *arguments: Any) -> T:
        return await blocking_call(self.timeout, call, *arguments)

    async def read(self, offset: int, length: int) -> bytes:
        if length <= LARGE_READ:
            return await super().read(offset, length)
        # the wait for a turn counts in the request's timeout
        with trio.move_on_after(self.timeout):
            async with self._large_reads:
                return await super().read(offset, length)
        raise Unreachable(f"no answer within {self.timeout:g} s")

    def handle(self) -> gfapi.File:
        if self.file is None:
            raise Unreachable("not connected to the volume")
        return self.file

    async def truncate(self, size: int, preallocation: str = "off") -> None:
        if preallocation != "off":
            raise UsageError(f"gluster: preallocation={preallocation} is not supported")
        await self._blocking(self.handle().truncate, size)
        self.size = size

    async def block_status(self, offset: int, length: int) -> Extent:
        """Holes and data from SEEK_HOLE / SEEK_DATA, as on a local file."""
        try:
            data_start = await self._blocking(self.handle().seek, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:       # only a hole up to the end
                return Extent(length, ZERO)
            return Extent(length, DATA)
        if data_start > offset:
            return Extent(min(length, data_start - offset), ZERO)
        hole_start = await self._blocking(self.handle().seek, offset, os.SEEK_HOLE)
        return Extent(min(length, max(hole_start - offset, 1)), DATA)

    def info(self) -> dict[str, Any]:
        return {}

    # -- creation -----------------------------------------------------------------

    @classmethod
    async def create(cls, target: Any, size: int, options: dict[str, Any],
                     ctx: OpenContext) -> None:
        if (options.get("preallocation") or "off") != "off":
            raise UsageError("gluster: only preallocation=off is supported")
        given = parse_gluster_filename(str(target)) if isinstance(target, str) else target
        driver = cls()
        parsed = cls.open_opts.parse(given, what="gluster")
        location = _target(parsed)
        driver.source = describe(location.volume, location.path, location.servers)
        driver.timeout = parsed["timeout"]
        driver.volume = await driver._blocking(_connect, location, parsed)
        try:
            driver.file = await driver._blocking(
                driver.volume.create, location.path,
                os.O_RDWR | os.O_CREAT | os.O_TRUNC)
            driver.file.timeout = driver.timeout
            await driver._blocking(driver.file.truncate, size)
            await driver.file.flush()
        finally:
            await driver.aclose()


class _Target:
    def __init__(self, volume: str, path: str, servers: tuple[Server, ...]) -> None:
        self.volume, self.path, self.servers = volume, path, servers


def _target(options: dict[str, Any]) -> _Target:
    volume, path, servers = options.get("volume"), options.get("path"), options.get("server")
    if not volume or not path or not servers:
        raise UsageError("gluster: needs 'volume', 'path' and 'server' "
                         "(or a gluster:// URI)")
    return _Target(volume, "/" + path.lstrip("/"), servers)


def _connect(target: _Target, options: dict[str, Any]) -> gfapi.Volume:
    logfile = options["logfile"]
    servers = [(server.transport, server.host, server.port) for server in target.servers]
    try:
        return gfapi.Volume.connect(target.volume, servers, logfile, options["debug"])
    except OSError as exc:
        raise _refused(target, exc, "volume") from None


def _open_file(volume: gfapi.Volume, target: _Target,
               writable: bool) -> tuple[gfapi.File, bool]:
    """The file read-write when wanted and allowed, else read-only."""
    try:
        if writable:
            try:
                return volume.open(target.path, os.O_RDWR), True
            except OSError as exc:
                if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                    raise
        return volume.open(target.path, os.O_RDONLY), False
    except OSError as exc:
        raise _refused(target, exc, "file") from None


def _refused(target: _Target, exc: OSError, what: str) -> ImgfsError:
    """Why the volume (connecting) or the file (opening) was refused; the
    core puts the source's name before the message."""
    if exc.errno == errno.ENOENT:
        return NotFound(f"no volume '{target.volume}' on the server" if what == "volume"
                        else f"no file '{target.path}' on volume '{target.volume}'")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return PermissionDenied(f"access to the {what} refused")
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    if what == "file":
        return from_oserror(exc, f"{target.path} on volume '{target.volume}'")
    servers = ", ".join(str(server) for server in target.servers)
    return Unreachable(f"cannot reach the volume's server ({servers}): {reason}")


DRIVERS = [GlusterDriver]
