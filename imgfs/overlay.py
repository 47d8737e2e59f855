"""Write overlays: ``-o snapshot`` (QEMU's ``-snapshot``) and ``-o overlay=FILE``.

Both are qcow2 images whose backing node is the image being mounted, opened
read-only (a shared lock: other readers may use it meanwhile).  Writes go
to the overlay; everything the overlay does not hold is read from the image
below by the core's backing rule, for every format alike.  The image is
attached to the overlay directly, not named and opened a second time.

* ``snapshot``: a temporary overlay that names no backing file, unlinked as
  soon as it is open, so nothing is left behind whatever happens.
* ``overlay=FILE``: an ordinary qcow2 that names the image as its backing
  file, with its format, as ``qemu-img create -b IMAGE -F FMT`` writes it
  (so ``qemu-img commit FILE`` merges it and QEMU boots from it).  It is
  created when missing and reused when it names this same image; one naming
  another image is refused.
"""
from __future__ import annotations

import os
import tempfile

from .errors import ImgfsError, InvalidImage, UsageError
from .graph import create_image, open_image, resolve_relative
from .node import Node, OpenContext
from .registry import protocol_for


async def snapshot_overlay(base: Node) -> Node:
    directory = os.environ.get("TMPDIR") or "/var/tmp"
    handle, path = tempfile.mkstemp(prefix="imgfs-snapshot-", suffix=".qcow2", dir=directory)
    os.close(handle)
    ctx = OpenContext(read_only=False, locking="off", cache=base.ctx.cache)
    try:
        await create_image(path, "qcow2", base.size, {}, ctx)
        overlay = await open_overlay(path, ctx)
    finally:
        os.unlink(path)
    overlay.filename = base.filename
    return attach(overlay, base)


async def persistent_overlay(base: Node, path: str, source: str, backing_name: str, *,
                             read_only: bool) -> Node:
    """``-o overlay=FILE`` over `base` (opened from `source`).  `backing_name`
    is what a new overlay records as its backing file."""
    ctx = OpenContext(read_only=read_only, locking=base.ctx.locking, cache=base.ctx.cache)
    if not os.path.lexists(path):
        if read_only:
            raise UsageError(f"overlay {path} does not exist (a read-only mount does not "
                             "create it)")
        try:
            await create_image(path, "qcow2", base.size,
                               {"backing_file": backing_name, "backing_fmt": base.format_name},
                               ctx, unsafe=True)
        except ImgfsError as exc:
            exc.path = exc.path or path
            raise
    overlay = await open_overlay(path, ctx)
    try:
        check_backing(overlay, base, source)
    except BaseException:
        await overlay.aclose()
        raise
    return attach(overlay, base)


async def open_overlay(path: str, ctx: OpenContext) -> Node:
    """The qcow2 at `path`, without opening the backing file it names."""
    return await open_image(path, ctx, fmt="qcow2", options={"backing": None})


def attach(overlay: Node, base: Node) -> Node:
    overlay.driver.children["backing"] = base
    return overlay


def check_backing(overlay: Node, base: Node, source: str) -> None:
    """Refuse an overlay that names another image (or none) as its backing."""
    ref = overlay.driver.child_refs().get("backing")
    if ref is None:
        raise InvalidImage("names no backing file: not an overlay of "
                           f"{source} (remove it or name another overlay file)",
                           path=overlay.filename)
    named = resolve_relative(ref.filename, overlay.file or overlay)
    if not isinstance(named, str) or not same_image(named, source):
        raise InvalidImage(f"is an overlay of {ref.filename}, not of {source}",
                           path=overlay.filename)
    if ref.fmt is not None and ref.fmt != base.format_name:
        raise InvalidImage(f"names its backing file as a {ref.fmt} image, but {source} "
                           f"is {base.format_name}", path=overlay.filename)


def same_image(named: str, source: str) -> bool:
    if is_local_path(named) and is_local_path(source):
        try:
            return os.path.samefile(named, source)
        except OSError:
            return False
    return named == source


def is_local_path(name: str) -> bool:
    return not name.startswith("json:") and protocol_for(name) is None


def backing_name(typed: str, absolute: str, overlay: str) -> str:
    """The backing file name a new overlay records for the SOURCE typed as
    `typed`: a relative path stays relative, to the overlay's directory (as
    QEMU resolves it), so that the pair can move together; anything else
    (an absolute path, a URL, json:) is written as it is."""
    if is_local_path(typed) and not os.path.isabs(typed):
        return os.path.relpath(absolute, os.path.dirname(os.path.abspath(overlay)))
    return absolute
