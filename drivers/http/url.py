"""http:// and https:// URLs (RFC 3986): parsed once into a `Url`, shown
without their password, joined with relative names and redirect targets.

Pure: no I/O, unit-tested in tests/unit/test_http_url.py.
"""
from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass

from imgfs.errors import UsageError
from imgfs.netio import printable

DEFAULT_PORTS = {"http": 80, "https": 443}
#: what may not appear in a request target or a header value (request
#: splitting): controls, spaces and DEL
UNSAFE = re.compile(r"[\x00-\x20\x7f]")
#: what may not appear in a header value
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: a Content-Range (RFC 9110 14.4)
CONTENT_RANGE = re.compile(r"\s*bytes\s+(?:(\d+)-(\d+)|\*)\s*/\s*(\d+|\*)\s*", re.I | re.ASCII)
#: the password part of a URL's userinfo, for messages about unparsable URLs
_USERINFO_PASSWORD = re.compile(r"(//[^/@:]*):[^/@]*@")


def redact(text: str) -> str:
    """`text` with any password in a URL's userinfo blanked."""
    return _USERINFO_PASSWORD.sub(r"\1:***@", text)


@dataclass(frozen=True)
class Url:
    """A parsed http(s) URL; `username`/`password` come from its userinfo."""

    scheme: str                  # "http" or "https"
    host: str                    # no brackets around an IPv6 address
    port: int
    target: str                  # path and query, as sent in the request line
    username: str | None = None
    password: str | None = None

    @property
    def origin(self) -> tuple[str, str, int]:
        return self.scheme, self.host, self.port

    @property
    def authority(self) -> str:
        """host[:port] as the Host header and URLs spell it."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"

    @property
    def display(self) -> str:
        """The URL for messages: the user name kept, the password never."""
        user = urllib.parse.quote(self.username, safe="") + "@" if self.username else ""
        return f"{self.scheme}://{user}{self.authority}{self.target}"

    @property
    def full(self) -> str:
        """The URL with its credentials (only for joining; never shown)."""
        if self.username is None:
            return f"{self.scheme}://{self.authority}{self.target}"
        userinfo = urllib.parse.quote(self.username, safe="")
        if self.password is not None:
            userinfo += ":" + urllib.parse.quote(self.password, safe="")
        return f"{self.scheme}://{userinfo}@{self.authority}{self.target}"

    def join(self, reference: str) -> Url:
        """A relative name or a redirect's Location, resolved against this URL."""
        return parse_url(urllib.parse.urljoin(self.full, reference))


def parse_url(text: str) -> Url:
    """Parse an http:// or https:// URL; the fragment is dropped, as clients do."""
    shown = redact(text)
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise UsageError(f"invalid URL '{shown}': {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise UsageError(f"invalid URL '{shown}': only http:// and https:// are supported")
    if not parts.hostname:
        raise UsageError(f"invalid URL '{shown}': no host")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if UNSAFE.search(target) or UNSAFE.search(parts.hostname):
        raise UsageError(f"invalid URL '{shown}': spaces and control characters must be "
                         "percent-encoded")
    unquote = urllib.parse.unquote
    return Url(scheme, parts.hostname, port if port is not None else DEFAULT_PORTS[scheme],
               target, None if parts.username is None else unquote(parts.username),
               None if parts.password is None else unquote(parts.password))


def content_range(value: str) -> tuple[int | None, int | None, int | None]:
    """``bytes FIRST-LAST/TOTAL`` (RFC 9110 14.4) -> (first, last, total);
    ``bytes */TOTAL`` gives (None, None, total) and an unknown total None."""
    match = CONTENT_RANGE.fullmatch(value)
    if not match:
        raise ValueError(f"malformed Content-Range '{printable(value)[:200]}'")
    first, last, total = match.groups()
    return (None if first is None else int(first), None if last is None else int(last),
            None if total == "*" else int(total))

