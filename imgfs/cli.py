"""Command line: ``imgfs mount|create|info|check|convert|snapshot|resize|formats``,
the bare ``imgfs SOURCE MOUNTPOINT -o ...`` form mount.fuse3 uses, and the
``mount.imgfs`` helper for ``mount -t imgfs`` and fstab.

Errors are translated here and only here: one line ``imgfs: WHAT: cause``
on stderr, exit 1 (2 for usage); ``--debug`` shows tracebacks instead.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from .errors import ImgfsError, UsageError

PROG = "imgfs"
COMMANDS = ("mount", "create", "info", "check", "convert", "snapshot", "resize",
            "formats", "map")


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _add_object(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--object", action="append", default=[], metavar="secret,id=ID,...",
                        help="define a secret (QEMU syntax: data=, file=, format=base64)")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=PROG, description="Disk images as flat raw files, "
                            "and qemu-img-style tools.")
    parser.add_argument("--debug", action="store_true", help="tracebacks and request logging")
    parser.add_argument("--version", action="version", version=f"imgfs {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)

    mount = commands.add_parser("mount", help="mount images as raw files")
    mount.add_argument("-f", "--foreground", action="store_true", help="do not daemonize")
    mount.add_argument("-o", dest="options", action="append", default=[], metavar="OPTS")
    _add_object(mount)
    mount.add_argument("paths", nargs="+", metavar="SOURCE... MOUNTPOINT")

    create = commands.add_parser("create", help="create an image")
    create.add_argument("-f", dest="fmt", default="raw", metavar="FMT")
    create.add_argument("-o", dest="options", action="append", default=[], metavar="OPTS")
    create.add_argument("-b", dest="backing", metavar="BACKING")
    create.add_argument("-F", dest="backing_fmt", metavar="BACKING_FMT")
    create.add_argument("-u", dest="unsafe", action="store_true",
                        help="do not open the backing file")
    create.add_argument("-q", dest="quiet", action="store_true")
    _add_object(create)
    create.add_argument("filename", nargs="?", metavar="FILE")
    create.add_argument("size", nargs="?", metavar="SIZE")

    info = commands.add_parser("info", help="show what an image is")
    info.add_argument("-f", dest="fmt", metavar="FMT")
    info.add_argument("--output", choices=("human", "json"), default="human")
    info.add_argument("--backing-chain", action="store_true")
    info.add_argument("-U", "--force-share", action="store_true")
    _add_object(info)
    info.add_argument("filename", metavar="FILE")

    check = commands.add_parser("check", help="check an image for consistency")
    check.add_argument("-f", dest="fmt", metavar="FMT")
    check.add_argument("-r", dest="repair", choices=("leaks", "all"))
    check.add_argument("--output", choices=("human", "json"), default="human")
    check.add_argument("-U", "--force-share", action="store_true")
    check.add_argument("-q", dest="quiet", action="store_true")
    _add_object(check)
    check.add_argument("filename", metavar="FILE")

    convert = commands.add_parser("convert", help="copy an image into another format")
    convert.add_argument("-f", dest="fmt", metavar="FMT")
    convert.add_argument("-O", dest="out_fmt", default="raw", metavar="FMT")
    convert.add_argument("-o", dest="options", action="append", default=[], metavar="OPTS")
    convert.add_argument("-B", dest="backing", metavar="BACKING")
    convert.add_argument("-c", dest="compress", action="store_true")
    convert.add_argument("-p", dest="progress", action="store_true")
    convert.add_argument("-S", dest="sparse", default="4k", metavar="SIZE")
    convert.add_argument("-U", "--force-share", action="store_true")
    convert.add_argument("-q", dest="quiet", action="store_true")
    _add_object(convert)
    convert.add_argument("source", metavar="SRC")
    convert.add_argument("target", metavar="DST")

    snapshot = commands.add_parser("snapshot", help="internal snapshots")
    action = snapshot.add_mutually_exclusive_group(required=True)
    action.add_argument("-c", dest="create", metavar="TAG")
    action.add_argument("-l", dest="list", action="store_true")
    action.add_argument("-a", dest="apply", metavar="TAG")
    action.add_argument("-d", dest="delete", metavar="TAG")
    snapshot.add_argument("-f", dest="fmt", metavar="FMT")
    snapshot.add_argument("-U", "--force-share", action="store_true")
    snapshot.add_argument("filename", metavar="FILE")

    resize = commands.add_parser("resize", help="grow or shrink an image")
    resize.add_argument("-f", dest="fmt", metavar="FMT")
    resize.add_argument("--shrink", action="store_true")
    resize.add_argument("--preallocation", default="off",
                        choices=("off", "metadata", "falloc", "full"))
    resize.add_argument("filename", metavar="FILE")
    resize.add_argument("size", metavar="[+|-]SIZE")

    mapping = commands.add_parser("map", help="where the data of an image lives")
    mapping.add_argument("-f", dest="fmt", metavar="FMT")
    mapping.add_argument("--output", choices=("human", "json"), default="human")
    mapping.add_argument("-U", "--force-share", action="store_true")
    _add_object(mapping)
    mapping.add_argument("filename", metavar="FILE")

    commands.add_parser("formats", help="list the supported formats and protocols")
    for sub_parser in commands.choices.values():
        # --debug is accepted after the sub-command too (SUPPRESS keeps a
        # sub-parser's default from hiding the main parser's value)
        sub_parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                                help="tracebacks and request logging")
    return parser


def _version() -> str:
    from . import __version__
    return __version__


# -- entry points -------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    reuse_large_buffers()
    args_list = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args_list
    if _is_bare_mount(args_list):
        args_list = ["mount", *args_list]
    args_list = _protect_negative_size(args_list)
    return run_guarded(lambda: _dispatch(build_parser().parse_args(args_list)), debug)


#: glibc mallopt parameters
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def reuse_large_buffers() -> None:
    """Let malloc serve MiB-sized buffers from its heap and keep them.

    By default glibc gives each allocation of 128 KiB or more (a threshold
    it raises as such blocks are freed) pages of its own, and returns them
    on free, so a request's 1 MiB buffers (pyfuse3's copy of a write, the
    bytes a read returns, a cipher's output) are fresh pages every time, a
    page fault per 4 KiB; on a VM that hands freed memory back to its host
    each is also a fault in the hypervisor (figures: bench/README.md).
    Freed memory above 64 MiB is still given back."""
    import ctypes
    libc = ctypes.CDLL(None)
    libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
    libc.mallopt(M_TRIM_THRESHOLD, 64 << 20)


def _protect_negative_size(args: list[str]) -> list[str]:
    """``imgfs resize FILE -1G``: a size is not an option (as qemu-img)."""
    if "resize" not in args:
        return args
    for index, arg in enumerate(args):
        if index > args.index("resize") and re.fullmatch(r"-\d[\d.]*[kKmMgGtT]?", arg):
            return [*args[:index], "--", *args[index:]]
    return args


def _is_bare_mount(args: list[str]) -> bool:
    """``imgfs SOURCE MOUNTPOINT [-o ...]`` (how mount.fuse3 calls us)."""
    positional = [arg for arg in args if not arg.startswith("-")]
    return bool(positional) and positional[0] not in COMMANDS and \
        not any(arg in ("-h", "--help", "--version") for arg in args)


def run_guarded(action: Callable[[], int], debug: bool) -> int:
    """Run a command; turn every failure into one line and an exit status."""
    _setup_logging(debug)
    try:
        return action()
    except UsageError as exc:
        print(f"{PROG}: {_where(exc)}{exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # `imgfs info ... | head`: the reader went away, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except ImgfsError as exc:
        if debug:
            raise
        print(f"{PROG}: {_where(exc)}{exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        if debug:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"{PROG}: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except Exception as exc:          # a bug: one line, details with --debug
        if debug:
            raise
        print(f"{PROG}: internal error: {exc!r} (run with --debug for details)", file=sys.stderr)
        return 1


def _where(exc: ImgfsError) -> str:
    """``FILE: `` before a message, unless the message names it already."""
    from .source import display_name
    if not exc.path or exc.path in str(exc):
        return ""
    return f"{display_name(exc.path)}: "


def _setup_logging(debug: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format=f"{PROG}: %(message)s" if not debug else
                        "%(asctime)s %(name)s %(levelname)s %(message)s")


def _dispatch(args: argparse.Namespace) -> int:
    if args.command is None:
        raise UsageError("no command given (try 'imgfs --help')")
    from . import commands
    handler: Callable[[argparse.Namespace], int] = getattr(commands, f"cmd_{args.command}")
    return handler(args)


def mount_helper_main(argv: Sequence[str] | None = None) -> int:
    """``mount.imgfs SOURCE MOUNTPOINT [-sfnv] [-o OPTS]`` as mount(8) calls it."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args

    def run() -> int:
        parser = ArgumentParser(prog="mount.imgfs")
        parser.add_argument("source")
        parser.add_argument("mountpoint")
        parser.add_argument("-s", dest="sloppy", action="store_true")
        parser.add_argument("-f", dest="fake", action="store_true")
        parser.add_argument("-n", dest="no_mtab", action="store_true")
        parser.add_argument("-v", dest="verbose", action="store_true")
        parser.add_argument("-N", dest="namespace")
        parser.add_argument("-t", dest="fstype")
        parser.add_argument("-o", dest="options", action="append", default=[])
        parser.add_argument("--debug", action="store_true")
        parsed = parser.parse_args(args)
        from .commands import mount_sources
        return mount_sources([parsed.source], parsed.mountpoint, parsed.options,
                             objects=[], foreground=False, debug=parsed.debug,
                             sloppy=parsed.sloppy, fake=parsed.fake, verbose=parsed.verbose)
    return run_guarded(run, debug)


if __name__ == "__main__":
    sys.exit(main())
