"""Machinery every network protocol driver shares (nbd, http, ssh, ...).

* `socket_reason`: why a socket call failed, in the words users know;
* `printable`: text a server sent, made safe for one line of a message;
* `Reconnect`: when a driver may try again to reach a server that went
  away: at once after the first loss, then after delays that double, and
  never again once the server has been unreachable for a bounded time.
  Requests that arrive while it waits fail at once (EIO) rather than
  queueing behind a dead server: a mount must answer, not hang.
* `tcp_corked`: full segments from a library that writes in small pieces.
"""
from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator

import trio

#: first wait after a failed attempt to reconnect, in seconds
FIRST_DELAY = 0.25
#: the wait doubles after every failed attempt, up to this
MAX_DELAY = 4.0
#: unreachable for this long without one success: lost for good
GIVE_UP_AFTER = 60.0


def socket_reason(exc: BaseException) -> str:
    """Why a socket call failed, in the usual words ("Connection refused")."""
    if isinstance(exc, socket.gaierror) and exc.strerror:
        return exc.strerror
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup) and cause.exceptions:
        return socket_reason(cause.exceptions[-1])   # trio's "all attempts failed"
    return str(exc) or type(exc).__name__


@contextlib.contextmanager
def tcp_corked(fd: int) -> Iterator[None]:
    """TCP_CORK on the TCP socket `fd`, which a C library owns, while the
    block runs: what the library writes in many small calls then leaves in
    full segments, not a segment per call, each delivered and woken for at
    the other end."""
    _set_tcp_cork(fd, True)
    try:
        yield
    finally:
        _set_tcp_cork(fd, False)       # sends what is held back


def _set_tcp_cork(fd: int, on: bool) -> None:
    # A socket object over the library's descriptor, given up again unclosed.
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, fd)
    except OSError:
        return                         # not a socket (or gone): nothing to hold back
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, on)
    except OSError:
        pass                           # not TCP
    finally:
        sock.detach()


def printable(data: bytes | bytearray | str) -> str:
    """A server's message, safe for one line on a terminal."""
    text = data.decode("utf-8", "replace") if isinstance(data, (bytes, bytearray)) else data
    return "".join(char if char.isprintable() else " " for char in text).strip()


class Reconnect:
    """The pacing of attempts to (re)connect to one server.

    `check()` says whether an attempt may be made now (None) or why not;
    the driver reports each attempt's outcome with `failed()` or
    `succeeded()`.  Only failed attempts start the clock: an idle
    connection the server closed costs nothing.
    """

    def __init__(self, *, first_delay: float = FIRST_DELAY, max_delay: float = MAX_DELAY,
                 give_up_after: float = GIVE_UP_AFTER,
                 clock: Callable[[], float] = trio.current_time) -> None:
        self.first_delay = first_delay
        self.max_delay = max_delay
        self.give_up_after = give_up_after
        self.clock = clock
        #: when the current run of failures began (None: the last attempt worked)
        self.failing_since: float | None = None
        self.next_attempt = 0.0
        self.delay = 0.0
        self.last_error = ""

    @property
    def gave_up(self) -> bool:
        return (self.failing_since is not None
                and self.clock() - self.failing_since >= self.give_up_after)

    def check(self) -> str | None:
        """None when an attempt may be made now, else why it may not."""
        if self.failing_since is None:
            return None
        if self.gave_up:
            return (f"unreachable for {self.give_up_after:g} s, gave up "
                    f"(last error: {self.last_error})")
        wait = self.next_attempt - self.clock()
        if wait > 0:
            return f"{self.last_error}; next attempt in {wait:.1f} s"
        return None

    def failed(self, reason: str) -> None:
        now = self.clock()
        if self.failing_since is None:
            self.failing_since = now
            self.delay = self.first_delay
        else:
            self.delay = min(self.delay * 2, self.max_delay)
        self.next_attempt = now + self.delay
        self.last_error = reason

    def succeeded(self) -> None:
        if not self.gave_up:
            self.failing_since = None
            self.delay = 0.0
