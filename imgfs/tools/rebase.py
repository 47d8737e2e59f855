"""`imgfs rebase`: give an image a new backing file (qemu-img rebase).

Safe mode keeps what the image reads as: every range the image does not
hold itself and where the old backing chain and the new backing file read
differently is copied into the image first, then the backing name (and
format) in its metadata is rewritten.  Unsafe mode (`-u`) only rewrites
the name; the old backing file is not even opened.  An empty name removes
the backing file (safe mode then copies in everything that is not zero).
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from imgfs.block import Status
from imgfs.errors import ImgfsError
from imgfs.graph import resolve_relative
from imgfs.node import Node

from .progress import Progress

#: bytes compared at a time, and the unit written where they differ
CHUNK = 1024 * 1024
GRANULE = 64 * 1024

#: open_node(filename, fmt, read_only, with_backing)
Opener = Callable[["str | dict[str, Any]", "str | None", bool, bool], Awaitable[Node]]


async def rebase(filename: str, fmt: str | None, backing: str, backing_fmt: str | None, *,
                 unsafe: bool, progress: Progress, open_node: Opener) -> None:
    if backing and not backing_fmt:
        raise ImgfsError(f"Could not change the backing file to '{backing}': "
                         "backing format must be specified", path=filename)
    image = await open_node(filename, fmt, False, not unsafe)
    try:
        if not unsafe:
            await _copy_differences(image, backing, backing_fmt, progress, open_node)
        try:
            await image.set_backing(backing or None, backing_fmt if backing else None)
        except ImgfsError as exc:
            raise type(exc)(f"Could not change the backing file to '{backing}': {exc}",
                            path=filename) from None
        await image.flush()
    finally:
        await image.aclose()


async def _copy_differences(image: Node, backing: str, backing_fmt: str | None,
                            progress: Progress, open_node: Opener) -> None:
    new_backing = None
    if backing:
        path = resolve_relative(backing, image.file or image)
        try:
            new_backing = await open_node(path, backing_fmt, True, True)
        except ImgfsError as exc:
            raise type(exc)(f"Could not open new backing file '{backing}': {exc}",
                            path=image.filename) from None
    try:
        progress.total = image.size
        offset = 0
        while offset < image.size:
            extent = await image.block_status(offset, min(CHUNK, image.size - offset))
            if not extent.status & Status.ALLOCATED:
                await _copy_range(image, new_backing, offset, extent.length)
            offset += extent.length
            progress.update(offset)
        progress.done()
    finally:
        if new_backing is not None:
            await new_backing.aclose()


async def _copy_range(image: Node, new_backing: Node | None, offset: int, length: int) -> None:
    """Write into `image` the GRANULE pieces where old and new backing differ."""
    old = await image.read_unallocated(offset, length)
    new = await read_padded(new_backing, offset, length)
    for start in range(0, length, GRANULE):
        piece = old[start:start + GRANULE]
        if piece != new[start:start + GRANULE]:
            await image.write(offset + start, piece)


async def read_padded(node: Node | None, offset: int, length: int) -> bytes:
    """`length` bytes of `node` at `offset`, zeros past its end (or for None)."""
    if node is None or offset >= node.size:
        return bytes(length)
    available = min(length, node.size - offset)
    data = await node.read(offset, available)
    return data + bytes(length - available)
