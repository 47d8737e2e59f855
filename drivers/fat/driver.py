"""The ``fat`` protocol driver: reads of the virtual disk, region by region.

The disk is a short list of regions (MBR, boot sector, FSInfo, backup boot
sector, the two FAT copies, the FAT-12/16 root directory, the data area);
everything between them reads as zeros.  Data clusters of a file are read
from the host file with ``os.pread`` at the matching offset, one call for a
whole request inside one file (a file's clusters are contiguous); a request
that crosses the end of a file is read into one zero-filled buffer.

Host changes after open: before reading a file, its path is stat'ed; if it
no longer names the same inode with the snapshot's size (deleted, replaced,
truncated, grown), the request fails with EIO rather than return bytes that
disagree with the FAT the guest already read.  Contents rewritten in place
at the same size read as they are now.

rw mode (``fat:rw:``): requests are aligned to 4 KiB blocks, writes go to
the overlay of `writeback`, and `flush` / `aclose` parse the volume and
apply what changed since the last flush to the host directory: a host file
the guest rewrote, renamed or deleted is replaced, moved or removed even if
the host changed it meanwhile; host files the guest did not touch, and
host files the snapshot never showed, are left alone.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import struct
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any, cast

import trio

from imgfs.block import DATA, ZERO, BlockDriver, Extent, Kind
from imgfs.errors import CorruptImage, ImgfsError, UsageError
from imgfs.node import OpenContext
from imgfs.options import Bool, Int, Opt, Schema, Size, Str

from . import layout, writeback
from .image import FatImage, Request
from .tree import HostNode, scan_tree

log = logging.getLogger("imgfs.fat")

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
    description = "a host directory as a virtual FAT disk (rw: writes go back to it)"
    path_opts = frozenset({"dir"})
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
    read_only_reason = "a fat: directory is read-only unless given as fat:rw:DIR"

    image: FatImage
    regions: list[tuple[int, int, Producer]]

    def __init__(self) -> None:
        self.region_starts: list[int] = []
        self.fds: OrderedDict[int, int] = OrderedDict()
        self.rw = False
        self.overlay: writeback.Overlay | None = None
        #: the volume as last applied to the host (rw mode)
        self.synced: dict[str, writeback.FatFile] = {}

    @classmethod
    def parse_filename(cls, filename: str) -> dict[str, Any]:
        return parse_fat_filename(filename)

    @classmethod
    def source_path(cls, filename: str) -> str:
        return str(parse_fat_filename(filename)["dir"])

    @classmethod
    def absolute_filename(cls, filename: str) -> str:
        directory = str(parse_fat_filename(filename)["dir"])
        return filename[:len(filename) - len(directory)] + os.path.abspath(directory)

    async def open(self, options: dict[str, Any], ctx: OpenContext) -> None:
        directory = options["dir"]
        if not directory:
            raise UsageError("fat: no directory given (option 'dir')")
        request = Request(fat_type=options["fat-type"] or None, floppy=options["floppy"],
                          size=options["size"], label=options["label"],
                          writable=options["rw"])
        tree = await trio.to_thread.run_sync(scan_tree, directory)
        self.image = FatImage(tree, request)
        self.size = self.image.size
        self.regions = self._regions()
        self.region_starts = [start for start, _, _ in self.regions]
        if options["rw"]:
            self._open_rw()

    def _open_rw(self) -> None:
        """rw: whole-block writes into an overlay; the volume as generated is
        the state the host already has."""
        self.rw = self.writable = True
        self.read_only_by_default = False
        self.request_alignment = writeback.BLOCK_SIZE
        self.synced = self._volume_reader().walk()

    async def aclose(self) -> None:
        try:
            if self.overlay is not None and not self.node.read_only:
                self._sync()
        finally:
            if self.overlay is not None:
                self.overlay.close()
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
        return self._view(offset, length)

    def _view(self, offset: int, length: int) -> bytes:
        """The disk as the guest sees it: its writes over the generated disk."""
        if self.overlay is None:
            return self._generated(offset, length)
        return self.overlay.read(offset, length, self._generated)

    def _generated(self, offset: int, length: int) -> bytes:
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
        """Bytes of the data area: runs of files or directories, or free space.

        A request inside one file's bytes is one pread, returned as it is.
        One that also covers slack, free clusters or other runs (a guest's
        sequential read crosses a file's end every few requests) is read
        into one zero-filled buffer in place: joining separate pieces would
        cost a copy and a fresh allocation per piece, which is most of what
        the driver adds to the host's pread."""
        pieces = self._data_pieces(offset, length)
        if len(pieces) == 1:
            index, node_offset, step = pieces[0]
            node = self.image.nodes[index] if index >= 0 else None
            if node is not None and not node.is_dir and node_offset + step <= node.size:
                return self._read_host(index, node, node_offset, step)
        buffer = bytearray(length)
        view = memoryview(buffer)
        position = 0
        for index, node_offset, step in pieces:
            if index >= 0:
                self._node_into(index, node_offset, view[position:position + step])
            position += step
        # The bytearray itself is returned: every consumer (slices, joins,
        # pyfuse3's reply through the buffer protocol) takes it, and bytes()
        # would cost the very copy (and page faults) this path avoids.
        return cast(bytes, buffer)

    def _data_pieces(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """(node index, offset in the node's run, length) of each run the
        request covers, in order; node index -1 for free clusters."""
        image = self.image
        cluster_size = image.cluster_size
        pieces = []
        while length > 0:
            cluster = 2 + offset // cluster_size
            run = image.owner(cluster)
            node = image.nodes[image.run_node[run]] if run >= 0 else None
            if node is not None and cluster < node.first_cluster + node.cluster_count:
                node_offset = offset - (node.first_cluster - 2) * cluster_size
                step = min(length, node.cluster_count * cluster_size - node_offset)
                pieces.append((image.run_node[run], node_offset, step))
            else:
                following = run + 1
                if following < len(image.run_first):
                    next_start = (image.run_first[following] - 2) * cluster_size
                    step = min(length, next_start - offset)
                else:
                    step = length
                pieces.append((-1, 0, step))
            offset += step
            length -= step
        return pieces

    def _node_into(self, index: int, offset: int, out: memoryview) -> None:
        """A piece of a node's run into `out` (zero-filled: the slack after
        the end of a file, up to its cluster's end, stays zeros)."""
        node = self.image.nodes[index]
        if node.is_dir:
            data = self.image.directory(index)[offset:offset + len(out)]
            out[:len(data)] = data
            return
        wanted = max(0, min(len(out), node.size - offset))
        if not wanted:
            return
        fd = self._checked_fd(index, node)
        if os.preadv(fd, [out[:wanted]], offset) < wanted:
            raise _host_changed(node, "shrank while being read")

    def _read_host(self, index: int, node: HostNode, offset: int, length: int) -> bytes:
        data = os.pread(self._checked_fd(index, node), length, offset)
        if len(data) < length:
            raise _host_changed(node, "shrank while being read")
        return data

    def _checked_fd(self, index: int, node: HostNode) -> int:
        """The node's open host file, once its path still names the same
        inode with the snapshot's size."""
        try:
            info = os.stat(node.path)
        except OSError as exc:
            raise _host_changed(node, f"is gone ({exc.strerror})") from None
        if (info.st_ino, info.st_dev) != (node.inode, node.device):
            raise _host_changed(node, "was replaced by another file")
        if info.st_size != node.size:
            raise _host_changed(node, f"changed size ({node.size} -> {info.st_size} bytes)")
        return self._fd(index, node)

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


    # -- rw mode ------------------------------------------------------------------

    async def write(self, offset: int, data: bytes) -> None:
        if not self.rw:
            return await super().write(offset, data)
        if self.overlay is None:
            self.overlay = writeback.Overlay()
        # The last block may stretch past the end of the disk: keep it whole.
        self.overlay.write(offset, data)

    async def flush(self) -> None:
        self._sync()

    def _volume_reader(self) -> writeback.VolumeReader:
        image = self.image
        base = image.partition_start * layout.SECTOR_SIZE
        generated_boot = layout.boot_sector(image.volume, image.serial, image.label)
        if self._view(base, layout.SECTOR_SIZE)[11:36] != generated_boot[11:36]:
            raise CorruptImage("the boot sector's geometry changed (was the volume "
                               "reformatted?)")
        return writeback.VolumeReader(self._view, image.volume, base)

    def _sync(self) -> None:
        """Bring the host directory up to date with the volume, or log why not."""
        overlay = self.overlay
        if overlay is None or not overlay.dirty:
            return
        root = self.image.tree.root_path
        try:
            current = self._volume_reader().walk()
        except (ImgfsError, ValueError, struct.error) as exc:
            log.error("fat: %s: the FAT is not consistent, changes not applied: %s", root, exc)
            return
        dirty = self._dirty_clusters(overlay.dirty)
        changes = writeback.plan_changes(self.synced, current,
                                         lambda chain: not dirty.isdisjoint(chain))
        try:
            self._pin_replaced(changes)
            self._apply(changes)
        except (ImgfsError, OSError) as exc:
            log.error("fat: %s: applying changes failed: %s", root, exc)
            return
        self.synced = current
        overlay.dirty.clear()

    def _dirty_clusters(self, blocks: set[int]) -> set[int]:
        volume = self.image.volume
        data_start = (self.image.partition_start + volume.data_sector) * layout.SECTOR_SIZE
        data_end = data_start + volume.cluster_count * volume.cluster_size
        clusters: set[int] = set()
        for block in blocks:
            low = max(block * writeback.BLOCK_SIZE, data_start)
            high = min((block + 1) * writeback.BLOCK_SIZE, data_end)
            if low < high:
                first = 2 + (low - data_start) // volume.cluster_size
                last = 2 + (high - 1 - data_start) // volume.cluster_size
                clusters.update(range(first, last + 1))
        return clusters

    def _cluster_ranges(self, chain: tuple[int, ...]) -> list[tuple[int, int]]:
        """(disk offset, length) of each run of consecutive clusters."""
        volume = self.image.volume
        base = self.image.partition_start * layout.SECTOR_SIZE
        ranges: list[tuple[int, int]] = []
        for cluster in chain:
            offset = base + volume.cluster_sector(cluster) * layout.SECTOR_SIZE
            if ranges and ranges[-1][0] + ranges[-1][1] == offset:
                ranges[-1] = (ranges[-1][0], ranges[-1][1] + volume.cluster_size)
            else:
                ranges.append((offset, volume.cluster_size))
        return ranges

    def _pin_replaced(self, changes: writeback.Changes) -> None:
        """Host files about to be removed or replaced still back clusters of
        the view: copy those into the overlay first."""
        assert self.overlay is not None
        for path in changes.replaced(self.synced):
            for offset, length in self._cluster_ranges(self.synced[path].chain):
                self.overlay.pin(offset, length, self._generated)

    def _host(self, path: str) -> str:
        """The host path of a volume path: one checked component per level,
        joined under DIR, so nothing is ever written outside it."""
        return os.path.join(self.image.tree.root_path, *path.split("/"))

    def _apply(self, changes: writeback.Changes) -> None:
        for path in changes.remove_files:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._host(path))
        staged = self._stage_moves(changes.moves)
        for path in changes.remove_dirs:
            try:
                os.rmdir(self._host(path))
            except FileNotFoundError:
                pass
            except OSError as exc:     # host files FAT does not show are left alone
                log.warning("fat: cannot remove %s: %s", self._host(path), exc.strerror)
        for path in changes.make_dirs:
            os.makedirs(self._host(path), exist_ok=True)
        for temporary, new_path, node in staged:
            os.replace(temporary, new_path)
            if node is not None:
                node.path = new_path   # the view keeps reading the file there
        for item in changes.write_files:
            writeback.write_host_file(self.image.tree.root_path, item, self._file_content)
        if not changes.empty():
            log.info("fat: %s: %d written, %d moved, %d removed, %d directories made",
                     self.image.tree.root_path, len(changes.write_files),
                     len(changes.moves), len(changes.remove_files), len(changes.make_dirs))

    def _stage_moves(self, moves: list[tuple[str, str]],
                     ) -> list[tuple[str, str, HostNode | None]]:
        """First step of renaming files: each source to a temporary name in
        its target's directory (so that swaps and cycles lose nothing), with
        the snapshot node that reads it, if any."""
        by_path = {node.path: node for node in self.image.nodes if not node.is_dir}
        staged = []
        for number, (source, target) in enumerate(moves):
            new_path = self._host(target)
            os.makedirs(os.path.dirname(new_path), exist_ok=True)
            temporary = os.path.join(os.path.dirname(new_path),
                                     f".imgfs-{os.getpid()}-move-{number}")
            os.rename(self._host(source), temporary)
            staged.append((temporary, new_path, by_path.get(self._host(source))))
        return staged

    def _file_content(self, item: writeback.FatFile) -> Iterator[bytes]:
        remaining = item.size
        for offset, length in self._cluster_ranges(item.chain):
            while length and remaining:
                step = min(length, remaining, 1 << 20)
                yield self._view(offset, step)
                offset, length, remaining = offset + step, length - step, remaining - step


def _slicer(data: bytes) -> Producer:
    return lambda offset, length: data[offset:offset + length]


def _host_changed(node: HostNode, what: str) -> ImgfsError:
    return ImgfsError(f"fat: host file {node.path} {what} since the disk was "
                      "opened; its clusters read as I/O errors", errno_=errno.EIO)
