"""FAT volume and disk layout: where every region lives, and its header bytes.

Spec: libyal/libfsfat ``documentation/File Allocation Table (FAT)
format.asciidoc`` ("Determing FAT version", "Boot sector", "File allocation
table").  Everything here is pure: sizes in, numbers and bytes out.

A volume is: reserved sectors (boot sector; for FAT-32 also FSInfo and the
backup boot sector), two FAT copies, the fixed root directory (FAT-12/16
only), then the data area of clusters numbered from 2.  A hard disk puts an
MBR in front with one partition starting at 1 MiB; a floppy is the bare
volume.
"""
from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import NamedTuple

from imgfs.errors import NoSpace, UsageError

SECTOR_SIZE = 512
#: "FAT-12 is used if the number of clusters is less than 4085, FAT-16 if
#: less than 65525, FAT-32 otherwise" ("Determing FAT version")
MAX_CLUSTERS = {12: 4084, 16: 65524, 32: 0x0FFFFFF5 - 2}
MIN_CLUSTERS = {12: 1, 16: 4085, 32: 65525}
#: bits per FAT entry
ENTRY_BITS = {12: 12, 16: 16, 32: 32}
#: end-of-chain markers written by imgfs (any value >= 0x..ff8 ends a chain)
END_OF_CHAIN = {12: 0xFFF, 16: 0xFFFF, 32: 0x0FFFFFFF}
MEDIA_FIXED = 0xF8
MEDIA_REMOVABLE = 0xF0
EXTENDED_BOOT_SIGNATURE = 0x29
SECTOR_SIGNATURE = b"\x55\xaa"
#: "Boot entry point": JMP over the BPB, NOP
JUMP_FAT16 = b"\xeb\x3c\x90"
JUMP_FAT32 = b"\xeb\x58\x90"
OEM_NAME = b"IMGFS1.0"
#: boot code: "hlt; jmp $-1", so a machine booting the volume just stops
BOOT_CODE = b"\xf4\xeb\xfd"
NO_NAME = b"NO NAME    "
FAT32_RESERVED_SECTORS = 32
FSINFO_SECTOR = 1
BACKUP_BOOT_SECTOR = 6
ROOT_CLUSTER_FAT32 = 2
# FSInfo signatures (fatgen103 "FAT32 FSInfo Sector Structure").
FSI_LEAD_SIG = 0x41615252
FSI_STRUC_SIG = 0x61417272
FSI_TRAIL_SIG = 0xAA550000
#: a hard disk's partition starts here, aligned as fdisk and parted do
PARTITION_START = 2048
#: sectors per track and heads of the BIOS geometry given to hard disks
HD_SECTORS_PER_TRACK = 63
HD_HEADS = 255
#: MBR partition types
PART_FAT12 = 0x01
PART_FAT16_SMALL = 0x04            # FAT-16 under 32 MiB
PART_FAT16 = 0x06
PART_FAT16_LBA = 0x0E
PART_FAT32 = 0x0B
PART_FAT32_LBA = 0x0C
#: the last LBA that CHS addressing (1024 cylinders) reaches
CHS_LIMIT = 1024 * HD_HEADS * HD_SECTORS_PER_TRACK
MAX_DISK_SECTORS = 0xFFFFFFFF      # MBR sector counts are 32-bit
#: the largest file FAT can hold (its size field is 32-bit)
MAX_FILE_SIZE = 0xFFFFFFFF
#: a directory holds at most 65536 entries (2 MiB)
MAX_DIR_ENTRIES = 65536
DIR_ENTRY_SIZE = 32
MAX_CLUSTER_SIZE = 32768

# "FAT-12 and FAT-16 boot sector" offsets 0..35, common to all types.
BPB = struct.Struct("<3s8sHBHBHHBHHHII")


class Bpb(NamedTuple):
    jump: bytes
    oem_name: bytes
    bytes_per_sector: int
    sectors_per_cluster: int
    reserved_sectors: int
    fat_count: int
    root_entries: int
    total_sectors_16: int
    media: int
    fat_sectors_16: int
    sectors_per_track: int
    heads: int
    hidden_sectors: int
    total_sectors_32: int

    def pack(self) -> bytes:
        return BPB.pack(*self)

    @classmethod
    def unpack(cls, data: bytes) -> Bpb:
        return cls(*BPB.unpack_from(data))


# FAT-12/16 extended BPB (offsets 36..61).
EBPB16 = struct.Struct("<BBBI11s8s")
# FAT-32 extended BPB (offsets 36..89).
EBPB32 = struct.Struct("<IHHIHH12sBBBI11s8s")
# MBR partition entry: status, CHS first, type, CHS last, LBA first, sectors.
PARTITION_ENTRY = struct.Struct("<B3sB3sII")
MBR_PARTITION_TABLE = 446
MBR_DISK_SIGNATURE = 440


def ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


@dataclass(frozen=True)
class Volume:
    """Where each region of one FAT volume lies, in sectors from its start."""

    fat_type: int
    total_sectors: int
    sectors_per_cluster: int
    reserved_sectors: int
    fat_sectors: int
    root_entries: int              # 0 on FAT-32
    cluster_count: int
    media: int = MEDIA_FIXED
    sectors_per_track: int = HD_SECTORS_PER_TRACK
    heads: int = HD_HEADS
    hidden_sectors: int = 0
    fat_count: int = 2

    @property
    def cluster_size(self) -> int:
        return self.sectors_per_cluster * SECTOR_SIZE

    @property
    def root_dir_sectors(self) -> int:
        return ceil_div(self.root_entries * DIR_ENTRY_SIZE, SECTOR_SIZE)

    @property
    def first_fat_sector(self) -> int:
        return self.reserved_sectors

    @property
    def root_dir_sector(self) -> int:
        """"Determining the root directory location", FAT-12 and FAT-16."""
        return self.reserved_sectors + self.fat_count * self.fat_sectors

    @property
    def data_sector(self) -> int:
        return self.root_dir_sector + self.root_dir_sectors

    def cluster_sector(self, cluster: int) -> int:
        return self.data_sector + (cluster - 2) * self.sectors_per_cluster

    @property
    def size(self) -> int:
        return self.total_sectors * SECTOR_SIZE


def fat_sectors_for(fat_type: int, cluster_count: int) -> int:
    """Sectors one FAT needs for entries 0..cluster_count+1."""
    return ceil_div(ceil_div((cluster_count + 2) * ENTRY_BITS[fat_type], 8), SECTOR_SIZE)


def _reserved_for(fat_type: int, fat_sectors: int, root_sectors: int, align: int) -> int:
    """Reserved sectors, padded so that the data area starts on an `align`
    boundary (mkfs.fat -a does the same; the spec allows any count >= 1)."""
    reserved = FAT32_RESERVED_SECTORS if fat_type == 32 else 1
    used = reserved + 2 * fat_sectors + root_sectors
    return reserved + (-used % align)


def plan_volume(fat_type: int, total_sectors: int, sectors_per_cluster: int,
                root_entries: int, *, align: int = 1, media: int = MEDIA_FIXED) -> Volume:
    """Lay out a volume of `total_sectors` with the smallest FAT that covers
    every cluster the rest of the space holds (found as mkfs.fat does: grow
    the FAT until it fits, then give back sectors the growth overshot)."""
    root_entries = 0 if fat_type == 32 else root_entries
    root_sectors = ceil_div(root_entries * DIR_ENTRY_SIZE, SECTOR_SIZE)

    def clusters_with(fat_sectors: int) -> tuple[int, int]:
        reserved = _reserved_for(fat_type, fat_sectors, root_sectors, align)
        data_start = reserved + 2 * fat_sectors + root_sectors
        return reserved, max(0, (total_sectors - data_start) // sectors_per_cluster)

    fat_sectors = 1
    while fat_sectors_for(fat_type, clusters_with(fat_sectors)[1]) > fat_sectors:
        fat_sectors = fat_sectors_for(fat_type, clusters_with(fat_sectors)[1])
    while fat_sectors > 1 and \
            fat_sectors_for(fat_type, clusters_with(fat_sectors - 1)[1]) <= fat_sectors - 1:
        fat_sectors -= 1
    reserved, clusters = clusters_with(fat_sectors)
    return Volume(fat_type, total_sectors, sectors_per_cluster, reserved, fat_sectors,
                  root_entries, clusters, media=media)


def volume_for_clusters(fat_type: int, clusters: int, sectors_per_cluster: int,
                        root_entries: int, *, align: int = 1) -> Volume:
    """The smallest volume holding exactly `clusters` clusters."""
    root_entries = 0 if fat_type == 32 else root_entries
    root_sectors = ceil_div(root_entries * DIR_ENTRY_SIZE, SECTOR_SIZE)
    fat_sectors = fat_sectors_for(fat_type, clusters)
    reserved = _reserved_for(fat_type, fat_sectors, root_sectors, align)
    total = reserved + 2 * fat_sectors + root_sectors + clusters * sectors_per_cluster
    return Volume(fat_type, total, sectors_per_cluster, reserved, fat_sectors,
                  root_entries, clusters)


def type_for_clusters(cluster_count: int) -> int:
    """The FAT type every reader infers from the cluster count."""
    if cluster_count <= MAX_CLUSTERS[12]:
        return 12
    if cluster_count <= MAX_CLUSTERS[16]:
        return 16
    return 32


# -- choosing a geometry ----------------------------------------------------------

#: cluster sizes (sectors) tried per type, smallest first; the first ones
#: only serve small trees, where the type's minimum cluster count dominates
CLUSTER_CHOICES = {12: (1, 2, 4, 8), 16: (1, 2, 4, 8, 16, 32, 64), 32: (1, 8, 16, 32, 64)}
#: below this, a cluster size is used only to reach the type's minimum count
#: cheaply (many tiny clusters make a big FAT and slow every lookup)
PREFERRED_MIN_CLUSTER = {12: 1, 16: 4, 32: 8}
#: automatic typing stops FAT-16 at 8 KiB clusters (512 MiB), as mkfs.fat
AUTO_MAX_CLUSTER = {12: 8, 16: 16, 32: 64}
DEFAULT_ROOT_ENTRIES = 512


@dataclass(frozen=True)
class Floppy:
    total_sectors: int
    sectors_per_track: int
    sectors_per_cluster: int
    root_entries: int


FLOPPY_144 = Floppy(2880, 18, 1, 224)
FLOPPY_288 = Floppy(5760, 36, 2, 240)


def free_space(used_bytes: int, *, writable: bool) -> int:
    """Free bytes an automatically sized disk gets beyond the tree: read-only,
    a tenth of the tree (at least 1 MiB); rw, room for the guest to work in:
    half the tree, at least 256 MiB.  size= chooses anything else."""
    if writable:
        return max(used_bytes // 2, 256 << 20)
    return max(used_bytes // 10, 1 << 20)


def plan_floppy(fat_type: int | None, root_entries: int,
                clusters_needed: Callable[[int, int], int],
                total_sectors: int | None = None) -> Volume:
    """A bare FAT-12 floppy (1.44 MB, or 2.88 MB when the tree needs it);
    FAT-16 only when forced, on a 2.88 MB floppy with 512-byte clusters."""
    if fat_type == 32:
        raise UsageError("a floppy cannot hold FAT32 (it needs at least "
                         f"{MIN_CLUSTERS[32]} clusters)")
    kind = fat_type or 12
    candidates = [(FLOPPY_288, 1)] if kind == 16 else \
        [(FLOPPY_144, FLOPPY_144.sectors_per_cluster),
         (FLOPPY_288, FLOPPY_288.sectors_per_cluster)]
    if total_sectors is not None:
        candidates = [pair for pair in candidates if pair[0].total_sectors == total_sectors]
        if not candidates:
            raise UsageError("a floppy is 1440K or 2880K (FAT16 floppies: 2880K)")
    for floppy, per_cluster in candidates:
        volume = plan_volume(kind, floppy.total_sectors, per_cluster,
                             max(root_entries, floppy.root_entries), media=MEDIA_REMOVABLE)
        if type_for_clusters(volume.cluster_count) != kind:
            continue
        if clusters_needed(kind, volume.cluster_size) <= volume.cluster_count:
            return replace(volume, sectors_per_track=floppy.sectors_per_track, heads=2)
    raise NoSpace("the directory does not fit on a floppy (2.88 MB at most); "
                     "drop 'floppy:' to get a hard disk")


def plan_auto_size(fat_type: int | None, root_entries: int,
                   clusters_needed: Callable[[int, int], int], used_bytes: int,
                   free_bytes: int) -> Volume:
    """Size a hard-disk volume to the tree (`used_bytes` of files) plus
    `free_bytes` of free space."""
    types = (fat_type,) if fat_type else (12, 16, 32)
    for kind in types:
        limit = 64 if fat_type else AUTO_MAX_CLUSTER[kind]
        for per_cluster in CLUSTER_CHOICES[kind]:
            if per_cluster > limit:
                break
            cluster_size = per_cluster * SECTOR_SIZE
            count = clusters_needed(kind, cluster_size) + ceil_div(free_bytes, cluster_size)
            if count > MAX_CLUSTERS[kind]:
                continue
            if per_cluster < PREFERRED_MIN_CLUSTER[kind] and count > MIN_CLUSTERS[kind]:
                continue
            count = max(count, MIN_CLUSTERS[kind])
            return volume_for_clusters(kind, count, per_cluster, root_entries,
                                       align=max(per_cluster, 8))
    wanted = f"FAT{fat_type}" if fat_type else "FAT"
    raise NoSpace(f"the directory ({used_bytes} bytes) does not fit in {wanted}")


def plan_fixed_size(fat_type: int | None, root_entries: int,
                    clusters_needed: Callable[[int, int], int], total_sectors: int) -> Volume:
    """Lay out a volume of a size the user chose; refuse if the tree does not fit."""
    types = (fat_type,) if fat_type else (12, 16, 32)
    smallest_missing = None
    for kind in types:
        limit = 64 if fat_type else AUTO_MAX_CLUSTER[kind]
        for per_cluster in CLUSTER_CHOICES[kind]:
            if per_cluster > limit:
                break
            volume = plan_volume(kind, total_sectors, per_cluster, root_entries,
                                 align=max(per_cluster, 8))
            if volume.cluster_count > MAX_CLUSTERS[kind]:
                continue
            if volume.cluster_count < MIN_CLUSTERS[kind]:
                break
            if per_cluster < PREFERRED_MIN_CLUSTER[kind] and not fat_type and \
                    volume.cluster_count > 2 * MIN_CLUSTERS[kind]:
                continue
            needed = clusters_needed(kind, volume.cluster_size)
            if needed <= volume.cluster_count:
                return volume
            missing = (needed - volume.cluster_count) * volume.cluster_size
            smallest_missing = min(missing, smallest_missing or missing)
    size = total_sectors * SECTOR_SIZE
    if smallest_missing is not None:
        raise NoSpace(f"the directory does not fit in a {size}-byte volume "
                         f"({smallest_missing} bytes short)")
    wanted = f"FAT{fat_type}" if fat_type else "any FAT type"
    raise UsageError(f"a {size}-byte volume cannot hold {wanted} "
                     "(cluster count out of the type's range)")


# -- header sectors ----------------------------------------------------------------


def _bpb(volume: Volume) -> Bpb:
    small = volume.total_sectors < 0x10000 and volume.fat_type != 32
    return Bpb(
        jump=JUMP_FAT32 if volume.fat_type == 32 else JUMP_FAT16,
        oem_name=OEM_NAME,
        bytes_per_sector=SECTOR_SIZE,
        sectors_per_cluster=volume.sectors_per_cluster,
        reserved_sectors=volume.reserved_sectors,
        fat_count=volume.fat_count,
        root_entries=volume.root_entries,
        total_sectors_16=volume.total_sectors if small else 0,
        media=volume.media,
        fat_sectors_16=0 if volume.fat_type == 32 else volume.fat_sectors,
        sectors_per_track=volume.sectors_per_track,
        heads=volume.heads,
        hidden_sectors=volume.hidden_sectors,
        total_sectors_32=0 if small else volume.total_sectors,
    )


def boot_sector(volume: Volume, serial: int, label: bytes) -> bytes:
    """Sector 0 of the volume: BPB, extended BPB, boot code, signature."""
    drive = 0x00 if volume.media == MEDIA_REMOVABLE else 0x80
    fs_hint = b"FAT%d   " % volume.fat_type
    if volume.fat_type == 32:
        extended = EBPB32.pack(volume.fat_sectors, 0, 0, ROOT_CLUSTER_FAT32, FSINFO_SECTOR,
                               BACKUP_BOOT_SECTOR, bytes(12), drive, 0,
                               EXTENDED_BOOT_SIGNATURE, serial, label, fs_hint)
    else:
        extended = EBPB16.pack(drive, 0, EXTENDED_BOOT_SIGNATURE, serial, label, fs_hint)
    head = _bpb(volume).pack() + extended
    return (head + BOOT_CODE).ljust(SECTOR_SIZE - 2, b"\0") + SECTOR_SIGNATURE


def fsinfo_sector(free_count: int, next_free: int) -> bytes:
    """FAT-32 FSInfo: lead signature at 0, the counts at 484..495, trail at 508."""
    sector = bytearray(SECTOR_SIZE)
    struct.pack_into("<I", sector, 0, FSI_LEAD_SIG)
    struct.pack_into("<III", sector, 484, FSI_STRUC_SIG, free_count, next_free)
    struct.pack_into("<I", sector, 508, FSI_TRAIL_SIG)
    return bytes(sector)


def chs(lba: int) -> bytes:
    """The 3-byte CHS address of `lba` in the 255-head, 63-sector geometry;
    past cylinder 1023 the conventional maximum (1023, 254, 63)."""
    if lba >= CHS_LIMIT:
        cylinder, head, sector = 1023, HD_HEADS - 1, HD_SECTORS_PER_TRACK
    else:
        cylinder = lba // (HD_HEADS * HD_SECTORS_PER_TRACK)
        head = lba // HD_SECTORS_PER_TRACK % HD_HEADS
        sector = lba % HD_SECTORS_PER_TRACK + 1
    return bytes((head, sector | (cylinder >> 2 & 0xC0), cylinder & 0xFF))


def partition_type(fat_type: int, start: int, sectors: int) -> int:
    """The MBR type byte matching the volume (LBA variants past CHS reach)."""
    lba = start + sectors > CHS_LIMIT
    if fat_type == 12:
        return PART_FAT12
    if fat_type == 16:
        if lba:
            return PART_FAT16_LBA
        return PART_FAT16_SMALL if sectors < 0x10000 else PART_FAT16
    return PART_FAT32_LBA if lba else PART_FAT32


def mbr_sector(fat_type: int, start: int, sectors: int, disk_signature: int) -> bytes:
    """A DOS partition table with one FAT partition covering the volume."""
    sector = bytearray(SECTOR_SIZE)
    struct.pack_into("<I", sector, MBR_DISK_SIGNATURE, disk_signature)
    entry = PARTITION_ENTRY.pack(0x00, chs(start), partition_type(fat_type, start, sectors),
                                 chs(start + sectors - 1), start, sectors)
    sector[MBR_PARTITION_TABLE:MBR_PARTITION_TABLE + PARTITION_ENTRY.size] = entry
    sector[510:512] = SECTOR_SIGNATURE
    return bytes(sector)


def check_label(text: str) -> bytes:
    """A volume label: up to 11 characters a short name may hold, upper case."""
    label = text.upper()
    allowed = set("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 !#$%&'()-@^_`{}~")
    if len(label) > 11 or any(char not in allowed for char in label):
        raise UsageError(f"invalid FAT volume label '{text}' (at most 11 letters, digits, "
                         "spaces or !#$%&'()-@^_`{}~)")
    return label.encode("ascii").ljust(11) if label.strip() else NO_NAME
