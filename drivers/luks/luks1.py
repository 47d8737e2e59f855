"""LUKS1 on-disk header: parse and validate, unlock a key slot, lay out a
new header.  Pure functions and data, I/O through a `read` callback, so the
same code opens a standalone LUKS1 image and the header qcow2 keeps in its
own clusters.

Layout (LUKS1 spec, libyal/libluksde "Linux Unified Key Setup (LUKS) Disk
Encryption format", section 2 "Header"), all integers big-endian:

    0   magic "LUKS\\xba\\xbe"   6  version (1)      8  cipher name[32]
    40  cipher mode[32]        72 hash spec[32]   104 payload offset (sectors)
    108 key bytes              112 mk digest[20]  132 mk digest salt[32]
    164 mk digest iterations   168 uuid[40]       208 8 key slots of 48 bytes:
        active, iterations, salt[32], key material offset (sectors), stripes

A key slot holds the volume key AF-split into `stripes` blocks (kdf.af_split),
encrypted with the volume's own cipher under PBKDF2(passphrase), sectors
numbered from 0 at the key material offset.  The master key digest is
PBKDF2(volume key, digest salt, digest iterations, 20 bytes).
"""
from __future__ import annotations

import os
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import NamedTuple

from imgfs.errors import CorruptImage, InvalidImage

from . import kdf
from .early import SlotToTry, try_slots
from .spec import CipherSpec, parse_cipher, sector_cipher

LUKS_MAGIC = b"LUKS\xba\xbe"
LUKS_VERSION = 1
LUKS_DIGESTSIZE = 20
LUKS_SALTSIZE = 32
LUKS_NUMKEYS = 8
LUKS_STRIPES = 4000
LUKS_KEY_ENABLED = 0x00AC71F3
LUKS_KEY_DISABLED = 0x0000DEAD
LUKS_SECTOR_SIZE = 512
#: where key material areas start and how they are aligned (cryptsetup, QEMU)
LUKS_ALIGN_KEYSLOTS = 4096

PHDR = struct.Struct(">6sH32s32s32sII20s32sI40s")
KEYSLOT = struct.Struct(">II32sII")
HEADER_SIZE = PHDR.size + LUKS_NUMKEYS * KEYSLOT.size     # 592

ReadFn = Callable[[int, int], Awaitable[bytes]]


class KeySlot(NamedTuple):
    active: int
    iterations: int
    salt: bytes
    key_material_offset: int      # in 512-byte sectors
    stripes: int

    def pack(self) -> bytes:
        return KEYSLOT.pack(*self)


class Phdr(NamedTuple):
    magic: bytes
    version: int
    cipher_name: bytes
    cipher_mode: bytes
    hash_spec: bytes
    payload_offset: int           # in 512-byte sectors
    key_bytes: int
    mk_digest: bytes
    mk_digest_salt: bytes
    mk_digest_iter: int
    uuid: bytes

    def pack(self) -> bytes:
        return PHDR.pack(*self)


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("ascii", "replace")


def material_sectors(key_bytes: int, stripes: int) -> int:
    """Sectors one key slot's AF-split key occupies."""
    return -(-key_bytes * stripes // LUKS_SECTOR_SIZE)


@dataclass(frozen=True)
class Luks1Header:
    """A validated LUKS1 header (nothing secret in it)."""

    phdr: Phdr
    slots: tuple[KeySlot, ...]
    spec: CipherSpec
    hash_name: str

    version = 1
    sector_size = LUKS_SECTOR_SIZE

    @property
    def payload_offset(self) -> int:
        return self.phdr.payload_offset * LUKS_SECTOR_SIZE

    def material_area(self, slot: KeySlot) -> tuple[int, int]:
        """(offset, length) in bytes of a key slot's AF-split key, from the
        start of the header."""
        return (slot.key_material_offset * LUKS_SECTOR_SIZE,
                material_sectors(self.phdr.key_bytes, slot.stripes) * LUKS_SECTOR_SIZE)

    def payload_size(self, file_size: int) -> int:
        """A standalone image's payload runs to the end of the file."""
        header_end = max([HEADER_SIZE] + [
            sum(self.material_area(slot))
            for slot in self.slots if slot.active == LUKS_KEY_ENABLED])
        if self.payload_offset < header_end:
            raise InvalidImage(f"payload offset {self.payload_offset} lies inside the header "
                               f"(a detached header is not supported)")
        if self.payload_offset > file_size:
            raise InvalidImage(f"payload offset {self.payload_offset} is beyond the end of "
                               f"the {file_size}-byte image")
        return (file_size - self.payload_offset) // LUKS_SECTOR_SIZE * LUKS_SECTOR_SIZE

    async def unlock(self, read: ReadFn, passphrase: bytes) -> bytes:
        """Try every active key slot; the volume key, or PermissionDenied."""
        return await try_slots(open_slot, self, self.slots_to_try(), read, passphrase)

    def active_slots(self) -> list[int]:
        return [index for index, slot in enumerate(self.slots)
                if slot.active == LUKS_KEY_ENABLED]

    def slots_to_try(self) -> list[SlotToTry]:
        """The active key slots, in the order `unlock` tries them."""
        return [SlotToTry(f"key slot {index}", self.slots[index],
                          *self.material_area(self.slots[index]))
                for index in self.active_slots()]

    def info(self) -> dict[str, object]:
        """qemu-img info's luks "format-specific" data, with its key names."""
        return qemu_info_order({
            **spec_info(self.spec, self.phdr.key_bytes), "hash-alg": self.hash_name,
            "payload-offset": self.payload_offset, "master-key-iters": self.phdr.mk_digest_iter,
            "uuid": _text(self.phdr.uuid), "slots": [_slot_info(s) for s in self.slots]})


#: the order qemu-img info prints the LUKS fields in (qcow2's "format" included),
#: so that the two reports of an image compare line by line
QEMU_INFO_ORDER = ("ivgen-alg", "hash-alg", "cipher-alg", "uuid", "ivgen-hash-alg", "format",
                   "cipher-mode", "slots", "payload-offset", "master-key-iters")


def qemu_info_order(info: dict[str, object]) -> dict[str, object]:
    """`info` with qemu-img's keys in its order, any others after them."""
    rank = {key: index for index, key in enumerate(QEMU_INFO_ORDER)}
    return dict(sorted(info.items(), key=lambda item: rank.get(item[0], len(rank))))


def spec_info(spec: CipherSpec, key_bytes: int) -> dict[str, object]:
    info: dict[str, object] = {"cipher-alg": cipher_alg_name(spec, key_bytes),
                               "cipher-mode": spec.mode}
    if spec.ivgen:
        info["ivgen-alg"] = spec.ivgen
    if spec.ivgen_hash:
        info["ivgen-hash-alg"] = spec.ivgen_hash
    return info


def cipher_alg_name(spec: CipherSpec, key_bytes: int) -> str:
    """QEMU's name: "aes-256" (the key size per cipher, halved for XTS)."""
    bits = (key_bytes // 2 if spec.mode == "xts" else key_bytes) * 8
    if spec.algorithm.name in ("sm4", "des3_ede"):          # (one key size each)
        return "3des" if spec.algorithm.name == "des3_ede" else "sm4"
    return f"{spec.algorithm.name}-{bits}"


def _slot_info(slot: KeySlot) -> dict[str, object]:
    offset = slot.key_material_offset * LUKS_SECTOR_SIZE
    if slot.active != LUKS_KEY_ENABLED:
        return {"active": False, "key-offset": offset}
    return {"active": True, "iters": slot.iterations, "key-offset": offset,
            "stripes": slot.stripes}


def parse_header(raw: bytes, area_size: int) -> Luks1Header:
    """Validate every field of the first HEADER_SIZE bytes.

    `area_size` is how many bytes the header may span (the file size of a
    standalone image): key material must lie within it."""
    if len(raw) < HEADER_SIZE or raw[:6] != LUKS_MAGIC:
        raise InvalidImage("not a LUKS header (bad magic)")
    phdr = Phdr._make(PHDR.unpack_from(raw, 0))
    if phdr.version != LUKS_VERSION:
        raise InvalidImage(f"LUKS version {phdr.version} is not 1")
    spec = parse_cipher(_text(phdr.cipher_name), _text(phdr.cipher_mode))
    hash_name = _text(phdr.hash_spec).lower()
    kdf.hash_algorithm(hash_name)
    spec.check_key_size(phdr.key_bytes)
    _check_iterations("master key digest", phdr.mk_digest_iter)
    slots = tuple(KeySlot._make(KEYSLOT.unpack_from(raw, PHDR.size + index * KEYSLOT.size))
                  for index in range(LUKS_NUMKEYS))
    header = Luks1Header(phdr, slots, spec, hash_name)
    _check_slots(header, area_size)
    return header


def _check_iterations(what: str, iterations: int) -> None:
    if iterations < 1:
        raise CorruptImage(f"{what}: iteration count 0")
    if iterations > kdf.MAX_PBKDF2_ITERATIONS:
        raise InvalidImage(f"{what}: {iterations} PBKDF2 iterations is more than the "
                           f"{kdf.MAX_PBKDF2_ITERATIONS} imgfs accepts (would hang the open)")


def _check_slots(header: Luks1Header, area_size: int) -> None:
    used: list[tuple[int, int, int]] = []
    for index, slot in enumerate(header.slots):
        if slot.active not in (LUKS_KEY_ENABLED, LUKS_KEY_DISABLED):
            raise CorruptImage(f"key slot {index}: invalid state {slot.active:#x}")
        if slot.active != LUKS_KEY_ENABLED:
            continue
        _check_iterations(f"key slot {index}", slot.iterations)
        if not 1 <= slot.stripes <= LUKS_STRIPES:
            raise InvalidImage(f"key slot {index}: {slot.stripes} stripes "
                               f"(expected 1 to {LUKS_STRIPES})")
        start, length = header.material_area(slot)
        end = start + length
        if start < HEADER_SIZE or end > area_size:
            raise InvalidImage(f"key slot {index}: key material at {start}..{end} is "
                               f"outside the {area_size}-byte header area")
        if header.payload_offset and end > header.payload_offset:
            raise InvalidImage(f"key slot {index}: key material ends at {end}, beyond "
                               f"the payload offset {header.payload_offset}")
        for other, other_start, other_end in used:
            if start < other_end and other_start < end:
                raise CorruptImage(f"key slots {other} and {index} overlap")
        used.append((index, start, end))


# -- unlocking ----------------------------------------------------------------------


def open_slot(header: Luks1Header, slot: KeySlot, material: bytes,
              passphrase: bytes) -> bytes | None:
    """The volume key if `passphrase` opens `slot`, else None (CPU-bound;
    `unlock` calls it through early.EARLY, which may have started it)."""
    key_bytes = header.phdr.key_bytes
    slot_key = kdf.pbkdf2(header.hash_name, passphrase, slot.salt, slot.iterations, key_bytes)
    split = sector_cipher(header.spec, slot_key).decrypt(0, material)
    del slot_key
    candidate = kdf.af_merge(split, key_bytes, slot.stripes, header.hash_name)
    if check_digest(header, candidate):
        return candidate
    return None


def check_digest(header: Luks1Header, key: bytes) -> bool:
    phdr = header.phdr
    computed = kdf.pbkdf2(header.hash_name, key, phdr.mk_digest_salt, phdr.mk_digest_iter,
                          LUKS_DIGESTSIZE)
    import hmac  # (here: luks.early imports this module before the PBKDF starts)
    return hmac.compare_digest(computed, phdr.mk_digest)


# -- creating -----------------------------------------------------------------------


@dataclass(frozen=True)
class NewHeader:
    """A freshly laid-out LUKS1 header: what to write where, and the key."""

    pieces: tuple[tuple[int, bytes], ...]
    payload_offset: int
    volume_key: bytes


def slot_layout(key_bytes: int) -> list[int]:
    """Key material offsets (sectors) of the 8 slots, 4 KiB aligned from 4 KiB."""
    stride = -(-key_bytes * LUKS_STRIPES // LUKS_ALIGN_KEYSLOTS) * LUKS_ALIGN_KEYSLOTS
    return [(LUKS_ALIGN_KEYSLOTS + index * stride) // LUKS_SECTOR_SIZE
            for index in range(LUKS_NUMKEYS)]


def format_header(spec: CipherSpec, key_bytes: int, hash_name: str, passphrase: bytes,
                  iter_time_ms: int) -> NewHeader:
    """A new header with key slot 0 holding a random volume key (CPU-bound:
    calibrates PBKDF2 and runs it)."""
    import uuid
    spec.check_key_size(key_bytes)
    volume_key = os.urandom(key_bytes)
    slot_iters = kdf.calibrate_pbkdf2(hash_name, key_bytes, iter_time_ms)
    digest_iters = max(kdf.MIN_PBKDF2_ITERATIONS, slot_iters // 8)
    digest_salt = os.urandom(LUKS_SALTSIZE)
    offsets = slot_layout(key_bytes)
    stride = offsets[1] - offsets[0]
    payload_sectors = offsets[-1] + stride
    slot_salt = os.urandom(LUKS_SALTSIZE)
    slot_key = kdf.pbkdf2(hash_name, passphrase, slot_salt, slot_iters, key_bytes)
    split = kdf.af_split(volume_key, LUKS_STRIPES, hash_name)
    split += bytes(-len(split) % LUKS_SECTOR_SIZE)
    material = sector_cipher(spec, slot_key).encrypt(0, split)
    del slot_key, split
    slots = [KeySlot(LUKS_KEY_ENABLED, slot_iters, slot_salt, offsets[0], LUKS_STRIPES)]
    slots += [KeySlot(LUKS_KEY_DISABLED, 0, bytes(LUKS_SALTSIZE), offset, LUKS_STRIPES)
              for offset in offsets[1:]]
    phdr = Phdr(LUKS_MAGIC, LUKS_VERSION, spec.algorithm.name.encode(),
                spec.mode_string.encode(), hash_name.encode(), payload_sectors, key_bytes,
                kdf.pbkdf2(hash_name, volume_key, digest_salt, digest_iters, LUKS_DIGESTSIZE),
                digest_salt, digest_iters, str(uuid.UUID(bytes=os.urandom(16), version=4)).encode())
    head = phdr.pack() + b"".join(slot.pack() for slot in slots)
    return NewHeader(((0, head), (offsets[0] * LUKS_SECTOR_SIZE, material)),
                     payload_sectors * LUKS_SECTOR_SIZE, volume_key)
