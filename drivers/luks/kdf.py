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

Every primitive is `cryptography`'s; this module only composes them.
"""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Any

import cryptography
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from imgfs.errors import Unsupported

#: LUKS hash names (as cryptsetup and QEMU write them) -> cryptography
HASHES: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1,
    "sha224": hashes.SHA224,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
    "sha3-224": hashes.SHA3_224,
    "sha3-256": hashes.SHA3_256,
    "sha3-384": hashes.SHA3_384,
    "sha3-512": hashes.SHA3_512,
    "blake2b-512": lambda: hashes.BLAKE2b(64),
    "blake2s-256": lambda: hashes.BLAKE2s(32),
    "sm3": hashes.SM3,
    "md5": hashes.MD5,
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


def hash_algorithm(name: str) -> hashes.HashAlgorithm:
    try:
        return HASHES[name.strip().lower()]()
    except KeyError:
        raise Unsupported(f"hash not supported: {name}") from None


def digest(name: str | None, data: bytes) -> bytes:
    context = hashes.Hash(hash_algorithm(name or ""))
    context.update(data)
    return context.finalize()


def pbkdf2(hash_name: str, passphrase: bytes, salt: bytes, iterations: int,
           length: int) -> bytes:
    """PBKDF2, or the result of the same derivation `derive_early` started."""
    with _EARLY_LOCK:
        early = _EARLY.pop((hash_name, passphrase, salt, iterations, length), None)
    if early is not None:
        return early.result()
    return _pbkdf2(hash_name, passphrase, salt, iterations, length)


def _pbkdf2(hash_name: str, passphrase: bytes, salt: bytes, iterations: int,
            length: int) -> bytes:
    kdf = PBKDF2HMAC(algorithm=hash_algorithm(hash_name), length=length, salt=salt,
                     iterations=iterations)
    return kdf.derive(passphrase)


#: derivations started ahead of need (see `derive_early`), by their inputs
_EARLY: dict[tuple[str, bytes, bytes, int, int], Future[bytes]] = {}
_EARLY_LOCK = threading.Lock()


def derive_early(hash_name: str, passphrase: bytes, salt: bytes, iterations: int,
                 length: int) -> None:
    """Start a PBKDF2 in a thread now; `pbkdf2` with the same inputs later
    takes its result instead of deriving again.  (OpenSSL releases the GIL,
    so the rest of the program keeps loading meanwhile: see luks.early.)
    The result stays in memory only, and only until taken or forgotten."""
    inputs = (hash_name, passphrase, salt, iterations, length)
    result: Future[bytes] = Future()

    def derive() -> None:
        try:
            result.set_result(_pbkdf2(*inputs))
        except BaseException as exc:      # the open that takes it raises it
            result.set_exception(exc)
    with _EARLY_LOCK:
        _EARLY[inputs] = result
    threading.Thread(target=derive, name="imgfs-early-pbkdf2", daemon=True).start()


def forget_early(salts: Iterable[bytes]) -> None:
    """Drop early derivations for these salts that nothing took (an image's
    key slots, once it is unlocked or has failed to)."""
    wanted = set(salts)
    with _EARLY_LOCK:
        for inputs in [inputs for inputs in _EARLY if inputs[2] in wanted]:
            del _EARLY[inputs]


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
    context (a 4000-stripe merge of a 512-bit key hashes 8000 pieces;
    copying a context costs a third of creating one: ~60 ms -> ~15 ms)."""

    def __init__(self, hash_name: str, block_size: int) -> None:
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
    calibrate (never fewer than the LUKS minimum of 1000)."""
    iterations = 1000
    while True:
        started = time.perf_counter()
        pbkdf2(hash_name, b"calibration", bytes(32), iterations, key_size)
        elapsed = time.perf_counter() - started
        if elapsed >= 0.05 or iterations >= MAX_PBKDF2_ITERATIONS // 4:
            break
        iterations *= 4
    wanted = int(iterations * (milliseconds / 1000) / max(elapsed, 1e-6))
    return max(MIN_PBKDF2_ITERATIONS, min(wanted, MAX_PBKDF2_ITERATIONS))
