"""The snapshot of a host directory that a virtual FAT disk shows.

The tree is walked once, at open: names, sizes, times, permissions and
inode numbers, never file contents.  What FAT cannot show is skipped with a
warning naming it: symlinks that leave the directory (or loop back into an
ancestor), special files (devices, FIFOs, sockets), files over 4 GiB - 1,
names FAT cannot hold, and names equal to another one but for case (FAT
names are case-insensitive; the first in code-point order is kept).
"""
from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass, field

from imgfs.errors import InvalidImage, from_oserror

from .dirent import lfn_slots, name_problem
from .layout import MAX_DIR_ENTRIES, MAX_FILE_SIZE

log = logging.getLogger("imgfs.fat")


class HostNode:
    """One file or directory of the snapshot."""

    __slots__ = ("name", "path", "is_dir", "size", "mtime", "atime", "mode",
                 "device", "inode", "parent", "children", "slots",
                 "first_cluster", "cluster_count")

    def __init__(self, name: str, path: str, info: os.stat_result, parent: int) -> None:
        self.name = name
        self.path = path
        self.is_dir = stat.S_ISDIR(info.st_mode)
        self.size = 0 if self.is_dir else info.st_size
        self.mtime = info.st_mtime
        self.atime = info.st_atime
        self.mode = info.st_mode
        self.device = info.st_dev
        self.inode = info.st_ino
        self.parent = parent
        #: indices of the children (directories only), in directory order
        self.children: list[int] = []
        #: directory entries this node takes in its parent (long name + 1)
        self.slots = lfn_slots(name) + 1 if parent >= 0 else 0
        self.first_cluster = 0
        self.cluster_count = 0


@dataclass
class HostTree:
    """Every node, the root first; parents always come before children."""

    root_path: str
    nodes: list[HostNode] = field(default_factory=list)
    #: "path: reason" for everything left out
    skipped: list[str] = field(default_factory=list)

    def skip(self, path: str, reason: str) -> None:
        self.skipped.append(f"{path}: {reason}")
        log.warning("fat: skipping %s: %s", path, reason)

    def dir_entry_count(self, index: int, *, is_root: bool, label: bool) -> int:
        """32-byte entries the directory holds ('.', '..', label, children)."""
        node = self.nodes[index]
        fixed = (1 if label else 0) if is_root else 2
        return fixed + sum(self.nodes[child].slots for child in node.children)


def scan_tree(root: str) -> HostTree:
    """Walk `root` once and return its snapshot (see the module docstring)."""
    try:
        info = os.stat(root)
    except OSError as exc:
        raise from_oserror(exc, root) from None
    if not stat.S_ISDIR(info.st_mode):
        raise InvalidImage(f"{root} is not a directory")
    real_root = os.path.realpath(root)
    tree = HostTree(root)
    tree.nodes.append(HostNode("", root, info, -1))
    # Each pending directory carries the real paths of its ancestors (to
    # refuse symlink loops).
    pending: list[tuple[int, frozenset[str]]] = [(0, frozenset({real_root}))]
    while pending:
        index, ancestors = pending.pop()
        for child in _scan_dir(tree, index, real_root, ancestors):
            real = os.path.realpath(tree.nodes[child].path)
            pending.append((child, ancestors | {real}))
    return tree


def _scan_dir(tree: HostTree, index: int, real_root: str,
              ancestors: frozenset[str]) -> list[int]:
    """Add the children of directory `index`; return the subdirectories."""
    parent = tree.nodes[index]
    try:
        with os.scandir(parent.path) as listing:
            entries = sorted(listing, key=lambda entry: entry.name)
    except OSError as exc:
        tree.skip(parent.path, f"cannot list ({exc.strerror})")
        return []
    seen: set[str] = set()
    subdirs = []
    for entry in entries:
        info = _admit(tree, entry, real_root, ancestors, seen)
        if info is None:
            continue
        child = len(tree.nodes)
        tree.nodes.append(HostNode(entry.name, entry.path, info, index))
        parent.children.append(child)
        if stat.S_ISDIR(info.st_mode):
            subdirs.append(child)
    used = tree.dir_entry_count(index, is_root=index == 0, label=True)
    if used > MAX_DIR_ENTRIES:
        raise InvalidImage(f"{parent.path}: {used} directory entries needed, FAT allows "
                           f"{MAX_DIR_ENTRIES} per directory")
    subdirs.reverse()              # popped from a stack: keep directory order
    return subdirs


def _admit(tree: HostTree, entry: os.DirEntry[str], real_root: str,
           ancestors: frozenset[str], seen: set[str]) -> os.stat_result | None:
    """The stat of an entry the FAT view shows, or None (with a warning)."""
    try:
        name_fault = name_problem(entry.name)
    except UnicodeError:
        name_fault = "is not valid Unicode"
    if name_fault is not None:
        tree.skip(entry.path, f"name {name_fault}")
        return None
    try:
        info: os.stat_result | None = entry.stat(follow_symlinks=False)
        if info is not None and stat.S_ISLNK(info.st_mode):
            info = _follow_link(tree, entry.path, real_root, ancestors)
        if info is None:
            return None
    except OSError as exc:
        tree.skip(entry.path, exc.strerror or str(exc))
        return None
    if not (stat.S_ISDIR(info.st_mode) or stat.S_ISREG(info.st_mode)):
        tree.skip(entry.path, "not a regular file or directory")
        return None
    if stat.S_ISREG(info.st_mode) and info.st_size > MAX_FILE_SIZE:
        tree.skip(entry.path, f"{info.st_size} bytes, more than FAT's 4 GiB - 1")
        return None
    folded = entry.name.upper()
    if folded in seen:
        tree.skip(entry.path, "another name differs only in case (FAT ignores case)")
        return None
    seen.add(folded)
    return info


def _follow_link(tree: HostTree, path: str, real_root: str,
                 ancestors: frozenset[str]) -> os.stat_result | None:
    """The target's stat when a symlink stays inside the tree and is no loop."""
    real = os.path.realpath(path)
    if real != real_root and not real.startswith(real_root.rstrip("/") + "/"):
        tree.skip(path, "symlink pointing outside the directory")
        return None
    if real in ancestors:
        tree.skip(path, "symlink looping back to a parent directory")
        return None
    try:
        return os.stat(path)
    except OSError as exc:
        tree.skip(path, f"dangling symlink ({exc.strerror})")
        return None
