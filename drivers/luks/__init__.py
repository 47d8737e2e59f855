"""`luks`: LUKS1 and LUKS2 encrypted images, as cryptsetup and QEMU write them.

Specs: LUKS1 — libyal/libluksde "Linux Unified Key Setup (LUKS) Disk
Encryption format" (the LUKS1 on-disk specification); LUKS2 — cryptsetup's
docs/on-disk-format-luks2.pdf and the JSON that ``cryptsetup luksDump
--dump-json-metadata`` prints.

Modules: `crypto` (sector ciphers, bulk XTS/CBC/CTR), `kdf` (PBKDF2, Argon2,
AF splitter), `luks1` and `luks2` (headers, key slots), `header` (the entry
point qcow2's ``encrypt.format=luks`` reuses), `driver` (the format driver).

Supported: LUKS1 read/write/create (all 8 key slots, PBKDF2 with the SHA
family and SM3, aes/camellia/sm4/cast5/blowfish/des3_ede in xts, cbc, ecb,
ctr with plain, plain64, essiv and null IVs); LUKS2 read/write (keyslots
with pbkdf2, argon2i, argon2id; one crypt segment, sector sizes 512 to
4096).  Refused: ciphers `cryptography` lacks (serpent, twofish, ...),
LUKS2 integrity, reencryption, several segments; resizing.
"""
from .driver import LuksDriver

DRIVERS = [LuksDriver]
