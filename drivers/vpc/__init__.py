"""VHD (QEMU's "vpc"): Virtual PC, Hyper-V, Azure and disk2vhd disks.

Specs: Microsoft's "Virtual Hard Disk Image Format Specification" and
libyal/libvhdi ``documentation/Virtual Hard Disk (VHD) image format.asciidoc``;
QEMU 7.2's behaviour where they are silent (the disk size, what it refuses)
was learned by running qemu-img and is checked by tests/drivers/test_vpc.py.

Big-endian throughout.  Every image ends with a 512-byte footer (cookie
``conectix``, disk type, creator application, current size, CHS geometry,
a checksum: the one's complement of the byte sum); a fixed disk is its
data followed by that footer.  A dynamic disk also keeps a copy of the
footer at offset 0, whose data offset names the 1 KiB dynamic header
(cookie ``cxsparse``, the BAT's offset and entry count, the block size,
the parent's identity and locators); the BAT maps each block to the
sector where the block's sector bitmap starts, the block's data following
the bitmap (padded to a sector); 0xFFFFFFFF: not stored, reads as zeros.

The disk size is QEMU's: the CHS geometry's for Virtual PC and most
creators, the footer's current size for Hyper-V (``win ``), disk2vhd
(``d2v ``), Xen (``tap\\0``, ``CTXS``), QEMU's forced sizes (``qem2``) and
any disk whose geometry is the maximal 65535/16/255; the open option
``force_size_calc=chs|current_size`` overrides the creator, as in QEMU.

Supported: reading and writing fixed and dynamic disks (a new block is
appended where the footer was: the footer first moves past it, then the
block's bitmap and data are written, then its BAT entry), creating them
(``subformat=dynamic|fixed``, ``force_size``, sizes rounded up to a CHS
geometry as qemu-img does).  A fixed disk, whose only signature is its
footer, is probed as VHD, not raw.

Differencing disks (type 4; QEMU reads their parent's data as zeros): the
parent is the first name that exists among the locators' (``W2ru``
relative, ``MacX`` file URL, ``W2ku`` absolute: a Windows path's last
component, beside the child) and the header's parent name, and must carry
the unique id the child's header records, with the parent footer's
timestamp or the parent file's modification time as the header's parent
timestamp (writers store either; create writes the footer's, which writes
to the parent, a commit's included, leave as it is).  ``commit`` empties
the child (make_empty: BAT cleared, file cut back).  A block's sector
bitmap (most significant bit first) says which sectors the child holds;
the others read from the parent.  Writes copy a new block up whole (every
bit set); into an allocated block's absent sectors they go in place, merged
with the parent's bytes to whole sectors, then set the bits (the mapped
layer's partially present blocks).  ``create -b PARENT`` writes W2ru, W2ku
and MacX locators after the BAT.

Refused: footers with a wrong checksum (as QEMU), block sizes beyond 256
MiB and BATs of more than 4M entries (memory), BAT entries aimed at the
metadata, unknown disk types, a parent that is missing, is not the one the
child was made from, or is the child itself.

Module map: `layout` (structures, sizes, geometry, new images; pure, all
that probing imports) and `driver` (the BlockDriver on imgfs.mapped).
"""
from typing import Any

from .layout import probe, probe_tail


def __getattr__(name: str) -> Any:
    if name == "DRIVERS":
        from .driver import VpcDriver
        return [VpcDriver]
    raise AttributeError(name)


__all__ = ["DRIVERS", "probe", "probe_tail"]
