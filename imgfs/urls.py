"""URL pieces shared by the network protocol drivers."""
from __future__ import annotations

import urllib.parse
from typing import Any

from .errors import UsageError


def parse_port(value: Any, protocol: str) -> int:
    """A TCP port number given as text or a number."""
    text = str(value)
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise UsageError(f"invalid {protocol} port '{text}' (expected 1 to 65535)")
    return int(text)


def query_params(query: str) -> list[tuple[str, str]]:
    """RFC 3986 query parameters: percent-decoded, and '+' stays '+' (it
    means a space only in HTML forms, and '+' is common in socket paths)."""
    params = []
    for item in query.split("&") if query else ():
        name, _, value = item.partition("=")
        params.append((urllib.parse.unquote(name), urllib.parse.unquote(value)))
    return params
