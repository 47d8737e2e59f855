"""Which drivers exist, found by name, by filename prefix, or by probing.

Driver modules are imported only when needed: a mount of a raw image should
not pay for importing the qcow2 or LUKS code.  To add a driver, write
`drivers/NAME.py` with a `DRIVERS` list and add it to the tables below.

Probing asks every format, so it must stay cheap: a driver package whose
code is large (or needs numpy) defines a module-level ``probe(head,
filename)`` in its ``__init__`` from light modules only, and imports its
driver class on first use of ``DRIVERS`` (a module ``__getattr__``).
"""
from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from types import ModuleType
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

#: the formats probing asks, in order (raw, which claims anything, last)
FORMATS = ("qcow2", "qcow", "qed", "vmdk", "vhdx", "vpc", "vdi", "luks", "parallels",
           "bochs", "cloop", "dmg", "raw")

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


def _module(name: str) -> ModuleType | None:
    module_name = DRIVER_MODULES.get(name)
    if module_name is None:
        return None
    try:
        return importlib.import_module(f"imgfs.drivers.{module_name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"imgfs.drivers.{module_name}":
            return None          # listed but not written yet
        raise


def _load(name: str) -> type[BlockDriver] | None:
    module = _module(name)
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


def protocol_for(filename: str) -> str | None:
    """The protocol a filename names with a ``proto:`` prefix, if any."""
    head, sep, _ = filename.partition(":")
    if not sep or "/" in head:
        return None
    return PREFIXES.get(head.lower())


ProbeFn = Callable[[bytes, str], int]


@functools.cache
def _probe_function(name: str) -> ProbeFn | None:
    """The module's light ``probe`` if it has one, else the class's."""
    module = _module(name)
    if module is None:
        return None
    light = module.__dict__.get("probe")
    if light is not None:
        return light  # type: ignore[no-any-return]
    cls = _load(name)
    return cls.probe if cls is not None else None


def probe_format(head: bytes, filename: str) -> type[BlockDriver]:
    """The format whose probe scores highest; raw (score 1) only as a last resort."""
    best, best_score = "raw", 0
    for name in FORMATS:
        probe = _probe_function(name)
        score = probe(head, filename) if probe is not None else 0
        if score > best_score:
            best, best_score = name, score
    return get_driver(best)
