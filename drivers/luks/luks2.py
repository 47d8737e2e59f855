"""LUKS2 on-disk header: two checksummed copies of a binary header plus JSON
metadata, keyslots with PBKDF2 or Argon2, one crypt segment.

Layout (cryptsetup docs/on-disk-format-luks2.pdf, section 2; the JSON is what
`cryptsetup luksDump --dump-json-metadata` prints): the primary header at 0
and the secondary at `hdr_size`, each a 4096-byte binary header (big-endian)

    0   magic "LUKS\\xba\\xbe" (secondary "SKUL\\xba\\xbe")   6 version (2)
    8   hdr_size   16 seqid   24 label[48]   72 checksum_alg[32]   104 salt[64]
    168 uuid[40]   208 subsystem[48]   256 hdr_offset   264 padding[184]
    448 csum[64]   512 padding to 4096

followed by NUL-terminated JSON up to `hdr_size`.  The checksum is
checksum_alg over all `hdr_size` bytes with the csum field zeroed.  The copy
with the higher seqid wins when both are valid; one damaged copy is
tolerated (as cryptsetup does, which then repairs it; imgfs does not write
metadata, so it only warns).

Supported: keyslots of type luks2 (af luks1, area raw, kdf pbkdf2, argon2i,
argon2id), digests of type pbkdf2, one segment of type crypt with sector
size 512..4096 and iv_tweak 0.  Refused with a message: integrity
protection, reencryption (a "requirements" entry or a reencrypt keyslot),
several segments, unknown types.
"""
from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import struct
from dataclasses import dataclass
from typing import Any, NamedTuple

from imgfs.errors import CorruptImage, InvalidImage, Unsupported

from . import kdf
from .early import SlotToTry, try_slots
from .luks1 import LUKS_MAGIC, LUKS_SECTOR_SIZE, LUKS_STRIPES, ReadFn, cipher_alg_name
from .spec import CipherSpec, parse_encryption, sector_cipher

log = logging.getLogger("imgfs")

LUKS2_MAGIC_1ST = LUKS_MAGIC
LUKS2_MAGIC_2ND = b"SKUL\xba\xbe"
LUKS2_VERSION = 2
LUKS2_HDR_BIN_LEN = 4096
LUKS2_CHECKSUM_OFFSET = 448
LUKS2_CHECKSUM_L = 64
#: the header sizes cryptsetup allows (binary header + JSON area)
LUKS2_HDR_SIZES = tuple(16384 << shift for shift in range(9))       # 16 KiB .. 4 MiB
SECTOR_SIZES = (512, 1024, 2048, 4096)

HDR_DISK = struct.Struct(">6sHQQ48s32s64s40s48sQ184s64s")


class HdrDisk(NamedTuple):
    magic: bytes
    version: int
    hdr_size: int
    seqid: int
    label: bytes
    checksum_alg: bytes
    salt: bytes
    uuid: bytes
    subsystem: bytes
    hdr_offset: int
    padding: bytes
    csum: bytes


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("ascii", "replace")


# -- binary headers ---------------------------------------------------------------------


def check_copy(area: bytes, magic: bytes) -> tuple[HdrDisk, dict[str, Any]]:
    """Validate one header copy (binary header + JSON area); raise on damage."""
    if len(area) < LUKS2_HDR_BIN_LEN:
        raise CorruptImage("LUKS2 header truncated")
    hdr = HdrDisk._make(HDR_DISK.unpack_from(area, 0))
    if hdr.magic != magic or hdr.version != LUKS2_VERSION:
        raise CorruptImage("bad LUKS2 header magic or version")
    if hdr.hdr_size not in LUKS2_HDR_SIZES or len(area) != hdr.hdr_size:
        raise CorruptImage(f"LUKS2 header size {hdr.hdr_size} is invalid")
    zeroed = area[:LUKS2_CHECKSUM_OFFSET] + bytes(LUKS2_CHECKSUM_L) + \
        area[LUKS2_CHECKSUM_OFFSET + LUKS2_CHECKSUM_L:]
    expected = kdf.digest(_text(hdr.checksum_alg), zeroed)
    if not hmac.compare_digest(expected, hdr.csum[:len(expected)]):
        raise CorruptImage("LUKS2 header checksum mismatch")
    text = area[LUKS2_HDR_BIN_LEN:].split(b"\0", 1)[0]
    try:
        metadata = json.loads(text)
    except (UnicodeDecodeError, ValueError):
        raise CorruptImage("LUKS2 JSON metadata is not valid JSON") from None
    if not isinstance(metadata, dict):
        raise CorruptImage("LUKS2 JSON metadata is not an object")
    return hdr, metadata


async def _read_copy(read: ReadFn, offset: int, magic: bytes,
                     area_size: int) -> tuple[HdrDisk, dict[str, Any]]:
    if offset + LUKS2_HDR_BIN_LEN > area_size:
        raise CorruptImage("LUKS2 header beyond the end of the image")
    head = await read(offset, LUKS2_HDR_BIN_LEN)
    hdr_size = struct.unpack_from(">Q", head, 8)[0]
    if hdr_size not in LUKS2_HDR_SIZES or offset + hdr_size > area_size:
        raise CorruptImage(f"LUKS2 header size {hdr_size} is invalid")
    area = head + await read(offset + LUKS2_HDR_BIN_LEN, hdr_size - LUKS2_HDR_BIN_LEN)
    return check_copy(area, magic)


async def read_metadata(read: ReadFn, area_size: int,
                        quiet: bool = False) -> tuple[HdrDisk, dict[str, Any]]:
    """The newest valid copy of the header: primary, else a secondary found
    at one of the offsets cryptsetup may put it (and a warning that one copy
    is damaged, unless `quiet`)."""
    copies: list[tuple[HdrDisk, dict[str, Any]]] = []
    damage: list[str] = []
    try:
        copies.append(await _read_copy(read, 0, LUKS2_MAGIC_1ST, area_size))
    except CorruptImage as exc:
        damage.append(f"primary: {exc}")
    offsets = [copies[0][0].hdr_size] if copies else list(LUKS2_HDR_SIZES)
    for offset in offsets:
        try:
            copies.append(await _read_copy(read, offset, LUKS2_MAGIC_2ND, area_size))
            break
        except CorruptImage as exc:
            if copies:
                damage.append(f"secondary: {exc}")
    if not copies:
        raise CorruptImage(f"both LUKS2 header copies are damaged ({damage[0]})")
    if damage and not quiet:
        log.warning("LUKS2 header copy damaged, using the other one (%s)", "; ".join(damage))
    return max(copies, key=lambda copy: copy[0].seqid)


# -- JSON metadata ---------------------------------------------------------------------


def _u64(value: Any, what: str) -> int:
    """LUKS2 writes 64-bit numbers as JSON strings, small ones as numbers."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise CorruptImage(f"LUKS2 {what} is not a number")
    try:
        number = int(value)
    except ValueError:
        raise CorruptImage(f"LUKS2 {what} {value!r} is not a number") from None
    if not 0 <= number < 1 << 64:
        raise CorruptImage(f"LUKS2 {what} {number} is out of range")
    return number


def _object(parent: dict[str, Any], key: str, what: str) -> dict[str, Any]:
    value = parent.get(key)
    if not isinstance(value, dict):
        raise CorruptImage(f"LUKS2 {what} has no '{key}' object")
    return value


def _b64(value: Any, what: str) -> bytes:
    try:
        return base64.b64decode(str(value), validate=True)
    except (binascii.Error, ValueError):
        raise CorruptImage(f"LUKS2 {what} is not valid base64") from None


@dataclass(frozen=True)
class Kdf:
    kind: str
    salt: bytes
    hash_name: str = ""
    iterations: int = 0
    time_cost: int = 0
    memory_kib: int = 0
    lanes: int = 0

    def derive(self, passphrase: bytes, length: int) -> bytes:
        if self.kind == "pbkdf2":
            return kdf.pbkdf2(self.hash_name, passphrase, self.salt, self.iterations, length)
        return kdf.argon2(self.kind, passphrase, self.salt, time_cost=self.time_cost,
                          memory_kib=self.memory_kib, lanes=self.lanes, length=length)


def parse_kdf(data: dict[str, Any], what: str) -> Kdf:
    kind = data.get("type")
    salt = _b64(data.get("salt"), f"{what} salt")
    if kind == "pbkdf2":
        iterations = _u64(data.get("iterations"), f"{what} iterations")
        if not 1 <= iterations <= kdf.MAX_PBKDF2_ITERATIONS:
            raise InvalidImage(f"{what}: {iterations} PBKDF2 iterations (imgfs accepts "
                               f"1 to {kdf.MAX_PBKDF2_ITERATIONS})")
        hash_name = str(data.get("hash"))
        kdf.hash_algorithm(hash_name)
        return Kdf("pbkdf2", salt, hash_name=hash_name, iterations=iterations)
    if kind in ("argon2i", "argon2id"):
        time_cost = _u64(data.get("time"), f"{what} time")
        memory = _u64(data.get("memory"), f"{what} memory")
        lanes = _u64(data.get("cpus"), f"{what} cpus")
        if not (1 <= time_cost <= kdf.MAX_ARGON2_TIME and 1 <= lanes <= kdf.MAX_ARGON2_LANES
                and 8 * lanes <= memory <= kdf.argon2_memory_limit_kib()):
            raise InvalidImage(f"{what}: {kind} time {time_cost}, memory {memory} KiB, "
                               f"{lanes} threads is beyond what imgfs accepts")
        return Kdf(kind, salt, time_cost=time_cost, memory_kib=memory, lanes=lanes)
    raise Unsupported(f"{what}: key derivation not supported: {kind}")


@dataclass(frozen=True)
class Keyslot:
    index: str
    key_size: int
    stripes: int
    af_hash: str
    area_offset: int
    area_size: int
    area_spec: CipherSpec
    area_key_size: int
    kdf: Kdf

    @property
    def material_size(self) -> int:
        return -(-self.key_size * self.stripes // LUKS_SECTOR_SIZE) * LUKS_SECTOR_SIZE


def parse_keyslot(index: str, data: dict[str, Any], area: tuple[int, int]) -> Keyslot:
    what = f"keyslot {index}"
    kind = data.get("type")
    if kind == "reencrypt":
        raise Unsupported("LUKS2 reencryption is in progress (finish it with cryptsetup)")
    if kind != "luks2":
        raise Unsupported(f"{what}: type {kind!r} is not supported")
    af, area_data = _object(data, "af", what), _object(data, "area", what)
    if af.get("type") != "luks1" or area_data.get("type") != "raw":
        raise Unsupported(f"{what}: af type {af.get('type')!r} / area type "
                          f"{area_data.get('type')!r} is not supported")
    key_size = _u64(data.get("key_size"), f"{what} key_size")
    stripes = _u64(af.get("stripes"), f"{what} stripes")
    if not 1 <= key_size <= 128 or not 1 <= stripes <= LUKS_STRIPES:
        raise InvalidImage(f"{what}: key size {key_size} / {stripes} stripes out of range")
    spec = parse_encryption(str(area_data.get("encryption")))
    area_key_size = _u64(area_data.get("key_size"), f"{what} area key_size")
    spec.check_key_size(area_key_size)
    slot = Keyslot(index, key_size, stripes, str(af.get("hash")),
                   _u64(area_data.get("offset"), f"{what} offset"),
                   _u64(area_data.get("size"), f"{what} size"),
                   spec, area_key_size, parse_kdf(_object(data, "kdf", what), what))
    kdf.hash_algorithm(slot.af_hash)
    end = slot.area_offset + slot.area_size
    if slot.area_offset < area[0] or end > area[1] or slot.material_size > slot.area_size:
        raise InvalidImage(f"{what}: area {slot.area_offset}+{slot.area_size} is outside the "
                           f"keyslots area {area[0]}..{area[1]} or too small")
    return slot


@dataclass(frozen=True)
class Segment:
    offset: int
    size: int | None              # None: "dynamic", to the end of the device
    sector_size: int
    spec: CipherSpec


def parse_segments(metadata: dict[str, Any]) -> Segment:
    segments = _object(metadata, "segments", "metadata")
    if len(segments) != 1 or "0" not in segments:
        raise Unsupported(f"{len(segments)} LUKS2 segments (imgfs supports one)")
    data = segments["0"]
    if not isinstance(data, dict):
        raise CorruptImage("LUKS2 segment 0 is not an object")
    if data.get("type") != "crypt":
        raise Unsupported(f"LUKS2 segment type {data.get('type')!r} is not supported")
    if "integrity" in data:
        raise Unsupported("LUKS2 integrity protection (dm-integrity) is not supported")
    sector_size = _u64(data.get("sector_size"), "segment sector_size")
    if sector_size not in SECTOR_SIZES:
        raise InvalidImage(f"LUKS2 segment sector size {sector_size} is invalid")
    if _u64(data.get("iv_tweak", "0"), "segment iv_tweak"):
        raise Unsupported("LUKS2 segment with a non-zero iv_tweak is not supported")
    size_text = data.get("size")
    size = None if size_text == "dynamic" else _u64(size_text, "segment size")
    offset = _u64(data.get("offset"), "segment offset")
    if offset % sector_size or (size is not None and size % sector_size):
        raise InvalidImage(f"LUKS2 segment {offset}+{size} is not sector aligned")
    return Segment(offset, size, sector_size, parse_encryption(str(data.get("encryption"))))


@dataclass(frozen=True)
class Digest:
    hash_name: str
    iterations: int
    salt: bytes
    value: bytes
    keyslots: tuple[str, ...]

    def matches(self, key: bytes) -> bool:
        computed = kdf.pbkdf2(self.hash_name, key, self.salt, self.iterations, len(self.value))
        return hmac.compare_digest(computed, self.value)


def parse_digest(metadata: dict[str, Any]) -> Digest:
    for index, data in _object(metadata, "digests", "metadata").items():
        if not isinstance(data, dict):
            continue
        for key in ("segments", "keyslots"):
            if not isinstance(data.get(key, []), list):
                raise CorruptImage(f"LUKS2 digest {index} {key} is not an array")
        if "0" not in data.get("segments", []):
            continue
        if data.get("type") != "pbkdf2":
            raise Unsupported(f"LUKS2 digest type {data.get('type')!r} is not supported")
        found = parse_kdf({**data, "type": "pbkdf2"}, f"digest {index}")
        value = _b64(data.get("digest"), f"digest {index}")
        if not 1 <= len(value) <= 64:
            raise CorruptImage(f"LUKS2 digest {index} has length {len(value)}")
        return Digest(found.hash_name, found.iterations, found.salt, value,
                      tuple(str(slot) for slot in data.get("keyslots", [])))
    raise CorruptImage("no LUKS2 digest covers segment 0")


def _check_config(metadata: dict[str, Any], hdr_size: int) -> tuple[int, int]:
    """The keyslots area (start, end); refuses images with requirements."""
    config = _object(metadata, "config", "metadata")
    requirements = config.get("requirements")
    mandatory = requirements.get("mandatory") if isinstance(requirements, dict) else None
    if mandatory:
        names = ", ".join(map(str, mandatory))
        if any("reencrypt" in str(name) for name in mandatory):
            raise Unsupported(f"LUKS2 reencryption is in progress ({names}); "
                              "finish it with cryptsetup")
        raise Unsupported(f"LUKS2 requirements not supported: {names}")
    keyslots_size = _u64(config.get("keyslots_size"), "keyslots_size")
    return 2 * hdr_size, 2 * hdr_size + keyslots_size


@dataclass(frozen=True)
class Luks2Header:
    """A validated LUKS2 header (nothing secret in it)."""

    hdr: HdrDisk
    segment: Segment
    digest: Digest
    keyslots: tuple[Keyslot, ...]
    priorities: tuple[int, ...]
    key_size: int

    version = 2

    @property
    def spec(self) -> CipherSpec:
        return self.segment.spec

    @property
    def payload_offset(self) -> int:
        return self.segment.offset

    @property
    def sector_size(self) -> int:
        return self.segment.sector_size

    def payload_size(self, file_size: int) -> int:
        if self.segment.size is not None:
            if self.segment.offset + self.segment.size > file_size:
                raise InvalidImage(f"LUKS2 segment {self.segment.offset}+{self.segment.size} "
                                   f"is beyond the end of the {file_size}-byte image")
            return self.segment.size
        if self.segment.offset > file_size:
            raise InvalidImage(f"payload offset {self.segment.offset} is beyond the end of "
                               f"the {file_size}-byte image")
        return (file_size - self.segment.offset) // self.sector_size * self.sector_size

    async def unlock(self, read: ReadFn, passphrase: bytes) -> bytes:
        """Try the keyslots of segment 0's digest, high priority first."""
        return await try_slots(open_slot, self, self.slots_to_try(), read, passphrase)

    def slots_to_try(self) -> list[SlotToTry]:
        """The keyslots `unlock` tries, in its order: high priority first,
        none of priority 0 ("ignore": only used when named explicitly)."""
        order = sorted(range(len(self.keyslots)), key=lambda i: -self.priorities[i])
        slots = [self.keyslots[i] for i in order if self.priorities[i] != 0]
        return [SlotToTry(f"keyslot {slot.index}", slot, slot.area_offset, slot.material_size)
                for slot in slots]

    def info(self) -> dict[str, object]:
        spec = self.spec
        info: dict[str, object] = {"version": 2, "cipher-alg": cipher_alg_name(spec, self.key_size),
                                   "cipher-mode": spec.mode}
        if spec.ivgen:
            info["ivgen-alg"] = spec.ivgen
        if spec.ivgen_hash:
            info["ivgen-hash-alg"] = spec.ivgen_hash
        info.update({"payload-offset": self.payload_offset, "sector-size": self.sector_size,
                     "uuid": _text(self.hdr.uuid),
                     "slots": [{"id": slot.index, "active": True, "kdf": slot.kdf.kind,
                                "key-offset": slot.area_offset, "stripes": slot.stripes}
                               for slot in self.keyslots]})
        return info


def open_slot(header: Luks2Header, slot: Keyslot, material: bytes,
              passphrase: bytes) -> bytes | None:
    """The volume key if `passphrase` opens `slot`, else None (CPU-bound;
    `unlock` calls it through early.EARLY, which may have started it)."""
    area_key = slot.kdf.derive(passphrase, slot.area_key_size)
    split = sector_cipher(slot.area_spec, area_key).decrypt(0, material)
    del area_key
    candidate = kdf.af_merge(split, slot.key_size, slot.stripes, slot.af_hash)
    return candidate if header.digest.matches(candidate) else None


async def parse_header(read: ReadFn, area_size: int, quiet: bool = False) -> Luks2Header:
    """The validated header (`quiet`: no warning about a damaged copy)."""
    hdr, metadata = await read_metadata(read, area_size, quiet)
    keyslots_area = _check_config(metadata, hdr.hdr_size)
    segment = parse_segments(metadata)
    if segment.offset < keyslots_area[1]:
        raise InvalidImage(f"LUKS2 segment offset {segment.offset} overlaps the keyslots "
                           f"area ending at {keyslots_area[1]}")
    digest = parse_digest(metadata)
    slots_data = _object(metadata, "keyslots", "metadata")
    keyslots, priorities = [], []
    for index in digest.keyslots:
        data = slots_data.get(index)
        if not isinstance(data, dict):
            raise CorruptImage(f"LUKS2 digest names a missing keyslot {index}")
        keyslots.append(parse_keyslot(index, data, keyslots_area))
        priorities.append(int(_u64(data.get("priority", 1), f"keyslot {index} priority")))
    key_sizes = {slot.key_size for slot in keyslots}
    if len(key_sizes) > 1:
        raise CorruptImage("LUKS2 keyslots of one segment disagree on the key size")
    key_size = key_sizes.pop() if key_sizes else 0
    if keyslots:
        segment.spec.check_key_size(key_size)
    return Luks2Header(hdr, segment, digest, tuple(keyslots), tuple(priorities), key_size)
