"""Floor for gluster: small reads straight to libgfapi (bench/floors/README.md).

Two loops, chosen by IMGFS_FLOOR_WAIT:

* ``async`` (the default): glfs_pread_async into a buffer, the callback (on
  libgfapi's thread) stores the result and signals an eventfd; the trio
  thread waits for that descriptor.  The least any driver that keeps many
  requests in flight can do per request.
* ``sync``: glfs_pread called on the trio thread, which blocks until the
  answer: no thread hop on imgfs's side at all, one request at a time.

Both reuse the driver's open file (`GlusterDriver.handle()`, its `fd`).
"""
from __future__ import annotations

import ctypes
import os
from typing import Any

import trio
from imgfs.drivers.gluster import gfapi
from imgfs.drivers.gluster.driver import GlusterDriver

from imgfs.foreign_io import keep_thread_state

#: reads above this go through imgfs's own path
SMALL = 64 << 10


def install() -> None:
    mode = os.environ.get("IMGFS_FLOOR_WAIT", "async")
    if mode not in ("async", "sync"):
        raise SystemExit(f"floor gluster: IMGFS_FLOOR_WAIT={mode}: async or sync")
    original = GlusterDriver.read
    small_read = _sync_reader() if mode == "sync" else _async_reader()

    async def read(self: GlusterDriver, offset: int, length: int) -> bytes:
        if length > SMALL:
            return await original(self, offset, length)
        return await small_read(self.handle().fd, offset, length)

    GlusterDriver.read = read  # type: ignore[method-assign]


def _sync_reader() -> Any:
    pread = gfapi.library().glfs_pread
    pread.restype = ctypes.c_ssize_t
    pread.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64,
                      ctypes.c_int, ctypes.c_void_p]

    async def small_read(fd: int, offset: int, length: int) -> bytes:
        buffer = ctypes.create_string_buffer(length)
        if pread(fd, buffer, length, offset, 0, None) != length:
            raise OSError(5, "short read")
        return buffer.raw
    return small_read


def _async_reader() -> Any:
    event = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    results: list[int] = []

    def on_complete(fd: Any, result: int, pre: Any, post: Any, key: Any) -> None:
        keep_thread_state()
        results.append(result)
        os.eventfd_write(event, 1)

    callback = gfapi.IoCallback(on_complete)
    start = gfapi.library().glfs_pread_async

    async def small_read(fd: int, offset: int, length: int) -> bytes:
        buffer = ctypes.create_string_buffer(length)
        if start(fd, buffer, length, offset, 0, callback, None):
            raise OSError(5, "glfs_pread_async refused")
        while not results:
            await trio.lowlevel.wait_readable(event)
            try:
                os.eventfd_read(event)
            except BlockingIOError:
                pass
        if results.pop() != length:
            raise OSError(5, "short read")
        return buffer.raw
    small_read.keep = callback  # type: ignore[attr-defined]
    return small_read
