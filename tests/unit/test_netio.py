"""imgfs.netio: the pacing of reconnects, and socket error words."""
from __future__ import annotations

import errno
import socket

from imgfs.netio import Reconnect, printable, socket_reason


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_reconnect_backs_off_then_gives_up_for_good() -> None:
    clock = Clock()
    pacing = Reconnect(first_delay=1, max_delay=4, give_up_after=20, clock=clock)
    assert pacing.check() is None
    pacing.failed("Connection refused")
    assert "Connection refused; next attempt in 1.0 s" == pacing.check()
    clock.now += 1
    assert pacing.check() is None
    pacing.failed("Connection refused")           # waits double: 2, then 4, 4, ...
    clock.now += 1.5
    assert pacing.check() is not None
    clock.now += 0.5
    assert pacing.check() is None
    pacing.failed("Connection refused")
    assert pacing.delay == 4
    pacing.failed("Connection refused")
    assert pacing.delay == 4
    clock.now = 100 + 20
    assert pacing.gave_up
    assert "gave up" in (pacing.check() or "")
    pacing.succeeded()                             # too late: lost for good
    assert pacing.gave_up


def test_reconnect_success_resets_the_pacing() -> None:
    clock = Clock()
    pacing = Reconnect(first_delay=1, clock=clock)
    pacing.failed("timed out")
    clock.now += 1
    pacing.succeeded()
    assert pacing.check() is None and pacing.failing_since is None
    pacing.failed("timed out")
    assert pacing.delay == 1


def test_socket_reason_and_printable() -> None:
    assert socket_reason(ConnectionRefusedError(errno.ECONNREFUSED, "x")) == "Connection refused"
    assert socket_reason(socket.gaierror(-2, "Name or service not known")) == \
        "Name or service not known"
    wrapped = OSError("all attempts failed")
    wrapped.__cause__ = ExceptionGroup("all", [TimeoutError(errno.ETIMEDOUT, "t")])
    assert socket_reason(wrapped) == "Connection timed out"
    assert printable(b"bad\x1b[31m\nname") == "bad [31m name"
