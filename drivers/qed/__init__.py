"""QED: the QEMU Enhanced Disk format.

Spec: qemu/qemu docs/interop/qed_spec.rst (formerly qed_spec.txt); QEMU's
behaviour where the spec is silent was learned by running qemu-img and
qemu-io, and is checked by tests/drivers/test_qed.py.  Little-endian
header of 64 bytes: magic ``QED\\0``, cluster_size (a power of two, 4 KiB
.. 64 MiB), table_size (clusters per L1 or L2 table, a power of two 1 ..
16), header_size (clusters), features (BACKING_FILE 1, NEED_CHECK 2,
BACKING_FORMAT_NO_PROBE 4; an unknown bit refuses the image),
compat_features (ignored), autoclear_features (cleared at the first write),
l1_table_offset, image_size, backing_filename_offset/size (the name, not
NUL-terminated, inside the header clusters).  Guest offset -> L1 entry (an
L2 table's offset, 0: none) -> L2 entry (a cluster's offset; 0
unallocated, 1 a zero cluster).  No compression, encryption or snapshots.

Supported: reading, writing (new clusters and L2 tables appended at the
end of the file, copy-on-write from the backing file, zero clusters for
whole-cluster zero writes), creating (cluster_size, table_size,
backing_file, backing_fmt as qemu-img), growing (shrinking is refused, as
in QEMU), and the consistency check: `imgfs check [-r leaks|all]` with
qemu-img's counts; both repair modes clear entries that point outside the
file or are unaligned, and leaked clusters stay (QED cannot give them back).

The need-check flag is set (and flushed) before the first table change of
a read-write open and cleared on a clean close; a read-write open of an
image that has it runs the check and repair first, as QEMU does.  Writes
go data, then the L2 entry, then (after a flush) the L1 entry of a new
table: a crash leaks clusters at worst.

Module map: `layout` (header, geometry, entries, new images; pure, all that
probing imports), `check` (the consistency check and repair) and `driver`
(the BlockDriver on imgfs.mapped).
"""
from typing import Any

from .layout import probe


def __getattr__(name: str) -> Any:
    if name == "DRIVERS":
        from .driver import QedDriver
        return [QedDriver]
    raise AttributeError(name)


__all__ = ["DRIVERS", "probe"]
