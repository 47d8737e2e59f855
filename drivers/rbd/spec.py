"""Ceph RBD sources as QEMU spells them (qemu-block-drivers(7), "Ceph").

    rbd:POOL/[NAMESPACE/]IMAGE[@SNAPSHOT][:OPTION=VALUE[:OPTION=VALUE...]]

Options after the image: ``conf`` (a ceph.conf), ``id`` (the client's
user), ``key`` is refused (QEMU takes it only through ``key-secret``),
``mon_host``, and any other Ceph configuration option, set on the cluster
handle.  A backslash escapes the next character (``\\:``, ``\\@``).  The
``json:`` / ``-o`` form: ``pool``, ``namespace``, ``image``, ``snapshot``,
``conf``, ``user``, ``server`` (a list of ``host``/``port``),
``key-secret``.  Pure functions, no I/O.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from imgfs.errors import UsageError
from imgfs.urls import parse_port

#: keys of the filename form that are driver options, not Ceph settings
_OPTION_KEYS = {"conf": "conf", "id": "user"}


def _split_unescaped(text: str, separator: str) -> list[str]:
    """Split at `separator` where it is not preceded by a backslash;
    backslashes are kept (removed by `_unescape`)."""
    parts, current, escaped = [], [], False
    for char in text:
        if escaped:
            current.append("\\" + char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == separator:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if escaped:
        raise UsageError("rbd: a trailing backslash escapes nothing")
    parts.append("".join(current))
    return parts


def _unescape(text: str) -> str:
    out, escaped = [], False
    for char in text:
        if escaped or char != "\\":
            out.append(char)
            escaped = False
        else:
            escaped = True
    return "".join(out)


def parse_rbd_filename(filename: str) -> dict[str, Any]:
    """The driver options of an ``rbd:`` filename."""
    body = filename.partition(":")[2]
    fields = _split_unescaped(body, ":")
    location, settings = fields[0], fields[1:]
    image_part, *snapshot = _split_unescaped(location, "@")
    if len(snapshot) > 1:
        raise UsageError(f"rbd: '{filename}' names more than one snapshot")
    names = [_unescape(name) for name in _split_unescaped(image_part, "/")]
    if len(names) not in (2, 3) or not all(names):
        raise UsageError(f"rbd: '{filename}' is not rbd:POOL/[NAMESPACE/]IMAGE[@SNAPSHOT]")
    options: dict[str, Any] = {"pool": names[0], "image": names[-1]}
    if len(names) == 3:
        options["namespace"] = names[1]
    if snapshot:
        options["snapshot"] = _unescape(snapshot[0])
    ceph: dict[str, str] = {}
    for setting in settings:
        key, value = _key_value(setting, filename)
        if key == "key":
            raise UsageError("rbd: give the key with key-secret=ID (--object secret), "
                             "not in the filename")
        if key in _OPTION_KEYS:
            options[_OPTION_KEYS[key]] = value
        else:
            ceph[key] = value
    if ceph:
        options["ceph"] = ceph
    return options


def _key_value(setting: str, filename: str) -> tuple[str, str]:
    parts = _split_unescaped(setting, "=")
    if len(parts) != 2 or not parts[0]:
        raise UsageError(f"rbd: '{setting}' in '{filename}' is not OPTION=VALUE")
    return _unescape(parts[0]), _unescape(parts[1])


@dataclass(frozen=True)
class Monitor:
    host: str
    port: int | None = None

    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}" if self.port else host


def parse_monitors(value: Any) -> tuple[Monitor, ...]:
    """``server``: monitors as a list of {host, port}, or the flat
    ``server.0.host=...`` form, which arrives as a dict by index."""
    if isinstance(value, dict) and all(str(key).isdigit() for key in value):
        value = [value[key] for key in sorted(value, key=int)]
    if not isinstance(value, list) or not value:
        raise UsageError("expected a non-empty list of monitors with 'host' and 'port'")
    monitors = []
    for entry in value:
        if not isinstance(entry, dict) or not entry.get("host") or \
                set(entry) - {"host", "port"}:
            raise UsageError("each monitor is an object with 'host' and 'port'")
        port = parse_port(entry["port"], "rbd") if "port" in entry else None
        monitors.append(Monitor(str(entry["host"]), port))
    return tuple(monitors)


def parse_ceph_settings(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise UsageError("expected Ceph configuration options")
    return {str(key): str(item) for key, item in value.items()}


def describe(pool: str, namespace: str | None, image: str, snapshot: str | None) -> str:
    """How messages name the source: ``rbd:POOL/[NAMESPACE/]IMAGE[@SNAP]``."""
    path = f"{pool}/{namespace}/{image}" if namespace else f"{pool}/{image}"
    return f"rbd:{path}@{snapshot}" if snapshot else f"rbd:{path}"
