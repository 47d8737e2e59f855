"""`imgfs commit`: merge an image into a backing file (qemu-img commit).

Every range held by a layer above the base (the top image and any image
between it and the base) is written into the base: data as data, zero
ranges as zeros.  The base grows first if it is smaller.  Then, unless
asked to keep it (`-d`, implied by `-b`), the top image is emptied so that
it reads through to the base, as qemu-img leaves it.

The copy reads through the top image's chain, opened read-only and
sharing its locks, while the base is opened a second time for writing;
nothing the copy reads comes from the base, so the read-only view of the
base never sees its own stale state.
"""
from __future__ import annotations

import os
from collections.abc import Awaitable, Callable

from imgfs.block import Status
from imgfs.errors import ImgfsError
from imgfs.node import Node

from .progress import Progress

#: bytes copied at a time
CHUNK = 2 * 1024 * 1024

Opener = Callable[[str, "str | None", bool], Awaitable[Node]]


def same_file(first: str, second: str) -> bool:
    try:
        return os.path.samefile(first, second)
    except OSError:
        return os.path.realpath(first) == os.path.realpath(second)


def find_base(top: Node, base_name: str | None, top_name: str) -> tuple[Node, int]:
    """The base node and its depth below the top (1: the backing file)."""
    chain = top.chain()
    if len(chain) < 2:
        raise ImgfsError("Image does not have a backing file", path=top_name)
    if base_name is None:
        return chain[1], 1
    for depth, node in enumerate(chain[1:], start=1):
        if same_file(node.filename, base_name):
            return node, depth
    raise ImgfsError(f"Did not find '{base_name}' in the backing chain of '{top_name}'")


async def copy_above(top: Node, base: Node, depth: int, progress: Progress) -> None:
    """Write into `base` every range a layer above it (depth < `depth`) holds."""
    progress.total = top.size
    offset = 0
    while offset < top.size:
        length, status, held_at = await top.block_status_above(
            offset, min(CHUNK, top.size - offset))
        if status & Status.ALLOCATED and held_at < depth:
            if status & Status.DATA:
                await base.write(offset, await top.read(offset, length))
            else:
                await base.write_zeroes(offset, length)
        offset += length
        progress.update(offset)
    progress.done()


async def commit(top_name: str, fmt: str | None, base_name: str | None, *, keep: bool,
                 progress: Progress, open_node: Opener) -> None:
    """`open_node(filename, fmt, read_only)` opens an image (fmt None
    probes; read-only opens share their locks)."""
    top = await open_node(top_name, fmt, True)
    try:
        base_node, depth = find_base(top, base_name, top_name)
        base = await open_node(base_node.filename, base_node.format_name, False)
        try:
            if base.size < top.size:
                await base.truncate(top.size)
            await copy_above(top, base, depth, progress)
            await base.flush()
        finally:
            await base.aclose()
    finally:
        await top.aclose()
    if not keep and base_name is None:
        await empty_image(top_name, fmt, open_node)


async def empty_image(filename: str, fmt: str | None, open_node: Opener) -> None:
    node = await open_node(filename, fmt, False)
    try:
        await node.make_empty()
        await node.flush()
    except ImgfsError as exc:
        exc.path = exc.path or filename
        raise
    finally:
        await node.aclose()
