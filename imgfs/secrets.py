"""Where passphrases come from, resolved in one place.

In order: a driver option naming a secret (``key-secret=ID`` /
``encrypt.key-secret=ID``, the secret defined with ``--object secret``),
the mount's ``passphrase-file=PATH`` (one trailing newline ignored), then a
no-echo prompt when a terminal is there; with none of them, fail at once.
A passphrase never appears in a message, a log or a traceback.
"""
from __future__ import annotations

import getpass
import sys
from typing import TYPE_CHECKING

from .errors import UsageError

if TYPE_CHECKING:                    # (imgfs.node loads trio: luks.early must not)
    from .node import OpenContext


def read_passphrase_file(path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise UsageError(f"passphrase file {path}: {exc.strerror}") from None
    return data[:-1] if data.endswith(b"\n") else data


def resolve_passphrase(ctx: OpenContext, secret_id: str | None, what: str) -> bytes:
    """The passphrase for `what` (an image name, for the prompt only).

    `secret_id` is the image's own ``key-secret`` option, if given."""
    secret_id = secret_id or ctx.key_secret
    if secret_id:
        try:
            return ctx.secrets[secret_id]
        except KeyError:
            raise UsageError(f"no secret with id '{secret_id}' (define it with "
                             f"--object secret,id={secret_id},file=PATH)") from None
    if ctx.passphrase_file:
        return read_passphrase_file(ctx.passphrase_file)
    if ctx.interactive and sys.stdin.isatty():
        return getpass.getpass(f"Passphrase for {what}: ").encode()
    raise UsageError(f"{what} is encrypted: give key-secret=ID with --object secret,... "
                     "or passphrase-file=PATH")
