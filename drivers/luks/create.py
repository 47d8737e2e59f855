"""Creating LUKS images: qemu-img's option names, and a LUKS2 layout as
`cryptsetup luksFormat --type luks2` lays it out.

Options are those of QEMU's luks driver (qemu-block-drivers manual:
key-secret, cipher-alg, cipher-mode, ivgen-alg, ivgen-hash-alg, hash-alg,
iter-time) plus preallocation, and imgfs's own ``format=luks2`` with
cryptsetup's knobs for it (sector-size, pbkdf, pbkdf-memory,
pbkdf-parallel).  LUKS2 layout (cryptsetup defaults): two 16 KiB header
copies (4 KiB binary header + 12 KiB JSON), the keyslots area up to 16 MiB,
keyslot 0 at 32 KiB, the data segment at 16 MiB.  Everything random comes
from os.urandom.
"""
from __future__ import annotations

import base64
import hashlib
import os
import time
from typing import TYPE_CHECKING, Any

from imgfs.errors import ImgfsError, Unsupported, UsageError
from imgfs.options import Int, Opt, Schema, Str, choice, in_range

from . import kdf, luks1
from .spec import ALGORITHMS, KNOWN_UNSUPPORTED, CipherSpec, parse_cipher, sector_cipher

if TYPE_CHECKING:
    from . import luks2

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
    Opt("format", choice("luks1", "luks2"), default="luks1",
        help="on-disk version (luks2 cannot be opened by QEMU)"),
    Opt("sector-size", Int, default=512, check=lambda size: _check_sector(size),
        help="luks2: encryption sector size, 512 to 4096"),
    Opt("pbkdf", choice("argon2id", "argon2i", "pbkdf2"),
        help="luks2: key slot KDF (default argon2id; luks1 always uses pbkdf2)"),
    Opt("pbkdf-memory", Int, default=1024 * 1024, check=in_range(32, kdf.MAX_ARGON2_MEMORY_KIB),
        help="luks2: Argon2 memory cost in KiB"),
    Opt("pbkdf-parallel", Int, default=4, check=in_range(1, kdf.MAX_ARGON2_LANES),
        help="luks2: Argon2 threads"),
)


def _check_sector(size: int) -> None:
    from . import luks2
    if size not in luks2.SECTOR_SIZES:
        raise UsageError("must be 512, 1024, 2048 or 4096")


def create_spec(options: dict[str, Any]) -> tuple[CipherSpec, int]:
    """The cipher spec and volume key size that create options ask for."""
    name, per_cipher = CIPHER_ALGS[options["cipher-alg"]]
    if name in KNOWN_UNSUPPORTED or name not in ALGORITHMS:
        raise Unsupported(f"cipher not supported: {name}")
    mode = options["cipher-mode"]
    # (ECB takes no IV; QEMU still names one, as here)
    if options["ivgen-alg"] == "essiv":
        mode_string = f"{mode}-essiv:{options['ivgen-hash-alg']}"
    else:
        mode_string = f"{mode}-{options['ivgen-alg']}"
    spec = parse_cipher(name, mode_string)
    return spec, per_cipher * 2 if mode == "xts" else per_cipher


def payload_bytes(options: dict[str, Any]) -> int:
    """Bytes before the payload of a new image: header and key material
    (LUKS1: 8 slots after the 4 KiB aligned header; LUKS2: the 16 MiB area)."""
    if not options.get("key-secret"):
        raise ImgfsError("Parameter 'key-secret' is required for cipher")
    _spec, key_bytes = create_spec(options)
    if options["format"] == "luks2":
        return LUKS2_KEYSLOTS_END
    offsets = luks1.slot_layout(key_bytes)
    return (offsets[-1] + offsets[1] - offsets[0]) * luks1.LUKS_SECTOR_SIZE


def check_options(options: dict[str, Any], size: int) -> None:
    """Refuse combinations before any key material is made."""
    if options["format"] == "luks1":
        if options["pbkdf"] not in (None, "pbkdf2") or options["sector-size"] != 512:
            raise UsageError("luks1 images use pbkdf2 and 512-byte sectors "
                             "(use format=luks2 for pbkdf or sector-size)")
    sector_size = options["sector-size"]
    if size % sector_size:
        raise UsageError(f"size {size} is not a multiple of the {sector_size}-byte sector")


def format_header(options: dict[str, Any], passphrase: bytes) -> luks1.NewHeader:
    """The header for these options (CPU-bound: calibrates and runs KDFs)."""
    spec, key_bytes = create_spec(options)
    if options["format"] == "luks1":
        return luks1.format_header(spec, key_bytes, options["hash-alg"], passphrase,
                                   options["iter-time"])
    return format_luks2(spec, key_bytes, options, passphrase)


# -- LUKS2 ----------------------------------------------------------------------------

LUKS2_HDR_SIZE = 16384
LUKS2_KEYSLOTS_END = 16 * 1024 * 1024
LUKS2_KEYSLOT_OFFSET = 2 * LUKS2_HDR_SIZE
LUKS2_ALIGN = 4096
#: cryptsetup's minimum Argon2 time cost
ARGON2_MIN_TIME = 4


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def keyslot_kdf(options: dict[str, Any], key_bytes: int) -> luks2.Kdf:
    """Calibrated KDF parameters for keyslot 0 (as cryptsetup benchmarks)."""
    from . import luks2
    kind = options["pbkdf"] or "argon2id"
    salt = os.urandom(32)
    milliseconds = options["iter-time"]
    if kind == "pbkdf2":
        iterations = kdf.calibrate_pbkdf2(options["hash-alg"], key_bytes, milliseconds)
        return luks2.Kdf("pbkdf2", salt, hash_name=options["hash-alg"], iterations=iterations)
    memory, lanes = options["pbkdf-memory"], options["pbkdf-parallel"]
    memory = max(memory, 8 * lanes)
    probe = luks2.Kdf(kind, salt, time_cost=ARGON2_MIN_TIME, memory_kib=memory, lanes=lanes)
    started = time.perf_counter()
    probe.derive(b"calibration", key_bytes)
    elapsed = max(time.perf_counter() - started, 1e-6)
    time_cost = int(ARGON2_MIN_TIME * milliseconds / 1000 / elapsed)
    time_cost = max(ARGON2_MIN_TIME, min(time_cost, kdf.MAX_ARGON2_TIME))
    return luks2.Kdf(kind, salt, time_cost=time_cost, memory_kib=memory, lanes=lanes)


def _kdf_json(params: luks2.Kdf) -> dict[str, Any]:
    if params.kind == "pbkdf2":
        return {"type": "pbkdf2", "hash": params.hash_name, "iterations": params.iterations,
                "salt": _b64(params.salt)}
    return {"type": params.kind, "time": params.time_cost, "memory": params.memory_kib,
            "cpus": params.lanes, "salt": _b64(params.salt)}


def luks2_metadata(spec: CipherSpec, key_bytes: int, params: luks2.Kdf, af_hash: str,
                   digest: luks2.Digest, sector_size: int) -> dict[str, Any]:
    """The JSON metadata of a one-keyslot, one-segment LUKS2 volume."""
    from . import luks2
    area_size = -(-key_bytes * luks1.LUKS_STRIPES // LUKS2_ALIGN) * LUKS2_ALIGN
    return {
        "keyslots": {"0": {
            "type": "luks2", "key_size": key_bytes,
            "af": {"type": "luks1", "stripes": luks1.LUKS_STRIPES, "hash": af_hash},
            "area": {"type": "raw", "offset": str(LUKS2_KEYSLOT_OFFSET),
                     "size": str(area_size), "encryption": str(spec), "key_size": key_bytes},
            "kdf": _kdf_json(params)}},
        "tokens": {},
        "segments": {"0": {"type": "crypt", "offset": str(LUKS2_KEYSLOTS_END),
                           "size": "dynamic", "iv_tweak": "0", "encryption": str(spec),
                           "sector_size": sector_size}},
        "digests": {"0": {"type": "pbkdf2", "keyslots": ["0"], "segments": ["0"],
                          "hash": digest.hash_name, "iterations": digest.iterations,
                          "salt": _b64(digest.salt), "digest": _b64(digest.value)}},
        "config": {"json_size": str(LUKS2_HDR_SIZE - luks2.LUKS2_HDR_BIN_LEN),
                   "keyslots_size": str(LUKS2_KEYSLOTS_END - LUKS2_KEYSLOT_OFFSET)},
    }


def luks2_header_copies(metadata: dict[str, Any]) -> bytes:
    """Primary and secondary header areas, each checksummed (sha256)."""
    import json
    import uuid

    from . import luks2
    text = json.dumps(metadata, separators=(",", ":")).encode()
    json_size = LUKS2_HDR_SIZE - luks2.LUKS2_HDR_BIN_LEN
    if len(text) >= json_size:
        raise Unsupported("LUKS2 metadata does not fit the 12 KiB JSON area")
    volume_uuid = str(uuid.UUID(bytes=os.urandom(16), version=4)).encode()
    copies = []
    for offset, magic in ((0, luks2.LUKS2_MAGIC_1ST), (LUKS2_HDR_SIZE, luks2.LUKS2_MAGIC_2ND)):
        hdr = luks2.HdrDisk(magic, luks2.LUKS2_VERSION, LUKS2_HDR_SIZE, 1, bytes(48),
                            b"sha256", os.urandom(64), volume_uuid, bytes(48), offset,
                            bytes(184), bytes(64))
        area = bytearray(luks2.HDR_DISK.pack(*hdr).ljust(luks2.LUKS2_HDR_BIN_LEN, b"\0"))
        area += text.ljust(json_size, b"\0")
        checksum = hashlib.sha256(bytes(area)).digest()
        area[luks2.LUKS2_CHECKSUM_OFFSET:luks2.LUKS2_CHECKSUM_OFFSET + len(checksum)] = checksum
        copies.append(bytes(area))
    return b"".join(copies)


def format_luks2(spec: CipherSpec, key_bytes: int, options: dict[str, Any],
                 passphrase: bytes) -> luks1.NewHeader:
    from . import luks2
    hash_name = options["hash-alg"]
    volume_key = os.urandom(key_bytes)
    digest_salt = os.urandom(32)
    digest_iters = max(kdf.MIN_PBKDF2_ITERATIONS,
                       kdf.calibrate_pbkdf2(hash_name, key_bytes, options["iter-time"]) // 8)
    digest_len = len(kdf.digest(hash_name, b""))
    digest = luks2.Digest(hash_name, digest_iters, digest_salt,
                          kdf.pbkdf2(hash_name, volume_key, digest_salt, digest_iters, digest_len),
                          ("0",))
    params = keyslot_kdf(options, key_bytes)
    area_key = params.derive(passphrase, key_bytes)
    split = kdf.af_split(volume_key, luks1.LUKS_STRIPES, hash_name)
    split += bytes(-len(split) % luks1.LUKS_SECTOR_SIZE)
    material = sector_cipher(spec, area_key).encrypt(0, split)
    del area_key, split
    metadata = luks2_metadata(spec, key_bytes, params, hash_name, digest,
                              options["sector-size"])
    return luks1.NewHeader(((0, luks2_header_copies(metadata)),
                            (LUKS2_KEYSLOT_OFFSET, material)),
                           LUKS2_KEYSLOTS_END, volume_key)
