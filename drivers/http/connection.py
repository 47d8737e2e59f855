"""One HTTP/1.1 connection: requests out, answers in, bodies straight
into the caller's buffer.

http runs on a TCP socket of our own (`SocketTransport`), https on a
`trio.SSLStream` (`StreamTransport`); both are connected by trio (happy
eyeballs, TCP_NODELAY).  What the server sent is kept in a buffer until
it is read: an answer's head is parsed from it (`wire`), a body goes from
it and then straight from the connection into the caller's buffer.
"""
from __future__ import annotations

import socket
import ssl
from contextlib import suppress

import trio

from imgfs.netio import socket_reason
from imgfs.options import KiB

from .wire import BadAnswer, Response, chunk_size, parse_head

#: bytes a connection's buffer holds (a large body bypasses it)
RECEIVE_SIZE = 64 * KiB
#: the longest status line plus headers accepted (less than RECEIVE_SIZE)
MAX_HEADER_BYTES = 60 * KiB
#: the longest chunk size line accepted (the size and its extensions)
MAX_CHUNK_LINE = 4 * KiB
#: a redirect's or an error's body is read (to keep the connection) up to this
MAX_SKIPPED_BODY = 64 * KiB

NETWORK_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)


class Lost(Exception):
    """The connection failed or broke the protocol (message: why)."""


class Overflow(Lost):
    """The answer's body is longer than what it is read into."""


def ssl_reason(exc: BaseException) -> str | None:
    """Why a TLS handshake failed, if `exc` (or what caused it) says so."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return (f"certificate verification failed ({seen.verify_message}); "
                    "sslverify=off skips the check")
        if isinstance(seen, ssl.SSLError):
            return f"TLS handshake failed ({seen.reason or seen})"
        seen = seen.__cause__ or seen.__context__
    return None


class StreamTransport:
    """TLS (https): a `trio.SSLStream` over the TCP stream `tcp`."""

    def __init__(self, stream: trio.SSLStream[trio.SocketStream],
                 tcp: trio.SocketStream) -> None:
        self.stream = stream
        self.tcp = tcp

    async def send_all(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def receive_into(self, view: memoryview) -> int:
        """Receive into `view`; how many bytes came (0: the server closed)."""
        data = await self.stream.receive_some(len(view))
        view[:len(data)] = data
        return len(data)

    def abort(self) -> None:
        """Close the socket under whoever uses it (they fail at once)."""
        self.tcp.socket.close()

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


class SocketTransport:
    """A TCP socket of our own (http), called directly and waited on only
    when it would block: trio's socket methods add a trip through the
    scheduler to every call.  The answer to a request that just went out
    cannot be there yet, so its first receive waits before it tries."""

    def __init__(self, stream: trio.SocketStream) -> None:
        # the socket trio connected (happy eyeballs, TCP_NODELAY set), now ours
        self.socket = socket.socket(fileno=stream.socket.detach())
        self.socket.setblocking(False)
        self.answer_due = False

    async def send_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[self.socket.send(view):]
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self.socket)
        self.answer_due = True

    async def receive_into(self, view: memoryview) -> int:
        """Receive into `view`; how many bytes came (0: the server closed)."""
        if self.answer_due:
            self.answer_due = False
            await trio.lowlevel.wait_readable(self.socket)
        while True:
            try:
                return self.socket.recv_into(view)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.socket)

    def abort(self) -> None:
        """Close the socket under whoever uses it (they fail at once)."""
        if self.socket.fileno() >= 0:
            trio.lowlevel.notify_closing(self.socket)
            self.socket.close()

    async def aclose(self) -> None:
        self.abort()


Transport = StreamTransport | SocketTransport


class Connection:
    """One HTTP/1.1 connection: its transport and what was received from
    it but not read yet (``buffer[start:end]``)."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.buffer = bytearray(RECEIVE_SIZE)
        self.received = memoryview(self.buffer)
        self.start = self.end = 0
        #: the server sent something since the current request went out
        self.heard_back = False
        #: the current answer was read whole and leaves the connection usable
        self.reusable = False
        #: its request took too long and the connection was closed under it
        self.expired = False

    def expire(self) -> None:
        """End the request on this connection: it took too long.  (Called
        by the pool's watchdog task, which must not fail: a close that
        fails leaves the request to its own failure.)"""
        self.expired = True
        with suppress(OSError):
            self.transport.abort()

    async def send(self, request: bytes) -> None:
        self.heard_back = self.reusable = False
        try:
            await self.transport.send_all(request)
        except NETWORK_ERRORS as exc:
            raise Lost(socket_reason(exc)) from None

    async def _receive(self) -> int:
        """Receive more into the buffer (moving what it holds to its start
        when its end is reached); how many bytes came (0: none fit, or the
        server closed)."""
        if self.end == len(self.buffer) and self.start:
            held = self.end - self.start
            self.buffer[:held] = self.received[self.start:self.end]
            self.start, self.end = 0, held
        count = await self._receive_into(self.received[self.end:])
        self.end += count
        return count

    async def _receive_into(self, view: memoryview) -> int:
        if not view:
            return 0
        try:
            count = await self.transport.receive_into(view)
        except NETWORK_ERRORS as exc:
            raise Lost(ssl_reason(exc) or socket_reason(exc)) from None
        self.heard_back = self.heard_back or count > 0
        return count

    async def _line(self, limit: int) -> str:
        """The next CRLF-terminated line (without its CRLF), at most `limit` bytes."""
        scanned = self.start
        while (found := self.buffer.find(b"\r\n", scanned, self.end)) < 0:
            if self.end - self.start > limit + 1:
                raise Lost(f"not a valid HTTP answer: a line longer than {limit} bytes")
            scanned = max(self.start, self.end - 1)
            if not await self._receive():
                raise Lost("the server closed the connection in the middle of a body")
        line = self.buffer[self.start:found].decode("latin-1")
        self.start = found + 2
        return line

    async def response(self) -> Response:
        """The next final answer's head (1xx answers skipped)."""
        while True:
            response = await self._head()
            if response.status == 101:
                raise Lost("the server switched protocols")
            if response.status >= 200:
                return response

    async def _head(self) -> Response:
        scanned = self.start
        while (found := self.buffer.find(b"\r\n\r\n", scanned, self.end)) < 0:
            if self.end - self.start >= MAX_HEADER_BYTES:
                raise Lost(f"not a valid HTTP answer: a head longer than {MAX_HEADER_BYTES} "
                           "bytes")
            scanned = max(self.start, self.end - 3)
            if not await self._receive():
                raise Lost("the server closed the connection" if self.end == self.start
                           else "the server closed the connection in the middle of a head")
        head = self.buffer[self.start:found].decode("latin-1")
        self.start = found + 4
        try:
            return parse_head(head)
        except BadAnswer as exc:
            raise Lost(f"not a valid HTTP answer: {exc}") from None

    async def body_into(self, response: Response, view: memoryview) -> int:
        """Receive the body into `view`; how many bytes it had (more than
        `view` holds is an error)."""
        if response.chunked:
            filled = await self._chunked_into(view)
        elif response.length is None:
            filled = await self._rest_into(view)
        elif response.length > len(view):
            raise Overflow("the server sent more than the range asked for")
        else:
            filled = await self._exactly_into(view[:response.length])
        self.reusable = response.keep_alive and (response.chunked or
                                                 response.length is not None)
        return filled

    async def _exactly_into(self, view: memoryview) -> int:
        """Fill `view`: from the buffer first, then straight from the
        connection (a large body is not copied through the buffer)."""
        buffered = min(self.end - self.start, len(view))
        view[:buffered] = self.received[self.start:self.start + buffered]
        self.start += buffered
        filled = buffered
        while filled < len(view):
            count = await self._receive_into(view[filled:])
            if not count:
                raise Lost("the server closed the connection in the middle of a body")
            filled += count
        return len(view)

    async def _chunked_into(self, view: memoryview) -> int:
        filled = 0
        while size := self._chunk_size(await self._line(MAX_CHUNK_LINE)):
            if filled + size > len(view):
                raise Overflow("the server sent more than the range asked for")
            filled += await self._exactly_into(view[filled:filled + size])
            if await self._line(0):
                raise Lost("not a valid HTTP answer: a chunk longer than its size")
        trailers = 0
        while line := await self._line(MAX_HEADER_BYTES):
            trailers += len(line)
            if trailers > MAX_HEADER_BYTES:
                raise Lost(f"not a valid HTTP answer: trailers longer than {MAX_HEADER_BYTES} "
                           "bytes")
        return filled

    @staticmethod
    def _chunk_size(line: str) -> int:
        try:
            return chunk_size(line)
        except BadAnswer as exc:
            raise Lost(f"not a valid HTTP answer: {exc}") from None

    async def _rest_into(self, view: memoryview) -> int:
        """A body that ends when the server closes the connection."""
        filled = await self._exactly_into(view[:min(len(view), self.end - self.start)])
        while count := await self._receive_into(view[filled:]):
            filled += count
        if filled == len(view) and (self.end > self.start or await self._receive()):
            raise Overflow("the server sent more than the range asked for")
        return filled

    async def skip_body(self, response: Response) -> None:
        """Read a short body to keep the connection; a long one is not read
        (the connection is then closed instead of reused)."""
        if response.length is None and not response.chunked \
                or (response.length or 0) > MAX_SKIPPED_BODY:
            return
        try:
            await self.body_into(response, memoryview(bytearray(MAX_SKIPPED_BODY)))
        except Overflow:
            self.reusable = False

    def reuse(self) -> bool:
        """Ready the connection for its next request, if it can have one:
        its answer was read whole and nothing followed it."""
        if not self.reusable or self.start != self.end or self.expired:
            return False
        self.start = self.end = 0
        return True

    async def close(self) -> None:
        await self.transport.aclose()
