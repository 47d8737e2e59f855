"""Many requests in flight on one ordered byte stream, with no background task.

Network protocol drivers (the ssh driver's SFTP session; the shape is the
nbd driver's) send requests tagged with an id and receive replies in any
order.  The task that sends a request waits for its reply; one waiting task
at a time is the *reader*: it receives messages and completes the requests
they answer, until its own is complete, then hands the reader role to a task
still waiting.  So nothing needs a nursery, and a driver opened by
`imgfs create` (no nursery) pipelines as well as one inside a mount.

A subclass supplies the stream: `transmit` (all of a request's bytes, or
raise `Lost`), `receive` (at least one message, completing what it answers
with `complete`; raise `Lost` or `ProtocolError`) and `hang_up`.  A request
is sent under a cancel shield, because half a request would desynchronise
the stream for everyone; `receive` must itself leave the stream consistent
when cancelled.  Once the connection fails, every pending and later request
fails with `Unreachable` (EIO) naming why.
"""
from __future__ import annotations

import abc
import itertools
from typing import ClassVar

import trio

from .errors import ImgfsError, Unreachable


class Lost(Exception):
    """The stream failed or the server hung up (message: why)."""


class ProtocolError(Exception):
    """The server broke the protocol; the only safe reaction is to hang up."""


class Request:
    """One request in flight; subclasses add what its reply fills in."""

    __slots__ = ("error", "done", "wakeup")

    def __init__(self) -> None:
        self.error: ImgfsError | None = None
        self.done = False
        #: set when the reply is complete, or when this task is to read next
        self.wakeup: trio.Event | None = None

    def fail(self, error: ImgfsError) -> None:
        if self.error is None:          # the first error says most
            self.error = error


class Pipeline(abc.ABC):
    """Requests matched to replies by id on one connection."""

    #: True when `transmit` returns without ever waiting (a library that
    #: queues requests and writes them itself): requests then need no turn
    #: at the stream and no shield from cancellation, and cost neither
    transmit_never_waits: ClassVar[bool] = False

    def __init__(self, name: str, *, reply_timeout: float | None = None,
                 id_limit: int = 1 << 32) -> None:
        #: the URL, for messages
        self.name = name
        #: a reader that receives nothing for this long declares the connection dead
        self.reply_timeout = reply_timeout
        #: most requests that were in flight at once (for tests and stats)
        self.peak_in_flight = 0
        #: why the connection is unusable, once it is
        self.broken: str | None = None
        self._send_lock = trio.Lock()
        self._pending: dict[int, Request] = {}
        self._sleepers: dict[Request, None] = {}
        self._reader: Request | None = None
        self._ids = itertools.count(1)
        self._id_limit = id_limit

    # -- what a protocol supplies ---------------------------------------------------

    @abc.abstractmethod
    async def transmit(self, *buffers: bytes | bytearray | memoryview) -> None:
        """Send all of `buffers`, or raise Lost."""

    @abc.abstractmethod
    async def receive(self) -> None:
        """Receive at least one message and `complete` what it answers."""

    @abc.abstractmethod
    def hang_up(self) -> None:
        """Close the stream (wakes a reader blocked in `receive`)."""

    # -- requests -------------------------------------------------------------------

    def new_id(self) -> int:
        """An id no pending request has."""
        while True:
            request_id = next(self._ids) % self._id_limit
            if request_id and request_id not in self._pending:
                return request_id

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def check_usable(self) -> None:
        if self.broken is not None:
            raise Unreachable(f"{self.name}: {self.broken}")

    async def send(self, request_id: int, request: Request,
                   *buffers: bytes | bytearray | memoryview) -> None:
        """Send a request; its reply is awaited with `wait`."""
        self.check_usable()
        self._pending[request_id] = request
        self.peak_in_flight = max(self.peak_in_flight, len(self._pending))
        try:
            if self.transmit_never_waits:
                await self.transmit(*buffers)
            else:
                async with self._send_lock:
                    self.check_usable()
                    with trio.CancelScope(shield=True):
                        await self.transmit(*buffers)
        except Lost as exc:
            self.fail(f"connection to the server lost ({exc})")
        except BaseException:
            self._pending.pop(request_id, None)     # never sent
            raise

    async def post(self, *buffers: bytes | bytearray | memoryview) -> None:
        """Send a message that gets no reply (a goodbye), or raise Lost."""
        async with self._send_lock:
            await self.transmit(*buffers)

    async def wait(self, request: Request) -> None:
        """Wait for `request`'s reply, reading while nobody else does; raise
        its error.  A cancelled waiter leaves its request pending: its reply
        still comes and whoever reads then consumes it."""
        try:
            while not request.done:
                if self._reader is None:
                    await self._lead(request)
                else:
                    request.wakeup = trio.Event()
                    self._sleepers[request] = None
                    try:
                        await request.wakeup.wait()
                    finally:
                        self._sleepers.pop(request, None)
        finally:
            self._hand_over()
        if request.error is not None:
            raise request.error

    async def exchange(self, request_id: int, request: Request,
                       *buffers: bytes | bytearray | memoryview) -> None:
        await self.send(request_id, request, *buffers)
        await self.wait(request)

    def _hand_over(self) -> None:
        """Make sure a waiting task reads next when nobody reads."""
        if self._reader is None and self._sleepers:
            sleeper = next(iter(self._sleepers))
            del self._sleepers[sleeper]
            assert sleeper.wakeup is not None
            sleeper.wakeup.set()

    async def _lead(self, request: Request) -> None:
        self._reader = request
        try:
            if self.reply_timeout is None:
                while not request.done:
                    await self.receive()
            else:
                await self._receive_until_done(request, self.reply_timeout)
        except Lost as exc:
            self.fail(f"connection to the server lost ({exc})")
        except ProtocolError as exc:
            self.fail(f"protocol error, disconnected: {exc}")
        except Exception as exc:
            # A bug here may have left half a message unread: never read on
            # from the middle of one.
            self.fail(f"internal error, disconnected: {exc!r}")
        finally:
            self._reader = None

    async def _receive_until_done(self, request: Request, reply_timeout: float) -> None:
        """Receive until `request` is done, each receive within `reply_timeout`
        (one cancel scope whose deadline moves on: a scope per receive would
        cost more than many a reply)."""
        with trio.CancelScope() as scope:
            while not request.done:
                scope.deadline = trio.current_time() + reply_timeout
                await self.receive()
        if scope.cancelled_caught and not request.done:
            self.fail(f"no reply from the server in {reply_timeout:g} s")

    # -- replies --------------------------------------------------------------------

    def pending(self, request_id: int) -> Request:
        """The request a reply answers (it stays pending until `complete`)."""
        request = self._pending.get(request_id)
        if request is None:
            raise ProtocolError(f"reply for unknown request {request_id}")
        return request

    def complete(self, request_id: int) -> None:
        self.finish(self._pending.pop(request_id))

    @staticmethod
    def finish(request: Request) -> None:
        request.done = True
        if request.wakeup is not None:
            request.wakeup.set()

    def fail(self, reason: str) -> None:
        """The connection is unusable: fail everything pending, and hang up."""
        if self.broken is None:
            self.broken = reason
        for request in list(self._pending.values()):
            request.fail(Unreachable(f"{self.name}: {self.broken}"))
            self.finish(request)
        self._pending.clear()
        self.hang_up()
