"""Options are data: declared once per driver with qemu-img's names.

A `Schema` is a list of `Opt`; the same schema parses ``-o`` strings and
json: trees, fills defaults, checks values and prints ``-o help``.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import UsageError

log = logging.getLogger("imgfs.options")

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB

_SUFFIXES = {"": 1, "b": 1, "k": KiB, "m": MiB, "g": GiB, "t": TiB,
             "p": 1024 * TiB, "e": 1024 * 1024 * TiB}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([bkmgtpe]?)(?:i?b)?\s*$", re.I)


def parse_size(text: str | int, *, default_unit: str = "") -> int:
    """``1G`` -> 1073741824, as qemu-img reads sizes (binary suffixes)."""
    if isinstance(text, int):
        if text < 0:
            raise UsageError(f"invalid size '{text}'")
        return text
    match = _SIZE_RE.match(text)
    if not match:
        raise UsageError(f"invalid size '{text}' (use a number with an optional "
                         "k, M, G or T suffix)")
    number, suffix = match.groups()
    value = float(number) * _SUFFIXES[(suffix or default_unit).lower()]
    if value != int(value):
        raise UsageError(f"invalid size '{text}': not a whole number of bytes")
    if value >= 2 ** 63:
        raise UsageError(f"invalid size '{text}': too large")
    return int(value)


def parse_bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    lowered = str(text).lower()
    if lowered in ("on", "yes", "true", "1"):
        return True
    if lowered in ("off", "no", "false", "0"):
        return False
    raise UsageError(f"invalid boolean '{text}' (use on or off)")


def parse_int(text: str | int) -> int:
    if isinstance(text, bool):
        raise UsageError(f"invalid number '{text}'")
    try:
        return int(text, 0) if isinstance(text, str) else int(text)
    except ValueError:
        raise UsageError(f"invalid number '{text}'") from None


def parse_str(text: Any) -> str:
    if isinstance(text, (dict, list)):
        raise UsageError("expected a string, got a structure")
    return str(text)


def choice(*allowed: str) -> Callable[[Any], str]:
    """A parser accepting one of `allowed` (the help lists them)."""
    def parse(text: Any) -> str:
        value = str(text)
        if value not in allowed:
            raise UsageError(f"invalid value '{value}' (expected one of: "
                             f"{', '.join(allowed)})")
        return value
    parse.choices = allowed  # type: ignore[attr-defined]
    return parse


def power_of_two(low: int, high: int) -> Callable[[int], None]:
    def check(value: int) -> None:
        if value < low or value > high or value & (value - 1):
            raise UsageError(f"must be a power of two between {low} and {high}")
    return check


def in_range(low: int, high: int) -> Callable[[int], None]:
    def check(value: int) -> None:
        if not low <= value <= high:
            raise UsageError(f"must be between {low} and {high}")
    return check


Size = parse_size
Bool = parse_bool
Int = parse_int
Str = parse_str


@dataclass(frozen=True)
class Opt:
    name: str
    parse: Callable[[Any], Any] = parse_str
    default: Any = None
    help: str = ""
    check: Callable[[Any], None] | None = None

    def convert(self, raw: Any) -> Any:
        try:
            value = self.parse(raw)
            if self.check is not None:
                self.check(value)
        except UsageError as exc:
            raise UsageError(f"option '{self.name}': {exc}") from None
        return value

    def type_name(self) -> str:
        choices = getattr(self.parse, "choices", None)
        if choices:
            return "|".join(choices)
        return {parse_size: "size", parse_bool: "bool", parse_int: "number",
                parse_str: "string"}.get(self.parse, "string")


@dataclass(frozen=True)
class Schema:
    opts: tuple[Opt, ...] = ()
    #: option-name prefixes passed through untouched (e.g. "encrypt.")
    passthrough: tuple[str, ...] = field(default=())

    def __init__(self, *opts: Opt, passthrough: Iterable[str] = ()) -> None:
        object.__setattr__(self, "opts", tuple(opts))
        object.__setattr__(self, "passthrough", tuple(passthrough))

    def __add__(self, other: Schema) -> Schema:
        return Schema(*self.opts, *other.opts,
                      passthrough=self.passthrough + other.passthrough)

    def names(self) -> list[str]:
        return [opt.name for opt in self.opts]

    def get(self, name: str) -> Opt | None:
        for opt in self.opts:
            if opt.name == name:
                return opt
        return None

    def parse(self, given: Mapping[str, Any], what: str = "", *,
              sloppy: bool = False) -> dict[str, Any]:
        """Check `given` against the schema; return every option with defaults.

        Unknown names are an error (a typo must not be silently ignored),
        unless `sloppy` (mount -s), where they are ignored with a warning.
        """
        result = {opt.name: opt.default for opt in self.opts}
        for name, raw in given.items():
            opt = self.get(name)
            if opt is not None:
                result[name] = opt.convert(raw)
            elif any(name.startswith(p) for p in self.passthrough):
                result[name] = raw
            else:
                where = f" for {what}" if what else ""
                if not sloppy:
                    raise UsageError(f"unknown option '{name}'{where}")
                log.warning("ignoring unknown option '%s'%s (sloppy mount)", name, where)
        return result

    def help_text(self, title: str) -> str:
        lines = [f"Supported options for {title}:"]
        for opt in self.opts:
            default = "" if opt.default is None else f" (default: {_show(opt.default)})"
            lines.append(f"  {opt.name}=<{opt.type_name()}>  - {opt.help}{default}")
        return "\n".join(lines)


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def split_opt_string(text: str) -> dict[str, str]:
    """Parse ``a=1,b=x,,y,flag`` as qemu does (``,,`` is a literal comma).

    A bare ``flag`` means ``flag=on``.  Later keys override earlier ones.
    """
    result: dict[str, str] = {}
    for item in _split_commas(text):
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        if not key:
            raise UsageError(f"invalid option '{item}'")
        result[key] = value if sep else "on"
    return result


def _split_commas(text: str) -> list[str]:
    items, current, index = [], [], 0
    while index < len(text):
        char = text[index]
        if char == ",":
            if text[index + 1:index + 2] == ",":
                current.append(",")
                index += 2
                continue
            items.append("".join(current))
            current = []
        else:
            current.append(char)
        index += 1
    items.append("".join(current))
    return items


def nest_dotted(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"file.locking": "off"}`` -> ``{"file": {"locking": "off"}}``."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        parts = key.split(".")
        node = tree
        for part in parts[:-1]:
            child = node.get(part)
            if isinstance(child, str):
                child = {"filename": child}
            if not isinstance(child, dict):
                child = {}
            node[part] = child
            node = child
        if isinstance(value, Mapping):
            existing = node.get(parts[-1])
            merged = dict(existing) if isinstance(existing, dict) else {}
            merged.update(nest_dotted(value))
            node[parts[-1]] = merged
        else:
            node[parts[-1]] = value
    return tree


def merge_trees(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge option trees; `extra` wins on conflicts."""
    result = dict(base)
    for key, value in extra.items():
        old = result.get(key)
        is_child = key in ("file", "backing", "data-file")
        if isinstance(old, str) and isinstance(value, dict) and is_child:
            old = {"filename": old}
        if isinstance(old, dict) and isinstance(value, dict):
            result[key] = merge_trees(old, value)
        else:
            result[key] = value
    return result
