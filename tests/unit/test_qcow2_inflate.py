"""qcow2 compressed clusters on the read path (drivers/qcow2/compress.py):
partial, resumed inflation, the cache of inflated clusters, and large
requests inflated in worker threads."""
from __future__ import annotations

import os
import zlib

import pytest
import trio
import trio.testing
from imgfs.drivers.qcow2 import compress
from imgfs.drivers.qcow2.compress import (
    ZLIB_WINDOW_BITS,
    InflatedClusters,
    Inflation,
    compress_cluster,
)
from imgfs.drivers.qcow2.header import COMPRESSION_ZLIB, COMPRESSION_ZSTD

from imgfs.errors import CorruptImage

CLUSTER = 64 * 1024


def _cluster(seed: int) -> bytes:
    # half random, half text: compresses, and inflates to something checkable
    return (os.urandom(CLUSTER // 4) + bytes([seed]) * 64 * 256 + os.urandom(CLUSTER // 4)
            + b"qcow2 " * (CLUSTER // 24)).ljust(CLUSTER, b"q")[:CLUSTER]


TYPES = [COMPRESSION_ZLIB]
try:
    import zstandard  # noqa: F401
    TYPES.append(COMPRESSION_ZSTD)
except ImportError:
    pass


@pytest.fixture(params=["isal", "zlib"], autouse=True)
def whole_cluster_inflater(request, monkeypatch) -> str:
    """Every test with ISA-L inflating whole zlib clusters, and without."""
    if request.param == "isal":
        if compress.fast_zlib is None:
            pytest.skip("isal is not installed")
    else:
        monkeypatch.setattr(compress, "fast_zlib", None)
    return str(request.param)


@pytest.mark.parametrize("compression_type", TYPES)
def test_inflation_resumes_where_it_stopped(compression_type: int) -> None:
    cluster = _cluster(1)
    # (a descriptor counts whole sectors: bytes past the stream are normal)
    inflation = Inflation(compress_cluster(cluster, compression_type) + os.urandom(300),
                          CLUSTER, compression_type)
    for end in (1, 4096, 4095, 30000, CLUSTER - 1, CLUSTER):
        inflation.inflate_to(end)
        assert len(inflation.data) >= end and cluster.startswith(inflation.data)
    assert inflation.whole and inflation.data == cluster


def test_zlib_inflates_only_what_is_read() -> None:
    cluster = _cluster(2)
    inflation = Inflation(compress_cluster(cluster, COMPRESSION_ZLIB), CLUSTER,
                          COMPRESSION_ZLIB)
    inflation.inflate_to(4096)
    assert len(inflation.data) == 4096 and not inflation.whole
    # more than half of a cluster at first: all of it, at once
    inflation = Inflation(compress_cluster(cluster, COMPRESSION_ZLIB), CLUSTER,
                          COMPRESSION_ZLIB)
    inflation.inflate_to(CLUSTER // 2 + 1)
    assert inflation.whole and inflation.data == cluster


@pytest.mark.parametrize("compression_type", TYPES)
def test_damaged_streams(compression_type: int) -> None:
    garbage = Inflation(b"\xff" * 100, CLUSTER, compression_type)
    with pytest.raises(CorruptImage, match="does not decompress"):
        garbage.inflate_to(CLUSTER)
    assert not Inflation(b"\xff" * 100, CLUSTER, compression_type).inflate_whole()


def test_a_short_stream_fails_where_its_data_ends() -> None:
    compressor = zlib.compressobj(6, zlib.DEFLATED, ZLIB_WINDOW_BITS)
    short = compressor.compress(b"a" * 5000) + compressor.flush()
    inflation = Inflation(short, CLUSTER, COMPRESSION_ZLIB)
    inflation.inflate_to(4096)
    assert inflation.data == b"a" * 4096
    with pytest.raises(CorruptImage, match="decompresses to 5000 bytes .expected 65536."):
        inflation.inflate_to(8192)
    with pytest.raises(CorruptImage, match="decompresses to 5000 bytes .expected 65536."):
        Inflation(short, CLUSTER, COMPRESSION_ZLIB).inflate_to(CLUSTER)


class RawStore:
    """Compressed clusters by fake L2 entry, counting the reads of each."""

    def __init__(self, count: int, compression_type: int = COMPRESSION_ZLIB) -> None:
        self.clusters = {entry: _cluster(entry) for entry in range(1, count + 1)}
        self.packed = {entry: compress_cluster(data, compression_type)
                       for entry, data in self.clusters.items()}
        self.reads: list[int] = []

    async def raw(self, entry: int) -> bytes:
        self.reads.append(entry)
        await trio.sleep(0)
        return self.packed[entry]


def test_a_cluster_just_read_is_not_inflated_again() -> None:
    store = RawStore(3)
    cache = InflatedClusters(CLUSTER, COMPRESSION_ZLIB)

    async def main() -> None:
        assert await cache.read(1, 0, 4096, store.raw) == store.clusters[1][:4096]
        assert await cache.read(1, 60000, 5536, store.raw) == store.clusters[1][60000:]
        assert await cache.read(1, 8192, 4096, store.raw) == store.clusters[1][8192:12288]
        assert await cache.read(2, 100, 10, store.raw) == store.clusters[2][100:110]
        assert store.reads == [1, 2]
        cache.clear()
        await cache.read(1, 0, 1, store.raw)
        assert store.reads == [1, 2, 1]
    trio.run(main)


def test_the_cache_is_small() -> None:
    cache = InflatedClusters(2 * 1024 * 1024, COMPRESSION_ZLIB)
    assert cache.capacity == 4
    store = RawStore(6)
    cache = InflatedClusters(CLUSTER, COMPRESSION_ZLIB)
    cache.capacity = 4

    async def main() -> None:
        for entry in (1, 2, 3, 4, 5, 1):
            await cache.read(entry, 0, 16, store.raw)
        assert store.reads == [1, 2, 3, 4, 5, 1]          # 1 was the oldest: dropped
        await cache.read(5, 0, 16, store.raw)
        assert store.reads == [1, 2, 3, 4, 5, 1]
    trio.run(main)


@pytest.mark.parametrize("compression_type", TYPES)
def test_a_large_request_inflates_in_threads(compression_type: int) -> None:
    store = RawStore(8, compression_type)
    cache = InflatedClusters(CLUSTER, compression_type)

    async def main() -> None:
        assert not cache.used
        await cache.prefetch([1], store.raw)             # one cluster: left to the read
        assert store.reads == []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cache.prefetch, [1, 2, 3, 2, 4, 5, 6, 7, 8], store.raw)
            # a read of a cluster being inflated waits for it
            await trio.testing.wait_all_tasks_blocked()
            assert await cache.read(3, 5, 100, store.raw) == store.clusters[3][5:105]
        for entry in range(1, 9):
            assert await cache.read(entry, 0, CLUSTER, store.raw) == store.clusters[entry]
        assert sorted(store.reads) == list(range(1, 9))
        assert cache.used
    trio.run(main)


def test_a_damaged_cluster_in_a_large_request_fails_its_read() -> None:
    store = RawStore(3)
    store.packed[2] = b"\xff" * 200
    cache = InflatedClusters(CLUSTER, COMPRESSION_ZLIB)

    async def main() -> None:
        await cache.prefetch([1, 2, 3], store.raw)
        assert await cache.read(3, 0, 10, store.raw) == store.clusters[3][:10]
        with pytest.raises(CorruptImage, match="does not decompress"):
            await cache.read(2, 0, 10, store.raw)
    trio.run(main)
