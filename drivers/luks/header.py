"""One entry point for LUKS1 and LUKS2 headers, for the `luks` driver and
for formats that embed a LUKS header (qcow2 ``encrypt.format=luks``).

    header = await read_header(read, area_size)   # validated, nothing secret
    key = await header.unlock(read, passphrase)   # PermissionDenied if wrong
    cipher = sector_cipher(header.spec, key, header.sector_size)   # spec.py
    plain = cipher.decrypt(sector_number, data)   # sectors from the payload start

`read(offset, length)` reads relative to the start of the header, wherever
the header lives; `area_size` is how many bytes it may span.  A format that
embeds the header picks the sector numbers itself (QEMU's qcow2 numbers
LUKS sectors by host offset / 512: check it against qemu-img).  To create
one: `create.format_header(options, passphrase)` gives the pieces to write
relative to the header start and the size of the whole header area
(`payload_offset`).
"""
from __future__ import annotations

from typing import Protocol

from imgfs.errors import InvalidImage

from . import luks1, probe_version
from .luks1 import LUKS_MAGIC, ReadFn
from .spec import CipherSpec


class LuksHeader(Protocol):
    version: int

    @property
    def spec(self) -> CipherSpec: ...
    @property
    def payload_offset(self) -> int: ...
    @property
    def sector_size(self) -> int: ...
    def payload_size(self, file_size: int) -> int: ...
    async def unlock(self, read: ReadFn, passphrase: bytes) -> bytes: ...
    def info(self) -> dict[str, object]: ...


async def read_header(read: ReadFn, area_size: int) -> LuksHeader:
    head = await read(0, min(area_size, luks1.HEADER_SIZE))
    version = probe_version(head)
    if version == 1:
        return luks1.parse_header(head, area_size)
    if version == 2:
        from . import luks2  # (only here: LUKS1 opens need not load it)
        return await luks2.parse_header(read, area_size)
    if head[:6] == LUKS_MAGIC:
        raise InvalidImage(f"LUKS version {int.from_bytes(head[6:8], 'big')} is not supported")
    raise InvalidImage("not a LUKS image (bad magic)")
