"""A real nginx for the http driver's tests (and bench/run.py's http case).

One process (``master_process off``), so stopping it by PID stops it all;
every file it uses is in its own directory; it listens on loopback only:
127.0.0.1 (http and https) and [::1] (http and https), with a self-signed
certificate for 127.0.0.1, ::1 and localhost.

Locations: ``/`` serves `www`; ``/norange/`` the same files without range
support (``max_ranges 0``); ``/redirect/NAME`` answers 302 to ``/NAME``;
``/loop`` redirects to itself; ``/away/NAME`` redirects to ``/NAME`` on
[::1] (another origin); ``/auth/`` needs user ``imgfs`` with
password PASSWORD (basic auth); ``/cookie/`` needs the cookie COOKIE.
"""
from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from tests.conftest import connectable, free_port

PASSWORD = "s3cret-pass-77"
COOKIE = "session=cookie-value-42"






def make_certificate(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
                    "-out", cert, "-days", "2", "-subj", "/CN=127.0.0.1", "-addext",
                    "subjectAltName=IP:127.0.0.1,IP:::1,DNS:localhost"],
                   check=True, capture_output=True)
    return cert, key


CONFIG = """\
daemon off;
master_process off;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 256; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/tmp-body;
    proxy_temp_path {d}/tmp-proxy;
    fastcgi_temp_path {d}/tmp-fastcgi;
    uwsgi_temp_path {d}/tmp-uwsgi;
    scgi_temp_path {d}/tmp-scgi;
    keepalive_requests 100000;
    server {{
        listen 127.0.0.1:{http};
        listen 127.0.0.1:{https} ssl;
        listen [::1]:{http};
        listen [::1]:{https} ssl;
        ssl_certificate {d}/cert.pem;
        ssl_certificate_key {d}/key.pem;
        root {d}/www;
        location /norange/ {{ alias {d}/www/; max_ranges 0; }}
        location /redirect/ {{ rewrite ^/redirect/(.*)$ /$1 redirect; }}
        location = /loop {{ return 302 /loop; }}
        location /away/ {{ rewrite ^/away/(.*)$ http://[::1]:{http}/$1 redirect; }}
        location /auth/ {{
            alias {d}/www/;
            auth_basic "imgfs";
            auth_basic_user_file {d}/htpasswd;
        }}
        location /cookie/ {{
            alias {d}/www/;
            if ($http_cookie != "{cookie}") {{ return 403; }}
        }}
    }}
}}
"""


class Nginx:
    """nginx serving `directory`/www; `start()` and `stop()` may repeat
    (the same ports), as a server that goes away and comes back."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.www = directory / "www"
        self.www.mkdir(parents=True, exist_ok=True)
        self.cert, _ = make_certificate(directory)
        (directory / "htpasswd").write_text(f"imgfs:{{PLAIN}}{PASSWORD}\n")
        self.http_port, self.https_port = free_port(), free_port()
        (directory / "nginx.conf").write_text(CONFIG.format(
            d=directory, http=self.http_port, https=self.https_port, cookie=COOKIE))
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, name: str, *, https: bool = False, host: str = "127.0.0.1") -> str:
        host = f"[{host}]" if ":" in host else host
        if https:
            return f"https://{host}:{self.https_port}/{name}"
        return f"http://{host}:{self.http_port}/{name}"

    def start(self) -> None:
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        with open(self.dir / "stderr.log", "ab") as log:
            self.proc = subprocess.Popen([nginx, "-c", str(self.dir / "nginx.conf"),
                                          "-p", f"{self.dir}/"], stdout=log, stderr=log)
        deadline = time.monotonic() + 10
        while not (connectable(self.http_port) and connectable(self.https_port)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("nginx did not start: "
                                   + (self.dir / "error.log").read_text(errors="replace"))
            time.sleep(0.01)

    def stop(self, *, kill: bool = False) -> None:
        """Stop by PID and wait for it (SIGKILL: as a server that dies)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill() if kill else proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
