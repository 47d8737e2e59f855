"""imgfs.foreign_io's completions, with a library played by a thread that
completes requests in any order: no server needed.  The real libraries
(libgfapi, librbd) are exercised by tests/drivers/test_gluster.py and
test_rbd.py."""
from __future__ import annotations

import ctypes
import errno
import os
import random
import threading
import time
from collections.abc import Iterator

import pytest
import trio

from imgfs.errors import Unreachable
from imgfs.foreign_io import (
    TICK,
    UNFILLED_FROM,
    ForeignCompletions,
    QueuedCompletions,
    read_buffer,
)
from imgfs.spin import Awake


class FakeLibrary:
    """Completes the requests it was given on its own thread, in the order
    `release` says (a callback's thread, as libgfapi's)."""

    def __init__(self) -> None:
        self.events = QueuedCompletions()
        self.started: list[int] = []

    def start(self, key: int) -> None:
        self.started.append(key)

    def release(self, keys: list[int], result: int = 4096, error: int = 0) -> None:
        def complete() -> None:
            for key in keys:
                self.events.report(key, result, error)
        thread = threading.Thread(target=complete)
        thread.start()
        thread.join()


@pytest.fixture(params=[False, True], ids=["sleeping", "spinning"])
def spin(request: pytest.FixtureRequest) -> Iterator[bool]:
    """Whether the poller spins: as inside a mount whose Awake runs, with
    a polled request in flight (ReplySpin)."""
    if not request.param:
        yield False
        return
    Awake.running = awake = Awake()
    try:
        with awake:
            yield True
    finally:
        Awake.running = None


async def wait_started(library: FakeLibrary, count: int) -> None:
    while len(library.started) < count:
        await trio.sleep(0.001)


def test_many_requests_in_flight_complete_in_any_order(spin: bool) -> None:
    """Every waiting task gets its own result, whichever task polls; the
    library completes them from another thread, out of order."""
    library = FakeLibrary()
    completions = ForeignCompletions(library.events, spin=spin)
    results: dict[int, int] = {}

    async def request(index: int) -> None:
        results[index] = await completions.run(library.start, keep=bytearray(1))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for index in range(32):
                nursery.start_soon(request, index)
            await wait_started(library, 32)
            assert completions.in_flight == 32
            keys = list(library.started)
            random.Random(1).shuffle(keys)
            for chunk in range(0, 32, 5):
                library.release(keys[chunk:chunk + 5])
                await trio.sleep(0.001)
        assert completions.in_flight == 0

    trio.run(main)
    assert sorted(results) == list(range(32)) and set(results.values()) == {4096}


def test_a_failed_request_raises_its_errno(spin: bool) -> None:
    library = FakeLibrary()
    completions = ForeignCompletions(library.events, spin=spin)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(library_fails, library)
            with pytest.raises(OSError) as failure:
                await completions.run(library.start)
            assert failure.value.errno == errno.ENOTCONN

    async def library_fails(library: FakeLibrary) -> None:
        await wait_started(library, 1)
        library.release(library.started, -1, errno.ENOTCONN)

    trio.run(main)


def test_a_request_without_answer_times_out_and_keeps_its_buffer(spin: bool) -> None:
    """Unreachable after the timeout (late by at most a tick); the buffer
    stays referenced until the library completes the request, and the late
    completion is then dropped without harm."""
    library = FakeLibrary()
    completions = ForeignCompletions(library.events, spin=spin)
    buffer = bytearray(4096)

    async def main() -> None:
        started = time.monotonic()
        with pytest.raises(Unreachable):
            await completions.run(library.start, keep=buffer, timeout=0.3)
        assert 0.3 <= time.monotonic() - started < 0.3 + 2 * TICK + 0.2
        assert completions.in_flight == 1        # the library still has it
        library.release(library.started)
        # the next request collects the late completion
        async with trio.open_nursery() as nursery:
            nursery.start_soon(completions.run, library.start)
            await wait_started(library, 2)
            library.release(library.started[1:])
        assert completions.in_flight == 0

    trio.run(main)


def test_a_cancelled_poller_hands_polling_over(spin: bool) -> None:
    """The task polling is cancelled while others wait: one of them polls
    in turn, and its request completes."""
    library = FakeLibrary()
    completions = ForeignCompletions(library.events, spin=spin)
    done: list[int] = []

    async def request(scope_box: list[trio.CancelScope] | None) -> None:
        with trio.CancelScope() as scope:
            if scope_box is not None:
                scope_box.append(scope)
            done.append(await completions.run(library.start))

    async def main() -> None:
        first: list[trio.CancelScope] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(request, first)
            await wait_started(library, 1)
            nursery.start_soon(request, None)
            await wait_started(library, 2)
            first[0].cancel()
            await trio.sleep(0.01)
            library.release(library.started)
        assert done == [4096]
        assert completions.in_flight == 0

    trio.run(main)


def test_close_releases_the_descriptors() -> None:
    library = FakeLibrary()

    async def main() -> None:
        before = len(os.listdir("/proc/self/fd"))
        completions = ForeignCompletions(library.events)
        assert len(os.listdir("/proc/self/fd")) == before + 2
        completions.close()
        completions.close()
        assert len(os.listdir("/proc/self/fd")) == before

    trio.run(main)


def test_read_buffer_is_a_writable_bytearray_of_the_length_asked() -> None:
    """Large buffers skip the zero-fill but are ordinary bytearrays the
    library can fill through ctypes and callers can slice and join."""
    for length in (0, 1, 4096, UNFILLED_FROM - 1, UNFILLED_FROM, 1 << 20):
        buffer = read_buffer(length)
        assert type(buffer) is bytearray and len(buffer) == length
        if length:
            view = (ctypes.c_char * length).from_buffer(buffer)
            ctypes.memset(view, 0x5A, length)
            assert bytes(buffer[:1]) == b"Z" and buffer.count(0x5A) == length
    assert read_buffer(4096) == bytes(4096)     # small ones are zeros
