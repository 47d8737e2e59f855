"""qcow2: QEMU's copy-on-write format (qemu/qemu docs/interop/qcow2.txt).

The package splits the format as the spec does: `header` (header, feature
bits, extensions), `cluster` (L1/L2 mapping), `refcount` (host cluster
reference counts and allocation), `snapshot` (internal snapshot table),
`repair` (rebuilding refcounts of a dirty image), `create` (new images),
and `driver` (the BlockDriver that ties them together).

Probing imports only `header`; the driver (most of the code) is imported
when `DRIVERS` is first used.
"""
from typing import Any

from .header import probe


def __getattr__(name: str) -> Any:
    if name == "DRIVERS":
        from .driver import Qcow2Driver
        return [Qcow2Driver]
    raise AttributeError(name)


__all__ = ["DRIVERS", "probe"]
