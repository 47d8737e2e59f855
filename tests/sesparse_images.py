"""seSparse extents (ESXi's snapshot deltas) built for tests, as sparse files.

No tool on this machine writes seSparse, so the tests build them from the
layout public readers describe (dissect.hypervisor's VMDK structures),
with the default offsets and sizes ESXi uses (everything rounded to 2048
sectors), and name them from a plain descriptor, as ESXi does.  QEMU
(qemu-img 7.2) reads what this module writes: it is the tests' oracle.
Written independently of drivers/vmdk/sesparse.py, so that a shared
mistake cannot hide.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

SECTOR = 512
GRAIN = 4096
GT_ENTRIES = 4096
#: guest sectors one grain table maps
GT_SPAN_SECTORS = GT_ENTRIES * GRAIN // SECTOR
HEADER_FIELDS = (
    "magic", "version", "capacity", "grain_size", "grain_table_size", "flags",
    "reserved1", "reserved2", "reserved3", "reserved4",
    "volatile_header_offset", "volatile_header_size", "journal_header_offset",
    "journal_header_size", "journal_offset", "journal_size", "grain_directory_offset",
    "grain_directory_size", "grain_tables_offset", "grain_tables_size", "free_bitmap_offset",
    "free_bitmap_size", "backmap_offset", "backmap_size", "grains_offset", "grains_size")
#: byte offset of each constant header field
FIELD_OFFSET = {name: 8 * index for index, name in enumerate(HEADER_FIELDS)}

ZERO = "zero"               # grain table entry type 2
UNMAPPED = "unmapped"       # type 1


def _round(sectors: int) -> int:
    return -(-sectors // 2048) * 2048


def allocated_entry(cluster: int) -> int:
    """Type 3: the cluster's low 12 bits in bits 48..59, its high bits in 0..47."""
    return (3 << 60) | ((cluster & 0xFFF) << 48) | (cluster >> 12)


@dataclass
class SeSparse:
    """An extent: `grains` maps a grain index to its bytes (padded to 4 KiB),
    ZERO, UNMAPPED or a raw grain table entry (int).  `clusters` places a
    grain at a chosen cluster (default: in index order from 0)."""

    capacity: int                                   # sectors
    grains: dict[int, bytes | str | int] = field(default_factory=dict)
    clusters: dict[int, int] = field(default_factory=dict)
    header: dict[str, int] = field(default_factory=dict)
    volatile: tuple[int, int, int, int] = (0xCAFECAFE, 0, 1, 0)

    def layout(self) -> dict[str, int]:
        tables = -(-self.capacity // GT_SPAN_SECTORS)
        values = dict.fromkeys(HEADER_FIELDS, 0)
        values.update(magic=0xCAFEBABE, version=0x200000001, capacity=self.capacity,
                      grain_size=8, grain_table_size=64, volatile_header_offset=1,
                      volatile_header_size=1, journal_header_offset=2, journal_header_size=2,
                      journal_offset=2048, journal_size=2048, grain_directory_offset=4096,
                      grain_directory_size=_round(-(-tables * 8 // SECTOR)))
        values["grain_tables_offset"] = 4096 + values["grain_directory_size"]
        values["grain_tables_size"] = _round(tables * 64)
        values["free_bitmap_offset"] = values["grain_tables_offset"] + \
            values["grain_tables_size"]
        values["free_bitmap_size"] = _round(-(-tables // (8 * SECTOR)))
        values["backmap_offset"] = values["free_bitmap_offset"] + values["free_bitmap_size"]
        values["backmap_size"] = values["grain_tables_size"]
        values["grains_offset"] = values["backmap_offset"] + values["backmap_size"]
        values["grains_size"] = self.capacity
        return values

    def write(self, path: Path) -> dict[str, int]:
        """Write the extent (tables laid out with the default offsets; the
        overrides in `header` go into the header only); return its fields."""
        layout = self.layout()
        header = {**layout, **self.header}
        directory: dict[int, int] = {}         # table index -> slot
        tables: dict[int, list[int]] = {}
        pieces: list[tuple[int, bytes]] = []
        next_cluster = 0
        for index in sorted(self.grains):
            value = self.grains[index]
            table, entry_index = divmod(index, GT_ENTRIES)
            if table not in directory:
                directory[table] = len(directory)
                tables[table] = [0] * GT_ENTRIES
            if value == ZERO:
                entry = 2 << 60
            elif value == UNMAPPED:
                entry = 1 << 60
            elif isinstance(value, int):
                entry = value
            else:
                assert isinstance(value, bytes) and len(value) <= GRAIN
                cluster = self.clusters.get(index, next_cluster)
                next_cluster = max(next_cluster, cluster + 1)
                entry = allocated_entry(cluster)
                pieces.append((layout["grains_offset"] * SECTOR + cluster * GRAIN,
                               value.ljust(GRAIN, b"\0")))
            tables[table][entry_index] = entry
        for table, slot in directory.items():
            pieces.append((layout["grain_directory_offset"] * SECTOR + table * 8,
                           struct.pack("<Q", 0x1000000000000000 | slot)))
            pieces.append(((layout["grain_tables_offset"] + slot * 64) * SECTOR,
                           struct.pack(f"<{GT_ENTRIES}Q", *tables[table])))
        pieces.append((0, struct.pack("<26Q", *(header[name] for name in HEADER_FIELDS))))
        pieces.append((layout["volatile_header_offset"] * SECTOR,
                       struct.pack("<4Q", *self.volatile)))
        end = max([layout["grains_offset"] * SECTOR] +
                  [offset + len(data) for offset, data in pieces])
        with open(path, "wb") as handle:
            handle.truncate(end)
            for offset, data in pieces:
                os.pwrite(handle.fileno(), data, offset)
        return header

    def expected(self, parent: bytes | None = None) -> bytes:
        """The disk's bytes as QEMU reads them (unallocated: the parent's)."""
        size = self.capacity * SECTOR
        disk = bytearray(parent[:size].ljust(size, b"\0") if parent else bytes(size))
        for index, value in self.grains.items():
            start = index * GRAIN
            if start >= size:
                continue
            if isinstance(value, bytes):
                disk[start:start + GRAIN] = value.ljust(GRAIN, b"\0")[:size - start]
            elif value in (ZERO, UNMAPPED):
                disk[start:start + GRAIN] = bytes(min(GRAIN, size - start))
        return bytes(disk)


def descriptor(path: Path, extents: list[tuple[int, str]], *, parent: str = "",
               parent_cid: int = 0xFFFFFFFF, cid: int = 0x12345678,
               create_type: str = "seSparse") -> Path:
    """A descriptor as ESXi writes one for a snapshot delta: (sectors, file
    name) per SESPARSE extent."""
    hint = f'parentFileNameHint="{parent}"\n' if parent else ""
    lines = "".join(f'RW {sectors} SESPARSE "{name}"\n' for sectors, name in extents)
    path.write_text(f"# Disk DescriptorFile\nversion=1\nencoding=\"UTF-8\"\nCID={cid:08x}\n"
                    f"parentCID={parent_cid:08x}\nisNativeSnapshot=\"no\"\n"
                    f"createType=\"{create_type}\"\n{hint}\n# Extent description\n{lines}\n"
                    "# The Disk Data Base\n#DDB\n\nddb.adapterType = \"lsilogic\"\n"
                    "ddb.virtualHWVersion = \"14\"\nddb.grain = \"8\"\n")
    return path


def sesparse_disk(directory: Path, extent: SeSparse, name: str = "disk", **options: object) \
        -> Path:
    """`name.vmdk` naming `name-sesparse.vmdk`; returns the descriptor."""
    extent.write(directory / f"{name}-sesparse.vmdk")
    return descriptor(directory / f"{name}.vmdk", [(extent.capacity, f"{name}-sesparse.vmdk")],
                      **options)  # type: ignore[arg-type]
