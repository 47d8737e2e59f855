"""Placing a host tree on a FAT volume: geometry, cluster allocation, and the
generated metadata (FAT entries and directory contents).

Every file and directory gets one contiguous run of clusters, allocated in
the snapshot's order (a directory's entries, then its files), so the FAT is
a set of runs: entry c of a run holds c + 1, its last entry end-of-chain.
Runs are kept as two sorted arrays (first cluster, node index), so finding
the owner of a cluster is a bisect, and a FAT window is filled run by run
with C-speed array slices, whatever the size of the tree.
"""
from __future__ import annotations

import os
import sys
import zlib
from array import array
from bisect import bisect_right
from dataclasses import dataclass, replace

from imgfs.errors import NoSpace, UsageError

from . import dirent
from .layout import (
    DEFAULT_ROOT_ENTRIES,
    DIR_ENTRY_SIZE,
    END_OF_CHAIN,
    MAX_DISK_SECTORS,
    NO_NAME,
    PARTITION_START,
    SECTOR_SIZE,
    Volume,
    ceil_div,
    check_label,
    free_space,
    plan_auto_size,
    plan_fixed_size,
    plan_floppy,
)
from .tree import HostNode, HostTree

#: array typecodes of FAT-16 and FAT-32 entries
ENTRY_TYPECODE = {16: "H", 32: "I"}
ENTRY_BYTES = {16: 2, 32: 4}
#: largest root directory of FAT-12/16 (a 16-bit count, whole sectors)
MAX_ROOT_ENTRIES = 65520


@dataclass(frozen=True)
class Request:
    """What the user asked for (options of the ``fat`` driver)."""

    fat_type: int | None = None
    floppy: bool = False
    size: int | None = None
    label: str | None = None
    #: rw mode: an automatically sized disk gets more free space
    writable: bool = False


def default_label(path: str) -> bytes:
    """The directory's name as a volume label, keeping what labels may hold."""
    name = os.path.basename(os.path.abspath(path)).upper()
    kept = "".join(char for char in name if char in dirent.SHORT_CHARS and char != " ")
    return check_label(kept[:11]) if kept else NO_NAME


class FatImage:
    """The layout of one virtual FAT disk over a `HostTree`."""

    def __init__(self, tree: HostTree, request: Request) -> None:
        self.tree = tree
        self.nodes = tree.nodes
        self.floppy = request.floppy
        self.label = check_label(request.label) if request.label is not None \
            else default_label(tree.root_path)
        self.volume = self._plan(request)
        self.partition_start = 0 if self.floppy else PARTITION_START
        self.size = request.size or (self.partition_start + self.volume.total_sectors) * SECTOR_SIZE
        self.fat_type = self.volume.fat_type
        self.cluster_size = self.volume.cluster_size
        self.run_first = array("I")
        self.run_node = array("I")
        self.used_clusters = self._allocate()
        root = self.nodes[0]
        self.serial = zlib.crc32(os.fsencode(os.path.realpath(tree.root_path)),
                                 int(root.mtime) & 0xFFFFFFFF)
        self._directories: dict[int, bytes] = {}
        self._fat12: bytes | None = None

    # -- geometry -----------------------------------------------------------------

    def _has_label(self) -> bool:
        return self.label != NO_NAME

    def _root_entries(self) -> int:
        needed = self.tree.dir_entry_count(0, is_root=True, label=self._has_label())
        return max(DEFAULT_ROOT_ENTRIES if not self.floppy else 0, ceil_div(needed, 16) * 16)

    def clusters_needed(self, fat_type: int, cluster_size: int) -> int:
        """Clusters the tree takes with this type and cluster size."""
        total = 0
        for index, node in enumerate(self.nodes):
            total += self._node_clusters(index, node, fat_type, cluster_size)
        return total

    def _node_clusters(self, index: int, node: HostNode, fat_type: int,
                       cluster_size: int) -> int:
        if not node.is_dir:
            return ceil_div(node.size, cluster_size)
        if index == 0 and fat_type != 32:
            return 0               # FAT-12/16 keep the root in its fixed area
        entries = self.tree.dir_entry_count(index, is_root=index == 0,
                                            label=self._has_label())
        return max(1, ceil_div(entries * DIR_ENTRY_SIZE, cluster_size))

    def _plan(self, request: Request) -> Volume:
        root_entries = self._root_entries()
        fat_type = request.fat_type
        if root_entries > MAX_ROOT_ENTRIES:
            if fat_type in (12, 16) or request.floppy:
                raise NoSpace(f"the top directory needs {root_entries} entries, more than "
                              f"FAT12/16 allow ({MAX_ROOT_ENTRIES})")
            fat_type = 32          # only FAT-32 grows its root directory
        if request.floppy:
            sectors = None if request.size is None else request.size // SECTOR_SIZE
            return plan_floppy(fat_type, root_entries, self.clusters_needed, sectors)
        if request.size is None:
            used = sum(node.size for node in self.nodes)
            free = free_space(used, writable=request.writable)
            volume = plan_auto_size(fat_type, root_entries, self.clusters_needed, used, free)
        else:
            volume = plan_fixed_size(fat_type, root_entries, self.clusters_needed,
                                     _volume_sectors(request.size))
        if PARTITION_START + volume.total_sectors > MAX_DISK_SECTORS:
            raise NoSpace("the directory needs a disk over 2 TiB, more than an MBR "
                          "partition table can describe")
        return replace(volume, hidden_sectors=PARTITION_START)

    # -- allocation ---------------------------------------------------------------

    def _allocate(self) -> int:
        """Give each node its run of clusters, in snapshot order."""
        cluster = 2
        for index, node in enumerate(self.nodes):
            count = self._node_clusters(index, node, self.fat_type, self.cluster_size)
            if not count:
                continue
            node.first_cluster, node.cluster_count = cluster, count
            self.run_first.append(cluster)
            self.run_node.append(index)
            cluster += count
        return cluster - 2

    def owner(self, cluster: int) -> int:
        """Index into the runs of the run holding or preceding `cluster` (-1: none)."""
        return bisect_right(self.run_first, cluster) - 1

    @property
    def free_clusters(self) -> int:
        return self.volume.cluster_count - self.used_clusters

    # -- the FAT ------------------------------------------------------------------

    def fat_bytes(self, offset: int, length: int) -> bytes:
        """Bytes `offset`.. of one FAT copy (both copies are identical)."""
        if self.fat_type == 12:
            if self._fat12 is None:
                self._fat12 = self._build_fat12()
            return self._fat12[offset:offset + length]
        size = ENTRY_BYTES[self.fat_type]
        first = offset // size
        last = ceil_div(offset + length, size)
        entries = self.fat_entries(first, last)
        data = entries.tobytes()
        start = offset - first * size
        return data[start:start + length]

    def fat_entries(self, first: int, last: int) -> array:
        """FAT entries first..last-1 (FAT-16/32) as an array of integers."""
        typecode = ENTRY_TYPECODE.get(self.fat_type, "H")
        entries = array(typecode, bytes((last - first) * array(typecode).itemsize))
        end_mark = END_OF_CHAIN[self.fat_type]
        for number, value in ((0, (end_mark & ~0xFF) | self.volume.media), (1, end_mark)):
            if first <= number < last:
                entries[number - first] = value
        run = max(0, self.owner(first))
        while run < len(self.run_first) and self.run_first[run] < last:
            start = self.run_first[run]
            stop = start + self.nodes[self.run_node[run]].cluster_count
            low, high = max(start, first), min(stop, last)
            if low < high:
                entries[low - first:high - first] = array(typecode, range(low + 1, high + 1))
                if high == stop:
                    entries[stop - 1 - first] = end_mark
            run += 1
        if sys.byteorder != "little":
            entries.byteswap()
        return entries

    def _build_fat12(self) -> bytes:
        """The whole FAT-12 (at most 4086 entries): two entries per 3 bytes."""
        count = self.volume.cluster_count + 2
        values = self.fat_entries(0, count + count % 2)
        packed = bytearray()
        for index in range(0, len(values), 2):
            low, high = values[index] & 0xFFF, values[index + 1] & 0xFFF
            packed += bytes((low & 0xFF, (low >> 8) | ((high & 0xF) << 4), high >> 4))
        return bytes(packed.ljust(self.volume.fat_sectors * SECTOR_SIZE, b"\0"))

    # -- directories --------------------------------------------------------------

    def directory(self, index: int) -> bytes:
        """The directory's whole contents (generated once, then kept)."""
        data = self._directories.get(index)
        if data is None:
            data = self._build_directory(index)
            self._directories[index] = data
        return data

    def _build_directory(self, index: int) -> bytes:
        node = self.nodes[index]
        parts = self._header_entries(index, node)
        children = [self.nodes[child] for child in node.children]
        clean = [dirent.clean_short_name(child.name) for child in children]
        names = dirent.ShortNames({short for short in clean if short is not None})
        for child, short in zip(children, clean, strict=True):
            if short is None:
                short = names.generate(child.name)
                parts.append(dirent.long_name_entries(child.name, dirent.lfn_checksum(short)))
            parts.append(_short_entry_for(child, short))
        if index == 0 and self.fat_type != 32:
            capacity = self.volume.root_entries * DIR_ENTRY_SIZE
        else:
            capacity = node.cluster_count * self.cluster_size
        return b"".join(parts).ljust(capacity, b"\0")

    def _header_entries(self, index: int, node: HostNode) -> list[bytes]:
        """The volume label (root) or the '.' and '..' entries (subdirectories)."""
        stamp = dirent.fat_stamp(node.mtime)
        if index == 0:
            if not self._has_label():
                return []
            return [dirent.short_entry(self.label, dirent.ATTR_VOLUME_ID, 0, 0,
                                       stamp, dirent.Stamp(0, 0, 0), dirent.Stamp(0, 0, 0))]
        parent = self.nodes[node.parent]
        # '..' of a directory in the root names cluster 0, even on FAT-32.
        parent_cluster = 0 if node.parent == 0 else parent.first_cluster
        return [_dot_entry(dirent.DOT_NAME, node, node.first_cluster),
                _dot_entry(dirent.DOTDOT_NAME, parent, parent_cluster)]


def _volume_sectors(size: int) -> int:
    if size % SECTOR_SIZE:
        raise UsageError(f"size {size} is not a multiple of {SECTOR_SIZE} bytes")
    sectors = size // SECTOR_SIZE - PARTITION_START
    if sectors <= 0:
        raise UsageError(f"size {size} is too small for a partitioned disk")
    return sectors


def _attributes(node: HostNode) -> int:
    attributes = dirent.ATTR_DIRECTORY if node.is_dir else dirent.ATTR_ARCHIVE
    if node.name.startswith("."):
        attributes |= dirent.ATTR_HIDDEN
    if not node.is_dir and not node.mode & 0o222:
        attributes |= dirent.ATTR_READ_ONLY
    return attributes


def _short_entry_for(node: HostNode, short: bytes) -> bytes:
    # The host has no portable creation time: FAT's creation stamp gets the
    # modification time, the earliest time the snapshot knows of.
    write = dirent.fat_stamp(node.mtime)
    return dirent.short_entry(short, _attributes(node), node.first_cluster, node.size,
                              write, write, dirent.fat_stamp(node.atime))


def _dot_entry(name: bytes, node: HostNode, cluster: int) -> bytes:
    stamp = dirent.fat_stamp(node.mtime)
    return dirent.short_entry(name, dirent.ATTR_DIRECTORY, cluster, 0, stamp, stamp,
                              dirent.fat_stamp(node.atime))
