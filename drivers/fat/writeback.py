"""rw mode: reading back the FAT a guest wrote, and applying it to the host.

Writes never touch the host directly: they land in an overlay (a temporary
file plus the set of 4 KiB blocks written), and the raw view is the overlay
over the generated disk.  On flush and at close the volume is parsed back
(boot sector, FAT, every directory, long names) and checked: cluster numbers
in range, chains that end, no cluster in two chains, chain lengths that
match file sizes, names that are single path components.  Only a volume
that passes is compared with the last state applied, and the differences
are made on the host: new and changed files are written to a temporary file
in their directory and renamed into place (atomic per file), files and
directories gone from the volume are removed, new directories created.
Nothing is written outside DIR: every name is one path component joined to
it.  A volume that does not pass is refused as a whole (the host is left as
it was, the error is logged) and the view keeps what the guest wrote.

Spec: libyal/libfsfat ``documentation/File Allocation Table (FAT)
format.asciidoc`` (directory entries, VFAT long names, FAT entries).
"""
from __future__ import annotations

import os
import struct
import time
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from imgfs.errors import CorruptImage

from . import dirent, layout

#: NT case flags in a short entry's byte 12: base / extension in lower case
CASE_LOWER_BASE = 0x08
CASE_LOWER_EXT = 0x10
DELETED = 0xE5
KANJI_E5 = 0x05                    # a first byte of 0xE5 stored as 0x05

Reader = Callable[[int, int], bytes]


@dataclass(frozen=True)
class FatFile:
    """One file or directory as the guest's FAT describes it."""

    path: str                      # '/'-separated, relative to the volume root
    is_dir: bool
    size: int
    chain: tuple[int, ...]         # its clusters, in order
    write_time: int = 0
    write_date: int = 0


def _short_text(entry: dirent.DirEntry) -> str:
    base = entry.name.rstrip(b" ")
    if base[:1] == bytes((KANJI_E5,)):
        base = b"\xe5" + base[1:]
    extension = entry.extension.rstrip(b" ")
    text_base = base.decode("cp437")
    text_ext = extension.decode("cp437")
    if entry.case_flags & CASE_LOWER_BASE:
        text_base = text_base.lower()
    if entry.case_flags & CASE_LOWER_EXT:
        text_ext = text_ext.lower()
    return f"{text_base}.{text_ext}" if text_ext else text_base


def _check_component(name: str, where: str) -> str:
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise CorruptImage(f"invalid name {name!r} in {where or '/'}")
    return name


class VolumeReader:
    """Parse a FAT volume through `read` (disk offsets) with a known geometry."""

    def __init__(self, read: Reader, volume: layout.Volume, base: int) -> None:
        self.read = read
        self.volume = volume
        self.base = base
        self.fat = self._load_fat()
        self.claimed: set[int] = set()

    def _load_fat(self) -> array:
        volume = self.volume
        raw = self.read(self.base + volume.first_fat_sector * layout.SECTOR_SIZE,
                        volume.fat_sectors * layout.SECTOR_SIZE)
        count = volume.cluster_count + 2
        if volume.fat_type == 12:
            values = array("I")
            for index in range(count):
                pair = raw[index * 3 // 2] | raw[index * 3 // 2 + 1] << 8
                values.append(pair >> 4 if index & 1 else pair & 0xFFF)
            return values
        values = array("I", struct.unpack_from(
            f"<{count}{'H' if volume.fat_type == 16 else 'I'}", raw))
        if volume.fat_type == 32:
            values = array("I", (value & 0x0FFFFFFF for value in values))
        return values

    def chain(self, first: int, where: str) -> tuple[int, ...]:
        """The clusters from `first` to end-of-chain; each may be used once."""
        if first == 0:
            return ()
        end_mark = layout.END_OF_CHAIN[self.volume.fat_type] & ~7
        last_cluster = self.volume.cluster_count + 1
        clusters = []
        cluster = first
        while True:
            if not 2 <= cluster <= last_cluster:
                raise CorruptImage(f"{where}: cluster {cluster} out of range")
            if cluster in self.claimed:
                raise CorruptImage(f"{where}: cluster {cluster} is used twice (cross-linked)")
            self.claimed.add(cluster)
            clusters.append(cluster)
            following = self.fat[cluster]
            if following >= end_mark:
                return tuple(clusters)
            if following in (0, 1) or following >= end_mark - 8:
                raise CorruptImage(f"{where}: chain broken at cluster {cluster} "
                                   f"(FAT entry {following:#x})")
            cluster = following

    def _cluster_bytes(self, chain: tuple[int, ...]) -> bytes:
        size = self.volume.cluster_size
        return b"".join(self.read(self.base + self.volume.cluster_sector(cluster)
                                  * layout.SECTOR_SIZE, size) for cluster in chain)

    def root_entries(self) -> bytes:
        volume = self.volume
        if volume.fat_type == 32:
            return self._cluster_bytes(self.chain(layout.ROOT_CLUSTER_FAT32, "/"))
        return self.read(self.base + volume.root_dir_sector * layout.SECTOR_SIZE,
                         volume.root_entries * layout.DIR_ENTRY_SIZE)

    def walk(self) -> dict[str, FatFile]:
        """Every file and directory of the volume by path."""
        found: dict[str, FatFile] = {}
        pending = [("", self.root_entries())]
        while pending:
            where, data = pending.pop()
            for entry, name in self._entries(data, where):
                path = f"{where}/{name}" if where else name
                is_dir = bool(entry.attributes & dirent.ATTR_DIRECTORY)
                first = entry.cluster_high << 16 | entry.cluster_low \
                    if self.volume.fat_type == 32 else entry.cluster_low
                chain = self.chain(first, path)
                record = FatFile(path, is_dir, 0 if is_dir else entry.size, chain,
                                 entry.write_time, entry.write_date)
                if not is_dir:
                    needed = layout.ceil_div(entry.size, self.volume.cluster_size)
                    if len(chain) != needed:
                        raise CorruptImage(f"{path}: {entry.size} bytes but a chain of "
                                           f"{len(chain)} clusters")
                elif not chain:
                    raise CorruptImage(f"{path}: directory without clusters")
                else:
                    pending.append((path, self._cluster_bytes(chain)))
                found[path] = record
        return found

    def _entries(self, data: bytes, where: str) -> list[tuple[dirent.DirEntry, str]]:
        """(short entry, name) of each live entry, long names resolved."""
        result = []
        seen: set[str] = set()
        long_parts: dict[int, bytes] = {}
        long_sum = -1
        for offset in range(0, len(data) - 31, layout.DIR_ENTRY_SIZE):
            first = data[offset]
            if first == 0:
                break
            if first == DELETED:
                long_parts.clear()
                continue
            if data[offset + 11] & 0x3F == dirent.ATTR_LONG_NAME:
                lfn = dirent.LfnEntry.unpack(data[offset:offset + 32])
                if lfn.sequence & dirent.LFN_LAST:
                    long_parts.clear()
                long_parts[lfn.sequence & 0x1F] = lfn.part1 + lfn.part2 + lfn.part3
                long_sum = lfn.checksum
                continue
            entry = dirent.DirEntry.unpack(data[offset:offset + 32])
            long_name = _long_name(long_parts) if long_sum == dirent.lfn_checksum(
                entry.name + entry.extension) else None
            long_parts.clear()
            if entry.attributes & dirent.ATTR_VOLUME_ID or entry.name in (b".       ",
                                                                         b"..      "):
                continue
            name = _check_component(long_name or _short_text(entry), where)
            if name.upper() in seen:
                raise CorruptImage(f"{where or '/'}: two entries named {name!r}")
            seen.add(name.upper())
            result.append((entry, name))
        return result


def _long_name(parts: dict[int, bytes]) -> str | None:
    if not parts or sorted(parts) != list(range(1, len(parts) + 1)):
        return None
    units = b"".join(parts[number] for number in sorted(parts))
    for index in range(0, len(units), 2):
        if units[index:index + 2] == b"\0\0":
            units = units[:index]
            break
    try:
        return units.decode("utf-16-le")
    except UnicodeDecodeError:
        return None


# -- applying a parsed volume to the host -----------------------------------------


@dataclass
class Changes:
    remove_files: list[str]
    remove_dirs: list[str]
    make_dirs: list[str]
    write_files: list[FatFile]
    #: (old path, new path) of files that only changed name or directory
    moves: list[tuple[str, str]] = field(default_factory=list)

    def empty(self) -> bool:
        return not (self.remove_files or self.remove_dirs or self.make_dirs or
                    self.write_files or self.moves)

    def replaced(self, old: dict[str, FatFile]) -> list[str]:
        """Old files whose host file is removed or overwritten (not moved)."""
        sources = {source for source, _ in self.moves}
        paths = self.remove_files + [item.path for item in self.write_files] + \
            [target for _, target in self.moves]
        return [path for path in paths if path in old and not old[path].is_dir and
                path not in sources]


def plan_changes(old: dict[str, FatFile], new: dict[str, FatFile],
                 dirty: Callable[[tuple[int, ...]], bool]) -> Changes:
    """What turns the host from `old` into `new` (pure; `dirty` says
    whether any of a chain's clusters was written since `old`)."""
    def unchanged(path: str) -> bool:
        before, after = old.get(path), new[path]
        return before is not None and not before.is_dir and not after.is_dir and \
            before.chain == after.chain and before.size == after.size and \
            not dirty(after.chain)

    remove_files = sorted(path for path, item in old.items() if not item.is_dir and
                          (path not in new or new[path].is_dir))
    remove_dirs = sorted((path for path, item in old.items() if item.is_dir and
                          (path not in new or not new[path].is_dir)),
                         key=lambda path: -path.count("/"))
    make_dirs = sorted((path for path, item in new.items() if item.is_dir and
                        (path not in old or not old[path].is_dir)),
                       key=lambda path: path.count("/"))
    write_files = [item for path, item in sorted(new.items())
                   if not item.is_dir and not unchanged(path)]
    changes = Changes(remove_files, remove_dirs, make_dirs, write_files)
    _find_moves(changes, old, dirty)
    return changes


def _find_moves(changes: Changes, old: dict[str, FatFile],
                dirty: Callable[[tuple[int, ...]], bool]) -> None:
    """A file whose clusters, untouched, now sit under another name, while
    its old name is gone or holds something else, was renamed or moved:
    rename it on the host instead of copying it."""
    rewritten = {item.path for item in changes.write_files}
    sources = {old[path].chain: path for path in changes.remove_files + sorted(rewritten)
               if path in old and not old[path].is_dir and old[path].chain}
    kept = []
    for item in changes.write_files:
        source = sources.pop(item.chain, None)
        if source is not None and old[source].size == item.size and not dirty(item.chain):
            changes.moves.append((source, item.path))
            if source in changes.remove_files:
                changes.remove_files.remove(source)
        else:
            if source is not None:
                sources[item.chain] = source
            kept.append(item)
    changes.write_files = kept


def fat_mtime(item: FatFile) -> float | None:
    """The host time of the entry's FAT write stamp (local time), if valid."""
    date, stamp = item.write_date, item.write_time
    month, day = date >> 5 & 0xF, date & 0x1F
    if not (1 <= month <= 12 and 1 <= day <= 31):
        return None
    fields = ((date >> 9) + 1980, month, day, stamp >> 11, stamp >> 5 & 0x3F,
              (stamp & 0x1F) * 2, 0, 0, -1)
    try:
        return time.mktime(fields)
    except (OverflowError, ValueError):
        return None


def write_host_file(root: str, item: FatFile,
                    content: Callable[[FatFile], Iterable[bytes]]) -> None:
    """Write `item` to a temporary file beside its target, then rename it
    over the target: a reader of the host sees the old file or the new one."""
    target = os.path.join(root, *item.path.split("/"))
    directory = os.path.dirname(target)
    temporary = os.path.join(directory, f".imgfs-{os.getpid()}-{os.path.basename(target)}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        for chunk in content(item):
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(temporary)
        raise
    os.close(fd)
    mtime = fat_mtime(item)
    if mtime is not None:
        os.utime(temporary, (mtime, mtime))
    os.replace(temporary, target)


# -- the overlay of guest writes ---------------------------------------------------

#: granularity of the overlay (the driver's request alignment in rw mode)
BLOCK_SIZE = 4096


class Overlay:
    """Blocks the guest wrote, kept in an unlinked temporary file."""

    def __init__(self) -> None:
        import tempfile
        handle = tempfile.TemporaryFile(prefix="imgfs-fat-")
        self.fd = os.dup(handle.fileno())
        handle.close()
        #: every block ever written (served from the overlay)
        self.written: set[int] = set()
        #: blocks written since the host was last brought up to date
        self.dirty: set[int] = set()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def write(self, offset: int, data: bytes, *, dirty: bool = True) -> None:
        """Store whole blocks (the core aligns requests to BLOCK_SIZE)."""
        done = 0
        while done < len(data):
            done += os.pwrite(self.fd, data[done:], offset + done)
        first, count = offset // BLOCK_SIZE, len(data) // BLOCK_SIZE
        blocks = range(first, first + count)
        self.written.update(blocks)
        if dirty:
            self.dirty.update(blocks)

    def read(self, offset: int, length: int, generated: Reader) -> bytes:
        """The view: written blocks from the overlay, the rest generated."""
        parts = []
        end = offset + length
        while offset < end:
            block = offset // BLOCK_SIZE
            is_written = block in self.written
            stop = min(end, (block + 1) * BLOCK_SIZE)
            while stop < end and ((stop // BLOCK_SIZE) in self.written) == is_written:
                stop = min(end, stop + BLOCK_SIZE)
            if is_written:
                parts.append(os.pread(self.fd, stop - offset, offset).ljust(stop - offset,
                                                                            b"\0"))
            else:
                parts.append(generated(offset, stop - offset))
            offset = stop
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def pin(self, offset: int, length: int, generated: Reader) -> None:
        """Copy generated blocks into the overlay (not dirty), before the host
        files they are generated from change."""
        first, last = offset // BLOCK_SIZE, (offset + length - 1) // BLOCK_SIZE
        for block in range(first, last + 1):
            if block not in self.written:
                self.write(block * BLOCK_SIZE, generated(block * BLOCK_SIZE, BLOCK_SIZE),
                           dirty=False)
