"""The signatures of the image formats QEMU knows, for probing.

Probing must never open a VMDK, VHD, VDI, ... as raw, read-write: the raw
view of a container is not the disk it holds, and writing to it destroys the
image.  So every format QEMU recognises is recognised here, whether imgfs
has a driver for it or not; the registry refuses a recognised format that
has no driver.  When a driver for one of these formats is written, the
light ``probe`` (and ``probe_tail``) of its package is asked instead of the
entry here, so the entry is then dead weight: the driver's ``__init__`` can
simply re-export the functions below.

Each function is pure and cheap (no I/O, no imports of driver code) and
answers like a driver's ``probe``: 0 for "not this format", 100 for a
signature, a small score for a guess that should only beat raw's 1.
``head`` is the first `HEAD_BYTES` of the file (fewer if the file is
shorter), ``tail`` its last `TAIL_BYTES`; either may be empty.  A signature
found at the end of a file (a fixed VHD's only footer, a DMG's ``koly``
trailer) scores `TAIL_SCORE`, below any signature at the start, since a
format's own image may well end with another format's bytes held as data.

Layout facts, from the specs listed in the project's SPECS.md and from what
``qemu-img info`` (QEMU 7.2) probes:

* qed: ``QED\\0`` at offset 0 (qed_spec.txt, header ``magic``).
* vmdk: ``KDMV`` (hosted sparse extent) or ``COWD`` (ESX sparse extent) at
  offset 0; a seSparse extent's constant header, whose magic is the
  little-endian 64-bit 0xcafebabe; a text descriptor: leading blank and
  ``#`` comment lines (``# Disk DescriptorFile`` and its spacing variants),
  then ``version=N``.
* vhdx: ``vhdxfile`` at offset 0 (MS-VHDX, file type identifier).
* vpc (VHD): the footer cookie ``conectix``, at offset 0 (a dynamic or
  differencing image keeps a copy of its footer there), or in the last 512
  bytes of the file (a fixed image has only that footer; Virtual PC before
  2004 wrote a 511-byte footer).
* vdi: the little-endian signature 0xbeda107f at offset 0x40 (the text
  before it is free-form).
* parallels: ``WithoutFreeSpace`` or ``WithouFreSpacExt`` at offset 0.
* bochs: the strings ``Bochs Virtual HD Image`` and ``Redolog`` in the
  header's magic (offset 0) and type (offset 32) fields.
* cloop: the shell preamble ``#!/bin/sh`` / ``#V2.0 Format`` / ``modprobe
  cloop ...`` (other preamble versions too); like QEMU, a weak score.
* dmg: the UDIF trailer ``koly`` at the start of the last 512 bytes; like
  QEMU, a weak guess from a ``.dmg`` file name as well.
"""
from __future__ import annotations

import re
import struct
from collections.abc import Callable
from dataclasses import dataclass

#: bytes probing reads from the start of a file
HEAD_BYTES = 4096
#: bytes probing reads from the end of a file (a VHD footer, a DMG trailer)
TAIL_BYTES = 512
#: score of a signature found at the end of a file
TAIL_SCORE = 50
#: score of a weak guess (a script preamble, a file name): beats raw only
GUESS_SCORE = 2

#: (bytes, filename) -> score 0..100, as a driver's `probe`
ProbeFn = Callable[[bytes, str], int]

QED_MAGIC = b"QED\0"
VMDK4_MAGIC = b"KDMV"
VMDK3_MAGIC = b"COWD"
SESPARSE_CONST_MAGIC = struct.pack("<Q", 0xCAFEBABE)
VHDX_SIGNATURE = b"vhdxfile"
VHD_COOKIE = b"conectix"
VHD_FOOTER_SIZES = (512, 511)
VDI_SIGNATURE = 0xBEDA107F
VDI_SIGNATURE_OFFSET = 0x40
PARALLELS_MAGICS = (b"WithoutFreeSpace", b"WithouFreSpacExt")
BOCHS_MAGIC = b"Bochs Virtual HD Image"
BOCHS_REDOLOG = b"Redolog"
DMG_KOLY = b"koly"
DMG_TRAILER_SIZE = 512

_CLOOP_PREAMBLE = re.compile(rb"#!/bin/sh\n#V\d+\.\d+ Format\nmodprobe cloop ")
_DESCRIPTOR_SIGNATURE = re.compile(rb"#\s*disk\s*descriptor\s*file\s*", re.IGNORECASE)
_DESCRIPTOR_VERSION = re.compile(rb"version\s*=\s*\"?\d+\"?")


def probe_qed(head: bytes, filename: str) -> int:
    return 100 if head.startswith(QED_MAGIC) else 0


def probe_vmdk(head: bytes, filename: str) -> int:
    if head[:4] in (VMDK4_MAGIC, VMDK3_MAGIC) or head.startswith(SESPARSE_CONST_MAGIC):
        return 100
    return 100 if is_vmdk_descriptor(head) else 0


def is_vmdk_descriptor(head: bytes) -> bool:
    """Blank and ``#`` lines, then ``version=N``; or a descriptor's own
    ``# Disk DescriptorFile`` comment among the leading comments."""
    for raw_line in head.split(b"\n"):
        line = raw_line.strip()
        if not line:
            continue
        if line.startswith(b"#"):
            if _DESCRIPTOR_SIGNATURE.fullmatch(line):
                return True
            continue
        return _DESCRIPTOR_VERSION.fullmatch(line) is not None
    return False


def probe_vhdx(head: bytes, filename: str) -> int:
    return 100 if head.startswith(VHDX_SIGNATURE) else 0


def probe_vpc(head: bytes, filename: str) -> int:
    return 100 if head.startswith(VHD_COOKIE) else 0


def probe_vpc_tail(tail: bytes, filename: str) -> int:
    for footer_size in VHD_FOOTER_SIZES:
        if len(tail) >= footer_size and tail[-footer_size:].startswith(VHD_COOKIE):
            return TAIL_SCORE
    return 0


def probe_vdi(head: bytes, filename: str) -> int:
    field = head[VDI_SIGNATURE_OFFSET:VDI_SIGNATURE_OFFSET + 4]
    return 100 if len(field) == 4 and int.from_bytes(field, "little") == VDI_SIGNATURE else 0


def probe_parallels(head: bytes, filename: str) -> int:
    return 100 if head[:16] in PARALLELS_MAGICS else 0


def probe_bochs(head: bytes, filename: str) -> int:
    magic, kind = _c_string(head[0:32]), _c_string(head[32:48])
    return 100 if magic == BOCHS_MAGIC and kind == BOCHS_REDOLOG else 0


def _c_string(field: bytes) -> bytes:
    return field.split(b"\0", 1)[0]


def probe_cloop(head: bytes, filename: str) -> int:
    return GUESS_SCORE if _CLOOP_PREAMBLE.match(head) else 0


def probe_dmg(head: bytes, filename: str) -> int:
    return GUESS_SCORE if filename.lower().endswith(".dmg") else 0


def probe_dmg_tail(tail: bytes, filename: str) -> int:
    if len(tail) >= DMG_TRAILER_SIZE and tail[-DMG_TRAILER_SIZE:].startswith(DMG_KOLY):
        return TAIL_SCORE
    return 0


@dataclass(frozen=True)
class Signature:
    """How probing recognises a format: at the start and/or at the end."""

    description: str
    head: ProbeFn | None = None
    tail: ProbeFn | None = None


#: format name (as in registry.DRIVER_MODULES) -> its signature, for the
#: formats whose driver may not exist; a driver's own probe wins over these
SIGNATURES: dict[str, Signature] = {
    "qed": Signature("QEMU enhanced disk", probe_qed),
    "vmdk": Signature("VMware disk (sparse, COWD, seSparse, descriptor)", probe_vmdk),
    "vhdx": Signature("Hyper-V VHDX", probe_vhdx),
    "vpc": Signature("Virtual PC / Hyper-V VHD (dynamic and fixed)", probe_vpc, probe_vpc_tail),
    "vdi": Signature("VirtualBox VDI", probe_vdi),
    "parallels": Signature("Parallels disk", probe_parallels),
    "bochs": Signature("Bochs growing image", probe_bochs),
    "cloop": Signature("compressed loop (cloop)", probe_cloop),
    "dmg": Signature("Apple disk image (UDIF)", probe_dmg, probe_dmg_tail),
}
