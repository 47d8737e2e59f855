"""Compressed cluster payloads: raw deflate (zlib) and zstd.

Spec: qemu/qemu docs/interop/qcow2.txt ("Compressed Clusters Descriptor",
header field "compression_type"); QEMU's block/qcow2-threads.c is the
reference for the streams: zlib clusters are raw deflate with a 4 KiB
window, zstd clusters one zstd frame each.  The bytes read from the host
may run past the end of the stream (the descriptor counts whole sectors).

zstd needs the `zstandard` module (Python 3.11 has no zstd); without it a
zstd image is refused with an error naming the missing module.
"""
from __future__ import annotations

import zlib
from types import ModuleType

from imgfs.errors import CorruptImage, Unsupported

from .header import COMPRESSION_ZSTD

#: the window QEMU uses for deflate (qcow2_zlib_compress: -12)
ZLIB_WINDOW_BITS = -12


def decompress_cluster(raw: bytes, cluster_size: int, compression_type: int) -> bytes:
    """One whole cluster from its compressed bytes."""
    if compression_type == COMPRESSION_ZSTD:
        return _decompress_zstd(raw, cluster_size)
    try:
        cluster = zlib.decompressobj(ZLIB_WINDOW_BITS).decompress(raw, cluster_size)
    except zlib.error as exc:
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
