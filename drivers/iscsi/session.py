"""One libiscsi session, driven from trio through libiscsi's asynchronous API.

libiscsi never blocks and starts no thread: ``iscsi_*_task`` calls queue a
command, and ``iscsi_service(revents)`` sends what is queued, receives
replies and calls each command's completion callback.  The tasks waiting
for commands take turns servicing the socket (`imgfs.relay`): the leader
polls ``iscsi_get_fd`` for ``iscsi_which_events`` with
`trio.lowlevel.wait_readable` / `wait_writable`.  A task that queues a
command while the leader sleeps on a readable socket wakes it, so that the
command is sent at once.  Every libiscsi call happens on the trio thread.

libiscsi reconnects by itself when the connection drops, and replays the
commands in flight; imgfs bounds that (a few retries, then every pending
and later command fails with EIO) so that a mount whose target went away
answers EIO instead of hanging.
"""
from __future__ import annotations

import ctypes
import errno
import itertools
import os
import select
import socket
from typing import Any

import trio

from imgfs.errors import ImgfsError, Unreachable
from imgfs.relay import Relay, Waiter

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


class Command(Waiter):
    """One command in flight, and what came back."""

    __slots__ = ("status", "sense", "data", "keep")

    def __init__(self, keep: tuple[Any, ...] = ()) -> None:
        super().__init__()
        self.status = binding.SCSI_STATUS_ERROR
        #: (sense key, ASC << 8 | ASCQ) after CHECK CONDITION
        self.sense: tuple[int, int] | None = None
        #: the data-in libiscsi received (INQUIRY, READ CAPACITY, ...)
        self.data = b""
        #: buffers the C side points into until the command completes
        self.keep = keep


class LoginFailed(Exception):
    """The connection or the login failed (message: libiscsi's reason)."""


class Session:
    """A logged-in session to one LUN; `name` is its URL without secrets."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.name = target.url()
        self.lun = target.lun
        lib = binding.lib()
        self._lib = lib
        self._ctx = lib.iscsi_create_context(target.initiator_name.encode())
        if not self._ctx:
            raise ImgfsError(f"{self.name}: cannot create an iSCSI context")
        self._relay = Relay()
        self._pending: dict[int, Command] = {}
        self._ids = itertools.count(1)
        self._callback = COMMAND_CB(self._on_complete)     # kept alive with the session
        self._wait_scope: trio.CancelScope | None = None
        self._broken: str | None = None
        self._disconnected_since: float | None = None
        #: why the socket failed (ECONNREFUSED...), which libiscsi's own
        #: message does not say once its reconnect logic has run
        self._socket_error: str | None = None
        self._poller = select.poll()
        self._polled_fd = -1
        #: most commands in flight at once (for tests and statistics)
        self.peak_in_flight = 0

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
        command = Command()
        ident = self._register(command)
        if lib.iscsi_full_connect_async(ctx, target.portal.encode(), target.lun,
                                        self._callback, ident) != 0:
            self._pending.pop(ident, None)
            raise LoginFailed(self.error_text())
        with trio.move_on_after(LOGIN_TIMEOUT):
            await self._relay.wait(command, self._drive)
        if not command.done:
            raise LoginFailed(f"no answer from {target.portal} (timed out)")
        if command.status != binding.SCSI_STATUS_GOOD:
            if self._socket_error is not None and not self._logged_in():
                raise LoginFailed(f"cannot connect to {target.portal}: {self._socket_error}")
            raise LoginFailed(self.error_text())
        lib.iscsi_set_noautoreconnect(ctx, 0)

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

    def _register(self, command: Command) -> int:
        ident = next(self._ids)
        self._pending[ident] = command
        self.peak_in_flight = max(self.peak_in_flight, len(self._pending))
        return ident

    async def run(self, what: str, queue: Any, *args: Any, after: tuple[Any, ...] = (),
                  keep: tuple[Any, ...] = ()) -> Command:
        """Queue one SCSI command (``queue(ctx, lun, *args, cb, private,
        *after)``, an ``iscsi_*_task`` function) and wait for it; raise its
        error.  `keep`: buffers the command points into."""
        return await self.wait(what, self.submit(what, queue, *args, after=after, keep=keep))

    def submit(self, what: str, queue: Any, *args: Any, after: tuple[Any, ...] = (),
               keep: tuple[Any, ...] = ()) -> Command:
        """Queue one command without waiting (see `run`): several queued at
        once travel together."""
        self._check_usable()
        command = Command(keep)
        ident = self._register(command)
        task = queue(self._ctx, self.lun, *args, self._callback, ident, *after)
        if not task:
            self._pending.pop(ident, None)
            raise ImgfsError(f"{self.name}: {what}: {self.error_text()}")
        self._kick()
        return command

    async def wait(self, what: str, command: Command) -> Command:
        """Wait for a submitted command; raise its error."""
        await self._relay.wait(command, self._drive)
        if command.status != binding.SCSI_STATUS_GOOD:
            raise self._failure(what, command)
        return command

    def _failure(self, what: str, command: Command) -> ImgfsError:
        if command.status == binding.SCSI_STATUS_CHECK_CONDITION and command.sense:
            return sense_error(f"{self.name}: {what}", *command.sense)
        if command.status == binding.SCSI_STATUS_TIMEOUT:
            return Unreachable(f"{self.name}: {what}: timed out")
        if command.status == binding.SCSI_STATUS_CANCELLED:
            return Unreachable(f"{self.name}: {what}: {self._broken or 'cancelled'}")
        if command.status == binding.SCSI_STATUS_ERROR:
            return Unreachable(f"{self.name}: {what}: {self._broken or self.error_text()}")
        return ImgfsError(f"{self.name}: {what}: SCSI status {command.status:#x}",
                          errno_=errno.EIO)

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise Unreachable(f"{self.name}: {self._broken}")

    def _on_complete(self, _ctx: Any, status: int, command_data: Any, private: Any) -> None:
        """libiscsi's completion callback, called inside iscsi_service.  For
        SCSI commands `command_data` is the task, which is ours to free; the
        login and logout callbacks carry none."""
        try:
            command = self._pending.pop(private or 0, None)
            task = ctypes.cast(command_data, ctypes.POINTER(ScsiTask)) if command_data else None
            if command is not None and not command.done:
                command.status = status
                if task is not None:
                    self._collect(command, task.contents)
                Relay.finish(command)
            if task is not None:
                self._lib.scsi_free_scsi_task(task)
        except BaseException as exc:       # never let an exception into C
            self._broken = self._broken or f"internal error: {exc!r}"

    @staticmethod
    def _collect(command: Command, task: ScsiTask) -> None:
        if command.status == binding.SCSI_STATUS_CHECK_CONDITION:
            command.sense = (task.sense.key, task.sense.ascq)
        if task.datain.size > 0 and task.datain.data:
            command.data = ctypes.string_at(task.datain.data, task.datain.size)

    # -- driving the socket -------------------------------------------------------------

    def _kick(self) -> None:
        """Wake a leader sleeping on a readable socket: a command is queued."""
        if self._wait_scope is not None:
            self._wait_scope.cancel()

    async def _drive(self, waiter: Waiter) -> None:
        """Service the connection until `waiter` is done (the relay's leader)."""
        busy = 0
        while not waiter.done:
            if self._broken is not None:
                self._fail_all()
                return
            events = self._lib.iscsi_which_events(self._ctx)
            if events == 0:
                await trio.sleep(IDLE_PAUSE)
                self._service(0)
                continue
            fd = self._lib.iscsi_get_fd(self._ctx)
            revents = self._ready(fd, events)
            if revents & (select.POLLERR | select.POLLHUP) and self._socket_error is None:
                self._socket_error = _pending_socket_error(fd)
            if revents:
                self._service(revents)
                busy += 1
                if busy >= BUSY_TURNS and not waiter.done:
                    busy = 0
                    await trio.lowlevel.checkpoint()
            else:
                busy = 0
                if await self._sleep_on(fd, events):
                    self._service(0)

    def _ready(self, fd: int, events: int) -> int:
        """The events among `events` that `fd` has now (a poll that never waits)."""
        if fd != self._polled_fd:
            self._poller, self._polled_fd = select.poll(), fd
        self._poller.register(fd, events)
        ready = self._poller.poll(0)
        return ready[0][1] if ready else 0

    async def _sleep_on(self, fd: int, events: int) -> bool:
        """Until the socket is ready or a command is queued; True when it is
        time to let libiscsi check its timers instead."""
        with trio.CancelScope(deadline=trio.current_time() + SERVICE_INTERVAL) as scope:
            self._wait_scope = scope
            try:
                if events & select.POLLOUT:
                    await _readable_or_writable(fd)
                else:
                    await trio.lowlevel.wait_readable(fd)
            finally:
                self._wait_scope = None
        return scope.cancelled_caught and trio.current_time() >= scope.deadline

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
            self._broken = f"connection to the target lost ({self.error_text()})"

    def _fail_all(self) -> None:
        """The session is unusable: every command still waiting fails (the
        cancelled tasks' callbacks run at once and free them)."""
        self._lib.iscsi_scsi_cancel_all_tasks(self._ctx)
        for command in list(self._pending.values()):
            if not command.done:
                command.status = binding.SCSI_STATUS_CANCELLED
                Relay.finish(command)

    # -- closing ------------------------------------------------------------------------

    async def close(self) -> None:
        """Log out politely if the session works, then free the context."""
        if self._ctx is None:
            return
        if self._broken is None and self._logged_in():
            command = Command()
            ident = self._register(command)
            if self._lib.iscsi_logout_async(self._ctx, self._callback, ident) == 0:
                with trio.move_on_after(LOGOUT_TIMEOUT):
                    await self._relay.wait(command, self._drive)
            self._pending.pop(ident, None)
        self._broken = self._broken or "the session is closed"
        ctx, self._ctx = self._ctx, None
        # Destroying cancels what is still queued: its callbacks run now,
        # while the buffers they point into are still referenced.
        self._lib.iscsi_destroy_context(ctx)
        self._pending.clear()


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

