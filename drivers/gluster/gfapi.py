"""A thin ctypes binding of libgfapi, GlusterFS's client library.

API: gluster/glusterfs ``api/src/glfs.h`` (Gluster >= 6 signatures: the
synchronous calls take pre/post ``glfs_stat`` pointers, NULL here; the
``*_async`` callbacks get them too).  ctypes rather than a compiled
module: the library is loaded only when a gluster source is opened, and
nothing needs building.  The PyPI ``gfapi`` binding fails on Python >= 3.10
and on Gluster >= 6 signatures.

Data requests use the asynchronous calls: libgfapi completes them on its
own threads: the callback (in C, _completions.c, where it could be built)
queues the result and `ForeignCompletions` hands it to the trio task that
waits.
"""
from __future__ import annotations

import ctypes
import functools
import math
import os
import threading
from collections.abc import Callable
from typing import Any, cast

from imgfs.errors import Unsupported
from imgfs.foreign_io import CompletionEvents, ForeignCompletions, QueuedCompletions, read_buffer

LIBRARY = "libgfapi.so.0"

_P = ctypes.c_void_p
_OFF = ctypes.c_int64
#: void (*glfs_io_cbk)(glfs_fd_t *, ssize_t ret, struct glfs_stat *pre,
#:                     struct glfs_stat *post, void *data)
IoCallback = ctypes.CFUNCTYPE(None, _P, ctypes.c_ssize_t, _P, _P, _P, use_errno=True)

#: name -> (result type, argument types)
_PROTOTYPES: dict[str, tuple[Any, list[Any]]] = {
    "glfs_new": (_P, [ctypes.c_char_p]),
    "glfs_set_volfile_server": (ctypes.c_int, [_P, ctypes.c_char_p, ctypes.c_char_p,
                                               ctypes.c_int]),
    "glfs_set_logging": (ctypes.c_int, [_P, ctypes.c_char_p, ctypes.c_int]),
    "glfs_init": (ctypes.c_int, [_P]),
    "glfs_fini": (ctypes.c_int, [_P]),
    "glfs_open": (_P, [_P, ctypes.c_char_p, ctypes.c_int]),
    "glfs_creat": (_P, [_P, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint]),
    "glfs_close": (ctypes.c_int, [_P]),
    "glfs_lseek": (_OFF, [_P, _OFF, ctypes.c_int]),
    "glfs_ftruncate": (ctypes.c_int, [_P, _OFF, _P, _P]),
    "glfs_pread_async": (ctypes.c_int, [_P, _P, ctypes.c_size_t, _OFF, ctypes.c_int,
                                        IoCallback, _P]),
    "glfs_pwrite_async": (ctypes.c_int, [_P, _P, ctypes.c_int, _OFF, ctypes.c_int,
                                         IoCallback, _P]),
    "glfs_fsync_async": (ctypes.c_int, [_P, IoCallback, _P]),
    "glfs_discard_async": (ctypes.c_int, [_P, _OFF, ctypes.c_size_t, IoCallback, _P]),
    "glfs_zerofill_async": (ctypes.c_int, [_P, _OFF, _OFF, IoCallback, _P]),
}


@functools.cache
def library() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(LIBRARY, use_errno=True)
    except OSError:
        raise Unsupported("gluster: libgfapi is not installed "
                          "(Debian package libgfapi0)") from None
    for name, (result, arguments) in _PROTOTYPES.items():
        function = getattr(lib, name)
        function.restype, function.argtypes = result, arguments
    return lib


def _failed(what: str) -> OSError:
    error = ctypes.get_errno() or 5       # EIO when the library set none
    return OSError(error, f"{what}: {os.strerror(error)}")


def _python_callback() -> tuple[CompletionEvents, Any]:
    """Without the compiled module: a callback in Python, which takes the
    GIL on libgfapi's thread for every completion."""
    finished = QueuedCompletions()

    def on_complete(fd: Any, result: int, prestat: Any, poststat: Any, key: Any) -> None:
        finished.report(key or 0, result, ctypes.get_errno())
    return finished, IoCallback(on_complete)


try:
    from . import _completions
    #: what the callback reports, for every asynchronous request of the
    #: process, and the callback (kept for the life of the process:
    #: libgfapi may call it at any time)
    _FINISHED, _CALLBACK = cast(CompletionEvents, _completions), \
        IoCallback(_completions.callback())
    #: no Python runs on libgfapi's threads (GlusterDriver.busy_poll)
    CALLBACK_IN_C = True
except ImportError:                 # built without a C compiler
    _FINISHED, _CALLBACK = _python_callback()
    CALLBACK_IN_C = False
_COMPLETIONS = ForeignCompletions(_FINISHED, spin=CALLBACK_IN_C)


class Volume:
    """One connection to a volume (libgfapi's 'virtual mount', glfs_t)."""

    def __init__(self, handle: int) -> None:
        self.handle = handle

    @classmethod
    def connect(cls, volume: str, servers: list[tuple[str, str, int]],
                logfile: str, debug: int) -> Volume:
        """Blocking: fetch the volume's configuration from the first server
        that answers and connect to its bricks."""
        lib = library()
        handle = lib.glfs_new(volume.encode())
        if not handle:
            raise _failed("glfs_new")
        for transport, host, port in servers:
            if lib.glfs_set_volfile_server(handle, transport.encode(), host.encode(), port):
                raise _failed("glfs_set_volfile_server")
        lib.glfs_set_logging(handle, logfile.encode(), debug)
        if lib.glfs_init(handle):
            error = _failed("glfs_init")
            cls(handle).release()
            raise error
        return cls(handle)

    def open(self, path: str, flags: int) -> File:
        fd = library().glfs_open(self.handle, path.encode(), flags | os.O_CLOEXEC)
        if not fd:
            raise _failed("open")
        return File(fd)

    def create(self, path: str, flags: int, mode: int = 0o644) -> File:
        fd = library().glfs_creat(self.handle, path.encode(), flags | os.O_CLOEXEC, mode)
        if not fd:
            raise _failed("create")
        return File(fd)

    def release(self) -> None:
        """Shut the connection down without waiting: glfs_fini takes
        seconds, so it runs on a thread that does not keep the process."""
        threading.Thread(target=library().glfs_fini, args=(self.handle,),
                         name="glfs_fini", daemon=True).start()


class File:
    """An open file of a volume (glfs_fd_t)."""

    #: seconds a request may wait for an answer (then Unreachable)
    timeout: float = math.inf

    def __init__(self, fd: int) -> None:
        self.fd = fd
        # looked up once: reads are the requests that come one at a time
        self._pread_async = library().glfs_pread_async

    def _async(self, what: str, call: Callable[..., int], *arguments: Any) -> Callable[[int], None]:
        def start(key: int) -> None:
            if call(self.fd, *arguments, _CALLBACK, key):
                raise _failed(what)
        return start

    async def read(self, offset: int, length: int) -> bytearray:
        buffer = read_buffer(length)
        view = (ctypes.c_char * length).from_buffer(buffer)
        fd, pread_async = self.fd, self._pread_async

        def start(key: int) -> None:
            if pread_async(fd, view, length, offset, 0, _CALLBACK, key):
                raise _failed("read")
        done = await _COMPLETIONS.run(start, view, self.timeout)
        if done != length:
            raise OSError(5, f"short read at offset {offset}: {done} of {length} bytes")
        return buffer

    async def write(self, offset: int, data: bytes) -> None:
        buffer = (ctypes.c_char * len(data)).from_buffer_copy(data) \
            if not isinstance(data, bytes) else ctypes.c_char_p(data)
        done = await _COMPLETIONS.run(
            self._async("write", library().glfs_pwrite_async, buffer, len(data), offset, 0),
            (buffer, data), self.timeout)
        if done != len(data):
            raise OSError(5, f"short write at offset {offset}: {done} of {len(data)} bytes")

    async def flush(self) -> None:
        """fsync of the file."""
        await _COMPLETIONS.run(self._async("fsync", library().glfs_fsync_async),
                               timeout=self.timeout)

    async def discard(self, offset: int, length: int) -> None:
        await _COMPLETIONS.run(self._async("discard", library().glfs_discard_async,
                                           offset, length), timeout=self.timeout)

    async def write_zeroes(self, offset: int, length: int) -> None:
        """glfs_zerofill."""
        await _COMPLETIONS.run(self._async("zerofill", library().glfs_zerofill_async,
                                           offset, length), timeout=self.timeout)

    def truncate(self, size: int) -> None:
        if library().glfs_ftruncate(self.fd, size, None, None):
            raise _failed("truncate")

    def seek(self, offset: int, whence: int) -> int:
        """glfs_lseek: SEEK_END for the size, SEEK_DATA / SEEK_HOLE."""
        position = library().glfs_lseek(self.fd, offset, whence)
        if position < 0:
            raise _failed("seek")
        return int(position)

    def close(self) -> None:
        library().glfs_close(self.fd)
