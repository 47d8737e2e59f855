"""HTTP/1.1 range requests over a small pool of persistent connections.

h11 speaks the protocol and does no I/O; trio streams carry it (a
`trio.SocketStream`, which sets TCP_NODELAY, and for https a
`trio.SSLStream` over it).  Each request runs on a connection of its own
from the pool, so several are in flight at once; a connection goes back to
the pool only once its answer was read completely.

Failures: an idle connection the server closed (keep-alive timeout) is
replaced at once and the request sent again; any other loss fails the
request (EIO) and the next request connects anew, paced by
`imgfs.netio.Reconnect`.  Every request is bounded by the `timeout`.
"""
from __future__ import annotations

import base64
import functools
import os
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import h11
import trio

from imgfs import __version__
from imgfs.errors import (
    ImgfsError,
    NotFound,
    PermissionDenied,
    Unreachable,
    Unsupported,
    UsageError,
)
from imgfs.netio import Reconnect, printable, socket_reason
from imgfs.options import KiB

from .proxy import choose_proxy, open_tunnel, request_target
from .url import Url, content_range

#: bytes asked of the socket at once
RECEIVE_SIZE = 256 * KiB
#: the longest status line plus headers accepted
MAX_HEADER_BYTES = 64 * KiB
#: redirects followed before giving up (curl's limit is larger; loops are the usual cause)
MAX_REDIRECTS = 10
REDIRECTS = frozenset({301, 302, 303, 307, 308})
#: a redirect's or an error's body is read (to keep the connection) up to this
MAX_SKIPPED_BODY = 64 * KiB
#: connections (and so requests in flight) per server
POOL_SIZE = 4
USER_AGENT = f"imgfs/{__version__}"

T = TypeVar("T")
NETWORK_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)


class Lost(Exception):
    """The connection failed or broke the protocol (message: why)."""


@dataclass
class Settings:
    """How to talk to the server: the driver's options, resolved."""

    timeout: float
    sslverify: bool = True
    #: Authorization and Cookie headers, sent only to the origin they were given for
    credentials: list[tuple[str, str]] = field(default_factory=list)
    pool_size: int = POOL_SIZE
    #: where the proxy settings come from (os.environ, as libcurl's)
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    #: the driver's proxy-username / proxy-password-secret
    proxy_username: str | None = None
    proxy_password: bytes | None = None

    @functools.cached_property
    def ssl_context(self) -> ssl.SSLContext:
        """The system's trust store (SSL_CERT_FILE / SSL_CERT_DIR override
        it), or no verification at all (sslverify=off)."""
        context = ssl.create_default_context()
        if not self.sslverify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context


def basic_auth(username: str, password: bytes) -> tuple[str, str]:
    """RFC 7617: user-id ":" password, in UTF-8 (a secret's bytes as they are)."""
    token = base64.b64encode(username.encode() + b":" + password).decode()
    return ("Authorization", f"Basic {token}")


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


def header(response: h11.Response, name: bytes) -> str | None:
    """The last value of header `name` (lower case), if any."""
    value = None
    for key, item in response.headers:
        if key == name:
            value = item.decode("latin-1")
    return value


def content_length(response: h11.Response) -> int | None:
    """The body's length, when Content-Length alone frames it."""
    if header(response, b"transfer-encoding") is not None:
        return None
    value = header(response, b"content-length")
    return int(value) if value is not None and value.isdigit() else None


def keeps_alive(response: h11.Response) -> bool:
    """Whether the server keeps the connection open after this answer (RFC 9112 9.3)."""
    connection = (header(response, b"connection") or "").lower()
    return response.http_version == b"1.1" and "close" not in connection


def status_error(url: Url, response: h11.Response) -> ImgfsError:
    """The error an unexpected status means."""
    status = response.status_code
    message = f"{url.display}: HTTP {status} {printable(response.reason)}".rstrip()
    if status == 407:
        return PermissionDenied(message + " (proxy authentication failed or needed)")
    if status == 401:
        return PermissionDenied(message + " (authentication failed or needed)")
    if status == 403:
        return PermissionDenied(message)
    if status in (404, 410):
        return NotFound(message)
    return ImgfsError(message)


class Connection:
    """One HTTP/1.1 connection: a trio stream and h11's state for it."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.protocol = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEADER_BYTES)
        #: the server sent something since the current request went out
        self.heard_back = False
        #: the last body bypassed h11, which must then start afresh
        self.bypassed_body = False
        self.keep_alive = False

    async def send(self, request: h11.Request) -> None:
        try:
            data = self.protocol.send(request) + self.protocol.send(h11.EndOfMessage())
        except h11.LocalProtocolError as exc:
            raise Lost(f"cannot send the request: {exc}") from None
        self.heard_back = False
        try:
            await self.stream.send_all(data)
        except NETWORK_ERRORS as exc:
            raise Lost(socket_reason(exc)) from None

    def _poll(self) -> Any:
        """h11's next event, or NEED_DATA."""
        try:
            event = self.protocol.next_event()
        except h11.RemoteProtocolError as exc:
            raise Lost(f"not a valid HTTP answer: {exc}") from None
        if isinstance(event, h11.ConnectionClosed):
            raise Lost("the server closed the connection")
        if event is h11.PAUSED:
            raise Lost("the server answered more than was asked")
        return event

    async def _feed(self) -> None:
        """Give h11 what the server sent next."""
        try:
            data = await self.stream.receive_some(RECEIVE_SIZE)
        except NETWORK_ERRORS as exc:
            raise Lost(ssl_reason(exc) or socket_reason(exc)) from None
        self.heard_back = self.heard_back or bool(data)
        self.protocol.receive_data(bytes(data) if isinstance(data, bytearray) else data)

    async def next_event(self) -> h11.Event:
        while (event := self._poll()) is h11.NEED_DATA:
            await self._feed()
        return cast(h11.Event, event)

    async def response(self) -> h11.Response:
        while True:
            event = await self.next_event()
            if isinstance(event, h11.Response):
                return event
            if not isinstance(event, h11.InformationalResponse):
                raise Lost(f"unexpected {type(event).__name__} before the status line")

    async def body_into(self, response: h11.Response, view: memoryview) -> int:
        """Receive the body into `view`; how many bytes it had.

        What h11 holds of the body already comes through h11; when the body
        is exactly `view` long, the rest is received straight into `view`
        (through h11 every byte would be copied twice more), and the
        connection's next request starts with a fresh h11 state."""
        filled = 0
        direct = len(view) if content_length(response) == len(view) else None
        while True:
            event = self._poll()
            if event is h11.NEED_DATA:
                if direct is not None:
                    break
                await self._feed()
            elif isinstance(event, h11.Data):
                count = len(event.data)
                if filled + count > len(view):
                    raise Lost("the server sent more than the range asked for")
                view[filled:filled + count] = event.data
                filled += count
            elif isinstance(event, h11.EndOfMessage):
                return filled
            else:
                raise Lost(f"unexpected {type(event).__name__} in a body")
        while filled < len(view):
            filled += await self._receive_into(view[filled:])
        self.bypassed_body = True
        self.keep_alive = keeps_alive(response)
        return filled

    async def _receive_into(self, view: memoryview) -> int:
        try:
            if isinstance(self.stream, trio.SocketStream):
                count = await self.stream.socket.recv_into(view)
            else:
                data = await self.stream.receive_some(len(view))
                count = len(data)
                view[:count] = data
        except NETWORK_ERRORS as exc:
            raise Lost(ssl_reason(exc) or socket_reason(exc)) from None
        if count == 0:
            raise Lost("the server closed the connection in the middle of a body")
        self.heard_back = True
        return count

    async def skip_body(self) -> None:
        """Read a short body to keep the connection; a long one is not read
        (the connection is then closed instead of reused)."""
        skipped = 0
        while skipped <= MAX_SKIPPED_BODY:
            event = await self.next_event()
            if isinstance(event, h11.EndOfMessage):
                return
            if isinstance(event, h11.Data):
                skipped += len(event.data)

    def reuse(self) -> bool:
        """Ready the connection for its next request, if it can have one."""
        if self.bypassed_body:
            self.bypassed_body = False
            self.protocol = h11.Connection(h11.CLIENT,
                                           max_incomplete_event_size=MAX_HEADER_BYTES)
            return self.keep_alive
        if self.protocol.our_state is h11.DONE and self.protocol.their_state is h11.DONE:
            self.protocol.start_next_cycle()
            return True
        return False

    async def close(self) -> None:
        await trio.aclose_forcefully(self.stream)


class Pool:
    """Persistent connections to one origin, at most `pool_size` busy at once."""

    def __init__(self, url: Url, settings: Settings, reconnect: Reconnect) -> None:
        self.url = url
        self.settings = settings
        self.reconnect = reconnect
        self.idle: list[Connection] = []
        self.slots = trio.Semaphore(settings.pool_size)
        self.proxy = choose_proxy(url, settings.environ, settings.proxy_username,
                                  settings.proxy_password)
        #: most requests that were in flight at once (for tests and stats)
        self.peak_in_flight = 0

    async def connect(self) -> Connection:
        why_not = self.reconnect.check()
        if why_not is not None:
            raise Unreachable(f"{self.url.display}: {why_not}")
        proxy = self.proxy
        host, port = (self.url.host, self.url.port) if proxy is None else \
            (proxy.host, proxy.port)
        try:
            stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
            if proxy is not None and self.url.scheme == "https":
                await open_tunnel(stream, proxy, self.url)
            if self.url.scheme == "https":
                stream = trio.SSLStream(stream, self.settings.ssl_context,
                                        server_hostname=self.url.host, https_compatible=True)
                await stream.do_handshake()
        except NETWORK_ERRORS as exc:
            reason = ssl_reason(exc) or socket_reason(exc)
            self.reconnect.failed(reason)
            through = "" if proxy is None else f" through the proxy {proxy.display}"
            raise Unreachable(f"cannot connect to {self.url.display}{through}: {reason}") \
                from None
        self.reconnect.succeeded()
        return Connection(stream)

    async def exchange(self, request: h11.Request,
                       answer: Callable[[Connection, h11.Response], Awaitable[T]]) -> T:
        """Send `request` and let `answer` read the response.

        A kept-alive connection that the server closed before answering is
        dropped and the request sent again; other failures raise
        Unreachable, and every attempt is bounded by the timeout."""
        async with self.slots:
            in_flight = self.settings.pool_size - self.slots.value
            self.peak_in_flight = max(self.peak_in_flight, in_flight)
            while True:
                conn = self.idle.pop() if self.idle else None
                reused = conn is not None
                try:
                    with trio.fail_after(self.settings.timeout):
                        if conn is None:
                            conn = await self.connect()
                        await conn.send(request)
                        result = await answer(conn, await conn.response())
                except Lost as exc:
                    assert conn is not None
                    await conn.close()
                    if reused and not conn.heard_back:
                        continue            # closed while idle: try another
                    raise Unreachable(f"{self.url.display}: connection lost ({exc})") from None
                except trio.TooSlowError:
                    if conn is None:
                        self.reconnect.failed("timed out")
                    else:
                        await conn.close()
                    raise Unreachable(f"{self.url.display}: no answer within "
                                      f"{self.settings.timeout:g} s") from None
                except BaseException:
                    if conn is not None:
                        await conn.close()
                    raise
                if conn.reuse():
                    self.idle.append(conn)
                else:
                    await conn.close()
                return result

    async def aclose(self) -> None:
        while self.idle:
            await self.idle.pop().close()


@dataclass(frozen=True)
class Validators:
    """What identifies one version of the file (RFC 9110 8.8)."""

    etag: str | None
    last_modified: str | None

    @classmethod
    def of(cls, response: h11.Response) -> Validators:
        return cls(header(response, b"etag"), header(response, b"last-modified"))

    def moved(self, now: Validators) -> str | None:
        """How `now` shows a different version than this one, if it does."""
        if self.etag is not None and now.etag != self.etag:
            return f"ETag {self.etag} became {now.etag}"
        if self.last_modified is not None and now.last_modified != self.last_modified:
            return f"Last-Modified {self.last_modified} became {now.last_modified}"
        return None


class HttpFile:
    """One file on a web server, read with range requests.

    `open` follows redirects and learns the size and the validators from a
    ``Range: bytes=0-0`` request; every later request goes to the URL the
    redirects ended at, and its answer must carry the same validators and
    size, or the file is taken as changed and every read fails from then on.
    """

    def __init__(self, url: Url, settings: Settings) -> None:
        self.url = url
        self.settings = settings
        #: credentials go only to the origin they were given for
        self.credentials_origin = url.origin
        self.reconnect = Reconnect()
        self.pool = Pool(url, settings, self.reconnect)
        self.size = 0
        self.validators = Validators(None, None)
        #: set once an answer showed another version of the file
        self.changed: str | None = None

    def _request(self, first: int, last: int) -> h11.Request:
        headers = [("Host", self.url.authority), ("User-Agent", USER_AGENT),
                   ("Accept-Encoding", "identity"), ("Range", f"bytes={first}-{last}")]
        if self.url.origin == self.credentials_origin:
            headers += self.settings.credentials
        proxy = self.pool.proxy
        if proxy is not None and self.url.scheme == "http":
            headers += proxy.headers()
        return h11.Request(method="GET", target=request_target(self.url, proxy),
                           headers=headers)

    # -- opening ----------------------------------------------------------------

    async def open(self) -> None:
        for _hop in range(MAX_REDIRECTS + 1):
            location = await self.pool.exchange(self._request(0, 0), self._probe_answer)
            if location is None:
                return
            await self._redirect(location)
        raise ImgfsError(f"{self.url.display}: more than {MAX_REDIRECTS} redirects")

    async def _redirect(self, location: str) -> None:
        try:
            target = self.url.join(location)
        except UsageError as exc:
            raise ImgfsError(f"{self.url.display}: redirected to an unusable URL ({exc})") \
                from None
        if target.origin != self.url.origin:
            await self.pool.aclose()
            self.pool = Pool(target, self.settings, self.reconnect)
        self.url = target

    async def _probe_answer(self, conn: Connection, response: h11.Response) -> str | None:
        """The redirect's Location, or None once the size and validators are known."""
        status = response.status_code
        if status in REDIRECTS:
            location = header(response, b"location")
            if not location:
                raise ImgfsError(f"{self.url.display}: HTTP {status} without a Location")
            await conn.skip_body()
            return location
        if status == 200 and content_length(response) == 0:
            await conn.skip_body()          # an empty file: nothing to range over
            self.validators = Validators.of(response)
            return None
        if status == 200:
            raise Unsupported(f"{self.url.display}: the server does not support range "
                              "requests (it answered a Range request with the whole file)")
        if status not in (206, 416):
            raise status_error(self.url, response)
        first, _, total = self._content_range(response)
        if total is None:
            raise Unsupported(f"{self.url.display}: the server does not tell the file's size")
        if status == 206 and first != 0:
            raise ImgfsError(f"{self.url.display}: asked for byte 0, got byte {first}")
        await (conn.body_into(response, memoryview(bytearray(1))) if status == 206
               else conn.skip_body())
        self.size = total
        self.validators = Validators.of(response)
        return None

    def _content_range(self, response: h11.Response) -> tuple[int | None, int | None,
                                                                int | None]:
        value = header(response, b"content-range")
        if value is None:
            raise ImgfsError(f"{self.url.display}: HTTP {response.status_code} "
                             "without a Content-Range")
        try:
            return content_range(value)
        except ValueError as exc:
            raise ImgfsError(f"{self.url.display}: {exc}") from None

    # -- reading ----------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytearray:
        """Bytes `offset` to `offset + length` (within the size) of the file."""
        self.check_unchanged()
        buffer = bytearray(length)

        async def answer(conn: Connection, response: h11.Response) -> None:
            self._check_answer(response, offset, length)
            received = await conn.body_into(response, memoryview(buffer))
            if received != length:
                raise Lost(f"{received} bytes of a {length}-byte range")

        await self.pool.exchange(self._request(offset, offset + length - 1), answer)
        return buffer

    def check_unchanged(self) -> None:
        if self.changed is not None:
            raise ImgfsError(f"{self.url.display}: the file changed on the server "
                             f"({self.changed}); remount to read the new version")

    def _check_answer(self, response: h11.Response, offset: int, length: int) -> None:
        status = response.status_code
        if status == 416:
            self.changed = "a range inside the file is now past its end"
        elif status != 206:
            raise status_error(self.url, response)
        else:
            self.changed = self.validators.moved(Validators.of(response))
            first, last, total = self._content_range(response)
            if self.changed is None and total != self.size:
                self.changed = f"its size {self.size} became {total}"
            if self.changed is None and (first, last) != (offset, offset + length - 1):
                raise ImgfsError(f"{self.url.display}: asked for bytes {offset}-"
                                 f"{offset + length - 1}, got {first}-{last}")
        self.check_unchanged()

    async def aclose(self) -> None:
        await self.pool.aclose()
