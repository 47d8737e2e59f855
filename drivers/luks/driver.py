"""The `luks` format driver: a LUKS1 or LUKS2 image presented decrypted.

Opening validates the header (luks1.parse_header / luks2.parse_header),
resolves the passphrase (imgfs.secrets), unlocks a key slot, and keeps only
the sector cipher.  Reads and writes are whole sectors (the core widens
and read-modify-writes unaligned requests); each is one read or write of
the file child plus a bulk transform (crypto.SectorCipher).
"""
from __future__ import annotations

import os
from typing import Any

import trio

from imgfs.block import BlockDriver, Kind
from imgfs.errors import InvalidImage, Unsupported
from imgfs.node import Node, OpenContext
from imgfs.options import Int, Opt, Schema, Str, choice, in_range
from imgfs.secrets import resolve_passphrase

from . import kdf, luks1
from .crypto import ALGORITHMS, KNOWN_UNSUPPORTED, CipherSpec, SectorCipher, parse_cipher
from .header import LuksHeader, probe_version, read_header

#: QEMU's cipher-alg names -> (Linux crypto API name, key bytes per cipher)
CIPHER_ALGS: dict[str, tuple[str, int]] = {
    "aes-128": ("aes", 16), "aes-192": ("aes", 24), "aes-256": ("aes", 32),
    "camellia-128": ("camellia", 16), "camellia-192": ("camellia", 24),
    "camellia-256": ("camellia", 32), "cast5-128": ("cast5", 16), "sm4": ("sm4", 16),
    "3des": ("des3_ede", 24),
    "serpent-128": ("serpent", 16), "serpent-192": ("serpent", 24),
    "serpent-256": ("serpent", 32), "twofish-128": ("twofish", 16),
    "twofish-192": ("twofish", 24), "twofish-256": ("twofish", 32),
}
HASH_NAMES = tuple(kdf.HASHES)

CREATE_OPTS = Schema(
    Opt("key-secret", Str, help="ID of the secret that provides the passphrase"),
    Opt("cipher-alg", choice(*CIPHER_ALGS), default="aes-256",
        help="name of the encryption cipher algorithm"),
    Opt("cipher-mode", choice("xts", "cbc", "ecb", "ctr"), default="xts",
        help="name of the encryption cipher mode"),
    Opt("ivgen-alg", choice("plain", "plain64", "essiv"), default="plain64",
        help="name of the IV generator algorithm"),
    Opt("ivgen-hash-alg", choice(*HASH_NAMES), default="sha256",
        help="name of the hash algorithm to use with the IV generator"),
    Opt("hash-alg", choice(*HASH_NAMES), default="sha256",
        help="name of the hash algorithm to use for PBKDF"),
    Opt("iter-time", Int, default=2000, check=in_range(1, 3_600_000),
        help="time to spend in PBKDF in milliseconds"),
    Opt("preallocation", choice("off", "falloc", "full"), default="off",
        help="preallocation mode of the payload (off, falloc, full)"),
)


def create_spec(options: dict[str, Any]) -> tuple[CipherSpec, int]:
    """The cipher spec and volume key size that create options ask for."""
    name, per_cipher = CIPHER_ALGS[options["cipher-alg"]]
    if name in KNOWN_UNSUPPORTED or name not in ALGORITHMS:
        raise Unsupported(f"cipher not supported: {name}")
    mode = options["cipher-mode"]
    if mode == "ecb" and options["ivgen-alg"] == "essiv":
        mode_string = "ecb-plain64"      # ECB takes no IV; QEMU needs one named
    elif options["ivgen-alg"] == "essiv":
        mode_string = f"{mode}-essiv:{options['ivgen-hash-alg']}"
    else:
        mode_string = f"{mode}-{options['ivgen-alg']}"
    spec = parse_cipher(name, mode_string)
    return spec, per_cipher * 2 if mode == "xts" else per_cipher


class LuksDriver(BlockDriver):
    name = "luks"
    kind = Kind.FORMAT
    description = "LUKS1/LUKS2 encrypted volumes (cryptsetup, qemu-img)"
    open_opts = Schema(
        Opt("key-secret", Str, help="ID of the secret that provides the passphrase"),
    )
    create_opts = CREATE_OPTS

    header: LuksHeader
    cipher: SectorCipher
    payload_offset = 0
    sector_size = luks1.LUKS_SECTOR_SIZE

    @staticmethod
    def probe(head: bytes, filename: str) -> int:
        return 100 if probe_version(head) else 0

    async def open(self, options: dict[str, Any], ctx: OpenContext) -> None:
        file = self.children["file"]
        self.header = await read_header(file.read, file.size)
        self.payload_offset = self.header.payload_offset
        self.sector_size = self.header.sector_size
        self.size = self.header.payload_size(file.size)
        passphrase = resolve_passphrase(ctx, options["key-secret"],
                                        what=os.path.basename(self.node.filename))
        try:
            key = await self.header.unlock(file.read, passphrase)
        finally:
            del passphrase
        self.cipher = SectorCipher(self.header.spec, key, self.sector_size)
        del key
        self.request_alignment = self.sector_size

    async def read(self, offset: int, length: int) -> bytes:
        data = await self.children["file"].read(self.payload_offset + offset, length)
        return self.cipher.decrypt(offset // self.sector_size, data)

    async def write(self, offset: int, data: bytes) -> None:
        encrypted = self.cipher.encrypt(offset // self.sector_size, data)
        await self.children["file"].write(self.payload_offset + offset, encrypted)

    def info(self) -> dict[str, Any]:
        return {**self.header.info(), "encrypted": True}

    @classmethod
    async def create(cls, target: Any, size: int, options: dict[str, Any],
                     ctx: OpenContext) -> None:
        from imgfs.graph import create_protocol_file
        spec, key_bytes = create_spec(options)
        if size % luks1.LUKS_SECTOR_SIZE:
            raise InvalidImage(f"size {size} is not a multiple of "
                               f"{luks1.LUKS_SECTOR_SIZE} bytes")
        passphrase = resolve_passphrase(ctx, options.get("key-secret"),
                                        what=os.path.basename(str(target)))
        try:
            new = await trio.to_thread.run_sync(
                luks1.format_header, spec, key_bytes, options["hash-alg"], passphrase,
                options["iter-time"])
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
