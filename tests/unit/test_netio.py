"""imgfs.netio: the pacing of reconnects, socket error words, corking."""
from __future__ import annotations

import errno
import os
import socket

from imgfs.netio import Reconnect, printable, socket_reason, tcp_corked


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


def test_tcp_corked_holds_small_writes_until_the_block_ends() -> None:
    """What is written in small pieces while corked arrives when the block
    ends; the descriptor (a library's) stays open and usable."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        peer, _ = server.accept()
        with client, peer:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peer.settimeout(0.05)
            with tcp_corked(client.fileno()):
                for _ in range(10):
                    os.write(client.fileno(), b"x" * 100)
                try:
                    early = peer.recv(4096)
                except TimeoutError:
                    early = b""
                assert early == b""                      # less than a segment: held
            peer.settimeout(5)
            received = b""
            while len(received) < 1000:
                received += peer.recv(4096)
            assert received == b"x" * 1000
            os.write(client.fileno(), b"y")             # still open after the block
            assert peer.recv(1) == b"y"


def test_tcp_corked_leaves_other_descriptors_alone() -> None:
    reader, writer = os.pipe()
    try:
        with tcp_corked(writer):
            os.write(writer, b"z")
        assert os.read(reader, 1) == b"z"
    finally:
        os.close(reader)
        os.close(writer)
