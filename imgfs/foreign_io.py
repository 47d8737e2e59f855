"""Requests that a C library completes on its own threads (libgfapi's
``*_async`` calls, librbd's aio completions), awaited from trio, and
`LibraryDriver`, the I/O of a protocol driver built on such a library.

The library calls a callback on one of its threads with a key the request
was started with; `ForeignCompletions.complete` hands the result to the
trio task waiting for it through the run's token, so many requests are in
flight at once without a thread per request.  Buffers the library reads
or fills stay referenced until it has completed the request, even when the
waiting task was cancelled.
"""
from __future__ import annotations

import errno
import itertools
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, TypeVar, cast

import trio

from .block import BlockDriver
from .errors import ReadOnly, Unreachable

T = TypeVar("T")


@dataclass
class _Pending:
    token: trio.lowlevel.TrioToken
    done: trio.Event
    #: what the library may still touch (buffers) until it completes
    keep: Any
    result: int = 0
    error: int = 0


class ForeignCompletions:
    """The requests under way in one library handle."""

    def __init__(self) -> None:
        self._pending: dict[int, _Pending] = {}
        self._keys = itertools.count(1)

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    async def run(self, start: Callable[[int], None], keep: Any = None) -> int:
        """Start a request with ``start(key)`` (which raises OSError when the
        library refuses it) and wait for its completion.  Returns the
        library's non-negative result; a negative one raises OSError."""
        key = next(self._keys)
        pending = _Pending(trio.lowlevel.current_trio_token(), trio.Event(), keep)
        self._pending[key] = pending
        try:
            start(key)
        except BaseException:
            del self._pending[key]
            raise
        await pending.done.wait()
        if pending.result < 0:
            raise OSError(pending.error, os.strerror(pending.error))
        return pending.result

    def complete(self, key: int, result: int, error: int) -> None:
        """Called on the library's thread: never raises (the library
        could not handle it)."""
        pending = self._pending.get(key)
        if pending is None:
            return
        try:
            pending.token.run_sync_soon(self._finish, key, result, error)
        except trio.RunFinishedError:
            # the run is over (an abandoned request finishing at exit)
            self._pending.pop(key, None)

    def _finish(self, key: int, result: int, error: int) -> None:
        pending = self._pending.pop(key, None)
        if pending is not None:
            pending.result, pending.error = result, error
            pending.done.set()


async def blocking_call(timeout: float, call: Callable[..., T], *arguments: Any) -> T:
    """A blocking library call (connect, open, resize, close) on a worker
    thread, for at most `timeout` seconds: then it is abandoned (the thread
    finishes on its own) and the caller gets Unreachable (EIO)."""
    with trio.move_on_after(timeout):
        return await trio.to_thread.run_sync(call, *arguments, abandon_on_cancel=True)
    raise Unreachable(f"no answer within {timeout} s")


async def within(timeout: float, request: Awaitable[T]) -> T:
    """An asynchronous request that gives up (Unreachable, EIO) after
    `timeout` seconds; its buffers stay with `ForeignCompletions`."""
    with trio.move_on_after(timeout):
        return await request
    raise Unreachable(f"no answer within {timeout} s")


class LibraryHandle(Protocol):
    """What a library's open image or file answers (gluster's glfs_fd,
    librbd's image), every call one asynchronous request."""

    async def read(self, offset: int, length: int) -> bytearray: ...
    async def write(self, offset: int, data: bytes) -> None: ...
    async def flush(self) -> None: ...
    async def discard(self, offset: int, length: int) -> None: ...
    async def write_zeroes(self, offset: int, length: int) -> None: ...


#: a library's answer to an operation the file or image does not support
NOT_SUPPORTED = (errno.EOPNOTSUPP, errno.ENOSYS)


class LibraryDriver(BlockDriver):
    """A protocol driver whose data requests go to a C library's
    asynchronous calls (many in flight at once), each failing with
    Unreachable (EIO) after `timeout` seconds without an answer."""

    async_io = True
    timeout: float = 30
    #: what a write to a source opened read-only is told
    read_only_message: ClassVar[str] = "the source is open read-only"

    def handle(self) -> LibraryHandle:
        """The open image or file; raises Unreachable once closed."""
        raise Unreachable("not connected")

    async def read(self, offset: int, length: int) -> bytes:
        # a bytearray serves every caller as bytes would (see the nbd driver)
        return cast(bytes, await within(self.timeout, self.handle().read(offset, length)))

    async def write(self, offset: int, data: bytes) -> None:
        if not self.writable:
            raise ReadOnly(self.read_only_message)
        await within(self.timeout, self.handle().write(offset, data))

    async def flush(self) -> None:
        await within(self.timeout, self.handle().flush())

    async def discard(self, offset: int, length: int) -> None:
        try:
            await within(self.timeout, self.handle().discard(offset, length))
        except OSError as exc:
            if exc.errno not in NOT_SUPPORTED:
                raise

    async def write_zeroes(self, offset: int, length: int, *, may_unmap: bool = False) -> None:
        try:
            await within(self.timeout, self.handle().write_zeroes(offset, length))
        except OSError as exc:
            if exc.errno not in NOT_SUPPORTED:
                raise
            await super().write_zeroes(offset, length, may_unmap=may_unmap)
