"""The ``fat`` protocol driver: reads of the virtual disk, region by region.

The disk is a short list of regions (MBR, boot sector, FSInfo, backup boot
sector, the two FAT copies, the FAT-12/16 root directory, the data area);
everything between them reads as zeros.  Data clusters of a file are read
from the host file with ``os.pread`` at the matching offset, one call for a
whole request inside one file (a file's clusters are contiguous).

Host changes after open: before reading a file, its path is stat'ed; if it
no longer names the same inode with the snapshot's size (deleted, replaced,
truncated, grown), the request fails with EIO rather than return bytes that
disagree with the FAT the guest already read.  Contents rewritten in place
at the same size read as they are now.
"""
from __future__ import annotations

import errno
import os
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import trio

from imgfs.block import DATA, ZERO, BlockDriver, Extent, Kind
from imgfs.errors import ImgfsError, Unsupported, UsageError
from imgfs.node import OpenContext
from imgfs.options import Bool, Int, Opt, Schema, Size, Str

from . import layout
from .image import FatImage, Request
from .tree import HostNode, scan_tree

#: host files kept open between reads (a guest reads many files in turn)
FD_CACHE_SIZE = 64
#: the tokens ``fat:`` filenames may carry before DIR, in any order
FILENAME_FLAGS = ("floppy", "rw", "12", "16", "32")

Producer = Callable[[int, int], bytes]


def parse_fat_filename(filename: str) -> dict[str, Any]:
    """``fat:[floppy:][rw:][12:|16:|32:]DIR`` -> options.

    QEMU looks for each flag anywhere before DIR, so any order works; given
    several FAT types, 32 beats 16 beats 12, as in QEMU.  DIR is what
    follows the last flag and may itself contain colons.
    """
    rest = filename.partition(":")[2]
    flags = set()
    while True:
        head, sep, tail = rest.partition(":")
        if not sep or head not in FILENAME_FLAGS:
            break
        flags.add(head)
        rest = tail
    if not rest:
        raise UsageError(f"no directory in '{filename}' "
                         "(expected fat:[floppy:][rw:][12:|16:|32:]DIR)")
    fat_type = next((int(kind) for kind in ("32", "16", "12") if kind in flags), 0)
    return {"dir": rest, "floppy": "floppy" in flags, "rw": "rw" in flags,
            "fat-type": fat_type}


def _check_fat_type(value: int) -> None:
    if value not in (0, 12, 16, 32):
        raise UsageError("must be 12, 16, 32 or 0 (chosen by size)")


class FatDriver(BlockDriver):
    name = "fat"
    kind = Kind.PROTOCOL
    prefixes = ("fat:",)
    description = "a host directory as a virtual FAT disk (read-only)"
    open_opts = Schema(
        Opt("dir", Str, help="the host directory to present"),
        Opt("floppy", Bool, default=False,
            help="a bare FAT12 floppy (1.44 MB, or 2.88 MB when needed) instead of a disk"),
        Opt("rw", Bool, default=False, help="write changes back to the directory"),
        Opt("fat-type", Int, default=0, check=_check_fat_type,
            help="12, 16 or 32 (0: chosen by cluster count)"),
        Opt("label", Str, help="volume label (default: the directory's name)"),
        Opt("size", Size, help="disk size (default: the tree plus free space)"),
    )
    writable = False
    read_only_by_default = True

    image: FatImage
    regions: list[tuple[int, int, Producer]]

    def __init__(self) -> None:
        self.region_starts: list[int] = []
        self.fds: OrderedDict[int, int] = OrderedDict()

    @classmethod
    def parse_filename(cls, filename: str) -> dict[str, Any]:
        return parse_fat_filename(filename)

    async def open(self, options: dict[str, Any], ctx: OpenContext) -> None:
        directory = options["dir"]
        if not directory:
            raise UsageError("fat: no directory given (option 'dir')")
        if options["rw"]:
            raise Unsupported("fat: rw mode (writing back to the directory) is not "
                              "supported yet; drop 'rw:' to mount read-only")
        request = Request(fat_type=options["fat-type"] or None, floppy=options["floppy"],
                          size=options["size"], label=options["label"])
        tree = await trio.to_thread.run_sync(scan_tree, directory)
        self.image = FatImage(tree, request)
        self.size = self.image.size
        self.regions = self._regions()
        self.region_starts = [start for start, _, _ in self.regions]

    async def aclose(self) -> None:
        while self.fds:
            os.close(self.fds.popitem()[1])

    def info(self) -> dict[str, Any]:
        image = self.image
        return {"fat-type": image.fat_type, "cluster-size": image.cluster_size,
                "floppy": image.floppy, "files": len(image.nodes) - 1,
                "skipped": len(image.tree.skipped)}

    # -- the region map -----------------------------------------------------------

    def _regions(self) -> list[tuple[int, int, Producer]]:
        image, volume = self.image, self.image.volume
        base = image.partition_start * layout.SECTOR_SIZE
        regions: list[tuple[int, int, Producer]] = []

        def constant(start: int, data: bytes) -> None:
            regions.append((base + start, base + start + len(data), _slicer(data)))

        if not image.floppy:
            mbr = layout.mbr_sector(image.fat_type, image.partition_start,
                                    volume.total_sectors, image.serial)
            regions.append((0, len(mbr), _slicer(mbr)))
        boot = layout.boot_sector(volume, image.serial, image.label)
        constant(0, boot)
        if image.fat_type == 32:
            fsinfo = layout.fsinfo_sector(image.free_clusters, self._next_free())
            constant(layout.FSINFO_SECTOR * layout.SECTOR_SIZE, fsinfo)
            constant(layout.BACKUP_BOOT_SECTOR * layout.SECTOR_SIZE, boot + fsinfo)
        fat_size = volume.fat_sectors * layout.SECTOR_SIZE
        for copy in range(volume.fat_count):
            start = base + (volume.first_fat_sector * layout.SECTOR_SIZE) + copy * fat_size
            regions.append((start, start + fat_size, image.fat_bytes))
        if image.fat_type != 32:
            start = base + volume.root_dir_sector * layout.SECTOR_SIZE
            root = image.directory(0)
            regions.append((start, start + len(root), _slicer(root)))
        start = base + volume.data_sector * layout.SECTOR_SIZE
        regions.append((start, start + volume.cluster_count * volume.cluster_size, self._data))
        return regions

    def _next_free(self) -> int:
        if not self.image.free_clusters:
            return 0xFFFFFFFF
        return 2 + self.image.used_clusters

    # -- allocation -------------------------------------------------------------------

    async def block_status(self, offset: int, length: int) -> Extent:
        """Free clusters and the gaps between regions are ZERO (so convert,
        cp --sparse and SEEK_HOLE skip them); everything else is DATA."""
        index = max(0, bisect_right(self.region_starts, offset) - 1)
        start, stop, produce = self.regions[index]
        if offset >= stop:
            following = index + 1
            gap_end = self.regions[following][0] if following < len(self.regions) else self.size
            return Extent(min(length, gap_end - offset), ZERO)
        length = min(length, stop - offset)
        if produce != self._data:
            return Extent(length, DATA)
        image = self.image
        cluster_size = image.cluster_size
        relative = offset - start
        cluster = 2 + relative // cluster_size
        run = image.owner(cluster)
        if run >= 0:
            node = image.nodes[image.run_node[run]]
            run_end = (node.first_cluster + node.cluster_count - 2) * cluster_size
            if relative < run_end:
                return Extent(min(length, run_end - relative), DATA)
        if run + 1 < len(image.run_first):
            next_start = (image.run_first[run + 1] - 2) * cluster_size
            return Extent(min(length, next_start - relative), ZERO)
        return Extent(length, ZERO)

    # -- reads ----------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes:
        parts = []
        end = offset + length
        index = max(0, bisect_right(self.region_starts, offset) - 1)
        while offset < end:
            if index < len(self.regions):
                start, stop, produce = self.regions[index]
            else:
                start = stop = end
            if offset < start:          # a gap between regions reads as zeros
                step = min(start, end) - offset
                parts.append(bytes(step))
            elif offset < stop:
                step = min(stop, end) - offset
                parts.append(produce(offset - start, step))
            else:
                index += 1
                continue
            offset += step
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _data(self, offset: int, length: int) -> bytes:
        """Bytes of the data area: a run of a file or directory, or free space."""
        image = self.image
        cluster_size = image.cluster_size
        parts = []
        while length > 0:
            cluster = 2 + offset // cluster_size
            run = image.owner(cluster)
            node = image.nodes[image.run_node[run]] if run >= 0 else None
            if node is not None and cluster < node.first_cluster + node.cluster_count:
                node_offset = offset - (node.first_cluster - 2) * cluster_size
                step = min(length, node.cluster_count * cluster_size - node_offset)
                parts.append(self._node_bytes(image.run_node[run], node, node_offset, step))
            else:
                following = run + 1
                if following < len(image.run_first):
                    next_start = (image.run_first[following] - 2) * cluster_size
                    step = min(length, next_start - offset)
                else:
                    step = length
                parts.append(bytes(step))
            offset += step
            length -= step
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _node_bytes(self, index: int, node: HostNode, offset: int, length: int) -> bytes:
        if node.is_dir:
            return self.image.directory(index)[offset:offset + length]
        wanted = max(0, min(length, node.size - offset))
        data = self._read_host(index, node, offset, wanted) if wanted else b""
        # The slack after the end of the file, up to the cluster's end, is zeros.
        return data if wanted == length else data + bytes(length - wanted)

    def _read_host(self, index: int, node: HostNode, offset: int, length: int) -> bytes:
        try:
            info = os.stat(node.path)
        except OSError as exc:
            raise _host_changed(node, f"is gone ({exc.strerror})") from None
        if (info.st_ino, info.st_dev) != (node.inode, node.device):
            raise _host_changed(node, "was replaced by another file")
        if info.st_size != node.size:
            raise _host_changed(node, f"changed size ({node.size} -> {info.st_size} bytes)")
        fd = self._fd(index, node)
        data = os.pread(fd, length, offset)
        if len(data) < length:
            raise _host_changed(node, "shrank while being read")
        return data

    def _fd(self, index: int, node: HostNode) -> int:
        fd = self.fds.get(index)
        if fd is not None:
            self.fds.move_to_end(index)
            return fd
        try:
            fd = os.open(node.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise ImgfsError(f"fat: cannot open {node.path}: {exc.strerror}",
                             errno_=errno.EIO) from None
        if os.fstat(fd).st_ino != node.inode:
            os.close(fd)
            raise _host_changed(node, "was replaced by another file")
        self.fds[index] = fd
        if len(self.fds) > FD_CACHE_SIZE:
            os.close(self.fds.popitem(last=False)[1])
        return fd


def _slicer(data: bytes) -> Producer:
    return lambda offset, length: data[offset:offset + length]


def _host_changed(node: HostNode, what: str) -> ImgfsError:
    return ImgfsError(f"fat: host file {node.path} {what} since the disk was "
                      "opened; its clusters read as I/O errors", errno_=errno.EIO)
