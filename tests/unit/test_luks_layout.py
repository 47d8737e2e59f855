"""LUKS pure code: struct sizes, the bulk sector ciphers against
`cryptography`'s own modes, tweak math, the AF splitter, header layout and
validation of damaged headers."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
import subprocess
import sys

import pytest
import trio
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st
from imgfs.drivers.luks import crypto, kdf, luks1, luks2
from imgfs.drivers.luks.create import CREATE_OPTS, create_spec

from imgfs.errors import CorruptImage, InvalidImage, PermissionDenied, Unsupported
from tests.conftest import REQUIRE_ORACLES

KEY64 = bytes(range(64))


def test_struct_sizes() -> None:
    assert luks1.PHDR.size == 208
    assert luks1.KEYSLOT.size == 48
    assert luks1.HEADER_SIZE == 592
    assert luks2.HDR_DISK.size == 512


def _xts_reference(key: bytes, first: int, data: bytes, sector_size: int,
                   plain: bool = False) -> bytes:
    parts = []
    for index in range(len(data) // sector_size):
        number = first + index
        if plain:
            number &= 0xFFFFFFFF
        tweak = number.to_bytes(16, "little")
        encryptor = Cipher(algorithms.AES(key), modes.XTS(tweak)).encryptor()
        parts.append(encryptor.update(data[index * sector_size:(index + 1) * sector_size]))
    return b"".join(parts)


@settings(max_examples=30, deadline=None)
@given(first=st.one_of(st.integers(0, 1 << 20), st.integers((1 << 32) - 8, (1 << 32) + 8),
                       st.integers((1 << 64) - 40, (1 << 64) - 20)),
       sectors=st.integers(1, 20), sector_size=st.sampled_from([512, 4096]),
       key_bytes=st.sampled_from([32, 64]))
def test_bulk_xts_matches_cryptography(first: int, sectors: int, sector_size: int,
                                       key_bytes: int) -> None:
    key = hashlib.sha512(bytes([first % 251, sectors])).digest()[:key_bytes]
    data = os.urandom(sectors * sector_size)
    cipher = crypto.SectorCipher(crypto.parse_cipher("aes", "xts-plain64"), key, sector_size)
    encrypted = cipher.encrypt(first, data)
    assert encrypted == _xts_reference(key, first, data, sector_size)
    assert cipher.decrypt(first, encrypted) == data


def test_plain_iv_wraps_at_32_bits() -> None:
    data = os.urandom(4 * 512)
    cipher = crypto.SectorCipher(crypto.parse_cipher("aes", "xts-plain"), KEY64)
    first = (1 << 32) - 2
    assert cipher.encrypt(first, data) == _xts_reference(KEY64, first, data, 512, plain=True)


def test_large_request_is_chunked_consistently() -> None:
    data = os.urandom(crypto.CHUNK * 2 + 3 * 512)
    cipher = crypto.SectorCipher(crypto.parse_cipher("aes", "xts-plain64"), KEY64)
    assert cipher.encrypt(9, data) == _xts_reference(KEY64, 9, data, 512)


def _gf_double(value: int) -> int:
    value <<= 1
    return (value ^ 0x87) & ((1 << 128) - 1) if value >> 128 else value


@given(st.binary(min_size=16, max_size=16), st.sampled_from([32, 256, 40]))
def test_xts_tweaks_are_alpha_powers(start: bytes, blocks: int) -> None:
    tweaks = crypto.xts_tweaks(start, blocks)
    value = int.from_bytes(start, "little")
    for index in range(blocks):
        assert tweaks[0, index].tobytes() == value.to_bytes(16, "little")
        value = _gf_double(value)


@pytest.mark.parametrize("name,key", [("aes", KEY64[:32]), ("aes", KEY64[:16]),
                                      ("cast5", KEY64[:16]), ("camellia", KEY64[:32])])
def test_cbc_matches_cryptography(name: str, key: bytes) -> None:
    algorithm = crypto.ALGORITHMS[name]
    data = os.urandom(3 * 512)
    cipher = crypto.SectorCipher(crypto.parse_cipher(name, "cbc-plain64"), key)
    expected = b""
    for index in range(3):
        iv = (7 + index).to_bytes(8, "little").ljust(algorithm.block_size, b"\0")
        encryptor = Cipher(algorithm.factory(key), modes.CBC(iv)).encryptor()
        expected += encryptor.update(data[index * 512:(index + 1) * 512])
    assert cipher.encrypt(7, data) == expected
    assert cipher.decrypt(7, expected) == data


def test_essiv_iv_is_encrypted_sector_number() -> None:
    key = KEY64[:16]
    data = os.urandom(2 * 512)
    cipher = crypto.SectorCipher(crypto.parse_cipher("aes", "cbc-essiv:sha256"), key)
    essiv_key = hashlib.sha256(key).digest()
    expected = b""
    for sector in (5, 6):
        iv = Cipher(algorithms.AES(essiv_key), modes.ECB()).encryptor().update(
            sector.to_bytes(16, "little"))
        expected += Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor().update(
            data[(sector - 5) * 512:(sector - 4) * 512])
    assert cipher.encrypt(5, data) == expected


def test_ctr_counter_carries_across_64_bits() -> None:
    ivs = crypto.np.array([[0xFFFFFFFFFFFFFFFF, 0xFFFFFFFFFFFFFFFF]], dtype="<u8")
    counters = crypto.ctr_blocks(ivs.byteswap(), 3).tobytes()
    assert counters[:16] == b"\xff" * 16
    assert counters[16:32] == bytes(16)            # wraps as one 128-bit number
    assert counters[32:48] == bytes(15) + b"\x01"
    data = os.urandom(2 * 512)
    cipher = crypto.SectorCipher(crypto.parse_cipher("aes", "ctr-plain64"), KEY64[:32])
    iv = (3).to_bytes(8, "little") + bytes(8)
    expected = Cipher(algorithms.AES(KEY64[:32]), modes.CTR(iv)).encryptor().update(data[:512])
    assert cipher.encrypt(3, data)[:512] == expected


@pytest.mark.parametrize("mode", ["ecb", "ecb-plain64", "cbc-plain", "ctr-plain64",
                                  "xts-essiv:sha256", "cbc-null"])
def test_round_trip_every_mode(mode: str) -> None:
    key = KEY64 if mode.startswith("xts") else KEY64[:32]
    cipher = crypto.SectorCipher(crypto.parse_cipher("aes", mode), key)
    data = os.urandom(4 * 512)
    assert cipher.decrypt(11, cipher.encrypt(11, data)) == data


@pytest.mark.parametrize("name,mode,error,text", [
    ("cast6", "xts-plain64", Unsupported, "cipher not supported: cast6"),
    ("anubis", "cbc-plain", Unsupported, "cipher not supported: anubis"),
    ("aes", "xts-plain64:whirlpool", Unsupported, "hash not supported: whirlpool"),
    ("aes", "gcm-plain64", Unsupported, "cipher mode not supported"),
    ("aes", "cbc-benbi", Unsupported, "IV generator not supported: benbi"),
    ("aes", "cbc-essiv:sha1", Unsupported, "160-bit key"),
    ("cast5", "xts-plain64", Unsupported, "128-bit block cipher"),
    ("aes", "cbc-essiv:whirlpool", Unsupported, "hash not supported: whirlpool"),
    ("a\x01", "cbc-plain", InvalidImage, "invalid cipher name"),
])
def test_cipher_refusals(name: str, mode: str, error: type, text: str) -> None:
    with pytest.raises(error, match=text):
        crypto.parse_cipher(name, mode)


def test_parse_luks2_encryption() -> None:
    spec = crypto.parse_encryption("aes-cbc-essiv:sha256")
    assert (spec.algorithm.name, spec.mode, spec.ivgen, spec.ivgen_hash) == \
        ("aes", "cbc", "essiv", "sha256")
    assert str(spec) == "aes-cbc-essiv:sha256"
    with pytest.raises(InvalidImage):
        crypto.parse_encryption("aes")


@pytest.mark.parametrize("hash_name", ["sha1", "sha256", "sha512"])
def test_af_split_merge_round_trip(hash_name: str) -> None:
    key = os.urandom(32)
    split = kdf.af_split(key, 50, hash_name)
    assert len(split) == 50 * 32
    assert kdf.af_merge(split, 32, 50, hash_name) == key
    damaged = bytes([split[0] ^ 1]) + split[1:]
    assert kdf.af_merge(damaged, 32, 50, hash_name) != key


def test_diffuse_hashes_indexed_pieces() -> None:
    block = bytes(range(40))                      # sha256: one full piece, one of 8
    expected = hashlib.sha256(b"\0\0\0\0" + block[:32]).digest() + \
        hashlib.sha256(b"\0\0\0\1" + block[32:]).digest()[:8]
    assert kdf.diffuse(block, "sha256") == expected


def test_calibration_has_the_luks_minimum() -> None:
    assert kdf.calibrate_pbkdf2("sha256", 32, 1) >= kdf.MIN_PBKDF2_ITERATIONS


# -- the native module (_kdf.c): the same results as `cryptography` and kdf.py ----------


def test_the_native_module_is_built() -> None:
    """make test builds it (setup.py); a silent fallback would leave its
    code untested and every open on one core."""
    if not kdf.NATIVE_HASHES:
        message = "imgfs.drivers.luks._kdf is not built (no compiler or libssl-dev?)"
        if REQUIRE_ORACLES:
            pytest.fail(message)
        pytest.skip(message)
    assert sorted(kdf.NATIVE_HASHES) == ["sha1", "sha224", "sha256", "sha384", "sha512"]


NATIVE = sorted(kdf.NATIVE_HASHES) or ["sha256"]
native = pytest.mark.skipif(not kdf.NATIVE_HASHES, reason="the native module is not built")


@native
@settings(max_examples=150, deadline=None)
@given(hash_name=st.sampled_from(NATIVE), passphrase=st.binary(max_size=300),
       salt=st.binary(max_size=80), iterations=st.integers(1, 300),
       length=st.integers(1, 200))
def test_native_pbkdf2_is_cryptographys(hash_name: str, passphrase: bytes, salt: bytes,
                                         iterations: int, length: int) -> None:
    # (keys longer than the hash's block are hashed first; lengths of one,
    # several and a part digest; the blocks come from several threads)
    assert kdf.pbkdf2(hash_name.upper(), passphrase, salt, iterations, length) == \
        kdf.one_core_pbkdf2(hash_name, passphrase, salt, iterations, length)


@native
@pytest.mark.parametrize("threads", [1, 2, 3, 7, 64, 1000])
def test_native_pbkdf2_shares_blocks_among_threads(threads: int) -> None:
    from imgfs.drivers.luks import _kdf
    # SHA-1, 300 bytes: 15 blocks, shared round-robin among up to 64 threads
    assert _kdf.pbkdf2("sha1", b"pass", b"salt", 50, 300, threads) == \
        kdf.one_core_pbkdf2("sha1", b"pass", b"salt", 50, 300)


@native
@settings(max_examples=150, deadline=None)
@given(hash_name=st.sampled_from(NATIVE), key_size=st.integers(1, 130),
       stripes=st.integers(1, 12), data=st.data())
def test_native_af_merge_is_kdf_pys(hash_name: str, key_size: int, stripes: int,
                                    data: st.DataObject) -> None:
    material = data.draw(st.binary(min_size=key_size * stripes,
                                   max_size=key_size * stripes + 20))
    assert kdf.af_merge(material, key_size, stripes, hash_name) == \
        kdf.python_af_merge(material, key_size, stripes, hash_name)


@native
def test_native_module_refuses_what_it_cannot_do() -> None:
    from imgfs.drivers.luks import _kdf
    with pytest.raises(ValueError, match="no native code for hash md5"):
        _kdf.pbkdf2("md5", b"k", b"s", 1, 32, 2)
    for iterations, length, threads in ((0, 32, 1), (-1, 32, 1), (1, 0, 1), (1, -1, 1),
                                        (1, 2**20 + 1, 1), (1, 32, 0), (1, 32, -2)):
        with pytest.raises(ValueError, match="iterations, length .to 2..20. and threads"):
            _kdf.pbkdf2("sha256", b"k", b"s", iterations, length, threads)
    with pytest.raises(OverflowError):              # not wrapped into a 2**64 loop
        _kdf.pbkdf2("sha256", b"k", b"s", 2**64 - 1, 32, 1)
    with pytest.raises(ValueError, match="fewer bytes than the stripes"):
        _kdf.af_merge(bytes(63), 32, 2, "sha256")
    with pytest.raises(ValueError, match="no native code for hash md5"):
        _kdf.af_merge(bytes(64), 32, 2, "md5")
    # hashes it does not know go to `cryptography`, as before
    assert kdf.pbkdf2("md5", b"k", b"s", 2, 40) == kdf.one_core_pbkdf2("md5", b"k", b"s", 2, 40)


def test_calibration_times_the_one_core_pbkdf2(monkeypatch) -> None:
    """iter-time is what cryptsetup and QEMU will spend opening the image:
    imgfs's own split derivation must not be what is timed."""
    def split(*args: object) -> bytes:
        raise AssertionError("calibration used the native, multi-core PBKDF2")
    monkeypatch.setattr(kdf, "pbkdf2", split)
    monkeypatch.setattr(kdf, "native_pbkdf2", split, raising=False)
    assert kdf.calibrate_pbkdf2("sha256", 64, 1) >= kdf.MIN_PBKDF2_ITERATIONS


def test_slot_layout_matches_qemu() -> None:
    # qemu-img create -f luks (aes-256-xts): key slots every 258048 bytes
    # from 4096, payload at 2068480 (as `qemu-img info` reports them).
    offsets = [sector * 512 for sector in luks1.slot_layout(64)]
    assert offsets == [4096 + index * 258048 for index in range(8)]
    assert offsets[-1] + 258048 == 2068480


def test_create_spec_names() -> None:
    options = CREATE_OPTS.parse({"cipher-alg": "aes-128", "cipher-mode": "cbc",
                                 "ivgen-alg": "essiv"})
    spec, key_bytes = create_spec(options)
    assert (spec.mode_string, key_bytes) == ("cbc-essiv:sha256", 16)
    spec, key_bytes = create_spec(CREATE_OPTS.parse({}))
    assert (str(spec), key_bytes) == ("aes-xts-plain64", 64)
    spec, key_bytes = create_spec(CREATE_OPTS.parse({"cipher-alg": "twofish-192"}))
    assert (str(spec), key_bytes) == ("twofish-xts-plain64", 48)


# -- LUKS1 headers built in memory --------------------------------------------------


@pytest.fixture(scope="module")
def small_luks1() -> tuple[bytearray, bytes]:
    spec = crypto.parse_cipher("aes", "xts-plain64")
    new = luks1.format_header(spec, 64, "sha256", b"secret", 1)
    image = bytearray(new.payload_offset + 4096)
    for offset, data in new.pieces:
        image[offset:offset + len(data)] = data
    return image, new.volume_key


def _reader(image: bytes | bytearray):
    async def read(offset: int, length: int) -> bytes:
        return bytes(image[offset:offset + length])
    return read


def test_new_header_unlocks(small_luks1: tuple[bytearray, bytes]) -> None:
    image, volume_key = small_luks1
    header = luks1.parse_header(bytes(image[:luks1.HEADER_SIZE]), len(image))
    assert header.active_slots() == [0]
    assert header.payload_size(len(image)) == 4096
    assert trio.run(header.unlock, _reader(image), b"secret") == volume_key
    with pytest.raises(PermissionDenied, match="no key slot matches this passphrase"):
        trio.run(header.unlock, _reader(image), b"wrong")


def _patch_slot(image: bytearray, index: int, **fields: int) -> bytes:
    raw = bytearray(image[:luks1.HEADER_SIZE])
    offset = luks1.PHDR.size + index * luks1.KEYSLOT.size
    slot = luks1.KeySlot._make(luks1.KEYSLOT.unpack_from(raw, offset))._replace(**fields)
    raw[offset:offset + luks1.KEYSLOT.size] = slot.pack()
    return bytes(raw)


@pytest.mark.parametrize("fields,error,text", [
    ({"stripes": 4001}, InvalidImage, "4001 stripes"),
    ({"stripes": 0}, InvalidImage, "0 stripes"),
    ({"key_material_offset": 0}, InvalidImage, "outside the"),
    ({"key_material_offset": 1 << 30}, InvalidImage, "outside the"),
    ({"iterations": 4_000_000_000}, InvalidImage, "would hang the open"),
    ({"active": 0x1234}, CorruptImage, "invalid state"),
])
def test_damaged_key_slots(small_luks1: tuple[bytearray, bytes], fields: dict[str, int],
                           error: type, text: str) -> None:
    image, _ = small_luks1
    with pytest.raises(error, match=text):
        luks1.parse_header(_patch_slot(image, 0, **fields), len(image))


def test_overlapping_slots_and_payload(small_luks1: tuple[bytearray, bytes]) -> None:
    image, _ = small_luks1
    slot0 = luks1.KeySlot._make(luks1.KEYSLOT.unpack_from(image, luks1.PHDR.size))
    patched = bytearray(_patch_slot(image, 3, **slot0._asdict()))
    with pytest.raises(CorruptImage, match="overlap"):
        luks1.parse_header(bytes(patched), len(image))
    header = luks1.parse_header(bytes(image[:luks1.HEADER_SIZE]), len(image))
    with pytest.raises(InvalidImage, match="beyond the end"):
        header.payload_size(1000)


def test_bad_magic_and_version(small_luks1: tuple[bytearray, bytes]) -> None:
    image, _ = small_luks1
    with pytest.raises(InvalidImage, match="bad magic"):
        luks1.parse_header(b"XXXX" + bytes(image[4:luks1.HEADER_SIZE]), len(image))
    raw = bytearray(image[:luks1.HEADER_SIZE])
    raw[6:8] = struct.pack(">H", 3)
    with pytest.raises(InvalidImage, match="version 3"):
        luks1.parse_header(bytes(raw), len(image))


# -- LUKS2 metadata -----------------------------------------------------------------


def luks2_image(metadata: dict, hdr_size: int = 16384, damage: str = "") -> bytes:
    """Two checksummed header copies around `metadata` (no key material)."""
    copies = []
    for index, magic in enumerate((luks2.LUKS2_MAGIC_1ST, luks2.LUKS2_MAGIC_2ND)):
        hdr = luks2.HdrDisk(magic, 2, hdr_size, 1, bytes(48), b"sha256", bytes(64),
                            b"11111111-2222-3333-4444-555555555555", bytes(48),
                            index * hdr_size, bytes(184), bytes(64))
        area = bytearray(HDR_PACK(hdr) + bytes(luks2.LUKS2_HDR_BIN_LEN - 512))
        area += json.dumps(metadata).encode().ljust(hdr_size - len(area), b"\0")
        area[448:480] = hashlib.sha256(bytes(area)).digest()
        copies.append(bytes(area))
    if "primary" in damage:
        copies[0] = copies[0][:600] + b"X" + copies[0][601:]
    if "secondary" in damage:
        copies[1] = copies[1][:600] + b"X" + copies[1][601:]
    return b"".join(copies) + bytes(4 * 1024 * 1024)


def HDR_PACK(hdr: luks2.HdrDisk) -> bytes:
    return luks2.HDR_DISK.pack(*hdr)


def metadata(**changes: object) -> dict:
    salt = base64.b64encode(bytes(32)).decode()
    data = {
        "keyslots": {"0": {"type": "luks2", "key_size": 64,
                           "af": {"type": "luks1", "stripes": 4000, "hash": "sha256"},
                           "area": {"type": "raw", "offset": "32768", "size": "258048",
                                    "encryption": "aes-xts-plain64", "key_size": 64},
                           "kdf": {"type": "argon2id", "time": 4, "memory": 32768,
                                   "cpus": 1, "salt": salt}}},
        "tokens": {},
        "segments": {"0": {"type": "crypt", "offset": "16777216", "size": "dynamic",
                           "iv_tweak": "0", "encryption": "aes-xts-plain64",
                           "sector_size": 4096}},
        "digests": {"0": {"type": "pbkdf2", "keyslots": ["0"], "segments": ["0"],
                          "hash": "sha256", "iterations": 1000, "salt": salt,
                          "digest": salt}},
        "config": {"json_size": "12288", "keyslots_size": "16744448"},
    }
    for path, value in changes.items():
        node = data
        keys = path.split("__")
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
    return data


def parse2(image: bytes):
    return trio.run(luks2.parse_header, _reader(image), len(image))


def test_luks2_metadata_parses() -> None:
    header = parse2(luks2_image(metadata()))
    assert header.sector_size == 4096
    assert header.payload_offset == 16777216
    assert [slot.kdf.kind for slot in header.keyslots] == ["argon2id"]


@pytest.mark.parametrize("damage", ["primary", "secondary"])
def test_luks2_one_damaged_copy_is_tolerated(damage: str) -> None:
    assert parse2(luks2_image(metadata(), damage=damage)).sector_size == 4096


def test_luks2_both_copies_damaged() -> None:
    with pytest.raises(CorruptImage, match="both LUKS2 header copies"):
        parse2(luks2_image(metadata(), damage="primary,secondary"))


@pytest.mark.parametrize("changes,error,text", [
    ({"segments__0__integrity": {"type": "hmac(sha256)"}}, Unsupported, "integrity"),
    ({"config__requirements": {"mandatory": ["online-reencrypt-v2"]}}, Unsupported,
     "reencryption is in progress"),
    ({"keyslots__0__type": "reencrypt"}, Unsupported, "reencryption"),
    ({"segments__0__type": "linear"}, Unsupported, "segment type 'linear'"),
    ({"segments__0__sector_size": 3000}, InvalidImage, "sector size 3000"),
    ({"segments__0__encryption": "cast6-xts-plain64"}, Unsupported,
     "cipher not supported: cast6"),
    ({"keyslots__0__kdf__memory": 1 << 40}, InvalidImage, "beyond what imgfs accepts"),
    ({"keyslots__0__kdf__type": "scrypt"}, Unsupported, "scrypt"),
    ({"keyslots__0__area__offset": "0"}, InvalidImage, "outside the keyslots area"),
    ({"keyslots__0__af__stripes": 1 << 40}, InvalidImage, "stripes out of range"),
    ({"digests__0__iterations": 1 << 40}, InvalidImage, "PBKDF2 iterations"),
    ({"segments__0__offset": "4096"}, InvalidImage, "overlaps the keyslots area"),
])
def test_luks2_refusals(changes: dict, error: type, text: str) -> None:
    with pytest.raises(error, match=text):
        parse2(luks2_image(metadata(**changes)))


def test_created_luks2_headers_parse_back() -> None:
    from imgfs.drivers.luks import create
    options = CREATE_OPTS.parse({"format": "luks2", "pbkdf": "pbkdf2", "iter-time": 1,
                                 "sector-size": 4096})
    new = create.format_header(options, b"pw")
    image = bytearray(new.payload_offset + 8192)
    for offset, data in new.pieces:
        image[offset:offset + len(data)] = data
    header = parse2(bytes(image))
    assert (header.sector_size, header.payload_size(len(image))) == (4096, 8192)
    assert trio.run(header.unlock, _reader(image), b"pw") == new.volume_key
    hdr, _ = luks2.check_copy(bytes(image[16384:32768]), luks2.LUKS2_MAGIC_2ND)
    assert hdr.hdr_offset == 16384


def test_payload_inside_the_header_is_refused(small_luks1: tuple[bytearray, bytes]) -> None:
    image, _ = small_luks1
    raw = bytearray(image[:luks1.HEADER_SIZE])
    raw[104:108] = struct.pack(">I", 0)          # cryptsetup --header: data elsewhere
    header = luks1.parse_header(bytes(raw), len(image))
    with pytest.raises(InvalidImage, match="detached header"):
        header.payload_size(len(image))


# -- early key derivation (luks.early): a head start that changes no result --------------


def test_a_call_started_ahead_is_taken_once() -> None:
    from imgfs.drivers.luks.early import AheadOfNeed
    calls: list[tuple[int, int]] = []

    def power(base: int, exponent: int) -> int:
        calls.append((base, exponent))
        return base ** exponent
    ahead = AheadOfNeed("test")
    ahead.start(power, 3, 4)
    assert ahead.call(power, 3, 4) == 81 and calls == [(3, 4)]
    assert ahead.call(power, 3, 4) == 81 and calls == [(3, 4), (3, 4)]   # taken, not kept
    ahead.start(pow, 3, 4)                         # another function: another call
    assert ahead.call(power, 3, 4) == 81 and len(calls) == 3
    ahead.start(divmod, 1, 0)
    with pytest.raises(ZeroDivisionError):             # the taker gets the error
        ahead.call(divmod, 1, 0)
    ahead.start(power, 2, 2)
    ahead.forget(lambda args: args[0] in (2, 3))
    assert not ahead.started


def test_early_unlocking_of_a_mount_source(small_luks1: tuple[bytearray, bytes],
                                           tmp_path, slot_openings: list[bytes]) -> None:
    from imgfs.drivers.luks import early

    from imgfs.mount import MountOptions
    image, volume_key = small_luks1
    path = tmp_path / "disk.luks"
    path.write_bytes(image)
    opts = MountOptions(key_secret="k", secrets={"k": b"secret"})
    early.start_unlocking(["json:{}", str(tmp_path / "missing"), str(path)], opts)
    header = luks1.parse_header(bytes(image[:luks1.HEADER_SIZE]), len(image))
    [(function, started_header, slot, _, passphrase)] = list(early.EARLY.started)
    assert function is luks1.open_slot
    assert (started_header, slot, passphrase) == (header, header.slots[0], b"secret")
    # the open takes it: the slot was opened once, by the early thread
    assert trio.run(header.unlock, _reader(image), b"secret") == volume_key
    assert not early.EARLY.started and slot_openings == [b"secret"]
    # a wrong passphrase's open forgets it
    early.start_unlocking([str(path)], MountOptions(key_secret="k", secrets={"k": b"no"}))
    with pytest.raises(PermissionDenied):
        trio.run(header.unlock, _reader(image), b"no")
    assert not early.EARLY.started
    early.start_unlocking([str(path)], MountOptions())     # no secret: nothing to start
    early.start_unlocking([str(path)], MountOptions(fmt="raw", key_secret="k",
                                                    secrets={"k": b"secret"}))
    assert not early.EARLY.started


def test_truncated_key_material_is_named(small_luks1: tuple[bytearray, bytes]) -> None:
    """Both versions' unlock (one loop, early.try_slots) name the slot whose
    key material the image cuts short."""
    from imgfs.drivers.luks import create
    image, _ = small_luks1
    header = luks1.parse_header(bytes(image[:luks1.HEADER_SIZE]), len(image))
    [first] = header.slots_to_try()
    with pytest.raises(CorruptImage, match="^key slot 0: key material is truncated$"):
        trio.run(header.unlock, _reader(image[:first.start + 10]), b"secret")
    options = CREATE_OPTS.parse({"format": "luks2", "pbkdf": "pbkdf2", "iter-time": 1})
    new = create.format_header(options, b"pw")
    image2 = bytearray(new.payload_offset)
    for offset, data in new.pieces:
        image2[offset:offset + len(data)] = data
    header2 = parse2(bytes(image2))
    [first2] = header2.slots_to_try()
    with pytest.raises(CorruptImage, match="^keyslot 0: key material is truncated$"):
        trio.run(header2.unlock, _reader(image2[:first2.start + 10]), b"pw")


def test_early_unlocking_of_a_luks2_source(tmp_path, slot_openings: list[bytes],
                                           caplog: pytest.LogCaptureFixture) -> None:
    from imgfs.drivers.luks import create, early

    from imgfs.mount import MountOptions
    options = CREATE_OPTS.parse({"format": "luks2", "pbkdf": "pbkdf2", "iter-time": 1})
    new = create.format_header(options, b"pw")
    image = bytearray(new.payload_offset + 4096)
    for offset, data in new.pieces:
        image[offset:offset + len(data)] = data
    image[4096 + 10:4096 + 14] = b"AAAA"         # the primary copy's JSON damaged
    path = tmp_path / "disk.luks"
    path.write_bytes(image)
    early.start_unlocking([str(path)], MountOptions(key_secret="k", secrets={"k": b"pw"}))
    [(function, header, slot, _, _)] = list(early.EARLY.started)
    assert function is luks2.open_slot and slot == header.slots_to_try()[0].slot
    assert not caplog.records                    # (the open warns, once)
    assert trio.run(parse2(bytes(image)).unlock, _reader(image), b"pw") == new.volume_key
    assert not early.EARLY.started and slot_openings == [b"pw"]
    assert [r.getMessage()[:30] for r in caplog.records] == ["LUKS2 header copy damaged, usi"]


def test_the_early_start_loads_no_heavy_module() -> None:
    """What must load before a mount's PBKDF can start (the early path up
    to the header parse) stays light: `cryptography` and numpy load beside
    the derivation, not before it."""
    code = ("import sys; from imgfs.drivers.luks import early, luks1, luks2; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'cryptography', 'numpy', 'trio', 'pyfuse3'}))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout.strip()
    assert loaded == "[]"


def test_inline_secret_spans() -> None:
    from imgfs.secrets import _inline_secret_spans
    cmdline = b"\0".join([b"imgfs", b"mount", b"--object", b"secret,id=a,data=one,,two,format=raw",
                          b"--object=secret,data=x,id=b", b"-o", b"data=notasecret",
                          b"--object", b"secret,id=c,file=/p", b""])
    found = [cmdline[start:end] for start, end in _inline_secret_spans(cmdline)]
    assert found == [b"one,,two", b"x"]
