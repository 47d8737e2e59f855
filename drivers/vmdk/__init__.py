"""VMDK: VMware's virtual disk format.

Spec: libyal/libvmdk ``documentation/VMWare Virtual Disk Format
(VMDK).asciidoc`` and VMware's "Virtual Disk Format 5.0" technote; QEMU's
behaviour (learned by running qemu-img and qemu-io, checked by
tests/drivers/test_vmdk.py) wins where they differ.

A disk is a descriptor (text: CID, parentCID, createType,
parentFileNameHint, extent lines, the disk database) and extents placed
end to end.  Sparse extents (header ``KDMV``, version 1..3) map 512-byte
sectors through a grain directory and grain tables of 32-bit sector
numbers; a stream-optimized extent holds deflated grains behind markers,
its grain directory named in the header (QEMU) or in a footer at the end
of the file (VMware: gdOffset = -1).  Version 2+ headers may mark a grain
table entry 1 as a zeroed grain.  Flat extents are plain bytes at an
offset of a file; ZERO extents read as zeros.

Supported (read): monolithicSparse and streamOptimized (the descriptor
embedded in the extent; the extent's own name inside it is not trusted, so
a renamed file opens), standalone descriptors with FLAT, VMFS, SPARSE,
VMFSSPARSE (COWD) and ZERO extents (monolithicFlat, twoGbMaxExtentSparse,
twoGbMaxExtentFlat, ESX vmfs and vmfsSparse), extent files found relative
to the descriptor, backing chains through parentFileNameHint (reads that
reach a parent whose CID is not the parentCID fail, as in QEMU);
seSparse extents (ESXi snapshot deltas, named by a descriptor) read-only,
as QEMU reads them (`sesparse`): a disk with one opens read-only.
Written: grains allocated at the end of their extent file (copy-on-write
from the parent for partial grains), grain data first, then the grain
table entry, then (for a new table, after a flush) the directory entry,
each change repeated in the redundant tables; whole-grain zero writes
become zeroed-grain entries where the header allows them; flat extents
in place; the CID renewed at the first write, as QEMU does.  A descriptor
opened read-write may only name extent files beside or below it.
Streams in VMware's layout (directory and footer at the end) take appends
in guest order (`stream`); streams in QEMU's layout (directory in the
header) take whole grains in any order, as QEMU; a write to a grain a
stream holds already, or of part of a grain into QEMU's layout, fails with
EIO.

Created (`create`): monolithicSparse, monolithicFlat and the twoGbMaxExtent
subformats byte-equal to qemu-img's but for the random CID, with its
options and refusals; streamOptimized in VMware's layout.  `check` reports
what qemu-img check reports (a grain past the end of its file).

Refused, in one line: a seSparse extent opened without its descriptor,
writes into seSparse disks, compressed grains without markers, headers
whose fields are out of range.

Module map: `layout` (headers, markers, geometry; pure, all that probing
imports), `descriptor` (descriptor text), `create` (new images, pure),
`tables` (the redundant grain directory kept in step), `sesparse` (its
headers and typed entries), `check` (qemu-img check's test), `stream` (VMware's
stream layout and its appending writer), `driver` (the BlockDriver on
imgfs.mapped).
"""
from typing import Any

from .layout import probe


def __getattr__(name: str) -> Any:
    if name == "DRIVERS":
        from .driver import VmdkDriver
        return [VmdkDriver]
    raise AttributeError(name)


__all__ = ["DRIVERS", "probe"]
