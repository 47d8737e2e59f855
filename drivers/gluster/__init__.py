"""gluster: files on GlusterFS volumes, through libgfapi.

Sources: ``gluster[+tcp|+unix|+rdma]://[HOST[:PORT]]/VOLUME/PATH[?socket=...]``
and the ``json:`` / ``-o`` form with ``volume``, ``path`` and a list of
``server`` entries (tcp and unix, tried in order), ``debug`` and
``logfile``, as QEMU spells them (qemu-block-drivers(7)).  API:
gluster/glusterfs ``api/src/glfs.h``.

Module map: `uri` (the source syntax; pure), `gfapi` (the ctypes binding
and its completions) and `driver` (the BlockDriver).
"""
from typing import Any


def __getattr__(name: str) -> Any:
    if name == "DRIVERS":
        from .driver import GlusterDriver
        return [GlusterDriver]
    raise AttributeError(name)


__all__ = ["DRIVERS"]
