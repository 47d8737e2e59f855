"""`imgfs convert`: copy what an image contains into a new image.

The source is read through the whole graph (backing chains included); ranges
the source reports as zero or unallocated everywhere are skipped, as are
runs of zero bytes of at least ``-S`` bytes, so the target stays sparse.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any

import trio

from .block import Status
from .errors import ImgfsError, Unsupported
from .graph import create_image, open_image
from .node import Node, OpenContext

CHUNK = 2 * 1024 * 1024
#: with -B, the unit compared against the backing file (a common cluster size)
BACKING_GRANULE = 64 * 1024


async def convert(args: argparse.Namespace, options: dict[str, Any], sparse: int) -> None:
    from .commands import cache_mode, image_source, make_context
    src_ctx = make_context(args, read_only=True)
    source = await open_image(image_source(args, args.source), src_ctx, fmt=args.fmt)
    if args.snapshot is not None:
        source = await open_snapshot(args, source, src_ctx)
    cache = cache_mode(args, read_only=False)
    try:
        if not args.skip_create:
            await create_image(args.target, args.out_fmt, source.size, options,
                               OpenContext(read_only=False, secrets=src_ctx.secrets,
                                           cache=cache))
        # The new image opens with the secret it was created with (-o key-secret).
        key_secret = options.get("key-secret") or options.get("encrypt.key-secret")
        target = await open_image(target_source(args), OpenContext(
            read_only=False, secrets=src_ctx.secrets, key_secret=key_secret, cache=cache),
            fmt=None if args.target_image_opts else args.out_fmt)
        try:
            if target.size < source.size:
                raise ImgfsError("output file is smaller than input file",
                                 path=str(args.target))
            # A new image reads as zeros, unless encrypted (it reads as
            # noise: QEMU's bdrv_has_zero_init); an existing one (-n) only
            # when the user says so (--target-is-zero).
            zero_init = args.target_is_zero if args.skip_create else \
                target.driver.has_zero_init
            await copy_image(source, target, Copy(
                sparse=sparse, compress=args.compress, zero_init=zero_init,
                keep_backing=bool(args.backing), workers=args.workers,
                in_order=not args.out_of_order),
                progress=args.progress and not args.quiet)
            await target.flush()
        finally:
            await target.aclose()
    finally:
        await source.aclose()


async def open_snapshot(args: argparse.Namespace, image: Node, ctx: OpenContext) -> Node:
    """``-l``: the internal snapshot of `image` that ID_OR_NAME, or
    snapshot.id= and/or snapshot.name=, name (read-only), in its place."""
    from .commands import image_source
    wanted = snapshot_selector(args.snapshot)
    found = image.snapshot_holder()
    try:
        if found is None:
            raise ImgfsError(f"Failed to load snapshot: {image.format_name} images have no "
                             "internal snapshots")
        holder, prefix = found
        for snapshot in holder.internal_snapshots():
            if all(value in (snapshot.id, snapshot.name) if key == "either"
                   else getattr(snapshot, key) == value for key, value in wanted.items()):
                return await open_image(image_source(args, args.source), ctx,
                                        fmt=image.format_name,
                                        options={f"{prefix}snapshot": snapshot.id})
        raise ImgfsError("Failed to load snapshot: Can't find snapshot")
    finally:
        await image.aclose()


def snapshot_selector(text: str) -> dict[str, str]:
    """-l's argument: {"id": .., "name": ..} from snapshot.id=/snapshot.name=,
    or {"either": text} for a bare ID or name."""
    if not text.startswith("snapshot.") or "=" not in text:
        return {"either": text}
    wanted = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key not in ("snapshot.id", "snapshot.name"):
            raise ImgfsError(f"Invalid parameter '{key}'")
        wanted[key.removeprefix("snapshot.")] = value
    return wanted


def target_source(args: argparse.Namespace) -> str | dict[str, Any]:
    if not args.target_image_opts:
        return str(args.target)
    from .source import parse_image_opts
    return parse_image_opts(args.target)


@dataclass(frozen=True)
class Copy:
    """How `copy_image` writes (qemu-img convert's options)."""

    #: zero runs at least this long are not written (0: every byte is)
    sparse: int = 4096
    compress: bool = False
    #: the target reads as zeros already: zero ranges need no write
    zero_init: bool = True
    #: write only what differs from the target's backing file (-B)
    keep_backing: bool = False
    #: chunks read at once (-m)
    workers: int = 8
    #: chunks written in the order of their offsets (without -W), so that
    #: a format allocating as it goes lays the image out in order
    in_order: bool = True


async def copy_image(source: Node, target: Node, how: Copy, *, progress: bool = False) -> None:
    """Copy every range of `source` into `target`, `how.workers` chunks at once."""
    if how.compress and not target.driver.can_write_compressed:
        raise Unsupported(f"{target.format_name} images cannot hold compressed data")
    write_compressed = target.write_compressed if how.compress else None
    size = source.size
    done = 0
    turn = Turns()

    async def copy_chunk(number: int, offset: int, length: int, status: Status) -> None:
        nonlocal done
        data = await source.read(offset, length) if status & Status.DATA or \
            how.keep_backing else None
        if how.in_order:
            await turn.wait_for(number)
        try:
            await write_chunk(target, offset, length, data, how, write_compressed)
        finally:
            turn.done(number)
        done += length
        if progress:
            print(f"    ({100.0 * done / size if size else 100:.2f}/100%)",
                  end="\r", file=sys.stdout, flush=True)

    limit = trio.CapacityLimiter(max(1, how.workers))
    # The first failure ends the copy, as itself (not in an exception group).
    failures: list[Exception] = []

    async def guarded(work: Any, *args: Any) -> None:
        try:
            await work(*args)
        except Exception as exc:
            failures.append(exc)
            nursery.cancel_scope.cancel()

    async def limited(*chunk: Any) -> None:
        try:
            await guarded(copy_chunk, *chunk)
        finally:
            limit.release_on_behalf_of(chunk[0])

    async def start_chunks() -> None:
        offset, number = 0, 0
        while offset < size:
            length, status, _ = await source.block_status_above(
                offset, min(CHUNK, size - offset))
            await limit.acquire_on_behalf_of(number)
            nursery.start_soon(limited, number, offset, length, status)
            offset, number = offset + length, number + 1

    async with trio.open_nursery() as nursery:
        await guarded(start_chunks)
    if failures:
        raise failures[0]
    if progress:
        print(file=sys.stdout)


class Turns:
    """Chunk N may write once chunks 0..N-1 have."""

    def __init__(self) -> None:
        self.next = 0
        self.finished: set[int] = set()
        self.changed = trio.Event()

    async def wait_for(self, number: int) -> None:
        while self.next != number:
            await self.changed.wait()

    def done(self, number: int) -> None:
        self.finished.add(number)
        while self.next in self.finished:
            self.finished.discard(self.next)
            self.next += 1
        self.changed.set()
        self.changed = trio.Event()


async def write_chunk(target: Node, offset: int, length: int, data: bytes | None,
                      how: Copy, write_compressed: Any) -> None:
    if how.keep_backing:
        assert data is not None
        await _write_over_backing(target, offset, data, write_compressed)
    elif data is not None:
        await _write_run(target, offset, data, how, write_compressed)
    elif not how.sparse:
        # -S 0: a fully allocated target, zeros written out as data
        await target.write(offset, bytes(length))
    elif not how.zero_init:
        await target.write_zeroes(offset, length, may_unmap=True)


async def _write_over_backing(target: Node, offset: int, data: bytes,
                              write_compressed: Any) -> None:
    """``-B``: write what differs from the target's backing file, in
    BACKING_GRANULE pieces; zeros over backing data become zero writes."""
    length = len(data)
    below = await target.read_unallocated(offset, length)
    for start in range(0, length, BACKING_GRANULE):
        piece = data[start:start + BACKING_GRANULE]
        if piece == below[start:start + BACKING_GRANULE]:
            continue
        if write_compressed is not None:
            await write_compressed(offset + start, piece)
        elif piece.count(0) == len(piece):
            await target.write_zeroes(offset + start, len(piece))
        else:
            await target.write(offset + start, piece)


async def _write_run(target: Node, offset: int, data: bytes, how: Copy,
                     write_compressed: Any) -> None:
    """Write `data`, skipping zero runs of `how.sparse` bytes where the
    target already reads as zeros, and writing them as zeroes elsewhere."""
    if write_compressed is not None:
        await write_compressed(offset, data)
        return
    if not how.sparse:
        await target.write(offset, data)
        return
    written = 0
    for run_start, run_end in _nonzero_runs(data, how.sparse):
        if run_start > written and not how.zero_init:
            await target.write_zeroes(offset + written, run_start - written, may_unmap=True)
        await target.write(offset + run_start, data[run_start:run_end])
        written = run_end
    if written < len(data) and not how.zero_init:
        await target.write_zeroes(offset + written, len(data) - written, may_unmap=True)


def _nonzero_runs(data: bytes, granule: int) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    zero = bytes(granule)
    run_start = None
    for pos in range(0, len(data), granule):
        piece = data[pos:pos + granule]
        is_zero = piece == zero[:len(piece)]
        if not is_zero and run_start is None:
            run_start = pos
        elif is_zero and run_start is not None:
            runs.append((run_start, pos))
            run_start = None
    if run_start is not None:
        runs.append((run_start, len(data)))
    return runs
