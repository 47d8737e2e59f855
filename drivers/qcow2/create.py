"""Creating qcow2 images (`imgfs create -f qcow2 -o ...`).

Spec: qemu/qemu docs/interop/qcow2.txt; options and their rules as
qemu-img's qcow2 driver (qemu-block-drivers manual).  A new image is laid
out as QEMU lays it out: the header cluster (header, extensions, backing
file name), the refcount table, the refcount blocks, the L1 table, then
(``encrypt.format=luks``) the LUKS1 header that `crypt` formats.
`initial_layout` computes that layout (pure); `create_image` writes it and,
for preallocation, opens the image and lets the driver allocate the rest.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from imgfs.errors import Unsupported, UsageError
from imgfs.node import OpenContext
from imgfs.options import Bool, Int, Opt, Schema, Size, Str, choice, power_of_two

from .cluster import pack_table
from .crypt_options import encrypt_create_options
from .header import (
    AUTOCLEAR_DATA_FILE_RAW,
    COMPAT_LAZY_REFCOUNTS,
    COMPRESSION_ZSTD,
    CRYPTO_HEADER_EXT,
    EXT_BACKING_FORMAT,
    EXT_CRYPTO_HEADER,
    EXT_DATA_FILE,
    HEADER_V2_LENGTH,
    HEADER_V3_LENGTH,
    INCOMPAT_COMPRESSION,
    INCOMPAT_DATA_FILE,
    INCOMPAT_EXTL2,
    MAGIC,
    MAX_BACKING_FILE_NAME,
    MIN_CLUSTER_BITS_EXTENDED_L2,
    QCOW_CRYPT_LUKS,
    QCOW_MAX_L1_SIZE,
    Extension,
    Header,
    feature_table_extension,
    l1_entries_needed,
    pack_extensions,
    string_extension,
)
from .refcount import RefcountGeometry, set_refcount

#: QEMU sizes disks in 512-byte sectors
SECTOR = 512


def refcount_bits_check(value: int) -> None:
    if value < 1 or value > 64 or value & (value - 1):
        raise UsageError("must be a power of two between 1 and 64")


CREATE_OPTS = Schema(
    Opt("compat", choice("0.10", "1.1", "v2", "v3"), default="1.1",
        help="compatibility level (v2 [0.10] or v3 [1.1])"),
    Opt("backing_file", Str, help="file name of a base image"),
    Opt("backing_fmt", Str, help="image format of the base image"),
    Opt("cluster_size", Size, default=64 * 1024, check=power_of_two(512, 2 * 1024 * 1024),
        help="qcow2 cluster size"),
    Opt("preallocation", choice("off", "metadata", "falloc", "full"), default="off",
        help="preallocation mode"),
    Opt("lazy_refcounts", Bool, default=False, help="postpone refcount updates"),
    Opt("refcount_bits", Int, default=16, check=refcount_bits_check,
        help="width of a reference count entry in bits"),
    Opt("extended_l2", Bool, default=False, help="extended L2 tables (subclusters)"),
    Opt("compression_type", choice("zlib", "zstd"), default="zlib",
        help="compression method used for image cluster compression"),
    Opt("data_file", Str, help="file name of an external data file"),
    Opt("data_file_raw", Bool, default=False,
        help="the external data file must stay valid as a raw image"),
    Opt("nocow", Bool, default=False, help="turn off copy-on-write (valid only on btrfs)"),
    Opt("encryption", Bool, default=False, help="encrypt the image (deprecated)"),
    Opt("extent_size_hint", Size, help="accepted for QEMU compatibility"),
    Opt("encrypt.format", choice("luks", "aes"),
        help="encrypt the image: luks (aes, legacy, is refused)"),
    Opt("encrypt.key-secret", Str, help="ID of the secret that provides the passphrase"),
    Opt("encrypt.cipher-alg", Str, help="cipher algorithm (default aes-256)"),
    Opt("encrypt.cipher-mode", Str, help="cipher mode: xts, cbc, ecb, ctr (default xts)"),
    Opt("encrypt.ivgen-alg", Str, help="IV generator: plain, plain64, essiv (default plain64)"),
    Opt("encrypt.ivgen-hash-alg", Str, help="hash for the essiv IV generator"),
    Opt("encrypt.hash-alg", Str, help="PBKDF hash algorithm (default sha256)"),
    Opt("encrypt.iter-time", Str, help="milliseconds to spend in PBKDF (default 2000)"),
    passthrough=("encrypt.",),
)


@dataclass(frozen=True)
class CreateSettings:
    """The create options after their cross-checks."""

    version: int
    cluster_bits: int
    refcount_order: int
    extended_l2: bool
    lazy_refcounts: bool
    compression_type: int
    backing_file: str | None
    backing_fmt: str | None
    data_file: str | None
    data_file_raw: bool
    preallocation: str
    #: the luks driver's create options for encrypt.format=luks, else None
    encrypt: dict[str, Any] | None = None


def settings_from_options(size: int, options: dict[str, Any]) -> CreateSettings:
    """Check the option combinations qemu-img refuses, with its reasons."""
    encrypt = encrypt_create_options(options)
    if encrypt is not None and options["preallocation"] != "off":
        raise Unsupported("preallocation cannot be used with encryption (preallocated "
                          "clusters would decrypt to noise)")
    version = 2 if options["compat"] in ("0.10", "v2") else 3
    refcount_order = options["refcount_bits"].bit_length() - 1
    cluster_bits = options["cluster_size"].bit_length() - 1
    v3_only = {"lazy_refcounts": options["lazy_refcounts"],
               "extended_l2": options["extended_l2"],
               "data_file": options["data_file"],
               "compression_type=zstd": options["compression_type"] == "zstd",
               "refcount_bits other than 16": refcount_order != 4}
    for name, used in v3_only.items():
        if used and version < 3:
            raise UsageError(f"{name} is only supported with compatibility level 1.1 "
                             "and above (use compat=1.1)")
    _check_combinations(options, cluster_bits)
    l1_size = l1_entries_needed(size, cluster_bits, options["extended_l2"])
    if l1_size > QCOW_MAX_L1_SIZE // 8:
        raise UsageError(f"image size {size} too large for the cluster size "
                         f"{options['cluster_size']}")
    return CreateSettings(
        version=version, cluster_bits=cluster_bits, refcount_order=refcount_order,
        extended_l2=options["extended_l2"], lazy_refcounts=options["lazy_refcounts"],
        compression_type=COMPRESSION_ZSTD if options["compression_type"] == "zstd" else 0,
        backing_file=options["backing_file"] or None, backing_fmt=options["backing_fmt"],
        data_file=options["data_file"] or None, data_file_raw=options["data_file_raw"],
        preallocation=_preallocation(options), encrypt=encrypt)


def _preallocation(options: dict[str, Any]) -> str:
    """data_file_raw promises the data file reads as the image by itself, so
    every cluster must map to its own offset there: QEMU's qcow2_co_create
    turns preallocation=off into metadata for it."""
    if options["data_file_raw"] and options["preallocation"] == "off":
        return "metadata"
    return str(options["preallocation"])


def _check_combinations(options: dict[str, Any], cluster_bits: int) -> None:
    if options["extended_l2"] and cluster_bits < MIN_CLUSTER_BITS_EXTENDED_L2:
        raise UsageError("extended L2 entries are only supported with cluster sizes "
                         "of at least 16384 bytes")
    if options["data_file_raw"] and not options["data_file"]:
        raise UsageError("data_file_raw requires data_file")
    if options["backing_file"] and options["data_file_raw"]:
        raise UsageError("backing file and data_file_raw cannot be used together")
    if options["backing_fmt"] and not options["backing_file"]:
        raise UsageError("backing_fmt requires backing_file")
    if options["backing_file"] and options["preallocation"] != "off":
        raise UsageError("backing file and preallocation cannot be used together")
    if options["backing_file"] and len(options["backing_file"].encode()) > \
            MAX_BACKING_FILE_NAME:
        raise UsageError(f"backing file name longer than {MAX_BACKING_FILE_NAME} bytes")


@dataclass(frozen=True)
class Layout:
    """Where the metadata of a new image goes, in clusters."""

    refcount_table_cluster: int
    refcount_table_clusters: int
    refcount_block_cluster: int
    refcount_blocks: int
    l1_cluster: int
    l1_size: int
    total_clusters: int
    #: the embedded LUKS header (encrypt.format=luks) follows the L1 table
    crypto_bytes: int = 0
    cluster_bits: int = 16

    @property
    def crypto_clusters(self) -> int:
        return -(-self.crypto_bytes // (1 << self.cluster_bits))

    @property
    def crypto_cluster(self) -> int:
        return self.total_clusters - self.crypto_clusters


def initial_layout(size: int, settings: CreateSettings, crypto_bytes: int = 0) -> Layout:
    """Header, refcount table, refcount blocks, L1 (and, encrypted, the LUKS
    header, as QEMU places it): enough refcount blocks to count all of them,
    and enough table to point at every block."""
    cluster_size = 1 << settings.cluster_bits
    l1_size = l1_entries_needed(size, settings.cluster_bits, settings.extended_l2)
    after_l1 = -(-l1_size * 8 // cluster_size) + -(-crypto_bytes // cluster_size)
    refs = RefcountGeometry(settings.cluster_bits, settings.refcount_order)
    blocks, table_clusters = 1, 1
    while True:
        total = 1 + table_clusters + blocks + after_l1
        needed_blocks = -(-total // refs.block_entries)
        needed_table = -(-needed_blocks * 8 // cluster_size)
        if needed_blocks <= blocks and needed_table <= table_clusters:
            break
        blocks, table_clusters = max(blocks, needed_blocks), max(table_clusters, needed_table)
    return Layout(1, table_clusters, 1 + table_clusters, blocks,
                  1 + table_clusters + blocks, l1_size, total, crypto_bytes,
                  settings.cluster_bits)


def header_cluster(size: int, settings: CreateSettings, layout: Layout) -> bytes:
    """The first cluster: header, extensions, backing file name."""
    cluster_size = 1 << settings.cluster_bits
    incompat = (INCOMPAT_EXTL2 if settings.extended_l2 else 0) \
        | (INCOMPAT_DATA_FILE if settings.data_file else 0) \
        | (INCOMPAT_COMPRESSION if settings.compression_type else 0)
    extensions: list[Extension] = []
    if settings.backing_fmt:
        extensions.append(string_extension(EXT_BACKING_FORMAT, settings.backing_fmt))
    if settings.data_file:
        extensions.append(string_extension(EXT_DATA_FILE, settings.data_file))
    if layout.crypto_bytes:
        extensions.append(Extension(EXT_CRYPTO_HEADER, CRYPTO_HEADER_EXT.pack(
            layout.crypto_cluster << settings.cluster_bits, layout.crypto_bytes)))
    if settings.version >= 3:
        extensions.append(feature_table_extension())
    backing = (settings.backing_file or "").encode()
    header = Header(
        magic=MAGIC, version=settings.version, backing_file_offset=0,
        backing_file_size=len(backing), cluster_bits=settings.cluster_bits, size=size,
        crypt_method=QCOW_CRYPT_LUKS if layout.crypto_bytes else 0,
        l1_size=layout.l1_size,
        l1_table_offset=layout.l1_cluster << settings.cluster_bits,
        refcount_table_offset=layout.refcount_table_cluster << settings.cluster_bits,
        refcount_table_clusters=layout.refcount_table_clusters, nb_snapshots=0,
        snapshots_offset=0, incompatible_features=incompat,
        compatible_features=COMPAT_LAZY_REFCOUNTS if settings.lazy_refcounts else 0,
        autoclear_features=AUTOCLEAR_DATA_FILE_RAW if settings.data_file_raw else 0,
        refcount_order=settings.refcount_order,
        header_length=HEADER_V3_LENGTH if settings.version >= 3 else HEADER_V2_LENGTH,
        compression_type=settings.compression_type)
    body = header.pack() + pack_extensions(extensions)
    if backing:
        header = header._replace(backing_file_offset=len(body))
        body = header.pack() + pack_extensions(extensions) + backing
    if len(body) > cluster_size:
        raise UsageError(f"header, extensions and backing file name need {len(body)} "
                         f"bytes, more than the {cluster_size}-byte cluster")
    return body.ljust(cluster_size, b"\0")


def metadata_clusters(settings: CreateSettings, layout: Layout) -> dict[int, bytes]:
    """Contents of the refcount table and blocks (cluster index -> bytes);
    the L1 table is all zeros and left sparse."""
    cluster_size = 1 << settings.cluster_bits
    refs = RefcountGeometry(settings.cluster_bits, settings.refcount_order)
    table = [(layout.refcount_block_cluster + number) << settings.cluster_bits
             for number in range(layout.refcount_blocks)]
    raw_table = pack_table(table).ljust(layout.refcount_table_clusters * cluster_size, b"\0")
    clusters = {layout.refcount_table_cluster: raw_table}
    for number in range(layout.refcount_blocks):
        block = bytearray(cluster_size)
        base = number * refs.block_entries
        for cluster in range(base, min(layout.total_clusters, base + refs.block_entries)):
            set_refcount(block, cluster - base, settings.refcount_order, 1)
        clusters[layout.refcount_block_cluster + number] = bytes(block)
    return clusters


async def create_image(target: Any, size: int, options: dict[str, Any],
                       ctx: OpenContext) -> None:
    from imgfs.graph import create_protocol_file
    size = -(-size // SECTOR) * SECTOR          # qemu-img rounds up to whole sectors
    settings = settings_from_options(size, options)
    filename = str(target)
    luks = None
    if settings.encrypt is not None:
        from .crypt import format_luks
        luks = await format_luks(settings.encrypt, ctx, filename)
    layout = initial_layout(size, settings, luks.payload_offset if luks else 0)
    if settings.data_file:
        data_path = os.path.join(os.path.dirname(filename), settings.data_file) \
            if not os.path.isabs(settings.data_file) else settings.data_file
        data_node = await create_protocol_file(
            data_path, ctx, size=size if settings.data_file_raw else 0,
            options={"nocow": options["nocow"]})
        await data_node.aclose()
    node = await create_protocol_file(filename, ctx, size=0,
                                      options={"nocow": options["nocow"]})
    try:
        cluster_size = 1 << settings.cluster_bits
        await node.truncate(layout.total_clusters * cluster_size)
        await node.write(0, header_cluster(size, settings, layout))
        for cluster, data in sorted(metadata_clusters(settings, layout).items()):
            await node.write(cluster * cluster_size, data)
        if luks is not None:
            for offset, data in luks.pieces:
                await node.write((layout.crypto_cluster << settings.cluster_bits) + offset,
                                 data)
        await node.flush()
    finally:
        await node.aclose()
    if settings.preallocation != "off":
        await _preallocate(filename, settings.preallocation, ctx)


async def _preallocate(filename: str, mode: str, ctx: OpenContext) -> None:
    from imgfs.graph import open_image
    node = await open_image(filename, OpenContext(read_only=False, locking=ctx.locking),
                            fmt="qcow2")
    try:
        await node.driver.preallocate(mode)      # type: ignore[attr-defined]
        await node.flush()
    finally:
        await node.aclose()
