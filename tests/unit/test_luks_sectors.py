"""The compiled AES sector cipher (drivers/luks/_sectors.c) against the
Python path (crypto.SectorCipher, itself pinned to `cryptography`'s modes
in test_luks_layout.py): byte-identical for every mode, IV generator, key
size and sector size, and which one spec.sector_cipher chooses."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from imgfs.drivers.luks import crypto, spec

from tests.conftest import REQUIRE_ORACLES

native = pytest.mark.skipif(spec.AesSectors is None, reason="_sectors is not built")

#: mode string -> the volume key sizes the compiled module takes
MODES = {
    "xts-plain64": (32, 48, 64), "xts-plain": (32, 64), "xts-essiv:sha256": (32, 48, 64),
    "xts-null": (32, 64), "cbc-plain64": (16, 24, 32), "cbc-plain": (16, 24, 32),
    "cbc-essiv:sha256": (16, 24, 32), "cbc-null": (16, 24, 32),
    "ctr-plain64": (16, 24, 32), "ctr-plain": (16, 32), "ecb": (16, 24, 32),
    "ecb-plain64": (16, 32), "ecb-essiv:sha256": (16, 32),
}
COMBINATIONS = [(mode, key_bytes) for mode, sizes in MODES.items() for key_bytes in sizes]


def test_the_native_module_is_built() -> None:
    """make test builds it (setup.py); a silent fallback would leave its
    code untested and every AES request in Python."""
    if spec.AesSectors is None:
        message = "imgfs.drivers.luks._sectors is not built (no compiler or libssl-dev?)"
        if REQUIRE_ORACLES:
            pytest.fail(message)
        pytest.skip(message)


@native
@pytest.mark.parametrize("mode,key_bytes", COMBINATIONS)
@pytest.mark.parametrize("sector_size", [512, 1024, 2048, 4096, 32768])
def test_native_is_the_python_path(mode: str, key_bytes: int, sector_size: int) -> None:
    cipher_spec = spec.parse_cipher("aes", mode)
    key = hashlib.sha512(f"{mode}{key_bytes}".encode()).digest()[:key_bytes]
    compiled = spec.sector_cipher(cipher_spec, key, sector_size)
    python = crypto.SectorCipher(cipher_spec, key, sector_size)
    assert isinstance(compiled, spec.AesSectors)
    for first in (0, 1, (1 << 32) - 2, (1 << 64) - 3):
        data = os.urandom(3 * sector_size)
        encrypted = compiled.encrypt(first, data)
        assert encrypted == python.encrypt(first, data)
        assert compiled.decrypt(first, data) == python.decrypt(first, data)
        assert compiled.decrypt(first, encrypted) == data


@native
@settings(max_examples=40, deadline=None)
@given(combination=st.sampled_from(COMBINATIONS), first=st.integers(0, (1 << 64) - 300),
       sectors=st.integers(1, 300), data=st.data())
def test_native_is_the_python_path_any_request(combination: tuple[str, int], first: int,
                                               sectors: int, data: st.DataObject) -> None:
    # (up to 300 sectors: past the size from which the GIL is released,
    # past crypto.CHUNK, where the Python path works in pieces, and past
    # one XTS group)
    mode, key_bytes = combination
    cipher_spec = spec.parse_cipher("aes", mode)
    key = data.draw(st.binary(min_size=key_bytes, max_size=key_bytes))
    request = os.urandom(sectors * 512)
    compiled = spec.sector_cipher(cipher_spec, key)
    python = crypto.SectorCipher(cipher_spec, key)
    assert compiled.encrypt(first, request) == python.encrypt(first, request)
    assert compiled.decrypt(first, bytearray(request)) == \
        python.decrypt(first, memoryview(request))


@native
def test_what_the_native_module_leaves_to_python() -> None:
    """Every block cipher but AES goes to the Python path."""
    camellia = spec.sector_cipher(spec.parse_cipher("camellia", "xts-plain64"), bytes(64))
    assert isinstance(camellia, crypto.SectorCipher)


@native
def test_xts_with_two_equal_key_halves() -> None:
    """(OpenSSL's own XTS refuses to encrypt with them; LUKS does not.)"""
    cipher_spec = spec.parse_cipher("aes", "xts-plain64")
    compiled = spec.sector_cipher(cipher_spec, bytes(64))
    assert isinstance(compiled, spec.AesSectors)
    data = os.urandom(2048)
    assert compiled.encrypt(3, data) == crypto.SectorCipher(cipher_spec, bytes(64)).encrypt(3, data)


@native
def test_native_refusals() -> None:
    cipher = spec.sector_cipher(spec.parse_cipher("aes", "xts-plain64"), bytes(range(64)))
    with pytest.raises(ValueError, match="not a whole number of sectors"):
        cipher.decrypt(0, bytes(511))
    with pytest.raises(OverflowError):
        cipher.decrypt(-1, bytes(512))
    with pytest.raises(OverflowError):
        cipher.decrypt(1 << 64, bytes(512))
    assert cipher.decrypt(5, b"") == b""
    for args, text in (
        (("gcm", "plain64", bytes(32), 512), "mode or IV generator"),
        (("cbc", "benbi", bytes(32), 512), "mode or IV generator"),
        (("ecb", "plain64", bytes(32), 512), "ECB alone"),
        (("cbc", "", bytes(32), 512), "ECB alone"),
        (("xts", "plain64", bytes(40), 512), "key size"),
        (("xts", "plain64", bytes(16), 512), "key size"),
        (("cbc", "plain64", bytes(20), 512), "key size"),
        (("cbc", "plain64", bytes(100), 512), "key size"),
        (("cbc", "plain64", bytes(32), 520), "sector size"),
        (("cbc", "plain64", bytes(32), 0), "sector size"),
        (("cbc", "essiv", bytes(32), 512), "ESSIV needs"),
        (("cbc", "essiv", bytes(32), 512, bytes(20)), "ESSIV needs"),
        (("cbc", "plain64", bytes(32), 512, bytes(32)), "only ESSIV"),
    ):
        with pytest.raises(ValueError, match=text):
            spec.AesSectors(*args)
    with pytest.raises(ValueError, match="not initialised"):
        spec.AesSectors.__new__(spec.AesSectors).decrypt(0, bytes(512))


@native
def test_threads_share_a_volume() -> None:
    """Requests in several threads at once (large ones run without the GIL)
    each use contexts of their own."""
    cipher_spec = spec.parse_cipher("aes", "cbc-essiv:sha256")
    key = bytes(range(32))
    compiled = spec.sector_cipher(cipher_spec, key)
    python = crypto.SectorCipher(cipher_spec, key)
    requests = [(index * 1000, os.urandom((1 + index) * 64 * 512)) for index in range(6)]
    expected = [python.encrypt(first, data) for first, data in requests]
    failures: list[int] = []

    def work(index: int) -> None:
        first, data = requests[index]
        for _ in range(20):
            if compiled.encrypt(first, data) != expected[index]:
                failures.append(index)
    threads = [threading.Thread(target=work, args=(index,)) for index in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures


@native
def test_an_aes_volume_needs_no_numpy() -> None:
    """Unlocking and reading an AES volume loads neither numpy nor crypto.py."""
    code = (
        "import sys, trio\n"
        "from imgfs.drivers.luks import luks1, spec\n"
        "new = luks1.format_header(spec.parse_cipher('aes', 'xts-plain64'), 64, 'sha256',"
        " b'pw', 1)\n"
        "image = bytearray(new.payload_offset)\n"
        "for offset, data in new.pieces: image[offset:offset + len(data)] = data\n"
        "async def read(offset, length): return bytes(image[offset:offset + length])\n"
        "header = luks1.parse_header(bytes(image[:luks1.HEADER_SIZE]), len(image))\n"
        "key = trio.run(header.unlock, read, b'pw')\n"
        "spec.sector_cipher(header.spec, key).decrypt(0, bytes(4096))\n"
        "print(sorted({'numpy', 'imgfs.drivers.luks.crypto'} & set(sys.modules)))\n")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout.strip()
    assert loaded == "[]"
