"""Where passphrases come from, resolved in one place.

In order: a driver option naming a secret (``key-secret=ID`` /
``encrypt.key-secret=ID``, the secret defined with ``--object secret``),
the mount's ``passphrase-file=PATH`` (one trailing newline ignored), then a
no-echo prompt when a terminal is there; with none of them, fail at once.
A passphrase never appears in a message, a log or a traceback.
"""
from __future__ import annotations

import getpass
import re
import sys
from typing import TYPE_CHECKING, Any

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
    passphrase = given_passphrase(ctx, secret_id)
    if passphrase is not None:
        return passphrase
    if ctx.interactive and sys.stdin.isatty():
        return getpass.getpass(f"Passphrase for {what}: ").encode()
    raise UsageError(f"{what} is encrypted: give key-secret=ID with --object secret,... "
                     "or passphrase-file=PATH")


def given_passphrase(given: Any, secret_id: str | None) -> bytes | None:
    """The passphrase the command line gives, without prompting: `given` is
    an OpenContext or the mount's options (both have secrets, key_secret and
    passphrase_file); `secret_id` is the image's own ``key-secret``, if any.
    None when nothing was given."""
    secret_id = secret_id or given.key_secret
    if secret_id:
        return secret_by_id(given.secrets, secret_id)
    if given.passphrase_file:
        return read_passphrase_file(given.passphrase_file)
    return None


def secret_by_id(secrets: dict[str, bytes], secret_id: str) -> bytes:
    """The secret ``--object secret,id=ID,...`` defined."""
    try:
        return secrets[secret_id]
    except KeyError:
        raise UsageError(f"no secret with id '{secret_id}' (define it with "
                         f"--object secret,id={secret_id},file=PATH)") from None


def hide_inline_secrets() -> None:
    """Blank the values of ``--object secret,...,data=VALUE`` (and the
    passwords of URLs such as ``iscsi://user%PASSWORD@...``) in this
    process's command line, which ``ps`` and /proc/PID/cmdline show to every
    user for as long as the process (a mount daemon: as long as the mount)
    runs.  QEMU leaves them there; its manual recommends file= instead.

    The kernel shows the argument strings in place, so they are overwritten
    in place, through /proc/self/mem.  Best effort: where that is not
    possible, nothing changes (and ``file=`` remains the safe way)."""
    try:
        with open("/proc/self/stat", "rb") as handle:
            fields = handle.read().rpartition(b")")[2].split()
        # fields 48 and 49 of proc(5) (arg_start, arg_end); fields[0] is field 3
        arg_start, arg_end = int(fields[45]), int(fields[46])
        with open("/proc/self/cmdline", "rb") as handle:
            cmdline = handle.read()
        if len(cmdline) != arg_end - arg_start:
            return
        spans = list(_inline_secret_spans(cmdline))
        if not spans:
            return
        with open("/proc/self/mem", "r+b", buffering=0) as memory:
            for start, end in spans:
                memory.seek(arg_start + start)
                if memory.read(end - start) == cmdline[start:end]:
                    memory.seek(arg_start + start)
                    memory.write(b"*" * (end - start))
    except (OSError, ValueError, IndexError):
        return


#: the password of a URL's user information (``scheme://user:PASSWORD@`` or
#: iSCSI's ``user%PASSWORD@``), of a ``...password=`` query parameter, and
#: of a ``"...password": "..."`` key of a json: source
_PASSWORDS = re.compile(rb"^[A-Za-z][\w+.-]*://[^/@:%]*[:%]([^/@]+)@"
                        rb"|[?&][\w-]*password=([^&]+)"
                        rb'|"[\w.-]*password"\s*:\s*"((?:[^"\\]|\\.)+)"')


def _url_password_spans(arg: bytes) -> list[tuple[int, int]]:
    if b"://" not in arg and b"password" not in arg:
        return []
    return [match.span(group) for match in _PASSWORDS.finditer(arg)
            for group in (1, 2, 3) if match.group(group)]


def _inline_secret_spans(cmdline: bytes) -> list[tuple[int, int]]:
    """(start, end) of every data= value in the --object arguments of a
    NUL-separated command line (QEMU option syntax: ",," is a literal comma),
    and of every password in a URL."""
    spans: list[tuple[int, int]] = []
    offset, previous = 0, b""
    for arg in cmdline.split(b"\0"):
        spans.extend((offset + start, offset + end) for start, end in _url_password_spans(arg))
        body = None
        if previous == b"--object":
            body = 0
        elif arg.startswith(b"--object="):
            body = len(b"--object=")
        if body is not None:
            spans.extend((offset + start, offset + end)
                         for start, end in _data_values(arg, body))
        offset += len(arg) + 1
        previous = arg
    return spans


def _data_values(arg: bytes, position: int) -> list[tuple[int, int]]:
    values = []
    while position < len(arg):
        end = position
        while end < len(arg):
            if arg[end:end + 2] == b",,":
                end += 2
            elif arg[end:end + 1] == b",":
                break
            else:
                end += 1
        if arg.startswith(b"data=", position) and end > position + 5:
            values.append((position + 5, end))
        position = end + 1
    return values
