"""The throw-away write overlay of ``-o snapshot`` (QEMU's ``-snapshot``).

As QEMU does, writes go to a temporary qcow2 image whose backing node is the
image being mounted, opened read-only.  The overlay file is unlinked as soon
as it is open, so nothing is left behind whatever happens to the process;
everything the overlay does not hold is read from the image below by the
core's backing rule, for every format alike.
"""
from __future__ import annotations

import os
import tempfile

from .graph import create_image, open_image
from .node import Node, OpenContext


async def snapshot_overlay(base: Node) -> Node:
    directory = os.environ.get("TMPDIR") or "/var/tmp"
    handle, path = tempfile.mkstemp(prefix="imgfs-snapshot-", suffix=".qcow2", dir=directory)
    os.close(handle)
    ctx = OpenContext(read_only=False, locking="off", cache=base.ctx.cache)
    try:
        await create_image(path, "qcow2", base.size, {}, ctx)
        overlay = await open_image(path, ctx, fmt="qcow2")
    finally:
        os.unlink(path)
    # The overlay names no backing file: the already open image is attached
    # directly, so it is not opened (and locked) a second time.
    overlay.driver.children["backing"] = base
    overlay.filename = base.filename
    return overlay
