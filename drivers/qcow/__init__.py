"""qcow: QEMU's original copy-on-write format (qcow version 1).

Spec: QEMU has no spec document for version 1.  The header below is the
one the Rust ``qcow`` crate describes (docs.rs qcow, src/v1.rs), and the
rest was learned from images qemu-img and qemu-io make, checked field by
field by tests/drivers/test_qcow.py.  Big-endian header of 48 bytes:
magic ``QFI\\xfb``, version 1, backing_file_offset/size (the name, not
NUL-terminated; relative names are relative to the image's directory),
mtime, size, cluster_bits, l2_bits, padding, crypt_method (0 none, 1 AES),
l1_table_offset.  Guest offset -> L1 entry (an L2 table's host offset, 0 if
none) -> L2 entry (a cluster's host offset, 0 if unallocated).  Bit 63 of
an L2 entry marks a compressed cluster: its host offset is in the bits
below bit ``63 - cluster_bits``, its byte count in the ``cluster_bits``
bits above that; the payload is raw deflate (zlib window -12).  There are
no refcounts, no zero clusters and no snapshots.

Supported: reading plain and compressed clusters, backing files (the core
reads them), writing (clusters and L2 tables appended at the end of the
file; compressed clusters rewritten whole; copy-on-write from the backing
node for partial clusters, which QEMU 7.2 does not do: that is harmless
only with the 512-byte clusters qemu-img gives overlays), and creating
images laid out as qemu-img lays them out.  Legacy AES (crypt_method 1)
is readable for data liberation only, with qcow2's cipher
(drivers/qcow2/crypt.py): a read-write open is refused, a read-only open
warns; it cannot be created.

Metadata is written through: data first, then the L2 entries, then (for a
new L2 table, after a flush) the L1 entry, so imgfs stopping half way
leaves at worst unreferenced space.  As in QEMU, no flush separates data
from its L2 entry: a machine crash before fsync may leave a new cluster
reading as zeros (the file is extended, so not as stale data).

Module map: `layout` (header, geometry, table math, new images; pure, and
all that probing imports) and `driver` (the BlockDriver).
"""
from typing import Any

from .layout import probe


def __getattr__(name: str) -> Any:
    if name == "DRIVERS":
        from .driver import QcowDriver
        return [QcowDriver]
    raise AttributeError(name)


__all__ = ["DRIVERS", "probe"]
