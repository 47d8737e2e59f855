"""Requests that a C library completes on its own threads (libgfapi's
``*_async`` calls, librbd's aio completions), awaited from trio, and
`LibraryDriver`, the I/O of a protocol driver built on such a library.

A request is started with a key.  The library's completions arrive as
`CompletionEvents`: a descriptor that becomes readable once requests have
finished, and the finished requests, collected on the trio thread.  librbd
does both itself (an eventfd it signals, completions handed over when
polled), so no Python runs on its threads; for a library that can only call
back (libgfapi), `QueuedCompletions` queues what the callback reports and
signals an eventfd.  The tasks that wait take turns polling the descriptor,
so nothing needs a nursery; the others sleep until the poller reschedules
them.  Many requests are in flight at once without a thread per request.
Buffers the library reads or fills stay referenced until it has completed
the request, even when the waiting task was cancelled.
"""
from __future__ import annotations

import collections
import ctypes
import errno
import itertools
import math
import os
import select
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, Protocol, TypeVar, cast

import trio

from .block import BlockDriver
from .errors import ReadOnly, Unreachable
from .spin import ReplySpin

T = TypeVar("T")

#: (key, result, errno) of a finished request; errno when result < 0
Finished = tuple[int, int, int]


class CompletionEvents(Protocol):
    """A library's completion notification: a descriptor that becomes
    readable when requests have finished, and the finished requests."""

    def fileno(self) -> int: ...

    def collect(self) -> Iterable[Finished]:
        """Every request finished since the last call; never blocks."""
        ...


class QueuedCompletions:
    """`CompletionEvents` for a library that reports completions through a
    callback on its own threads: `report` queues them and signals an
    eventfd.  Lives as long as the library may call back (the process)."""

    def __init__(self) -> None:
        self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._finished: collections.deque[Finished] = collections.deque()

    def fileno(self) -> int:
        return self._fd

    def report(self, key: int, result: int, error: int) -> None:
        """On the library's thread, from its callback: never raises."""
        keep_thread_state()
        self._finished.append((key, result, error))
        os.eventfd_write(self._fd, 1)

    def collect(self) -> list[Finished]:
        try:
            os.eventfd_read(self._fd)
        except BlockingIOError:
            pass
        finished = []
        while self._finished:
            finished.append(self._finished.popleft())
        return finished


class _Request:
    __slots__ = ("task", "keep", "deadline", "parked", "done", "timed_out",
                 "result", "error")

    def __init__(self, task: trio.lowlevel.Task | None, keep: Any,
                 deadline: float) -> None:
        #: the waiting task; None once it gave up (cancelled, timed out)
        self.task = task
        #: what the library may still touch (buffers) until it completes
        self.keep = keep
        #: time.monotonic() after which the waiting task gives up
        self.deadline = deadline
        #: the task sleeps until rescheduled
        self.parked = False
        self.done = False
        self.timed_out = False
        self.result = 0
        self.error = 0


#: seconds between two checks for requests past their deadline (while a
#: task waits): how late a timeout may fire
TICK = 0.25


class ForeignCompletions:
    """The requests under way whose completions `events` reports.

    A request's timeout is no cancel scope of its own (one per request
    costs more than the rest of the wait): the polling task also wakes on
    a periodic timer, and gives up the requests past their deadline.

    `spin`: the polling task may spin before it sleeps (`ReplySpin`); only
    for a library that runs no Python on its threads (the spinning task
    holds the interpreter)."""

    def __init__(self, events: CompletionEvents, *, spin: bool = False) -> None:
        self.events = events
        self._pending: dict[int, _Request] = {}
        self._spin = ReplySpin() if spin else None
        self._keys = itertools.count(1)
        #: a waiting task is polling `events`
        self._polling = False
        self._ticker, self._next_tick = _ticker(TICK)
        # what the polling task waits on: the library's events or a tick
        self._wakeups = select.epoll()
        self._wakeups.register(events.fileno(), select.EPOLLIN)
        self._wakeups.register(self._ticker, select.EPOLLIN)

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    async def run(self, start: Callable[[int], None], keep: Any = None,
                  timeout: float = math.inf) -> int:
        """Start a request with ``start(key)`` (which raises OSError when the
        library refuses it) and wait for its completion.  Returns the
        library's non-negative result; a negative one raises OSError.
        Without an answer within `timeout` seconds: Unreachable (EIO)."""
        key = next(self._keys)
        request = _Request(trio.lowlevel.current_task(), keep, time.monotonic() + timeout)
        self._pending[key] = request
        try:
            start(key)
        except BaseException:
            del self._pending[key]
            raise
        while not request.done:
            if self._polling:
                # woken when done, or to poll in turn
                await _park(request)
            else:
                await self._poll()
        if request.timed_out:
            raise Unreachable(f"no answer within {timeout:g} s")
        if request.result < 0:
            raise OSError(request.error, os.strerror(request.error))
        return request.result

    async def _poll(self) -> None:
        self._polling = True
        try:
            await self._wait()
            self.collect()
            now = time.monotonic()
            if now >= self._next_tick:
                self._tick(now)
        finally:
            self._polling = False
            self._hand_over()

    async def _wait(self) -> None:
        fd, spin = self._wakeups.fileno(), self._spin
        if spin is None:
            await trio.lowlevel.wait_readable(fd)
        elif not await spin.spin(fd):
            await trio.lowlevel.wait_readable(fd)
            spin.woke()

    def collect(self) -> None:
        """Finish the requests the library reports finished (those whose
        task gave up are only forgotten, their buffers released)."""
        for key, result, error in self.events.collect():
            request = self._pending.pop(key, None)
            if request is not None and not request.done:
                request.result, request.error, request.done = result, error, True
                _wake(request)

    def _tick(self, now: float) -> None:
        """The timer expired (by the clock it shares with time.monotonic,
        so it needs reading only then): read it, and give up late
        requests."""
        try:
            os.read(self._ticker, 8)
        except BlockingIOError:
            return      # a hair early: the next wake-up reads it
        self._next_tick += (int((now - self._next_tick) / TICK) + 1) * TICK
        self._give_up_late(now)

    def _give_up_late(self, now: float) -> None:
        """The tasks of requests past their deadline stop waiting; the
        requests stay (with their buffers) until the library completes
        them."""
        for request in self._pending.values():
            if not request.done and request.deadline <= now:
                request.done = request.timed_out = True
                _wake(request)
                request.task = None

    def _hand_over(self) -> None:
        """Wake one task still waiting, to poll in turn."""
        for waiting in self._pending.values():
            if waiting.parked:
                _wake(waiting)
                return

    def close(self) -> None:
        """On the trio thread, once the library reports nothing more."""
        if not self._wakeups.closed:
            trio.lowlevel.notify_closing(self._wakeups.fileno())
            self._wakeups.close()
            os.close(self._ticker)


def _wake(request: _Request) -> None:
    if request.parked and request.task is not None:
        request.parked = False
        trio.lowlevel.reschedule(request.task)


async def _park(request: _Request) -> None:
    def abort(_: Any) -> trio.lowlevel.Abort:
        # given up: the buffers stay with the request until the library
        # completes it
        request.parked, request.task = False, None
        return trio.lowlevel.Abort.SUCCEEDED

    request.parked = True
    await trio.lowlevel.wait_task_rescheduled(abort)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


_LIBC = ctypes.CDLL(None, use_errno=True)


#: timerfd_settime's flag: it_value is a time of the clock, not a delay
TFD_TIMER_ABSTIME = 1


def _timespec(seconds: float) -> _Timespec:
    return _Timespec(int(seconds), int(seconds % 1 * 1e9))


def _ticker(period: float) -> tuple[int, float]:
    """A non-blocking timerfd that expires every `period` seconds, and its
    first expiry as time.monotonic() tells it (os has timerfd only from
    Python 3.13)."""
    fd = _LIBC.timerfd_create(time.CLOCK_MONOTONIC, os.O_NONBLOCK | os.O_CLOEXEC)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "timerfd_create")
    first = time.monotonic() + period
    spec = _Itimerspec(_timespec(period), _timespec(first))
    if _LIBC.timerfd_settime(fd, TFD_TIMER_ABSTIME, ctypes.byref(spec), None) < 0:
        error = ctypes.get_errno()
        os.close(fd)
        raise OSError(error, "timerfd_settime")
    return fd, first


_NEW_BYTEARRAY = ctypes.pythonapi.PyByteArray_FromStringAndSize
_NEW_BYTEARRAY.restype = ctypes.py_object
_NEW_BYTEARRAY.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t]

#: from this length on, `read_buffer` skips zero-filling (below it, Python's
#: own bytearray costs less than the call)
UNFILLED_FROM = 64 << 10


def read_buffer(length: int) -> bytearray:
    """A buffer for the library to read into.  A large one is left as
    malloc gives it rather than zero-filled first, which costs as much CPU
    as the daemon's own copy of the data: a read must fill every byte, and
    one that does not is an error whose buffer is never returned."""
    if length < UNFILLED_FROM:
        return bytearray(length)
    return cast(bytearray, _NEW_BYTEARRAY(None, length))


class _Pinned(threading.local):
    done = False


_PINNED = _Pinned()
_PyGILState_Ensure = ctypes.pythonapi.PyGILState_Ensure
_PyGILState_Ensure.restype = ctypes.c_int


def keep_thread_state() -> None:
    """Called from a ctypes callback on a thread Python did not create:
    keep that thread's Python state for the life of the thread.  ctypes
    otherwise creates one (and maps its frame stack) before every callback
    and frees it after; a library calls back on a few long-lived threads."""
    if not _PINNED.done:
        _PINNED.done = True
        _PyGILState_Ensure()      # never released: the thread keeps its state


async def blocking_call(timeout: float, call: Callable[..., T], *arguments: Any) -> T:
    """A blocking library call (connect, open, resize, close) on a worker
    thread, for at most `timeout` seconds: then it is abandoned (the thread
    finishes on its own) and the caller gets Unreachable (EIO)."""
    with trio.move_on_after(timeout):
        return await trio.to_thread.run_sync(call, *arguments, abandon_on_cancel=True)
    raise Unreachable(f"no answer within {timeout} s")


class LibraryHandle(Protocol):
    """What a library's open image or file answers (gluster's glfs_fd,
    librbd's image), every call one asynchronous request that fails with
    Unreachable (EIO) after `timeout` seconds without an answer."""

    timeout: float

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
    Unreachable (EIO) after `timeout` seconds without an answer (the
    driver gives its handle the timeout)."""

    async_io = True
    timeout: float = 30
    #: what a write to a source opened read-only is told
    read_only_message: ClassVar[str] = "the source is open read-only"

    def handle(self) -> LibraryHandle:
        """The open image or file; raises Unreachable once closed."""
        raise Unreachable("not connected")

    async def read(self, offset: int, length: int) -> bytes:
        # a bytearray serves every caller as bytes would (see the nbd driver)
        return cast(bytes, await self.handle().read(offset, length))

    async def write(self, offset: int, data: bytes) -> None:
        if not self.writable:
            raise ReadOnly(self.read_only_message)
        await self.handle().write(offset, data)

    async def flush(self) -> None:
        await self.handle().flush()

    async def discard(self, offset: int, length: int) -> None:
        try:
            await self.handle().discard(offset, length)
        except OSError as exc:
            if exc.errno not in NOT_SUPPORTED:
                raise

    async def write_zeroes(self, offset: int, length: int, *, may_unmap: bool = False) -> None:
        try:
            await self.handle().write_zeroes(offset, length)
        except OSError as exc:
            if exc.errno not in NOT_SUPPORTED:
                raise
            await super().write_zeroes(offset, length, may_unmap=may_unmap)
