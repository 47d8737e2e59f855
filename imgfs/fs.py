"""The FUSE filesystem: each opened image as one flat raw file.

Two shapes: a directory mountpoint holding ``<name>.raw`` per image, or a
regular-file mountpoint that *is* the raw view (the root inode is a regular
file, as with ``qemu-storage-daemon --export type=fuse``).

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
from typing import Any, ParamSpec, TypeVar

import pyfuse3

from .errors import ImgfsError
from .node import Node

log = logging.getLogger("imgfs.fs")
T = TypeVar("T")
P = ParamSpec("P")
BLOCK = 4096


@dataclass
class Export:
    """One raw file of the mount."""

    name: str
    node: Node
    inode: int
    read_only: bool
    #: writes are made durable before they are acknowledged
    writethrough: bool = False
    mtime_ns: int = field(default_factory=time.time_ns)
    open_count: int = 0


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

    def __init__(self, exports: list[Export], *, file_mountpoint: bool,
                 uid: int, gid: int, umask: int) -> None:
        super().__init__()
        self.file_mountpoint = file_mountpoint
        self.by_inode = {export.inode: export for export in exports}
        self.by_name = {export.name.encode(): export for export in exports}
        self.uid, self.gid, self.umask = uid, gid, umask
        self.mount_time_ns = time.time_ns()
        #: set once the kernel's INIT handshake is answered
        self.initialized: Any = None
        #: --debug: log every read, write and fsync (checked once here so the
        #: hot path pays one attribute test)
        self.trace = log.isEnabledFor(logging.DEBUG)

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
        attr.st_size = export.node.size
        used = export.node.allocated_bytes()
        attr.st_blocks = -(-(export.node.size if used is None else used) // 512)
        attr.st_blksize = BLOCK
        attr.st_uid, attr.st_gid = self.uid, self.gid
        attr.st_atime_ns = attr.st_ctime_ns = self.mount_time_ns
        attr.st_mtime_ns = export.mtime_ns
        # The attributes change only through this mount, so let the kernel
        # keep them; st_blocks being a little stale is harmless.
        attr.attr_timeout = attr.entry_timeout = 1.0
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
        if fields.update_size and attr.st_size != export.node.size:
            if export.read_only:
                raise pyfuse3.FUSEError(errno.EROFS)
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
        return inode

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        exports = sorted(self.by_inode.values(), key=lambda export: export.inode)
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
        total = sum(export.node.size for export in self.by_inode.values())
        data.f_bsize = data.f_frsize = BLOCK
        data.f_blocks = -(-total // BLOCK)
        data.f_bfree = data.f_bavail = 0
        data.f_files = len(self.by_inode) + 1
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
        return pyfuse3.FileInfo(fh=inode, keep_cache=True, direct_io=writable)

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        node = self._export(fh).node
        if self.trace:
            log.debug("read %s %d+%d", node.filename, off, size)
        end = min(off + size, node.size)
        if off >= end:
            return b""
        return await node.read(off, end - off)

    @fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        export = self._export(fh)
        if export.read_only:
            raise pyfuse3.FUSEError(errno.EROFS)
        node = export.node
        if self.trace:
            log.debug("write %s %d+%d", node.filename, off, len(buf))
        if off + len(buf) > node.size:
            buf = await self._write_past_end(node, off, buf)
        await node.write(off, buf)
        if export.writethrough:
            await node.flush()
        export.mtime_ns = time.time_ns()
        return len(buf)

    async def _write_past_end(self, node: Node, off: int, buf: bytes) -> bytes:
        """A write past the end grows an image whose format can resize, as
        it would a file; any other refuses what lies past the end."""
        if node.driver.can_resize:
            await node.truncate(off + len(buf))
            return buf
        if off >= node.size:
            raise pyfuse3.FUSEError(errno.ENOSPC)
        return buf[:node.size - off]              # a short write, then ENOSPC

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
