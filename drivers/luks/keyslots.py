"""Adding and erasing LUKS1 key slots (`imgfs amend -o state=...`), for a
standalone LUKS image and the header a qcow2 image embeds.

Layout: see luks1.py (LUKS1 spec, section 2).  A new slot holds the volume
key AF-split and encrypted under PBKDF2 of the new passphrase, in the key
material area the slot already owns; its entry is written after the
material.  An erased slot is marked inactive first, then its material is
overwritten with random bytes.  The checks and messages are QEMU's
(qemu-img amend): one of `keyslot` or `old-secret` selects what to erase,
and the last active slot is never erased.  LUKS2 headers are refused.
"""
from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from imgfs.errors import ImgfsError, Unsupported
from imgfs.node import OpenContext
from imgfs.options import Int, Opt, Schema, Str, choice
from imgfs.secrets import given_passphrase, resolve_passphrase

from . import kdf, luks1
from .header import LuksHeader
from .spec import sector_cipher

AMEND_OPTS = Schema(
    Opt("state", choice("active", "inactive"),
        help="active: add a key slot (new-secret); inactive: erase slots "
             "(keyslot or old-secret)"),
    Opt("keyslot", Int, help="the key slot to add or erase (default: the first free one)"),
    Opt("old-secret", Str, help="ID of the secret whose key slots are erased"),
    Opt("new-secret", Str, help="ID of the secret the new key slot opens with"),
    Opt("iter-time", Int, help="milliseconds of PBKDF2 for the new slot (default 2000)"),
)
DEFAULT_ITER_TIME = 2000

#: (offset from the start of the LUKS header, bytes), in the order to write them
Pieces = list[tuple[int, bytes]]
ReadFn = Callable[[int, int], Awaitable[bytes]]


@dataclass(frozen=True)
class Request:
    state: str
    keyslot: int | None
    old_passphrase: bytes | None
    new_passphrase: bytes | None
    iter_time: int


def request_from(options: dict[str, Any], secret: Callable[[str], bytes]) -> Request:
    """The amend options (without their ``encrypt.`` prefix), checked as QEMU does."""
    state = options.get("state")
    if state is None:
        raise ImgfsError("Parameter 'state' is missing")
    keyslot = options.get("keyslot")
    if keyslot is not None and not 0 <= keyslot < luks1.LUKS_NUMKEYS:
        raise ImgfsError(f"Invalid keyslot {keyslot} specified, must be between 0 and "
                         f"{luks1.LUKS_NUMKEYS - 1}")
    old, new = options.get("old-secret"), options.get("new-secret")
    if state == "active":
        if new is None:
            raise ImgfsError("'new-secret' is required to activate a keyslot")
        if old is not None:
            raise ImgfsError("'old-secret' must not be given when activating keyslots")
    else:
        if new is not None:
            raise ImgfsError("'new-secret' must not be given when erasing keyslots")
        if keyslot is None and old is None:
            raise ImgfsError("To erase keyslot(s), either explicit keyslot index or the "
                             "password currently contained in them must be given")
    return Request(state, keyslot, secret(old) if old is not None else None,
                   secret(new) if new is not None else None,
                   options.get("iter-time") or DEFAULT_ITER_TIME)


def entry_offset(index: int) -> int:
    return luks1.PHDR.size + index * luks1.KEYSLOT.size


def added_slot(header: luks1.Luks1Header, volume_key: bytes, passphrase: bytes, index: int,
               iter_time: int) -> Pieces:
    """Slot `index` opening with `passphrase` (CPU-bound: calibrates, runs PBKDF2)."""
    old = header.slots[index]
    hash_name, key_bytes = header.hash_name, header.phdr.key_bytes
    iterations = kdf.calibrate_pbkdf2(hash_name, key_bytes, iter_time)
    salt = os.urandom(luks1.LUKS_SALTSIZE)
    slot_key = kdf.pbkdf2(hash_name, passphrase, salt, iterations, key_bytes)
    split = kdf.af_split(volume_key, old.stripes, hash_name)
    split += bytes(-len(split) % luks1.LUKS_SECTOR_SIZE)
    material = sector_cipher(header.spec, slot_key).encrypt(0, split)
    del slot_key, split
    slot = luks1.KeySlot(luks1.LUKS_KEY_ENABLED, iterations, salt, old.key_material_offset,
                         old.stripes)
    return [(header.material_area(old)[0], material), (entry_offset(index), slot.pack())]


def erased_slot(header: luks1.Luks1Header, index: int) -> Pieces:
    old = header.slots[index]
    slot = luks1.KeySlot(luks1.LUKS_KEY_DISABLED, 0, bytes(luks1.LUKS_SALTSIZE),
                         old.key_material_offset, old.stripes)
    offset, length = header.material_area(old)
    return [(entry_offset(index), slot.pack()), (offset, os.urandom(length))]


async def opens(header: luks1.Luks1Header, read: ReadFn, index: int,
                passphrase: bytes) -> bool:
    slot = header.slots[index]
    material = await read(*header.material_area(slot))
    key = await trio.to_thread.run_sync(luks1.open_slot, header, slot, material, passphrase)
    return key is not None


async def plan(header: LuksHeader, read: ReadFn, request: Request,
               volume_key: Callable[[], Awaitable[bytes]]) -> Pieces:
    """What to write for `request`, or one of QEMU's refusals."""
    if not isinstance(header, luks1.Luks1Header):
        raise Unsupported("amending LUKS2 key slots is not supported (LUKS1 only)")
    active = header.active_slots()
    if request.state == "active":
        index = request.keyslot
        if index is None:
            free = [slot for slot in range(luks1.LUKS_NUMKEYS) if slot not in active]
            if not free:
                raise ImgfsError("Can't add a keyslot - all keyslots are in use")
            index = free[0]
        elif index in active:
            raise ImgfsError(f"Refusing to overwrite active keyslot {index} - "
                             "please erase it first")
        assert request.new_passphrase is not None
        key = await volume_key()
        return await trio.to_thread.run_sync(added_slot, header, key, request.new_passphrase,
                                             index, request.iter_time)
    pieces: Pieces = []
    for index in await _slots_to_erase(header, read, request, active):
        pieces += erased_slot(header, index)
    return pieces


async def _slots_to_erase(header: luks1.Luks1Header, read: ReadFn, request: Request,
                          active: list[int]) -> list[int]:
    index = request.keyslot
    if index is not None:
        if index not in active:
            raise ImgfsError(f"Given keyslot {index} is already erased (inactive)")
        if request.old_passphrase is not None and \
                not await opens(header, read, index, request.old_passphrase):
            raise ImgfsError(f"Given keyslot {index} doesn't contain the given old password "
                             "for erase operation")
        if len(active) == 1:
            raise ImgfsError(f"Attempt to erase the only active keyslot {index} which will "
                             "erase all the data in the image irreversibly - refusing operation")
        return [index]
    assert request.old_passphrase is not None
    matching = [slot for slot in active
                if await opens(header, read, slot, request.old_passphrase)]
    if not matching:
        raise ImgfsError("No keyslots match given (old) password for erase operation")
    if len(matching) == len(active):
        raise ImgfsError("All the active keyslots match the (old) password that was given "
                         "and erasing them will erase all the data in the image "
                         "irreversibly - refusing operation")
    return matching


async def amend_keyslots(header: LuksHeader, read: ReadFn,
                         write: Callable[[int, bytes], Awaitable[None]], options: dict[str, Any],
                         ctx: OpenContext, key_secret: str | None, what: str) -> None:
    """Apply the amend options to the header `read` and `write` reach
    (offsets from the header's start); `key_secret` opens the image."""
    request = request_from(options, lambda secret_id: secret_value(ctx, secret_id))

    async def volume_key() -> bytes:
        passphrase = resolve_passphrase(ctx, key_secret, what=what)
        try:
            return await header.unlock(read, passphrase)
        finally:
            del passphrase
    for offset, data in await plan(header, read, request, volume_key):
        await write(offset, data)


def secret_value(ctx: OpenContext, secret_id: str) -> bytes:
    value = given_passphrase(ctx, secret_id)
    assert value is not None          # (a missing ID raises)
    return value
