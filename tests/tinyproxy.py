"""A real HTTP proxy (Debian's tinyproxy) for the http driver's proxy tests.

One foreground process (``-d``), stopped by PID; it listens on 127.0.0.1
only, allows only 127.0.0.1, logs every request and CONNECT (LogLevel
Connect) to `log`, and with `password` set asks for Basic authentication
as user ``imgfs``.
"""
from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from tests.conftest import connectable, free_port, need, stop_process

CONFIG = """\
Port {port}
Listen 127.0.0.1
Timeout 30
LogFile "{d}/tinyproxy.log"
LogLevel Connect
PidFile "{d}/tinyproxy.pid"
MaxClients 64
Allow 127.0.0.1
DisableViaHeader Yes
"""


class Tinyproxy:
    def __init__(self, directory: Path, *, password: str | None = None) -> None:
        need("tinyproxy")
        directory.mkdir(parents=True, exist_ok=True)
        self.dir = directory
        self.port = free_port()
        self.log = directory / "tinyproxy.log"
        config = CONFIG.format(port=self.port, d=directory)
        if password is not None:
            config += f"BasicAuth imgfs {password}\n"
        (directory / "tinyproxy.conf").write_text(config)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        binary = shutil.which("tinyproxy") or "/usr/bin/tinyproxy"
        with open(self.dir / "stderr.log", "ab") as log:
            self.proc = subprocess.Popen([binary, "-d", "-c", str(self.dir / "tinyproxy.conf")],
                                         stdout=log, stderr=log)
        deadline = time.monotonic() + 10
        while not connectable(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("tinyproxy did not start: "
                                   + (self.dir / "stderr.log").read_text(errors="replace"))
            time.sleep(0.01)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_process(proc)

    def requests(self) -> str:
        """What the proxy logged so far."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""
