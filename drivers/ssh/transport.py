"""The ssh connection: libssh in this process, with imgfs's SFTP on its channel.

libssh (`libssh`, the library QEMU's ssh driver uses) makes the TCP
connection (TCP_NODELAY), the key exchange and the login: ssh-agent
(SSH_AUTH_SOCK), then the default identity files and those named in
``~/.ssh/config``, whose host aliases (HostName, Port, User, IdentityFile,
ProxyCommand...) apply as they do for ssh.  A key with a passphrase is not
asked for: the login never prompts.  Those steps use libssh's blocking API
in a worker thread, each wait bounded by libssh's timeout and the whole by
`timeout`; the SFTP session then runs on the channel from trio (see
`libssh.Channel`).

``~`` is ``$HOME``: libssh itself looks in the passwd entry's home, so imgfs
points it at $HOME/.ssh (config file, identities, known_hosts).  Host keys
(`target.HostKeyCheck`): ``known_hosts`` accepts only a key recorded in
``~/.ssh/known_hosts`` (or the system's ssh_known_hosts) for the host and
port, and never records one; ``none`` trusts any key; ``hash`` accepts
exactly the key with that fingerprint.
"""
from __future__ import annotations

import ctypes
import functools
import os
import pwd
import threading

import trio

from imgfs.errors import PermissionDenied, Unreachable
from imgfs.pipeline import Lost, ProtocolError

from . import libssh
from .libssh import Channel, ChannelClosed, Session, SshFailure
from .sftp import SftpSession
from .target import Target

#: AES-GCM first where the CPU has AES instructions: there it moves data
#: faster than libssh's default ChaCha20 (the server takes the client's order)
GCM_FIRST = ("aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com,"
             "aes256-ctr,aes192-ctr,aes128-ctr")

#: the system-wide client configuration, read after the user's
SYSTEM_CONFIG = "/etc/ssh/ssh_config"


def home_dir() -> str:
    """$HOME, else the passwd entry's home (what ``~`` means to imgfs)."""
    home = os.environ.get("HOME")
    if home:
        return home
    try:
        return pwd.getpwuid(os.getuid()).pw_dir
    except KeyError:
        return "/"


@functools.cache
def cpu_has_aes() -> bool:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return any(line.startswith(("flags", "Features")) and " aes" in line
                       for line in cpuinfo)
    except OSError:
        return False


def configure(ssh: Session, target: Target, timeout: float, home: str) -> None:
    """imgfs's defaults, then ~/.ssh/config and the system's ssh_config for
    the host (an alias's HostName, Port, User, IdentityFile, Ciphers,
    UserKnownHostsFile, ProxyCommand... apply), then the port and user
    given in the URL or options, which always win."""
    ssh_dir = os.path.join(home, ".ssh")
    ssh.set_int(libssh.SSH_OPTIONS_LOG_VERBOSITY, libssh.SSH_LOG_NOLOG)
    ssh.set_string(libssh.SSH_OPTIONS_SSH_DIR, ssh_dir)
    ssh.set_string(libssh.SSH_OPTIONS_KNOWNHOSTS, os.path.join(ssh_dir, "known_hosts"))
    ssh.set_string(libssh.SSH_OPTIONS_HOST, target.host)
    ssh.set_int(libssh.SSH_OPTIONS_TIMEOUT, max(1, round(timeout)), ctypes.c_long)
    ssh.set_int(libssh.SSH_OPTIONS_NODELAY, 1)
    if cpu_has_aes():
        ssh.set_string(libssh.SSH_OPTIONS_CIPHERS_C_S, GCM_FIRST)
        ssh.set_string(libssh.SSH_OPTIONS_CIPHERS_S_C, GCM_FIRST)
    for config in (os.path.join(ssh_dir, "config"), SYSTEM_CONFIG):
        if os.path.exists(config):
            ssh.parse_config(config)
    if target.port is not None:
        ssh.set_int(libssh.SSH_OPTIONS_PORT, target.port, ctypes.c_uint)
    if target.user is not None:
        ssh.set_string(libssh.SSH_OPTIONS_USER, target.user)


def check_host_key(ssh: Session, target: Target) -> None:
    """Raise PermissionDenied unless the server's key passes `target`'s check."""
    check = target.host_key_check
    if check.mode == "none":
        return
    key = ssh.host_key()
    where = target.host_port()
    if check.mode == "hash":
        actual = key.digest(check.hash_type).hex()
        if actual != check.digest:
            raise PermissionDenied(
                f"the host key of {where} does not match: its fingerprint is "
                f"{check.hash_type}:{actual} ({key.openssh_fingerprint()}), host_key_check "
                f"asked for {check.expected()}")
        return
    state = ssh.known_host_state()
    if state == libssh.SSH_KNOWN_HOSTS_OK:
        return
    described = f"{key.type_name} key {key.openssh_fingerprint()}"
    if state in (libssh.SSH_KNOWN_HOSTS_CHANGED, libssh.SSH_KNOWN_HOSTS_OTHER):
        raise PermissionDenied(f"the host key of {where} has CHANGED from the one in "
                               f"~/.ssh/known_hosts (now {described})")
    if state == libssh.SSH_KNOWN_HOSTS_ERROR:
        raise PermissionDenied(f"cannot check the host key of {where} ({described}) "
                               f"against ~/.ssh/known_hosts: {ssh.error()}")
    raise PermissionDenied(f"the host key of {where} ({described}) is not in "
                           f"~/.ssh/known_hosts; add it (ssh-keyscan) or use "
                           f"host_key_check=no or a fingerprint")


def log_in(ssh: Session) -> None:
    result = ssh.authenticate()
    if result == libssh.SSH_AUTH_SUCCESS:
        return
    if result in (libssh.SSH_AUTH_DENIED, libssh.SSH_AUTH_PARTIAL):
        raise PermissionDenied("authentication failed (no key from ssh-agent or the "
                               "identity files was accepted); imgfs logs in with ssh-agent "
                               "(SSH_AUTH_SOCK) or a key without passphrase, never a password")
    raise Unreachable(f"cannot log in: {ssh.error()}")


def open_session(target: Target, timeout: float, home: str) -> Session:
    """Connect, check the host, log in and start the sftp subsystem
    (blocking: for a worker thread)."""
    ssh = Session()
    try:
        configure(ssh, target, timeout, home)
        try:
            ssh.connect()
        except SshFailure as exc:
            raise Unreachable(f"cannot connect: {_reason(exc)}") from None
        check_host_key(ssh, target)
        log_in(ssh)
        try:
            ssh.open_subsystem("sftp")
        except SshFailure as exc:
            raise Unreachable(f"the server offers no SFTP subsystem ({_reason(exc)})") from None
        ssh.go_nonblocking()
    except BaseException:
        ssh.free()
        raise
    return ssh


def _reason(exc: Exception) -> str:
    text = str(exc)
    return text.split(": ", 1)[1] if ": " in text else text


class _Opening:
    """A session being opened in a worker thread that trio may give up on:
    whoever comes last (the thread finishing, or trio giving up) frees it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.abandoned = False
        self.session: Session | None = None

    def run(self, target: Target, timeout: float, home: str) -> Session:
        ssh = open_session(target, timeout, home)
        with self.lock:
            if self.abandoned:
                ssh.free()
            else:
                self.session = ssh
        return ssh

    def abandon(self) -> None:
        with self.lock:
            self.abandoned = True
            if self.session is not None:
                self.session.free()
                self.session = None


async def open_in_thread(target: Target, timeout: float) -> Session:
    """`open_session` in a worker thread, given up after `timeout` seconds."""
    opening = _Opening()
    try:
        with trio.move_on_after(timeout):
            return await trio.to_thread.run_sync(opening.run, target, timeout, home_dir(),
                                                 abandon_on_cancel=True)
    except libssh.LibsshMissing as exc:
        raise Unreachable(str(exc)) from None
    except SshFailure as exc:
        raise Unreachable(f"cannot connect: {_reason(exc)}") from None
    except BaseException:
        opening.abandon()
        raise
    opening.abandon()
    raise Unreachable(f"cannot connect: no SSH session within {timeout:g} s "
                      f"(timeout={timeout:g})")


class SshConnection:
    """One libssh session and the SFTP session on its channel."""

    def __init__(self, ssh: Session, channel: Channel, session: SftpSession) -> None:
        self.ssh = ssh
        self.channel = channel
        self.session = session

    @classmethod
    async def start(cls, target: Target, *, timeout: float, reply_timeout: float) -> SshConnection:
        """Connect and initialise SFTP, within `timeout` seconds; raise one
        ImgfsError saying why not."""
        deadline = trio.current_time() + timeout
        ssh = await open_in_thread(target, timeout)
        # the channel times replies out (its watchdog task; the pipeline's
        # would need a cancel scope per receive)
        channel = Channel(ssh, reply_timeout=reply_timeout)
        session = SftpSession(channel, target.url())
        conn = cls(ssh, channel, session)
        try:
            with trio.fail_at(deadline):
                await session.initialise()
        except trio.TooSlowError:
            await conn.stop()
            raise Unreachable(f"cannot connect: no SFTP session within {timeout:g} s "
                              f"(timeout={timeout:g})") from None
        except (Lost, ChannelClosed) as exc:
            await conn.stop()
            raise Unreachable(f"cannot connect: {exc}") from None
        except ProtocolError as exc:
            await conn.stop()
            raise Unreachable(f"not an SFTP server: {exc}") from None
        except BaseException:
            await conn.stop()
            raise
        return conn

    async def stop(self) -> None:
        """End the session and free libssh's; never raises, never hangs."""
        with trio.CancelScope(shield=True):
            self.session.fail(self.session.broken or "the connection is closed")
            self.channel.close()
            self.ssh.free()

