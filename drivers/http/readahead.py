"""The read-ahead cache: windows of `readahead` bytes, aligned to their size.

A read shorter than a window that continues an earlier read (a sequential
reader) fetches every window it touches that is not cached yet (contiguous
missing windows in one request), so a run of small sequential reads costs
one request per window, as QEMU's curl driver asks for `readahead` bytes
beyond each read.  A small read that continues nothing and is not cached
(a random read) asks for its own bytes only: QEMU reads ahead there too,
which makes every random read pay for a window it rarely uses.  Aligned windows let concurrent
readers of one window share a single request: whoever claims a window
first fetches it, the others wait for it.  When a read follows the window
before it (a sequential reader), the next windows are fetched in the
background.

A read of a window or more is not cut into windows (that would only copy
it twice more); when it continues an earlier read, the next reads of the
same length are fetched in the background, so that a sequential reader
(the kernel's read-ahead: 1 MiB reads one after the other) always has a
request in flight ahead of it.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, cast

import trio

from imgfs.errors import ImgfsError
from imgfs.options import MiB

#: the cache holds this many bytes of windows (at least MIN_WINDOWS windows)
CACHE_BYTES = 16 * MiB
MIN_WINDOWS = 8
#: a sequential reader has this much fetched ahead of it
PREFETCH_BYTES = 1 * MiB
#: sequential readers of small reads followed at once
SMALL_READERS = 16
#: a sequential reader of large reads has this many of them fetched ahead
AHEAD_READS = 2

Fetch = Callable[[int, int], Awaitable[bytearray]]


class _Window:
    """One window: being fetched (`ready` not set), fetched (`data`), or
    failed (`error`; None with no data when its fetcher was cancelled)."""

    __slots__ = ("data", "error", "ready")

    def __init__(self) -> None:
        self.data: bytearray | None = None
        self.error: ImgfsError | None = None
        self.ready = trio.Event()


class ReadAhead:
    def __init__(self, fetch: Fetch, size: int, window: int, nursery: Any) -> None:
        self.fetch = fetch
        self.size = size
        self.window = window
        #: where background prefetches run (None: no prefetching)
        self.nursery = nursery
        self.capacity = max(MIN_WINDOWS, CACHE_BYTES // window)
        self.prefetch_windows = max(1, PREFETCH_BYTES // window)
        self.windows: OrderedDict[int, _Window] = OrderedDict()
        #: large reads fetched ahead: offset -> (length, its window)
        self.ahead: OrderedDict[int, tuple[int, _Window]] = OrderedDict()
        #: where the last few small reads ended (their continuations are sequential)
        self.small_ends: OrderedDict[int, None] = OrderedDict()
        #: where the last few large reads ended (their continuations are sequential)
        self.large_ends: OrderedDict[int, None] = OrderedDict()

    async def read(self, offset: int, length: int) -> bytes:
        if length >= self.window:
            return cast(bytes, await self._large_read(offset, length))
        first, last = offset // self.window, (offset + length - 1) // self.window
        sequential = offset in self.small_ends
        self.small_ends[offset + length] = None
        while len(self.small_ends) > SMALL_READERS:
            self.small_ends.popitem(last=False)
        cached = first in self.windows and all(index in self.windows
                                               for index in range(first + 1, last + 1))
        if not (sequential or cached):
            # a random read: a whole window would cost more than it saves
            return cast(bytes, await self.fetch(offset, length))
        while True:
            windows = await self._windows(first, last)
            if windows is not None:
                break
        base = first * self.window
        if first == last:
            data = windows[0]
            return cast(bytes, data[offset - base:offset - base + length])
        joined = b"".join(windows)
        return joined[offset - base:offset - base + length]

    async def _windows(self, first: int, last: int) -> list[bytearray] | None:
        """The data of windows first..last; None when a fetcher we waited
        for was cancelled (the caller asks again)."""
        claimed = [self._claim(index) for index in range(first, last + 1)]
        mine = [index for index, (_, fresh) in enumerate(claimed, first) if fresh]
        for run in contiguous_runs(mine):
            await self._fill(run, [claimed[index - first][0] for index in run])
        self._maybe_prefetch(first, last)
        datas = []
        for window, _ in claimed:
            await window.ready.wait()
            if window.error is not None:
                raise window.error
            if window.data is None:
                return None
            datas.append(window.data)
        return datas

    def _claim(self, index: int) -> tuple[_Window, bool]:
        """The cached or in-flight window `index`, or a new one for the
        caller to fill (True)."""
        window = self.windows.get(index)
        if window is not None and window.error is None:
            self.windows.move_to_end(index)
            return window, False
        window = _Window()
        self.windows[index] = window
        self.windows.move_to_end(index)
        while len(self.windows) > self.capacity:
            self.windows.popitem(last=False)
        return window, True

    async def _fill(self, run: list[int], windows: list[_Window]) -> None:
        start = run[0] * self.window
        end = min(self.size, (run[-1] + 1) * self.window)
        try:
            data = await self.fetch(start, end - start)
        except BaseException as exc:
            for index, window in zip(run, windows, strict=True):
                if isinstance(exc, ImgfsError):
                    window.error = exc
                if self.windows.get(index) is window:
                    del self.windows[index]
                window.ready.set()
            raise
        if len(windows) == 1:
            windows[0].data = data
        else:
            view = memoryview(data)
            for number, window in enumerate(windows):
                window.data = bytearray(view[number * self.window:(number + 1) * self.window])
        for window in windows:
            window.ready.set()

    async def _large_read(self, offset: int, length: int) -> bytearray:
        sequential = offset in self.large_ends
        self.large_ends[offset + length] = None
        while len(self.large_ends) > 4 * AHEAD_READS:
            self.large_ends.popitem(last=False)
        if sequential and self.nursery is not None:
            for number in range(1, AHEAD_READS + 1):
                self._fetch_ahead(offset + number * length, length)
        fetched = self.ahead.pop(offset, None)
        if fetched is not None and fetched[0] == length:
            window = fetched[1]
            await window.ready.wait()
            if window.data is not None:
                return window.data
        return await self.fetch(offset, length)      # not fetched ahead, or that failed

    def _fetch_ahead(self, offset: int, length: int) -> None:
        if offset in self.ahead or offset >= self.size:
            return
        window = _Window()
        self.ahead[offset] = (min(length, self.size - offset), window)
        while len(self.ahead) > 2 * AHEAD_READS:
            self.ahead.popitem(last=False)
        self.nursery.start_soon(self._fill_ahead, offset, self.ahead[offset][0], window)

    async def _fill_ahead(self, offset: int, length: int, window: _Window) -> None:
        try:
            window.data = await self.fetch(offset, length)
        except ImgfsError:
            pass                # the read that wants these bytes fetches them again
        finally:
            window.ready.set()

    def _maybe_prefetch(self, first: int, last: int) -> None:
        """Fetch the windows after `last` in the background when this read
        continues the one before it."""
        if self.nursery is None or first - 1 not in self.windows:
            return
        end = min(last + 1 + self.prefetch_windows, -(-self.size // self.window))
        for index in range(last + 1, end):
            if index not in self.windows:
                window, _ = self._claim(index)
                self.nursery.start_soon(self._prefetch, index, window)

    async def _prefetch(self, index: int, window: _Window) -> None:
        try:
            await self._fill([index], [window])
        except ImgfsError:
            pass                # the read that wants this window will report it


def contiguous_runs(indexes: list[int]) -> list[list[int]]:
    """[1, 2, 3, 7, 8] -> [[1, 2, 3], [7, 8]]"""
    runs: list[list[int]] = []
    for index in indexes:
        if runs and runs[-1][-1] == index - 1:
            runs[-1].append(index)
        else:
            runs.append([index])
    return runs
