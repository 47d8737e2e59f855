"""Start a mount's LUKS key derivation before the rest of imgfs has loaded.

Opening an encrypted image is mostly its PBKDF (QEMU's default iter-time is
2 s; cryptsetup's 1-2 s): everything else a mount does before it (loading
trio, pyfuse3, the block graph and the drivers: 150-250 ms) would simply add
to it.  So the mount process, before anything else, reads the header of each
local LUKS1 image (standalone, or the one a qcow2 image embeds), resolves the
passphrase the open will use, and starts the first key slot's PBKDF2 in a
thread (`kdf.derive_early`).  OpenSSL releases the GIL: imgfs goes on loading
meanwhile, and when the driver gets to the same derivation it takes the
result instead of starting it.

This is a head start, never a second opinion: anything unusual (a URL, a
json: source, LUKS2, no secret given, a header that does not parse, any
error at all) just skips it, and the open proceeds and reports as it always
does.  Only light modules are imported here (no trio, no numpy).
"""
from __future__ import annotations

import os
from typing import Any

from . import LUKS_MAGIC

#: qcow2.header.MAGIC, spelled out: importing that module here costs ~7 ms
#: before a LUKS image's PBKDF can start
QCOW2_MAGIC = b"QFI\xfb"
#: the largest header area read here (qcow2's first cluster is at most 2 MiB)
MAX_HEAD = 2 * 1024 * 1024


def start_unlocking(sources: list[str], opts: Any) -> None:
    """Begin the first key slot's PBKDF2 of each local LUKS1 source."""
    for source in sources:
        try:
            _start(source, opts)
        except Exception:          # noqa: BLE001  (the open reports any problem itself)
            continue


def _start(source: str, opts: Any) -> None:
    from imgfs.registry import protocol_for
    from imgfs.secrets import given_passphrase
    if source.startswith("json:") or protocol_for(source) is not None:
        return
    if opts.fmt not in (None, "luks", "qcow2"):
        return
    with open(source, "rb") as handle:
        file_size = os.lseek(handle.fileno(), 0, os.SEEK_END)    # (block devices too)
        head = os.pread(handle.fileno(), 4096, 0)
        if head[:6] == LUKS_MAGIC and opts.fmt in (None, "luks"):
            secret_id = None               # (-o key-secret is the mount's, in opts)
            luks_head, area = head, file_size
        elif head[:4] == QCOW2_MAGIC and opts.fmt in (None, "qcow2"):
            secret_id = opts.driver_options.get("encrypt.key-secret")
            located = _qcow2_luks_header(handle.fileno(), head, file_size)
            if located is None:
                return
            offset, area = located
            luks_head = os.pread(handle.fileno(), 4096, offset)
        else:
            return
    _derive(luks_head, area, given_passphrase(opts, secret_id))


def _qcow2_luks_header(fd: int, head: bytes, file_size: int) -> tuple[int, int] | None:
    """(offset, length) of the LUKS header a qcow2 image embeds, if any."""
    from ..qcow2.header import Header, parse_image_header
    cluster_size = Header.unpack(head).cluster_size
    if len(head) < min(cluster_size, file_size) <= MAX_HEAD:
        head = os.pread(fd, min(cluster_size, file_size), 0)
    return parse_image_header(head, file_size).crypto_header


def _derive(head: bytes, area_size: int, passphrase: bytes | None) -> None:
    from . import kdf, luks1, probe_version
    if passphrase is None or probe_version(head) != 1:
        return
    inputs = luks1.first_slot_derivation(luks1.parse_header(head, area_size), passphrase)
    if inputs is not None:
        # (numpy, which the key material then needs, is not prefetched here:
        # its import holds the GIL and would only slow the loading of trio
        # and the drivers; unlock() starts it, while the derivation still runs)
        kdf.derive_early(*inputs)
