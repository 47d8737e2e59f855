"""A thin ctypes binding of librados and librbd, Ceph's client libraries.

API: ceph/ceph ``src/include/rados/librados.h`` and
``src/include/rbd/librbd.h``.  ctypes rather than a compiled module: the
libraries load only when an rbd source is opened and nothing needs
building; Debian's python3-rbd works only for the system interpreter.

Data requests are librbd's aio calls with completions that have no
callback: librbd signals the image's eventfd (``rbd_set_image_notification``)
and hands the finished completions over in ``rbd_poll_io_events``, polled
on the trio thread by `ForeignCompletions` (shared with the gluster
driver), so no Python runs on librbd's threads.  Failures are negative
errnos.
"""
from __future__ import annotations

import ctypes
import functools
import math
import os
from collections.abc import Callable
from typing import Any

from imgfs.errors import Unsupported
from imgfs.foreign_io import ForeignCompletions, read_buffer

_P = ctypes.c_void_p
_U64 = ctypes.c_uint64


class SnapInfo(ctypes.Structure):
    """rbd_snap_info_t."""

    _fields_ = [("id", _U64), ("size", _U64), ("name", ctypes.c_char_p)]


_RADOS: dict[str, tuple[Any, list[Any]]] = {
    "rados_create2": (ctypes.c_int, [ctypes.POINTER(_P), ctypes.c_char_p, ctypes.c_char_p,
                                     _U64]),
    "rados_conf_read_file": (ctypes.c_int, [_P, ctypes.c_char_p]),
    "rados_conf_set": (ctypes.c_int, [_P, ctypes.c_char_p, ctypes.c_char_p]),
    "rados_connect": (ctypes.c_int, [_P]),
    "rados_shutdown": (None, [_P]),
    "rados_ioctx_create": (ctypes.c_int, [_P, ctypes.c_char_p, ctypes.POINTER(_P)]),
    "rados_ioctx_destroy": (None, [_P]),
    "rados_ioctx_set_namespace": (None, [_P, ctypes.c_char_p]),
}
_RBD: dict[str, tuple[Any, list[Any]]] = {
    "rbd_open": (ctypes.c_int, [_P, ctypes.c_char_p, ctypes.POINTER(_P), ctypes.c_char_p]),
    "rbd_open_read_only": (ctypes.c_int, [_P, ctypes.c_char_p, ctypes.POINTER(_P),
                                          ctypes.c_char_p]),
    "rbd_close": (ctypes.c_int, [_P]),
    "rbd_get_size": (ctypes.c_int, [_P, ctypes.POINTER(_U64)]),
    "rbd_resize": (ctypes.c_int, [_P, _U64]),
    "rbd_create": (ctypes.c_int, [_P, ctypes.c_char_p, _U64, ctypes.POINTER(ctypes.c_int)]),
    "rbd_snap_list": (ctypes.c_int, [_P, ctypes.POINTER(SnapInfo),
                                     ctypes.POINTER(ctypes.c_int)]),
    "rbd_snap_list_end": (None, [ctypes.POINTER(SnapInfo)]),
    # the callback is always NULL: completions are polled
    "rbd_aio_create_completion": (ctypes.c_int, [_P, _P, ctypes.POINTER(_P)]),
    "rbd_aio_get_return_value": (ctypes.c_ssize_t, [_P]),
    "rbd_aio_get_arg": (_P, [_P]),
    "rbd_set_image_notification": (ctypes.c_int, [_P, ctypes.c_int, ctypes.c_int]),
    "rbd_poll_io_events": (ctypes.c_int, [_P, ctypes.POINTER(_P), ctypes.c_int]),
    "rbd_aio_release": (None, [_P]),
    "rbd_aio_read": (ctypes.c_int, [_P, _U64, ctypes.c_size_t, _P, _P]),
    "rbd_aio_write": (ctypes.c_int, [_P, _U64, ctypes.c_size_t, _P, _P]),
    "rbd_aio_flush": (ctypes.c_int, [_P, _P]),
    "rbd_aio_discard": (ctypes.c_int, [_P, _U64, _U64, _P]),
    "rbd_aio_write_zeroes": (ctypes.c_int, [_P, _U64, ctypes.c_size_t, _P, ctypes.c_int,
                                            ctypes.c_int]),
}


def _load(name: str, prototypes: dict[str, tuple[Any, list[Any]]]) -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        raise Unsupported(f"rbd: {name} is not installed (Debian packages librbd1, "
                          "librados2)") from None
    for function_name, (result, arguments) in prototypes.items():
        function = getattr(lib, function_name)
        function.restype, function.argtypes = result, arguments
    return lib


@functools.cache
def rados() -> ctypes.CDLL:
    return _load("librados.so.2", _RADOS)


@functools.cache
def rbd() -> ctypes.CDLL:
    return _load("librbd.so.1", _RBD)


def check(result: int, what: str) -> int:
    """A librados / librbd result: negative errnos become OSError."""
    if result < 0:
        raise OSError(-result, f"{what}: {os.strerror(-result)}")
    return result


#: rbd_set_image_notification's type for an eventfd (librbd.h)
EVENT_TYPE_EVENTFD = 2
#: completions taken from librbd per rbd_poll_io_events call
POLL_BATCH = 32


class Cluster:
    """A connection to a Ceph cluster and an I/O context on one pool."""

    def __init__(self, handle: _P, ioctx: _P) -> None:
        self.handle, self.ioctx = handle, ioctx

    @classmethod
    def connect(cls, *, user: str | None, conf: str | None, settings: dict[str, str],
                pool: str, namespace: str | None) -> Cluster:
        """Blocking: read the configuration, connect, open the pool."""
        lib = rados()
        handle = _P()
        # Ceph's default user, as the rbd tool and QEMU take it
        name = f"client.{user or 'admin'}"
        check(lib.rados_create2(ctypes.byref(handle), b"ceph", name.encode(), 0),
              "rados_create2")
        try:
            # librbd's cache stays write-through until the first flush, for
            # guests that never flush; imgfs flushes whenever its file is
            # fsynced, as the rbd tool does, which sets the same.  An
            # option in the filename, set below, overrides it.
            check(lib.rados_conf_set(handle, b"rbd_cache_writethrough_until_flush", b"false"),
                  "Ceph option 'rbd_cache_writethrough_until_flush'")
            check(lib.rados_conf_read_file(handle, conf.encode() if conf else None),
                  "reading the Ceph configuration")
            for key, value in settings.items():
                check(lib.rados_conf_set(handle, key.encode(), value.encode()),
                      f"Ceph option '{key}'")
            check(lib.rados_connect(handle), "connecting to the cluster")
            ioctx = _P()
            check(lib.rados_ioctx_create(handle, pool.encode(), ctypes.byref(ioctx)),
                  f"opening pool '{pool}'")
        except BaseException:
            lib.rados_shutdown(handle)
            raise
        if namespace:
            lib.rados_ioctx_set_namespace(ioctx, namespace.encode())
        return cls(handle, ioctx)

    def open(self, image: str, snapshot: str | None, read_only: bool) -> Image:
        handle = _P()
        call = rbd().rbd_open_read_only if read_only else rbd().rbd_open
        check(call(self.ioctx, image.encode(), ctypes.byref(handle),
                   snapshot.encode() if snapshot else None), f"opening image '{image}'")
        try:
            return Image(handle)
        except BaseException:
            rbd().rbd_close(handle)
            raise

    def create(self, image: str, size: int) -> None:
        order = ctypes.c_int(0)
        check(rbd().rbd_create(self.ioctx, image.encode(), size, ctypes.byref(order)),
              f"creating image '{image}'")

    def close(self) -> None:
        rados().rados_ioctx_destroy(self.ioctx)
        rados().rados_shutdown(self.handle)


class Image:
    """An open RBD image (rbd_image_t)."""

    #: seconds a request may wait for an answer (then Unreachable)
    timeout: float = math.inf

    def __init__(self, handle: _P) -> None:
        self.handle = handle
        self.events = _Events(handle)
        try:
            self.completions = ForeignCompletions(self.events, spin=True)
        except BaseException:
            self.events.close()
            raise

    def size(self) -> int:
        size = _U64(0)
        check(rbd().rbd_get_size(self.handle, ctypes.byref(size)), "rbd_get_size")
        return size.value

    def resize(self, size: int) -> None:
        check(rbd().rbd_resize(self.handle, size), "resizing")

    def snapshots(self) -> list[tuple[str, int]]:
        """(name, size) of each snapshot."""
        count = ctypes.c_int(16)
        while True:
            infos = (SnapInfo * count.value)()
            result = rbd().rbd_snap_list(self.handle, infos, ctypes.byref(count))
            if result != -34:       # ERANGE: `count` now says how many
                break
        check(result, "listing snapshots")
        try:
            return [(infos[index].name.decode(), infos[index].size)
                    for index in range(result)]
        finally:
            rbd().rbd_snap_list_end(infos)

    def close(self) -> None:
        """Blocking: librbd finishes the requests in flight first.  Then
        (on the trio thread) `close_events()`."""
        rbd().rbd_close(self.handle)

    def close_events(self) -> None:
        """Once closed (librbd signals nothing more), on the trio thread."""
        self.completions.close()
        self.events.close()

    async def _aio(self, start: Callable[[_P], int], keep: Any = None) -> int:
        def begin(key: int) -> None:
            completion = _P()
            check(rbd().rbd_aio_create_completion(key, None, ctypes.byref(completion)),
                  "rbd_aio_create_completion")
            result = start(completion)
            if result < 0:
                rbd().rbd_aio_release(completion)
                check(result, "rbd aio")
        return await self.completions.run(begin, keep, self.timeout)

    async def read(self, offset: int, length: int) -> bytearray:
        buffer = read_buffer(length)
        view = (ctypes.c_char * length).from_buffer(buffer)
        done = await self._aio(lambda completion: rbd().rbd_aio_read(
            self.handle, offset, length, view, completion), view)
        if done != length:
            raise OSError(5, f"short read at offset {offset}: {done} of {length} bytes")
        return buffer

    async def write(self, offset: int, data: bytes) -> None:
        buffer = ctypes.c_char_p(data) if isinstance(data, bytes) else \
            (ctypes.c_char * len(data)).from_buffer_copy(data)
        await self._aio(lambda completion: rbd().rbd_aio_write(
            self.handle, offset, len(data), buffer, completion), (buffer, data))

    async def flush(self) -> None:
        await self._aio(lambda completion: rbd().rbd_aio_flush(self.handle, completion))

    async def discard(self, offset: int, length: int) -> None:
        await self._aio(lambda completion: rbd().rbd_aio_discard(
            self.handle, offset, length, completion))

    async def write_zeroes(self, offset: int, length: int) -> None:
        await self._aio(lambda completion: rbd().rbd_aio_write_zeroes(
            self.handle, offset, length, completion, 0, 0))


class _Events:
    """The image's completion notification: an eventfd librbd signals, and
    the completions it hands over (`CompletionEvents`)."""

    def __init__(self, image: _P) -> None:
        self.image = image
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.batch = (_P * POLL_BATCH)()
        try:
            check(rbd().rbd_set_image_notification(image, self.fd, EVENT_TYPE_EVENTFD),
                  "rbd_set_image_notification")
        except OSError:
            os.close(self.fd)
            raise

    def fileno(self) -> int:
        return self.fd

    def collect(self) -> list[tuple[int, int, int]]:
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            pass
        finished = []
        lib = rbd()
        while True:
            count = lib.rbd_poll_io_events(self.image, self.batch, POLL_BATCH)
            for completion in self.batch[:max(count, 0)]:
                result = lib.rbd_aio_get_return_value(completion)
                key = lib.rbd_aio_get_arg(completion) or 0
                lib.rbd_aio_release(completion)
                finished.append((key, -1, -result) if result < 0 else (key, result, 0))
            if count < POLL_BATCH:
                return finished

    def close(self) -> None:
        """Once rbd_close returned (nothing signals the descriptor any
        more)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
