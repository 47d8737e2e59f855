"""GlusterFS sources as QEMU spells them (qemu-block-drivers(7), "GlusterFS").

    gluster[+tcp|+unix|+rdma]://[HOST[:PORT]]/VOLUME/PATH[?socket=SOCKET]
    json:{"driver":"gluster","volume":V,"path":P,"server":[{"type":"tcp",
          "host":H,"port":"24007"},{"type":"unix","socket":S}],"debug":4,
          "logfile":F}

Several servers are tried in order for the volume's configuration; +rdma
is taken as tcp, as QEMU does.  Pure functions, no I/O.
"""
from __future__ import annotations

import logging
import urllib.parse
from dataclasses import dataclass
from typing import Any

from imgfs.errors import UsageError
from imgfs.urls import parse_port, query_params

log = logging.getLogger("imgfs")

#: glusterd's management port
DEFAULT_PORT = 24007
SCHEMES = ("gluster", "gluster+tcp", "gluster+unix", "gluster+rdma")


@dataclass(frozen=True)
class Server:
    """Where the volume's configuration is fetched: tcp HOST:PORT or a unix socket."""

    transport: str          # "tcp" | "unix"
    host: str               # host name, or the socket path for unix
    port: int = DEFAULT_PORT

    def __str__(self) -> str:
        if self.transport == "unix":
            return f"unix:{self.host}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_gluster_filename(filename: str) -> dict[str, Any]:
    """The driver options of a ``gluster://`` URI."""
    try:
        parts = urllib.parse.urlsplit(filename)
        port = parts.port
    except ValueError as exc:
        raise UsageError(f"invalid gluster URI '{filename}': {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise UsageError(f"'{filename}' is not a gluster URI")
    volume, _, path = urllib.parse.unquote(parts.path).lstrip("/").partition("/")
    if not volume or not path:
        raise UsageError(f"invalid gluster URI '{filename}': expected /VOLUME/PATH")
    query = query_params(parts.query)
    if scheme == "gluster+unix":
        if parts.netloc:
            raise UsageError(f"invalid gluster URI '{filename}': gluster+unix takes no host")
        if [name for name, _ in query] != ["socket"] or not query[0][1]:
            raise UsageError(f"invalid gluster URI '{filename}': gluster+unix needs "
                             "?socket=PATH and nothing else")
        server = {"type": "unix", "socket": query[0][1]}
    else:
        if query:
            raise UsageError(f"invalid gluster URI '{filename}': unexpected query "
                             f"parameter '{query[0][0]}'")
        server = {"type": "tcp", "host": parts.hostname or "localhost",
                  "port": str(DEFAULT_PORT if port is None else port)}
        if scheme == "gluster+rdma":
            log.warning("gluster: rdma transport is not supported, using tcp")
    return {"volume": volume, "path": path, "server": [server]}


def parse_servers(value: Any) -> tuple[Server, ...]:
    """``server``: a list of QEMU SocketAddress objects (tcp/inet or unix),
    or the flat ``server.0.host=...`` form, which arrives as a dict by index."""
    if isinstance(value, dict) and all(str(key).isdigit() for key in value):
        value = [value[key] for key in sorted(value, key=int)]
    if not isinstance(value, list) or not value:
        raise UsageError("expected a non-empty list of servers")
    return tuple(_server(entry) for entry in value)


def _server(entry: Any) -> Server:
    if not isinstance(entry, dict):
        raise UsageError("each server is an object with 'type' and 'host' or 'socket'")
    kind = str(entry.get("type", "tcp"))
    if kind in ("tcp", "inet"):
        _only(entry, {"type", "host", "port"}, kind)
        host = str(entry.get("host") or "")
        if not host:
            raise UsageError("a tcp server needs a 'host'")
        return Server("tcp", host, parse_port(entry.get("port", DEFAULT_PORT), "gluster"))
    if kind == "unix":
        _only(entry, {"type", "socket", "path"}, kind)
        socket = str(entry.get("socket") or entry.get("path") or "")
        if not socket:
            raise UsageError("a unix server needs a 'socket'")
        return Server("unix", socket)
    raise UsageError(f"server type '{kind}' not supported (use tcp or unix)")


def _only(entry: dict[str, Any], allowed: set[str], kind: str) -> None:
    unknown = set(entry) - allowed
    if unknown:
        raise UsageError(f"unknown key '{sorted(unknown)[0]}' for a {kind} server")


def describe(volume: str, path: str, servers: tuple[Server, ...]) -> str:
    """How messages name the source: ``gluster://HOST:PORT/VOLUME/PATH``."""
    return f"gluster://{servers[0]}/{volume}/{path.lstrip('/')}"
