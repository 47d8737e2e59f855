"""QEMU's filename forms turned into one option tree.

* ``/path/img`` or ``file:/path/img``: a file or host device;
* ``proto:...`` and URLs (``nbd://``, ``fat:``, ``ssh://``...): the protocol
  driver that owns the prefix parses the rest;
* ``json:{...}``: the full tree (dotted keys inside are nested);
* dotted options (``file.locking=off``) merge into the tree.

A tree without a ``driver`` key is "open this and probe the format".
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from .errors import UsageError
from .options import merge_trees, nest_dotted, split_opt_string
from .registry import get_driver, protocol_for

#: private key remembering the text a protocol tree came from (for messages)
SOURCE_KEY = "_source"


def parse_source(text: str) -> dict[str, Any]:
    """An option tree for a SOURCE as typed by a user: a protocol leaf under
    a format to be probed, or the tree a ``json:`` source spells out."""
    if text.startswith("json:"):
        return parse_json_source(text[5:])
    return {"file": protocol_tree(text)}


def protocol_tree(text: str) -> dict[str, Any]:
    """The leaf tree for a filename or URL (no format on top)."""
    protocol = protocol_for(text)
    if protocol is None:
        return {"filename": text}
    if protocol == "file":
        return {"driver": "file", "filename": text.partition(":")[2]}
    tree = dict(get_driver(protocol).parse_filename(text))
    tree["driver"] = protocol
    tree[SOURCE_KEY] = text
    return tree


def parse_json_source(text: str) -> dict[str, Any]:
    try:
        tree = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"invalid json: source ({exc})") from None
    if not isinstance(tree, dict):
        raise UsageError("a json: source must be an object")
    return normalize_tree(tree)


def parse_image_opts(text: str) -> dict[str, Any]:
    """The tree an ``--image-opts`` FILE spells out as one option string,
    in mount -o's syntax (``driver=qcow2,file.filename=vm.qcow2``: dotted
    keys nest, ``,,`` is a comma)."""
    tree = normalize_tree(split_opt_string(text))
    if "driver" not in tree and "file" not in tree:
        raise UsageError(f"'{text}': --image-opts needs driver= or file.filename= "
                         "(driver=qcow2,file.filename=vm.qcow2)")
    return tree


def normalize_tree(tree: Mapping[str, Any]) -> dict[str, Any]:
    """Nest dotted keys, recursively, and turn string children into trees."""
    nested = nest_dotted(tree)
    for key, value in list(nested.items()):
        if isinstance(value, dict):
            nested[key] = normalize_tree(value)
    return nested


def child_tree(value: Any, *, leaf: bool) -> dict[str, Any]:
    """A child given as a filename string or as a tree.

    A ``file`` child string is a protocol leaf; a ``backing`` string is a
    whole image whose format is probed.
    """
    if isinstance(value, str):
        if value.startswith("json:"):
            return parse_json_source(value[5:])
        return protocol_tree(value) if leaf else parse_source(value)
    if isinstance(value, dict):
        return dict(value)
    raise UsageError(f"invalid child specification {value!r}")


def with_options(tree: Mapping[str, Any], flat: Mapping[str, Any]) -> dict[str, Any]:
    """Merge user ``-o`` driver options (dotted keys allowed) into a tree."""
    return merge_trees(tree, nest_dotted(flat))


def display_name(source: str) -> str:
    """What to call a SOURCE in messages and in the mount directory."""
    if source.startswith("json:"):
        try:
            tree = json.loads(source[5:])
        except ValueError:
            return "image"
        return without_secrets(_name_in_tree(tree) or "image")
    return without_secrets(source)


def without_secrets(source: str) -> str:
    """A filename or URL as it may be shown: its protocol driver removes any
    password it carries (see BlockDriver.public_name)."""
    protocol = protocol_for(source)
    if protocol is None or protocol == "file":
        return source
    try:
        return get_driver(protocol).public_name(source)
    except UsageError:
        return source


def _name_in_tree(tree: Any) -> str | None:
    if not isinstance(tree, dict):
        return tree if isinstance(tree, str) else None
    for key in ("filename", "path", "dir", "export", "file"):
        value = tree.get(key) if key != "file" else tree.get("file")
        if isinstance(value, str) and value:
            return value
        if isinstance(value, dict):
            found = _name_in_tree(value)
            if found:
                return found
    flat = {k: v for k, v in tree.items() if "." in k}
    for key, value in flat.items():
        if key.endswith(("filename", ".path", ".dir", ".export")) and isinstance(value, str):
            return value
    return None


def export_name(source: str) -> str:
    """``vm.qcow2`` -> ``vm``; a URL's last path component; ``fat:/a/share`` -> ``share``."""
    name = display_name(source)
    protocol = protocol_for(name)
    if protocol is not None:
        name = get_driver(protocol).source_path(name)
    base = os.path.basename(name.rstrip("/")) or "image"
    stem, _ = os.path.splitext(base)
    return (stem or base).replace(":", "_") or "image"
