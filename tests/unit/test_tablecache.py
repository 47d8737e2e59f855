"""The shared metadata machinery (imgfs.tablecache): table cache, metadata
lock, decoded-block cache and table codec, without any format."""
from __future__ import annotations

import array

import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from imgfs.tablecache import DecodedCache, MetadataLock, Table, TableCache, TableCodec


def table(offset: int, value: int = 0) -> Table:
    return Table(offset, array.array("Q", [value] * 4))


# -- TableCache ---------------------------------------------------------------------------

OPERATIONS = st.lists(st.tuples(st.sampled_from(["insert", "get", "dirty", "write_back",
                                                 "drop"]),
                                st.integers(0, 11)), max_size=80)


@settings(max_examples=200, deadline=None)
@given(capacity=st.integers(1, 6), operations=OPERATIONS)
def test_cache_keeps_dirty_tables_and_writes_them_in_order(
        capacity: int, operations: list[tuple[str, int]]) -> None:
    """Against a model: a dirty table is never dropped, clean ones beyond
    capacity are, and write-back writes every dirty table once, lowest host
    offset first."""
    cache = TableCache(capacity)
    dirty: set[int] = set()
    written: list[int] = []

    async def write(item: Table) -> None:
        written.append(item.offset)

    async def main() -> None:
        for operation, key in operations:
            offset = key * 4096
            if operation == "insert":
                cache.insert(table(offset))
            elif operation == "get":
                cache.get(offset)
            elif operation == "dirty":
                found = cache.get(offset) or table(offset)
                cache.changed(found, dirty=True)
                dirty.add(offset)
            elif operation == "drop" and offset not in dirty:
                cache.drop(offset)
            elif operation == "write_back":
                written.clear()
                assert await cache.write_back(write) == len(dirty)
                assert written == sorted(dirty)
                dirty.clear()
            for offset in dirty:
                assert cache.tables[offset].dirty
            assert len(cache) <= max(cache.capacity, len(dirty) + 1)
    trio.run(main)


def test_cache_is_least_recently_used() -> None:
    cache = TableCache(4)
    for key in range(4):
        cache.insert(table(key))
    cache.get(0)
    cache.insert(table(4))
    assert cache.get(1) is None
    assert cache.get(0) is not None


def test_insert_keeps_the_table_already_cached() -> None:
    cache = TableCache(4)
    first = cache.insert(table(8, 1))
    assert cache.insert(table(8, 2)) is first


def test_load_reads_again_when_a_table_changed_during_the_read() -> None:
    """A table loaded while another was changed (and maybe written and
    dropped) may be stale: load reads it again."""
    cache = TableCache(4)
    disk = {0: 1}
    reads = []

    async def read(offset: int) -> array.array[int]:
        value = disk[offset]
        reads.append(value)
        await trio.sleep(0.01)                  # the change lands here
        return array.array("Q", [value])

    async def change() -> None:
        await trio.testing.wait_all_tasks_blocked()
        changed = Table(0, array.array("Q", [2]))
        cache.changed(changed)
        disk[0] = 2
        cache.drop(0)                           # written back and dropped

    async def main() -> array.array[int]:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(change)
            loaded = await cache.load(0, read)
        return loaded.entries

    assert list(trio.run(main)) == [2]
    assert reads == [1, 2]


def test_changed_puts_back_a_table_dropped_while_held() -> None:
    cache = TableCache(4)
    held = cache.insert(table(0))
    for key in range(1, 6):
        cache.insert(table(key))
    assert cache.get(0) is None
    cache.changed(held, dirty=True)
    assert cache.get(0) is held and held.dirty


# -- MetadataLock -------------------------------------------------------------------------

def test_lock_section_survives_cancellation() -> None:
    """A request cancelled inside the locked section finishes the section
    (both writes happen) and releases the lock."""
    lock = MetadataLock()
    steps: list[str] = []

    async def section() -> None:
        async with lock:
            steps.append("data")
            await trio.sleep(0.05)
            steps.append("entry")

    async def main() -> None:
        with trio.move_on_after(0.01):
            await section()
        assert steps == ["data", "entry"]
        assert not lock.locked()
        async with lock:                # free again
            steps.append("again")
    trio.run(main)
    assert steps[-1] == "again"


def test_lock_serialises_and_releases_on_error() -> None:
    lock = MetadataLock()
    inside = 0
    most = 0

    async def worker() -> None:
        nonlocal inside, most
        async with lock:
            inside += 1
            most = max(most, inside)
            await trio.sleep(0.001)
            inside -= 1

    async def failing() -> None:
        async with lock:
            raise KeyError("boom")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(worker)
        try:
            await failing()
        except KeyError:
            pass
        assert not lock.locked()
    trio.run(main)
    assert most == 1


# -- DecodedCache, TableCodec -----------------------------------------------------------------

def test_decoded_cache_decodes_once_and_forgets() -> None:
    decoded: list[int] = []

    async def decode(token: int) -> bytes:
        decoded.append(token)
        return bytes([token])

    async def main() -> None:
        cache = DecodedCache(2)
        assert await cache.get(1, decode) == b"\x01"
        await cache.get(1, decode)
        await cache.get(2, decode)
        await cache.get(3, decode)              # drops 1
        await cache.get(1, decode)
        cache.forget(1)
        await cache.get(1, decode)
    trio.run(main)
    assert decoded == [1, 2, 3, 1, 1]


def test_decoded_cache_waits_for_a_decode_in_flight() -> None:
    """Concurrent requests for one block decode it once; a block forgotten
    while its decode is in flight is not kept (it read the old bytes)."""
    decoded: list[int] = []

    async def decode(token: int) -> bytes:
        decoded.append(token)
        await trio.sleep(0.01)
        return bytes([token])

    async def main() -> None:
        cache = DecodedCache(2)
        results: list[bytes] = []

        async def want(token: int) -> None:
            results.append(await cache.get(token, decode))

        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(want, 7)
        assert results == [b"\x07"] * 4 and decoded == [7]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(want, 8)
            await trio.sleep(0.001)
            cache.forget(8)
        await cache.get(8, decode)
        assert decoded == [7, 8, 8]
        assert not cache.pending
    trio.run(main)


@given(st.lists(st.integers(0, 2**64 - 1), max_size=20), st.booleans())
def test_codec_round_trips_64_bit(values: list[int], big_endian: bool) -> None:
    codec = TableCodec(8, big_endian)
    raw = codec.encode(values)
    assert raw == b"".join(value.to_bytes(8, "big" if big_endian else "little")
                           for value in values)
    assert list(codec.decode(raw)) == values


@given(st.lists(st.integers(0, 2**32 - 1), max_size=20), st.booleans())
def test_codec_round_trips_32_bit(values: list[int], big_endian: bool) -> None:
    codec = TableCodec(4, big_endian)
    assert list(codec.decode(codec.encode(values))) == values
    assert len(codec.empty(3)) == 3


def test_write_back_trims_the_cache_to_its_capacity() -> None:
    """Dirty tables may hold the cache past its capacity; once written
    back, they are ordinary clean tables and the cache shrinks again."""
    cache = TableCache(4)
    for key in range(4):
        cache.changed(table(key * 4096), dirty=True)
    cache.insert(table(4 * 4096))
    assert len(cache) == 5

    async def write(item: Table) -> None:
        pass
    assert trio.run(cache.write_back, write) == 4
    assert len(cache) == 4
