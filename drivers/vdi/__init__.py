"""VDI: VirtualBox's disk image.

Spec: VirtualBox/virtualbox src/VBox/Storage/VDICore.h (layout facts only);
QEMU's behaviour, learned by running qemu-img and qemu-io, is checked by
tests/drivers/test_vdi.py.  A 512-byte head: free text (QEMU and each
VirtualBox release write their own; only the signature 0xbeda107f at 0x40
identifies the format), the version (1.1 only, as QEMU), then header 1.1
(QEMU writes 0x180 bytes of it; VirtualBox 0x190, with an LCHS geometry):
image type (1 dynamic, 2 static, 3 undo, 4 differencing), the offsets of
the block map and of the data area (sector aligned), the disk size, the
block size (a power of two; everyone writes 1 MiB), the number of blocks
and of allocated blocks, and four UUIDs: the image's, its last
modification's, and for a differencing image its parent's image UUID
(uuidLinkage) and the parent's modification UUID when it was made.  The
block map is one little-endian u32 per guest block: a block number in the
data area (block n at offset_data + n * block_size), 0xffffffff free (a
base image reads zeros, a child its parent), 0xfffffffe zero.

Supported: reading and writing static, dynamic and differencing images
(new blocks appended to the data area: block data, then the map entry,
then the header's allocated count; the next block number comes from the
map itself, so a crash between the steps leaks or reuses one block and
never maps one twice, and a read-write open corrects a count a crash left
behind the map), creating (static, preallocation, sizes rounded up
to whole sectors as qemu-img), `imgfs check` as qemu-img's (no repair:
QEMU has none).  Beyond QEMU, differencing images (VirtualBox snapshots):
the parent is found by UUID among the .vdi files beside the child and in
the VM folder above a ``Snapshots/`` folder, or named with ``-o
backing.file.filename=``; a parent whose UUID is not the child's link is
refused; ``create -b PARENT`` writes a child linked to it.  Refused: other
versions, sector sizes other than 512, extra bytes per block, headers
whose block map or data area overlap or run past the file.  Not resizable
(as QEMU).

Module map: `layout` (header, geometry, new images; pure, all that probing
imports), `blockmap` (the paged map), `parent` (the search by UUID) and
`driver` (the BlockDriver on imgfs.mapped).
"""
from typing import Any

from .layout import probe


def __getattr__(name: str) -> Any:
    if name == "DRIVERS":
        from .driver import VdiDriver
        return [VdiDriver]
    raise AttributeError(name)


__all__ = ["DRIVERS", "probe"]
