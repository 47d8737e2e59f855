"""Serpent and Twofish from Nettle (drivers/luks/nettle.py): the context
sizes against nettle's C headers, the blocks against the Twofish paper's
test vectors and against libgcrypt (an independent implementation, in
which QEMU and cryptsetup images would decrypt the same), and the sector
modes composed in crypto.py for them."""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from imgfs.drivers.luks import crypto, nettle

from tests.conftest import REQUIRE_ORACLES


def _missing(message: str) -> None:
    if REQUIRE_ORACLES:
        pytest.fail(message)
    pytest.skip(message)


def test_context_sizes_match_the_headers(tmp_path: Path) -> None:
    if not (shutil.which("gcc") and Path("/usr/include/nettle/serpent.h").exists()):
        _missing("gcc and nettle-dev are needed to read nettle's struct sizes")
    source = tmp_path / "sizes.c"
    source.write_text("#include <stdio.h>\n#include <nettle/serpent.h>\n"
                      "#include <nettle/twofish.h>\n"
                      "int main(void) { printf(\"%zu %zu\\n\", sizeof(struct serpent_ctx),"
                      " sizeof(struct twofish_ctx)); return 0; }\n")
    program = tmp_path / "sizes"
    subprocess.run(["gcc", "-o", str(program), str(source)], check=True)
    sizes = subprocess.run([str(program)], capture_output=True, text=True, check=True).stdout
    assert [int(size) for size in sizes.split()] == \
        [nettle.CIPHERS["serpent"].context_size, nettle.CIPHERS["twofish"].context_size]


# Twofish paper (Schneier et al., 1998), appendix "Test vectors": zero plaintext.
TWOFISH_VECTORS = [
    ("00" * 16, "9f589f5cf6122c32b6bfec2f2ae8c35a"),
    ("0123456789abcdeffedcba98765432100011223344556677", "cfd1d2e5a9be9cdf501f13b892bd2248"),
    ("0123456789abcdeffedcba987654321000112233445566778899aabbccddeeff",
     "37527be0052334b89f0cfccae87cfa20"),
]


@pytest.mark.parametrize("key,ciphertext", TWOFISH_VECTORS)
def test_twofish_paper_vectors(key: str, ciphertext: str) -> None:
    block = nettle.NettleEcb("twofish", bytes.fromhex(key), True).update(bytes(16))
    assert block.hex() == ciphertext
    decrypted = nettle.NettleEcb("twofish", bytes.fromhex(key), False).update(block)
    assert decrypted == bytes(16)


class Gcrypt:
    """libgcrypt's ECB through ctypes (GCRY_CIPHER_MODE_ECB = 1)."""

    def __init__(self) -> None:
        try:
            self.lib = ctypes.CDLL("libgcrypt.so.20")
        except OSError:
            _missing("libgcrypt20 is needed as the independent implementation")
        self.lib.gcry_check_version.restype = ctypes.c_char_p
        self.lib.gcry_check_version(None)

    def ecb(self, algorithm: str, key: bytes, data: bytes, encrypt: bool) -> bytes:
        handle = ctypes.c_void_p()
        number = self.lib.gcry_cipher_map_name(algorithm.encode())
        assert self.lib.gcry_cipher_open(ctypes.byref(handle), number, 1, 0) == 0
        try:
            assert self.lib.gcry_cipher_setkey(handle, key, ctypes.c_size_t(len(key))) == 0
            out = ctypes.create_string_buffer(len(data))
            function = self.lib.gcry_cipher_encrypt if encrypt else self.lib.gcry_cipher_decrypt
            assert function(handle, out, ctypes.c_size_t(len(data)), data,
                            ctypes.c_size_t(len(data))) == 0
            return out.raw
        finally:
            self.lib.gcry_cipher_close(handle)


#: libgcrypt has no 192-bit Twofish (why nettle.py uses Nettle)
GCRYPT_CASES = [("serpent", "SERPENT128", 16), ("serpent", "SERPENT192", 24),
                ("serpent", "SERPENT256", 32), ("twofish", "TWOFISH128", 16),
                ("twofish", "TWOFISH", 32)]


@pytest.mark.parametrize("name,gcrypt_name,key_bytes", GCRYPT_CASES)
def test_blocks_match_libgcrypt(name: str, gcrypt_name: str, key_bytes: int) -> None:
    gcrypt = Gcrypt()
    for _ in range(4):
        key, data = os.urandom(key_bytes), os.urandom(16 * 64)
        ours = nettle.NettleEcb(name, key, True).update(data)
        assert ours == gcrypt.ecb(gcrypt_name, key, data, True)
        assert nettle.NettleEcb(name, key, False).update(ours) == data
        assert gcrypt.ecb(gcrypt_name, key, ours, False) == data


def test_xts_sectors_match_libgcrypt() -> None:
    """serpent-xts-plain64 composed in crypto.py against libgcrypt's own XTS
    mode (GCRY_CIPHER_MODE_XTS = 13), one sector at a time."""
    gcrypt = Gcrypt()
    key = hashlib.sha512(b"xts").digest()
    data = os.urandom(4 * 512)
    sectors = crypto.SectorCipher(crypto.parse_cipher("serpent", "xts-plain64"), key)
    handle = ctypes.c_void_p()
    lib = gcrypt.lib
    assert lib.gcry_cipher_open(ctypes.byref(handle), lib.gcry_cipher_map_name(b"SERPENT256"),
                                13, 0) == 0
    try:
        assert lib.gcry_cipher_setkey(handle, key, ctypes.c_size_t(64)) == 0
        expected = b""
        for index in range(4):
            iv = (1000 + index).to_bytes(16, "little")
            assert lib.gcry_cipher_setiv(handle, iv, ctypes.c_size_t(16)) == 0
            out = ctypes.create_string_buffer(512)
            chunk = data[index * 512:(index + 1) * 512]
            assert lib.gcry_cipher_encrypt(handle, out, ctypes.c_size_t(512), chunk,
                                           ctypes.c_size_t(512)) == 0
            expected += out.raw
    finally:
        lib.gcry_cipher_close(handle)
    assert sectors.encrypt(1000, data) == expected
    assert sectors.decrypt(1000, expected) == data


@pytest.mark.parametrize("name", ["serpent", "twofish"])
@pytest.mark.parametrize("mode", ["ecb", "cbc-plain", "cbc-essiv:md5", "ctr-plain64",
                                  "xts-plain", "xts-essiv:sha256"])
@pytest.mark.parametrize("key_bytes", [16, 24, 32])
def test_round_trip_every_mode(name: str, mode: str, key_bytes: int) -> None:
    spec = crypto.parse_cipher(name, mode)
    key = os.urandom(key_bytes * (2 if mode.startswith("xts") else 1))
    cipher = crypto.SectorCipher(spec, key)
    data = os.urandom(300 * 512)          # more than one chunk (crypto.CHUNK)
    encrypted = cipher.encrypt(7, data)
    assert encrypted != data and cipher.decrypt(7, encrypted) == data
    # sectors are independent: the middle of a request alone is the same
    assert cipher.decrypt(7 + 5, encrypted[5 * 512:9 * 512]) == data[5 * 512:9 * 512]


@pytest.mark.parametrize("key_bytes", [0, 8, 33, 64])
def test_bad_key_sizes_are_refused_before_nettle(key_bytes: int) -> None:
    """Nettle aborts the process on a key over 32 bytes."""
    with pytest.raises(ValueError, match="takes no"):
        nettle.NettleEcb("serpent", bytes(key_bytes), True)


def test_partial_blocks_are_refused() -> None:
    context = nettle.NettleEcb("twofish", bytes(16), True)
    with pytest.raises(ValueError, match="whole number of blocks"):
        context.update(bytes(17))
    with pytest.raises(ValueError, match="smaller than the input"):
        context.update_into(bytes(32), bytearray(16))


def test_a_header_key_size_nettle_cannot_take_is_invalid() -> None:
    """A LUKS header's key size is checked against the cipher before any
    Nettle call (serpent-cbc with a 512-bit key would abort in Nettle)."""
    from imgfs.errors import InvalidImage
    spec = crypto.parse_cipher("serpent", "cbc-plain64")
    with pytest.raises(InvalidImage, match="key size 512 bits does not suit"):
        crypto.SectorCipher(spec, bytes(64))


def test_a_missing_nettle_is_one_clear_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    from imgfs.errors import Unsupported
    monkeypatch.setattr(nettle, "_library", None)
    monkeypatch.setattr(nettle, "LIBRARY", "libnettle-not-here.so.8")
    monkeypatch.setattr(nettle.ctypes.util, "find_library", lambda name: None)
    with pytest.raises(Unsupported, match="cipher twofish needs libnettle-not-here.so.8"):
        crypto.ALGORITHMS["twofish"].ecb(bytes(16), True)
