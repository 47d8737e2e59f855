"""A real OpenSSH server and ssh-agent for the ssh driver's tests.

The recipe of shared/TEST-SERVERS.md: sshd with its own config, host key
and authorized_keys in the test's temp dir, on 127.0.0.1 and a free port,
``internal-sftp``; an ssh-agent holding the user key.  HOME points at a temp
dir, so neither imgfs nor QEMU reads or writes the real ~/.ssh.  Both
daemons are stopped by PID and waited for; `kill_sessions` kills the
per-connection sshd processes too (a listener's SIGTERM leaves them).
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import connectable, free_port, need, stop_process

SSHD = "/usr/sbin/sshd"






def children(pid: int) -> list[int]:
    """Direct children of `pid` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


def descendants(pid: int) -> list[int]:
    result = []
    for child in children(pid):
        result += [child, *descendants(child)]
    return result


@dataclass
class Sshd:
    """A running sshd; `url(path)` names a file on it."""

    dir: Path
    port: int
    host_key_blob: bytes
    host_key_line: str
    proc: subprocess.Popen[bytes]
    agent: subprocess.Popen[bytes]
    agent_sock: Path

    def url(self, path: Path | str, check: str | None = "no", user: str = "root") -> str:
        query = f"?host_key_check={check}" if check is not None else ""
        return f"ssh://{user}@127.0.0.1:{self.port}{path}{query}"

    def fingerprint(self, algorithm: str) -> str:
        return hashlib.new(algorithm, self.host_key_blob).hexdigest()

    def known_hosts_entry(self) -> str:
        return f"[127.0.0.1]:{self.port} {self.host_key_line}\n"

    def sessions(self) -> list[int]:
        """The per-connection sshd processes (and their sftp children)."""
        return descendants(self.proc.pid)

    def kill_sessions(self) -> None:
        for pid in self.sessions():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """The whole server gone at once: listener and sessions."""
        sessions = self.sessions()
        self.proc.kill()
        self.proc.wait()
        for pid in sessions:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def sftp_log(self) -> str:
        log = self.dir / "sftp.log"
        return log.read_text(errors="replace") if log.exists() else ""


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
                   check=True, capture_output=True)


def _write_config(directory: Path, port: int, sftp: str) -> Path:
    config = directory / "sshd_config"
    config.write_text(f"""Port {port}
ListenAddress 127.0.0.1
HostKey {directory}/hostkey
PidFile {directory}/sshd.pid
AuthorizedKeysFile {directory}/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
Subsystem sftp {sftp}
""")
    return config


def start_sshd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
               sftp: str = "") -> Iterator[Sshd]:
    """For a fixture: the server, with HOME and SSH_AUTH_SOCK set for the test."""
    need("ssh", "ssh-agent", "ssh-add", "ssh-keygen")
    if not os.path.exists(SSHD):
        need("sshd")
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    with running_sshd(tmp_path / "sshd", sftp) as server:
        monkeypatch.setenv("SSH_AUTH_SOCK", str(server.agent_sock))
        yield server


@contextlib.contextmanager
def running_sshd(directory: Path, sftp: str = "") -> Iterator[Sshd]:
    """sshd and an ssh-agent holding the user key, both in `directory`
    (also used by bench/run.py)."""
    directory.mkdir()
    _keygen(directory / "hostkey")
    _keygen(directory / "userkey")
    shutil.copy(directory / "userkey.pub", directory / "authorized_keys")
    port = free_port()
    # By default OpenSSH's sftp-server, logging every request (to see fsyncs).
    sftp = sftp or f"/usr/lib/openssh/sftp-server -e -l DEBUG3 2>>{directory}/sftp.log"
    config = _write_config(directory, port, sftp)
    os.makedirs("/run/sshd", exist_ok=True)
    with open(directory / "sshd.log", "ab") as log:
        proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=log)
    agent_sock = directory / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(agent_sock)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not (connectable(port) and agent_sock.exists()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sshd did not start: {(directory / 'sshd.log').read_text()}")
            time.sleep(0.02)
        subprocess.run(["ssh-add", "-q", str(directory / "userkey")], check=True,
                       capture_output=True, env={**os.environ, "SSH_AUTH_SOCK": str(agent_sock)})
        key_type, key, *_ = (directory / "hostkey.pub").read_text().split()
        yield Sshd(directory, port, base64.b64decode(key), f"{key_type} {key}", proc, agent,
                   agent_sock)
    finally:
        sessions = descendants(proc.pid)
        stop_process(proc)
        for pid in sessions:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        stop_process(agent)
