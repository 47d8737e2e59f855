"""Sector ciphers as dm-crypt and QEMU use them: ``aes-xts-plain64``,
``aes-cbc-essiv:sha256``, ``cast5-cbc-plain``, ``aes-ecb``, ``aes-ctr-plain64``.

This is the Python path: AES volumes are done by the compiled `_sectors`
module where it is built (spec.sector_cipher chooses), and unit tests hold
the two byte-identical; this one serves every other block cipher (from
`cryptography`, or Nettle for serpent and twofish: spec.BlockAlgorithm.ecb),
and AES where the extension is missing.

A cipher spec is the Linux crypto API triple ``CIPHER-MODE-IVGEN[:HASH]``
(LUKS1 keeps ``CIPHER`` and ``MODE-IVGEN`` in two header fields, LUKS2
writes the whole string in the JSON ``encryption`` field).  Every sector is
encrypted on its own, with an IV derived from its sector number.

Speed: building a `cryptography` cipher object per 512-byte sector costs
more than the AES itself (bench/README.md).  So a request of many sectors is done
in a few bulk calls: the IVs of all its sectors at once (one ECB call for
ESSIV), XTS tweaks multiplied by alpha for every block with numpy, one ECB
call over the whole request; CBC decryption is one ECB call plus an XOR
with the shifted ciphertext, CBC encryption one ECB call per block column
(all sectors at once), CTR one ECB call over the counter blocks.  XTS is
therefore composed from the block cipher in ECB mode (IEEE 1619 section
5.3), which also gives XTS for Camellia, SM4, Serpent and Twofish (whose
Nettle functions are ECB only);
unit tests pin it to `cryptography`'s own AES-XTS.
"""
from __future__ import annotations

import os
import threading

# numpy here does element-wise uint64 arithmetic only, never linear algebra:
# without this, loading it starts an OpenBLAS thread per CPU, CPU that every
# open with this path would pay (bench/README.md)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from .kdf import digest
from .spec import (  # noqa: F401  (re-exported: the names crypto always had)
    ALGORITHMS,
    IVGENS,
    KNOWN_UNSUPPORTED,
    MODES,
    BlockAlgorithm,
    CipherSpec,
    EcbContext,
    parse_cipher,
    parse_encryption,
)

#: requests are transformed in pieces of this size (see SectorCipher._crypt)
CHUNK = 128 * 1024


# -- IVs and tweaks (pure, whole requests at once) ------------------------------------


def sector_numbers(first: int, count: int, iv_size: int, ivgen: str) -> np.ndarray:
    """plain/plain64 IVs: the sector number little-endian, zero padded
    (plain truncates it to 32 bits), as a (count, iv_size // 8) uint64 array."""
    words = np.zeros((count, iv_size // 8), dtype="<u8")
    numbers = np.arange(first, first + count, dtype=np.uint64)
    if ivgen == "plain":
        numbers &= np.uint64(0xFFFFFFFF)
    words[:, 0] = numbers
    return words


def _times_alpha_power(lo: np.ndarray, hi: np.ndarray,
                       power: np.ndarray | np.uint64) -> tuple[np.ndarray, np.ndarray]:
    """Multiply 128-bit XTS tweaks (lo, hi: little-endian halves) by alpha**power
    in GF(2^128) mod x^128 + x^7 + x^2 + x + 1 (IEEE 1619 section 5.2).

    1 <= power <= 56, so that the bits shifted out of the top, reduced by
    x^7 + x^2 + x + 1, still fit the low word.  `power` may be an array
    (broadcast: one tweak times many powers in one call)."""
    overflow = hi >> (np.uint64(64) - power)
    hi = (hi << power) | (lo >> (np.uint64(64) - power))
    lo = (lo << power) ^ overflow ^ (overflow << np.uint64(1)) \
        ^ (overflow << np.uint64(2)) ^ (overflow << np.uint64(7))
    return lo, hi


#: tweak columns computed per broadcast call (the power stays <= 56)
_TWEAK_RUN = 32


def xts_tweaks(first_tweaks: bytes, blocks_per_sector: int) -> np.ndarray:
    """Every block's tweak, T_j = T_0 * alpha**j, for each sector's T_0, as a
    (sectors, blocks_per_sector, 2) uint64 array: a few numpy calls per run
    of 32 blocks, whatever the number of sectors."""
    start = np.frombuffer(first_tweaks, dtype="<u8").reshape(-1, 2)
    tweaks = np.empty((start.shape[0], blocks_per_sector, 2), dtype="<u8")
    lo, hi = start[:, 0:1], start[:, 1:2]
    for base in range(0, blocks_per_sector, _TWEAK_RUN):
        if base:
            lo, hi = _times_alpha_power(lo, hi, np.uint64(_TWEAK_RUN))
        width = min(_TWEAK_RUN, blocks_per_sector - base)
        tweaks[:, base, 0], tweaks[:, base, 1] = lo[:, 0], hi[:, 0]
        powers = np.arange(1, width, dtype=np.uint64)[None, :]
        run_lo, run_hi = _times_alpha_power(lo, hi, powers)
        tweaks[:, base + 1:base + width, 0] = run_lo
        tweaks[:, base + 1:base + width, 1] = run_hi
    return tweaks


# -- the sector cipher ------------------------------------------------------------


class SectorCipher:
    """Encrypts and decrypts whole sectors of one volume.

    `iv_offset` is added to every sector number (LUKS key material areas
    count from 0, payloads may be tweaked).  Stateless between calls, so
    requests may run concurrently in threads."""

    __slots__ = ("spec", "sector_size", "_keys", "_local")

    def __init__(self, spec: CipherSpec, key: bytes, sector_size: int = 512) -> None:
        spec.check_volume(len(key), sector_size)
        self.spec = spec
        self.sector_size = sector_size
        self._keys: tuple[bytes, ...]
        if spec.mode == "xts":
            half = len(key) // 2
            self._keys = (key[:half], key[half:])
        else:
            self._keys = (key, b"")
        if spec.ivgen == "essiv":
            self._keys += (digest(spec.ivgen_hash, key),)
        self._local = threading.local()

    def _context(self, key_index: int, encrypt: bool) -> EcbContext:
        """A long-lived ECB context for one of the keys (0: data, 1: XTS
        tweak, 2: ESSIV), one per thread: creating one per request cost
        a large part of a 4 KiB request.  ECB keeps no state between
        whole blocks, so a context serves any number of requests."""
        contexts: dict[tuple[int, bool], EcbContext] | None = getattr(self._local, "contexts",
                                                                      None)
        if contexts is None:
            contexts = self._local.contexts = {}
        context = contexts.get((key_index, encrypt))
        if context is None:
            context = self.spec.algorithm.ecb(self._keys[key_index], encrypt)
            contexts[(key_index, encrypt)] = context
        return context

    def _ivs(self, first: int, count: int) -> np.ndarray:
        """Each sector's IV, as (count, block_size // 8) uint64 words."""
        block = self.spec.algorithm.block_size
        ivgen = self.spec.ivgen
        if ivgen == "null":
            return np.zeros((count, block // 8), dtype="<u8")
        words = sector_numbers(first, count, block, "plain" if ivgen == "plain" else "plain64")
        if ivgen == "essiv":
            encrypted = self._context(2, True).update(words.tobytes())
            words = np.frombuffer(encrypted, dtype="<u8").reshape(count, -1)
        return words

    def _columns(self, data: bytes | bytearray | memoryview) -> np.ndarray:
        block = self.spec.algorithm.block_size
        if len(data) % self.sector_size:
            raise ValueError("request is not a whole number of sectors")
        return np.frombuffer(data, dtype="<u8").reshape(
            len(data) // self.sector_size, self.sector_size // block, block // 8)

    def decrypt(self, sector: int, data: bytes | bytearray | memoryview) -> bytes:
        return self._crypt(sector, data, encrypt=False)

    def encrypt(self, sector: int, data: bytes | bytearray | memoryview) -> bytes:
        return self._crypt(sector, data, encrypt=True)

    def _crypt(self, sector: int, data: bytes | bytearray | memoryview, *, encrypt: bool) -> bytes:
        if len(data) % self.sector_size:
            raise ValueError("request is not a whole number of sectors")
        if len(data) <= CHUNK:
            return self._crypt_chunk(sector, data, encrypt)
        # Temporaries of a bounded size stay in malloc's arena; fresh
        # multi-MiB buffers cost a page fault per page (bench/README.md).
        view = memoryview(data)
        out = bytearray(len(data))
        for start in range(0, len(data), CHUNK):
            out[start:start + CHUNK] = self._crypt_chunk(
                sector + start // self.sector_size, view[start:start + CHUNK], encrypt)
        return bytes(out)

    def _crypt_chunk(self, sector: int, data: bytes | bytearray | memoryview,
                     encrypt: bool) -> bytes:
        mode = self.spec.mode
        if mode == "ecb":
            return self._context(0, encrypt).update(bytes(data))
        blocks = self._columns(data)
        if mode == "xts":
            return self._xts(sector, blocks, encrypt)
        if mode == "ctr":
            return self._ctr(sector, blocks)
        if encrypt:
            return self._cbc_encrypt(sector, blocks)
        return self._cbc_decrypt(sector, blocks)

    def _xts(self, sector: int, blocks: np.ndarray, encrypt: bool) -> bytes:
        # The IV encrypted with the second key is each sector's T_0.
        first = self._context(1, True).update(self._ivs(sector, blocks.shape[0]).tobytes())
        tweaks = xts_tweaks(first, blocks.shape[1])
        whitened = blocks ^ tweaks
        # update_into a spare block of room, as cryptography requires.
        result = np.empty(whitened.size + 2, dtype="<u8")
        self._context(0, encrypt).update_into(whitened.data.cast("B"), result.data.cast("B"))
        result = result[:whitened.size].reshape(tweaks.shape)
        np.bitwise_xor(result, tweaks, out=result)
        return result.tobytes()

    def _cbc_decrypt(self, sector: int, blocks: np.ndarray) -> bytes:
        # P_j = D(C_j) ^ C_(j-1), with C_(-1) the sector's IV: one bulk call.
        plain = self._context(0, False).update(blocks.tobytes())
        previous = np.empty_like(blocks)
        previous[:, 0] = self._ivs(sector, blocks.shape[0])
        previous[:, 1:] = blocks[:, :-1]
        return (np.frombuffer(plain, dtype="<u8").reshape(blocks.shape) ^ previous).tobytes()

    def _cbc_encrypt(self, sector: int, blocks: np.ndarray) -> bytes:
        # Chained within a sector, independent across sectors: one call per
        # block position, each over that block of every sector.
        out = np.empty_like(blocks)
        previous = self._ivs(sector, blocks.shape[0])
        cipher = self._context(0, True)
        for column in range(blocks.shape[1]):
            mixed = np.ascontiguousarray(blocks[:, column] ^ previous)
            previous = np.frombuffer(cipher.update(mixed.tobytes()),
                                     dtype="<u8").reshape(previous.shape)
            out[:, column] = previous
        return out.tobytes()

    def _ctr(self, sector: int, blocks: np.ndarray) -> bytes:
        # Each sector's IV is its initial counter block, incremented as one
        # big-endian number per block, as Linux's ctr() and OpenSSL do.
        counters = ctr_blocks(self._ivs(sector, blocks.shape[0]), blocks.shape[1])
        stream = self._context(0, True).update(counters.tobytes())
        return (np.frombuffer(stream, dtype="<u8").reshape(blocks.shape) ^ blocks).tobytes()


def ctr_blocks(ivs: np.ndarray, blocks_per_sector: int) -> np.ndarray:
    """Counter blocks IV + j (big-endian, wrapping) for j < blocks_per_sector."""
    big = ivs.byteswap()                 # little-endian words of big-endian bytes
    steps = np.arange(blocks_per_sector, dtype=np.uint64)
    if big.shape[1] == 1:
        counters = (big[:, :1] + steps[None, :])[..., None]
        return counters.byteswap()
    low = big[:, 1:2] + steps[None, :]
    carry = (low < big[:, 1:2]).astype(np.uint64)
    high = big[:, 0:1] + carry
    return np.stack([high, low], axis=-1).byteswap()
