"""Serpent and Twofish block ciphers from Nettle (libnettle.so.8), through ctypes.

Why Nettle: `cryptography` (OpenSSL) has neither cipher; libgcrypt has
both but refuses 192-bit Twofish keys, which QEMU's ``twofish-192``
writes; Nettle takes every key size QEMU and cryptsetup use, and is the
library QEMU itself does its LUKS ciphers with on Debian.  Only the raw
block functions are used, as ECB over many blocks at once: the sector
modes (XTS, CBC, CTR) and IV generators are composed in `crypto`, as for
every cipher of the Python path.

ABI: the context structs are those of nettle's serpent.h and twofish.h,
fixed for the library's soname 8.  Nettle asserts (aborts the process)
on a key longer than 32 bytes, so key sizes are checked here first.
Calls through ctypes release the GIL, so requests in worker threads
encrypt in parallel; a context is only read by the block functions, so
it may serve several threads at once.
"""
from __future__ import annotations

import ctypes
import ctypes.util
from dataclasses import dataclass

#: the library and its ABI version (the struct sizes below hold for it)
LIBRARY = "libnettle.so.8"
BLOCK_SIZE = 16


@dataclass(frozen=True)
class NettleCipher:
    """One of Nettle's block ciphers: its symbol prefix and context size."""

    symbol: str
    context_size: int
    key_sizes: tuple[int, ...]


#: Linux crypto API name -> Nettle cipher (context: serpent.h, twofish.h)
CIPHERS = {
    "serpent": NettleCipher("nettle_serpent", 33 * 4 * 4, (16, 24, 32)),
    "twofish": NettleCipher("nettle_twofish", 40 * 4 + 4 * 256 * 4, (16, 24, 32)),
}

_library: ctypes.CDLL | None = None


def library() -> ctypes.CDLL:
    """Nettle, loaded at first use (ImportError if it is not installed)."""
    global _library
    if _library is None:
        try:
            loaded = ctypes.CDLL(LIBRARY)
        except OSError:
            found = ctypes.util.find_library("nettle")
            if found is None or not found.endswith(".so.8"):
                raise ImportError(f"{LIBRARY} (Debian libnettle8), which is not "
                                  "installed") from None
            loaded = ctypes.CDLL(found)
        for cipher in CIPHERS.values():
            for suffix in ("set_key", "encrypt", "decrypt"):
                function = getattr(loaded, f"{cipher.symbol}_{suffix}")
                function.restype = None
                function.argtypes = ([ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
                                     if suffix == "set_key" else
                                     [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p,
                                      ctypes.c_void_p])
        _library = loaded
    return _library


class NettleEcb:
    """A keyed block cipher in one direction, used as ECB over whole blocks,
    with the two methods `crypto` uses of a `cryptography` ECB context."""

    __slots__ = ("_context", "_function")

    def __init__(self, name: str, key: bytes, encrypt: bool) -> None:
        cipher = CIPHERS[name]
        if len(key) not in cipher.key_sizes:
            raise ValueError(f"{name} takes no {len(key) * 8}-bit key")
        nettle = library()
        self._context = ctypes.create_string_buffer(cipher.context_size)
        getattr(nettle, f"{cipher.symbol}_set_key")(self._context, len(key), key)
        self._function = getattr(nettle, f"{cipher.symbol}_{'encrypt' if encrypt else 'decrypt'}")

    def update(self, data: bytes | bytearray | memoryview) -> bytes:
        """Whole blocks in, as many out."""
        source = _readable(data)
        out = ctypes.create_string_buffer(len(source))
        self._run(source, out, len(source))
        return out.raw

    def update_into(self, data: bytes | bytearray | memoryview,
                    buffer: bytearray | memoryview) -> int:
        """Whole blocks of `data` into the start of the writable `buffer`."""
        source = _readable(data)
        target = memoryview(buffer).cast("B")
        if len(target) < len(source):
            raise ValueError("the output buffer is smaller than the input")
        self._run(source, (ctypes.c_char * len(target)).from_buffer(target), len(source))
        return len(source)

    def _run(self, source: bytes | ctypes.Array[ctypes.c_char], target: ctypes.Array[ctypes.c_char],
             length: int) -> None:
        if length % BLOCK_SIZE:
            raise ValueError("data is not a whole number of blocks")
        self._function(self._context, length, target, source)

    def __del__(self) -> None:
        # (the key schedule is the key: not left behind in freed memory)
        context = getattr(self, "_context", None)
        if context is not None:
            ctypes.memset(context, 0, len(context))


def _readable(data: bytes | bytearray | memoryview) -> bytes | ctypes.Array[ctypes.c_char]:
    """A pointer-able view of `data`: bytes as they are, writable buffers in
    place, anything else copied."""
    if isinstance(data, bytes):
        return data
    view = memoryview(data).cast("B")
    if view.readonly:
        return bytes(view)
    return (ctypes.c_char * len(view)).from_buffer(view)
