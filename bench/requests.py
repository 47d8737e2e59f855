#!/usr/bin/env python3
"""Per-request cost of one imgfs source, in process: no FUSE, no fio.

    bench/requests.py SOURCE [--requests N] [--depth D] [--size 4k] [--poll]
    bench/requests.py SOURCE --sequential read|write [--mib M] [--size 1M]

Opens SOURCE (any URL or file imgfs takes) as raw through imgfs's block
graph, then times requests straight into the top node: random reads of
`--size` at queue depth `--depth`, or sequential reads or writes (writes
end with a flush).  Prints requests per second (or MB/s), wall time per
request and the process's CPU time per request or per MiB (process_time:
the library threads of a protocol driver count, child processes do not).
`--poll` keeps trio's loop awake around each random read as a mount of a
network source does (imgfs/spin.py's Awake, which readers' ReplySpin
follows).

Why: at queue depth 1 the daemon's CPU per request decides a random-read
ratio against qemu-storage-daemon, and the CPU figure survives other load
on the machine far better than a rate does.  Set the same requests
against QEMU's own block layer with `qemu-img bench` (see README.md).
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from typing import Any

import trio

from imgfs.graph import open_image
from imgfs.node import OpenContext
from imgfs.options import parse_size
from imgfs.spin import Awake


async def random_reads(node: Any, args: argparse.Namespace) -> str:
    chooser = random.Random(1)
    offsets = [chooser.randrange(node.size // args.size) * args.size
               for _ in range(args.requests)]
    for offset in offsets[:200]:            # connections warm, tables cached
        await node.read(offset, args.size)
    todo, awake = iter(offsets), Awake()

    async def worker() -> None:
        for offset in todo:
            with awake.around(offset, args.size):
                await node.read(offset, args.size)

    async with trio.open_nursery() as polling:
        if args.poll:
            polling.start_soon(awake.run)
        wall, cpu = time.perf_counter(), time.process_time()
        async with trio.open_nursery() as nursery:
            for _ in range(args.depth):
                nursery.start_soon(worker)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        polling.cancel_scope.cancel()
    count = args.requests
    return (f"random reads of {args.size} B at depth {args.depth}: {count / wall:.0f}/s, "
            f"{wall / count * 1e6:.1f} us wall and {cpu / count * 1e6:.1f} us CPU per request")


async def sequential(node: Any, args: argparse.Namespace) -> str:
    data = bytes(range(256)) * (args.size // 256 + 1)
    data = data[:args.size]
    count = args.mib * (1 << 20) // args.size
    offset = 0
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(count):
        if args.sequential == "read":
            await node.read(offset, args.size)
        else:
            await node.write(offset, data)
        offset = (offset + args.size) % (node.size - node.size % args.size)
    if args.sequential == "write":
        await node.flush()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    mib = count * args.size / (1 << 20)
    return (f"sequential {args.sequential}s of {args.size} B: {mib * (1 << 20) / wall / 1e6:.0f} "
            f"MB/s, {cpu / mib * 1e6:.0f} us CPU per MiB")


async def main(args: argparse.Namespace) -> None:
    read_only = args.sequential != "write"
    node = await open_image(args.source, OpenContext(read_only=read_only), fmt="raw")
    try:
        run = sequential if args.sequential else random_reads
        print(await run(node, args))
    finally:
        await node.aclose()


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source")
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--depth", type=int, default=1)
    parser.add_argument("--sequential", choices=("read", "write"))
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--size", type=parse_size, default=None)
    parser.add_argument("--poll", action="store_true",
                        help="keep the loop awake around random reads, as a mount does")
    args = parser.parse_args(argv)
    if args.size is None:
        args.size = (1 << 20) if args.sequential else 4096
    return args


if __name__ == "__main__":
    trio.run(main, parse_args(sys.argv[1:]))
