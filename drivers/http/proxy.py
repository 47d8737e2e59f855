"""HTTP proxies, chosen from the environment as libcurl (and so QEMU's
curl driver) chooses them.

``http://`` URLs use ``http_proxy`` (lower case only: a CGI program's
environment may hold a client-set ``HTTP_PROXY``), ``https://`` URLs
``https_proxy`` or ``HTTPS_PROXY``; both fall back to ``all_proxy`` /
``ALL_PROXY``.  ``no_proxy`` / ``NO_PROXY`` lists hosts and domains
reached directly (``*``: all).  A proxy is an ``http://`` URL, or
``host[:port]`` (port 1080 when none is given, as libcurl); its
credentials come from the driver's ``proxy-username`` /
``proxy-password-secret`` or from its userinfo.

Requests for an ``http://`` URL go to the proxy with the absolute URL as
their target (RFC 9112 3.2.2); an ``https://`` URL is reached through a
``CONNECT`` tunnel (RFC 9110 9.3.6) in which TLS runs end to end.
"""
from __future__ import annotations

import base64
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass

import trio

from imgfs.errors import ImgfsError, PermissionDenied, Unsupported
from imgfs.netio import printable

from .url import CONTROL, Url

#: libcurl's default proxy port
DEFAULT_PROXY_PORT = 1080
#: the longest answer to CONNECT accepted (status line and headers)
MAX_CONNECT_ANSWER = 16 * 1024


@dataclass(frozen=True)
class Proxy:
    """An HTTP proxy and the Proxy-Authorization header it is sent."""

    host: str
    port: int
    authorization: str | None = None

    @property
    def display(self) -> str:
        """The proxy for messages (never its password)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def headers(self) -> list[tuple[str, str]]:
        if self.authorization is None:
            return []
        return [("Proxy-Authorization", self.authorization)]


def proxy_setting(scheme: str, environ: Mapping[str, str]) -> str | None:
    """The environment's proxy for URLs of `scheme`, as libcurl reads it."""
    names = ["http_proxy"] if scheme == "http" else ["https_proxy", "HTTPS_PROXY"]
    for name in [*names, "all_proxy", "ALL_PROXY"]:
        value = environ.get(name, "").strip()
        if value:
            return value
    return None


def bypasses_proxy(host: str, environ: Mapping[str, str]) -> bool:
    """Whether ``no_proxy`` names `host` (itself, or a domain it is in)."""
    listing = environ.get("no_proxy", environ.get("NO_PROXY", ""))
    host = host.lower().rstrip(".")
    for entry in listing.split(","):
        entry = entry.strip().lower().lstrip(".").rstrip(".")
        if entry.startswith("[") and entry.endswith("]"):
            entry = entry[1:-1]
        if entry == "*" or (entry and (host == entry or host.endswith("." + entry))):
            return True
    return False


def parse_proxy(text: str, username: str | None, password: bytes | None) -> Proxy:
    """A proxy from its setting; `username`/`password` (the driver's
    options) win over the setting's userinfo."""
    shown = text.split("@")[-1]
    spelled = text if "://" in text else "http://" + text
    try:
        parts = urllib.parse.urlsplit(spelled)
        port = parts.port
    except ValueError as exc:
        raise ImgfsError(f"invalid proxy '{shown}': {exc}") from None
    if parts.scheme.lower() != "http":
        raise Unsupported(f"proxy '{shown}': only http:// proxies are supported "
                         f"(not {parts.scheme}://)")
    if not parts.hostname or CONTROL.search(parts.hostname):
        raise ImgfsError(f"invalid proxy '{shown}': no host")
    if username is None and parts.username is not None:
        username = urllib.parse.unquote(parts.username)
        password = urllib.parse.unquote(parts.password or "").encode()
    authorization = None
    if username is not None:
        token = base64.b64encode(username.encode() + b":" + (password or b"")).decode()
        authorization = f"Basic {token}"
    return Proxy(parts.hostname, port if port is not None else DEFAULT_PROXY_PORT,
                 authorization)


def choose_proxy(url: Url, environ: Mapping[str, str], username: str | None,
                 password: bytes | None) -> Proxy | None:
    """The proxy `url` is reached through, or None (directly)."""
    setting = proxy_setting(url.scheme, environ)
    if setting is None or bypasses_proxy(url.host, environ):
        return None
    return parse_proxy(setting, username, password)


def request_target(url: Url, proxy: Proxy | None) -> str:
    """What the request line names: the path, or to a proxy the whole URL."""
    if proxy is None or url.scheme == "https":
        return url.target
    return f"{url.scheme}://{url.authority}{url.target}"


async def open_tunnel(stream: trio.abc.Stream, proxy: Proxy, url: Url) -> None:
    """Ask the proxy on `stream` for a tunnel to `url`'s host and port."""
    host = f"[{url.host}]" if ":" in url.host else url.host
    lines = [f"CONNECT {host}:{url.port} HTTP/1.1", f"Host: {host}:{url.port}"]
    lines += [f"{name}: {value}" for name, value in proxy.headers()]
    await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    answer = bytearray()
    while b"\r\n\r\n" not in answer:
        if len(answer) > MAX_CONNECT_ANSWER:
            raise ImgfsError(f"{url.display}: the proxy {proxy.display} sent an oversized "
                             "answer to CONNECT")
        # one byte at a time: what follows the answer is the server's TLS
        chunk = await stream.receive_some(1)
        if not chunk:
            raise ImgfsError(f"{url.display}: the proxy {proxy.display} closed the "
                             "connection instead of opening a tunnel")
        answer += chunk
    status_line = answer.split(b"\r\n", 1)[0].decode("latin-1")
    fields = status_line.split(" ", 2)
    status = int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else 0
    if 200 <= status < 300:
        return
    message = (f"{url.display}: the proxy {proxy.display} refused the tunnel: "
               f"{printable(status_line)}")
    if status == 407:
        raise PermissionDenied(message + " (proxy authentication failed or needed)")
    raise ImgfsError(message)
