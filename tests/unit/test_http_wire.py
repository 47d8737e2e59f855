"""The http driver's HTTP/1.1 wire format: request heads, answer heads, framing."""
from __future__ import annotations

import pytest
from imgfs.drivers.http.wire import BadAnswer, chunk_size, parse_head, request_head


def head(*lines: str) -> str:
    return "\r\n".join(lines)


def test_request_head() -> None:
    assert request_head("GET", "/a?b=1", [("Host", "h:8080"), ("Range", "bytes=0-0")]) == (
        b"GET /a?b=1 HTTP/1.1\r\nHost: h:8080\r\nRange: bytes=0-0\r\n")
    with pytest.raises(ValueError):
        request_head("GET", "/", [("Cookie", "a\r\nX-Evil: 1")])
    with pytest.raises(ValueError):
        request_head("GET", "/", [("Bad Name", "1")])
    with pytest.raises(ValueError):
        request_head("GET", "/a b", [])


def test_answer_head_fields_and_framing() -> None:
    response = parse_head(head("HTTP/1.1 206 Partial Content", "Content-Length: 5",
                               "ETag:\t\"x\" ", "Set-Thing: a", "set-thing: b",
                               "X-Folded: one", "  two"))
    assert (response.version, response.status, response.reason) == ("1.1", 206,
                                                                     "Partial Content")
    assert (response.length, response.chunked, response.keep_alive) == (5, False, True)
    assert response.header("etag") == '"x"'
    assert response.header("set-thing") == "a, b"
    assert response.header("x-folded") == "one two"
    assert response.header("missing") is None


@pytest.mark.parametrize("lines, length, chunked, keep_alive", [
    (["HTTP/1.1 200 OK", "Transfer-Encoding: Chunked"], None, True, True),
    (["HTTP/1.1 200 OK"], None, False, True),                 # until the server closes
    (["HTTP/1.1 200"], None, False, True),                    # no reason phrase
    (["HTTP/1.1 204 No Content", "Content-Length: 9"], 0, False, True),
    (["HTTP/1.1 304 Not Modified"], 0, False, True),
    (["HTTP/1.1 100 Continue"], 0, False, True),
    (["HTTP/1.1 206 P", "Content-Length: 7, 7"], 7, False, True),
    (["HTTP/1.1 206 P", "Content-Length: 7", "Connection: close"], 7, False, False),
    (["HTTP/1.0 206 P", "Content-Length: 7"], 7, False, False),
])
def test_framing(lines: list[str], length: int | None, chunked: bool, keep_alive: bool) -> None:
    response = parse_head(head(*lines))
    assert (response.length, response.chunked, response.keep_alive) == (length, chunked,
                                                                         keep_alive)


@pytest.mark.parametrize("lines, message", [
    (["HTTP/2 200 OK"], "bad status line"),
    (["HTTP/1.1 2OO OK"], "bad status line"),
    (["ICY 200 OK"], "bad status line"),
    (["HTTP/1.1  200 OK"], "bad status line"),
    (["", "HTTP/1.1 200 OK"], "bad status line"),
    (["HTTP/1.1 200 OK", "No colon here"], "bad field line"),
    (["HTTP/1.1 200 OK", "Space before : colon"], "bad field line"),
    (["HTTP/1.1 200 OK", ": no name"], "bad field line"),
    (["HTTP/1.1 200 OK", " folded first"], "a folded line before any field"),
    (["HTTP/1.1 200 OK", "X: a\x00b"], "control character 0x00"),
    (["HTTP/1.1 200 OK", "X: a\rb"], "control character 0x0d"),
    (["HTTP/1.1 200 OK", "X: a\nb"], "control character 0x0a"),
    (["HTTP/1.1 206 P", "Content-Length: -1"], "bad Content-Length"),
    (["HTTP/1.1 206 P", "Content-Length: 0x10"], "bad Content-Length"),
    (["HTTP/1.1 206 P", "Content-Length: \u00b2"], "bad Content-Length"),
    (["HTTP/1.1 206 P", "Content-Length: " + "9" * 5000], "bad Content-Length"),
    (["HTTP/1.1 206 P", "Content-Length: 5", "Content-Length: 6"], "conflicting"),
    (["HTTP/1.1 206 P", "Content-Length: "], "bad Content-Length"),
    (["HTTP/1.1 200 OK", "Transfer-Encoding: gzip, chunked"], "unsupported Transfer-Enc"),
    (["HTTP/1.1 200 OK", "Transfer-Encoding: chunked", "Content-Length: 5"], "both"),
])
def test_bad_heads_are_refused(lines: list[str], message: str) -> None:
    with pytest.raises(BadAnswer, match=message):
        parse_head(head(*lines))


def test_chunk_sizes() -> None:
    assert chunk_size("1a") == 26
    assert chunk_size("0") == 0
    assert chunk_size("10;name=value") == 16
    assert chunk_size("FF \t; ext") == 255
    for line in ["", "g", "-1", "1" * 16, " 1", "1\x00"]:
        with pytest.raises(BadAnswer):
            chunk_size(line)
