"""Bochs: the growing disk images of the Bochs emulator (redologs).

Spec: the Bochs developer documentation, "Harddisk Images based on
redologs" (bochs.sourceforge.net, harddisk-redologs); QEMU's
block/bochs.c for the limits QEMU sets, checked by running qemu-img
(tests/drivers/test_bochs.py).  Little-endian header of one 512-byte
sector: magic ``Bochs Virtual HD Image``, type ``Redolog``, subtype
``Growing`` (NUL-padded strings of 32, 16 and 16 bytes), version
(0x00010000 or 0x00020000), header size (where the catalog starts),
catalog (entries), bitmap (bytes per extent bitmap), extent (bytes per
extent), then the disk size in bytes (version 2 puts a 32-bit timestamp
before it).  The disk is cut into extents; catalog entry N is 0xffffffff
for an extent never written, or the position K of the extent in the file:
stored extents follow the catalog, each its bitmap rounded up to whole
sectors then its own sectors.  Bit n (least significant bit of byte n/8
first) of the bitmap says whether sector n of the extent was written;
sectors never written read as zeros.

Supported: reading growing images of both versions (what `bximage
-imgmode=growing` makes), read-only, as in QEMU: a mount is read-only by
default and ``-o rw`` is refused; images cannot be created or written.
`imgfs map` tells written sectors from the rest (QEMU's driver reports
everything as data).  Refused: undoable and volatile redologs (their base
image is named outside the file) and unknown versions; extents that are
not a power of two from 512 bytes to 8 MiB, a catalog of more than 2^20
entries, too small for the disk, or running past the end of the file.
An extent or bitmap past the end of the file reads as zeros, as in QEMU.

Module map: `layout` (header, geometry, bitmaps; pure, and all that
probing imports) and `driver` (the BlockDriver on imgfs.mapped).
"""
from typing import Any

from .layout import probe


def __getattr__(name: str) -> Any:
    if name == "DRIVERS":
        from .driver import BochsDriver
        return [BochsDriver]
    raise AttributeError(name)


__all__ = ["DRIVERS", "probe"]
