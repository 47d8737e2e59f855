"""Cipher specs as dm-crypt, cryptsetup and QEMU name them:
``aes-xts-plain64``, ``aes-cbc-essiv:sha256``, ``cast5-cbc-plain``.

A spec is the Linux crypto API triple ``CIPHER-MODE-IVGEN[:HASH]`` (LUKS1
keeps ``CIPHER`` and ``MODE-IVGEN`` in two header fields, LUKS2 writes the
whole string in the JSON ``encryption`` field).  Parsing and checking a
spec needs no numpy: headers are validated (and the PBKDF started) before
any sector cipher has been imported.

`sector_cipher` gives a volume's sector cipher: AES (what cryptsetup and
QEMU write by default) in the compiled `_sectors` module where it is built,
everything else (and AES without it) with `crypto`, the Python path.
"""
from __future__ import annotations

import importlib
import re
import sys
import threading
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from imgfs.errors import InvalidImage, Unsupported

from .kdf import digest

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers import BlockCipherAlgorithm

try:
    from ._sectors import AesSectors
except ImportError:              # installed without a compiler: the Python path
    AesSectors = None  # type: ignore[assignment,misc]


class EcbContext(Protocol):
    """A keyed block cipher in one direction, run over whole blocks (ECB):
    what `crypto` composes the sector modes from."""

    def update(self, data: bytes, /) -> bytes: ...
    def update_into(self, data: bytes | memoryview, buffer: memoryview, /) -> int: ...


@dataclass(frozen=True)
class BlockAlgorithm:
    """A block cipher by its Linux crypto API name, from `cryptography`
    (AES, CAST5, 3DES, ...), or from Nettle (`nettle`: serpent, twofish),
    which `cryptography` lacks.  Either is imported at its first use (see
    `kdf`)."""

    name: str
    block_size: int
    key_sizes: tuple[int, ...]
    #: its class in cryptography's ciphers.algorithms (or decrepit's); "" for Nettle's
    class_name: str = ""
    decrepit: bool = False

    def factory(self, key: bytes) -> BlockCipherAlgorithm:
        """`cryptography`'s algorithm object for this key."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")        # (decrepit's, for what it holds)
            from cryptography.hazmat.decrepit.ciphers import algorithms as decrepit
            from cryptography.hazmat.primitives.ciphers import algorithms
        algorithm: BlockCipherAlgorithm = getattr(decrepit if self.decrepit else algorithms,
                                                  self.class_name)(key)
        return algorithm

    def ecb(self, key: bytes, encrypt: bool) -> EcbContext:
        """The cipher keyed with `key`, one direction, over whole blocks."""
        if not self.class_name:
            from .nettle import NettleEcb
            try:
                return NettleEcb(self.name, key, encrypt)
            except ImportError as error:
                raise Unsupported(f"cipher {self.name} needs {error}") from None
        from cryptography.hazmat.primitives.ciphers import Cipher, modes
        cipher = Cipher(self.factory(key), modes.ECB())
        context: EcbContext = cipher.encryptor() if encrypt else cipher.decryptor()
        return context


ALGORITHMS = {algo.name: algo for algo in (
    BlockAlgorithm("aes", 16, (16, 24, 32), "AES"),
    BlockAlgorithm("camellia", 16, (16, 24, 32), "Camellia", decrepit=True),
    BlockAlgorithm("sm4", 16, (16,), "SM4"),
    BlockAlgorithm("cast5", 8, (16,), "CAST5", decrepit=True),
    BlockAlgorithm("blowfish", 8, tuple(range(4, 57)), "Blowfish", decrepit=True),
    BlockAlgorithm("des3_ede", 8, (24,), "TripleDES", decrepit=True),
    BlockAlgorithm("serpent", 16, (16, 24, 32)),
    BlockAlgorithm("twofish", 16, (16, 24, 32)),
)}
#: ciphers cryptsetup knows that neither `cryptography` nor Nettle provide
KNOWN_UNSUPPORTED = ("cast6", "anubis", "khazad", "tnepres")
MODES = ("xts", "cbc", "ecb", "ctr")
IVGENS = ("plain", "plain64", "essiv", "null")
_SPEC_RE = re.compile(r"^([a-z0-9_]+)(?:-([a-z0-9]+))?(?:-([a-z0-9]+)(?::([a-z0-9-]+))?)?$")


@dataclass(frozen=True)
class CipherSpec:
    """A parsed ``aes-xts-plain64`` / ``aes-cbc-essiv:sha256``."""

    algorithm: BlockAlgorithm
    mode: str
    ivgen: str | None
    ivgen_hash: str | None = None

    @property
    def mode_string(self) -> str:
        """LUKS1's cipher-mode field: ``xts-plain64``, ``cbc-essiv:sha256``."""
        if self.ivgen is None:
            return self.mode
        return f"{self.mode}-{self.ivgen}" + (f":{self.ivgen_hash}" if self.ivgen_hash else "")

    def __str__(self) -> str:
        return f"{self.algorithm.name}-{self.mode_string}"

    def check_key_size(self, key_bytes: int) -> None:
        """The volume key size must suit the cipher (doubled for XTS)."""
        per_cipher = key_bytes // 2 if self.mode == "xts" else key_bytes
        if (self.mode == "xts" and key_bytes % 2) or \
                per_cipher not in self.algorithm.key_sizes:
            raise InvalidImage(f"key size {key_bytes * 8} bits does not suit cipher {self}")

    def check_volume(self, key_bytes: int, sector_size: int) -> None:
        """A key of `key_bytes` and sectors of `sector_size` suit the cipher."""
        self.check_key_size(key_bytes)
        if sector_size % self.algorithm.block_size:
            raise InvalidImage(f"sector size {sector_size} is not a multiple of the "
                               f"{self.algorithm.name} block size")


def parse_cipher(name: str, mode_string: str) -> CipherSpec:
    """The two LUKS1 fields (``aes``, ``xts-plain64``) as a checked spec."""
    name, mode_string = name.strip().lower(), mode_string.strip().lower()
    algorithm = ALGORITHMS.get(name)
    if algorithm is None:
        if name in KNOWN_UNSUPPORTED or re.fullmatch(r"[a-z0-9_]{1,31}", name):
            raise Unsupported(f"cipher not supported: {name}")
        raise InvalidImage(f"invalid cipher name {name!r}")
    mode, _, ivgen_text = mode_string.partition("-")
    if mode not in MODES:
        raise Unsupported(f"cipher mode not supported: {mode_string}")
    ivgen, _, ivgen_hash = ivgen_text.partition(":")
    return _checked_spec(algorithm, mode, ivgen or None, ivgen_hash or None, mode_string)


def _checked_spec(algorithm: BlockAlgorithm, mode: str, ivgen: str | None,
                  ivgen_hash: str | None, mode_string: str) -> CipherSpec:
    if mode == "ecb":
        # ECB uses no IV; QEMU still writes (and requires) one, "ecb-plain64"
        # or "ecb-essiv:sha256", and shows it in qemu-img info: kept, unused.
        if ivgen not in IVGENS:
            ivgen = ivgen_hash = None
    elif ivgen is None:
        raise Unsupported(f"cipher mode {mode_string} names no IV generator")
    elif ivgen not in IVGENS:
        raise Unsupported(f"IV generator not supported: {ivgen}")
    if mode == "xts" and algorithm.block_size != 16:
        raise Unsupported(f"xts needs a 128-bit block cipher, not {algorithm.name}")
    if ivgen == "essiv":
        if not ivgen_hash:
            raise InvalidImage("essiv names no hash (expected essiv:sha256)")
        essiv_key = len(digest(ivgen_hash, b""))
        if essiv_key not in algorithm.key_sizes:
            raise Unsupported(f"essiv:{ivgen_hash} gives a {essiv_key * 8}-bit key, "
                              f"which {algorithm.name} cannot use")
    elif ivgen_hash:
        # QEMU writes "xts-plain64:sha256" when asked for ivgen-hash-alg with
        # plain64, and reads it as plain64: the hash must exist, and is unused.
        digest(ivgen_hash, b"")
        ivgen_hash = None
    return CipherSpec(algorithm, mode, ivgen, ivgen_hash)


def parse_encryption(text: str) -> CipherSpec:
    """LUKS2's one-string form: ``aes-xts-plain64``."""
    match = _SPEC_RE.match(text.strip().lower())
    if not match or match.group(2) is None:
        raise InvalidImage(f"invalid encryption {text!r} (expected e.g. aes-xts-plain64)")
    name, mode, ivgen, ivgen_hash = match.groups()
    mode_string = mode + (f"-{ivgen}" if ivgen else "") + (f":{ivgen_hash}" if ivgen_hash else "")
    return parse_cipher(name, mode_string)


# -- the sector cipher ------------------------------------------------------------------


class SectorTransform(Protocol):
    """A volume's sector cipher: whole sectors, the first numbered `sector`
    (crypto.SectorCipher, or the compiled _sectors.AesSectors).  Either may
    be used by several threads at once."""

    def decrypt(self, sector: int, data: bytes | bytearray | memoryview) -> bytes: ...
    def encrypt(self, sector: int, data: bytes | bytearray | memoryview) -> bytes: ...


def sector_cipher(spec: CipherSpec, key: bytes, sector_size: int = 512) -> SectorTransform:
    """The sector cipher of a volume: compiled for AES, else `crypto`'s
    (imported only now: it needs numpy, slow to import, which
    `prefetch_sector_cipher` loads while the PBKDF runs)."""
    spec.check_volume(len(key), sector_size)
    native = _native_cipher(spec, key, sector_size)
    if native is not None:
        return native
    from .crypto import SectorCipher
    return SectorCipher(spec, key, sector_size)


def has_native_cipher(spec: CipherSpec) -> bool:
    """Whether volumes of this spec are (most likely) done by `_sectors`."""
    return AesSectors is not None and spec.algorithm.name == "aes"


def _native_cipher(spec: CipherSpec, key: bytes, sector_size: int) -> SectorTransform | None:
    if not has_native_cipher(spec):
        return None
    essiv_key = digest(spec.ivgen_hash, key) \
        if spec.ivgen == "essiv" and spec.mode != "ecb" else None
    try:
        return AesSectors(spec.mode, "" if spec.mode == "ecb" else spec.ivgen or "", key,
                          sector_size, essiv_key)
    except ValueError:          # (nothing spec allows; but never a failed open for it)
        return None


def prefetch_sector_cipher(spec: CipherSpec) -> None:
    """Start importing `crypto` (numpy) in a background thread, unless the
    volume's cipher is compiled.

    Unlocking spends its time in the PBKDF, which releases the GIL; the
    import then costs nothing.  A thread that needs `crypto` before the
    import has finished simply waits for it (Python's per-module import
    lock), so this is only ever a head start."""
    if has_native_cipher(spec) or f"{__package__}.crypto" in sys.modules:
        return
    threading.Thread(target=importlib.import_module, args=(f"{__package__}.crypto",),
                     name="imgfs-prefetch-crypto", daemon=True).start()
