"""`imgfs amend`: change options of an existing image (qemu-img amend).

The format declares what it can change (`BlockDriver.amend_opts`) and
does it (`BlockDriver.amend`); this module checks the request as qemu-img
does: an option only `create` knows is refused with its reason.
"""
from __future__ import annotations

from typing import Any

from imgfs.block import BlockDriver
from imgfs.errors import ImgfsError, UsageError


def parse_amend_options(cls: type[BlockDriver], given: dict[str, str]) -> dict[str, Any]:
    """The options given, parsed; only those (amend changes nothing else)."""
    schema = cls.amend_opts
    if schema is None:
        raise ImgfsError(f"Format driver '{cls.name}' does not support option amendment")
    for name in given:
        if schema.get(name) is None:
            creation_only = cls.create_opts is not None and (
                cls.create_opts.get(name) is not None
                or any(name.startswith(prefix) for prefix in cls.create_opts.passthrough))
            reason = ": this option is only supported for image creation" \
                if creation_only else ""
            raise ImgfsError(f"Invalid parameter '{name}'{reason}")
    try:
        parsed = schema.parse(given, what=cls.name)
    except UsageError as exc:       # a bad value: qemu-img's "error", 1
        raise ImgfsError(str(exc)) from None
    return {name: parsed[name] for name in given}
