"""Bochs and cloop images for the tests: made by the formats' own tools
(Debian's bximage and create_compressed_fs) from a raw disk with data, or,
where the tools cannot make a layout (a version 1 header, extents stored
out of order, half-written extents, hostile chunks), written from the
layout in a few lines.  QEMU reads every one of them as the oracle.
"""
from __future__ import annotations

import random
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import need, run

KiB = 1024
MiB = 1024 * KiB
SECTOR = 512


def raw_disk(path: Path, size: int, seed: int = 1) -> bytes:
    """A disk of runs of random bytes, repeated patterns and zeros, with
    data in its last sector; sparse where it is zero."""
    rng = random.Random(seed)
    data = bytearray(size)
    offset = 0
    while offset < size:
        length = rng.choice([SECTOR, 3 * SECTOR, 4 * KiB, 20 * KiB, 70 * KiB])
        kind = rng.choice(["random", "pattern", "zero", "zero"])
        end = min(size, offset + length)
        if kind == "random":
            data[offset:end] = rng.randbytes(end - offset)
        elif kind == "pattern":
            data[offset:end] = bytes([rng.randrange(1, 256)]) * (end - offset)
        offset = end
    data[-SECTOR:] = b"\xee" * SECTOR
    with open(path, "wb") as handle:
        handle.truncate(size)
        for start in range(0, size, 64 * KiB):
            chunk = data[start:start + 64 * KiB]
            if any(chunk):
                handle.seek(start)
                handle.write(chunk)
    return bytes(data)


# -- bochs --------------------------------------------------------------------------------

def bximage_growing(flat: Path, image: Path) -> None:
    """`bximage -func=convert -imgmode=growing`: a growing image holding the
    flat disk's sectors (bximage writes only sectors that are not zero)."""
    need("bximage")
    run("bximage", "-func=convert", "-imgmode=growing", "-q", flat, image)


def bximage_empty(image: Path, megabytes: int) -> None:
    """An empty growing image (bximage rounds the size to whole cylinders;
    it reads -imgmode only after -hd)."""
    need("bximage")
    run("bximage", "-func=create", f"-hd={megabytes}M", "-imgmode=growing", "-q", image)


@dataclass
class BochsLayout:
    """A growing redolog written from the layout: `stored` lists (guest
    extent, bitmap) in the order the extents lie in the file; every sector
    of a stored extent holds random bytes, written or not, so a sector the
    bitmap does not mark must read as zeros whatever it holds."""

    disk: int
    extent: int = 4 * KiB
    bitmap: int | None = None            # bytes; default one bit per sector
    version: int = 0x00020000
    stored: list[tuple[int, int]] = field(default_factory=list)
    spare_entries: int = 3               # catalog entries beyond the disk's
    header_size: int = 512
    seed: int = 7

    def write(self, path: Path) -> bytes:
        """Write the image; return the disk it holds."""
        rng = random.Random(self.seed)
        sectors = self.extent // SECTOR
        bitmap = self.bitmap or -(-sectors // 8)
        bitmap_bytes = -(-bitmap // SECTOR) * SECTOR
        entries = -(-(self.disk // SECTOR * SECTOR) // self.extent) + self.spare_entries
        catalog = [0xFFFFFFFF] * entries
        disk = bytearray(entries * self.extent)
        body = bytearray()
        for position, (guest, bits) in enumerate(self.stored):
            catalog[guest] = position
            contents = rng.randbytes(self.extent)
            body += bits.to_bytes(bitmap_bytes, "little") + contents
            for sector in range(sectors):
                if bits >> sector & 1:
                    start = guest * self.extent + sector * SECTOR
                    disk[start:start + SECTOR] = contents[sector * SECTOR:(sector + 1) * SECTOR]
        header = bochs_header(self.version, self.header_size, entries, bitmap, self.extent,
                              self.disk)
        catalog_bytes = struct.pack(f"<{entries}I", *catalog)
        path.write_bytes(header.ljust(self.header_size, b"\0") + catalog_bytes + body)
        return bytes(disk[:self.disk // SECTOR * SECTOR])


def bochs_header(version: int, header_size: int, catalog: int, bitmap: int, extent: int,
                 disk: int, subtype: bytes = b"Growing") -> bytes:
    """The 512-byte header (the Bochs redolog document's field order)."""
    common = struct.pack("<32s16s16sIIIII", b"Bochs Virtual HD Image", b"Redolog", subtype,
                         version, header_size, catalog, bitmap, extent)
    tail = struct.pack("<Q", disk) if version == 0x00010000 else struct.pack("<IQ", 0, disk)
    return (common + tail).ljust(512, b"\0")


# -- cloop --------------------------------------------------------------------------------

CLOOP_PREAMBLE = (b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 "
                  b"/dev/cloop $1\nexit $?\n").ljust(128, b"\0")


def create_compressed_fs(flat: Path, image: Path, block_size: int) -> None:
    """Debian's cloop-utils: a V2.0 image, one zlib stream per block."""
    need("create_compressed_fs")
    run("create_compressed_fs", "-q", "-B", str(block_size), flat, image)


def cloop_image(path: Path, block_size: int, chunks: list[bytes]) -> None:
    """A cloop V2.0 image holding these chunks as they are (compressed or
    not: hostile ones too)."""
    table_end = 128 + 8 + 8 * (len(chunks) + 1)
    offsets = [table_end]
    for chunk in chunks:
        offsets.append(offsets[-1] + len(chunk))
    path.write_bytes(CLOOP_PREAMBLE + struct.pack(">II", block_size, len(chunks)) +
                     struct.pack(f">{len(offsets)}Q", *offsets) + b"".join(chunks))


def deflate(block: bytes) -> bytes:
    return zlib.compress(block, 9)
