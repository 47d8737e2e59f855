"""URL pieces shared by the network protocol drivers."""
from __future__ import annotations

import urllib.parse


def query_params(query: str) -> list[tuple[str, str]]:
    """RFC 3986 query parameters: percent-decoded, and '+' stays '+' (it
    means a space only in HTML forms, and '+' is common in socket paths)."""
    params = []
    for item in query.split("&") if query else ():
        name, _, value = item.partition("=")
        params.append((urllib.parse.unquote(name), urllib.parse.unquote(value)))
    return params
