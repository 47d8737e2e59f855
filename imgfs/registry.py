"""Which drivers exist, found by name, by filename prefix, or by probing.

Driver modules are imported only when needed: a mount of a raw image should
not pay for importing the qcow2 or LUKS code.  To add a driver, write
`drivers/NAME.py` with a `DRIVERS` list and add it to the tables below.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .errors import UsageError

if TYPE_CHECKING:
    from .block import BlockDriver

#: driver name -> module in imgfs.drivers (formats first, in probe order)
DRIVER_MODULES: dict[str, str] = {
    "qcow2": "qcow2",
    "qcow": "qcow",
    "qed": "qed",
    "vmdk": "vmdk",
    "vhdx": "vhdx",
    "vpc": "vpc",
    "vdi": "vdi",
    "luks": "luks",
    "parallels": "parallels",
    "bochs": "bochs",
    "cloop": "cloop",
    "dmg": "dmg",
    "raw": "raw",
    "file": "file",
    "host_device": "file",
    "nbd": "nbd",
    "ssh": "ssh",
    "http": "http",
    "https": "http",
    "iscsi": "iscsi",
    "gluster": "gluster",
    "fat": "fat",
}

#: filename prefix (before the first ':') -> protocol driver name
PREFIXES: dict[str, str] = {
    "file": "file",
    "nbd": "nbd",
    "nbd+tcp": "nbd",
    "nbd+unix": "nbd",
    "ssh": "ssh",
    "http": "http",
    "https": "https",
    "iscsi": "iscsi",
    "gluster": "gluster",
    "gluster+tcp": "gluster",
    "gluster+unix": "gluster",
    "gluster+rdma": "gluster",
    "fat": "fat",
}


def _load(name: str) -> type[BlockDriver] | None:
    module_name = DRIVER_MODULES.get(name)
    if module_name is None:
        return None
    try:
        module = importlib.import_module(f"imgfs.drivers.{module_name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"imgfs.drivers.{module_name}":
            return None          # listed but not written yet
        raise
    for cls in getattr(module, "DRIVERS", ()):
        if cls.name == name:
            return cls
    return None


def get_driver(name: str) -> type[BlockDriver]:
    cls = _load(name)
    if cls is None:
        raise UsageError(f"unknown format or driver '{name}' (see 'imgfs formats')")
    return cls


def available_drivers() -> list[type[BlockDriver]]:
    """Every driver that is installed, in table order."""
    found = []
    for name in DRIVER_MODULES:
        cls = _load(name)
        if cls is not None:
            found.append(cls)
    return found


def format_drivers() -> list[type[BlockDriver]]:
    from .block import Kind
    return [cls for cls in available_drivers() if cls.kind is Kind.FORMAT]


def protocol_for(filename: str) -> str | None:
    """The protocol a filename names with a ``proto:`` prefix, if any."""
    head, sep, _ = filename.partition(":")
    if not sep or "/" in head:
        return None
    return PREFIXES.get(head.lower())


def probe_format(head: bytes, filename: str) -> type[BlockDriver]:
    """The format whose probe scores highest; raw (score 1) only as a last resort."""
    best: type[BlockDriver] | None = None
    best_score = 0
    for cls in format_drivers():
        score = cls.probe(head, filename)
        if score > best_score:
            best, best_score = cls, score
    if best is None:
        return get_driver("raw")
    return best
