"""The sub-commands behind the CLI (argument parsing lives in cli.py)."""
from __future__ import annotations

import argparse
import base64
import functools
import gc
import json
import os
import sys
import time
from typing import Any, NoReturn

from .errors import CorruptImage, ImgfsError, Unsupported, UsageError
from .options import parse_size, split_opt_string

# -- shared helpers -------------------------------------------------------------------


def parse_objects(objects: list[str]) -> dict[str, bytes]:
    """``--object secret,id=ID,data=S|file=PATH[,format=raw|base64]`` -> {ID: bytes}."""
    from .secrets import hide_inline_secrets
    hide_inline_secrets()           # out of ps (and of the mount daemon's cmdline)
    secrets: dict[str, bytes] = {}
    for text in objects:
        fields = split_opt_string(text)
        kind = next(iter(fields), "")
        if kind == "qom-type":
            kind = fields.pop("qom-type")
        else:
            fields.pop(kind, None)
        if kind != "secret":
            raise UsageError(f"unsupported --object type '{kind}' (only 'secret')")
        secret_id = fields.pop("id", None)
        if not secret_id:
            raise UsageError("--object secret needs id=")
        secrets[secret_id] = _secret_value(secret_id, fields)
    return secrets


def _secret_value(secret_id: str, fields: dict[str, str]) -> bytes:
    encoding = fields.pop("format", "raw")
    if "data" in fields and "file" in fields:
        raise UsageError(f"secret '{secret_id}': give data= or file=, not both")
    if "data" in fields:
        value = fields.pop("data").encode()
    elif "file" in fields:
        path = fields.pop("file")
        try:
            with open(path, "rb") as handle:
                value = handle.read()          # the file's bytes exactly, as QEMU
        except OSError as exc:
            raise UsageError(f"secret '{secret_id}': {path}: {exc.strerror}") from None
    else:
        raise UsageError(f"secret '{secret_id}' needs data= or file=")
    if fields:
        raise UsageError(f"secret '{secret_id}': unknown option '{next(iter(fields))}'")
    if encoding == "base64":
        try:
            return base64.b64decode(value, validate=True)
        except ValueError:
            raise UsageError(f"secret '{secret_id}': invalid base64 data") from None
    if encoding != "raw":
        raise UsageError(f"secret '{secret_id}': format must be raw or base64")
    return value


def merged_options(option_strings: list[str]) -> dict[str, str]:
    merged: dict[str, str] = {}
    for text in option_strings:
        merged.update(split_opt_string(text))
    return merged


def run_trio(async_fn: Any, *args: Any) -> Any:
    import trio
    return trio.run(async_fn, *args)


def cache_mode(args: argparse.Namespace, *, read_only: bool | None) -> str:
    """The OpenContext cache for qemu-img's -t (images written) or -T
    (images only read, where the command has it): none and directsync
    open with O_DIRECT, the others use the page cache (every tool flushes
    what it wrote before it ends)."""
    given = args.src_cache if read_only and hasattr(args, "src_cache") else \
        getattr(args, "cache", None)
    return {"none": "none", "directsync": "none",
            "writethrough": "writethrough"}.get(given or "", "writeback")


def make_context(args: argparse.Namespace, *, read_only: bool | None) -> Any:
    from .node import OpenContext
    return OpenContext(read_only=read_only, cache=cache_mode(args, read_only=read_only),
                       force_share=bool(getattr(args, "force_share", False)),
                       secrets=parse_objects(getattr(args, "object", []) or []),
                       interactive=sys.stdin.isatty())


def image_source(args: argparse.Namespace, filename: str) -> str | dict[str, Any]:
    """An image the user named on the command line: a filename, URL or
    json: source, or with --image-opts the tree its option string spells."""
    if not getattr(args, "image_opts", False):
        return filename
    from .source import parse_image_opts
    if getattr(args, "fmt", None) or getattr(args, "fmt2", None):
        raise UsageError("--image-opts and -f/-F are mutually exclusive "
                         "(give the format as driver=)")
    return parse_image_opts(filename)


async def _open(args: argparse.Namespace, filename: str, *, read_only: bool | None,
                no_io: bool = False, no_backing: bool = False, check: bool = False) -> Any:
    from .graph import open_image
    ctx = make_context(args, read_only=read_only)
    ctx.no_io = no_io
    ctx.no_backing = no_backing
    ctx.check = check
    return await open_image(image_source(args, filename), ctx, fmt=getattr(args, "fmt", None))


# -- mount ------------------------------------------------------------------------------


def cmd_mount(args: argparse.Namespace) -> int:
    if len(args.paths) < 2:
        raise UsageError("mount needs SOURCE... MOUNTPOINT")
    return mount_sources(args.paths[:-1], args.paths[-1], args.options, objects=args.object,
                         foreground=args.foreground, debug=args.debug)


def mount_sources(sources: list[str], mountpoint: str, option_strings: list[str], *,
                  objects: list[str], foreground: bool, debug: bool, sloppy: bool = False,
                  fake: bool = False, verbose: bool = False, rw_is_default: bool = False) -> int:
    from .mount import check_mountpoint, export_names, parse_mount_options
    from .source import absolute_source, paths_as_typed
    opts = parse_mount_options(option_strings, sloppy=sloppy, rw_is_default=rw_is_default)
    opts.secrets = parse_objects(objects)
    given = {absolute_source(source): source for source in sources}
    sources = [absolute_source(source) for source in sources]
    if opts.overlay is not None:
        overlay_options(opts, list(given.values()), sources)
    for source in list(given.values()):
        given.update(paths_as_typed(source))
    mountpoint = os.path.abspath(mountpoint)
    check_mountpoint(mountpoint, sources, opts)
    export_names(sources, opts)
    if verbose:
        print(f"imgfs: mounting {', '.join(sources)} on {mountpoint}", file=sys.stderr)
    if fake:
        return 0
    if foreground:
        return _serve_foreground(sources, mountpoint, opts, given)
    return _serve_daemon(sources, mountpoint, opts, debug, given)


def overlay_options(opts: Any, typed: list[str], sources: list[str]) -> None:
    """``-o overlay=FILE``: one SOURCE; FILE made absolute (the daemon runs
    in /) after the name a new overlay records for its backing file."""
    from .overlay import backing_name
    if len(sources) != 1:
        raise UsageError("overlay= needs a single SOURCE")
    opts.overlay_backing = backing_name(typed[0], sources[0], opts.overlay)
    opts.overlay = os.path.abspath(opts.overlay)


def name_as_given(error: BaseException, given: dict[str, str]) -> None:
    """Let an error name the image as the user typed it (``disk.luks``), not
    by the absolute path the daemon opens it by (it runs in /).  A file
    beside it (a backing or data file) is named relative to the same place,
    as imgfs info names it."""
    path = getattr(error, "path", None)
    if not isinstance(path, str):
        return
    for absolute, typed in given.items():
        if path == absolute:
            error.path = typed          # type: ignore[attr-defined]
            return
    for absolute, typed in given.items():
        directory = os.path.dirname(absolute) + "/"
        if os.path.isabs(absolute) and not os.path.isabs(typed) and path.startswith(directory):
            error.path = os.path.join(os.path.dirname(typed),  # type: ignore[attr-defined]
                                      path[len(directory):])
            return


class NamesAsGiven:
    """A logging filter for the terminal: warnings name the image as the
    user typed it, like the errors (`name_as_given`); syslog, which has no
    working directory to be relative to, keeps the absolute paths."""

    def __init__(self, given: dict[str, str]) -> None:
        # longest first, so that /a/b.img is replaced before /a/b
        self.pairs = sorted(((a, t) for a, t in given.items() if a != t),
                            key=lambda pair: -len(pair[0]))

    def filter(self, record: Any) -> bool:
        message = record.getMessage()
        for absolute, typed in self.pairs:
            message = message.replace(absolute, typed)
        record.msg, record.args = message, ()
        return True


def _name_warnings_as_given(given: dict[str, str]) -> None:
    import logging
    for handler in logging.getLogger().handlers:
        handler.addFilter(NamesAsGiven(given))


def _serve_foreground(sources: list[str], mountpoint: str, opts: Any,
                      given: dict[str, str]) -> int:
    pause_garbage_collection()
    start_unlocking(sources, opts)          # (before imgfs.mount loads trio)
    from .mount import describe_error, exit_status, serve
    failure: list[BaseException] = []

    def report(error: BaseException | None) -> None:
        if error is not None:
            failure.append(error)
        else:
            resume_garbage_collection()
    _name_warnings_as_given(given)
    run_trio(serve, sources, mountpoint, opts, report)
    if failure:
        name_as_given(failure[0], given)
        print(f"imgfs: {describe_error(failure[0])}", file=sys.stderr)
        return exit_status(failure[0])
    return 0


def pause_garbage_collection() -> None:
    """No cyclic garbage collection while a mount starts: what start-up
    builds (modules, classes, the block graph, its caches) lives as long as
    the mount, and sifting it for cycles is CPU the open waits for
    (figures: bench/README.md)."""
    gc.disable()


def resume_garbage_collection() -> None:
    """Once the mount is ready: start-up's objects go to the permanent
    generation, which later collections skip, and collection resumes."""
    gc.freeze()
    gc.enable()


def start_unlocking(sources: list[str], opts: Any) -> None:
    """Start the PBKDF of encrypted sources now, while trio, pyfuse3 and the
    drivers load: it is most of an encrypted mount's start-up."""
    from .drivers.luks.early import start_unlocking as start
    start(sources, opts)


def _serve_daemon(sources: list[str], mountpoint: str, opts: Any, debug: bool,
                  given: dict[str, str]) -> int:
    """Fork; the child mounts and serves, the parent waits for "ready"."""
    pause_garbage_collection()             # (the child's too)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            message = pipe.read().decode(errors="replace")
        if message == "ready":
            _exit_at_once(0)
        os.waitpid(pid, 0)
        status, _, text = message.partition(":")
        print(f"imgfs: {text or 'the mount process died before it was ready'}",
              file=sys.stderr)
        return 2 if status == "2" else 1
    os.close(read_end)
    os.setsid()
    os._exit(_daemon_child(sources, mountpoint, opts, write_end, debug, given))


def _exit_at_once(status: int) -> NoReturn:
    """End the waiting parent without the interpreter's teardown of every
    loaded module (which `mount` and the first read would wait for);
    it holds nothing else to clean up once its output is flushed."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _daemon_child(sources: list[str], mountpoint: str, opts: Any, pipe: int,
                  debug: bool, given: dict[str, str]) -> int:
    from .mount import describe_error, exit_status, serve

    def report(error: BaseException | None) -> None:
        nonlocal pipe
        if pipe < 0:
            return
        if error is not None:
            name_as_given(error, given)
        message = "ready" if error is None else f"{exit_status(error)}:{describe_error(error)}"
        os.write(pipe, message.encode())
        os.close(pipe)
        pipe = -1
        if error is None:
            _detach_stdio(keep_stderr=debug)
            resume_garbage_collection()
    try:
        _name_warnings_as_given(given)
        start_unlocking(sources, opts)
        os.chdir("/")
        run_trio(serve, sources, mountpoint, opts, report)
        return 0
    except BaseException as exc:     # never let a traceback escape a daemon
        report(exc)
        return 1


def _detach_stdio(keep_stderr: bool) -> None:
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    if not keep_stderr:
        os.dup2(null, 2)
        _log_to_syslog()
    os.close(null)


def _log_to_syslog() -> None:
    """A daemon's warnings (a request that failed, a fat:rw: change refused)
    go to syslog, where mount helpers' messages are looked for."""
    import logging
    import logging.handlers
    if not os.path.exists("/dev/log"):
        return
    try:
        handler = logging.handlers.SysLogHandler(address="/dev/log")
    except OSError:
        return
    handler.setFormatter(logging.Formatter("imgfs[%(process)d]: %(message)s"))
    root = logging.getLogger()
    root.handlers = [handler]


# -- create -----------------------------------------------------------------------------


def cmd_create(args: argparse.Namespace) -> int:
    from .graph import create_image
    from .registry import get_driver
    options = merged_options(args.options)
    cls = get_driver(args.fmt)
    if "help" in options:
        print(_create_help(cls))
        return 0
    if args.filename is None:
        raise UsageError("create needs FILE [SIZE]")
    if args.backing:
        options["backing_file"] = args.backing
    if args.backing_fmt:
        options["backing_fmt"] = args.backing_fmt
    size = parse_size(args.size) if args.size is not None else None
    ctx = make_context(args, read_only=False)
    parsed = run_trio(functools.partial(create_image, unsafe=args.unsafe), args.filename,
                      args.fmt, size, options, ctx)
    if not args.quiet:
        print(_formatting_line(args.filename, args.fmt, parsed))
    return 0


def _create_help(cls: Any) -> str:
    if cls.create_opts is None:
        raise Unsupported(f"format '{cls.name}' does not support image creation")
    return cls.create_opts.help_text(cls.name)


def _formatting_line(filename: str, fmt: str, parsed: dict[str, Any]) -> str:
    shown = [f"fmt={fmt}", f"size={parsed['size']}"]
    for key, value in parsed.items():
        if key == "size" or value is None or value is False or value == "off":
            continue
        shown.append(f"{key}={'on' if value is True else value}")
    return f"Formatting '{filename}', {' '.join(shown)}"


# -- info / map -------------------------------------------------------------------------


def cmd_info(args: argparse.Namespace) -> int:
    from .info import chain_info, image_info, render_human, render_json

    async def gather() -> Any:
        # As qemu-img info, describe without reading data (no passphrase
        # needed) and, but for --backing-chain, without the backing file
        node = await _open(args, args.filename, read_only=True, no_io=True,
                           no_backing=not args.backing_chain)
        try:
            name = shown_name(args.filename, node, tree=args.image_opts)
            if args.backing_chain:
                return chain_info(node, name)
            return image_info(node, name)
        finally:
            await node.aclose()
    report = run_trio(gather)
    if args.output == "json":
        print(render_json(report))
    elif isinstance(report, list):
        print("\n\n".join(render_human(item) for item in report))
    else:
        print(render_human(report))
    return 0


def shown_name(typed: str, node: Any, *, tree: bool) -> str:
    """What qemu-img calls an image: the name typed, but for a source that
    spells a tree (--image-opts, json:) over a local file, that file."""
    from .source import without_secrets
    leaf = node
    while leaf.file is not None:
        leaf = leaf.file
    if (tree or typed.startswith("json:")) and leaf.format_name == "file":
        return str(leaf.filename)
    return without_secrets(typed)


def cmd_map(args: argparse.Namespace) -> int:
    start = parse_size(args.start_offset)
    max_length = parse_size(args.max_length) if args.max_length is not None else None

    async def gather() -> list[dict[str, Any]]:
        node = await _open(args, args.filename, read_only=True)
        try:
            end = node.size if max_length is None else min(node.size, start + max_length)
            return await allocation_map(node, start, end, offsets=args.output == "json")
        finally:
            await node.aclose()
    entries = run_trio(gather)
    if args.output == "json" and not entries:
        # what qemu-img prints for an empty range
        entries = [{"start": start, "length": 0, "depth": 0, "present": False,
                    "zero": False, "data": False}]
    if args.output == "json":
        print("[" + ",\n".join(json.dumps(entry) for entry in entries) + "]")
    else:
        print(f"{'Offset':<16}{'Length':<16}{'Depth':<8}Contents")
        for entry in entries:
            contents = "data" if entry["data"] else "zero" if entry["present"] else "unallocated"
            print(f"{entry['start']:<#16x}{entry['length']:<#16x}{entry['depth']:<8}{contents}")
    return 0


async def allocation_map(node: Any, start: int = 0, end: int | None = None, *,
                         offsets: bool = True) -> list[dict[str, Any]]:
    """qemu-img map's entries: runs of (depth, data, zero) through the
    chain, from `start` to `end` (the end of the image by default), with
    the offset in the file where a run's bytes lie as they read (unless
    not `offsets`: then runs of one status join whatever their place)."""
    from .block import Status
    entries: list[dict[str, Any]] = []
    offset = start
    end = node.size if end is None else end
    while offset < end:
        mapping = await node.map_above(offset, end - offset)
        status = mapping.status
        entry = {"start": offset, "length": mapping.length, "depth": mapping.depth,
                 "present": bool(status & Status.ALLOCATED),
                 "zero": bool(status & Status.ZERO) or not status & Status.ALLOCATED,
                 "data": bool(status & Status.DATA)}
        if offsets and mapping.host_offset is not None:
            entry["offset"] = mapping.host_offset
        if entries and continues(entries[-1], entry):
            entries[-1]["length"] += mapping.length
        else:
            entries.append(entry)
        offset += mapping.length
    return entries


def continues(last: dict[str, Any], entry: dict[str, Any]) -> bool:
    """`entry` extends `last` in one line of the map: the same status at
    the same depth, and (as qemu-img joins them) its bytes right after
    last's in the file, or neither with a place in a file."""
    if any(last[key] != entry[key] for key in ("depth", "present", "zero", "data")):
        return False
    if "offset" in last and "offset" in entry:
        return bool(entry["offset"] == last["offset"] + last["length"])
    return "offset" not in last and "offset" not in entry


# -- check / snapshot / resize ---------------------------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
    from .check import NOT_SUPPORTED, render_human, render_json
    from .source import without_secrets

    async def run() -> int:
        node = await _open(args, args.filename, read_only=args.repair is None, check=True)
        try:
            if not node.driver.can_check or (args.repair and not node.driver.can_repair):
                print(f"imgfs: {args.filename}: this image format does not support checks"
                      f"{' with repairs' if node.driver.can_check else ''}", file=sys.stderr)
                return NOT_SUPPORTED
            result = await node.check(args.repair)
            fmt = node.format_name
        finally:
            await node.aclose()
        for message in result.messages:
            print(message, file=sys.stderr)
        if result.failure is not None:
            raise CorruptImage(result.failure, path=args.filename)
        if args.output == "json":
            print(render_json(result, without_secrets(args.filename), fmt))
        elif not args.quiet:
            print(render_human(result))
        return result.exit_code
    try:
        return int(run_trio(run))
    except UsageError as exc:
        # check's exit 2 means "corruptions found": an image it cannot open
        # (no secret given, say) is "check not completed", 1, as qemu-img says
        raise ImgfsError(str(exc), path=exc.path) from None


def cmd_snapshot(args: argparse.Namespace) -> int:
    from .info import render_snapshot_table

    # no action: qemu-img opens the image and does nothing
    changes = bool(args.create or args.apply or args.delete)

    async def run() -> None:
        node = await _open(args, args.filename, read_only=not changes)
        try:
            # the format's snapshots, or (raw over RBD) its protocol's
            found = node.snapshot_holder()
            holder = found[0] if found is not None else None
            if args.list:
                # as qemu-img: a format without snapshots lists none
                snapshots = holder.internal_snapshots() if holder is not None else []
                if snapshots:
                    print(render_snapshot_table([snap.info() for snap in snapshots]))
                return
            if not changes:
                return
            if holder is None:
                raise Unsupported(f"{node.format_name} images have no internal snapshots",
                                  path=args.filename)
            if args.create:
                await holder.create_snapshot(args.create)
            elif args.apply:
                await holder.apply_snapshot(args.apply)
            elif args.delete:
                await holder.delete_snapshot(args.delete)
        finally:
            await node.aclose()
    run_trio(run)
    return 0


def cmd_resize(args: argparse.Namespace) -> int:
    text = args.size
    relative = text[:1] if text[:1] in "+-" else ""
    amount = parse_size(text[1:] if relative else text)

    async def run() -> None:
        node = await _open(args, args.filename, read_only=False)
        try:
            new_size = node.size + amount if relative == "+" else \
                node.size - amount if relative == "-" else amount
            if new_size < 0:
                raise UsageError("the new size would be negative")
            if new_size < node.size and not args.shrink:
                raise UsageError("use --shrink to shrink an image (data past the new end is lost)")
            await node.truncate(new_size, args.preallocation)
            await node.flush()
        finally:
            await node.aclose()
    run_trio(run)
    if not args.quiet:
        print("Image resized.")
    return 0


# -- convert ----------------------------------------------------------------------------


def cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert
    refuse_convert_combinations(args)
    options = merged_options(args.options)
    if args.backing:
        options["backing_file"] = args.backing
        if args.backing_fmt:
            options["backing_fmt"] = args.backing_fmt
    if not args.target_image_opts:
        args.out_fmt = args.out_fmt or "raw"
    sparse = parse_size(args.sparse) if args.sparse not in ("0",) else 0
    run_trio(convert, args, options, sparse)
    return 0


def refuse_convert_combinations(args: argparse.Namespace) -> None:
    """What qemu-img convert refuses with exit 1, in its words."""
    if not 1 <= args.workers <= 16:
        raise ImgfsError("Invalid number of coroutines. Allowed number of coroutines is "
                         "between 1 and 16")
    if args.backing_fmt and not args.backing:
        raise ImgfsError("Backing format cannot be used without backing file")
    if not args.skip_create:
        for flag, given in (("--target-is-zero", args.target_is_zero),
                            ("--target-image-opts", args.target_image_opts)):
            if given:
                raise ImgfsError(f"{flag} requires use of -n flag")
    elif args.options:
        raise ImgfsError("-o has no effect when skipping image creation")
    if args.target_image_opts and args.out_fmt:
        raise ImgfsError("--image-opts and --format are mutually exclusive")


# -- formats ----------------------------------------------------------------------------


def cmd_formats(args: argparse.Namespace) -> int:
    from .block import Kind
    from .registry import available_drivers, unsupported_formats
    print("Formats (rw: read and write; ro: read-only; create: imgfs create):")
    drivers = available_drivers()
    for cls in drivers:
        if cls.kind is Kind.FORMAT:
            print(f"  {cls.name:<12} {_abilities(cls):<16} {cls.description}")
    print("Protocols and sources:")
    for cls in drivers:
        if cls.kind is Kind.PROTOCOL:
            print(f"  {cls.name:<12} {_abilities(cls):<16} {cls.description}")
    refused = unsupported_formats()
    if refused:
        print("Recognised but not supported (refused, never opened as raw; "
              "-o format=raw reads the file's bytes):")
        for name, description in refused:
            print(f"  {name:<12} {'refused':<16} {description}")
    return 0


def _abilities(cls: Any) -> str:
    parts = ["ro" if cls.read_only_format else "rw"]
    if cls.create_opts is not None:
        parts.append("create")
    return ", ".join(parts)


def elapsed(start: float) -> str:
    return f"{time.monotonic() - start:.1f}s"


# -- compare / commit / rebase / measure / amend (imgfs/tools) ----------------------------


def cmd_compare(args: argparse.Namespace) -> int:
    from .tools.compare import compare_images
    from .tools.progress import Progress

    async def run() -> Any:
        first = await _open(args, args.filename, read_only=True)
        try:
            second = await _open(argparse.Namespace(**{**vars(args), "fmt": args.fmt2}),
                                 args.filename2, read_only=True)
            try:
                return await compare_images(
                    first, second, strict=args.strict,
                    progress=Progress(args.progress and not args.quiet, first.size))
            finally:
                await second.aclose()
        finally:
            await first.aclose()
    try:
        verdict = run_trio(run)
    except ImgfsError as exc:
        exc.exit_status = 2             # compare: 1 means "different"
        raise
    if not args.quiet:
        print("\n".join(verdict.lines))
    return int(verdict.status)


def tool_opener(args: argparse.Namespace) -> Any:
    """open_node(filename, fmt, read_only) for the tools that open several
    images: read-only opens share their locks (-U), so that the same
    process may open one of their files again for writing."""
    async def open_node(filename: str | dict[str, Any], fmt: str | None, read_only: bool, *,
                        options: dict[str, Any] | None = None) -> Any:
        from .graph import open_image
        from .source import parse_source
        ctx = make_context(args, read_only=read_only)
        ctx.force_share = ctx.force_share or read_only
        if isinstance(filename, dict):
            given = filename
        elif filename == args.filename:     # the image typed, not one it names
            typed = image_source(args, filename)
            given = parse_source(typed) if isinstance(typed, str) else typed
        else:
            given = parse_source(filename)
        tree = {**given, **(options or {})}
        return await open_image(tree, ctx, fmt=fmt)
    return open_node


def cmd_commit(args: argparse.Namespace) -> int:
    from .tools.commit import commit
    from .tools.progress import Progress
    progress = Progress(args.progress and not args.quiet, 0)

    async def run() -> None:
        await commit(args.filename, args.fmt, args.base, keep=args.keep,
                     progress=progress, open_node=tool_opener(args))
    run_trio(run)
    if not args.quiet:
        print("Image committed.")
    return 0


def cmd_rebase(args: argparse.Namespace) -> int:
    from .tools.progress import Progress
    from .tools.rebase import rebase
    if args.backing is None and not args.unsafe:
        raise ImgfsError("Must specify backing file (-b) or use unsafe mode (-u)")
    open_node = tool_opener(args)

    async def open_with(filename: str | dict[str, Any], fmt: str | None, read_only: bool,
                        with_backing: bool) -> Any:
        return await open_node(filename, fmt, read_only,
                               options=None if with_backing else {"backing": None})

    async def run() -> None:
        await rebase(args.filename, args.fmt, args.backing or "", args.backing_fmt,
                     unsafe=args.unsafe, progress=Progress(args.progress and not args.quiet, 0),
                     open_node=open_with)
    run_trio(run)
    return 0


def cmd_measure(args: argparse.Namespace) -> int:
    from .registry import get_driver
    from .tools.measure import describe_source, render
    if args.filename is not None and args.size is not None:
        raise ImgfsError("--size N cannot be used together with a filename.")
    if args.filename is None and args.size is None:
        raise ImgfsError("Either --size N or one filename must be specified.")
    cls = get_driver(args.out_fmt)
    options = merged_options(args.options)
    if "help" in options:
        print(_create_help(cls))
        return 0
    parsed = cls.create_opts.parse(options, what=cls.name) if cls.create_opts else {}
    size = parse_size(args.size) if args.size is not None else 0

    async def describe() -> Any:
        node = await tool_opener(args)(args.filename, args.fmt, True)
        try:
            return await describe_source(node)
        finally:
            await node.aclose()
    source = run_trio(describe) if args.filename is not None else None
    print(render(cls.measure(size, parsed, source), args.output))
    return 0


def cmd_amend(args: argparse.Namespace) -> int:
    from .tools.amend import parse_amend_options
    from .tools.progress import Progress

    async def run() -> int:
        node = await _open(args, args.filename, read_only=args.help_only)
        try:
            if args.help_only:
                print(node.driver.amend_opts.help_text(f"'{node.format_name}' (amend)")
                      if node.driver.amend_opts else
                      f"Format driver '{node.format_name}' does not support option amendment")
                return 0
            progress = Progress(args.progress and not args.quiet, 1)
            progress.update(0)
            await node.amend(parse_amend_options(type(node.driver), args.raw_options))
            await node.flush()
            progress.done()
        finally:
            await node.aclose()
        return 0
    args.raw_options = merged_options(args.options)
    if not args.raw_options:
        raise ImgfsError("Must specify options (-o)")
    args.help_only = "help" in args.raw_options
    return int(run_trio(run))
