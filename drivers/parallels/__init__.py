"""Parallels expandable images (Parallels Desktop, Virtuozzo).

Spec: qemu/qemu docs/interop/parallels.txt (the image) and prl-xml.txt
(the DiskDescriptor.xml of a bundle); QEMU's behaviour where the spec is
silent was learned by running qemu-img and qemu-io 7.2, and is checked by
tests/drivers/test_parallels.py.  Little-endian header of 64 bytes: magic
``WithoutFreeSpace`` (catalog entries count sectors, nb_sectors is 32-bit)
or ``WithouFreSpacExt`` (entries count clusters, nb_sectors is 64-bit),
version 2, heads, cylinders, tracks (sectors per cluster), nb_bat_entries,
nb_sectors, in_use, data_off (sectors; 0: right after the catalog), flags,
ext_off.  The catalog (BAT) follows the header: one 32-bit entry per
cluster, 0 unallocated (reads as zeros), else where the cluster is.

Supported: reading both magics, writing (new clusters appended to the data
area: data first, then the catalog entry), creating as qemu-img
(cluster_size), and `imgfs check [-r leaks|all]` with qemu-img's counts.
The in-use flag is set (and flushed) by a read-write open and cleared on
a clean close; an image left in use opens read-only only, until a check
repairs it, as QEMU.  As QEMU reads them: clusters past the catalog or
past the end of the file read as zeros.  Refused: format extensions
(ext_off: dirty bitmaps), catalog entries before the data area (an I/O
error; `check -r all` clears them), resizing (QEMU cannot either).

A bundle (``NAME.hdd/``, spec prl-xml.txt) opens by naming the directory
or its DiskDescriptor.xml: the top snapshot's image is the data, each
parent snapshot a read-only backing node (a ``Plain`` root opens as raw);
`-o guid=` opens an older snapshot.  The descriptor is parsed without
document type or entity declarations, size- and depth-bounded.

Module map: `layout` (header, geometry, new images; pure, all that probing
imports), `catalog` (the paged catalog), `check` (check and repair) and
`driver` (the BlockDriver on imgfs.mapped), `bundle` (DiskDescriptor.xml).
"""
from typing import Any

from .bundle import probe_descriptor, probe_directory
from .layout import probe as probe_image


def probe(head: bytes, filename: str) -> int:
    """An image's header, or a bundle's DiskDescriptor.xml."""
    return max(probe_image(head, filename), probe_descriptor(head, filename))


def __getattr__(name: str) -> Any:
    if name == "DRIVERS":
        from .driver import ParallelsDriver
        return [ParallelsDriver]
    raise AttributeError(name)


__all__ = ["DRIVERS", "probe", "probe_directory"]
