"""`imgfs convert`: copy what an image contains into a new image.

The source is read through the whole graph (backing chains included); ranges
the source reports as zero or unallocated everywhere are skipped, as are
runs of zero bytes of at least ``-S`` bytes, so the target stays sparse.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from .block import Status
from .errors import Unsupported
from .graph import create_image, open_image
from .node import Node, OpenContext

CHUNK = 2 * 1024 * 1024
#: with -B, the unit compared against the backing file (a common cluster size)
BACKING_GRANULE = 64 * 1024


async def convert(args: argparse.Namespace, options: dict[str, Any], sparse: int) -> None:
    from .commands import cache_mode, image_source, make_context
    src_ctx = make_context(args, read_only=True)
    source = await open_image(image_source(args, args.source), src_ctx, fmt=args.fmt)
    cache = cache_mode(args, read_only=False)
    try:
        await create_image(args.target, args.out_fmt, source.size, options,
                           OpenContext(read_only=False, secrets=src_ctx.secrets, cache=cache))
        # The new image opens with the secret it was created with (-o key-secret).
        key_secret = options.get("key-secret") or options.get("encrypt.key-secret")
        target = await open_image(args.target, OpenContext(read_only=False,
                                                           secrets=src_ctx.secrets,
                                                           key_secret=key_secret,
                                                           cache=cache),
                                  fmt=args.out_fmt)
        try:
            # Skipping zeros assumes a new image reads as zeros; an encrypted
            # one reads as noise (QEMU's bdrv_has_zero_init).
            if not target.driver.has_zero_init:
                sparse = 0
            await copy_image(source, target, sparse=sparse, compress=args.compress,
                             progress=args.progress and not args.quiet,
                             keep_backing=bool(args.backing))
            await target.flush()
        finally:
            await target.aclose()
    finally:
        await source.aclose()


async def copy_image(source: Node, target: Node, *, sparse: int, compress: bool,
                     progress: bool, keep_backing: bool) -> None:
    if compress and not target.driver.can_write_compressed:
        raise Unsupported(f"{target.format_name} images cannot hold compressed data")
    write_compressed = target.write_compressed if compress else None
    offset, size = 0, source.size
    while offset < size:
        length, status, _ = await source.block_status_above(offset, min(CHUNK, size - offset))
        if keep_backing:
            await _write_over_backing(source, target, offset, length, write_compressed)
        elif status & Status.DATA:
            data = await source.read(offset, length)
            await _write_run(target, offset, data, sparse, write_compressed)
        elif not sparse:
            # -S 0: a fully allocated target, zeros written out as data
            await target.write(offset, bytes(length))
        offset += length
        if progress:
            print(f"    ({100.0 * offset / size if size else 100:.2f}/100%)",
                  end="\r", file=sys.stdout, flush=True)
    if progress:
        print(file=sys.stdout)


async def _write_over_backing(source: Node, target: Node, offset: int, length: int,
                              write_compressed: Any) -> None:
    """``-B``: write what differs from the target's backing file, in
    BACKING_GRANULE pieces; zeros over backing data become zero writes."""
    data = await source.read(offset, length)
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


async def _write_run(target: Node, offset: int, data: bytes, sparse: int,
                     write_compressed: Any) -> None:
    """Write `data`, skipping zero runs of `sparse` bytes (a fresh target
    already reads as zeros there)."""
    if write_compressed is not None:
        await write_compressed(offset, data)
        return
    if not sparse:
        await target.write(offset, data)
        return
    for run_start, run_end in _nonzero_runs(data, sparse):
        await target.write(offset + run_start, data[run_start:run_end])


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
