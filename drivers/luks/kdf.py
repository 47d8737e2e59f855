"""Key derivation for LUKS: hashes, PBKDF2, Argon2, the anti-forensic
splitter, and PBKDF2 calibration against the clock.

The AF splitter (LUKS1 spec section 2.4, "AF-Splitter"): the volume key is
stored as `stripes` blocks of key size; all but the last are random, each
is XORed into a running value that is then diffused through the hash, and
the last block is that value XOR the key.  Losing any stripe loses the key,
which is the point: a partly overwritten key slot is unrecoverable.
The diffusion hashes the block in digest-sized pieces, each prefixed with
its big-endian 32-bit index, keeping as many bytes of each digest as the
piece had.

Every primitive is `cryptography`'s; this module only composes them, with
one exception.  PBKDF2's output blocks are independent of each other (a
512-bit XTS key with SHA-256 is two), but `cryptography`, like every
library, derives them one after another.  So where the compiled `_kdf`
module is present (setup.py), PBKDF2 with SHA-1 and SHA-2 runs there, each
block on its own core, with libcrypto's SHA functions: the open of a default
LUKS image takes half the time on two cores.  The AF merge of those hashes
runs there too (8,000 hashes in a Python loop were a visible part of every
open: bench/README.md).
Key-slot iteration counts are still calibrated against `cryptography`'s
one-core PBKDF2: that is the time cryptsetup and QEMU take to open the
image.

`cryptography` is imported where it is used, not here: a mount starts its
LUKS images' PBKDF2 (`early`) before anything else loads, and that import
then runs beside the derivation instead of before it.
"""
from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from imgfs.errors import Unsupported

if TYPE_CHECKING:
    from cryptography.hazmat.primitives import hashes

try:
    from ._kdf import af_merge as native_af_merge
    from ._kdf import hashes as native_hashes
    from ._kdf import pbkdf2 as native_pbkdf2
    #: hash name -> digest size, for the hashes the native module knows
    NATIVE_HASHES: dict[str, int] = native_hashes()
except ImportError:              # installed without a compiler: one core
    NATIVE_HASHES = {}

#: LUKS hash names (as cryptsetup and QEMU write them) -> the class in
#: cryptography's `hashes` (and the digest size BLAKE2 takes)
HASHES: dict[str, tuple[str, int | None]] = {
    "sha1": ("SHA1", None),
    "sha224": ("SHA224", None),
    "sha256": ("SHA256", None),
    "sha384": ("SHA384", None),
    "sha512": ("SHA512", None),
    "sha3-224": ("SHA3_224", None),
    "sha3-256": ("SHA3_256", None),
    "sha3-384": ("SHA3_384", None),
    "sha3-512": ("SHA3_512", None),
    "blake2b-512": ("BLAKE2b", 64),
    "blake2s-256": ("BLAKE2s", 32),
    "sm3": ("SM3", None),
    "md5": ("MD5", None),
}
#: PBKDF2 / Argon2 limits: a header asking for more is refused rather than
#: letting a hostile image hang the open or exhaust memory.  cryptsetup's own
#: maxima are 4 GiB of Argon2 memory and 4 Argon2 threads.
MAX_PBKDF2_ITERATIONS = 100_000_000
MAX_ARGON2_TIME = 10_000
MAX_ARGON2_MEMORY_KIB = 4 * 1024 * 1024
MAX_ARGON2_LANES = 16
MIN_PBKDF2_ITERATIONS = 1000


def argon2_memory_limit_kib() -> int:
    """Argon2 memory imgfs will spend: cryptsetup's maximum, and never more
    than half of this machine's RAM (a hostile header must not exhaust it)."""
    try:
        ram_kib = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 1024
    except (ValueError, OSError):
        return MAX_ARGON2_MEMORY_KIB
    return min(MAX_ARGON2_MEMORY_KIB, max(ram_kib // 2, 64 * 1024))


def _canonical(hash_name: str) -> str:
    """A hash name as HASHES and the native module spell it."""
    return hash_name.strip().lower()


def _native_name(hash_name: str) -> str | None:
    """The name the native module knows this hash by, if it knows it."""
    name = _canonical(hash_name)
    return name if name in NATIVE_HASHES else None


def hash_algorithm(name: str) -> hashes.HashAlgorithm:
    from cryptography.hazmat.primitives import hashes
    try:
        class_name, digest_size = HASHES[_canonical(name)]
    except KeyError:
        raise Unsupported(f"hash not supported: {name}") from None
    algorithm = getattr(hashes, class_name)
    return algorithm() if digest_size is None else algorithm(digest_size)


def digest(name: str | None, data: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    context = hashes.Hash(hash_algorithm(name or ""))
    context.update(data)
    return context.finalize()


def pbkdf2(hash_name: str, passphrase: bytes, salt: bytes, iterations: int,
           length: int) -> bytes:
    """PBKDF2-HMAC: on every core for the hashes the native module knows
    (see the module's docstring), else with `cryptography`."""
    name = _native_name(hash_name)
    if name is None:
        return one_core_pbkdf2(hash_name, passphrase, salt, iterations, length)
    return native_pbkdf2(name, passphrase, salt, iterations, length,
                         len(os.sched_getaffinity(0)))


def one_core_pbkdf2(hash_name: str, passphrase: bytes, salt: bytes, iterations: int,
                    length: int) -> bytes:
    """`cryptography`'s PBKDF2: the reference, and what cryptsetup and QEMU
    spend on the same derivation."""
    from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC
    kdf = PBKDF2HMAC(algorithm=hash_algorithm(hash_name), length=length, salt=salt,
                     iterations=iterations)
    return kdf.derive(passphrase)


def argon2(variant: str, passphrase: bytes, salt: bytes, *, time_cost: int,
           memory_kib: int, lanes: int, length: int) -> bytes:
    """Argon2i / Argon2id (version 1.3) as LUKS2 keyslots use them."""
    class_name = {"argon2id": "Argon2id", "argon2i": "Argon2i"}.get(variant)
    if class_name is None:
        raise Unsupported(f"key derivation not supported: {variant}")
    argon2_module: Any = None
    try:
        from cryptography.hazmat.primitives.kdf import argon2 as argon2_module
    except ImportError:
        pass
    cls = getattr(argon2_module, class_name, None)
    if cls is None:      # Argon2 arrived in cryptography 44 (argon2id) and later
        import cryptography
        raise Unsupported(f"{variant} needs a newer 'cryptography' package than "
                          f"{cryptography.__version__}")
    kdf = cls(salt=salt, length=length, iterations=time_cost, lanes=lanes,
              memory_cost=memory_kib)
    return kdf.derive(passphrase)


def xor_bytes(left: bytes, right: bytes | memoryview) -> bytes:
    mixed = int.from_bytes(left, "little") ^ int.from_bytes(right, "little")
    return mixed.to_bytes(len(left), "little")


def diffuse(block: bytes, hash_name: str) -> bytes:
    """LUKS1 spec "H1": hash each digest-sized piece with its index."""
    return _Diffuser(hash_name, len(block))(block)


class _Diffuser:
    """`diffuse` for many blocks of one size: the pieces' bounds and index
    prefixes worked out once, each piece hashed from a copy of one empty
    context (a 4000-stripe merge of a 512-bit key hashes 8000 pieces, and
    copying a context costs less than creating one: bench/README.md)."""

    def __init__(self, hash_name: str, block_size: int) -> None:
        from cryptography.hazmat.primitives import hashes
        algorithm = hash_algorithm(hash_name)
        step = algorithm.digest_size
        self.empty = hashes.Hash(algorithm)
        self.pieces = [(index.to_bytes(4, "big"), start, min(start + step, block_size))
                       for index, start in enumerate(range(0, block_size, step))]

    def __call__(self, block: bytes) -> bytes:
        out = []
        for prefix, start, end in self.pieces:
            context = self.empty.copy()
            context.update(prefix)
            context.update(block[start:end])
            out.append(context.finalize()[:end - start])
        return b"".join(out)


def af_merge(material: bytes, key_size: int, stripes: int, hash_name: str) -> bytes:
    """Recover the key from `stripes` blocks of `key_size` bytes."""
    name = _native_name(hash_name)
    if name is not None:
        return native_af_merge(material, key_size, stripes, name)
    return python_af_merge(material, key_size, stripes, hash_name)


def python_af_merge(material: bytes, key_size: int, stripes: int, hash_name: str) -> bytes:
    """`af_merge` with `cryptography`'s hashes (the reference)."""
    running = _af_running(material, key_size, stripes, hash_name)
    last = material[(stripes - 1) * key_size:stripes * key_size]
    return xor_bytes(running, last)


def _af_running(stripes_data: bytes, key_size: int, stripes: int, hash_name: str) -> bytes:
    """The running value after the first stripes - 1 blocks."""
    diffuse_block = _Diffuser(hash_name, key_size)
    view = memoryview(stripes_data)
    running = bytes(key_size)
    for start in range(0, (stripes - 1) * key_size, key_size):
        running = diffuse_block(xor_bytes(running, view[start:start + key_size]))
    return running


def af_split(key: bytes, stripes: int, hash_name: str) -> bytes:
    """The inverse of `af_merge`, with random stripes from os.urandom."""
    random_part = os.urandom(len(key) * (stripes - 1))
    return random_part + xor_bytes(_af_running(random_part, len(key), stripes, hash_name), key)


def calibrate_pbkdf2(hash_name: str, key_size: int, milliseconds: int) -> int:
    """Iterations that take about `milliseconds` here, as cryptsetup and QEMU
    calibrate (never fewer than the LUKS minimum of 1000): timed on one core,
    as they derive, so that they too open the image in about that time."""
    iterations = 1000
    while True:
        started = time.perf_counter()
        one_core_pbkdf2(hash_name, b"calibration", bytes(32), iterations, key_size)
        elapsed = time.perf_counter() - started
        if elapsed >= 0.05 or iterations >= MAX_PBKDF2_ITERATIONS // 4:
            break
        iterations *= 4
    wanted = int(iterations * (milliseconds / 1000) / max(elapsed, 1e-6))
    return max(MIN_PBKDF2_ITERATIONS, min(wanted, MAX_PBKDF2_ITERATIONS))
