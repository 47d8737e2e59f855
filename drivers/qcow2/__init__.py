"""qcow2: QEMU's copy-on-write format (qemu/qemu docs/interop/qcow2.txt).

The package splits the format as the spec does: `header` (header, feature
bits, extensions), `cluster` (L1/L2 mapping), `refcount` (host cluster
reference counts and allocation), `snapshot` (internal snapshot table),
`repair` (rebuilding refcounts of a dirty image), `create` (new images),
and `driver` (the BlockDriver that ties them together).
"""
from .driver import Qcow2Driver

DRIVERS = [Qcow2Driver]
