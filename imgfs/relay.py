"""Many tasks waiting on one connection, one of them driving it at a time.

A network protocol with requests in flight at once needs someone to read
the replies.  Instead of a background task (which would need a nursery
that outlives every caller, and `imgfs info` has none), the tasks that wait
take turns: the first waiter becomes the *leader* and drives the
connection (receives, dispatches completions) until its own request is
done; then it wakes one task still waiting, which leads next.  A cancelled
waiter leaves its request in flight: its reply still comes, and whoever
leads then consumes it.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio


class Waiter:
    """What a task waits for: `done`, set by `Relay.finish`."""

    __slots__ = ("done", "wakeup")

    def __init__(self) -> None:
        self.done = False
        #: set when the request is complete, or when this task is to lead next
        self.wakeup: trio.Event | None = None


class Relay:
    def __init__(self) -> None:
        #: the waiter whose task drives the connection now, if any
        self.leader: Waiter | None = None
        self._sleepers: dict[Waiter, None] = {}

    async def wait(self, waiter: Waiter, drive: Callable[[Waiter], Awaitable[None]]) -> None:
        """Return once `waiter` is done.  While nobody else leads, lead:
        ``drive(waiter)`` must return when `waiter` is done (or raise)."""
        try:
            while not waiter.done:
                if self.leader is None:
                    self.leader = waiter
                    try:
                        await drive(waiter)
                    finally:
                        self.leader = None
                else:
                    waiter.wakeup = trio.Event()
                    self._sleepers[waiter] = None
                    try:
                        await waiter.wakeup.wait()
                    finally:
                        self._sleepers.pop(waiter, None)
        finally:
            self._hand_over()

    def _hand_over(self) -> None:
        """Make sure a waiting task leads next when nobody leads."""
        if self.leader is None and self._sleepers:
            sleeper = next(iter(self._sleepers))
            del self._sleepers[sleeper]
            assert sleeper.wakeup is not None
            sleeper.wakeup.set()

    @staticmethod
    def finish(waiter: Waiter) -> None:
        waiter.done = True
        if waiter.wakeup is not None:
            waiter.wakeup.set()
