"""Which drivers exist, found by name, by filename prefix, or by probing.

Driver modules are imported only when needed: a mount of a raw image should
not pay for importing the qcow2 or LUKS code.  To add a driver, write
`drivers/NAME.py` (or a package `drivers/NAME/`) with a `DRIVERS` list and
give it a line in `DRIVER_TABLE` below.

Probing asks every format, so it must stay cheap: a driver package whose
code is large (or needs numpy) defines a module-level ``probe(head,
filename)`` in its ``__init__`` from light modules only, and imports its
driver class on first use of ``DRIVERS`` (a module ``__getattr__``).  A
format whose signature sits at the end of the file also defines a light
``probe_tail(tail, filename)`` there (`tail`: the file's last bytes).  A
format stored as a directory defines ``probe_directory(path)``, which
names the file inside it to open instead.

A format QEMU knows but imgfs has no driver for is still recognised, by its
entry in `imgfs.signatures.SIGNATURES`, and refused: it is never opened as
raw.  Once the driver's module exists, its own probe is asked instead.
"""
from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

from .block import Kind
from .errors import Unsupported, UsageError
from .signatures import SIGNATURES, ProbeFn

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
    if cls is None and name in SIGNATURES:
        raise not_supported(name)
    if cls is None:
        raise UsageError(f"unknown format or driver '{name}' (see 'imgfs formats')")
    return cls


def not_supported(name: str) -> Unsupported:
    """The refusal of a format imgfs knows of but has no driver for."""
    return Unsupported(f"{name} images are not supported by this version (see 'imgfs formats')")


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


@functools.cache
def _probe_functions(name: str) -> tuple[ProbeFn | None, ProbeFn | None]:
    """(head probe, tail probe) of a format: its driver module's light
    ``probe`` / ``probe_tail`` (else the class's ``probe``) when the module
    exists, else the signature that recognises it without a driver."""
    module = _module(name)
    if module is None:
        signature = SIGNATURES.get(name)
        return (signature.head, signature.tail) if signature else (None, None)
    head = module.__dict__.get("probe")
    if head is None:
        cls = _load(name)
        head = cls.probe if cls is not None else None
    return head, module.__dict__.get("probe_tail")


def directory_image(path: str) -> str | None:
    """The file that opens an image stored as a directory (a Parallels
    ``.hdd`` bundle names its DiskDescriptor.xml): asked of each format
    module's light ``probe_directory(path)``, first answer wins."""
    for name in FORMATS:
        module = _module(name)
        probe_directory = module.__dict__.get("probe_directory") if module else None
        found = probe_directory(path) if probe_directory is not None else None
        if found is not None:
            return str(found)
    return None


def probe_name(head: bytes, filename: str, tail: bytes = b"") -> str:
    """The name of the format whose probe scores highest over the file's
    first bytes (`head`) and last bytes (`tail`); "raw" when none claims it."""
    best, best_score = "raw", 0
    for name in FORMATS:
        head_probe, tail_probe = _probe_functions(name)
        score = max(head_probe(head, filename) if head_probe is not None else 0,
                    tail_probe(tail, filename) if tail_probe is not None else 0)
        if score > best_score:
            best, best_score = name, score
    return best


def probe_format(head: bytes, filename: str, tail: bytes = b"") -> type[BlockDriver]:
    """The driver of the probed format; a format recognised without a driver
    is refused (never opened as raw)."""
    name = probe_name(head, filename, tail)
    cls = _load(name)
    if cls is None:
        raise not_supported(name)
    return cls


def unsupported_formats() -> list[tuple[str, str]]:
    """(name, description) of each format probing recognises and refuses
    because its driver is not installed."""
    return [(name, SIGNATURES[name].description) for name in FORMATS
            if name in SIGNATURES and _module(name) is None]
