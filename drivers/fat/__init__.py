"""`fat`: a host directory presented as a virtual FAT disk.

Spec: libyal/libfsfat ``documentation/File Allocation Table (FAT)
format.asciidoc`` (boot sector, FAT entries, directory entries, VFAT long
names), with fatgen103's FSInfo sector; dosfstools' fsck.fat, mtools and
QEMU's vvfat are the oracles in the tests.

Sources: ``fat:[floppy:][rw:][12:|16:|32:]DIR`` as in QEMU (flags in any
order), or a json: / ``driver=fat`` node with QEMU's vvfat option names
``dir``, ``floppy``, ``rw``, ``fat-type``, ``label``, plus ``size``.

Supported: a hard disk (MBR, one partition at 1 MiB, FAT12/16/32 chosen by
cluster count unless forced, sized to the tree plus free space up to the
2 TiB an MBR can describe, or to ``size``) or a bare FAT12 floppy (1.44 MB,
2.88 MB when needed); VFAT long names with unique 8.3 short names; times;
read-only and hidden attributes; contents read lazily from the host.
Read-only unless ``rw``.  With ``rw``, guest writes go to an overlay and
are mapped back to DIR on flush and at close, once the FAT parses
consistently (see `writeback`).  Refused: a tree that does not fit the
forced type or size.  Skipped with a warning: symlinks leaving DIR, special
files, files over 4 GiB - 1, names FAT cannot hold.

Host changes after open: the tree is a snapshot; a host file that changed
size, was replaced or vanished reads as EIO for its clusters.

Modules: `layout` (geometry, boot sector, MBR), `dirent` (directory
entries, names), `tree` (the host snapshot), `image` (allocation, FAT and
directory contents), `driver` (the driver and its read path), `writeback`
(rw mode: the overlay, parsing the guest's FAT, applying it to DIR).
"""
from .driver import FatDriver

DRIVERS = [FatDriver]
