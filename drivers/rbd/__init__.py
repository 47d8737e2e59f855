"""rbd: images in Ceph RBD pools, through librados and librbd.

Sources: ``rbd:POOL/[NAMESPACE/]IMAGE[@SNAPSHOT][:OPTION=VALUE...]`` and the
``json:`` / ``-o`` form (``pool``, ``namespace``, ``image``, ``snapshot``,
``conf``, ``user``, ``server``, ``key-secret``), as QEMU spells them
(qemu-block-drivers(7)).  API: ceph/ceph ``src/include/rbd/librbd.h``.

Module map: `spec` (the source syntax; pure), `librbd` (the ctypes binding
and its completions) and `driver` (the BlockDriver).
"""
from typing import Any


def __getattr__(name: str) -> Any:
    if name == "DRIVERS":
        from .driver import RbdDriver
        return [RbdDriver]
    raise AttributeError(name)


__all__ = ["DRIVERS"]
