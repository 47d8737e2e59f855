"""`imgfs mount`: open the images, start the FUSE session, serve, clean up.

The command returns only once the mount is usable: a child process opens
every image and mounts, then reports "ready" (or the one-line error) through
a pipe; the parent prints any error and exits.  The child keeps serving in
the background (``-f`` serves in the foreground instead).  SIGTERM, SIGINT
and ``umount`` all end in the same clean-up: every node flushed and closed,
so the image locks are gone once the process exits.
"""
from __future__ import annotations

import errno
import logging
import os
import signal
import stat
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import ImgfsError, UsageError
from .options import parse_bool, parse_int, split_opt_string

log = logging.getLogger("imgfs.mount")

#: mount(8)/fstab options that mean nothing to imgfs (or that mount.fuse3
#: and the kernel handle), accepted so fstab lines work
GENERIC_MOUNT_OPTIONS = frozenset({
    "defaults", "auto", "noauto", "user", "nouser", "users", "owner", "group",
    "nofail", "_netdev", "async", "sync", "dirsync", "exec", "noexec", "suid",
    "nosuid", "dev", "nodev", "atime", "noatime", "relatime", "norelatime",
    "strictatime", "nodiratime", "diratime", "lazytime", "silent", "loud",
    "noforget", "auto_unmount", "default_permissions",
})
#: of those, the ones passed on to the kernel mount
KERNEL_FLAGS = frozenset({"nosuid", "nodev", "noexec", "noatime", "dirsync", "sync"})
#: Settings of the mount's backing-device-info in sysfs (root only).
#: read_ahead_kb: 1024 makes sequential reads arrive as 1 MiB requests
#: instead of 128 KiB (the per-request cost dominates a Python filesystem).
#: (The dirty-page limits need no tuning: writes bypass the FUSE page cache,
#: see ImageFS.open.)  Only root can set it.
BDI_SETTINGS = (("read_ahead_kb", "1024"),)


@dataclass
class MountOptions:
    read_only: bool | None = None
    fmt: str | None = None
    name: str | None = None
    snapshot: bool = False
    locking: str = "auto"
    force_share: bool = False
    cache: str = "writeback"
    allow_other: bool = False
    default_permissions: bool = True
    uid: int | None = None
    gid: int | None = None
    umask: int = 0
    snapshots: bool = False
    partitions: bool = False
    #: -o overlay=FILE (absolute once the command has parsed it), and the
    #: backing file name a new overlay records (see overlay.backing_name)
    overlay: str | None = None
    overlay_backing: str | None = None
    key_secret: str | None = None
    passphrase_file: str | None = None
    kernel_flags: list[str] = field(default_factory=list)
    #: --object secret values by id
    secrets: dict[str, bytes] = field(default_factory=dict)
    #: everything else: options for the drivers (offset=, file.locking=, ...)
    driver_options: dict[str, str] = field(default_factory=dict)
    #: mount -s (mount.imgfs): unknown options are ignored, not refused
    sloppy: bool = False
    #: mount.imgfs: mount(8) passes rw whenever ro is not asked for, so rw
    #: is no request: the mount is read-write where the image can be
    #: written, and read-only (as mount(8) mounts write-protected media)
    #: for a read-only format or source
    rw_is_default: bool = False


def _choice(value: str, allowed: tuple[str, ...], name: str) -> str:
    if value not in allowed:
        raise UsageError(f"option '{name}': invalid value '{value}' "
                         f"(expected one of: {', '.join(allowed)})")
    return value


def parse_mount_options(option_strings: list[str], *, sloppy: bool = False,
                        rw_is_default: bool = False) -> MountOptions:
    """Merge every ``-o`` list (later wins) and check each option."""
    merged: dict[str, str] = {}
    for text in option_strings:
        merged.update(split_opt_string(text))
    opts = MountOptions(sloppy=sloppy, rw_is_default=rw_is_default)
    for key, value in merged.items():
        try:
            _apply_option(opts, key, value)
        except UsageError as exc:
            if not sloppy:
                raise
            log.warning("ignoring %s (sloppy mount)", exc)
    if opts.force_share and not opts.read_only:
        raise UsageError("force-share needs a read-only mount (-o ro,force-share)")
    if opts.overlay is not None and opts.snapshot:
        raise UsageError("overlay= and snapshot cannot be used together")
    return opts


def _apply_option(opts: MountOptions, key: str, value: str) -> None:
    if key in ("ro", "rw"):
        if key == "ro" or not opts.rw_is_default:
            opts.read_only = key == "ro"
    elif key == "format":
        opts.fmt = value
    elif key == "name":
        if not value or "/" in value or value in (".", ".."):
            raise UsageError(f"option 'name': invalid file name '{value}'")
        opts.name = value
    elif key in ("snapshot", "force-share", "allow_other", "snapshots", "partitions"):
        setattr(opts, key.replace("-", "_"), parse_bool(value))
    elif key == "locking":
        opts.locking = _choice(value, ("on", "off", "auto"), key)
    elif key == "cache":
        opts.cache = _choice(value, ("writeback", "writethrough", "none"), key)
    elif key in ("uid", "gid"):
        setattr(opts, key, parse_int(value))
    elif key == "umask":
        opts.umask = int(value, 8) & 0o777 if value.isdigit() else _bad(key, value)
    elif key == "overlay":
        if not value:
            raise UsageError("option 'overlay': a file name is needed")
        opts.overlay = value
    elif key == "key-secret":
        opts.key_secret = value
    elif key == "passphrase-file":
        opts.passphrase_file = value
    elif key in GENERIC_MOUNT_OPTIONS or key.startswith(("x-", "comment")):
        if key in KERNEL_FLAGS:
            opts.kernel_flags.append(key)
    else:
        # Anything else is for the drivers (offset=, file.locking=, ...):
        # their schemas refuse unknown names before anything is mounted.
        opts.driver_options[key] = value


def _bad(key: str, value: str) -> int:
    raise UsageError(f"option '{key}': invalid value '{value}'")


def export_names(sources: list[str], opts: MountOptions) -> list[str]:
    from .source import export_name
    if opts.name is not None:
        if len(sources) != 1:
            raise UsageError("name= needs a single SOURCE")
        names = [opts.name]
    else:
        names = [export_name(source) for source in sources]
    names = [name + ".raw" for name in names]
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise UsageError(f"two sources would both appear as '{name}' "
                             f"(rename one, or mount them separately)")
        seen.add(name)
    return names


def check_mountpoint(mountpoint: str, sources: list[str], opts: MountOptions) -> bool:
    """True for a regular-file mountpoint; raises for anything unusable."""
    try:
        info = os.stat(mountpoint)
    except OSError as exc:
        raise UsageError(f"mountpoint {mountpoint}: {exc.strerror}") from None
    if stat.S_ISDIR(info.st_mode):
        return False
    if not stat.S_ISREG(info.st_mode):
        raise UsageError(f"mountpoint {mountpoint}: not a directory or regular file")
    if len(sources) != 1:
        raise UsageError("a regular-file mountpoint takes exactly one SOURCE")
    if opts.name is not None:
        raise UsageError("name= cannot be used with a regular-file mountpoint")
    return True


# -- the serving process ----------------------------------------------------------


def fuse_options(opts: MountOptions, sources: list[str], *,
                 read_only: bool = False) -> set[str]:
    """`read_only`: every image opened read-only (a read-only format, a
    write-protected source), so the mount table says ro as the files do."""
    from .source import without_secrets
    fsname = without_secrets(sources[0]) if len(sources) == 1 else "imgfs"
    fsname = fsname.replace("\\", "\\\\").replace(",", "\\,")
    options = {f"fsname={fsname}", "subtype=imgfs"}
    if opts.default_permissions:
        options.add("default_permissions")
    if opts.allow_other:
        options.add("allow_other")
    if opts.read_only or read_only:
        options.add("ro")
    options.update(opts.kernel_flags)
    return options


def import_pyfuse3() -> Any:
    """Import pyfuse3 without its one slow question.

    At import, pyfuse3 asks importlib.metadata for its own version, which
    imports that package and scans every installed distribution, a large
    part of a mount's start-up (bench/README.md), for a version string
    imgfs never reads.  A stand-in answers "unknown" for that one import."""
    if "pyfuse3" in sys.modules or "importlib.metadata" in sys.modules:
        import pyfuse3
        return pyfuse3

    class PackageNotFoundError(ModuleNotFoundError):
        pass

    def version(name: str) -> str:
        raise PackageNotFoundError(name)

    stand_in = types.ModuleType("importlib.metadata")
    stand_in.PackageNotFoundError = PackageNotFoundError  # type: ignore[attr-defined]
    stand_in.version = version  # type: ignore[attr-defined]
    sys.modules["importlib.metadata"] = stand_in
    try:
        import pyfuse3
    finally:
        del sys.modules["importlib.metadata"]
    return pyfuse3


async def serve(sources: list[str], mountpoint: str, opts: MountOptions,
                report_ready: Callable[[BaseException | None], None]) -> None:
    """Open, mount, tell the parent, serve until unmounted, close everything."""
    pyfuse3 = import_pyfuse3()
    import trio

    async with trio.open_nursery() as nursery:
        nodes: list[Any] = []
        session_done = trio.Event()
        try:
            await _mount(sources, mountpoint, opts, nodes, nursery, session_done)
        except BaseException as exc:
            with trio.CancelScope(shield=True):
                await close_all(nodes, flush=False)
            report_ready(exc)
            nursery.cancel_scope.cancel()
            if isinstance(exc, (ImgfsError, OSError, trio.TooSlowError)):
                return
            raise
        report_ready(None)
        nursery.start_soon(_stop_on_signals)
        await session_done.wait()
        with trio.CancelScope(shield=True):
            pyfuse3.close(unmount=True)
            await close_all(nodes)
        nursery.cancel_scope.cancel()


async def _mount(sources: list[str], mountpoint: str, opts: MountOptions, nodes: list[Any],
                 nursery: Any, session_done: Any) -> None:
    """Open every source into `nodes`, mount, and wait until the kernel's
    INIT is answered.  On failure nothing is left mounted."""
    import pyfuse3
    import trio

    from .fs import FileSource, ImageFS, PartitionFiles, StaticFiles, View

    file_mountpoint = check_mountpoint(mountpoint, sources, opts)
    for wanted, option in ((opts.snapshots, "snapshots"), (opts.partitions, "partitions")):
        if file_mountpoint and wanted:
            raise UsageError(f"{option} needs a directory mountpoint")
    images: list[View] = []
    files: list[FileSource] = [StaticFiles(images)]
    for source, name in zip(sources, export_names(sources, opts), strict=True):
        node = await open_source(source, opts, nursery)
        nodes.append(node)
        images.append(View(name, node, node.read_only, shared=opts.partitions))
        if opts.snapshots:
            snapshots = await open_snapshot_views(source, name, node, opts)
            nodes.extend(snapshot_node for _, snapshot_node in snapshots)
            files.append(StaticFiles([View(snapshot_name, snapshot_node, True)
                                      for snapshot_name, snapshot_node in snapshots]))
        if opts.partitions:
            files.append(PartitionFiles(name[:-len(".raw")], node))
    operations = ImageFS(files, file_mountpoint=file_mountpoint,
                         uid=os.getuid() if opts.uid is None else opts.uid,
                         gid=os.getgid() if opts.gid is None else opts.gid,
                         umask=opts.umask, writethrough=opts.cache != "writeback")
    await operations.refresh()
    operations.initialized = trio.Event()
    # Resolved before mounting: once mounted, a stat() of the mountpoint
    # waits for the session we have not started serving.
    real_mountpoint = os.path.realpath(mountpoint)
    devices_before = fuse_devices()
    try:
        pyfuse3.init(operations, mountpoint, fuse_options(
            opts, sources, read_only=all(view.read_only for view in images)))
    except RuntimeError as exc:
        # libfuse has already printed why (no /dev/fuse access, no
        # fusermount3, mountpoint not allowed...)
        raise ImgfsError(f"cannot mount on {mountpoint} ({exc})") from None
    opened = fuse_devices() - devices_before
    operations.awake.client_fd = opened.pop() if len(opened) == 1 else None
    try:
        nursery.start_soon(_run_session, session_done, worker_tasks(nodes))
        if any(leaf.driver.busy_poll for leaf in leaves(nodes)):
            nursery.start_soon(operations.awake.run)
        with trio.fail_after(30):
            await operations.initialized.wait()
    except BaseException:
        pyfuse3.close(unmount=True)
        raise
    # The INIT reply, written right after init() returned, set the read-ahead
    # from its own max_readahead: tune the device only now.
    await trio.sleep(0)
    tune_bdi(real_mountpoint)


def fuse_devices() -> set[int]:
    """This process's descriptors open on /dev/fuse (pyfuse3 does not say
    which one its session reads)."""
    devices = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                devices.add(int(name))
        except OSError:
            pass        # closed meanwhile (the listing's own descriptor)
    return devices


def worker_tasks(nodes: list[Any]) -> int:
    """How many pyfuse3 workers take requests from /dev/fuse at once.

    With local files every request runs to completion on the trio thread
    (pread/pwrite block it), so a second worker cannot overlap anything and
    only adds a lock hand-over per request, which shows in 4 KiB random
    reads (bench/README.md).  A network source keeps
    many requests in flight.
    """
    if any(leaf.driver.async_io for leaf in leaves(nodes)):
        return 64
    return 1


def leaves(nodes: list[Any]) -> list[Any]:
    """The protocol nodes under `nodes`."""
    found = []
    for node in nodes:
        children = list(node.children.values())
        found.extend(leaves(children) if children else [node])
    return found


async def _run_session(session_done: Any, max_tasks: int) -> None:
    import pyfuse3
    try:
        await pyfuse3.main(max_tasks=max_tasks)
    finally:
        session_done.set()


async def open_source(source: str, opts: MountOptions, nursery: Any) -> Any:
    from .graph import open_image
    from .node import OpenContext
    from .overlay import persistent_overlay, snapshot_overlay

    overlaid = opts.snapshot or opts.overlay is not None
    ctx = OpenContext(read_only=True if overlaid else opts.read_only,
                      key_secret=opts.key_secret, passphrase_file=opts.passphrase_file,
                      locking=opts.locking, force_share=opts.force_share,
                      cache=opts.cache, secrets=opts.secrets,
                      interactive=sys.stdin.isatty(), nursery=nursery, sloppy=opts.sloppy)
    node = await open_image(source, ctx, fmt=opts.fmt, options=opts.driver_options)
    try:
        if opts.snapshot:
            node = await snapshot_overlay(node)
        elif opts.overlay is not None:
            node = await persistent_overlay(node, opts.overlay, source,
                                            opts.overlay_backing or source,
                                            read_only=bool(opts.read_only))
    except BaseException:
        await node.aclose()
        raise
    if overlaid:
        node.set_read_only(bool(opts.read_only))
    return node


async def open_snapshot_views(source: str, name: str, node: Any,
                              opts: MountOptions) -> list[tuple[str, Any]]:
    """``-o snapshots``: each internal snapshot as ``<name>@<tag>.raw``, read-only.

    A snapshot's tables never change while the image is open (writes to the
    live image copy shared clusters first), so a second, read-only driver
    instance can serve it; it takes no locks of its own, the live image's
    already cover the file."""
    from .graph import open_image
    from .node import OpenContext

    found = node.snapshot_holder()
    if found is None:
        raise UsageError(f"{node.format_name} images have no internal snapshots "
                         "(-o snapshots)")
    holder, prefix = found
    snapshots = holder.internal_snapshots()
    stem = name[:-len(".raw")]
    views = []
    for snapshot in snapshots:
        ctx = OpenContext(read_only=True, locking="off", cache=opts.cache,
                          secrets=opts.secrets, key_secret=opts.key_secret,
                          passphrase_file=opts.passphrase_file)
        view = await open_image(source, ctx, fmt=node.format_name,
                                options={**opts.driver_options, f"{prefix}snapshot": snapshot.id})
        tag = (snapshot.name or snapshot.id).replace("/", "_")
        views.append((f"{stem}@{tag}.raw", view))
    return views


async def close_all(nodes: list[Any], *, flush: bool = True) -> None:
    for node in nodes:
        try:
            if flush:
                await node.flush()
        except ImgfsError as exc:
            log.error("%s: flush at unmount failed: %s", node.filename, exc)
        try:
            await node.aclose()
        except ImgfsError as exc:
            log.error("%s: close failed: %s", node.filename, exc)


async def _stop_on_signals() -> None:
    import pyfuse3
    import trio
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for _ in signals:
            # Ends pyfuse3.main(); the clean-up in serve() then runs.
            pyfuse3.terminate()
            return


def tune_bdi(mountpoint: str) -> None:
    """Apply BDI_SETTINGS to the mount's device (quietly nothing unless root).

    `mountpoint` must already be resolved (see serve)."""
    device = _mount_device(mountpoint)
    if device is None:
        return
    for name, value in BDI_SETTINGS:
        try:
            with open(f"/sys/class/bdi/{device}/{name}", "w") as control:
                control.write(value)
        except OSError as exc:
            log.debug("cannot set %s: %s", name, exc)


def _mount_device(mountpoint: str) -> str | None:
    """major:minor of the FUSE mount at `mountpoint`, from mountinfo (a
    stat() would send a FUSE request we are not yet serving)."""
    target = mountpoint
    found = None
    try:
        with open("/proc/self/mountinfo") as table:
            for line in table:
                fields = line.split()
                if len(fields) > 4 and _unescape(fields[4]) == target and " fuse" in line:
                    found = fields[2]
    except OSError:
        return None
    return found


def _unescape(path: str) -> str:
    return path.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n") \
        .replace("\\134", "\\")


def exit_status(exc: BaseException) -> int:
    """2 for usage errors, 1 for everything else (as the CLI)."""
    return 2 if isinstance(exc, UsageError) else 1


def describe_error(exc: BaseException) -> str:
    from .source import display_name
    if isinstance(exc, ImgfsError):
        # (as the CLI: no prefix when the message names its source already)
        where = display_name(exc.path) if exc.path and exc.path not in str(exc) else None
        return f"{where}: {exc}" if where else str(exc)
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc)
        if exc.errno == errno.EPERM and not os.getuid() == 0:
            reason += " (is fusermount3 installed and /dev/fuse accessible?)"
        return f"{exc.filename}: {reason}" if exc.filename else reason
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    return f"internal error: {exc!r}"
