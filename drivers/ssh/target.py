"""Where an ssh source lives: its URL and QEMU's option names, parsed (pure).

URL (QEMU's ``ssh`` block driver syntax)::

    ssh://[USER@]HOST[:PORT]/PATH[?host_key_check=yes|no|md5:HEX|sha1:HEX|sha256:HEX]

json:/-o: ``server.host``, ``server.port`` (or the legacy flat ``host``,
``port``), ``user``, ``path``, and ``host_key_check`` (the string above) or
QEMU's structured ``host-key-check`` (``mode`` none|known_hosts|hash,
``type`` md5|sha1|sha256, ``hash``).
"""
from __future__ import annotations

import hashlib
import urllib.parse
from dataclasses import dataclass
from typing import Any

from imgfs.errors import UsageError
from imgfs.urls import parse_port, query_params

SSH_DEFAULT_PORT = 22
HASH_TYPES = ("md5", "sha1", "sha256")


@dataclass(frozen=True)
class HostKeyCheck:
    """How the server's host key is checked: "known_hosts" (the user's
    ~/.ssh/known_hosts), "none", or "hash" (`hash_type`, `digest` in hex)."""

    mode: str = "known_hosts"
    hash_type: str = ""
    digest: str = ""

    def expected(self) -> str:
        """ALGO:HEX, as the user gave it (for messages)."""
        return f"{self.hash_type}:{self.digest}"


def _hex_digest(hash_type: str, text: str) -> str:
    digest = text.replace(":", "").lower()
    size = hashlib.new(hash_type).digest_size
    if len(digest) != 2 * size or any(char not in "0123456789abcdef" for char in digest):
        raise UsageError(f"host key {hash_type} fingerprint '{text}' is not {size} "
                         f"hexadecimal bytes")
    return digest


def parse_host_key_check(value: Any) -> HostKeyCheck:
    """QEMU's string form: yes | no | md5:HEX | sha1:HEX | sha256:HEX."""
    text = str(value)
    if text == "yes":
        return HostKeyCheck()
    if text == "no":
        return HostKeyCheck("none")
    hash_type, sep, digest = text.partition(":")
    if sep and hash_type in HASH_TYPES:
        return HostKeyCheck("hash", hash_type, _hex_digest(hash_type, digest))
    raise UsageError(f"host_key_check '{text}' not understood (use yes, no, md5:HEX, "
                     f"sha1:HEX or sha256:HEX)")


def parse_structured_check(value: Any) -> HostKeyCheck:
    """QEMU's ``host-key-check`` object: mode, and for hash: type, hash."""
    if not isinstance(value, dict):
        raise UsageError("expected an object with 'mode' (none, known_hosts or hash)")
    unknown = set(value) - {"mode", "type", "hash"}
    if unknown:
        raise UsageError(f"unknown key '{sorted(unknown)[0]}' in host-key-check")
    mode = str(value.get("mode", "known_hosts"))
    if mode in ("none", "known_hosts"):
        return HostKeyCheck(mode)
    if mode != "hash":
        raise UsageError(f"host-key-check mode '{mode}' (use none, known_hosts or hash)")
    hash_type = str(value.get("type", ""))
    if hash_type not in HASH_TYPES:
        raise UsageError(f"host-key-check type '{hash_type}' (use md5, sha1 or sha256)")
    return HostKeyCheck("hash", hash_type, _hex_digest(hash_type, str(value.get("hash", ""))))


def parse_server(value: Any) -> dict[str, str]:
    """QEMU's InetSocketAddress for `server`: host and port."""
    if not isinstance(value, dict):
        raise UsageError("expected an object with 'host' and 'port'")
    unknown = set(value) - {"host", "port", "type"}
    if unknown:
        raise UsageError(f"unknown key '{sorted(unknown)[0]}' for an ssh server")
    if value.get("type", "inet") != "inet":
        raise UsageError("an ssh server is an inet address (host and port)")
    if not value.get("host"):
        raise UsageError("the ssh server needs a 'host'")
    server = {"host": str(value["host"])}
    if value.get("port") is not None:
        server["port"] = str(parse_port(value["port"], "ssh"))
    return server


def parse_ssh_filename(filename: str) -> dict[str, Any]:
    """Options for an ``ssh://`` URL."""
    try:
        parts = urllib.parse.urlsplit(filename)
        port = parts.port
    except ValueError as exc:
        raise UsageError(f"invalid ssh URL: {exc}") from None
    if parts.scheme.lower() != "ssh":
        raise UsageError("not an ssh:// URL")
    if parts.password is not None:
        raise UsageError("ssh URLs take no password (log in with ssh-agent or a key)")
    if not parts.hostname:
        raise UsageError("the ssh URL has no host")
    if not parts.path or parts.path == "/":
        raise UsageError("the ssh URL has no path")
    options: dict[str, Any] = {"server": {"host": parts.hostname}}
    if port is not None:
        options["server"]["port"] = str(port)
    if parts.username:
        options["user"] = urllib.parse.unquote(parts.username)
    options["path"] = urllib.parse.unquote(parts.path)
    for name, value in query_params(parts.query):
        if name != "host_key_check" or "host_key_check" in options:
            raise UsageError(f"unexpected query parameter '{name}' in the ssh URL "
                             f"(only host_key_check)")
        options["host_key_check"] = value
    return options


@dataclass(frozen=True)
class Target:
    """A file on an ssh server: how to reach it and how to trust the server."""

    host: str
    path: str
    port: int | None = None
    user: str | None = None
    host_key_check: HostKeyCheck = HostKeyCheck()

    def url(self) -> str:
        """The URL naming the file (for messages: never a secret in it)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        user = f"{urllib.parse.quote(self.user, safe='')}@" if self.user else ""
        port = f":{self.port}" if self.port is not None else ""
        path = urllib.parse.quote(self.path, safe="/~")
        return f"ssh://{user}{host}{port}{path}"

    def host_port(self) -> str:
        """HOST:PORT, as QEMU names the server in its warnings."""
        return f"{self.host}:{self.port or SSH_DEFAULT_PORT}"


def resolve_target(options: dict[str, Any]) -> Target:
    """The target from parsed open options (a URL in `filename` fills gaps)."""
    given = {key: value for key, value in options.items() if value is not None}
    if given.get("filename"):
        for key, value in parse_ssh_filename(given.pop("filename")).items():
            given.setdefault(key, value)
    if "server" in given and ("host" in given or "port" in given):
        raise UsageError("ssh: give either 'server' or 'host'/'port', not both")
    server = parse_server(given["server"]) if "server" in given else (
        {"host": str(given["host"]), **({"port": str(given["port"])} if "port" in given else {})}
        if "host" in given else None)
    if server is None:
        raise UsageError("ssh: no server given (use ssh://HOST/PATH or server.host=...)")
    host = server["host"]
    if host.startswith("-") or any(char.isspace() for char in host):
        raise UsageError(f"ssh: invalid host name '{host}'")
    path = str(given.get("path") or "")
    if not path or "\0" in path:
        raise UsageError("ssh: no path given (the file on the server)")
    if "host_key_check" in given and "host-key-check" in given:
        raise UsageError("ssh: give either 'host_key_check' or 'host-key-check', not both")
    check = HostKeyCheck()
    if "host_key_check" in given:
        check = parse_host_key_check(given["host_key_check"])
    elif "host-key-check" in given:
        check = parse_structured_check(given["host-key-check"])
    user = str(given["user"]) if given.get("user") else None
    if user is not None and (user.startswith("-") or any(char.isspace() for char in user)):
        raise UsageError(f"ssh: invalid user name '{user}'")
    return Target(host, path, parse_port(server["port"], "ssh") if "port" in server else None,
                  user, check)
