"""The ssh connection: OpenSSH's `ssh` client, with the SFTP subsystem on its pipes.

OpenSSH does the transport, the login (ssh-agent, the user's identity
files, ``~/.ssh/config`` with its host aliases, ProxyJump...) and the host
key check, exactly as the user's own ``ssh`` would; imgfs speaks SFTP over
its standard input and output (`sftp.SftpSession`).  The ssh process never
prompts (BatchMode): a login that needs a password fails.

``~`` is ``$HOME``: ssh itself looks in the passwd entry's home, so when
$HOME is elsewhere imgfs points ssh at $HOME's known_hosts files, config
file (then the only one read) and default identity files.  Host keys: ``known_hosts`` mode is ssh's
StrictHostKeyChecking=yes against ``~/.ssh/known_hosts``; ``none`` trusts
any key and records none; ``hash`` accepts exactly the key with that
fingerprint (checked by `helper.py` as ssh's KnownHostsCommand).  The same
helper, as ProxyCommand with fd passing, opens the TCP connection with
TCP_NODELAY, unless the user's config already names a proxy (see
tuned_options, which also puts AES-GCM first where the CPU has AES).
"""
from __future__ import annotations

import fcntl
import functools
import os
import pwd
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import trio

from imgfs.errors import ImgfsError, PermissionDenied, Unreachable
from imgfs.pipeline import Lost, ProtocolError

from . import helper
from .sftp import SftpSession
from .target import HostKeyCheck, Target

HELPER = str(Path(helper.__file__).resolve())
#: identity files ssh tries by default, in its order (ssh_config(5))
DEFAULT_IDENTITIES = ("id_rsa", "id_ecdsa", "id_ecdsa_sk", "id_ed25519", "id_ed25519_sk",
                      "id_xmss", "id_dsa")
#: how long a closing session waits for ssh to exit before killing it
EXIT_WAIT = 2.0
#: size asked for the pipes to and from ssh (the default maximum for any user)
PIPE_SIZE = 1 << 20
#: the most of ssh's stderr a message quotes
STDERR_TAIL = 4096


def _token_safe(text: str) -> str:
    """`text` inside an ssh option that expands %-tokens."""
    return text.replace("%", "%%")


def _quoted(path: str) -> str:
    """A path for ssh's whitespace-split file lists."""
    return '"' + path.replace('"', '') + '"'


def home_dir() -> str | None:
    """$HOME when it is not where ssh looks (the passwd entry's home), else None."""
    home = os.environ.get("HOME")
    try:
        passwd_home = pwd.getpwuid(os.getuid()).pw_dir
    except KeyError:
        passwd_home = None
    if not home or (passwd_home and os.path.realpath(home) == os.path.realpath(passwd_home)):
        return None
    return home


def _helper_command(*args: str) -> str:
    """The helper as an ssh command; `args` may hold %-tokens for ssh to expand."""
    program = [_token_safe(shlex.quote(part)) for part in (sys.executable, "-I", "-S", HELPER)]
    return " ".join(program + [shlex.quote(arg) for arg in args])


def host_key_options(check: HostKeyCheck, home: str | None) -> list[str]:
    """ssh -o options carrying the host key policy (never writing known_hosts)."""
    options = ["UpdateHostKeys=no"]
    if check.mode == "none":
        return options + ["StrictHostKeyChecking=no", "UserKnownHostsFile=/dev/null",
                          "GlobalKnownHostsFile=/dev/null", "LogLevel=ERROR"]
    expected = check.expected() if check.mode == "hash" else "-"
    options += ["StrictHostKeyChecking=yes",
                "KnownHostsCommand=" + _helper_command("hostkey", expected, "%H", "%t", "%K")]
    if check.mode == "hash":
        return options + ["UserKnownHostsFile=/dev/null", "GlobalKnownHostsFile=/dev/null"]
    if home is not None:
        known = " ".join(_quoted(_token_safe(os.path.join(home, ".ssh", name)))
                         for name in ("known_hosts", "known_hosts2"))
        options.append(f"UserKnownHostsFile={known}")
    return options


def user_file_options(home: str | None) -> list[str]:
    """With `home` (see home_dir): its config file and default identities
    in place of the ones ssh would find in the passwd entry's home."""
    if home is None:
        return []
    ssh_dir = os.path.join(home, ".ssh")
    config = os.path.join(ssh_dir, "config")
    args = ["-F", config if os.path.exists(config) else "/dev/null"]
    for name in DEFAULT_IDENTITIES:
        path = os.path.join(ssh_dir, name)
        if os.path.exists(path):
            args += ["-o", f"IdentityFile={_quoted(_token_safe(path))}"]
    return args


def ssh_argv(target: Target, timeout: float, *, tuning: list[str],
             home: str | None) -> list[str]:
    """The ssh command line that runs the sftp subsystem on `target`
    (`home`: see home_dir; `tuning`: see tuned_options)."""
    argv = ["ssh", "-T", "-x", "-a", "-e", "none", "-s", *user_file_options(home),
            "-o", "BatchMode=yes", "-o", "ClearAllForwardings=yes",
            "-o", f"ConnectTimeout={max(1, round(timeout))}", "-o", "LogLevel=ERROR"]
    for option in host_key_options(target.host_key_check, home) + tuning:
        argv += ["-o", option]
    if target.port is not None:
        argv += ["-p", str(target.port)]
    if target.user is not None:
        argv += ["-l", target.user]
    return argv + ["--", target.host, "sftp"]


async def effective_config(target: Target, home: str | None) -> dict[str, str]:
    """What ssh will use for this host, from `ssh -G` (no connection made)."""
    argv = ["ssh", "-G", *user_file_options(home)]
    if target.port is not None:
        argv += ["-p", str(target.port)]
    argv += ["--", target.host]
    try:
        result = await trio.run_process(argv, capture_stdout=True, capture_stderr=True,
                                        check=False)
    except OSError as exc:
        raise Unreachable(f"cannot run ssh: {exc.strerror or exc}") from None
    if result.returncode != 0:
        said = result.stderr.decode("utf-8", "replace").strip().splitlines()
        raise Unreachable(f"ssh: {said[-1] if said else 'bad configuration'}")
    config: dict[str, str] = {}
    for line in result.stdout.decode("utf-8", "replace").splitlines():
        key, _, value = line.partition(" ")
        config.setdefault(key, value.strip())
    return config


@functools.cache
def cpu_has_aes() -> bool:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return any(line.startswith(("flags", "Features")) and " aes" in line
                       for line in cpuinfo)
    except OSError:
        return False


def tuned_options(config: dict[str, str], timeout: float) -> list[str]:
    """-o options imgfs adds to the user's configuration: its own TCP
    connection with TCP_NODELAY unless the configuration names a proxy (then
    the connection is the proxy's to make), and, on a CPU with AES
    instructions, the AES-GCM ciphers the configuration allows put first
    (they move bulk data faster there than OpenSSH's default ChaCha20)."""
    options = []
    if all(config.get(key, "none") in ("", "none") for key in ("proxycommand", "proxyjump")):
        options += ["ProxyCommand=" + _helper_command("connect", "%h", "%p", f"{timeout:g}"),
                    "ProxyUseFdpass=yes"]
    ciphers = [name for name in config.get("ciphers", "").split(",") if name]
    gcm = [name for name in ciphers if name.endswith("-gcm@openssh.com")]
    if gcm and cpu_has_aes() and ciphers[:len(gcm)] != gcm:
        options.append("Ciphers=" + ",".join(gcm + [name for name in ciphers
                                                     if name not in gcm]))
    return options


def widen_pipes(*streams: object) -> None:
    """Pipes that hold a few whole requests: with the default 64 KiB, a
    256 KiB write or read reply takes several wake-ups of both processes."""
    for stream in streams:
        fileno = getattr(stream, "fileno", None)
        if fileno is None:
            continue
        try:
            fcntl.fcntl(fileno(), fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass            # over /proc/sys/fs/pipe-max-size: keep the default


@dataclass
class Failure:
    """What ssh said on stderr, sorted into the lines that matter."""

    lines: list[str]
    fingerprints: list[str]
    mismatch: str

    @classmethod
    def read(cls, stderr: IO[bytes]) -> Failure:
        stderr.seek(0, os.SEEK_END)
        size = stderr.tell()
        stderr.seek(max(0, size - STDERR_TAIL))
        text = stderr.read().decode("utf-8", "replace")
        lines, fingerprints, mismatch = [], [], ""
        for line in text.splitlines():
            line = "".join(char for char in line if char.isprintable()).strip()
            if line.startswith(helper.FINGERPRINT_TAG):
                words = line[len(helper.FINGERPRINT_TAG):].split()
                if words[:1] == ["mismatch"]:
                    mismatch = " ".join(words[1:])
                else:
                    fingerprints.append(" ".join(words[1:]))
            elif line:
                lines.append(line)
        return cls(lines, fingerprints, mismatch)

    def error(self, target: Target, status: int | None) -> ImgfsError:
        """The one-line reason ssh could not open the session."""
        said = " ".join(self.lines)
        key = f" ({self.fingerprints[-1]})" if self.fingerprints else ""
        if self.mismatch:
            return PermissionDenied(f"the host key of {target.host_port()} does not match: "
                                    f"its fingerprint is {self.mismatch}{key}, host_key_check "
                                    f"asked for {target.host_key_check.expected()}")
        if "REMOTE HOST IDENTIFICATION HAS CHANGED" in said:
            return PermissionDenied(f"the host key of {target.host_port()} has CHANGED from "
                                    f"the one in ~/.ssh/known_hosts{key}")
        if "host key is known" in said or "Host key verification failed" in said:
            return PermissionDenied(f"the host key of {target.host_port()} is not in "
                                    f"~/.ssh/known_hosts{key}; add it (ssh-keyscan) or use "
                                    f"host_key_check=no or a fingerprint")
        if "Permission denied" in said:
            return PermissionDenied(f"authentication failed ({self._last()}); imgfs logs in "
                                    f"with ssh-agent (SSH_AUTH_SOCK) or a key without "
                                    f"passphrase, never a password")
        if "subsystem request failed" in said:
            return Unreachable("the server offers no SFTP subsystem")
        reason = self._last() or (f"ssh exited with status {status}" if status is not None
                                  else "the ssh connection closed")
        return Unreachable(f"cannot connect: {reason}")

    def _last(self) -> str:
        for line in reversed(self.lines):
            if not line.startswith(("mm_receive_fd", "proxy dialer", "kex_exchange")):
                return line.removeprefix("ssh: ")
        return ""


class SshConnection:
    """One ssh process and the SFTP session on its pipes."""

    def __init__(self, process: trio.Process, stderr: IO[bytes], session: SftpSession) -> None:
        self.process = process
        self.stderr = stderr
        self.session = session

    @classmethod
    async def start(cls, target: Target, *, timeout: float, reply_timeout: float) -> SshConnection:
        """Run ssh and initialise SFTP, within `timeout` seconds; raise one
        ImgfsError saying why not."""
        home = home_dir()
        with trio.move_on_after(timeout) as deadline:
            tuning = tuned_options(await effective_config(target, home), timeout)
        if deadline.cancelled_caught:
            raise Unreachable(f"cannot connect: ssh -G timed out after {timeout:g} s")
        stderr = tempfile.TemporaryFile()
        try:
            process = await trio.lowlevel.open_process(
                ssh_argv(target, timeout, tuning=tuning, home=home), stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=stderr, start_new_session=True)
        except OSError as exc:
            stderr.close()
            raise Unreachable(f"cannot run ssh: {exc.strerror or exc}") from None
        assert process.stdin is not None and process.stdout is not None
        widen_pipes(process.stdin, process.stdout)
        session = SftpSession(process.stdin, process.stdout, target.url(),
                              reply_timeout=reply_timeout)
        conn = cls(process, stderr, session)
        try:
            await conn._initialise(target, timeout)
        except BaseException:
            await conn.stop()
            raise
        return conn

    async def _initialise(self, target: Target, timeout: float) -> None:
        try:
            with trio.fail_after(timeout):
                await self.session.initialise()
        except trio.TooSlowError:
            raise Unreachable(f"cannot connect: no SFTP session within {timeout:g} s "
                              f"(timeout={timeout:g})") from None
        except Lost:
            with trio.move_on_after(EXIT_WAIT):
                await self.process.wait()
            raise Failure.read(self.stderr).error(target, self.process.returncode) from None
        except ProtocolError as exc:
            raise Unreachable(f"not an SFTP server: {exc}") from None

    async def stop(self) -> None:
        """End the session and reap ssh; never raises, never hangs."""
        with trio.CancelScope(shield=True):
            self.session.fail(self.session.broken or "the connection is closed")
            with trio.move_on_after(EXIT_WAIT):
                await self.process.wait()
            if self.process.returncode is None:
                self.process.kill()
                await self.process.wait()
            self.stderr.close()

