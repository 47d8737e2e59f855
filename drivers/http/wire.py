"""HTTP/1.1 on the wire (RFC 9112), as far as a client of range requests
needs it: the request head it sends, and the status line, header fields
and body framing of the answers it reads.

Strict and bounded: anything but ``HTTP/1.0`` or ``HTTP/1.1``, a line not
ended by CRLF (a bare LF is refused, as RFC 9112 2.2 allows), a field line
that is not ``token ":" value``, a control character, a Content-Length that
is not one decimal number, a transfer coding other than ``chunked``, or
both framings at once is refused (`BadAnswer`) rather than guessed at; the
caller bounds how many bytes it reads before a head or a chunk line ends.

Pure: no I/O, unit-tested in tests/unit/test_http_wire.py.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from imgfs.netio import printable

from .url import CONTROL

#: a field value's characters: visible, SP, HT and obs-text (RFC 9110 5.5)
_VALUE = r"[\t\x20-\x7e\x80-\xff]*"
#: a status line: the version, the code and the (optional) reason phrase
_STATUS = rf"HTTP/1\.([01]) ([0-9]{{3}})(?: ({_VALUE}))?"
#: a field line (its name a token, RFC 9110 5.1) and an obsolete line fold
_FIELD = rf"[!#$%&'*+.^_`|~0-9A-Za-z-]+:{_VALUE}"
_FOLD = rf"[ \t]{_VALUE}"
STATUS_LINE = re.compile(_STATUS)
FIELD_LINE = re.compile(f"{_FIELD}|{_FOLD}")
#: a whole head, checked in one pass (the common case: a valid one)
HEAD = re.compile(rf"{_STATUS}(?:\r\n(?:{_FIELD}|{_FOLD}))*")
TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
#: what may not appear in a head line or a chunk line: controls but HT
FORBIDDEN = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
#: a chunk's size: hexadecimal digits (RFC 9112 7.1), extensions ignored
CHUNK_SIZE = re.compile(r"([0-9A-Fa-f]{1,15})[ \t]*(?:;.*)?", re.DOTALL)
#: the most digits of a Content-Length (beyond any file's size)
MAX_LENGTH_DIGITS = 18
#: statuses whose answers have no body (RFC 9112 6.3)
NO_BODY = frozenset({204, 304})


class BadAnswer(Exception):
    """The server's bytes are not a valid HTTP/1.1 answer (message: why)."""


@dataclass(slots=True)
class Response:
    """One answer's head.  `headers` maps lower-case field names to their
    value (repeated fields joined with ", ", RFC 9110 5.3); the body is
    `length` bytes long, or `chunked`, or (neither) runs until the server
    closes the connection."""

    version: str
    status: int
    reason: str
    headers: dict[str, str]
    length: int | None
    chunked: bool

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    @property
    def keep_alive(self) -> bool:
        """Whether the server keeps the connection after this answer (RFC 9112 9.3)."""
        connection = self.headers.get("connection", "").lower()
        return self.version == "1.1" and "close" not in connection


def request_head(method: str, target: str, fields: Iterable[tuple[str, str]]) -> bytes:
    """A request's line and fields, without the empty line that ends them."""
    lines = [f"{method} {target} HTTP/1.1"]
    for name, value in fields:
        if not TOKEN.fullmatch(name) or CONTROL.search(value):
            raise ValueError(f"the header {printable(name)} cannot be sent as given")
        lines.append(f"{name}: {value}")
    if CONTROL.search(target) or " " in target:
        raise ValueError("the request target holds spaces or control characters")
    return ("\r\n".join(lines) + "\r\n").encode("latin-1")


def parse_head(head: str) -> Response:
    """The status line and fields of `head` (latin-1 text up to, not
    including, the empty line)."""
    match = HEAD.fullmatch(head)
    if match is None:
        raise BadAnswer(what_is_wrong(head.split("\r\n")))
    minor, code, reason = match.groups()
    status = int(code)
    headers = parse_fields(head.split("\r\n")[1:])
    length, chunked = framing(status, headers)
    return Response("1." + minor, status, reason or "", headers, length, chunked)


def what_is_wrong(lines: list[str]) -> str:
    """Why the head made of `lines` is not a valid one."""
    for number, line in enumerate(lines):
        bad = FORBIDDEN.search(line)
        if bad is not None:
            return f"control character {ord(bad.group()):#04x} in the head"
        if number == 0 and not STATUS_LINE.fullmatch(line):
            return f"bad status line '{printable(line)[:100]}'"
        if number > 0 and not FIELD_LINE.fullmatch(line):
            return f"bad field line '{printable(line)[:100]}'"
    return "bad head"


def parse_fields(lines: list[str]) -> dict[str, str]:
    """Field lines (each a valid one, see HEAD) -> {lower-case name:
    value}; an obsolete line fold (a line starting with white space)
    continues the value before it with a space (RFC 9112 5.2)."""
    headers: dict[str, str] = {}
    name = ""
    for line in lines:
        if line[0] in " \t":
            if not name:
                raise BadAnswer("a folded line before any field")
            headers[name] = (headers[name] + " " + line.strip(" \t")).rstrip(" ")
            continue
        name, _, value = line.partition(":")
        name = name.lower()
        value = value.strip(" \t")
        if name in headers:
            value = headers[name] + ", " + value
        headers[name] = value
    return headers


def framing(status: int, headers: dict[str, str]) -> tuple[int | None, bool]:
    """(length, chunked) of the body of an answer to a GET (RFC 9112 6.3)."""
    if status < 200 or status in NO_BODY:
        return 0, False
    coding = headers.get("transfer-encoding")
    declared = headers.get("content-length")
    if coding is not None:
        if declared is not None:
            raise BadAnswer("both Transfer-Encoding and Content-Length")
        if coding.lower() != "chunked":
            raise BadAnswer(f"unsupported Transfer-Encoding '{printable(coding)[:100]}'")
        return None, True
    if declared is None:
        return None, False
    return content_length(declared), False


def content_length(value: str) -> int:
    """A Content-Length: one decimal number (repeated as the same number at most)."""
    if value.isdigit() and value.isascii() and len(value) <= MAX_LENGTH_DIGITS:
        return int(value)
    numbers = {item.strip(" \t") for item in value.split(",")}
    if len(numbers) != 1:
        raise BadAnswer(f"conflicting Content-Length '{printable(value)[:100]}'")
    number = numbers.pop()
    if not (number.isascii() and number.isdigit()) or len(number) > MAX_LENGTH_DIGITS:
        raise BadAnswer(f"bad Content-Length '{printable(value)[:100]}'")
    return int(number)


def chunk_size(line: str) -> int:
    """The size a chunk's line (RFC 9112 7.1) announces."""
    match = CHUNK_SIZE.fullmatch(line)
    if match is None or FORBIDDEN.search(line):
        raise BadAnswer(f"bad chunk size line '{printable(line)[:100]}'")
    return int(match.group(1), 16)
