"""Compressed cluster payloads: raw deflate (zlib) and zstd.

Spec: qemu/qemu docs/interop/qcow2.txt ("Compressed Clusters Descriptor",
header field "compression_type"); QEMU's block/qcow2-threads.c is the
reference for the streams: zlib clusters are raw deflate with a 4 KiB
window, zstd clusters one zstd frame each.  The bytes read from the host
may run past the end of the stream (the descriptor counts whole sectors).

zstd needs the `zstandard` module (Python 3.11 has no zstd); without it a
zstd image is refused with an error naming the missing module.  Whole zlib
clusters are inflated with ISA-L (the `isal` module, about twice as fast as
zlib) where it is installed.

Reads go through `InflatedClusters`: a small cache of inflated clusters,
zlib clusters inflated only as far as a read needs (and resumed by the next
read of the same cluster), and the clusters of a large request inflated
whole in worker threads, several at once (zlib and zstandard release the
GIL while they inflate).  bench/README.md has the figures.
"""
from __future__ import annotations

import os
import zlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from types import ModuleType

import trio

from imgfs.errors import CorruptImage, ImgfsError, Unsupported

from .header import COMPRESSION_ZSTD

fast_zlib: ModuleType | None
try:
    from isal import isal_zlib as fast_zlib
except ImportError:                      # (an optional speed-up: zlib does the same)
    fast_zlib = None

#: the window QEMU uses for deflate (qcow2_zlib_compress: -12)
ZLIB_WINDOW_BITS = -12
#: inflated bytes InflatedClusters keeps (at least CACHE_MIN_CLUSTERS clusters)
CACHE_BYTES = 4 << 20
CACHE_MIN_CLUSTERS = 4
#: a request with at least this many clusters to inflate inflates them in threads
THREAD_MIN_CLUSTERS = 2


def decompress_cluster(raw: bytes, cluster_size: int, compression_type: int) -> bytes:
    """One whole cluster from its compressed bytes."""
    if compression_type == COMPRESSION_ZSTD:
        return _decompress_zstd(raw, cluster_size)
    inflater: ModuleType = fast_zlib or zlib
    try:
        cluster = inflater.decompressobj(ZLIB_WINDOW_BITS).decompress(raw, cluster_size)
    except inflater.error as exc:
        raise CorruptImage(f"compressed cluster does not decompress: {exc}") from None
    return _whole_cluster(cluster, cluster_size)


def compress_cluster(cluster: bytes, compression_type: int) -> bytes:
    """The compressed stream for one whole cluster, as QEMU writes it."""
    if compression_type == COMPRESSION_ZSTD:
        # ZSTD_CLEVEL_DEFAULT, one frame: what qcow2_zstd_compress produces
        return _zstandard().ZstdCompressor(level=3).compress(cluster)
    compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, ZLIB_WINDOW_BITS)
    return compressor.compress(cluster) + compressor.flush()


def _whole_cluster(cluster: bytes, cluster_size: int) -> bytes:
    if len(cluster) != cluster_size:
        raise CorruptImage(f"compressed cluster decompresses to {len(cluster)} bytes "
                           f"(expected {cluster_size})")
    return cluster


def _decompress_zstd(raw: bytes, cluster_size: int) -> bytes:
    """Stream out exactly one cluster, as qcow2_zstd_decompress does (the
    host bytes may hold the next cluster's frame after ours, so never read
    past `cluster_size`); streaming bounds memory whatever a frame claims."""
    zstandard = _zstandard()
    try:
        with zstandard.ZstdDecompressor().stream_reader(raw) as reader:
            cluster = _read_up_to(reader, cluster_size)
    except zstandard.ZstdError as exc:
        raise CorruptImage(f"compressed cluster does not decompress: {exc}") from None
    return _whole_cluster(cluster, cluster_size)


def _read_up_to(reader: object, limit: int) -> bytes:
    parts: list[bytes] = []
    remaining = limit
    while remaining:
        part = reader.read(remaining)  # type: ignore[attr-defined]
        if not part:
            break
        parts.append(part)
        remaining -= len(part)
    return b"".join(parts)


def _zstandard() -> ModuleType:
    try:
        import zstandard
    except ImportError:
        raise Unsupported("zstd-compressed qcow2 clusters need the Python 'zstandard' "
                          "module, which is not installed") from None
    return zstandard


# -- the read path: partial inflation, a cache, threads ---------------------------------


class Inflation:
    """One compressed cluster being inflated: `data` holds its first bytes
    so far.  A zlib stream is inflated only as far as asked and resumed
    from where it stopped, unless more than half of it is asked at first:
    then it is inflated whole by `decompress_cluster`, which may be faster
    (ISA-L).  A zstd frame is inflated whole at once."""

    __slots__ = ("data", "cluster_size", "compression_type", "_decompressor", "_rest")

    def __init__(self, raw: bytes, cluster_size: int, compression_type: int) -> None:
        self.data = b""
        self.cluster_size = cluster_size
        self.compression_type = compression_type
        self._rest: bytes | None = raw
        self._decompressor = None if compression_type == COMPRESSION_ZSTD \
            else zlib.decompressobj(ZLIB_WINDOW_BITS)

    @property
    def whole(self) -> bool:
        return self._rest is None

    def inflate_to(self, end: int) -> None:
        """Make `data` at least `end` bytes long (CorruptImage if the stream
        ends sooner or is not one)."""
        if len(self.data) >= end or self._rest is None:
            return
        if self._decompressor is None or not self.data and end > self.cluster_size // 2:
            self.data = decompress_cluster(self._rest, self.cluster_size, self.compression_type)
        else:
            try:
                self.data += self._decompressor.decompress(self._rest, end - len(self.data))
            except zlib.error as exc:
                raise CorruptImage(f"compressed cluster does not decompress: {exc}") from None
            self._rest = self._decompressor.unconsumed_tail
            if len(self.data) < end:
                _whole_cluster(self.data, self.cluster_size)      # (raises)
        if len(self.data) == self.cluster_size:
            self._rest = self._decompressor = None

    def inflate_whole(self) -> bool:
        """Inflate the rest (in a worker thread); False if that fails (the
        read that needs it then inflates it again, and raises)."""
        try:
            self.inflate_to(self.cluster_size)
        except ImgfsError:
            return False
        return True


def _inflate_all(inflations: list[Inflation]) -> None:
    for inflation in inflations:
        inflation.inflate_whole()


RawReader = Callable[[int], Awaitable[bytes]]


class InflatedClusters:
    """The compressed clusters reads inflated last, by L2 entry (an LRU of
    CACHE_BYTES), so that a read of a cluster just read does not inflate it
    again.  Its methods run in the trio thread, which alone touches the
    cache; worker threads only inflate clusters not yet in it.

    `raw(entry)` gives a cluster's compressed bytes (the driver's job:
    bounds checks, marking the image corrupt).  Whoever rewrites host bytes
    that held compressed data calls `clear`."""

    def __init__(self, cluster_size: int, compression_type: int) -> None:
        self.cluster_size = cluster_size
        self.compression_type = compression_type
        self.capacity = max(CACHE_MIN_CLUSTERS, CACHE_BYTES // cluster_size)
        #: a compressed cluster has been read (large reads then look ahead)
        self.used = False
        self._clusters: OrderedDict[int, Inflation] = OrderedDict()
        #: entries a prefetch is inflating in threads -> set when done
        self._inflating: dict[int, trio.Event] = {}

    def clear(self) -> None:
        self._clusters.clear()

    async def read(self, entry: int, start: int, length: int, raw: RawReader) -> bytes:
        """Bytes start..start+length of the cluster of L2 entry `entry`."""
        self.used = True
        while entry in self._inflating:
            await self._inflating[entry].wait()
        inflation = self._clusters.get(entry)
        if inflation is None:
            inflation = Inflation(await raw(entry), self.cluster_size, self.compression_type)
            self._remember(entry, inflation)
        else:
            self._clusters.move_to_end(entry)
        inflation.inflate_to(start + length)
        return inflation.data[start:start + length]

    async def prefetch(self, entries: Iterable[int], raw: RawReader) -> None:
        """Inflate the clusters of `entries` that are not cached whole, in
        worker threads (one group of clusters per CPU), if there are enough
        of them to gain from it."""
        wanted = [entry for entry in dict.fromkeys(entries)
                  if entry not in self._inflating and not self._is_whole(entry)]
        if len(wanted) < THREAD_MIN_CLUSTERS:
            return
        wanted = wanted[:self.capacity]
        events = {entry: trio.Event() for entry in wanted}
        self._inflating.update(events)
        try:
            inflations = [Inflation(await raw(entry), self.cluster_size, self.compression_type)
                          for entry in wanted]
            groups = min(len(inflations), _cpus())
            async with trio.open_nursery() as nursery:
                for group in range(groups):
                    nursery.start_soon(trio.to_thread.run_sync, _inflate_all,
                                       inflations[group::groups])
            for entry, inflation in zip(wanted, inflations, strict=True):
                if inflation.whole:
                    self._remember(entry, inflation)
        finally:
            for entry, event in events.items():
                del self._inflating[entry]
                event.set()

    def _is_whole(self, entry: int) -> bool:
        inflation = self._clusters.get(entry)
        return inflation is not None and inflation.whole

    def _remember(self, entry: int, inflation: Inflation) -> None:
        self._clusters[entry] = inflation
        self._clusters.move_to_end(entry)
        while len(self._clusters) > self.capacity:
            self._clusters.popitem(last=False)


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) or 1
