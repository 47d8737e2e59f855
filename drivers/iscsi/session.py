"""One libiscsi session, driven from trio through libiscsi's asynchronous API.

libiscsi never blocks and starts no thread: ``iscsi_*_task`` calls queue a
command, and ``iscsi_service(revents)`` sends what is queued, receives
replies and calls each command's completion callback.  The session is an
`imgfs.pipeline.Pipeline` (the request/reply machinery the nbd and ssh
drivers share): the tasks waiting for commands take turns as its reader,
whose `receive` polls ``iscsi_get_fd`` for ``iscsi_which_events`` with
`trio.lowlevel.wait_readable` / `wait_writable` and services the socket.
libiscsi sends the bytes itself: "transmitting" a command services the
socket for output right away once logged in (no task switch before the
command leaves), and wakes a reader sleeping on a readable socket only when
the socket did not take it all.
Every libiscsi call happens on the trio thread.

libiscsi reconnects by itself when the connection drops, and replays the
commands in flight; imgfs bounds that (a few retries, then every pending
and later command fails with EIO) so that a mount whose target went away
answers EIO instead of hanging.
"""
from __future__ import annotations

import contextlib
import ctypes
import enum
import errno
import os
import select
import socket
from typing import Any

import trio

from imgfs.errors import ImgfsError, Unreachable
from imgfs.netio import tcp_corked
from imgfs.pipeline import Lost, Pipeline, ProtocolError, Request
from imgfs.spin import ReplySpin

from . import binding
from .binding import COMMAND_CB, ScsiTask, UnmapList
from .config import Target
from .scsi import sense_error

#: a lost connection is tried again this many times before commands fail
RECONNECT_RETRIES = 2
#: how long commands wait for a connection libiscsi is re-establishing
RECONNECT_GRACE = 6.0
#: libiscsi does its timeouts and reconnect back-off only inside
#: iscsi_service: call it at least this often while commands wait
SERVICE_INTERVAL = 0.5
#: after iscsi_which_events answers 0 (a reconnect pending), iscsi.h asks
#: for at least this long a pause
IDLE_PAUSE = 0.1
#: connecting and logging in must not hang a mount (the CLI's budget is 10 s)
LOGIN_TIMEOUT = 6.0
#: socket events serviced in a row before the leader lets other tasks run
BUSY_TURNS = 16
LOGOUT_TIMEOUT = 2.0

DIGESTS = {
    "none": binding.ISCSI_HEADER_DIGEST_NONE,
    "none-crc32c": binding.ISCSI_HEADER_DIGEST_NONE_CRC32C,
    "crc32c-none": binding.ISCSI_HEADER_DIGEST_CRC32C_NONE,
    "crc32c": binding.ISCSI_HEADER_DIGEST_CRC32C,
}


class Command(Request):
    """One command in flight, and what came back."""

    __slots__ = ("what", "status", "sense", "data", "keep", "must_fill", "short")

    def __init__(self, keep: tuple[Any, ...] = (), must_fill: bool = False) -> None:
        super().__init__()
        #: the command's name, for messages
        self.what = "command"
        self.status = binding.SCSI_STATUS_ERROR
        #: (sense key, ASC << 8 | ASCQ) after CHECK CONDITION
        self.sense: tuple[int, int] | None = None
        #: the data-in libiscsi received (INQUIRY, READ CAPACITY, ...)
        self.data = b""
        #: buffers the C side points into until the command completes
        self.keep = keep
        #: a read whose buffer is not zeroed first: all of it must come
        self.must_fill = must_fill
        #: the bytes such a read did not fill
        self.short = 0


class Wake(enum.Enum):
    """Why a reader sleeping on the socket woke up."""

    READABLE = "readable"
    #: readable or writable (a reader that also waited to send)
    SOCKET = "socket"
    #: a command was queued that the socket did not take at once
    COMMAND = "command"
    #: libiscsi's timeouts and reconnects are due
    TIMER = "timer"


class LoginFailed(Exception):
    """The connection or the login failed (message: libiscsi's reason)."""


class Session(Pipeline):
    """A logged-in session to one LUN; `name` is its URL without secrets."""

    transmit_never_waits = True

    def __init__(self, target: Target) -> None:
        super().__init__(target.url())
        self.target = target
        self.lun = target.lun
        lib = binding.lib()
        self._lib = lib
        self._ctx = lib.iscsi_create_context(target.initiator_name.encode())
        if not self._ctx:
            raise ImgfsError(f"{self.name}: cannot create an iSCSI context")
        self._callback = COMMAND_CB(self._on_complete)     # kept alive with the session
        self._wait_scope: trio.CancelScope | None = None
        self._disconnected_since: float | None = None
        #: why the socket failed (ECONNREFUSED...), which libiscsi's own
        #: message does not say once its reconnect logic has run
        self._socket_error: str | None = None
        self._poller = select.poll()
        self._polled_fd = -1
        self._busy = 0
        #: every command libiscsi holds, by id, until its callback: what keeps
        #: the buffers it points into alive, whatever becomes of the waiter
        self._queued: dict[int, Command] = {}
        self._spin = ReplySpin()
        #: the login succeeded: commands may be sent the moment they are queued
        self._sending_at_once = False

    # -- login --------------------------------------------------------------------

    async def login(self) -> None:
        """Connect, log in and check the LUN answers; LoginFailed if not."""
        target, lib, ctx = self.target, self._lib, self._ctx
        lib.iscsi_set_targetname(ctx, target.target.encode())
        lib.iscsi_set_session_type(ctx, binding.ISCSI_SESSION_NORMAL)
        lib.iscsi_set_header_digest(ctx, DIGESTS[target.header_digest])
        login = target.login
        if login.user is not None:
            lib.iscsi_set_initiator_username_pwd(ctx, login.user.encode(),
                                                 login.password or b"")
        if login.target_user is not None:
            lib.iscsi_set_target_username_pwd(ctx, login.target_user.encode(),
                                              login.target_password or b"")
        if target.timeout:
            lib.iscsi_set_timeout(ctx, target.timeout)
        lib.iscsi_set_reconnect_max_retries(ctx, RECONNECT_RETRIES)
        # A login that fails is reported as it failed, not retried.
        lib.iscsi_set_noautoreconnect(ctx, 1)
        command, request_id = Command(), self.new_id()
        if lib.iscsi_full_connect_async(ctx, target.portal.encode(), target.lun,
                                        self._callback, request_id) != 0:
            raise LoginFailed(self.error_text())
        await self.send(request_id, command)
        with trio.move_on_after(LOGIN_TIMEOUT):
            try:
                await self.wait(command)
            except ImgfsError:
                pass
        if not command.done:
            raise LoginFailed(f"no answer from {target.portal} (timed out)")
        if command.status != binding.SCSI_STATUS_GOOD:
            if self._socket_error is not None and not self._logged_in():
                raise LoginFailed(f"cannot connect to {target.portal}: {self._socket_error}")
            raise LoginFailed(self.error_text())
        lib.iscsi_set_noautoreconnect(ctx, 0)
        self._sending_at_once = True

    def error_text(self) -> str:
        """libiscsi's last error, one line, without any secret."""
        if self._ctx is None:
            return "the session is closed"
        raw = self._lib.iscsi_get_error(self._ctx) or b""
        text = " ".join(raw.decode("utf-8", "replace").split())
        for secret in (self.target.login.password, self.target.login.target_password):
            if secret:
                text = text.replace(secret.decode("utf-8", "replace"), "***")
        return text or "unknown error"

    # -- commands -------------------------------------------------------------------

    async def run(self, what: str, queue: Any, *args: Any, after: tuple[Any, ...] = (),
                  keep: tuple[Any, ...] = ()) -> Command:
        """Queue one SCSI command (``queue(ctx, lun, *args, cb, private,
        *after)``, an ``iscsi_*_task`` function) and wait for it; raise its
        error.  `keep`: buffers the command points into."""
        command = await self.submit(what, queue, *args, after=after, keep=keep)
        await self.wait(command)
        return command

    async def submit(self, what: str, queue: Any, *args: Any, after: tuple[Any, ...] = (),
                     keep: tuple[Any, ...] = (), must_fill: bool = False) -> Command:
        """Queue one command without waiting for it (then `wait`): several
        queued at once travel together.  `must_fill`: a read that fails
        unless the target sent every byte asked for."""
        self.check_usable()
        command, request_id = Command(keep, must_fill), self.new_id()
        command.what = what
        if not queue(self._ctx, self.lun, *args, self._callback, request_id, *after):
            raise ImgfsError(f"{self.name}: {what}: {self.error_text()}")
        self._queued[request_id] = command
        await self.send(request_id, command)
        return command

    async def transmit(self, *buffers: bytes | bytearray | memoryview) -> None:
        """libiscsi sends queued commands itself, inside iscsi_service: once
        logged in, let it send now (a command waits for no reader's turn);
        what the socket did not take, and any command during the login
        (when POLLOUT means "connected"), wakes a reader sleeping on a
        readable socket so that it waits for the socket to be writable."""
        if self._sending_at_once and self._lib.iscsi_which_events(self._ctx) & select.POLLOUT:
            self._service(select.POLLOUT)
            if not self._lib.iscsi_which_events(self._ctx) & select.POLLOUT:
                return
        if self._wait_scope is not None:
            self._wait_scope.cancel()

    def _failure(self, command: Command) -> ImgfsError:
        what = f"{self.name}: {command.what}"
        if command.status == binding.SCSI_STATUS_CHECK_CONDITION and command.sense:
            return sense_error(what, *command.sense)
        if command.status == binding.SCSI_STATUS_TIMEOUT:
            return Unreachable(f"{what}: timed out")
        if command.status in (binding.SCSI_STATUS_CANCELLED, binding.SCSI_STATUS_ERROR):
            return Unreachable(f"{what}: {self.broken or self.error_text()}")
        return ImgfsError(f"{what}: SCSI status {command.status:#x}", errno_=errno.EIO)

    def _on_complete(self, _ctx: Any, status: int, command_data: Any, private: Any) -> None:
        """libiscsi's completion callback, called inside iscsi_service.  For
        SCSI commands `command_data` is the task, which is ours to free; the
        login and logout callbacks carry none."""
        try:
            self._queued.pop(private or 0, None)
            task = ctypes.cast(command_data, ctypes.POINTER(ScsiTask)) if command_data else None
            try:
                command = self.pending(private or 0)
            except ProtocolError:
                command = None      # failed already, or the login's second call
            if isinstance(command, Command):
                command.status = status
                if task is not None:
                    self._collect(command, task.contents)
                if status != binding.SCSI_STATUS_GOOD:
                    command.fail(self._failure(command))
                elif command.short:
                    command.fail(ImgfsError(f"{self.name}: {command.what}: the target sent "
                                            f"{command.short} bytes less than asked",
                                            errno_=errno.EIO))
                self.complete(private)
            if task is not None:
                self._lib.scsi_free_scsi_task(task)
        except BaseException as exc:       # never let an exception into C
            self.broken = self.broken or f"internal error: {exc!r}"

    @staticmethod
    def _collect(command: Command, task: ScsiTask) -> None:
        if command.status == binding.SCSI_STATUS_CHECK_CONDITION:
            command.sense = (task.sense.key, task.sense.ascq)
        if task.datain.size > 0 and task.datain.data:
            command.data = ctypes.string_at(task.datain.data, task.datain.size)
        if command.must_fill and task.residual_status == binding.SCSI_RESIDUAL_UNDERFLOW:
            command.short = task.residual

    # -- driving the socket (the pipeline's reader) -------------------------------------

    async def receive(self) -> None:
        """Service the socket once: what is ready now, else sleep until it is,
        a command is queued, or libiscsi's timers are due."""
        if self.broken is not None:
            raise Lost(self.broken)
        events = self._lib.iscsi_which_events(self._ctx)
        if events == 0:
            await trio.sleep(IDLE_PAUSE)
            self._service(0)
            return
        fd = self._lib.iscsi_get_fd(self._ctx)
        revents = self._ready(fd, events)
        if revents & (select.POLLERR | select.POLLHUP) and self._socket_error is None:
            self._socket_error = _pending_socket_error(fd)
        if revents:
            if revents & select.POLLOUT:
                # libiscsi writes each PDU's header and data in two calls: the
                # burst of Data-Out PDUs an R2T asks for leaves in full segments.
                with tcp_corked(fd):
                    self._service(revents)
            else:
                self._service(revents)
            self._busy += 1
            if self._busy >= BUSY_TURNS:
                self._busy = 0
                await trio.lowlevel.checkpoint()
            return
        self._busy = 0
        spun = events == select.POLLIN and self._sending_at_once
        if spun and await self._spin.spin(fd):
            self._service(select.POLLIN)
            return
        woken_by = await self._sleep_on(fd, events)
        if spun and woken_by is Wake.READABLE:
            self._spin.woke()
        if woken_by is Wake.TIMER:
            self._service(0)
        elif woken_by is Wake.READABLE and self._sending_at_once:
            # A reply is there: no second look at the socket before reading
            # it (a hang-up also reads as readable, and libiscsi's read then
            # sees it).
            self._service(select.POLLIN)

    def _ready(self, fd: int, events: int) -> int:
        """The events among `events` that `fd` has now (a poll that never waits)."""
        if fd != self._polled_fd:
            self._poller, self._polled_fd = select.poll(), fd
        self._poller.register(fd, events)
        ready = self._poller.poll(0)
        return ready[0][1] if ready else 0

    async def _sleep_on(self, fd: int, events: int) -> Wake:
        """Until the socket is ready, a command is queued or libiscsi's
        timers are due; says which."""
        with trio.CancelScope(deadline=trio.current_time() + SERVICE_INTERVAL) as scope:
            self._wait_scope = scope
            try:
                if events & select.POLLOUT:
                    await _readable_or_writable(fd)
                    return Wake.SOCKET
                await trio.lowlevel.wait_readable(fd)
                return Wake.READABLE
            finally:
                self._wait_scope = None
        return Wake.TIMER if trio.current_time() >= scope.deadline else Wake.COMMAND

    def _service(self, revents: int) -> None:
        failed = self._lib.iscsi_service(self._ctx, revents) < 0
        if (failed or revents == 0) and not self._logged_in():
            self._note_disconnected()
        elif self._disconnected_since is not None and self._logged_in():
            self._disconnected_since = None

    def _logged_in(self) -> bool:
        return bool(self._lib.iscsi_is_logged_in(self._ctx))

    def _note_disconnected(self) -> None:
        """libiscsi is reconnecting: give it RECONNECT_GRACE, then give up."""
        now = trio.current_time()
        if self._disconnected_since is None:
            self._disconnected_since = now
        elif now - self._disconnected_since > RECONNECT_GRACE:
            raise Lost(f"{self.error_text()}; no reconnect in {RECONNECT_GRACE:g} s")

    def hang_up(self) -> None:
        """Cancel what libiscsi still has queued or in flight: the callbacks
        run now and free the tasks (the pipeline has failed their commands)."""
        if self._ctx is not None:
            self._lib.iscsi_scsi_cancel_all_tasks(self._ctx)

    # -- closing ------------------------------------------------------------------------

    async def close(self) -> None:
        """Log out politely if the session works, then free the context."""
        if self._ctx is None:
            return
        if self.broken is None and self._logged_in():
            command, request_id = Command(), self.new_id()
            if self._lib.iscsi_logout_async(self._ctx, self._callback, request_id) == 0:
                await self.send(request_id, command)
                with trio.move_on_after(LOGOUT_TIMEOUT):
                    with contextlib.suppress(ImgfsError):
                        await self.wait(command)
        self.fail("the session is closed")
        ctx, self._ctx = self._ctx, None
        # Destroying calls back whatever is still queued: only then may its
        # buffers go.
        self._lib.iscsi_destroy_context(ctx)
        self._queued.clear()


def _pending_socket_error(fd: int) -> str | None:
    """The error a failed socket holds (SO_ERROR), in the usual words."""
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    except OSError:
        return None
    return os.strerror(code) if code else None


async def _readable_or_writable(fd: int) -> None:
    async with trio.open_nursery() as nursery:
        async def first(wait: Any) -> None:
            await wait(fd)
            nursery.cancel_scope.cancel()
        nursery.start_soon(first, trio.lowlevel.wait_readable)
        nursery.start_soon(first, trio.lowlevel.wait_writable)


def buffer_address(buffer: Any) -> tuple[int, Any]:
    """The address of `buffer`'s bytes, and the object that keeps them
    valid.  bytes and writable buffers are used in place; only a read-only
    view of something else is copied."""
    if isinstance(buffer, bytes):
        pointer = ctypes.c_char_p(buffer)      # points into the bytes object
        return ctypes.cast(pointer, ctypes.c_void_p).value or 0, (buffer, pointer)
    if memoryview(buffer).readonly:
        return buffer_address(bytes(buffer))
    storage = (ctypes.c_char * len(buffer)).from_buffer(buffer)
    return ctypes.addressof(storage), storage


def unmap_list(ranges: list[tuple[int, int]]) -> Any:
    items = (UnmapList * len(ranges))()
    for item, (lba, count) in zip(items, ranges, strict=True):
        item.lba, item.num = lba, count
    return items

