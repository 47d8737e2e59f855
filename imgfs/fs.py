"""The FUSE filesystem: each opened image as one flat raw file.

Two shapes: a directory mountpoint holding ``<name>.raw`` per image, or a
regular-file mountpoint that *is* the raw view (the root inode is a regular
file, as with ``qemu-storage-daemon --export type=fuse``).

The files come from `FileSource`s: the images, and the extra files beside
them (each internal snapshot, each partition).  A file is a `View`: a node,
or a window of one (a partition is a window of its disk's node, so writes
through either are one set of writes to one node).  Sources that can change
(a partition table rewritten through the disk's file) are listed again at
each open and lookup of the directory.

Errors are translated here and only here: an `ImgfsError` becomes
``FUSEError(exc.errno)`` for that one request; anything unexpected is logged
and answered with EIO; the mount stays up either way.
"""
from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, ParamSpec, Protocol, TypeVar

import pyfuse3
import trio

from .errors import ImgfsError
from .node import Node
from .partitions import Table, read_table
from .spin import Awake

log = logging.getLogger("imgfs.fs")
T = TypeVar("T")
P = ParamSpec("P")
BLOCK = 4096


@dataclass(frozen=True)
class View:
    """A file the mount shows: a node, or a window of one (a partition)."""

    name: str
    node: Node
    read_only: bool
    #: the window: `length` bytes from `offset` (None: to the node's end)
    offset: int = 0
    length: int | None = None
    #: another file of the mount shows some of the same bytes: opens bypass
    #: the kernel's page cache, so that a write through one file is read
    #: back through the other (the kernel only drops the written file's pages)
    shared: bool = False


class FileSource(Protocol):
    """Where the files of a mount come from: the images themselves, and the
    extra files beside them (``-o snapshots``, ``-o partitions``)."""

    #: True when `files` may change while mounted: it is asked again at each
    #: open and lookup of the mount's directory
    dynamic: bool

    async def files(self) -> list[View]: ...


@dataclass
class StaticFiles:
    """Files fixed at mount time."""

    views: list[View]
    dynamic: bool = False

    async def files(self) -> list[View]:
        return self.views


class PartitionFiles:
    """``-o partitions``: each partition of a disk as ``<stem>-p<N>.raw``, a
    window of the disk's own node (no second cache to keep coherent).  The
    table is read again at each open and lookup of the directory, so a table
    changed through the disk's file shows at the next ``ls``."""

    dynamic = True

    def __init__(self, stem: str, node: Node) -> None:
        self.stem, self.node = stem, node
        self.reported: tuple[str, ...] | None = None

    async def files(self) -> list[View]:
        try:
            table = await read_table(self.node.read, self.node.size, self.node.sector_size)
        except ImgfsError as exc:
            table = Table("none", (), (f"cannot read the partition table ({exc})",))
        if table.warnings != self.reported:
            for warning in table.warnings:
                log.warning("%s: %s", self.node.filename, warning)
            self.reported = table.warnings
        return [View(f"{self.stem}-p{part.number}.raw", self.node, self.node.read_only,
                     offset=part.start, length=part.length, shared=True)
                for part in table.partitions]


@dataclass
class Export:
    """One raw file of the mount."""

    view: View
    inode: int
    #: writes are made durable before they are acknowledged
    writethrough: bool = False
    mtime_ns: int = field(default_factory=time.time_ns)
    open_count: int = 0

    @property
    def name(self) -> str:
        return self.view.name

    @property
    def node(self) -> Node:
        return self.view.node

    @property
    def read_only(self) -> bool:
        return self.view.read_only

    @property
    def offset(self) -> int:
        return self.view.offset

    @property
    def size(self) -> int:
        view = self.view
        return view.node.size - view.offset if view.length is None else view.length


def fuse_errors(handler: Callable[P, Coroutine[Any, Any, T]]
                ) -> Callable[P, Coroutine[Any, Any, T]]:
    """The one place where exceptions become errnos for the kernel."""
    @functools.wraps(handler)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await handler(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except ImgfsError as exc:
            log.warning("%s: %s", handler.__name__, exc)
            raise pyfuse3.FUSEError(exc.errno) from None
        except Exception:
            log.exception("unexpected error in %s", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None
    return wrapper


class ImageFS(pyfuse3.Operations):
    """Operations for a mount of one or more images."""

    # No kernel write cache: every open for writing is a direct one (see
    # open), so the kernel would have nothing to cache.
    enable_writeback_cache = False

    def __init__(self, sources: list[FileSource], *, file_mountpoint: bool,
                 uid: int, gid: int, umask: int, writethrough: bool = False) -> None:
        super().__init__()
        self.file_mountpoint = file_mountpoint
        self.sources = sources
        self.writethrough = writethrough
        #: every export a handle or the kernel may still name, current or not
        self.by_inode: dict[int, Export] = {}
        #: the files the directory shows now
        self.by_name: dict[bytes, Export] = {}
        self._next_inode = pyfuse3.ROOT_INODE if file_mountpoint else pyfuse3.ROOT_INODE + 1
        self._refresh_lock = trio.Lock()
        self.uid, self.gid, self.umask = uid, gid, umask
        self.mount_time_ns = time.time_ns()
        #: set once the kernel's INIT handshake is answered
        self.initialized: Any = None
        #: --debug: log every read, write and fsync (checked once here so the
        #: hot path pays one attribute test)
        self.trace = log.isEnabledFor(logging.DEBUG)
        #: around every read and write; the mount runs it
        #: when its sources gain from busy polling (BlockDriver.busy_poll)
        self.awake = Awake()

    async def refresh(self, *, dynamic_only: bool = False) -> None:
        """List every source's files again (a partition table may have
        changed).  A file whose view is unchanged keeps its inode; one that
        disappeared stays reachable by inode while it is open."""
        if dynamic_only and not any(source.dynamic for source in self.sources):
            return
        async with self._refresh_lock:
            by_view = {export.view: export for export in self.by_inode.values()}
            current: dict[bytes, Export] = {}
            for source in self.sources:
                for view in await source.files():
                    export = by_view.get(view) or self._new_export(view)
                    current.setdefault(view.name.encode(), export)
            self.by_name = current
            for export in list(self.by_inode.values()):
                self._forget_if_stale(export)

    def _new_export(self, view: View) -> Export:
        export = Export(view=view, inode=self._next_inode, writethrough=self.writethrough)
        self._next_inode += 1
        self.by_inode[export.inode] = export
        return export

    def _forget_if_stale(self, export: Export) -> None:
        if export.open_count == 0 and self.by_name.get(export.name.encode()) is not export:
            del self.by_inode[export.inode]

    def init(self) -> None:
        # Called by pyfuse3 just before it answers the kernel's INIT; the
        # mount (serve) waits for this to know the session is live.
        if self.initialized is not None:
            self.initialized.set()

    # -- attributes -------------------------------------------------------------

    def _export(self, inode: int) -> Export:
        export = self.by_inode.get(inode)
        if export is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return export

    def _file_attr(self, export: Export) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        mode = 0o444 if export.read_only else 0o644
        attr.st_ino = export.inode
        attr.st_mode = stat.S_IFREG | (mode & ~self.umask)
        attr.st_nlink = 1
        attr.st_size = size = export.size
        # a window's share of its node's allocation is not known: count it whole
        used = export.node.allocated_bytes() if export.view.length is None else None
        attr.st_blocks = -(-(size if used is None else used) // 512)
        attr.st_blksize = BLOCK
        attr.st_uid, attr.st_gid = self.uid, self.gid
        attr.st_atime_ns = attr.st_ctime_ns = self.mount_time_ns
        attr.st_mtime_ns = export.mtime_ns
        # The attributes change only through this mount, so let the kernel
        # keep them; st_blocks being a little stale is harmless.
        attr.attr_timeout = attr.entry_timeout = 1.0
        if export.view.length is not None:
            # a partition's name may go or name another range once the table
            # changes: look it up again each time (which re-reads the table)
            attr.entry_timeout = 0
        return attr

    def _root_attr(self) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = pyfuse3.ROOT_INODE
        attr.st_mode = stat.S_IFDIR | (0o755 & ~self.umask)
        attr.st_nlink = 2
        attr.st_uid, attr.st_gid = self.uid, self.gid
        attr.st_atime_ns = attr.st_ctime_ns = attr.st_mtime_ns = self.mount_time_ns
        attr.st_blksize = BLOCK
        attr.attr_timeout = attr.entry_timeout = 60.0
        return attr

    @fuse_errors
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        if inode == pyfuse3.ROOT_INODE and not self.file_mountpoint:
            return self._root_attr()
        return self._file_attr(self._export(inode))

    @fuse_errors
    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: Any = None) -> pyfuse3.EntryAttributes:
        if parent_inode != pyfuse3.ROOT_INODE or self.file_mountpoint:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if name in (b".", b".."):
            return self._root_attr()
        await self.refresh(dynamic_only=True)
        export = self.by_name.get(name)
        if export is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._file_attr(export)

    @fuse_errors
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: Any) -> pyfuse3.EntryAttributes:
        if inode == pyfuse3.ROOT_INODE and not self.file_mountpoint:
            raise pyfuse3.FUSEError(errno.EPERM)
        export = self._export(inode)
        if fields.update_size and attr.st_size != export.size:
            if export.read_only:
                raise pyfuse3.FUSEError(errno.EROFS)
            if export.view.length is not None:
                # a partition's size is the partition table's to change
                raise pyfuse3.FUSEError(errno.EINVAL)
            # Only formats that can resize accept a truncate; the others
            # answer EOPNOTSUPP ("Operation not supported") rather than
            # pretending.
            await export.node.truncate(attr.st_size)
            export.mtime_ns = time.time_ns()
        if fields.update_mtime:
            export.mtime_ns = attr.st_mtime_ns
        return self._file_attr(export)

    # -- directory ----------------------------------------------------------------

    @fuse_errors
    async def opendir(self, inode: int, ctx: Any) -> int:
        if inode != pyfuse3.ROOT_INODE or self.file_mountpoint:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        await self.refresh(dynamic_only=True)
        return inode

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        exports = sorted(self.by_name.values(), key=lambda export: export.inode)
        for index, export in enumerate(exports):
            if index < start_id:
                continue
            if not pyfuse3.readdir_reply(token, export.name.encode(),
                                         self._file_attr(export), index + 1):
                break

    async def releasedir(self, fh: int) -> None:
        pass

    @fuse_errors
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        # partitions are counted in their disk already
        total = sum(export.size for export in self.by_name.values()
                    if export.view.length is None)
        data.f_bsize = data.f_frsize = BLOCK
        data.f_blocks = -(-total // BLOCK)
        data.f_bfree = data.f_bavail = 0
        data.f_files = len(self.by_name) + 1
        data.f_ffree = data.f_favail = 0
        data.f_namemax = 255
        return data

    # -- files ----------------------------------------------------------------------

    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        export = self._export(inode)
        writable = flags & os.O_ACCMODE != os.O_RDONLY
        if export.read_only and writable:
            raise pyfuse3.FUSEError(errno.EROFS)
        export.open_count += 1
        # A read-only open goes through the kernel's page cache: read-ahead
        # turns sequential reads into 1 MiB requests, and since only this
        # mount changes the image (locks keep other writers out), cached
        # pages are kept from one open to the next.
        #
        # An open for writing bypasses it (FOPEN_DIRECT_IO, as qemu-storage-
        # daemon's export does): each write(2) reaches us as it is, so its
        # error (EIO from a server, ENOSPC from an image that cannot grow)
        # is that write(2)'s and not a later fsync's, nothing is held twice
        # (in the FUSE page cache and in the host's), and the writer does not
        # copy into the FUSE cache 4 KiB page by page, which was the whole
        # cost of a sequential write; the price is 4 KiB random writes, which
        # that cache absorbed and which now each make a request (figures:
        # bench/README.md).  The kernel drops cached pages
        # of a range written this way, so read-only opens stay coherent.
        # mmap(MAP_SHARED) of a writable open fails with ENODEV.
        #
        # A file that shares its bytes with another file of the mount (a
        # partition and its disk) bypasses the page cache for reads too.
        shared = export.view.shared
        return pyfuse3.FileInfo(fh=inode, keep_cache=not shared, direct_io=writable or shared)

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        export = self._export(fh)
        node = export.node
        if self.trace:
            log.debug("read %s %d+%d", export.name, off, size)
        end = min(off + size, export.size)
        if off >= end:
            return b""
        with self.awake.around(export.offset + off, end - off):
            return await node.read(export.offset + off, end - off)

    @fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        export = self._export(fh)
        if export.read_only:
            raise pyfuse3.FUSEError(errno.EROFS)
        node = export.node
        if self.trace:
            log.debug("write %s %d+%d", export.name, off, len(buf))
        with self.awake.around(export.offset + off, len(buf)):
            if off + len(buf) > export.size:
                buf = await self._write_past_end(export, off, buf)
            await node.write(export.offset + off, buf)
            if export.writethrough:
                await node.flush()
        export.mtime_ns = time.time_ns()
        return len(buf)

    async def _write_past_end(self, export: Export, off: int, buf: bytes) -> bytes:
        """A write past the end grows an image whose format can resize, as
        it would a file; any other (and any partition) refuses what lies
        past the end."""
        node = export.node
        if node.driver.can_resize and export.view.length is None:
            await node.truncate(off + len(buf))
            return buf
        if off >= export.size:
            raise pyfuse3.FUSEError(errno.ENOSPC)
        return buf[:export.size - off]            # a short write, then ENOSPC

    @fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        export = self._export(fh)
        if self.trace:
            log.debug("fsync %s", export.node.filename)
        if not export.read_only:
            await export.node.flush()

    async def flush(self, fh: int) -> None:
        # close(2): nothing to do, durability is fsync's job (as for files)
        pass

    @fuse_errors
    async def release(self, fh: int) -> None:
        export = self._export(fh)
        export.open_count -= 1
        self._forget_if_stale(export)
