"""Opening and creating images: option trees become a graph of `Node`s.

The rules that make imgfs behave like QEMU live here: a tree without a
``driver`` probes its format (raw only when nothing else claims the file),
backing and data files named inside an image are opened by the core,
relative to the image's own location and read-only, and the read-only
decision is made once for the whole graph before any lock is taken.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

from .block import BlockDriver, ChildRef, Kind
from .errors import (
    CorruptImage,
    ImgfsError,
    NotFound,
    OptionRefused,
    PermissionDenied,
    Unsupported,
    UsageError,
)
from .node import Node, OpenContext
from .registry import directory_image, get_driver, probe_format, protocol_for
from .signatures import HEAD_BYTES, TAIL_BYTES
from .source import SOURCE_KEY, child_tree, parse_source, protocol_tree, with_options

log = logging.getLogger("imgfs")

#: keys of a tree that belong to the core, not to the driver's schema
CORE_KEYS = frozenset({"driver", "file", "backing", "data-file", "node-name",
                       "read-only", "auto-read-only", "discard", "detect-zeroes",
                       SOURCE_KEY})
#: a backing chain deeper than this is treated as a loop
MAX_CHAIN_DEPTH = 64
#: image sizes are whole sectors of this many bytes, as in QEMU
SECTOR = 512


async def open_image(source: str | Mapping[str, Any], ctx: OpenContext, *,
                     fmt: str | None = None,
                     options: Mapping[str, Any] | None = None) -> Node:
    """Open SOURCE (filename, URL, json:, or a tree) with its whole chain."""
    tree = parse_source(source) if isinstance(source, str) else dict(source)
    if options:
        tree = with_options(tree, options)
    if fmt is not None:
        tree = _force_format(tree, fmt)
    node = await open_tree(tree, ctx, read_only=bool(ctx.read_only))
    try:
        _decide_read_only(node, ctx)
        await node.activate()
    except BaseException:
        await node.aclose()
        raise
    return node


def _force_format(tree: dict[str, Any], fmt: str) -> dict[str, Any]:
    given = tree.get("driver")
    cls = get_driver(fmt)
    if cls.kind is Kind.PROTOCOL:
        # format=nbd and friends: the protocol node itself is the image
        leaf = tree.get("file", tree)
        leaf = child_tree(leaf, leaf=True) if not isinstance(leaf, dict) else dict(leaf)
        leaf.setdefault("driver", fmt)
        return leaf
    if given is not None and given != fmt:
        raise UsageError(f"format '{fmt}' conflicts with driver '{given}' of the source")
    return {**tree, "driver": fmt}


def _decide_read_only(node: Node, ctx: OpenContext) -> None:
    """Read-write unless asked otherwise; like mount(8), a source that cannot
    be written is opened read-only with a warning unless rw was explicit."""
    read_only = ctx.read_only
    unwritable = [leaf for leaf in _data_leaves(node) if not leaf.driver.writable]
    if read_only is None:
        read_only = node.driver.read_only_format or bool(unwritable)
        if unwritable and not node.driver.read_only_format and \
                not unwritable[0].driver.read_only_by_default:
            log.warning("%s: write-protected, opening read-only", unwritable[0].filename)
    if not read_only and node.driver.read_only_format:
        what = node.driver.read_only_what or f"{node.format_name} images"
        raise Unsupported(f"{what} can only be opened read-only (use -o ro)",
                          path=node.filename)
    if not read_only and unwritable:
        leaf = unwritable[0]
        raise PermissionDenied(f"{leaf.filename}: cannot open for writing "
                               f"({leaf.driver.read_only_reason})")
    node.set_read_only(read_only)


def _data_leaves(node: Node) -> list[Node]:
    """The protocol nodes that hold this node's own data (not backing)."""
    if not node.children:
        return [node]
    leaves = []
    for name, child in node.children.items():
        if name != "backing":
            leaves.extend(_data_leaves(child))
    return leaves


async def open_tree(tree: Mapping[str, Any], ctx: OpenContext, *, read_only: bool,
                    depth: int = 0) -> Node:
    """Open one tree: a protocol leaf, or a format (given or probed) over its file."""
    if depth > MAX_CHAIN_DEPTH:
        raise CorruptImage(f"backing chain deeper than {MAX_CHAIN_DEPTH} (a loop?)")
    driver_name = tree.get("driver")
    cls = get_driver(driver_name) if driver_name else None
    if (cls is None and "file" not in tree) or (cls is not None and cls.kind is Kind.PROTOCOL):
        return await open_protocol(tree, ctx, read_only=read_only, cls=cls)
    if "file" not in tree:
        raise UsageError(f"format '{driver_name}' needs a 'file' child")
    tree, file_tree = _hand_down_leaf_options(tree, cls)
    file_node = await open_tree(file_tree, ctx, read_only=read_only, depth=depth + 1)
    try:
        probed = cls is None
        if cls is None:
            cls = await probe(file_node)
        return await open_format(cls, file_node, tree, ctx, read_only=read_only,
                                 probed=probed, depth=depth)
    except BaseException:
        await file_node.aclose()
        raise


def _hand_down_leaf_options(tree: Mapping[str, Any], cls: type[BlockDriver] | None
                            ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The format's tree and its file's, with the file protocol's `leaf_opts`
    given at the top (and unknown to the format) moved down to the file."""
    file_tree = child_tree(tree["file"], leaf=True)
    leaf_name = file_tree.get("driver")
    leaf_opts = get_driver(leaf_name).leaf_opts if isinstance(leaf_name, str) else frozenset()
    moving = [key for key in tree if key in leaf_opts and key not in CORE_KEYS
              and (cls is None or cls.open_opts.get(key) is None)]
    if not moving:
        return dict(tree), file_tree
    for key in moving:
        file_tree.setdefault(key, tree[key])
    return {key: value for key, value in tree.items() if key not in moving}, file_tree


async def probe(file_node: Node) -> type[BlockDriver]:
    """The format of the file's bytes; a format imgfs recognises but cannot
    open is refused here, naming the file."""
    head, tail = await read_probe_bytes(file_node)
    try:
        return probe_format(head, file_node.filename, tail)
    except ImgfsError as exc:
        exc.path = exc.path or file_node.filename
        raise


async def read_probe_bytes(node: Node) -> tuple[bytes, bytes]:
    """What probing looks at: the first `HEAD_BYTES` of the node and its last
    `TAIL_BYTES` (where a fixed VHD keeps its only footer, a DMG its trailer)."""
    size = node.size
    head = await node.read(0, min(size, HEAD_BYTES))
    tail_start = max(0, size - TAIL_BYTES)
    if size <= HEAD_BYTES:
        return head, head[tail_start:]
    return head, await node.read(tail_start, size - tail_start)


def _driver_options(tree: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in tree.items() if key not in CORE_KEYS}


def _name_of(tree: Mapping[str, Any], cls: type[BlockDriver]) -> str:
    return str(tree.get("filename") or tree.get(SOURCE_KEY) or cls.name)


async def open_protocol(tree: Mapping[str, Any], ctx: OpenContext, *, read_only: bool,
                        cls: type[BlockDriver] | None = None) -> Node:
    if cls is None:
        filename = tree.get("filename")
        if not isinstance(filename, str) or not filename:
            raise UsageError("no filename given")
        protocol = protocol_for(filename)
        if protocol is not None and protocol != "file":
            return await open_protocol(protocol_tree(filename) | _driver_options(tree), ctx,
                                       read_only=read_only, cls=get_driver(protocol))
        cls = get_driver("file")
    filename = tree.get("filename")
    if cls is get_driver("file") and isinstance(filename, str) and os.path.isdir(filename):
        # an image stored as a directory opens through a file inside it
        tree = {**tree, "filename": directory_image(filename) or filename}
    driver = cls()
    node = Node(driver, _name_of(tree, cls), read_only, ctx)
    options = cls.open_opts.parse(_driver_options(tree), what=cls.name, sloppy=ctx.sloppy)
    await _run_open(node, options, ctx)
    return node


async def _run_open(node: Node, options: dict[str, Any], ctx: OpenContext) -> None:
    try:
        await node.driver.open(options, ctx)
    except ImgfsError as exc:
        exc.path = exc.path or node.filename
        await node.aclose()
        raise
    except (OSError, ValueError) as exc:
        await node.aclose()
        wrapped = node._wrap(exc)
        wrapped.path = node.filename
        raise wrapped from exc
    except BaseException:
        await node.aclose()
        raise


async def _open_child(name: str, spec: Mapping[str, Any], parent: Node, ctx: OpenContext,
                      *, read_only: bool, depth: int) -> Node:
    """A child the image names; a missing one is said to be the image's."""
    try:
        return await open_tree(spec, ctx, read_only=read_only, depth=depth)
    except NotFound as exc:
        exc.args = (f"{exc} (the {name} file of {parent.filename})",)
        raise


async def open_format(cls: type[BlockDriver], file_node: Node, tree: Mapping[str, Any],
                      ctx: OpenContext, *, read_only: bool, probed: bool = False,
                      depth: int = 0) -> Node:
    driver = cls()
    node = Node(driver, file_node.filename, read_only, ctx)
    node.probed = probed
    driver.children["file"] = file_node
    options = cls.open_opts.parse(_driver_options(tree), what=cls.name, sloppy=ctx.sloppy)
    await _run_open(node, options, ctx)
    try:
        for name, ref in driver.child_refs().items():
            if name in tree and tree[name] is None:
                continue            # json: {"backing": null} drops the backing file
            if name in tree and not _only_options(tree[name]):
                child_spec = child_tree(tree[name], leaf=name != "backing")
            else:
                if ref.locate is not None:
                    ref = dataclasses.replace(ref, filename=await ref.locate())
                if name == "backing" and ctx.no_backing:
                    continue
                child_spec = ref_tree(ref, file_node, leaf=name != "backing")
                if name in tree:
                    # QEMU's backing.encrypt.key-secret=ID: options for the
                    # file the image names, not a replacement for it
                    child_spec = with_options(child_spec, tree[name])
            driver.children[name] = await _open_child(name, child_spec, node, ctx,
                                                      read_only=ref.read_only or read_only,
                                                      depth=depth + 1)
        await driver.attach()
    except ImgfsError as exc:
        exc.path = exc.path or node.filename
        await node.aclose()
        raise
    except BaseException:
        await node.aclose()
        raise
    return node


#: keys that say where a node's data is (a file name, the parts of a URL)
LOCATION_KEYS = frozenset({"filename", "path", "server", "host", "dir", "export", "url",
                           SOURCE_KEY})


def _only_options(child: Any) -> bool:
    """A child tree that says nothing about where its data is: options for
    the file the image names (backing.encrypt.key-secret=ID,
    backing.file.locking=off), not a replacement for it."""
    return isinstance(child, Mapping) and not _locates(child)


def _locates(tree: Any) -> bool:
    if not isinstance(tree, Mapping):
        return True                    # a file name or a json: string
    if any(key in tree for key in LOCATION_KEYS):
        return True
    return "file" in tree and _locates(tree["file"])


def resolve_relative(name: str, file_node: Node) -> str | dict[str, Any]:
    """A name written inside an image, resolved as QEMU resolves it: relative
    to the directory of the image's own file, or to its URL (a protocol
    tree when the protocol says so)."""
    if name.startswith("json:") or protocol_for(name) is not None or os.path.isabs(name):
        return name
    location = file_node.driver.child_location(name)
    if location is not None:
        return location
    base = file_node.filename
    if protocol_for(base) is not None or base.startswith("json:"):
        return name
    return os.path.join(os.path.dirname(base), name)


def child_location_name(node: Node, name: str) -> str | None:
    """The file the child `name` that an image names would be opened from
    (qemu-img info's full-backing-filename), whether it is open or not."""
    child = node.children.get(name)
    if child is not None:
        return child.filename
    ref = node.driver.child_refs().get(name)
    if ref is None or node.file is None:
        return None
    location = resolve_relative(ref.filename, node.file)
    if isinstance(location, dict):
        return str(location.get("filename") or location.get(SOURCE_KEY) or ref.filename)
    return location


def ref_tree(ref: ChildRef, file_node: Node, *, leaf: bool) -> dict[str, Any]:
    location = resolve_relative(ref.filename, file_node)
    tree: dict[str, Any]
    if isinstance(location, dict):
        tree = location if leaf else {"file": location}
        if ref.fmt and not leaf:
            tree["driver"] = ref.fmt
    elif ref.fmt and not leaf:
        tree = {"driver": ref.fmt, "file": protocol_tree(location)}
    else:
        tree = child_tree(location, leaf=leaf)
    return with_options(tree, ref.options) if ref.options else tree


# -- creation -------------------------------------------------------------------


async def create_image(filename: str, fmt: str, size: int | None,
                       options: Mapping[str, Any], ctx: OpenContext, *,
                       unsafe: bool = False) -> dict[str, Any]:
    """Create an image; returns the parsed options (for the summary line).

    As qemu-img, the backing file is opened (to check it, and for a missing
    SIZE) unless `unsafe` (``-u``)."""
    cls = get_driver(fmt)
    if cls.create_opts is None:
        raise Unsupported(f"format '{fmt}' does not support image creation")
    with refused_as_qemu_img_refuses():
        parsed = cls.create_opts.parse(options, what=fmt)
    backing = parsed.get("backing_file")
    if size is None and not backing:
        raise UsageError("image size required")
    if backing and not unsafe:
        backing_size = await _backing_size(filename, backing, parsed.get("backing_fmt"), ctx)
        size = backing_size if size is None else size
    if size is None:
        raise UsageError("-u needs an explicit SIZE (the backing file is not opened)")
    parsed["size"] = size
    with refused_as_qemu_img_refuses():
        # As qemu-img: the summary says the size asked for, the image holds
        # whole 512-byte sectors.
        await cls.create(filename, -(-size // SECTOR) * SECTOR, parsed, ctx)
    return parsed


@contextlib.contextmanager
def refused_as_qemu_img_refuses() -> Iterator[None]:
    """An option name, value or combination a format refuses when creating
    is OptionRefused (exit 1, as qemu-img create and convert exit), not a
    malformed command line (UsageError, exit 2)."""
    try:
        yield
    except UsageError as exc:
        raise OptionRefused(str(exc)) from None


async def _backing_size(filename: str, backing: str, backing_fmt: str | None,
                        ctx: OpenContext) -> int:
    backing = resolve_location(filename, backing)
    # Only its size is needed: an encrypted backing file opens without its
    # secret, as qemu-img create opens it
    node = await open_image(backing, OpenContext(read_only=True, force_share=True,
                                                 locking=ctx.locking, secrets=ctx.secrets,
                                                 no_io=True),
                            fmt=backing_fmt)
    try:
        return node.size
    finally:
        await node.aclose()


def resolve_location(filename: str, name: str) -> str:
    """A backing file named when creating `filename`: relative to its folder."""
    if not os.path.isabs(name) and protocol_for(name) is None:
        return os.path.join(os.path.dirname(filename), name)
    return name


async def create_protocol_file(filename: str, ctx: OpenContext, *, size: int = 0,
                               options: Mapping[str, Any] | None = None) -> Node:
    """Create an empty file (or the protocol's equivalent) and open it
    writable, for a format's `create` to write its metadata into."""
    protocol = protocol_for(filename) or "file"
    cls = get_driver(protocol)
    if cls.create_opts is None:
        raise Unsupported(f"protocol '{protocol}' cannot create files")
    file_options = cls.create_opts.parse(
        {k: v for k, v in (options or {}).items() if cls.create_opts.get(k)}, what=protocol)
    await cls.create(filename, size, file_options, ctx)
    write_ctx = OpenContext(read_only=False, locking=ctx.locking, cache=ctx.cache)
    node = await open_tree(protocol_tree(filename), write_ctx, read_only=False)
    try:
        await node.activate()
    except BaseException:
        await node.aclose()
        raise
    return node
