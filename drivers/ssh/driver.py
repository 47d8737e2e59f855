"""The ``ssh`` protocol driver: a file on any machine one can ssh into.

Syntax and options: see `target` (QEMU's ``ssh`` driver's).  Transport and
login: libssh in this process (see `transport`, `libssh`); SFTP v3 spoken
by imgfs on its channel (`sftp`), with requests pipelined.

Read and write; resizing (fsetstat); flush is ``fsync@openssh.com`` when
the server offers it, otherwise QEMU's warning, once.  ``imgfs create``
makes the file (mode 0644).

When the connection is lost, the requests in flight fail with EIO; a later
request reconnects (a new SSH session, the file reopened, its size checked),
no sooner than a backoff delay after the last failed attempt, and after
`RECONNECT_DELAYS` failures in a row the source fails with EIO for good.
The mount stays up throughout.
"""
from __future__ import annotations

import logging
from typing import Any, cast

import trio

from imgfs.block import BlockDriver, Kind
from imgfs.errors import (
    ImgfsError,
    PermissionDenied,
    ReadOnly,
    Unreachable,
    Unsupported,
    UsageError,
)
from imgfs.node import OpenContext
from imgfs.options import Opt, Schema, Str, choice

from .sftp import (
    FSYNC_EXTENSION,
    SSH_FXF_CREAT,
    SSH_FXF_READ,
    SSH_FXF_TRUNC,
    SSH_FXF_WRITE,
    SftpSession,
)
from .target import Target, parse_server, parse_ssh_filename, resolve_target
from .transport import SshConnection

log = logging.getLogger("imgfs")

#: seconds to connect and log in (the `timeout` option's default)
DEFAULT_TIMEOUT = 10.0
#: a server silent this many times `timeout` while requests wait is lost
REPLY_TIMEOUT_FACTOR = 3
#: seconds between reconnection attempts, one per failure; then give up
RECONNECT_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0, 8.0)
#: mode of files `imgfs create` makes
CREATE_MODE = 0o644


def parse_timeout(value: Any) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"'{value}' is not a number of seconds") from None
    if not 0 < seconds <= 3600:
        raise UsageError(f"timeout {value} out of range (0 to 3600 seconds)")
    return seconds


async def connect(target: Target, timeout: float) -> SshConnection:
    return await SshConnection.start(target, timeout=timeout,
                                     reply_timeout=REPLY_TIMEOUT_FACTOR * timeout)


class SshDriver(BlockDriver):
    name = "ssh"
    kind = Kind.PROTOCOL
    prefixes = ("ssh:",)
    description = "files on SSH servers, over SFTP (ssh://[USER@]HOST[:PORT]/PATH)"
    async_io = True
    busy_poll = True
    open_opts = Schema(
        Opt("server", parse_server, help="server address: host and port"),
        Opt("host", Str, help="legacy: server host name"),
        Opt("port", Str, help="legacy: server port (default 22)"),
        Opt("user", Str, help="user name (default: ~/.ssh/config's, else the local user)"),
        Opt("path", Str, help="path of the file on the server"),
        Opt("host_key_check", Str, help="yes (~/.ssh/known_hosts), no, or md5:/sha1:/sha256:HEX"),
        Opt("host-key-check", lambda value: value,
            help="mode=none|known_hosts|hash, with type=md5|sha1|sha256 and hash=HEX"),
        Opt("timeout", parse_timeout, default=DEFAULT_TIMEOUT,
            help="seconds to connect and log in; 3 times this without any reply is a "
                 "lost connection"),
        Opt("filename", Str, help="an ssh:// URL"),
    )
    create_opts = Schema(
        Opt("preallocation", choice("off"), default="off", help="only off (a sparse file)"),
    )

    conn: SshConnection | None = None
    handle: bytes = b""
    target: Target
    timeout: float = DEFAULT_TIMEOUT
    #: False once the server turned down fsync@openssh.com (warned once)
    fsync: bool = True
    warned_no_fsync: bool = False

    @classmethod
    def parse_filename(cls, filename: str) -> dict[str, Any]:
        return parse_ssh_filename(filename)

    async def open(self, options: dict[str, Any], ctx: OpenContext) -> None:
        self.target = resolve_target(options)
        self.timeout = options.get("timeout") or DEFAULT_TIMEOUT
        self._reconnect_lock = trio.Lock()
        self._failed_attempts = 0
        self._next_attempt = 0.0
        self._gave_up: str | None = None
        self._lost_reason = ""
        try:
            await self._first_connection(ctx)
        except ImgfsError as exc:
            # A source given as a json: tree or options has no URL of its
            # own for the message to start with: name the one it means.
            if not options.get("filename") and exc.path is None:
                exc.path = self.target.url()
            raise

    async def _first_connection(self, ctx: OpenContext) -> None:
        self.conn = conn = await connect(self.target, self.timeout)
        try:
            self.handle, self.writable = await self._open_file(
                conn.session, True if self.node.read_only else ctx.read_only)
            self.size = await conn.session.fstat_size(self.handle)
        except BaseException:
            await conn.stop()
            self.conn = None
            raise
        self.can_resize = self.writable
        self.fsync = FSYNC_EXTENSION in conn.session.extensions

    async def _open_file(self, session: SftpSession, read_only: bool | None) -> tuple[bytes, bool]:
        path = self.target.path.encode()
        if read_only:
            return await session.open(path, SSH_FXF_READ), False
        try:
            return await session.open(path, SSH_FXF_READ | SSH_FXF_WRITE), True
        except PermissionDenied:
            # Undecided opens fall back to read-only, as local files do.
            if read_only is None:
                return await session.open(path, SSH_FXF_READ), False
            raise

    async def aclose(self) -> None:
        conn, self.conn = self.conn, None
        if conn is None:
            return
        with trio.CancelScope(shield=True):
            if conn.session.broken is None:
                with trio.move_on_after(self.timeout):
                    try:
                        await conn.session.close(self.handle)
                    except ImgfsError:
                        pass
            await conn.stop()

    # -- the connection, kept up ----------------------------------------------------

    def _live_session(self) -> SftpSession | None:
        """The session when the connection is up (no await: reads ask first)."""
        conn = self.conn
        return conn.session if conn is not None and conn.session.broken is None else None

    async def _session(self) -> SftpSession:
        session = self._live_session()
        if session is not None:
            return session
        async with self._reconnect_lock:
            conn = self.conn
            if conn is not None and conn.session.broken is None:
                return conn.session
            return await self._reconnect()

    async def _reconnect(self) -> SftpSession:
        url = self.target.url()
        if self._gave_up is not None:
            raise Unreachable(f"{url}: {self._gave_up}")
        if self.conn is not None:
            self._lost_reason = self.conn.session.broken or "connection lost"
            await self.conn.stop()
            self.conn = None
        if trio.current_time() < self._next_attempt:
            raise Unreachable(f"{url}: {self._lost_reason}; reconnecting")
        try:
            conn = await connect(self.target, self.timeout)
        except ImgfsError as exc:
            self._attempt_failed(f"{exc}")
            raise Unreachable(f"{url}: {self._lost_reason}; reconnecting failed: {exc}") from None
        try:
            handle, _ = await self._open_file(conn.session, not self.writable)
            size = await conn.session.fstat_size(handle)
        except ImgfsError as exc:
            await conn.stop()
            self._attempt_failed(f"{exc}")
            raise Unreachable(f"{url}: reopening the file failed: {exc}") from None
        if size != self.size:
            await conn.stop()
            self._gave_up = (f"the file changed size while disconnected ({self.size} -> "
                             f"{size} bytes)")
            raise Unreachable(f"{url}: {self._gave_up}")
        log.warning("%s: reconnected after: %s", url, self._lost_reason)
        self.conn, self.handle, self._failed_attempts = conn, handle, 0
        return conn.session

    def _attempt_failed(self, reason: str) -> None:
        self._failed_attempts += 1
        if self._failed_attempts >= len(RECONNECT_DELAYS):
            self._gave_up = (f"{self._lost_reason}; gave up after {self._failed_attempts} "
                             f"reconnection attempts (last: {reason})")
            return
        delay = RECONNECT_DELAYS[self._failed_attempts - 1]
        self._next_attempt = trio.current_time() + delay

    # -- I/O ----------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes:
        session = self._live_session()
        if session is None:
            session = await self._session()
        # Received in place: a bytearray serves every caller as bytes would.
        return cast(bytes, await session.read(self.handle, offset, length))

    async def write(self, offset: int, data: bytes) -> None:
        if not self.writable:
            raise ReadOnly(f"{self.target.url()}: the file is read-only on the server")
        session = await self._session()
        await session.write(self.handle, offset, data)

    async def flush(self) -> None:
        if not self.writable or self.node.read_only:
            return
        session = await self._session()
        if self.fsync:
            try:
                await session.fsync(self.handle)
                return
            except Unsupported:
                self.fsync = False
        if not self.warned_no_fsync:
            self.warned_no_fsync = True
            log.warning('ssh server "%s" does not support fsync', self.target.host_port())

    async def truncate(self, size: int, preallocation: str = "off") -> None:
        if preallocation != "off":
            raise Unsupported(f"preallocation={preallocation} is not supported over ssh")
        session = await self._session()
        await session.set_size(self.handle, size)
        self.size = size

    # -- creation -------------------------------------------------------------------

    @classmethod
    async def create(cls, target: Any, size: int, options: dict[str, Any],
                     ctx: OpenContext) -> None:
        where = resolve_target(parse_ssh_filename(str(target)))
        conn = await connect(where, DEFAULT_TIMEOUT)
        try:
            session = conn.session
            handle = await session.open(where.path.encode(), SSH_FXF_READ | SSH_FXF_WRITE
                                        | SSH_FXF_CREAT | SSH_FXF_TRUNC, CREATE_MODE)
            await session.set_size(handle, size)
            await session.close(handle)
        finally:
            await conn.stop()
