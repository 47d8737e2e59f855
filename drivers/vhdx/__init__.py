"""VHDX: Hyper-V's virtual hard disk format, version 2.

Spec: Microsoft's [MS-VHDX] open specification, and libyal/libvhdi
`documentation/Virtual Hard Disk version 2 (VHDX) image format.asciidoc`;
QEMU's behaviour where they are silent was learned by running qemu-img
and qemu-io (tests/drivers/test_vhdx.py).  Layout: a file type identifier
(``vhdxfile``), two 4 KiB headers at 64 and 128 KiB (the valid one with
the higher sequence number is current; CRC-32C checked), two region tables
at 192 and 256 KiB naming the BAT and metadata regions, a log (a ring of
entries that rewrite file sectors, replayed after a crash), the metadata
region (block size, logical/physical sector size, virtual size, page 83
identifier, has-parent flag, parent locator) and the BAT: one 64-bit
entry per payload block (state in the low 3 bits, the block's offset in
MiB in the top 44), with one sector bitmap entry after every `chunk_ratio`
payload entries.

Supported: reading every payload state (not present: unallocated; zero,
undefined, unmapped: zeros; fully present: data; partially present: the
sector bitmap says, per logical sector, child or parent); log replay on a
read-write open, and on a read-only open a view of the replayed contents
that leaves the file untouched (QEMU refuses such an image); writes whose
BAT and sector bitmap changes go through the log (a crash leaves a log to
replay, never a torn BAT); creating dynamic, fixed and differencing images
with qemu-img's options and layout; `check` as qemu-img's (a log to
replay is the one corruption, which a repair replays).  Differencing
images (beyond QEMU): the parent is found through the parent locator and
must carry the data write GUID the child recorded; a write to a block
that is not present allocates it partially present, and whole sectors
are then written merged with the parent's bytes (the mapped layer's
partially present blocks).  Refused: unknown required regions or metadata
items, and every header, region, metadata, BAT or log field out of range
(one sentence each).  Not supported: resizing.

Module map: `layout` (headers, regions, metadata, parent locator, BAT
geometry; pure, what probing imports), `log` (finding the entries to
replay, building new ones), `create` (new images as qemu-img lays them
out) and `driver` (the BlockDriver on imgfs.mapped).
"""
from typing import Any

from .layout import probe


def __getattr__(name: str) -> Any:
    if name == "DRIVERS":
        from .driver import VhdxDriver
        return [VhdxDriver]
    raise AttributeError(name)


__all__ = ["DRIVERS", "probe"]
