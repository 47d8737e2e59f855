"""Where a differencing VDI's parent is: found by its UUID.

A VirtualBox snapshot names its parent only by UUID (uuidLinkage); the
file lives beside it, or (for the first snapshot of a VM) in the VM's
folder above its ``Snapshots/`` folder.  The search reads the 512-byte
header of each ``.vdi`` file there; the core then opens the one found.
"""
from __future__ import annotations

import contextlib
import os

from imgfs.errors import InvalidImage, NotFound

from .layout import HEADER, Header, probe, uuid_text

#: VirtualBox's folder of differencing images inside a VM's folder
SNAPSHOTS = "snapshots"
HOW_TO_NAME = "name it with -o backing.file.filename=PARENT"


def search_folders(child: str) -> list[str]:
    """The child's folder, and the VM folder above a ``Snapshots/`` folder."""
    folder = os.path.dirname(os.path.abspath(child))
    folders = [folder]
    if os.path.basename(folder).lower() == SNAPSHOTS:
        folders.append(os.path.dirname(folder))
    return folders


def image_uuid(path: str) -> bytes | None:
    """The image UUID of a VDI file, None for anything else."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        head = os.pread(fd, HEADER.size, 0)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(head) < HEADER.size or not probe(head, path):
        return None
    return Header.unpack(head).uuid_image


def find_parent(child: str, link: bytes) -> str:
    """The parent's file name, relative to the child's folder."""
    child_folder = os.path.dirname(os.path.abspath(child))
    matches = []
    for folder in search_folders(child):
        with contextlib.suppress(OSError):
            for entry in sorted(os.scandir(folder), key=lambda item: item.name):
                if not entry.name.lower().endswith(".vdi") or not entry.is_file():
                    continue
                if os.path.samefile(entry.path, child):
                    continue
                if image_uuid(entry.path) == link:
                    matches.append(os.path.relpath(entry.path, child_folder))
    if not matches:
        looked = " and ".join(search_folders(child))
        raise NotFound(f"parent VDI {{{uuid_text(link)}}} not found in {looked}; "
                       f"{HOW_TO_NAME}")
    if len(matches) > 1:
        raise InvalidImage(f"several images are the parent VDI {{{uuid_text(link)}}} "
                           f"({', '.join(matches)}); {HOW_TO_NAME}")
    return matches[0]
