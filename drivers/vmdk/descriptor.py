"""The VMDK descriptor: parsing and writing (pure, no I/O).

Spec: libyal/libvmdk "VMWare Virtual Disk Format (VMDK)", section
"Descriptor file": ``# Disk DescriptorFile``, then ``key=value`` lines
(``version``, ``CID``, ``parentCID``, ``createType``,
``parentFileNameHint``), extent lines ``ACCESS SECTORS TYPE ["FILE"
[OFFSET]]`` and the disk database (``ddb.key = "value"``).  As QEMU reads
them: blank lines, comments and unknown lines are skipped, keys and values
may be spaced and quoted, line ends may be CRLF, extent lines may carry
fields after the offset.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from imgfs.errors import InvalidImage, ReadOnly, Unsupported

from .layout import SECTOR

#: extent access modes: a line starting with one of these is an extent
ACCESS_MODES = ("RW", "RDONLY", "NOACCESS")
#: extent types whose data is plain bytes at an offset of the file
FLAT_TYPES = ("FLAT", "VMFS")
SPARSE_TYPES = ("SPARSE", "VMFSSPARSE", "SESPARSE")
#: createType values a standalone descriptor may name (QEMU's list)
DESCRIPTOR_CREATE_TYPES = ("monolithicFlat", "vmfs", "vmfsSparse", "seSparse",
                           "twoGbMaxExtentSparse", "twoGbMaxExtentFlat", "vmfsRaw",
                           "vmfsRawDeviceMap", "vmfsPassthroughRawDeviceMap")
#: no parent (parentCID)
CID_NONE = 0xFFFFFFFF
#: a descriptor naming more extents than this is refused (a hostile loop)
MAX_EXTENTS = 1 << 16
#: a disk larger than this many bytes is refused (QEMU's limit is far below)
MAX_DISK_BYTES = 1 << 62

_KEY_VALUE = re.compile(r"([A-Za-z][\w.]*)\s*=\s*(.*)")
_EXTENT = re.compile(r'(RW|RDONLY|NOACCESS)\s+(\d+)\s+(\w+)(?:\s+"([^"]*)"(?:\s+(\d+))?)?')


@dataclass(frozen=True, slots=True)
class ExtentLine:
    access: str
    sectors: int
    kind: str              # FLAT, SPARSE, ZERO, VMFS, VMFSSPARSE, SESPARSE, ...
    filename: str          # "" for ZERO
    offset: int            # sectors into the file (flat extents)

    @property
    def size(self) -> int:
        return self.sectors * SECTOR


@dataclass(slots=True)
class Descriptor:
    create_type: str = ""
    cid: int = CID_NONE
    parent_cid: int = CID_NONE
    parent_hint: str = ""
    extents: list[ExtentLine] = field(default_factory=list)
    ddb: dict[str, str] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return sum(extent.size for extent in self.extents)


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def _hex(name: str, value: str) -> int:
    try:
        return int(_unquote(value), 16) & 0xFFFFFFFF
    except ValueError:
        raise InvalidImage(f"VMDK descriptor: {name} {value!r} is not hexadecimal") from None


def parse_descriptor(raw: bytes) -> Descriptor:
    """The descriptor's fields; every extent line checked (sizes, counts)."""
    text = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
    descriptor = Descriptor()
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith(ACCESS_MODES):
            descriptor.extents.append(parse_extent_line(line))
            if len(descriptor.extents) > MAX_EXTENTS:
                raise InvalidImage(f"VMDK descriptor names more than {MAX_EXTENTS} extents")
            continue
        match = _KEY_VALUE.fullmatch(line)
        if match is None:
            continue
        key, value = match.groups()
        if key == "CID":
            descriptor.cid = _hex(key, value)
        elif key == "parentCID":
            descriptor.parent_cid = _hex(key, value)
        elif key == "createType":
            descriptor.create_type = _unquote(value)
        elif key == "parentFileNameHint":
            descriptor.parent_hint = _unquote(value)
        elif key.startswith("ddb."):
            descriptor.ddb[key] = _unquote(value)
    if descriptor.size > MAX_DISK_BYTES:
        raise InvalidImage(f"VMDK descriptor's extents add up to {descriptor.size} bytes "
                           f"(at most {MAX_DISK_BYTES})")
    return descriptor


def parse_extent_line(line: str) -> ExtentLine:
    """One extent line, as QEMU takes it: a FLAT extent names its offset,
    VMFS and sparse extents do not (anything after the offset is ignored)."""
    match = _EXTENT.match(line)
    if match is None:
        raise InvalidImage(f"VMDK descriptor: invalid extent line {line[:80]!r}")
    access, sectors, kind, filename, offset = match.groups()
    needs_offset = kind == "FLAT"
    if int(sectors) <= 0 or (kind != "ZERO" and not filename) or \
            (kind != "ZERO" and needs_offset != (offset is not None)):
        raise InvalidImage(f"VMDK descriptor: invalid extent line {line[:80]!r}")
    return ExtentLine(access, int(sectors), kind, filename or "", int(offset or 0))


def check_standalone(descriptor: Descriptor) -> None:
    """What QEMU asks of a descriptor file (not one embedded in an extent)."""
    if not descriptor.create_type:
        raise InvalidImage("invalid VMDK image descriptor (no createType)")
    if descriptor.create_type not in DESCRIPTOR_CREATE_TYPES:
        raise Unsupported(f"unsupported VMDK image type '{descriptor.create_type}'")
    if not descriptor.extents:
        raise InvalidImage("VMDK descriptor names no extent")
    for extent in descriptor.extents:
        if extent.kind not in FLAT_TYPES + SPARSE_TYPES + ("ZERO",):
            raise Unsupported(f"VMDK extent type {extent.kind} is not supported")


def check_extent_paths(descriptor: Descriptor) -> None:
    """A descriptor opened for writing may name extents only beside or
    below itself (not an absolute path, nothing through "..")."""
    for line in descriptor.extents:
        name = line.filename
        if name and (os.path.isabs(name) or ".." in name.replace("\\", "/").split("/")):
            raise ReadOnly(f"extent file {name!r} lies outside the descriptor's directory; "
                           "open the image read-only")
