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
from typing import Any, NoReturn

from .errors import ImgfsError, UsageError

PROG = "imgfs"
COMMANDS = ("mount", "create", "info", "check", "convert", "snapshot", "resize",
            "formats", "map", "compare", "commit", "rebase", "measure", "amend")


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _add_object(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--object", action="append", default=[], metavar="secret,id=ID,...",
                        help="define a secret (QEMU syntax: data=, file=, format=base64)")


def _add_image_opts(parser: argparse.ArgumentParser, what: str = "FILE") -> None:
    parser.add_argument("--image-opts", action="store_true",
                        help=f"{what} is an option string, as for mount -o "
                             "(driver=qcow2,file.filename=vm.qcow2); excludes -f")


#: qemu-img's cache modes (-t, -T)
CACHE_MODES = ("none", "writeback", "writethrough", "directsync", "unsafe")


def _add_cache(parser: argparse.ArgumentParser, *, target: bool, source: bool) -> None:
    """qemu-img's -t (images written) and -T (images only read)."""
    if target:
        parser.add_argument("-t", dest="cache", choices=CACHE_MODES, metavar="CACHE",
                            help="cache mode of the image written: none or directsync "
                                 "bypass the page cache (O_DIRECT); default writeback")
    if source:
        parser.add_argument("-T", dest="src_cache", choices=CACHE_MODES, metavar="SRC_CACHE",
                            help="cache mode of the images read (as -t)")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=PROG, description="Disk images as flat raw files, "
                            "and qemu-img-style tools.")
    parser.add_argument("--debug", action="store_true", help="tracebacks and request logging")
    parser.add_argument("--version", action="version", version=f"imgfs {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)

    mount = commands.add_parser("mount", help="mount images as raw files")
    mount.add_argument("-f", "--foreground", action="store_true", help="do not daemonize")
    mount.add_argument("-o", dest="options", action="append", default=[], metavar="OPTS",
                       help="mount options, comma-separated (see imgfs(1): ro, rw, format=, "
                            "snapshot, allow_other, ...)")
    _add_object(mount)
    mount.add_argument("paths", nargs="+", metavar="SOURCE... MOUNTPOINT",
                       help="images (files, URLs, json:) and the directory to mount on")

    create = commands.add_parser("create", help="create an image")
    create.add_argument("-f", dest="fmt", default="raw", metavar="FMT",
                        help="format of the new image (default raw)")
    create.add_argument("-o", dest="options", action="append", default=[], metavar="OPTS",
                        help="format options, comma-separated (-o help lists them)")
    create.add_argument("-b", dest="backing", metavar="BACKING",
                        help="backing file of the new image")
    create.add_argument("-F", dest="backing_fmt", metavar="BACKING_FMT",
                        help="format of the backing file")
    create.add_argument("-u", dest="unsafe", action="store_true",
                        help="do not open the backing file")
    create.add_argument("-q", dest="quiet", action="store_true",
                        help="do not print the 'Formatting' line")
    _add_object(create)
    create.add_argument("filename", nargs="?", metavar="FILE", help="the image to create")
    create.add_argument("size", nargs="?", metavar="SIZE",
                        help="virtual size, with k/M/G/T suffixes (default: the backing file's)")

    info = commands.add_parser("info", help="show what an image is")
    info.add_argument("-f", dest="fmt", metavar="FMT", help="format of FILE (default: probe)")
    info.add_argument("--output", choices=("human", "json"), default="human",
                      help="output format")
    info.add_argument("--backing-chain", action="store_true",
                      help="describe every image of the backing chain")
    info.add_argument("-U", "--force-share", action="store_true",
                      help="open FILE even if another process has it locked")
    _add_object(info)
    _add_image_opts(info)
    info.add_argument("filename", metavar="FILE", help="the image")

    check = commands.add_parser("check", help="check an image for consistency")
    check.add_argument("-f", dest="fmt", metavar="FMT", help="format of FILE (default: probe)")
    check.add_argument("-r", dest="repair", choices=("leaks", "all"),
                       help="repair leaked clusters only, or all errors")
    check.add_argument("--output", choices=("human", "json"), default="human",
                       help="output format")
    check.add_argument("-U", "--force-share", action="store_true",
                       help="open FILE even if another process has it locked")
    check.add_argument("-q", dest="quiet", action="store_true", help="print nothing")
    _add_object(check)
    _add_cache(check, target=False, source=True)
    _add_image_opts(check)
    check.add_argument("filename", metavar="FILE", help="the image")

    convert = commands.add_parser("convert", help="copy an image into another format")
    convert.add_argument("-f", dest="fmt", metavar="FMT", help="format of SRC (default: probe)")
    convert.add_argument("-O", dest="out_fmt", metavar="FMT",
                         help="format of DST (default raw)")
    convert.add_argument("-o", dest="options", action="append", default=[], metavar="OPTS",
                         help="options of DST's format, as for create")
    convert.add_argument("-B", dest="backing", metavar="BACKING",
                         help="DST gets this backing file and holds only what differs from it")
    convert.add_argument("-F", dest="backing_fmt", metavar="BACKING_FMT",
                         help="format of BACKING (default: probe)")
    convert.add_argument("-l", dest="snapshot", metavar="SNAPSHOT",
                         help="copy this internal snapshot of SRC: ID_OR_NAME, or "
                              "snapshot.id=ID and/or snapshot.name=NAME")
    convert.add_argument("-n", dest="skip_create", action="store_true",
                         help="DST exists: write into it instead of creating it")
    convert.add_argument("--target-image-opts", action="store_true",
                         help="DST is an option string, as for mount -o (with -n)")
    convert.add_argument("--target-is-zero", action="store_true",
                         help="DST (with -n) reads as zeros: leave zero ranges unwritten")
    convert.add_argument("-m", dest="workers", type=int, default=8, metavar="N",
                         help="chunks copied at once, 1 to 16 (default 8)")
    convert.add_argument("-W", dest="out_of_order", action="store_true",
                         help="write chunks as they come, not in the order of their offsets")
    convert.add_argument("-c", dest="compress", action="store_true",
                         help="compress the data (qcow2, qcow)")
    convert.add_argument("-p", dest="progress", action="store_true", help="show progress")
    convert.add_argument("-S", dest="sparse", default="4k", metavar="SIZE",
                         help="zero runs this long become holes (default 4k; 0: DST is "
                              "fully allocated)")
    convert.add_argument("-U", "--force-share", action="store_true",
                         help="open SRC even if another process has it locked")
    convert.add_argument("-q", dest="quiet", action="store_true", help="print nothing")
    _add_object(convert)
    _add_cache(convert, target=True, source=True)
    _add_image_opts(convert, "SRC")
    convert.add_argument("source", metavar="SRC", help="the image to copy")
    convert.add_argument("target", metavar="DST", help="the new image")

    snapshot = commands.add_parser("snapshot", help="internal snapshots")
    action = snapshot.add_mutually_exclusive_group()
    action.add_argument("-c", dest="create", metavar="TAG", help="create snapshot TAG")
    action.add_argument("-l", dest="list", action="store_true",
                        help="list the snapshots")
    action.add_argument("-a", dest="apply", metavar="TAG",
                        help="revert the disk to snapshot TAG")
    action.add_argument("-d", dest="delete", metavar="TAG", help="delete snapshot TAG")
    snapshot.add_argument("-f", dest="fmt", metavar="FMT", help="format of FILE (default: probe)")
    snapshot.add_argument("-U", "--force-share", action="store_true",
                          help="open FILE even if another process has it locked")
    snapshot.add_argument("-q", dest="quiet", action="store_true",
                          help="print nothing but the list (as qemu-img)")
    _add_object(snapshot)
    _add_image_opts(snapshot)
    snapshot.add_argument("filename", metavar="FILE", help="the image")

    resize = commands.add_parser("resize", help="grow or shrink an image")
    resize.add_argument("-f", dest="fmt", metavar="FMT", help="format of FILE (default: probe)")
    resize.add_argument("--shrink", action="store_true",
                        help="allow shrinking (data past the new end is lost)")
    resize.add_argument("--preallocation", default="off",
                        choices=("off", "metadata", "falloc", "full"),
                        help="how to allocate the added space (default off)")
    resize.add_argument("-q", dest="quiet", action="store_true",
                        help="do not print 'Image resized.'")
    _add_object(resize)
    _add_image_opts(resize)
    resize.add_argument("filename", metavar="FILE", help="the image")
    resize.add_argument("size", metavar="[+|-]SIZE",
                        help="new size, or a size to add (+) or remove (-)")

    mapping = commands.add_parser("map", help="where the data of an image lives")
    mapping.add_argument("-f", dest="fmt", metavar="FMT", help="format of FILE (default: probe)")
    mapping.add_argument("--output", choices=("human", "json"), default="human",
                         help="output format")
    mapping.add_argument("--start-offset", metavar="OFFSET", default="0",
                         help="map from this offset on (k/M/G/T suffixes)")
    mapping.add_argument("--max-length", metavar="LENGTH",
                         help="map at most this many bytes (k/M/G/T suffixes)")
    mapping.add_argument("-U", "--force-share", action="store_true",
                         help="open FILE even if another process has it locked")
    _add_object(mapping)
    _add_image_opts(mapping)
    mapping.add_argument("filename", metavar="FILE", help="the image")

    _add_tool_parsers(commands)
    commands.add_parser("formats", help="list the supported formats and protocols")
    for sub_parser in commands.choices.values():
        # --debug is accepted after the sub-command too (SUPPRESS keeps a
        # sub-parser's default from hiding the main parser's value)
        sub_parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                                help="tracebacks and request logging")
    return parser


def _add_tool_parsers(commands: Any) -> None:
    """compare, commit, rebase, measure and amend, with qemu-img's flags."""
    compare = commands.add_parser(
        "compare", help="compare the contents of two images (exit 0 same, 1 differ, 2 error)")
    compare.add_argument("-f", dest="fmt", metavar="FMT", help="format of FILE1 (default: probe)")
    compare.add_argument("-F", dest="fmt2", metavar="FMT", help="format of FILE2 (default: probe)")
    compare.add_argument("-s", dest="strict", action="store_true",
                         help="strict: also fail on a size or allocation difference")
    compare.add_argument("-p", dest="progress", action="store_true", help="show progress")
    compare.add_argument("-q", dest="quiet", action="store_true", help="print nothing")
    compare.add_argument("-U", "--force-share", action="store_true",
                         help="open the images even if another process has them locked")
    _add_object(compare)
    _add_cache(compare, target=False, source=True)
    _add_image_opts(compare, "FILE1 and FILE2")
    compare.add_argument("filename", metavar="FILE1", help="the first image")
    compare.add_argument("filename2", metavar="FILE2", help="the second image")

    commit = commands.add_parser("commit", help="merge an image into its backing file")
    commit.add_argument("-f", dest="fmt", metavar="FMT", help="format of FILE (default: probe)")
    commit.add_argument("-b", dest="base", metavar="BASE",
                        help="commit into BASE, deeper in the backing chain (implies -d)")
    commit.add_argument("-d", dest="keep", action="store_true",
                        help="do not empty FILE after the commit")
    commit.add_argument("-p", dest="progress", action="store_true", help="show progress")
    commit.add_argument("-q", dest="quiet", action="store_true", help="print nothing")
    _add_object(commit)
    _add_cache(commit, target=True, source=False)
    _add_image_opts(commit)
    commit.add_argument("filename", metavar="FILE",
                        help="the image whose data goes into its backing file")

    rebase = commands.add_parser("rebase", help="change the backing file of an image")
    rebase.add_argument("-f", dest="fmt", metavar="FMT", help="format of FILE (default: probe)")
    rebase.add_argument("-b", dest="backing", metavar="BACKING",
                        help="the new backing file ('' removes the backing file)")
    rebase.add_argument("-F", dest="backing_fmt", metavar="BACKING_FMT",
                        help="format of the new backing file")
    rebase.add_argument("-u", dest="unsafe", action="store_true",
                        help="unsafe: only rewrite the name, copy no data")
    rebase.add_argument("-p", dest="progress", action="store_true", help="show progress")
    rebase.add_argument("-q", dest="quiet", action="store_true", help="print nothing")
    rebase.add_argument("-U", "--force-share", action="store_true",
                        help="open the backing files even if they are locked")
    _add_object(rebase)
    _add_cache(rebase, target=True, source=True)
    _add_image_opts(rebase)
    rebase.add_argument("filename", metavar="FILE", help="the image to rebase")

    measure = commands.add_parser("measure", help="how large an image of a format would be")
    measure.add_argument("--output", choices=("human", "json"), default="human",
                         help="output format")
    measure.add_argument("-f", dest="fmt", metavar="FMT", help="format of FILE (default: probe)")
    measure.add_argument("-O", dest="out_fmt", default="raw", metavar="FMT",
                         help="format to measure for (default raw)")
    measure.add_argument("-o", dest="options", action="append", default=[], metavar="OPTS",
                         help="creation options of the measured format, as for create")
    measure.add_argument("--size", metavar="SIZE", help="measure a new image of SIZE bytes")
    measure.add_argument("-U", "--force-share", action="store_true",
                         help="open FILE even if another process has it locked")
    _add_object(measure)
    _add_image_opts(measure)
    measure.add_argument("filename", nargs="?", metavar="FILE",
                         help="measure a copy of FILE (as imgfs convert would make it)")

    amend = commands.add_parser("amend", help="change format options of an existing image")
    amend.add_argument("-f", dest="fmt", metavar="FMT", help="format of FILE (default: probe)")
    amend.add_argument("-o", dest="options", action="append", default=[], metavar="OPTS",
                       help="options to change (-o help lists them)")
    amend.add_argument("-p", dest="progress", action="store_true", help="show progress")
    amend.add_argument("-q", dest="quiet", action="store_true", help="print nothing")
    _add_object(amend)
    _add_cache(amend, target=True, source=False)
    _add_image_opts(amend)
    amend.add_argument("filename", metavar="FILE", help="the image to change")


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
    if "resize" not in args or "--" in args:
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
        return exc.exit_status
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
                             sloppy=parsed.sloppy, fake=parsed.fake, verbose=parsed.verbose,
                             rw_is_default=True)
    return run_guarded(run, debug)


if __name__ == "__main__":
    sys.exit(main())
