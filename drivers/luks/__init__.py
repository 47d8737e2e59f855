"""`luks`: LUKS1 and LUKS2 encrypted images, as cryptsetup and QEMU write them.

Specs: LUKS1 — libyal/libluksde "Linux Unified Key Setup (LUKS) Disk
Encryption format" (the LUKS1 on-disk specification); LUKS2 — cryptsetup's
docs/on-disk-format-luks2.pdf and the JSON that ``cryptsetup luksDump
--dump-json-metadata`` prints.

Modules: `spec` (cipher names, parsed without numpy, and the choice of
sector cipher), `_sectors` (AES sectors in C, with OpenSSL), `crypto` (the
Python path for the other ciphers: bulk XTS/CBC/CTR with numpy, imported
while the PBKDF runs), `nettle` (serpent and twofish blocks), `kdf`
(PBKDF2, Argon2, AF splitter), `luks1` and `luks2` (headers, key slots),
`create` (qemu-img's create options, the LUKS2 layout), `header` (the entry
point qcow2's ``encrypt.format=luks`` can reuse), `early` (a mount's PBKDF
started before the rest of imgfs loads), `driver` (the format driver).

Supported: LUKS1 read/write/create (all 8 key slots, PBKDF2 with the SHA-1,
SHA-2, SHA-3, BLAKE2 and SM3 hashes, aes/serpent/twofish/camellia/sm4 in
xts, cbc, ecb, ctr and cast5/blowfish/des3_ede in cbc, ecb, ctr, with
plain, plain64, essiv and null IVs); LUKS2
read/write and create with ``format=luks2`` (keyslots with pbkdf2, argon2i,
argon2id; one crypt segment, sector sizes 512 to 4096).  Refused with a
message: ciphers neither `cryptography` nor Nettle has (cast6, anubis, ...), LUKS2
integrity, reencryption, several segments, detached headers; resizing.
"""
from __future__ import annotations

from typing import Any

#: LUKS1 spec section 2 / LUKS2 binary header: the magic of both versions
LUKS_MAGIC = b"LUKS\xba\xbe"


def probe_version(head: bytes) -> int:
    """1 or 2 for a LUKS header at the start of `head`, else 0."""
    if len(head) < 8 or head[:6] != LUKS_MAGIC:
        return 0
    version = int.from_bytes(head[6:8], "big")
    return version if version in (1, 2) else 0


def probe(head: bytes, filename: str) -> int:
    """Probing stays light: the ciphers load only when opening."""
    return 100 if probe_version(head) else 0


def __getattr__(name: str) -> Any:
    if name in ("DRIVERS", "LuksDriver"):
        from .driver import LuksDriver
        return [LuksDriver] if name == "DRIVERS" else LuksDriver
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
