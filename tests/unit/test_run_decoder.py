"""Large transformed blocks are decoded off the trio thread, small ones in place."""
from __future__ import annotations

import threading
import zlib

import trio

from imgfs.mapped import DECODE_INLINE_LIMIT, run_decoder


def test_large_blocks_decode_on_a_worker_thread_and_small_ones_in_place() -> None:
    threads: list[threading.Thread] = []

    def inflate(stored: bytes) -> bytes:
        threads.append(threading.current_thread())
        return zlib.decompress(stored)

    async def main() -> None:
        small, large = b"s" * 4096, b"l" * (DECODE_INLINE_LIMIT + 1)
        assert await run_decoder(len(small), inflate, zlib.compress(small)) == small
        assert await run_decoder(len(large), inflate, zlib.compress(large)) == large

    trio.run(main)
    assert threads[0] is threading.main_thread()
    assert threads[1] is not threading.main_thread()
