"""DMG: Apple's Universal Disk Image Format (UDIF), read-only.

Specs: libyal/libmodi documentation/Mac OS disk image types.asciidoc and
keramics' udif page; QEMU's behaviour (sizes, limits, which fork it reads)
was learned by running qemu-img and is checked by tests/drivers/test_dmg.py.
A UDIF file is a data fork of chunks, block tables and a 512-byte
big-endian trailer at the very end: magic ``koly``, version 4, the data
fork's offset, the resource fork's and the XML plist's offset and length,
and the disk's sector count (the virtual size, as QEMU shows it).  The
block tables (``mish``: a 204-byte header, then 40-byte chunk entries: type,
first sector, sector count, stored offset and length) are the ``Data`` of
the ``resource-fork``/``blkx`` entries of the XML plist, or resources of
the binary resource fork (preferred when present, as QEMU does).  Each
table is one partition, starting at its own first sector: a partition map
with several partitions is one disk.

Supported chunks: raw (read in place), zero-fill and ignore (zeros), zlib,
bzip2, ADC and LZFSE (decoded, each chunk at most 64 MiB as in QEMU, and
cached so that a sequential read decodes each chunk once); comments and
terminators are skipped.  Refused in one line: LZMA and unknown chunk
types, block tables over 16 MiB, chunks past the end of the file or
overlapping, a chunk that decodes to more or fewer bytes than it declares
(found after at most its declared size).  Sectors no chunk maps fail to
read (EIO), as in QEMU.  Read-only: a read-write open is refused.

Module map: `layout` (trailer, block tables, chunk table; pure, all that
probing needs besides imgfs.signatures), `codecs` (the decoders) and
`driver` (the BlockDriver on imgfs.mapped).
"""
from typing import Any

from imgfs.signatures import probe_dmg as probe
from imgfs.signatures import probe_dmg_tail as probe_tail


def __getattr__(name: str) -> Any:
    if name == "DRIVERS":
        from .driver import DmgDriver
        return [DmgDriver]
    raise AttributeError(name)


__all__ = ["DRIVERS", "probe", "probe_tail"]
