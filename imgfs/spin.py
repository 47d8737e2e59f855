"""Busy polling: trio's loop kept awake for a moment around requests.

A server on the same machine or a fast network answers a small request in
about the time it takes to put the daemon's thread to sleep and wake it
again, and at one request in flight those wake-ups (for the answer, then
for the client's next request on /dev/fuse) are most of what a request
costs (bench/README.md, "floors").  While `Awake` runs, trio's loop keeps
a task runnable, so it asks epoll about every file descriptor (sockets,
eventfds, /dev/fuse) without ever sleeping, and whatever is ready is
handled at once.

How long the loop stays awake after a request began or ended adapts, as
QEMU's adaptive polling of its event loops does (poll-max-ns): the window
grows while the next event comes soon after the loop went to sleep, and
shrinks to nothing while events come later than MAX_WINDOW, so an idle
mount or a slow server costs no busy CPU.  MAX_WINDOW is long because an
answer comes sooner while the loop is awake (on a virtual machine a
sleeping CPU wakes slowly too): a server that answers in 400 us to a
sleeping daemon may answer in 200 to a polling one.

Only sources whose answers arrive on file descriptors trio watches, with
no Python on the library's own threads, gain from it (BlockDriver.busy_poll):
a thread that needs the GIL to deliver an answer would wait for the
polling thread instead.
"""
from __future__ import annotations

import contextlib
import select
import time
from typing import Any, ClassVar

import trio

#: larger requests neither begin nor extend a window: a wake-up is little
#: beside their transfer, and polling through a stream of them takes CPU
#: from the server and the library's threads (gluster's sequential reads
#: and writes lost a tenth)
SMALL_REQUEST = 64 * 1024
#: the longest the loop stays awake after an event (ns)
MAX_WINDOW = 1_000_000
#: the first window after events that all found the loop asleep (ns)
FIRST_WINDOW = 8_000


#: what wraps a request while Awake does not run: nothing is tracked
_UNTRACKED = contextlib.nullcontext()


class Awake:
    """``with awake.around(offset, length):`` around each request; `run`
    in a nursery (until it runs, requests are not tracked at all).

    Two windows adapt apart: while requests are in flight the next event
    is a server's answer, while none is it is the client's next request,
    and either may be quick while the other is slow."""

    #: the one that runs in this process, if any (readers ask it whether
    #: to spin: `ReplySpin`)
    running: ClassVar[Awake | None] = None

    def __init__(self) -> None:
        #: polled (small) requests in flight
        self.in_flight = 0
        #: requests in flight that are not polled (large ones, their tails)
        self.others_in_flight = 0
        self._unpolled = _Unpolled(self)
        #: ns the loop stays awake after the last event: [idle, busy]
        self.windows = [FIRST_WINDOW, FIRST_WINDOW]
        self._last = 0
        #: where the last large request ended
        self._large_end = -1
        self._asleep: trio.Event | None = None
        #: the descriptor the client's requests arrive on (/dev/fuse), if
        #: known: a reader spinning for the only reply awaited gives way to it
        self.client_fd: int | None = None

    def around(self, offset: int, length: int) -> contextlib.AbstractContextManager[Any]:
        """What to wrap a request of `length` bytes at `offset` in.

        A small request that starts where a large one ended is the tail the
        kernel cut off it (a 1 MiB write from a buffer that does not start
        on a page spans 257 pages, one more than a FUSE request carries:
        1048560 bytes, then 16), part of a stream, not polled either."""
        if Awake.running is not self:
            return _UNTRACKED
        if length > SMALL_REQUEST:
            self._large_end = offset + length
            return self._unpolled
        return self._unpolled if offset == self._large_end else self

    @property
    def alone(self) -> bool:
        """One polled request in flight and nothing else."""
        return self.in_flight == 1 and not self.others_in_flight

    def __enter__(self) -> None:
        self.in_flight += 1
        self._event()

    def __exit__(self, *_: object) -> None:
        self.in_flight -= 1
        self._event()

    def _event(self) -> None:
        self._last = time.perf_counter_ns()
        if self._asleep is not None:
            self._asleep.set()

    async def run(self) -> None:
        Awake.running = self
        try:
            await self._keep_awake()
        finally:
            Awake.running = None

    async def _keep_awake(self) -> None:
        while True:
            self._asleep = asleep = trio.Event()
            busy, slept_at = self.in_flight > 0, time.perf_counter_ns()
            await asleep.wait()
            self._asleep = None
            self._adapt(busy, self._last - slept_at)
            while time.perf_counter_ns() - self._last < self.windows[self.in_flight > 0]:
                await trio.lowlevel.checkpoint()

    def _adapt(self, busy: bool, slept: int) -> None:
        self.windows[busy] = adapted(self.windows[busy], slept)


class _Unpolled:
    """Counts a request Awake does not poll for (`Awake.others_in_flight`)."""

    __slots__ = ("awake",)

    def __init__(self, awake: Awake) -> None:
        self.awake = awake

    def __enter__(self) -> None:
        self.awake.others_in_flight += 1

    def __exit__(self, *_: object) -> None:
        self.awake.others_in_flight -= 1


class ReplySpin:
    """A reader's wait for its socket (or a library's completion
    descriptor), spinning before it sleeps while the loop is kept awake.

    Even with trio's loop awake (`Awake`), a reply found by epoll costs
    the reader a registration, a wake-up and a task switch; polling the
    one descriptor finds it at once.  Only while `Awake.running` has
    requests in flight: the requests it polls (small ones) are those whose
    replies are worth spinning for, and without a mount nobody waits on
    the reply's latency.  The window adapts as Awake's do, to how long
    replies took when the reader had to sleep.

    While its request is the only one in flight (`Awake.alone`), nothing
    else has to run before the reply but the client's next request: the
    reader polls its descriptor and the client's together, and lets the
    loop run only when the client's is readable.  A trio iteration between
    two polls (an epoll over every descriptor, a turn of every task) showed
    in the time of a 4 KiB iSCSI read (bench/README.md, thirteenth
    session).  With more requests in flight the loop runs between polls,
    for their tasks."""

    __slots__ = ("window", "_poller", "_fds", "_since")

    def __init__(self) -> None:
        self.window = FIRST_WINDOW
        self._poller = select.poll()
        #: the descriptors registered with the poller: (reader's, client's)
        self._fds: tuple[int, int | None] = (-1, None)
        self._since = 0

    async def spin(self, fd: int) -> bool:
        """True when `fd` became readable within the window; else the
        caller sleeps on it, then calls `woke`."""
        awake = Awake.running
        if awake is None or not awake.in_flight:
            self._since = 0
            return False
        client_fd = awake.client_fd
        poll = self._poll_for(fd, client_fd)
        now, window = time.perf_counter_ns, self.window
        self._since = start = now()
        while True:
            if not awake.alone or client_fd is None:
                await trio.lowlevel.checkpoint()    # for the other requests' tasks
            ready = poll(0)
            if ready:
                if any(ready_fd == fd for ready_fd, _ in ready):
                    return True
                await trio.lowlevel.checkpoint()    # for the client's next request
            if now() - start >= window:
                return False

    def _poll_for(self, fd: int, client_fd: int | None) -> Any:
        if (fd, client_fd) != self._fds:
            self._poller, self._fds = select.poll(), (fd, client_fd)
            self._poller.register(fd, select.POLLIN)
            if client_fd is not None:
                self._poller.register(client_fd, select.POLLIN)
        return self._poller.poll

    def woke(self) -> None:
        """The reply came while the caller slept after `spin`."""
        if self._since:
            self.window = adapted(self.window, time.perf_counter_ns() - self._since)


def adapted(window: int, slept: int) -> int:
    """After sleeping `slept` ns until the next event: stay awake longer
    next time if staying awake would have caught it, else shorter."""
    if slept <= MAX_WINDOW:
        return min(MAX_WINDOW, max(FIRST_WINDOW, 2 * window))
    window //= 2
    return window if window >= FIRST_WINDOW else 0
