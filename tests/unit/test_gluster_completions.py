"""libgfapi's completion callback in C (drivers/gluster/_completions.c),
called as libgfapi calls it: from threads of its own, through the function
pointer given to glfs_*_async."""
from __future__ import annotations

import ctypes
import select
import threading

import pytest
from imgfs.drivers.gluster import gfapi

from tests.conftest import REQUIRE_ORACLES

try:
    from imgfs.drivers.gluster import _completions
except ImportError:
    _completions = None        # type: ignore[assignment]

native = pytest.mark.skipif(_completions is None, reason="_completions is not built")


def test_the_native_module_is_built_and_used() -> None:
    """make test builds it (setup.py); a silent fallback would leave
    gluster's callback in Python and its mounts without busy polling."""
    if _completions is None:
        message = "imgfs.drivers.gluster._completions is not built (no compiler?)"
        if REQUIRE_ORACLES:
            pytest.fail(message)
        pytest.skip(message)
    assert gfapi.CALLBACK_IN_C


@native
def test_completions_from_many_threads_are_all_collected_once() -> None:
    callback = gfapi.IoCallback(_completions.callback())
    poller = select.poll()
    poller.register(_completions.fileno(), select.POLLIN)
    _completions.collect()
    assert not poller.poll(0)                 # nothing queued: not readable

    def complete(first: int) -> None:
        for key in range(first, first + 1000):
            ctypes.set_errno(key % 7)
            callback(None, -1 if key % 3 == 0 else key * 2, None, None, key)

    threads = [threading.Thread(target=complete, args=(n * 1000 + 1,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert poller.poll(0)
    finished = _completions.collect()
    assert not poller.poll(0)
    assert sorted(key for key, _, _ in finished) == list(range(1, 8001))
    for key, result, error in finished:
        assert result == (-1 if key % 3 == 0 else key * 2)
        assert error == key % 7
    assert _completions.collect() == []
