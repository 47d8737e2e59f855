"""qcow2 ``encrypt.format=luks``: the embedded LUKS header and the data
cluster cipher.

Spec: qemu/qemu docs/interop/qcow2.txt ("Full disk encryption header
pointer", crypt_method 2).  The header extension 0x0537be77 gives the
offset and length of a LUKS header stored inside the qcow2 file (its key
material included; its payload offset means nothing here).  Every data
cluster is encrypted per 512-byte sector, the sector number being the
*host* offset / 512 (checked against qemu-io: a cluster QEMU wrote
decrypts with host sectors, not guest ones).  Zero and unallocated
clusters are not encrypted; they read as zeros.

Creation (`encrypt_create_options`, `format_luks`) takes QEMU's
``encrypt.*`` options and formats a LUKS1 header with drivers/luks, which
`create` places after the L1 table, as QEMU does.

Legacy AES (crypt_method 1, ``encrypt.format=aes``; spec: "crypt_method"
in the header) is readable for data liberation only (`AesCipher`,
`open_aes_cipher`): AES-128-CBC per 512-byte sector, the key the
passphrase's bytes truncated or zero-padded to 16, the IV the sector
number as a 64-bit little-endian integer zero-padded to 16 bytes, the
sector number being the *guest* offset / 512 (checked against qemu-io:
unlike LUKS, host sectors give garbage).  The scheme has no key check:
as QEMU, any passphrase "opens" the image and a wrong one reads garbage.
It is never written: the driver refuses to open it read-write, and it
cannot be created.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from imgfs.errors import InvalidImage, PermissionDenied, ReadOnly, Unsupported
from imgfs.node import Node, OpenContext
from imgfs.secrets import resolve_passphrase

from ..luks.header import LuksHeader, read_header
from ..luks.luks1 import NewHeader, qemu_info_order
from ..luks.spec import sector_cipher
from .crypt_options import LEGACY_AES_READ_ONLY, SECTOR_SIZE
from .header import ImageHeader

if TYPE_CHECKING:
    from ..luks.spec import SectorTransform

#: reads at least this large are decrypted in a worker thread (as drivers/luks)
THREAD_MIN = 64 * 1024
#: legacy AES keys are AES-128: the passphrase truncated or zero-padded to this
AES_KEY_SIZE = 16


class ClusterCipher:
    """The LUKS header of one image and its sector cipher (None when the
    image was opened only to be described: imgfs info needs no passphrase)."""

    #: sectors are numbered by host offset (LUKS); legacy AES uses guest offsets
    physical = True

    def __init__(self, header: LuksHeader, cipher: SectorTransform | None, offset: int,
                 length: int, secret_id: str | None = None) -> None:
        self.header = header
        self.cipher = cipher
        self.offset = offset
        self.length = length
        #: the encrypt.key-secret the image was opened with (amend unlocks again)
        self.secret_id = secret_id

    def info(self) -> dict[str, Any]:
        """qemu-img info's format-specific.data.encrypt."""
        return qemu_info_order({"format": "luks", **self.header.info()})

    async def decrypt(self, host_offset: int, data: bytes) -> bytes:
        return await self._transform(self._unlocked().decrypt, host_offset, data)

    async def encrypt(self, host_offset: int, data: bytes | memoryview) -> bytes:
        # (on this thread, as a luks image's writes: see LuksDriver.write)
        return await self._transform(self._unlocked().encrypt, host_offset, data,
                                     threaded=False)

    def _unlocked(self) -> SectorTransform:
        if self.cipher is None:
            raise PermissionDenied("opened without its passphrase (metadata only)")
        return self.cipher

    @staticmethod
    async def _transform(transform: Callable[[int, Any], bytes], host_offset: int,
                         data: bytes | memoryview, threaded: bool = True) -> bytes:
        if host_offset % SECTOR_SIZE:
            raise InvalidImage(f"encrypted request at host offset {host_offset:#x} is "
                               "not sector aligned")
        tail = -len(data) % SECTOR_SIZE      # a file that ends mid-sector
        if tail:
            data = bytes(data) + bytes(tail)
        sector = host_offset // SECTOR_SIZE
        if not threaded or len(data) < THREAD_MIN:
            result = transform(sector, data)
        else:
            result = await trio.to_thread.run_sync(transform, sector, data)
        return result[:len(result) - tail] if tail else result


async def open_cipher(image: ImageHeader, file: Node, options: dict[str, Any],
                      ctx: OpenContext, filename: str) -> ClusterCipher:
    """Validate the embedded header, resolve the passphrase, unlock."""
    if image.crypto_header is None:
        raise InvalidImage("the image is not LUKS encrypted")
    offset, length = image.crypto_header

    async def read(position: int, count: int) -> bytes:
        return await file.read(offset + position, count)

    header = await read_header(read, length)
    if header.sector_size != SECTOR_SIZE:
        raise Unsupported(f"LUKS sector size {header.sector_size} in a qcow2 image "
                          f"(expected {SECTOR_SIZE})")
    if ctx.no_io:
        return ClusterCipher(header, None, offset, length)    # as qemu-img info
    secret_id = (options.get("encrypt") or {}).get("key-secret") \
        or options.get("encrypt.key-secret")
    passphrase = resolve_passphrase(ctx, secret_id,
                                    what=os.path.basename(filename))
    try:
        key = await header.unlock(read, passphrase)
    finally:
        del passphrase
    cipher = sector_cipher(header.spec, key, SECTOR_SIZE)
    del key
    return ClusterCipher(header, cipher, offset, length, secret_id)


class AesCipher:
    """Legacy qcow2 AES (crypt_method 1): read-only, see the module docstring.

    `decrypt` takes the *guest* offset of the data (``physical`` is False)."""

    physical = False

    def __init__(self, passphrase: bytes | None) -> None:
        """None: opened only to be described (imgfs info), nothing decrypts."""
        self._algorithm: algorithms.AES | None = None
        if passphrase is not None:
            key = bytes(passphrase[:AES_KEY_SIZE]).ljust(AES_KEY_SIZE, b"\0")
            self._algorithm = algorithms.AES(key)
            del key

    def info(self) -> dict[str, Any]:
        """qemu-img info's format-specific.data.encrypt."""
        return {"format": "aes"}

    async def decrypt(self, guest_offset: int, data: bytes) -> bytes:
        if guest_offset % SECTOR_SIZE:
            raise InvalidImage(f"encrypted request at guest offset {guest_offset:#x} is "
                               "not sector aligned")
        tail = -len(data) % SECTOR_SIZE
        if tail:
            data = bytes(data) + bytes(tail)
        sector = guest_offset // SECTOR_SIZE
        if len(data) < THREAD_MIN:
            result = self._decrypt(sector, data)
        else:
            result = await trio.to_thread.run_sync(self._decrypt, sector, data)
        return result[:len(result) - tail] if tail else result

    def _decrypt(self, sector: int, data: bytes) -> bytes:
        if self._algorithm is None:
            raise PermissionDenied("opened without its passphrase (metadata only)")
        view = memoryview(data)
        out = bytearray(len(data))
        for start in range(0, len(data), SECTOR_SIZE):
            iv = (sector + start // SECTOR_SIZE).to_bytes(16, "little")
            decryptor = Cipher(self._algorithm, modes.CBC(iv)).decryptor()
            out[start:start + SECTOR_SIZE] = \
                decryptor.update(view[start:start + SECTOR_SIZE]) + decryptor.finalize()
        return bytes(out)

    async def encrypt(self, host_offset: int, data: bytes | memoryview) -> bytes:
        raise ReadOnly(LEGACY_AES_READ_ONLY)


def open_aes_cipher(options: dict[str, Any], ctx: OpenContext, filename: str) -> AesCipher:
    """Resolve the passphrase of a legacy AES image (nothing checks it)."""
    if ctx.no_io:
        return AesCipher(None)            # as qemu-img info: no passphrase asked
    secret_id = (options.get("encrypt") or {}).get("key-secret") \
        or options.get("encrypt.key-secret")
    passphrase = resolve_passphrase(ctx, secret_id, what=os.path.basename(filename))
    try:
        return AesCipher(passphrase)
    finally:
        del passphrase


# -- creation -------------------------------------------------------------------------

async def format_luks(luks_options: dict[str, Any], ctx: OpenContext,
                      filename: str) -> NewHeader:
    """A new LUKS1 header for an image (QEMU's qcow2 embeds LUKS1 only)."""
    from ..luks.create import format_header
    passphrase = resolve_passphrase(ctx, luks_options.get("key-secret"),
                                    what=os.path.basename(filename))
    try:
        return await trio.to_thread.run_sync(format_header, luks_options, passphrase)
    finally:
        del passphrase
