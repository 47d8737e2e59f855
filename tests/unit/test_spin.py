"""imgfs.spin: trio's loop kept awake around requests (Awake), a reader
spinning on its socket (ReplySpin), windows adapted."""
from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator

import pytest
import trio

from imgfs.spin import FIRST_WINDOW, MAX_WINDOW, Awake, ReplySpin


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


@contextlib.contextmanager
def polling(client_fd: int | None = None) -> Iterator[None]:
    """As inside a mount whose Awake runs, with a polled request in flight
    (and the client's requests arriving on `client_fd`)."""
    awake = Awake()
    awake.client_fd = client_fd
    Awake.running = awake
    try:
        with awake:
            yield
    finally:
        Awake.running = None


def open_pipe() -> Iterator[tuple[int, int]]:
    reader, writer = os.pipe()
    yield reader, writer
    os.close(reader)
    os.close(writer)


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    """The reader's socket, as it were."""
    yield from open_pipe()


@pytest.fixture
def client() -> Iterator[tuple[int, int]]:
    """/dev/fuse, as it were."""
    yield from open_pipe()


def test_a_reply_within_the_window_is_found_while_other_tasks_run(
        pipe: tuple[int, int]) -> None:
    """The spinning reader lets other tasks run between its polls (here the
    one that writes the reply after sleeping)."""
    spin, (reader, writer) = ReplySpin(), pipe
    spin.window = MAX_WINDOW

    async def reply_soon() -> None:
        await trio.sleep(0.0002)
        os.write(writer, b"x")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reply_soon)
            assert await spin.spin(reader)
        assert spin.window == MAX_WINDOW

    with polling():
        trio.run(main)


def reply_later(writer: int) -> subprocess.Popen[bytes]:
    """A reply written by another process (a thread of this one would need
    the interpreter, which the spinning task holds)."""
    return subprocess.Popen(["sh", "-c", "sleep 0.01; printf x"], stdout=writer)


def turns_while_spinning(pipe: tuple[int, int], large_in_flight: bool) -> int:
    """The turns another task gets while a reader spins for its reply
    (the only polled request in flight, the client quiet), with or
    without a large request in flight beside it."""
    spin, (reader, writer) = ReplySpin(), pipe
    spin.window = 2_000_000_000          # the reply's process starting
    turns = 0

    async def count_turns() -> None:
        nonlocal turns
        while True:
            turns += 1
            await trio.lowlevel.checkpoint()

    async def main() -> int:
        awake = Awake.running
        assert awake is not None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(count_turns)
            await trio.sleep(0.001)
            before = turns
            with awake.around(0, 1 << 20) if large_in_flight else contextlib.nullcontext():
                assert awake.alone is not large_in_flight
                replier = reply_later(writer)
                assert await spin.spin(reader)
            replier.wait()
            nursery.cancel_scope.cancel()
        return turns - before

    return trio.run(main)


def test_alone_the_reader_polls_without_letting_the_loop_run(
        pipe: tuple[int, int], client: tuple[int, int]) -> None:
    """Nothing else has to run before the reply, and the loop does not."""
    with polling(client_fd=client[0]):
        assert turns_while_spinning(pipe, large_in_flight=False) == 0


def test_with_a_large_request_in_flight_the_loop_runs_between_polls(
        pipe: tuple[int, int], client: tuple[int, int]) -> None:
    """A large request is not polled for, but its task may need the loop
    (its reply read, it resumes): the reader is not alone."""
    with polling(client_fd=client[0]):
        assert turns_while_spinning(pipe, large_in_flight=True) > 0


def test_alone_the_reader_lets_the_loop_take_the_clients_next_request(
        pipe: tuple[int, int], client: tuple[int, int]) -> None:
    """The client's descriptor readable: the loop runs, and the task that
    reads it (here, the one that then sends the reply) gets its turn."""
    spin, (reader, writer) = ReplySpin(), pipe
    spin.window = MAX_WINDOW

    async def take_request() -> None:
        await trio.lowlevel.wait_readable(client[0])
        os.read(client[0], 1)
        os.write(writer, b"x")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(take_request)
            await trio.sleep(0.001)
            os.write(client[1], b"r")
            assert await spin.spin(reader)

    with polling(client_fd=client[0]):
        trio.run(main)


def test_a_late_reply_ends_the_spin_and_adapts_the_window(pipe: tuple[int, int]) -> None:
    """Nothing within the window: the reader is told to sleep; a reply that
    came soon after grows the window, none at all (window 0) means no spin."""
    spin, (reader, _) = ReplySpin(), pipe

    async def main() -> None:
        started = time.perf_counter_ns()
        assert not await spin.spin(reader)
        assert time.perf_counter_ns() - started >= FIRST_WINDOW
        spin.woke()                         # the reply came at once after
        assert spin.window == 2 * FIRST_WINDOW
        spin.window = 0
        started = time.perf_counter_ns()
        assert not await spin.spin(reader)
        assert time.perf_counter_ns() - started < MAX_WINDOW

    with polling():
        trio.run(main)


def test_no_spinning_unless_the_loop_is_kept_awake_for_a_request(
        pipe: tuple[int, int]) -> None:
    """Outside a mount (no Awake running), or with no polled request in
    flight (large ones, idle): the reader sleeps at once, window unchanged."""
    spin, (reader, _) = ReplySpin(), pipe
    spin.window = MAX_WINDOW

    async def main() -> None:
        for _ in range(2):
            started = time.perf_counter_ns()
            assert not await spin.spin(reader)
            assert time.perf_counter_ns() - started < MAX_WINDOW
            spin.woke()
            assert spin.window == MAX_WINDOW
            Awake.running = Awake()         # running, nothing in flight

    try:
        trio.run(main)
    finally:
        Awake.running = None
