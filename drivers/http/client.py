"""HTTP/1.1 range requests over a small pool of persistent connections.

`wire` writes the requests and parses the answers, `connection` carries
them.  Each request runs on a connection of its own from the pool, so
several are in flight at once; a connection goes back to the pool only
once its answer was read completely.

Failures: an idle connection the server closed (keep-alive timeout) is
replaced at once and the request sent again; any other loss fails the
request (EIO) and the next request connects anew, paced by
`imgfs.netio.Reconnect`.  Every request is bounded by the `timeout`
(a watchdog task per pool closes a connection whose request outlived it).
"""
from __future__ import annotations

import base64
import functools
import os
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple, TypeVar

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

from .connection import (
    NETWORK_ERRORS,
    Connection,
    Lost,
    SocketTransport,
    StreamTransport,
    ssl_reason,
)
from .proxy import choose_proxy, open_tunnel, request_target
from .url import Url, content_range
from .wire import Response, request_head

#: redirects followed before giving up (curl's limit is larger; loops are the usual cause)
MAX_REDIRECTS = 10
REDIRECTS = frozenset({301, 302, 303, 307, 308})
#: connections (and so requests in flight) per server
POOL_SIZE = 4
USER_AGENT = f"imgfs/{__version__}"

T = TypeVar("T")


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


def status_error(url: Url, response: Response) -> ImgfsError:
    """The error an unexpected status means."""
    status = response.status
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
        #: connections with a request on them -> when it must be done
        self.busy: dict[Connection, float] = {}
        #: the scope of the task that ends requests at their deadline
        self.watchdog: trio.CancelScope | None = None

    async def connect(self) -> Connection:
        why_not = self.reconnect.check()
        if why_not is not None:
            raise Unreachable(f"{self.url.display}: {why_not}")
        proxy = self.proxy
        host, port = (self.url.host, self.url.port) if proxy is None else \
            (proxy.host, proxy.port)
        try:
            tcp = await trio.open_tcp_stream(host, port)
            tls = await self._tls(tcp) if self.url.scheme == "https" else None
        except NETWORK_ERRORS as exc:
            reason = ssl_reason(exc) or socket_reason(exc)
            self.reconnect.failed(reason)
            through = "" if proxy is None else f" through the proxy {proxy.display}"
            raise Unreachable(f"cannot connect to {self.url.display}{through}: {reason}") \
                from None
        self.reconnect.succeeded()
        return Connection(SocketTransport(tcp) if tls is None else StreamTransport(tls, tcp))

    async def _tls(self, tcp: trio.SocketStream) -> trio.SSLStream[trio.SocketStream]:
        """TLS on `tcp` (through the proxy's tunnel if there is one)."""
        if self.proxy is not None:
            await open_tunnel(tcp, self.proxy, self.url)
        tls = trio.SSLStream(tcp, self.settings.ssl_context, server_hostname=self.url.host,
                             https_compatible=True)
        await tls.do_handshake()
        return tls

    async def exchange(self, request: bytes,
                       answer: Callable[[Connection, Response], Awaitable[T]]) -> T:
        """Send `request` and let `answer` read the response.

        A kept-alive connection that the server closed before answering is
        dropped and the request sent again; other failures raise
        Unreachable, and every attempt is bounded by the timeout."""
        await self._take_slot()
        try:
            while True:
                conn = self.idle.pop() if self.idle else None
                reused = conn is not None
                deadline = trio.current_time() + self.settings.timeout
                try:
                    if conn is None:
                        conn = await self._connect_by(deadline)
                    result = await self._attempt(conn, deadline, request, answer)
                except Lost as exc:
                    assert conn is not None
                    await conn.close()
                    if conn.expired:
                        raise self._timed_out() from None
                    if reused and not conn.heard_back:
                        continue            # closed while idle: try another
                    raise Unreachable(f"{self.url.display}: connection lost ({exc})") from None
                except BaseException:
                    if conn is not None:
                        await conn.close()
                    raise
                if conn.reuse():
                    self.idle.append(conn)
                else:
                    await conn.close()
                return result
        finally:
            self.slots.release()

    async def _attempt(self, conn: Connection, deadline: float, request: bytes,
                       answer: Callable[[Connection, Response], Awaitable[T]]) -> T:
        """One request on `conn`, which the watchdog ends at `deadline`."""
        self._start_watchdog()
        self.busy[conn] = deadline
        try:
            await conn.send(request)
            return await answer(conn, await conn.response())
        finally:
            del self.busy[conn]

    async def _connect_by(self, deadline: float) -> Connection:
        with trio.move_on_at(deadline):
            return await self.connect()
        self.reconnect.failed("timed out")
        raise self._timed_out()

    def _timed_out(self) -> Unreachable:
        return Unreachable(f"{self.url.display}: no answer within {self.settings.timeout:g} s")

    def _start_watchdog(self) -> None:
        if self.watchdog is None:
            self.watchdog = trio.CancelScope()
            trio.lowlevel.spawn_system_task(self._watch, self.watchdog,
                                            name=f"http timeouts: {self.url.display}")

    async def _watch(self, scope: trio.CancelScope) -> None:
        """Expire every request past its deadline (its connection is
        closed under it, so it fails at once, as a timeout).

        A cancel scope around each request was one of the largest costs of
        a small read (bench/README.md); one task per pool (a trio system
        task: a pool has no nursery) instead sleeps until the oldest
        request's deadline.  Every deadline lies `timeout` after
        its request started, so a request that starts while this task
        sleeps has its deadline after the task wakes."""
        try:
            with scope:
                while True:
                    now = trio.current_time()
                    pending = []
                    for conn, deadline in list(self.busy.items()):
                        if deadline > now:
                            pending.append(deadline)
                        elif not conn.expired:
                            conn.expire()
                    await trio.sleep_until(min(pending, default=now + self.settings.timeout))
        finally:
            if self.watchdog is scope:
                self.watchdog = None        # (a later trio.run starts another)

    async def _take_slot(self) -> None:
        try:
            self.slots.acquire_nowait()     # (acquire() yields even when a slot is free)
        except trio.WouldBlock:
            await self.slots.acquire()
        in_flight = self.settings.pool_size - self.slots.value
        self.peak_in_flight = max(self.peak_in_flight, in_flight)

    async def aclose(self) -> None:
        if self.watchdog is not None:
            self.watchdog.cancel()
        while self.idle:
            await self.idle.pop().close()


class Validators(NamedTuple):
    """What identifies one version of the file (RFC 9110 8.8)."""

    etag: str | None
    last_modified: str | None

    @classmethod
    def of(cls, response: Response) -> Validators:
        return cls(response.header("etag"), response.header("last-modified"))

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
        #: the request line and fields of every request but its Range
        self.request_head = b""
        self._aim(url)

    def _request(self, first: int, last: int) -> bytes:
        return self.request_head + b"Range: bytes=%d-%d\r\n\r\n" % (first, last)

    def _aim(self, url: Url) -> None:
        """Send every later request to `url` (the pool already reaches its origin)."""
        self.url = url
        fields = [("Host", url.authority), ("User-Agent", USER_AGENT),
                  ("Accept-Encoding", "identity")]
        if url.origin == self.credentials_origin:
            fields += self.settings.credentials
        proxy = self.pool.proxy
        if proxy is not None and url.scheme == "http":
            fields += proxy.headers()
        try:
            self.request_head = request_head("GET", request_target(url, proxy), fields)
        except ValueError as exc:
            raise ImgfsError(f"{url.display}: {exc}") from None

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
        self._aim(target)

    async def _probe_answer(self, conn: Connection, response: Response) -> str | None:
        """The redirect's Location, or None once the size and validators are known."""
        status = response.status
        if status in REDIRECTS:
            location = response.header("location")
            if not location:
                raise ImgfsError(f"{self.url.display}: HTTP {status} without a Location")
            await conn.skip_body(response)
            return location
        if status == 200 and response.length == 0:
            await conn.skip_body(response)  # an empty file: nothing to range over
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
               else conn.skip_body(response))
        self.size = total
        self.validators = Validators.of(response)
        return None

    def _content_range(self, response: Response) -> tuple[int | None, int | None,
                                                             int | None]:
        value = response.header("content-range")
        if value is None:
            raise ImgfsError(f"{self.url.display}: HTTP {response.status} "
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

        async def answer(conn: Connection, response: Response) -> None:
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

    def _check_answer(self, response: Response, offset: int, length: int) -> None:
        status = response.status
        if status == 416:
            self.changed = "a range inside the file is now past its end"
        elif status != 206:
            raise status_error(self.url, response)
        else:
            now = Validators.of(response)
            if now != self.validators:
                self.changed = self.validators.moved(now)
            first, last, total = self._content_range(response)
            if self.changed is None and total != self.size:
                self.changed = f"its size {self.size} became {total}"
            if self.changed is None and (first, last) != (offset, offset + length - 1):
                raise ImgfsError(f"{self.url.display}: asked for bytes {offset}-"
                                 f"{offset + length - 1}, got {first}-{last}")
        self.check_unchanged()

    async def aclose(self) -> None:
        await self.pool.aclose()
