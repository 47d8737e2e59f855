"""The http driver against a hostile or broken server: a real socket server
on loopback that answers each range request with the bytes a test scripts
(oversized heads, bad Content-Length, truncated or overlong bodies, garbage
status lines), and with the other framings HTTP/1.1 allows (chunked, until
close).  A bad answer to the open refuses the URL in one line; a bad answer
to a read fails that read (EIO) and the next read works again."""
from __future__ import annotations

import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

import pytest

from imgfs.errors import ImgfsError
from imgfs.graph import open_image
from imgfs.node import OpenContext
from tests.conftest import random_bytes
from tests.drivers.test_http import refused, run_trio
from tests.nginx import make_certificate

DATA = random_bytes(64 * 1024, seed=3)
RANGE = re.compile(rb"\r\nRange: bytes=(\d+)-(\d+)\r\n", re.IGNORECASE)
#: what a script returns: the bytes to send, and whether to close after them
Answer = tuple[bytes, bool]
Script = Callable[[int, int, int], Answer]


def partial(first: int, last: int, *fields: str, body: bytes | None = None) -> bytes:
    """A correct 206 answer for bytes first..last of DATA, with extra fields."""
    body = DATA[first:last + 1] if body is None else body
    lines = ["HTTP/1.1 206 Partial Content", f"Content-Range: bytes {first}-{last}/{len(DATA)}",
             'ETag: "v1"', *fields]
    if not any(field.lower().startswith(("content-length", "transfer-encoding"))
               for field in fields):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def until_close(first: int, last: int, body: bytes) -> bytes:
    """An HTTP/1.0 206 answer for first..last whose body ends at the close."""
    return b"HTTP/1.0 206 OK\r\nContent-Range: bytes %d-%d/%d\r\nETag: \"v1\"\r\n\r\n%s" % (
        first, last, len(DATA), body)


def chunked(body: bytes, size: int) -> bytes:
    chunks = [body[at:at + size] for at in range(0, len(body), size)]
    return b"".join(b"%x;ext=1\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks) + \
        b"0\r\nTrailer: x\r\n\r\n"


@contextmanager
def scripted(script: Script, tls: ssl.SSLContext | None = None) -> Iterator[str]:
    """A server whose answer to the n-th request (counted from 0 over all
    connections) for bytes first..last is script(first, last, n), over
    TLS with `tls`; yields its URL."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.05)
    stop = threading.Event()
    count = iter(range(1 << 30))
    workers: list[threading.Thread] = []

    def serve(conn: socket.socket) -> None:
        with conn, suppress(OSError):        # the client may hang up at any time
            if tls is not None:
                conn = tls.wrap_socket(conn, server_side=True)
            received = b""
            while not stop.is_set():
                while b"\r\n\r\n" not in received:
                    data = conn.recv(65536)
                    if not data:
                        return
                    received += data
                head, _, received = received.partition(b"\r\n\r\n")
                match = RANGE.search(head + b"\r\n")
                assert match is not None, head
                answer, close = script(int(match[1]), int(match[2]), next(count))
                conn.sendall(answer)
                if close:
                    conn.shutdown(socket.SHUT_WR)
                    return

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(10)
            worker = threading.Thread(target=serve, args=(conn,), daemon=True)
            worker.start()
            workers.append(worker)

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        scheme = "http" if tls is None else "https"
        yield f"{scheme}://127.0.0.1:{listener.getsockname()[1]}/disk.raw"
    finally:
        stop.set()
        acceptor.join()
        listener.close()
        for worker in workers:
            worker.join(timeout=10)


def first_answer_is(answer: bytes) -> Script:
    """The probe gets `answer` (then the connection closes); later requests
    get correct answers."""
    def script(first: int, last: int, number: int) -> Answer:
        return (answer, True) if number == 0 else (partial(first, last), False)
    return script


@pytest.mark.parametrize("answer, reason", [
    (b"HTTP/1.1 206 OK\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n",
     "a head longer than 61440 bytes"),
    (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", "bad status line 'SSH-2.0-OpenSSH_9.2'"),
    (b"HTTP/1.1 206 OK\r\nContent-Range: bytes 0-0/65536\r\nContent-Length: one\r\n\r\nx",
     "bad Content-Length 'one'"),
    (b"HTTP/1.1 206 OK\r\nContent-Range: bytes 0-0/65536\r\nContent-Length: 1\r\n"
     b"Content-Length: 2\r\n\r\nx", "conflicting Content-Length '1, 2'"),
    (b"HTTP/1.1 206 OK\r\nContent-Range: bytes 0-0/65536\r\nContent-Length: 1\r\n\r\n",
     "the server closed the connection in the middle of a body"),
    (b"HTTP/1.1 206 OK\r\nContent-Range: bytes 0-0/65536\r\n",
     "the server closed the connection in the middle of a head"),
    (b"", "the server closed the connection"),
    (b"HTTP/1.1 206 OK\r\nContent-Range: bytes 0-0/65536\r\nContent-Length: 2\r\n\r\nxy",
     "the server sent more than the range asked for"),
    (b"HTTP/1.1 206 OK\r\nContent-Range: bytes 0-0/65536\r\nTransfer-Encoding: chunked\r\n"
     b"\r\nzz\r\n", "bad chunk size line 'zz'"),
    (b"HTTP/1.1 206 OK\r\nContent-Range: bytes 0-0/65536\r\nTransfer-Encoding: chunked\r\n"
     b"\r\n1\r\nxy\r\n0\r\n\r\n", "a chunk longer than its size"),
])
def test_bad_first_answer_is_refused_in_one_line(answer: bytes, reason: str) -> None:
    with scripted(first_answer_is(answer)) as url:
        message = refused("info", url)
    assert message == f"imgfs: {url}: connection lost (not a valid HTTP answer: {reason})\n" \
        or message == f"imgfs: {url}: connection lost ({reason})\n", message


def read_all(url: str, reads: list[tuple[int, int]], timeout: int = 5) -> list[bytes | int]:
    """Each read's bytes, or the errno it failed with (readahead off;
    a self-signed certificate accepted)."""
    options = {"file.readahead": "0", "file.timeout": str(timeout)}
    if url.startswith("https:"):
        options["file.sslverify"] = "off"

    async def body() -> list[bytes | int]:
        node = await open_image(url, OpenContext(read_only=True), fmt="raw", options=options)
        results: list[bytes | int] = []
        try:
            for offset, length in reads:
                try:
                    results.append(await node.read(offset, length))
                except ImgfsError as exc:
                    results.append(exc.errno)
        finally:
            await node.aclose()
        return results
    return run_trio(body)  # type: ignore[no-any-return]


@pytest.mark.parametrize("bad", [
    lambda first, last: (partial(first, last)[:-100], True),                 # truncated body
    lambda first, last: (partial(first, last + 1, body=DATA[first:last + 2]), False),
    lambda first, last: (partial(first, last, "Content-Length: 99999"), False),
    lambda first, last: (b"HTTP/1.1 206 OK\r\n" + b"X: y\r\n" * 20000, False),
    lambda first, last: (b"\x00\x01garbage\r\n\r\n", False),
    lambda first, last: (b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n", False),
    lambda first, last: (until_close(first, last, DATA[first:last + 2]), True),
    lambda first, last: (until_close(first, last, DATA[first:last]), True),
], ids=["truncated", "longer", "bad-length", "oversized-head", "garbage", "error-status",
        "longer-until-close", "shorter-until-close"])
def test_bad_answer_to_a_read_is_eio_and_the_next_read_works(bad: Callable[[int, int],
                                                                               Answer]) -> None:
    def script(first: int, last: int, number: int) -> Answer:
        return bad(first, last) if number == 1 else (partial(first, last), False)
    with scripted(script) as url:
        assert read_all(url, [(4096, 4096), (8192, 4096)]) == [5, DATA[8192:12288]]


def test_chunked_and_close_delimited_bodies_and_interim_answers() -> None:
    def script(first: int, last: int, number: int) -> Answer:
        body = DATA[first:last + 1]
        if number == 1:
            return (b"HTTP/1.1 100 Continue\r\n\r\n"
                    + partial(first, last, "Transfer-Encoding: chunked", body=b"")
                    + chunked(body, 1000), False)
        if number == 2:                   # HTTP/1.0 without a length: until close
            return partial(first, last, "Connection: close", body=b"").replace(
                b"HTTP/1.1", b"HTTP/1.0").replace(b"Content-Length: 0\r\n", b"") + body, True
        if number == 3:                   # bytes after the answer: the connection is dropped
            return partial(first, last) + b"HTTP/1.1 200 OK\r\n\r\n", False
        return partial(first, last), False
    reads = [(0, 5000), (30000, 4096), (100, 1), (65535, 1), (512, 32768)]
    with scripted(script) as url:
        assert read_all(url, reads) == [DATA[offset:offset + length]
                                        for offset, length in reads]


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> ssl.SSLContext:
    cert, key = make_certificate(tmp_path_factory.mktemp("tls"))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


@pytest.mark.parametrize("cut", [20, -100], ids=["in-head", "in-body"])
@pytest.mark.parametrize("https", [False, True], ids=["http", "https"])
def test_a_server_that_stalls_is_bounded_by_the_timeout(cut: int, https: bool,
                                                        tls: ssl.SSLContext) -> None:
    """The read whose answer stops short (the connection left open) fails
    (EIO) after `timeout`; the next one works."""
    def script(first: int, last: int, number: int) -> Answer:
        answer = partial(first, last)
        return (answer[:cut], False) if number == 1 else (answer, False)
    with scripted(script, tls if https else None) as url:
        started = time.monotonic()
        assert read_all(url, [(0, 4096), (4096, 4096)], timeout=1) == [5, DATA[4096:8192]]
        assert 1 <= time.monotonic() - started < 5


def test_a_connection_closed_while_idle_is_replaced_without_an_error() -> None:
    """A server that closes every connection after one answer without
    saying so (as at a keep-alive timeout): each next request finds its
    connection closed before any answer, and is sent again on a new one."""
    def script(first: int, last: int, number: int) -> Answer:
        return partial(first, last), True
    reads = [(offset, 4096) for offset in range(0, 40960, 4096)]
    with scripted(script) as url:
        assert read_all(url, reads) == [DATA[offset:offset + 4096] for offset, _ in reads]
