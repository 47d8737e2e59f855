"""Changing the options of an existing qcow2 image (`imgfs amend -f qcow2`).

Spec: qemu/qemu docs/interop/qcow2.txt ("Header", "Cluster mapping" for
the zero flag, "Host cluster management" for refcount_order).  What QEMU
can amend, in QEMU's order: an upgrade to version 3 first, then a new
refcount width (new refcount blocks and table, written after the end of
the file, then one header write pointing at them), lazy refcounts, the
size, and a downgrade to version 2 last (zero clusters, which version 2
cannot express, become unallocated or written zeros first).  ``encrypt.*``
adds or erases key slots of the embedded LUKS header (luks/keyslots.py).
Creation-only options and a new backing file (that is `imgfs rebase`) are
refused with one line each.
"""
from __future__ import annotations

import os
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol

from imgfs.block import Status
from imgfs.errors import ImgfsError, Unsupported
from imgfs.options import Bool, Int, Opt, Schema, Size, Str, choice

from ..luks.keyslots import AMEND_OPTS as KEYSLOT_OPTS
from .create import refcount_bits_check  # one rule for create and amend
from .header import (
    COMPAT_LAZY_REFCOUNTS,
    EXT_BITMAPS,
    EXT_FEATURE_TABLE,
    HEADER_V2_LENGTH,
    HEADER_V3_LENGTH,
    INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
    Extension,
    Header,
    feature_table_extension,
    pack_extensions,
)

if TYPE_CHECKING:
    from imgfs.block import Extent
    from imgfs.node import Node

    from .crypt import AesCipher, ClusterCipher
    from .metadata import Qcow2Metadata


class Qcow2Driver(Protocol):
    """What amending needs of the qcow2 driver (declared here: this module
    does not import the driver, which imports it)."""

    meta: Qcow2Metadata
    node: Node
    crypto: ClusterCipher | AesCipher | None
    size: int

    async def flush(self) -> None: ...
    async def write(self, offset: int, data: bytes) -> None: ...
    async def block_status(self, offset: int, length: int) -> Extent: ...
    async def discard_to_unallocated(self, offset: int, length: int) -> None: ...

REFCOUNT_ORDER_V2 = 4
#: bytes of zeros written at a time when a downgrade expands zero clusters
ZERO_CHUNK = 1024 * 1024


AMEND_OPTS = Schema(
    Opt("compat", choice("0.10", "1.1", "v2", "v3"),
        help="compatibility level (v2 [0.10] or v3 [1.1])"),
    Opt("lazy_refcounts", Bool, help="postpone refcount updates"),
    Opt("refcount_bits", Int, check=refcount_bits_check,
        help="width of a reference count entry in bits"),
    Opt("size", Size, help="virtual disk size"),
    Opt("backing_file", Str, help="file name of a base image (only its current name)"),
    Opt("backing_fmt", Str, help="image format of the base image (only its current format)"),
    Opt("data_file", Str, help="file name of the external data file (only its current name)"),
    Opt("data_file_raw", Bool, help="the external data file must stay valid as a raw image"),
    *(replace(opt, name=f"encrypt.{opt.name}") for opt in KEYSLOT_OPTS.opts),
)


def target_version(options: dict[str, Any], current: int) -> int:
    compat = options.get("compat")
    if compat is None:
        return current
    return 2 if compat in ("0.10", "v2") else 3


def check_request(driver: Qcow2Driver, options: dict[str, Any]) -> None:
    """Refuse what QEMU refuses (with its reasons) before changing anything."""
    image, header = driver.meta.image, driver.meta.header
    if options.get("backing_file") not in (None, image.backing_file) or \
            options.get("backing_fmt") not in (None, image.backing_format):
        raise ImgfsError("Cannot amend the backing file (use 'imgfs rebase' instead)")
    if "data_file" in options and not driver.meta.has_data_file:
        raise ImgfsError("data-file can only be set for images that use an external data file")
    if options.get("data_file") not in (None, driver.meta.data_file_name) or \
            options.get("data_file_raw") not in (None, driver.meta.data_file_raw):
        raise Unsupported("changing the external data file is not supported")
    version = target_version(options, driver.meta.version)
    # As QEMU: only a change is checked (lazy refcounts already on may stay
    # asked for in a downgrade, which then drops them)
    current_bits = 1 << header.refcount_order
    bits = options.get("refcount_bits") or current_bits
    if version < 3:
        if options.get("lazy_refcounts") and \
                not header.compatible_features & COMPAT_LAZY_REFCOUNTS:
            raise ImgfsError("Lazy refcounts only supported with compatibility level 1.1 "
                             "and above (use compat=1.1 or greater)")
        if bits != current_bits and bits != 16:
            raise ImgfsError("Refcount widths other than 16 bits require compatibility "
                             "level 1.1 or above (use compat=1.1 or greater)")
        if bits != 16:
            raise ImgfsError("compat=0.10 requires refcount_bits=16")
    if version < driver.meta.version:
        _check_downgrade(driver)


def _check_downgrade(driver: Qcow2Driver) -> None:
    if driver.meta.has_data_file:
        raise ImgfsError("Cannot downgrade an image with a data file")
    other = driver.meta.header.incompatible_features & ~(INCOMPAT_DIRTY | INCOMPAT_CORRUPT)
    if other:
        raise ImgfsError(f"Cannot downgrade an image with incompatible features {other:#x} set")
    if driver.meta.snapshots:
        raise Unsupported("cannot downgrade an image with internal snapshots (their zero "
                          "clusters would need expanding)")
    if driver.meta.bitmaps is not None:
        raise Unsupported("cannot downgrade an image with persistent bitmaps "
                          "(version 2 cannot store them)")


async def amend(driver: Qcow2Driver, options: dict[str, Any]) -> None:
    """Apply the given options (only the keys the user gave)."""
    check_request(driver, options)
    encrypt = {key[len("encrypt."):]: value for key, value in options.items()
               if key.startswith("encrypt.")}
    if encrypt:
        await amend_keyslots(driver, encrypt)
    version = target_version(options, driver.meta.version)
    if version > driver.meta.version:
        await write_header(driver, upgraded_header(driver.meta.header))
    bits = options.get("refcount_bits")
    if bits is not None and bits != 1 << driver.meta.header.refcount_order:
        from .repair import rebuild_refcount_structures
        await rebuild_refcount_structures(driver.meta, refcount_order=bits.bit_length() - 1)
    lazy = options.get("lazy_refcounts")
    if lazy is not None and version >= 3:
        compat = driver.meta.header.compatible_features & ~COMPAT_LAZY_REFCOUNTS
        await write_header(driver, driver.meta.header._replace(
            compatible_features=compat | (COMPAT_LAZY_REFCOUNTS if lazy else 0)))
    if options.get("size") is not None and options["size"] != driver.size:
        await driver.node.truncate(options["size"])
    if version < driver.meta.version:
        await expand_zero_clusters(driver)
        await write_header(driver, downgraded_header(driver.meta.header))


async def amend_keyslots(driver: Qcow2Driver, options: dict[str, Any]) -> None:
    """encrypt.state/keyslot/new-secret/old-secret: the embedded LUKS header's
    key slots, as for a standalone LUKS image."""
    from ..luks.keyslots import amend_keyslots as amend_luks
    from .crypt import ClusterCipher
    crypto = driver.crypto
    if not isinstance(crypto, ClusterCipher):
        raise ImgfsError("encrypt.* options need an image encrypted with "
                         "encrypt.format=luks")
    file = driver.meta.children["file"]

    async def read(position: int, count: int) -> bytes:
        return await file.read(crypto.offset + position, count)

    async def write(position: int, data: bytes) -> None:
        if position + len(data) > crypto.length:
            raise ImgfsError(f"key slot data at {position} runs past the "
                             f"{crypto.length}-byte LUKS header area")
        await file.write(crypto.offset + position, data)
        await file.flush()
    await amend_luks(crypto.header, read, write, options, driver.node.ctx, crypto.secret_id,
                     os.path.basename(driver.node.filename))


def upgraded_header(header: Header) -> Header:
    """Version 3 with no feature bits, 16-bit refcounts (what version 2 had)."""
    return header._replace(version=3, incompatible_features=0, compatible_features=0,
                           autoclear_features=0, refcount_order=REFCOUNT_ORDER_V2,
                           header_length=HEADER_V3_LENGTH, compression_type=0)


def downgraded_header(header: Header) -> Header:
    return header._replace(version=2, incompatible_features=0, compatible_features=0,
                           autoclear_features=0, refcount_order=REFCOUNT_ORDER_V2,
                           header_length=HEADER_V2_LENGTH, compression_type=0)


def header_extensions(extensions: tuple[Extension, ...], version: int) -> list[Extension]:
    """The extensions a header of `version` keeps: the feature-name table
    only in version 3 (QEMU writes it there), bitmaps never in version 2."""
    kept = [ext for ext in extensions if ext.type != EXT_FEATURE_TABLE
            and not (version < 3 and ext.type == EXT_BITMAPS)]
    if version >= 3:
        kept.append(feature_table_extension())
    return kept


async def write_header(driver: Qcow2Driver, header: Header) -> None:
    """Rewrite the header cluster: fields, extensions, backing file name.
    Metadata is written back and flushed first: the new header must not
    point at tables that are not on disk yet."""
    from .header import parse_image_header, with_backing
    await driver.flush()
    file = driver.meta.children["file"]
    await file.flush()
    image = driver.meta.image
    extensions = header_extensions(image.extensions, header.version)
    head = header.pack() + pack_extensions(extensions)
    rebuilt = image.__class__(header=header, extensions=tuple(extensions))
    body = with_backing(head, rebuilt, image.backing_file, image.backing_format)
    old = await file.read(0, min(file.size, driver.meta.cluster_size))
    await file.write(0, body.ljust(len(old), b"\0"))
    await file.flush()
    driver.meta.image = parse_image_header(body.ljust(len(old), b"\0"), file.size)
    driver.meta.header = driver.meta.image.header
    driver.meta.version = header.version


async def expand_zero_clusters(driver: Qcow2Driver) -> None:
    """Version 2 has no zero flag: a zero cluster becomes unallocated when
    nothing is below it, and written zeros when a backing file is."""
    offset = 0
    while offset < driver.size:
        extent = await driver.block_status(offset, driver.size - offset)
        length = min(extent.length, driver.size - offset)
        if extent.status & Status.ALLOCATED and extent.status & Status.ZERO:
            if driver.node.backing is None:
                await driver.discard_to_unallocated(offset, length)
            else:
                for start in range(offset, offset + length, ZERO_CHUNK):
                    await driver.write(start, bytes(min(ZERO_CHUNK, offset + length - start)))
        offset += length
    await driver.flush()
