"""qcow2 internal snapshot table (read side).

Spec: qemu/qemu docs/interop/qcow2.txt, "Snapshots".  Entries have a
40-byte fixed part, extra data (v3: at least 16 bytes: the 64-bit VM state
size and the snapshot's virtual disk size), the ID and name strings, then
padding to a multiple of 8.  `parse_snapshot_table` is pure and checks
every length against the bytes it was given.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, NamedTuple

from imgfs.errors import InvalidImage

from .header import QCOW_MAX_L1_SIZE

SNAPSHOT_ENTRY = struct.Struct(">QIHHIIQII")
EXTRA_VM_STATE_SIZE = struct.Struct(">Q")
EXTRA_DISK_SIZE = struct.Struct(">Q")
EXTRA_ICOUNT = struct.Struct(">Q")
#: the instruction count of a snapshot that has none (all ones)
NO_ICOUNT = 2**64 - 1
#: spec: v3 extra data holds at least the VM state size and the disk size
V3_MIN_EXTRA = EXTRA_VM_STATE_SIZE.size + EXTRA_DISK_SIZE.size


class SnapshotEntry(NamedTuple):
    """The fixed 40-byte part of a snapshot table entry."""

    l1_table_offset: int
    l1_size: int
    id_str_size: int
    name_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    extra_data_size: int

    @classmethod
    def unpack(cls, data: bytes, offset: int = 0) -> SnapshotEntry:
        return cls(*SNAPSHOT_ENTRY.unpack_from(data, offset))


@dataclass(frozen=True)
class Snapshot:
    id: str
    name: str
    l1_table_offset: int
    l1_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    disk_size: int | None
    icount: int | None
    #: the extra data as stored (kept byte for byte when the table is rewritten)
    extra: bytes = b""

    def pack(self) -> bytes:
        """The table entry, padded to a multiple of 8 (spec: "Snapshots")."""
        snap_id, name = self.id.encode(), self.name.encode()
        fixed = SNAPSHOT_ENTRY.pack(self.l1_table_offset, self.l1_size, len(snap_id),
                                    len(name), self.date_sec, self.date_nsec,
                                    self.vm_clock_nsec, min(self.vm_state_size, 2**32 - 1),
                                    len(self.extra))
        raw = fixed + self.extra + snap_id + name
        return raw + bytes(-len(raw) % 8)

    def info(self) -> dict[str, Any]:
        """qemu-img info's keys for one snapshot."""
        report: dict[str, Any] = {
            "id": self.id, "name": self.name, "vm-state-size": self.vm_state_size,
            "date-sec": self.date_sec, "date-nsec": self.date_nsec,
            "vm-clock-sec": self.vm_clock_nsec // 10**9,
            "vm-clock-nsec": self.vm_clock_nsec % 10**9,
        }
        if self.icount is not None:
            report["icount"] = self.icount
        return report


def parse_snapshot_table(table: bytes, count: int, cluster_size: int,
                         file_size: int, *, check: bool = False) -> list[Snapshot]:
    """Decode `count` entries from `table` (the bytes at snapshots_offset).
    For `imgfs check` (`check`) the snapshots' L1 tables are not checked
    here: the check reports a bad one (`l1_table_problem`) and goes on."""
    snapshots: list[Snapshot] = []
    pos = 0
    for number in range(count):
        if pos + SNAPSHOT_ENTRY.size > len(table):
            raise InvalidImage(f"snapshot table overflows: entry {number} of {count} "
                               f"starts at byte {pos} of {len(table)}")
        entry = SnapshotEntry.unpack(table, pos)
        pos += SNAPSHOT_ENTRY.size
        end = pos + entry.extra_data_size + entry.id_str_size + entry.name_size
        if end > len(table):
            raise InvalidImage(f"snapshot table overflows: entry {number} ends at byte "
                               f"{end} of {len(table)}")
        extra = table[pos:pos + entry.extra_data_size]
        pos += entry.extra_data_size
        # C strings to QEMU, which reads them up to the first NUL (as where
        # the end of the file cut them off: zeros, see Qcow2Driver._read_snapshots)
        snap_id = _c_string(table[pos:pos + entry.id_str_size])
        pos += entry.id_str_size
        name = _c_string(table[pos:pos + entry.name_size])
        pos += entry.name_size
        pos += -pos % 8
        if not check:
            _check_snapshot_l1(number, entry, cluster_size, file_size)
        snapshots.append(_snapshot(entry, extra, snap_id, name))
    return snapshots


def _c_string(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def _check_snapshot_l1(number: int, entry: SnapshotEntry, cluster_size: int,
                       file_size: int) -> None:
    if entry.l1_size > QCOW_MAX_L1_SIZE // 8:
        raise InvalidImage(f"snapshot {number}: l1_size {entry.l1_size} too large "
                           f"(at most {QCOW_MAX_L1_SIZE // 8})")
    if entry.l1_table_offset % cluster_size or \
            entry.l1_table_offset + entry.l1_size * 8 > file_size:
        raise InvalidImage(f"snapshot {number}: L1 table offset "
                           f"{entry.l1_table_offset:#x} is unaligned or beyond the file")


def l1_table_problem(snap: Snapshot, cluster_size: int) -> str | None:
    """qemu-img check's complaint about a snapshot's L1 table that cannot
    be walked (unaligned, or larger than QEMU's limit), or None.  A table
    past the end of the file is walked (it reads as empty) and counted as
    a region past the end instead."""
    where = f"ERROR snapshot {snap.id} ({snap.name})"
    if snap.l1_table_offset % cluster_size:
        return (f"{where} l1_offset={snap.l1_table_offset:#x}: L1 table is not cluster "
                "aligned; snapshot table entry corrupted")
    if snap.l1_size > QCOW_MAX_L1_SIZE // 8:
        return (f"{where} l1_size={snap.l1_size:#x}: L1 table is too large; snapshot "
                "table entry corrupted")
    return None


def _snapshot(entry: SnapshotEntry, extra: bytes, snap_id: str, name: str) -> Snapshot:
    vm_state_size = entry.vm_state_size
    disk_size = icount = None
    if len(extra) >= 8:
        vm_state_size = EXTRA_VM_STATE_SIZE.unpack_from(extra, 0)[0]
    if len(extra) >= 16:
        disk_size = EXTRA_DISK_SIZE.unpack_from(extra, 8)[0]
    if len(extra) >= 24:
        icount = EXTRA_ICOUNT.unpack_from(extra, 16)[0]
        if icount == NO_ICOUNT:
            icount = None
    return Snapshot(snap_id, name, entry.l1_table_offset, entry.l1_size, entry.date_sec,
                    entry.date_nsec, entry.vm_clock_nsec, vm_state_size, disk_size, icount,
                    bytes(extra))


def new_extra_data(disk_size: int, *, vm_state_size: int = 0, icount: int = 0) -> bytes:
    """v3 extra data: 64-bit VM state size, disk size, icount (qemu-img
    snapshot -c writes 0; NO_ICOUNT means none)."""
    return EXTRA_VM_STATE_SIZE.pack(vm_state_size) + EXTRA_DISK_SIZE.pack(disk_size) + \
        EXTRA_ICOUNT.pack(icount)
