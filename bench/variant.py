#!/usr/bin/env python3
"""imgfs with a FUSE setting changed from outside, for A/B benchmarks.

    IMGFS_VARIANT=max_tasks=1,direct_io=off,writeback=on,read_ahead_kb=4096 \\
        .venv/bin/python bench/run.py --imgfs bench/variant.py --repeat 3

Runs the installed imgfs CLI unchanged, after patching, in this process
only (the mount daemon is a fork of it, so it inherits the patches):

* max_tasks=N      pyfuse3.main(max_tasks=N): how many worker tasks take
                   requests from /dev/fuse (pyfuse3's default is 99; with
                   more than one, every request passes a trio Lock between
                   two workers)
* direct_io=off|all  FOPEN_DIRECT_IO on no open, or on every open (imgfs's
                   own choice: on opens for writing, see ImageFS.open)
* writeback=on     the kernel's FUSE writeback cache (with direct_io=off,
                   strict_limit=0 and max_ratio=10 this is imgfs before
                   writes went direct)
* reuse_buffers=off  glibc's default malloc thresholds (imgfs.cli,
                   reuse_large_buffers)
* write_behind=N   MiB written to a host file between starts of its
                   writeback (0: off; drivers/file.py, WriteBehind)
* read_ahead_kb=N  the read-ahead imgfs sets on its mount, which is the
                   size (up to 1 MiB) and the pipelining of sequential reads
* strict_limit=0|1, max_ratio=N, max_bytes=N, min_bytes=N   the mount's
                   dirty-page limits (FUSE's own default is strict_limit=1,
                   max_ratio=1)
* floor=PROTO      bench/floors/PROTO.py's install(): small reads of that
                   protocol's driver go through a bare loop over its client
                   library instead of imgfs's request path, to measure the
                   best a Python FUSE daemon could do (bench/floors/README)

Nothing in imgfs is edited; an unknown switch is an error.
"""
from __future__ import annotations

import os
import sys
from typing import Any


def patch_max_tasks(value: str) -> None:
    import pyfuse3
    original = pyfuse3.main

    async def main(min_tasks: int = 1, max_tasks: int = 99) -> None:
        await original(min_tasks=min_tasks, max_tasks=int(value))
    pyfuse3.main = main  # type: ignore[assignment]


def patch_writeback(value: str) -> None:
    if value not in ("on", "off"):
        raise SystemExit(f"variant: writeback={value}: on or off")
    import pyfuse3
    original = pyfuse3.init

    def init(operations: Any, *args: Any) -> None:
        operations.enable_writeback_cache = value == "on"
        original(operations, *args)
    pyfuse3.init = init  # type: ignore[assignment]


def patch_bdi(name: str) -> Any:
    def patch(value: str) -> None:
        import imgfs.mount
        settings = dict(imgfs.mount.BDI_SETTINGS)
        settings[name] = value
        imgfs.mount.BDI_SETTINGS = tuple(settings.items())
    return patch


def patch_direct_io(value: str) -> None:
    if value not in ("off", "all"):
        raise SystemExit(f"variant: direct_io={value}: off or all")
    from imgfs.fs import ImageFS
    original = ImageFS.open

    async def open(self: Any, inode: int, flags: int, ctx: Any) -> Any:
        info = await original(self, inode, flags, ctx)
        info.direct_io = value == "all"
        return info
    ImageFS.open = open  # type: ignore[method-assign]


def patch_reuse_buffers(value: str) -> None:
    if value != "off":
        raise SystemExit(f"variant: reuse_buffers={value}: only off")
    import imgfs.cli
    imgfs.cli.reuse_large_buffers = lambda: None


def patch_write_behind(value: str) -> None:
    from imgfs.drivers import file
    file.WRITE_BEHIND_BYTES = int(value) << 20


def patch_floor(value: str) -> None:
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "floors", f"{value}.py")
    if not os.path.exists(path):
        raise SystemExit(f"variant: floor={value}: no {path}")
    spec = importlib.util.spec_from_file_location(f"floor_{value}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.install()


PATCHES = {"floor": patch_floor, "write_behind": patch_write_behind, "direct_io": patch_direct_io,
           "reuse_buffers": patch_reuse_buffers,
           "max_tasks": patch_max_tasks, "writeback": patch_writeback,
           "read_ahead_kb": patch_bdi("read_ahead_kb"),
           **{name: patch_bdi(name) for name in (
               "strict_limit", "max_ratio", "max_bytes", "min_bytes")}}


def apply(spec: str) -> None:
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        if key not in PATCHES:
            raise SystemExit(f"variant: unknown switch {key!r} (known: {', '.join(PATCHES)})")
        PATCHES[key](value)


if __name__ == "__main__":
    apply(os.environ.get("IMGFS_VARIANT", ""))
    from imgfs.cli import main as imgfs_main
    sys.exit(imgfs_main())
