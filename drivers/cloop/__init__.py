"""cloop: compressed loop images (Knoppix and other live CDs), version 2.0.

Spec: KlausKnopper/cloop README.md and cloop.h; QEMU's block/cloop.c for
the limits QEMU sets, checked by running qemu-img
(tests/drivers/test_cloop.py).  The file starts with a 128-byte shell
preamble (``#!/bin/sh``, ``#V2.0 Format``, a modprobe line; no magic),
then big-endian block_size (bytes of each uncompressed block) and
n_blocks (32-bit each), then n_blocks + 1 big-endian 64-bit offsets:
block N is the zlib stream from offset N to offset N + 1, and inflates to
exactly block_size bytes.  The disk is n_blocks * block_size bytes.

Supported: reading, read-only as in QEMU: a mount is read-only by default
and ``-o rw`` is refused; images cannot be created or written.  Each
chunk is inflated once while it stays in the mapped layer's
decoded-block cache, so a sequential read inflates every chunk once.
Refused at open: a block_size that is zero, not a multiple of 512 or
above 64 MiB, an offset table larger than 512 MiB or past the end of the
file, offsets that decrease, a chunk larger than 128 MiB, and a preamble
naming another cloop version (V3/V4 put their index elsewhere).  Refused
when read (EIO in a mount, the mount stays up): a chunk that is empty, cut
short (by the end of the file too: what lies in the file is inflated, as
QEMU reads zeros past it), or inflates to more or less than a block
(inflation stops one byte past the block size).

Module map: `layout` (header, offsets, inflation; pure, and all that
probing imports) and `driver` (the BlockDriver on imgfs.mapped).
"""
from typing import Any

from .layout import probe


def __getattr__(name: str) -> Any:
    if name == "DRIVERS":
        from .driver import CloopDriver
        return [CloopDriver]
    raise AttributeError(name)


__all__ = ["DRIVERS", "probe"]
