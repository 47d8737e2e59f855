"""The `luks` format driver: a LUKS1 or LUKS2 image presented decrypted.

Opening validates the header (luks1.parse_header / luks2.parse_header),
resolves the passphrase (imgfs.secrets), unlocks a key slot, and keeps only
the sector cipher.  Reads and writes are whole sectors (the core widens
and read-modify-writes unaligned requests); each is one read or write of
the file child plus a bulk transform (spec.sector_cipher).
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import trio

from imgfs.block import BlockDriver, Kind, Measurement, MeasureSource
from imgfs.errors import PermissionDenied
from imgfs.node import Node, OpenContext
from imgfs.options import Opt, Schema, Str
from imgfs.secrets import resolve_passphrase

from . import luks1
from . import probe as probe_luks
from .create import CREATE_OPTS, check_options, create_spec, format_header, payload_bytes
from .header import LuksHeader, read_header
from .keyslots import AMEND_OPTS, amend_keyslots
from .spec import sector_cipher

if TYPE_CHECKING:
    from .spec import SectorTransform

#: reads at least this large are decrypted in a worker thread
THREAD_MIN = 64 * 1024


class LuksDriver(BlockDriver):
    name = "luks"
    kind = Kind.FORMAT
    description = "LUKS1/LUKS2 encrypted volumes (cryptsetup, qemu-img)"
    open_opts = Schema(
        Opt("key-secret", Str, help="ID of the secret that provides the passphrase"),
    )
    create_opts = CREATE_OPTS
    amend_opts = AMEND_OPTS
    #: the key-secret the image was opened with (amend unlocks again)
    key_secret: str | None = None

    #: unwritten payload decrypts to noise, not zeros: convert must write zeros
    has_zero_init = False

    header: LuksHeader
    #: None when opened only to be described (imgfs info needs no passphrase)
    cipher: SectorTransform | None = None
    payload_offset = 0
    sector_size = luks1.LUKS_SECTOR_SIZE

    @staticmethod
    def probe(head: bytes, filename: str) -> int:
        return probe_luks(head, filename)

    async def open(self, options: dict[str, Any], ctx: OpenContext) -> None:
        file = self.children["file"]
        self.header = await read_header(file.read, file.size)
        self.payload_offset = self.header.payload_offset
        self.sector_size = self.header.sector_size
        self.size = self.header.payload_size(file.size)
        self.request_alignment = self.sector_size
        if ctx.no_io:
            return          # as qemu-img info: the header is all it shows
        self.key_secret = options["key-secret"]
        passphrase = resolve_passphrase(ctx, options["key-secret"],
                                        what=os.path.basename(self.node.filename))
        try:
            key = await self.header.unlock(file.read, passphrase)
        finally:
            del passphrase
        self.cipher = sector_cipher(self.header.spec, key, self.sector_size)
        del key

    async def read(self, offset: int, length: int) -> bytes:
        data = await self.children["file"].read(self.payload_offset + offset, length)
        return await self._decrypt(offset, data)

    async def write(self, offset: int, data: bytes) -> None:
        # Encrypted on this thread, whatever its size: a write is answered
        # only once it is in the file, so nothing overlaps its encryption,
        # and a worker's hand-off only costs CPU (bench/README.md).
        encrypted = self._unlocked().encrypt(offset // self.sector_size, data)
        await self.children["file"].write(self.payload_offset + offset, encrypted)

    def _unlocked(self) -> SectorTransform:
        if self.cipher is None:
            raise PermissionDenied("opened without its passphrase (metadata only)")
        return self.cipher

    async def _decrypt(self, offset: int, data: bytes) -> bytes:
        # The sector cipher releases the GIL, so a large read's decryption
        # runs in a worker while the trio thread serves the next FUSE request
        # (read-ahead keeps several in flight: faster sequential reads,
        # bench/README.md).  A small one costs less than the hand-off.
        decrypt, sector = self._unlocked().decrypt, offset // self.sector_size
        if len(data) < THREAD_MIN:
            return decrypt(sector, data)
        return await trio.to_thread.run_sync(decrypt, sector, data)

    def info(self) -> dict[str, Any]:
        return {**self.header.info(), "encrypted": True}

    async def amend(self, options: dict[str, Any]) -> None:
        """Key slots added or erased (LUKS1), each piece durable before the next."""
        file = self.children["file"]

        async def write(offset: int, data: bytes) -> None:
            await file.write(offset, data)
            await file.flush()
        await amend_keyslots(self.header, file.read, write, options, self.node.ctx,
                             self.key_secret, os.path.basename(self.node.filename))

    @classmethod
    def measure(cls, size: int, options: dict[str, Any],
                source: MeasureSource | None) -> Measurement:
        """Header and key material, then the payload (always fully allocated)."""
        total = payload_bytes(options) + (source.size if source is not None else size)
        return Measurement(total, total)

    @classmethod
    async def create(cls, target: Any, size: int, options: dict[str, Any],
                     ctx: OpenContext) -> None:
        from imgfs.graph import create_protocol_file
        check_options(options, size)
        create_spec(options)          # an unsupported cipher fails before the prompt
        passphrase = resolve_passphrase(ctx, options.get("key-secret"),
                                        what=os.path.basename(str(target)))
        try:
            new = await trio.to_thread.run_sync(format_header, options, passphrase)
        finally:
            del passphrase
        node = await create_protocol_file(str(target), ctx, size=0, options=options)
        try:
            await _write_new(node, new, size, options["preallocation"])
        finally:
            await node.aclose()


async def _write_new(node: Node, new: luks1.NewHeader, size: int, preallocation: str) -> None:
    # Size (and preallocate) first: the header is then written inside the file.
    await node.truncate(new.payload_offset + size, preallocation)
    for offset, data in new.pieces:
        await node.write(offset, data)
    await node.flush()
