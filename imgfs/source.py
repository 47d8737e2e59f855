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
        tree = parse_json_source(text[5:])
        if "driver" not in tree and "file" not in tree:
            # as QEMU: a tree must say what it is, or hold the file to probe
            raise UsageError('a json: source needs "driver" or "file" '
                             '(json:{"file":{"filename":"vm.qcow2"}} probes its format)')
        return tree
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


def absolute_source(source: str) -> str:
    """SOURCE with every local path in it made absolute (the mount's daemon
    runs in /): a plain path, a protocol's (a fat: directory), and those in
    a json: tree (see `absolute_tree`)."""
    if source.startswith("json:"):
        tree = parse_json_source(source[5:])
        absolute = absolute_tree(tree)
        return source if absolute == tree else "json:" + json.dumps(absolute)
    protocol = protocol_for(source)
    if protocol is None:
        return os.path.abspath(source)
    return get_driver(protocol).absolute_filename(source)


#: the keys of a tree that hold child nodes
CHILD_KEYS = frozenset({"file", "backing", "data-file"})


def absolute_tree(tree: Mapping[str, Any]) -> dict[str, Any]:
    """A (nested) tree with its local paths made absolute: a driver's
    `path_opts`, the filename of a leaf whose driver is left to guess, and
    children given as filename strings."""
    driver = tree.get("driver")
    path_opts = get_driver(driver).path_opts if isinstance(driver, str) else frozenset()
    if driver is None and isinstance(tree.get("filename"), str):
        path_opts = frozenset({"filename"})
    result: dict[str, Any] = {}
    for key, value in tree.items():
        if key in CHILD_KEYS and isinstance(value, str) and not value.startswith("json:"):
            value = absolute_source(value)
        elif isinstance(value, dict):
            value = absolute_tree(value)
        result[key] = value
    for name in path_opts:
        _make_absolute(result, name.split("."), plain=driver is not None)
    return result


def paths_as_typed(source: str) -> dict[str, str]:
    """{absolute path: path as typed} for the paths `absolute_source` makes
    absolute inside a json: SOURCE (so that messages name them as typed)."""
    if not source.startswith("json:"):
        return {}
    typed = parse_json_source(source[5:])
    return _changed_strings(typed, absolute_tree(typed))


def _changed_strings(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for key, value in after.items():
        old = before.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            pairs.update(_changed_strings(old, value))
        elif isinstance(value, str) and isinstance(old, str) and value != old:
            pairs[value] = old
    return pairs


def _make_absolute(tree: dict[str, Any], keys: list[str], *, plain: bool) -> None:
    """The path at `keys` (a dotted option name, split) made absolute; a
    `plain` path has no protocol prefix (a driver's own option)."""
    for key in keys[:-1]:
        tree = tree.get(key)            # type: ignore[assignment]
        if not isinstance(tree, dict):
            return
    value = tree.get(keys[-1])
    if isinstance(value, str) and value:
        tree[keys[-1]] = os.path.abspath(value) if plain else absolute_source(value)


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
