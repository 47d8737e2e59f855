"""imgfs.spin.Awake: trio's loop kept awake around requests, windows adapted."""
from __future__ import annotations

import os
import time

import trio

from imgfs.spin import FIRST_WINDOW, MAX_WINDOW, Awake


def test_quick_events_grow_the_window_up_to_the_maximum() -> None:
    awake = Awake()
    for _ in range(40):
        awake._adapt(False, FIRST_WINDOW // 2)
    assert awake.windows == [MAX_WINDOW, FIRST_WINDOW]


def test_slow_events_shrink_the_window_to_nothing_and_quick_ones_restore_it() -> None:
    awake = Awake()
    awake.windows[True] = MAX_WINDOW
    for _ in range(40):
        awake._adapt(True, 2 * MAX_WINDOW)
    assert awake.windows[True] == 0
    awake._adapt(True, 1_000)
    assert awake.windows[True] == FIRST_WINDOW


def test_while_awake_the_loop_never_sleeps_and_still_sees_every_descriptor() -> None:
    """With the window at its maximum, a pipe written from another thread
    is seen by a task waiting in trio (the loop polls while it spins), and
    once no event comes the loop goes back to sleep (no busy CPU)."""
    awake = Awake()
    awake.windows = [MAX_WINDOW, MAX_WINDOW]
    reader, writer = os.pipe()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(awake.run)
            await trio.sleep(0.01)
            with awake:
                started = time.perf_counter_ns()
                await trio.to_thread.run_sync(os.write, writer, b"x")
                await trio.lowlevel.wait_readable(reader)
                assert os.read(reader, 1) == b"x"
            assert time.perf_counter_ns() - started < 1e9
            await trio.sleep(0.05)          # windows long over: asleep again
            cpu = time.process_time()
            await trio.sleep(0.2)
            assert time.process_time() - cpu < 0.05
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        os.close(reader)
        os.close(writer)


def test_in_flight_counts_requests_also_when_they_fail() -> None:
    awake = Awake()
    try:
        with awake:
            assert awake.in_flight == 1
            raise OSError("the request failed")
    except OSError:
        pass
    assert awake.in_flight == 0


def test_large_requests_and_their_tails_are_not_polled() -> None:
    awake = Awake()
    assert awake.around(0, 4096) is not awake            # not running: nothing tracked

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(awake.run)
            await trio.sleep(0.01)
            assert awake.around(0, 4096) is awake
            assert awake.around(0, 1048560) is not awake
            assert awake.around(1048560, 16) is not awake    # the tail the kernel cut off
            assert awake.around(1048576 + 8192, 4096) is awake
            nursery.cancel_scope.cancel()

    trio.run(main)
