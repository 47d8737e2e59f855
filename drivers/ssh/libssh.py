"""A thin ctypes binding of libssh (Debian's libssh-4), the SSH library
QEMU's ssh driver uses: only what the ssh driver needs.

`Session` makes the connection: everything until the SFTP subsystem runs
(TCP connection, key exchange, host key check, login) is libssh's blocking
API, run by the driver in a worker thread with libssh's own timeout.  The
session is then switched to non-blocking mode and `Channel` carries
imgfs's own SFTP (`sftp.SftpSession`) on it from trio: it sleeps on the
session's socket, and before sleeping it looks at what libssh holds
already (a reply decrypted by an earlier call, output not yet flushed).
One task at a time receives and sleeps on the socket (the SFTP session's
reader); a libssh call by another task that took in socket input (or left
output to send) wakes it to look again.  Sending never waits (what the
channel window cannot take yet is queued).

Header: /usr/include/libssh/libssh.h (libssh-dev); every constant below
carries its name there.
"""
from __future__ import annotations

import base64
import collections
import ctypes
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from imgfs.spin import ReplySpin

# -- libssh.h constants ---------------------------------------------------------------

SSH_OK = 0
SSH_EOF = -127

# enum ssh_options_e
SSH_OPTIONS_HOST = 0
SSH_OPTIONS_PORT = 1
SSH_OPTIONS_USER = 4
SSH_OPTIONS_SSH_DIR = 5
SSH_OPTIONS_KNOWNHOSTS = 8
SSH_OPTIONS_TIMEOUT = 9
SSH_OPTIONS_LOG_VERBOSITY = 13
SSH_OPTIONS_CIPHERS_C_S = 15
SSH_OPTIONS_CIPHERS_S_C = 16
SSH_OPTIONS_NODELAY = 36

SSH_LOG_NOLOG = 0

# enum ssh_auth_e
SSH_AUTH_SUCCESS = 0
SSH_AUTH_DENIED = 1
SSH_AUTH_PARTIAL = 2

# enum ssh_known_hosts_e
SSH_KNOWN_HOSTS_ERROR = -2
SSH_KNOWN_HOSTS_NOT_FOUND = -1
SSH_KNOWN_HOSTS_UNKNOWN = 0
SSH_KNOWN_HOSTS_OK = 1
SSH_KNOWN_HOSTS_CHANGED = 2
SSH_KNOWN_HOSTS_OTHER = 3

# enum ssh_publickey_hash_type
SSH_PUBLICKEY_HASH_SHA1 = 0
SSH_PUBLICKEY_HASH_MD5 = 1
SSH_PUBLICKEY_HASH_SHA256 = 2

# ssh_get_status() bit: output libssh could not send yet
SSH_WRITE_PENDING = 0x08

#: the most libssh reads from the socket at once (MAX_BUF_SIZE in its
#: src/priv.h): a read that took less found the socket empty
SOCKET_READ_SIZE = 4096

#: the library's soname (Debian package libssh-4)
LIBRARY = "libssh.so.4"

_p = ctypes.c_void_p
_int = ctypes.c_int
_str = ctypes.c_char_p
_u32 = ctypes.c_uint32
_PROTOTYPES: dict[str, tuple[Any, list[Any]]] = {
    "ssh_new": (_p, []),
    "ssh_free": (None, [_p]),
    "ssh_options_set": (_int, [_p, _int, _p]),
    "ssh_options_parse_config": (_int, [_p, _str]),
    "ssh_connect": (_int, [_p]),
    "ssh_options_get": (_int, [_p, _int, ctypes.POINTER(_p)]),
    "ssh_options_get_port": (_int, [_p, ctypes.POINTER(ctypes.c_uint)]),
    "ssh_string_free_char": (None, [_p]),
    "ssh_silent_disconnect": (None, [_p]),
    "ssh_get_error": (_str, [_p]),
    "ssh_get_fd": (_int, [_p]),
    "ssh_set_blocking": (None, [_p, _int]),
    "ssh_get_status": (_int, [_p]),
    "ssh_get_server_publickey": (_int, [_p, ctypes.POINTER(_p)]),
    "ssh_get_publickey_hash": (_int, [_p, _int, ctypes.POINTER(ctypes.POINTER(ctypes.c_ubyte)),
                                      ctypes.POINTER(ctypes.c_size_t)]),
    "ssh_clean_pubkey_hash": (None, [ctypes.POINTER(ctypes.POINTER(ctypes.c_ubyte))]),
    "ssh_key_type": (_int, [_p]),
    "ssh_key_type_to_char": (_str, [_int]),
    "ssh_key_free": (None, [_p]),
    "ssh_session_is_known_server": (_int, [_p]),
    "ssh_userauth_publickey_auto": (_int, [_p, _str, _str]),
    "ssh_channel_new": (_p, [_p]),
    "ssh_channel_free": (None, [_p]),
    "ssh_channel_open_session": (_int, [_p]),
    "ssh_channel_request_subsystem": (_int, [_p, _str]),
    "ssh_channel_write": (_int, [_p, _p, _u32]),
    "ssh_channel_read_nonblocking": (_int, [_p, _p, _u32, _int]),
    "ssh_channel_window_size": (_u32, [_p]),
    "ssh_set_counters": (None, [_p, _p, _p]),
}


class Counter(ctypes.Structure):
    """struct ssh_counter_struct: bytes and packets through the socket."""

    _fields_ = [("in_bytes", ctypes.c_uint64), ("out_bytes", ctypes.c_uint64),
                ("in_packets", ctypes.c_uint64), ("out_packets", ctypes.c_uint64)]


class LibsshMissing(Exception):
    """libssh cannot be loaded (message: why)."""


@functools.cache
def library() -> Any:
    """libssh with the prototypes above declared (loaded once)."""
    try:
        lib = ctypes.CDLL(LIBRARY)
    except OSError as exc:
        raise LibsshMissing(f"cannot load {LIBRARY} (install libssh-4): {exc}") from None
    for name, (restype, argtypes) in _PROTOTYPES.items():
        function = getattr(lib, name)
        function.restype = restype
        function.argtypes = argtypes
    return lib


class SshFailure(Exception):
    """A libssh call failed; the message is libssh's own (or ours)."""


@dataclass(frozen=True)
class HostKey:
    """The server's host key: its type name and digests."""

    type_name: str
    sha256: bytes
    sha1: bytes
    md5: bytes

    def digest(self, hash_type: str) -> bytes:
        return {"sha256": self.sha256, "sha1": self.sha1, "md5": self.md5}[hash_type]

    def openssh_fingerprint(self) -> str:
        """``SHA256:base64``, as ssh-keygen -l and ssh print it."""
        return "SHA256:" + base64.b64encode(self.sha256).decode().rstrip("=")


class Session:
    """An ssh_session and its one channel.  Blocking methods are for a
    worker thread; after `go_nonblocking` only `Channel` uses it, from trio."""

    def __init__(self) -> None:
        self.lib = library()
        self.handle = self.lib.ssh_new()
        if not self.handle:
            raise SshFailure("ssh_new failed")
        self.channel: int | None = None

    def error(self) -> str:
        said = self.lib.ssh_get_error(self.handle)
        return said.decode("utf-8", "replace").strip() if said else "unknown libssh error"

    def check(self, result: int, what: str) -> None:
        if result != SSH_OK:
            raise SshFailure(f"{what}: {self.error()}")

    def set_string(self, option: int, value: str) -> None:
        self.check(self.lib.ssh_options_set(self.handle, option, value.encode()),
                   f"option {option}")

    def set_int(self, option: int, value: int, ctype: Callable[[int], Any] = ctypes.c_int) -> None:
        cell = ctype(value)
        self.check(self.lib.ssh_options_set(self.handle, option, ctypes.byref(cell)),
                   f"option {option}")

    def get_string(self, option: int) -> str | None:
        value = ctypes.c_void_p()
        if self.lib.ssh_options_get(self.handle, option, ctypes.byref(value)) != SSH_OK:
            return None
        if not value.value:
            return None
        try:
            return ctypes.string_at(value.value).decode("utf-8", "replace")
        finally:
            self.lib.ssh_string_free_char(value)

    def get_port(self) -> int:
        port = ctypes.c_uint()
        self.check(self.lib.ssh_options_get_port(self.handle, ctypes.byref(port)), "port")
        return port.value

    def parse_config(self, path: str) -> None:
        """Options from an ssh_config(5) file, for the host set already."""
        self.check(self.lib.ssh_options_parse_config(self.handle, path.encode()),
                   f"configuration {path}")

    def connect(self) -> None:
        self.check(self.lib.ssh_connect(self.handle), "connect")

    def host_key(self) -> HostKey:
        key = ctypes.c_void_p()
        self.check(self.lib.ssh_get_server_publickey(self.handle, ctypes.byref(key)),
                   "server host key")
        try:
            type_name = self.lib.ssh_key_type_to_char(self.lib.ssh_key_type(key)) or b"?"
            digests = [self._hash(key, kind) for kind in
                       (SSH_PUBLICKEY_HASH_SHA256, SSH_PUBLICKEY_HASH_SHA1, SSH_PUBLICKEY_HASH_MD5)]
        finally:
            self.lib.ssh_key_free(key)
        return HostKey(type_name.decode(), *digests)

    def _hash(self, key: ctypes.c_void_p, kind: int) -> bytes:
        digest = ctypes.POINTER(ctypes.c_ubyte)()
        length = ctypes.c_size_t()
        if self.lib.ssh_get_publickey_hash(key, kind, ctypes.byref(digest),
                                           ctypes.byref(length)) != SSH_OK:
            raise SshFailure("cannot hash the server's host key")
        try:
            return ctypes.string_at(digest, length.value)
        finally:
            self.lib.ssh_clean_pubkey_hash(ctypes.byref(digest))

    def known_host_state(self) -> int:
        return int(self.lib.ssh_session_is_known_server(self.handle))

    def authenticate(self) -> int:
        """Public key login: ssh-agent, then the identity files."""
        return int(self.lib.ssh_userauth_publickey_auto(self.handle, None, None))

    def open_subsystem(self, name: str) -> None:
        channel = self.lib.ssh_channel_new(self.handle)
        if not channel:
            raise SshFailure(f"channel: {self.error()}")
        self.channel = channel
        self.check(self.lib.ssh_channel_open_session(channel), "session channel")
        self.check(self.lib.ssh_channel_request_subsystem(channel, name.encode()),
                   f"{name} subsystem")

    def go_nonblocking(self) -> None:
        self.lib.ssh_set_blocking(self.handle, 0)

    def free(self) -> None:
        """Drop the connection without a goodbye, and every resource."""
        if self.channel is not None:
            self.lib.ssh_channel_free(self.channel)
            self.channel = None
        if self.handle:
            self.lib.ssh_silent_disconnect(self.handle)
            self.lib.ssh_free(self.handle)
            self.handle = None


class ChannelClosed(trio.BrokenResourceError):
    """The channel or the connection under it failed (message: why)."""


class Channel:
    """The session's channel as a byte stream for trio (non-blocking libssh).

    Sending never waits: what the server's channel window cannot take yet
    waits in an outbox, in order, and goes out as the window grows, which
    the task receiving sees.  One task at a time receives (the SFTP
    session's reader); `reply_timeout`: how long it may wait without
    anything from the server before the connection counts as lost (a
    server that never grows the window never answers either: this covers
    both)."""

    def __init__(self, session: Session, reply_timeout: float | None = None) -> None:
        self.session = session
        self.lib = session.lib
        self.handle = session.handle
        self.channel = session.channel
        self.fd = self.lib.ssh_get_fd(self.handle)
        self.closed = False
        self.reply_timeout = reply_timeout
        #: the buffer received into last, pinned (exported) while its
        #: address is kept here
        self._target: bytearray | None = None
        self._target_view: Any = None
        self._target_address = 0
        #: messages (or their ends) the channel's window could not take yet
        self._outbox: collections.deque[bytes] = collections.deque()
        #: what libssh has taken from the socket and sent to it, counted by
        #: libssh itself (read it, never replace it): how `_drain` knows the
        #: socket is empty (libssh reads at most SOCKET_READ_SIZE per call)
        self.socket_counter = Counter()
        self.lib.ssh_set_counters(self.handle, ctypes.byref(self.socket_counter), None)
        #: a task sleeps on the socket (the receiver, in `_sleep`)
        self._sleeping = False
        #: when the receiver waiting now counts the server as gone
        self._deadline = math.inf
        #: the receiver waited past its deadline: the connection is lost
        self._expired = False
        #: the scope of the task that enforces deadlines (`_watch_deadlines`)
        self._watchdog: trio.CancelScope | None = None
        self._spin = ReplySpin()

    def _failed(self, what: str) -> ChannelClosed:
        return ChannelClosed(f"{what}: {self.session.error()}")

    def _check_open(self) -> None:
        if self.closed:
            raise ChannelClosed("the connection is closed")

    # -- sending --------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Queue all of `data` on the channel, without waiting: libssh sends
        what the socket takes, the outbox keeps what the window cannot."""
        if self.closed:
            self._check_open()
        if self._outbox:
            self._outbox.append(data)
            self._flush()
            return
        taken = self.socket_counter.in_bytes
        written = self.lib.ssh_channel_write(self.channel, data, len(data))
        if self._sleeping:
            self._progressed(taken, written)
        if written != len(data):
            if written < 0:
                raise self._failed("sending")
            self._outbox.append(bytes(data[written:]))

    def _flush(self) -> None:
        """Write what the outbox holds, as far as the window lets."""
        outbox, write = self._outbox, self.lib.ssh_channel_write
        while outbox:
            data = outbox[0]
            taken = self.socket_counter.in_bytes
            written = write(self.channel, data, len(data))
            self._progressed(taken, written)
            if written < 0:
                raise self._failed("sending")
            if written < len(data):
                outbox[0] = data[written:]
                return
            outbox.popleft()

    # -- receiving ------------------------------------------------------------------

    async def receive_into(self, buffer: bytearray, start: int, stop: int) -> int:
        """Put what the channel has (at least a byte, at most up to `stop`)
        in `buffer` from `start` on: the count, 0 at the channel's end.
        Meanwhile the outbox goes out as the server's window adjustments
        come in.  libssh writes into `buffer` itself, which stays exported
        (not resizable) until another buffer is given."""
        if buffer is not self._target:
            self._pin(buffer)
        address, size = self._target_address + start, stop - start
        spun = slept_after_spinning = False
        try:
            while True:
                self._check_open()
                count = self._drain(address, size)
                if self._outbox and count >= 0:
                    self._flush()   # the drain may have taken in a window adjustment
                if count > 0:
                    return count
                if count == SSH_EOF:
                    return 0
                if count < 0:
                    raise self._failed("receiving")
                status = self.lib.ssh_get_status(self.handle)
                if not spun and not status & SSH_WRITE_PENDING:
                    # then look again either way: another task's write may
                    # have taken the reply into libssh meanwhile
                    spun = True
                    slept_after_spinning = not await self._spin.spin(self.fd)
                    continue
                if self._deadline == math.inf and self.reply_timeout is not None:
                    # set at the first sleep: none when the answer is there
                    self._deadline = trio.current_time() + self.reply_timeout
                    if self._watchdog is None:
                        self._start_watchdog()
                await self._sleep(status)
                if slept_after_spinning:
                    slept_after_spinning = False
                    self._spin.woke()
        finally:
            self._deadline = math.inf

    def _pin(self, buffer: bytearray) -> None:
        self._target_view = (ctypes.c_char * len(buffer)).from_buffer(buffer)
        self._target_address = ctypes.addressof(self._target_view)
        self._target = buffer

    def _drain(self, address: int, size: int) -> int:
        """Take up to `size` bytes to `address` while libssh has them or
        still finds more in the socket: the count, or a libssh error code.
        (Only the receiving task drains, never while it sleeps: nobody to
        wake.)"""
        read, counter = self.lib.ssh_channel_read_nonblocking, self.socket_counter
        total = 0
        while total < size:
            before = counter.in_bytes
            count = read(self.channel, address + total, size - total, 0)
            taken = counter.in_bytes - before
            if count > 0:
                total += count
                if 0 < taken < SOCKET_READ_SIZE:
                    break       # that read emptied the socket
            elif count < 0 or not taken:
                return total or count
        return total

    # -- waiting on the socket --------------------------------------------------------

    def _progressed(self, taken: int, written: int) -> None:
        """A libssh call (a write) ran while the receiver sleeps on the
        socket: if libssh took in bytes from the socket meanwhile (what the
        receiver waits for may be in libssh now), failed, or left output for
        the socket to take (the receiver then waits for that too), the
        receiver looks again."""
        if self._sleeping and (self.socket_counter.in_bytes != taken or written < 0
                               or self.lib.ssh_get_status(self.handle) & SSH_WRITE_PENDING):
            self._wake()

    def _wake(self) -> None:
        """End the receiver's sleep (it looks again).  Telling trio the
        socket closes is the one way to end another task's wait on a file
        descriptor without a cancel scope around every wait; trio forgets
        the descriptor until the next wait registers it again."""
        if self._sleeping and not self.closed:
            self._sleeping = False          # woken once is enough
            trio.lowlevel.notify_closing(self.fd)

    async def _sleep(self, status: int) -> None:
        """Until the socket is ready for libssh (readable, or writable while
        libssh holds unsent output: `status` is ssh_get_status's), or
        `_wake`; ChannelClosed past the deadline.  (No cancel scope: one per
        sleep was most of what a sleep cost.)"""
        self._sleeping = True
        try:
            if status & SSH_WRITE_PENDING:
                await self._wait_either()
            else:
                await trio.lowlevel.wait_readable(self.fd)
        except trio.ClosedResourceError:
            if self.closed:
                raise ChannelClosed("the connection is closed") from None
        except OSError as exc:
            self.closed = True
            raise ChannelClosed(f"the socket closed: {exc}") from None
        finally:
            self._sleeping = False
        if self._expired:
            raise ChannelClosed(f"no reply from the server in {self.reply_timeout:g} s")

    def _start_watchdog(self) -> None:
        self._watchdog = trio.CancelScope()
        trio.lowlevel.spawn_system_task(self._watch_deadlines, self._watchdog,
                                        name="ssh reply timeouts")

    async def _watch_deadlines(self, scope: trio.CancelScope) -> None:
        """Wake a receiver still waiting at its deadline, which then fails.
        (A task of its own, a trio system task since the channel has no
        nursery, sleeping until the deadline of the receive in progress:
        a deadline is set `reply_timeout` after the receive began, so one
        set while this task sleeps lies after it wakes.)"""
        assert self.reply_timeout is not None
        try:
            with scope:
                while not self.closed:
                    now = trio.current_time()
                    if self._deadline <= now:
                        self._expired = True
                        self._wake()
                    # no receive waiting (or one just woken): a receive
                    # that starts meanwhile has its deadline after this one
                    await trio.sleep_until(self._deadline if now < self._deadline < math.inf
                                           else now + self.reply_timeout)
        finally:
            if self._watchdog is scope:
                self._watchdog = None       # (a later trio.run starts another)

    async def _wait_either(self) -> None:
        """Until the socket is readable or writable (or closed: the caller
        then finds the channel closed)."""
        async def wait(waiter: Callable[[int], Any], nursery: trio.Nursery) -> None:
            try:
                await waiter(self.fd)
            except trio.ClosedResourceError:
                pass
            nursery.cancel_scope.cancel()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait, trio.lowlevel.wait_readable, nursery)
            nursery.start_soon(wait, trio.lowlevel.wait_writable, nursery)

    def close(self) -> None:
        """Stop using the channel: wakes every sleeper with an error."""
        if self.closed:
            return
        self.closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        # before libssh closes the socket, trio must forget it
        if self.fd >= 0:
            trio.lowlevel.notify_closing(self.fd)
