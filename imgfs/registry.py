"""Which drivers exist, found by name, by filename prefix, or by probing.

Driver modules are imported only when needed: a mount of a raw image should
not pay for importing the qcow2 or LUKS code.  To add a driver, write
`drivers/NAME.py` (or a package `drivers/NAME/`) with a `DRIVERS` list and
give it a line in `DRIVER_TABLE` below.

Probing asks every format, so it must stay cheap: a driver package whose
code is large (or needs numpy) defines a module-level ``probe(head,
filename)`` in its ``__init__`` from light modules only, and imports its
driver class on first use of ``DRIVERS`` (a module ``__getattr__``).
"""
from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

from .block import Kind
from .errors import UsageError

if TYPE_CHECKING:
    from .block import BlockDriver

@dataclass(frozen=True)
class DriverEntry:
    """One line of the driver table."""

    name: str
    #: the module (or package) under imgfs.drivers that defines it
    module: str
    kind: Kind
    #: filename prefixes (before the first ':') that name this protocol
    prefixes: tuple[str, ...] = ()


_F, _P = Kind.FORMAT, Kind.PROTOCOL

#: every driver imgfs knows, formats first in probe order (raw, which claims
#: anything, last); a driver whose module is not written yet is skipped
DRIVER_TABLE = (
    DriverEntry("qcow2", "qcow2", _F),
    DriverEntry("qcow", "qcow", _F),
    DriverEntry("qed", "qed", _F),
    DriverEntry("vmdk", "vmdk", _F),
    DriverEntry("vhdx", "vhdx", _F),
    DriverEntry("vpc", "vpc", _F),
    DriverEntry("vdi", "vdi", _F),
    DriverEntry("luks", "luks", _F),
    DriverEntry("parallels", "parallels", _F),
    DriverEntry("bochs", "bochs", _F),
    DriverEntry("cloop", "cloop", _F),
    DriverEntry("dmg", "dmg", _F),
    DriverEntry("raw", "raw", _F),
    DriverEntry("file", "file", _P, ("file",)),
    DriverEntry("host_device", "file", _P),
    DriverEntry("nbd", "nbd", _P, ("nbd", "nbd+tcp", "nbd+unix")),
    DriverEntry("ssh", "ssh", _P, ("ssh",)),
    DriverEntry("http", "http", _P, ("http",)),
    DriverEntry("https", "http", _P, ("https",)),
    DriverEntry("iscsi", "iscsi", _P, ("iscsi",)),
    DriverEntry("gluster", "gluster", _P, ("gluster", "gluster+tcp", "gluster+unix",
                                           "gluster+rdma")),
    DriverEntry("rbd", "rbd", _P, ("rbd",)),
    DriverEntry("fat", "fat", _P, ("fat",)),
)

#: driver name -> module in imgfs.drivers
DRIVER_MODULES: dict[str, str] = {entry.name: entry.module for entry in DRIVER_TABLE}
#: the formats probing asks, in order
FORMATS = tuple(entry.name for entry in DRIVER_TABLE if entry.kind is Kind.FORMAT)
#: filename prefix -> protocol driver name
PREFIXES: dict[str, str] = {prefix: entry.name for entry in DRIVER_TABLE
                            for prefix in entry.prefixes}


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
