"""A real glusterd for tests and benchmarks: its own configuration and
working directory, one started volume with a single brick, on loopback
(127.0.0.2: the gluster CLI refuses 127.0.0.1 as a brick host), stopped by
PID.  Recipe: shared/TEST-SERVERS.md."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import run

#: the CLI refuses 127.0.0.1 as a brick host; bricks find glusterd on its
#: default port, so the test server takes that port on this address
HOST, PORT = "127.0.0.2", 24007


class GlusterServer:
    """glusterd with its own configuration and working directory, and one
    started volume whose single brick is `brick`."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.volume = f"imgfs{os.getpid()}"
        self.brick = base / "brick"
        self.socket = base / "glusterd.socket"
        self.pid: int | None = None

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run("gluster", f"--glusterd-sock={self.socket}", "--mode=script", *args,
                   check=check, timeout=60)

    def start(self) -> None:
        (self.base / "wd").mkdir()
        self.brick.mkdir()
        (self.base / "glusterd.vol").write_text(
            "volume management\n"
            "    type mgmt/glusterd\n"
            f"    option working-directory {self.base}/wd\n"
            "    option transport-type socket\n"
            f"    option transport.socket.bind-address {HOST}\n"
            f"    option transport.socket.listen-port {PORT}\n"
            f"    option glusterd-sockfile {self.socket}\n"
            "end-volume\n")
        # glusterd forks and its parent exits once the daemon is set up
        run("glusterd", "-f", self.base / "glusterd.vol", "-p", self.base / "glusterd.pid",
            "-l", self.base / "glusterd.log")
        self.pid = int((self.base / "glusterd.pid").read_text())
        deadline = time.monotonic() + 30
        while self.cli("volume", "list", check=False).returncode != 0:
            assert time.monotonic() < deadline, "glusterd did not answer"
            time.sleep(0.1)
        self.cli("volume", "create", self.volume, f"{HOST}:{self.brick}", "force")
        self.cli("volume", "start", self.volume)

    def brick_pids(self) -> list[int]:
        """The brick daemons (glusterfsd) serving this volume."""
        marker = f"{self.volume}.{HOST}".encode()
        return [pid for pid, argv in _processes() if b"glusterfsd" in argv[0]
                and any(marker in arg for arg in argv)]

    def stop(self) -> None:
        self.cli("volume", "stop", self.volume, "force", check=False)
        pids = self.brick_pids() + ([self.pid] if self.pid else [])
        for pid in pids:
            _kill(pid, signal.SIGCONT)
            _kill(pid, signal.SIGTERM)
        _wait_gone(pids)

    def url(self, name: str) -> str:
        return f"gluster://{HOST}/{self.volume}/{name}"


def _processes() -> Iterator[tuple[int, list[bytes]]]:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    argv = handle.read().split(b"\0")
            except OSError:
                continue
            if argv and argv[0]:
                yield int(entry), argv


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return False


def _wait_gone(pids: list[int], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while any(_running(pid) for pid in pids):
        if time.monotonic() > deadline:
            for pid in pids:
                _kill(pid, signal.SIGKILL)
            deadline += 5
        time.sleep(0.05)


def port_free() -> bool:
    """Nothing listens on glusterd's address (connections of an earlier run
    left in TIME_WAIT do not count: glusterd binds with SO_REUSEADDR too)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, PORT))
        except OSError:
            return False
    return True
