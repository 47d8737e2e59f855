"""Floor for rbd: small reads straight to librbd (bench/floors/README.md).

Two loops, chosen by IMGFS_FLOOR_WAIT:

* ``async`` (the default): rbd_aio_read with a completion that has no
  callback; librbd signals the image's eventfd (the one the driver set with
  rbd_set_image_notification), the trio thread waits for it and takes the
  completion with rbd_poll_io_events.  No Python on librbd's threads.
* ``sync``: rbd_read called on the trio thread, which blocks until the
  answer: one request at a time.

Both reuse the driver's open image (`RbdDriver.handle()`: its `handle`
and `events`).
"""
from __future__ import annotations

import ctypes
import os

import trio
from imgfs.drivers.rbd import librbd
from imgfs.drivers.rbd.driver import RbdDriver

#: reads above this go through imgfs's own path
SMALL = 64 << 10


def install() -> None:
    mode = os.environ.get("IMGFS_FLOOR_WAIT", "async")
    if mode not in ("async", "sync"):
        raise SystemExit(f"floor rbd: IMGFS_FLOOR_WAIT={mode}: async or sync")
    original = RbdDriver.read
    small_read = _sync_read if mode == "sync" else _async_read

    async def read(self: RbdDriver, offset: int, length: int) -> bytes:
        if length > SMALL:
            return await original(self, offset, length)
        return await small_read(self.handle(), offset, length)

    RbdDriver.read = read  # type: ignore[method-assign]


def _library() -> ctypes.CDLL:
    lib = librbd.rbd()
    lib.rbd_read.restype = ctypes.c_ssize_t
    lib.rbd_read.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t,
                             ctypes.c_void_p]
    return lib


async def _sync_read(image: librbd.Image, offset: int, length: int) -> bytes:
    buffer = ctypes.create_string_buffer(length)
    if _LIB.rbd_read(image.handle, offset, length, buffer) != length:
        raise OSError(5, "short read")
    return buffer.raw


_LIB = _library()
_ONE = (ctypes.c_void_p * 1)()


async def _async_read(image: librbd.Image, offset: int, length: int) -> bytes:
    lib = _LIB
    buffer = ctypes.create_string_buffer(length)
    completion = ctypes.c_void_p()
    lib.rbd_aio_create_completion(None, None, ctypes.byref(completion))
    if lib.rbd_aio_read(image.handle, offset, length, buffer, completion) < 0:
        lib.rbd_aio_release(completion)
        raise OSError(5, "rbd_aio_read refused")
    event = image.events.fileno()
    while lib.rbd_poll_io_events(image.handle, _ONE, 1) < 1:
        await trio.lowlevel.wait_readable(event)
        try:
            os.eventfd_read(event)
        except BlockingIOError:
            pass
    result = lib.rbd_aio_get_return_value(completion)
    lib.rbd_aio_release(completion)
    if result != length:
        raise OSError(5, "short read")
    return buffer.raw
