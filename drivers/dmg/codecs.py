"""Decoders of UDIF's compressed chunks: zlib, bzip2 (stdlib), ADC (here)
and LZFSE (Apple's reference library, from the PyPI package ``lzfse``).

Each decoder produces at most the chunk's declared size: a stream that
would inflate past it, or stops short of it, is a corrupt chunk, found
after at most the declared size (a decompression bomb costs no more memory
than an honest chunk).
"""
from __future__ import annotations

import bz2
import ctypes
import functools
import zlib
from collections.abc import Callable
from types import ModuleType

from imgfs.errors import CorruptImage, Unsupported

from .layout import ADC, BZIP2, LZFSE, ZLIB

inflater_module: ModuleType
try:        # ISA-L inflates zlib chunks faster (bench/README.md); zlib does the same
    from isal import isal_zlib as inflater_module
except ImportError:
    inflater_module = zlib


def _size_error(name: str, expected: int, got: int | None) -> CorruptImage:
    """`got` None: the stream goes on past the declared size."""
    if got is None:
        return CorruptImage(f"{name} chunk decodes to more than the {expected} bytes its "
                            "table declares")
    return CorruptImage(f"{name} chunk decodes to {got} bytes, not the {expected} its "
                        "table declares")


def inflate_zlib(stored: bytes, size: int) -> bytes:
    inflater = inflater_module.decompressobj()
    try:
        out = inflater.decompress(stored, size)
        if inflater.unconsumed_tail or (not inflater.eof and len(out) == size and
                                        inflater.decompress(b"", 1)):
            raise _size_error("zlib", size, None)
    except (zlib.error, inflater_module.error) as exc:
        raise CorruptImage(f"zlib chunk is corrupt ({exc})") from None
    if len(out) != size:
        raise _size_error("zlib", size, len(out))
    return out


def inflate_bzip2(stored: bytes, size: int) -> bytes:
    decompressor = bz2.BZ2Decompressor()
    try:
        out = decompressor.decompress(stored, size)
        if not decompressor.eof and decompressor.decompress(b"", 1):
            raise _size_error("bzip2", size, None)
    except (OSError, EOFError, ValueError) as exc:
        raise CorruptImage(f"bzip2 chunk is corrupt ({exc})") from None
    if len(out) != size:
        raise _size_error("bzip2", size, len(out))
    return out


def inflate_adc(stored: bytes, size: int) -> bytes:
    """Apple Data Compression: a run of three opcodes, no header.  A byte
    1xxxxxxx is x+1 literal bytes; 01xxxxxx HH LL copies x+4 bytes from
    HHLL+1 bytes back; 00xxxxyy YY copies x+3 bytes from yyYY+1 bytes back
    (a copy may overlap what it writes, repeating it)."""
    out = bytearray()
    position, end = 0, len(stored)
    while position < end:
        opcode = stored[position]
        if opcode & 0x80:
            count = (opcode & 0x7F) + 1
            literal = stored[position + 1:position + 1 + count]
            if len(literal) < count:
                raise CorruptImage("ADC chunk is corrupt (a literal run past its end)")
            out += literal
            position += 1 + count
        else:
            if opcode & 0x40:
                operand = stored[position + 1:position + 3]
                count, position = (opcode & 0x3F) + 4, position + 3
                distance = int.from_bytes(operand, "big") + 1
            else:
                operand = stored[position + 1:position + 2]
                count, position = ((opcode >> 2) & 0x0F) + 3, position + 2
                distance = (((opcode & 0x03) << 8) | (operand[0] if operand else 0)) + 1
            if position > end or distance > len(out):
                raise CorruptImage("ADC chunk is corrupt (a copy from before its start)")
            _copy_back(out, distance, count)
        if len(out) > size:
            raise _size_error("ADC", size, None)
    if len(out) != size:
        raise _size_error("ADC", size, len(out))
    return bytes(out)


def _copy_back(out: bytearray, distance: int, count: int) -> None:
    start = len(out) - distance
    if distance >= count:
        out += out[start:start + count]
        return
    pattern = out[start:]                # overlapping: the last `distance` bytes repeat
    out += (pattern * (count // distance + 1))[:count]


@functools.cache
def _lzfse_decode_buffer() -> Callable[..., int] | None:
    """The reference library's ``lzfse_decode_buffer`` (lzfse.h), which
    writes at most the buffer it is given.  The package's Python-level
    ``decompress`` doubles its buffer until the stream ends, with no
    limit, so the driver calls the library's bounded entry point, which
    the package's extension module carries."""
    try:
        import lzfse
        library = ctypes.CDLL(lzfse.__file__)
        decode = library.lzfse_decode_buffer
    except (ImportError, OSError, AttributeError):
        return None
    decode.restype = ctypes.c_size_t
    decode.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t,
                       ctypes.c_void_p]
    return decode


def inflate_lzfse(stored: bytes, size: int) -> bytes:
    decode = _lzfse_decode_buffer()
    if decode is None:
        raise Unsupported("LZFSE chunks need the Python package 'lzfse' (pip install lzfse)")
    # one spare byte: a stream that fills it decodes past its declared size
    buffer = ctypes.create_string_buffer(size + 1)
    written = decode(buffer, size + 1, stored, len(stored), None)
    if written != size:
        raise _size_error("LZFSE", size, None if written > size else written)
    return buffer.raw[:size]


DECODERS: dict[int, Callable[[bytes, int], bytes]] = {
    ZLIB: inflate_zlib,
    BZIP2: inflate_bzip2,
    ADC: inflate_adc,
    LZFSE: inflate_lzfse,
}
