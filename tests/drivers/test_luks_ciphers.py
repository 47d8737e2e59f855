"""Every LUKS cipher, mode and IV generator QEMU accepts, both ways: an
image per combination made by ``qemu-img create -f luks`` and written by
qemu-io, read and rewritten by imgfs, then read back by QEMU; and the same
combinations created by imgfs, then unlocked, written and read by QEMU.
Also: the CLI (info, convert, create) and a real mount on serpent and
twofish, qcow2 ``encrypt.format=luks`` with twofish, and cryptsetup on
what imgfs creates.

The combinations were found by running qemu-img 7.2: aes, serpent and
twofish in 128/192/256 bits with ecb, cbc, ctr, xts and the plain,
plain64, essiv IV generators (essiv with md5 or sha256, whose digests are
key sizes these ciphers take); cast5-128 without xts (a 64-bit block) and
with essiv:md5 only; 192-bit keys in xts only (qemu-img 7.2 trips an
assertion on the 96000-byte key material of 192-bit keys in the other
modes).  QEMU refuses 3des, des, sm4 and the benbi and null IV
generators for LUKS.  qemu-img creates in milliseconds with the
`fast_qemu_pbkdf` environment (tests/fake_rusage.c).
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import trio

from imgfs.graph import create_image
from imgfs.node import OpenContext
from tests.conftest import imgfs, mounted, need, pwrite_all, random_bytes, run
from tests.drivers.test_luks import (
    PASS,
    SECRET,
    json_source,
    luks_opts,
    qemu_contents,
    read_all,
    write_at,
)

MiB = 1 << 20
SIZE = MiB


def _combinations() -> list[str]:
    """qemu-img's -o for every combination QEMU 7.2 accepts (see above)."""
    cases = []
    for name, bits_list in (("aes", (128, 192, 256)), ("serpent", (128, 192, 256)),
                            ("twofish", (128, 192, 256)), ("cast5", (128,))):
        for bits in bits_list:
            modes = ("xts",) if bits == 192 else ("ecb", "cbc", "ctr") if name == "cast5" \
                else ("ecb", "cbc", "ctr", "xts")
            for mode in modes:
                for ivgen in ("plain", "plain64", "essiv"):
                    options = f"cipher-alg={name}-{bits},cipher-mode={mode},ivgen-alg={ivgen}"
                    if ivgen == "essiv":
                        md5 = name == "cast5" or (bits == 128 and mode in ("cbc", "ctr"))
                        options += f",ivgen-hash-alg={'md5' if md5 else 'sha256'}"
                    cases.append(options)
    return cases


COMBINATIONS = _combinations()

#: written by qemu-io, out of order and unaligned: (offset, length, pattern)
QEMU_WRITES = [(0, SIZE, 0xA5), (700_001, 5000, 0x77), (4096, 1536, 0x3C), (511, 2, 0x11)]
IMGFS_WRITES = [(SIZE - 700, random_bytes(700, seed=1)), (3, b"head" * 100),
                (65_536 - 5, random_bytes(70_000, seed=2)), (512 * 9, b"\x00" * 512)]


def qemu_create(path: Path, options: str, env: dict[str, str], fmt: str = "luks",
                size: int = SIZE) -> None:
    prefix = "encrypt." if fmt == "qcow2" else ""
    opts = [f"{prefix}{option}" for option in options.split(",")] if options else []
    opts += [f"{prefix}key-secret=sec0", f"{prefix}iter-time=10"]
    if fmt == "qcow2":
        opts += ["encrypt.format=luks", "cluster_size=65536"]
    run("qemu-img", "create", "-q", "-f", fmt, *SECRET, "-o", ",".join(opts), path, str(size),
        env=env)


def imgfs_create(path: Path, options: str) -> None:
    """imgfs's create in this process (the CLI costs an interpreter start)."""
    parsed = dict(option.split("=") for option in options.split(","))
    parsed.update({"key-secret": "sec0", "iter-time": "10"})
    trio.run(create_image, str(path), "luks", SIZE, parsed,
             OpenContext(read_only=False, secrets={"sec0": PASS.encode()}, key_secret="sec0"))


def qemu_writes(path: Path, opts: str) -> bytearray:
    """QEMU_WRITES through qemu-io; returns what the payload now holds."""
    commands = [arg for offset, length, pattern in QEMU_WRITES
                for arg in ("-c", f"write -P {pattern:#x} {offset} {length}")]
    run("qemu-io", *SECRET, "--image-opts", opts, *commands)
    expected = bytearray(SIZE)
    for offset, length, pattern in QEMU_WRITES:
        expected[offset:offset + length] = bytes([pattern]) * length
    return expected


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def exchange(image: Path, tmp_path: Path) -> None:
    """QEMU writes, imgfs reads what QEMU wrote; imgfs writes, QEMU reads."""
    expected = qemu_writes(image, luks_opts(image))
    assert read_all(image) == expected
    write_at(image, IMGFS_WRITES, expected)
    assert qemu_contents(image, tmp_path) == expected


@pytest.mark.parametrize("options", COMBINATIONS)
def test_qemu_images(tmp_path: Path, fast_qemu_pbkdf: dict[str, str], options: str) -> None:
    need("qemu-img", "qemu-io")
    image = tmp_path / "disk.luks"
    qemu_create(image, options, fast_qemu_pbkdf)
    exchange(image, tmp_path)


@pytest.mark.parametrize("options", COMBINATIONS)
def test_imgfs_images(tmp_path: Path, options: str) -> None:
    """QEMU unlocks what imgfs created and writes it; imgfs reads that.
    (imgfs's writes in this combination: test_qemu_images.)"""
    need("qemu-img", "qemu-io")
    image = tmp_path / "disk.luks"
    imgfs_create(image, options)
    expected = qemu_writes(image, luks_opts(image))
    assert read_all(image) == expected


#: one of each cipher, and the header spellings that need care: QEMU writes
#: "ecb-essiv:sha256" for ecb with essiv, "xts-plain64:sha256" when given a
#: hash for plain64
CLI_CASES = [
    "cipher-alg=serpent-256,cipher-mode=xts,ivgen-alg=plain64",
    "cipher-alg=twofish-192,cipher-mode=xts,ivgen-alg=essiv,ivgen-hash-alg=sha256",
    "cipher-alg=twofish-256,cipher-mode=ecb,ivgen-alg=essiv,ivgen-hash-alg=sha256",
    "cipher-alg=serpent-128,cipher-mode=cbc,ivgen-alg=plain64,ivgen-hash-alg=sha256",
    "cipher-alg=cast5-128,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=md5",
]


@pytest.mark.parametrize("options", CLI_CASES)
def test_cli_info_and_convert(in_tmp: Path, fast_qemu_pbkdf: dict[str, str],
                              options: str) -> None:
    need("qemu-img", "qemu-io")
    image = in_tmp / "disk.luks"
    qemu_create(image, options, fast_qemu_pbkdf)
    expected = qemu_writes(image, luks_opts(image))
    for output in ("human", "json"):
        theirs = run("qemu-img", "info", "--output", output, image.name).stdout
        assert imgfs("info", "--output", output, image.name).stdout == theirs
    imgfs("convert", "-O", "raw", *SECRET, json_source(image), "out.raw")
    assert (in_tmp / "out.raw").read_bytes() == expected


CREATE_CASES = [
    ("cipher-alg=serpent-256", "serpent", "xts-plain64", 512),
    ("cipher-alg=twofish-128,cipher-mode=cbc,ivgen-alg=essiv", "twofish", "cbc-essiv:sha256",
     128),
    ("cipher-alg=cast5-128,cipher-mode=cbc,ivgen-alg=plain64", "cast5", "cbc-plain64", 128),
    ("cipher-alg=serpent-192,cipher-mode=xts,ivgen-alg=essiv,ivgen-hash-alg=md5", "serpent",
     "xts-essiv:md5", 384),
]


@pytest.mark.parametrize("options,name,mode,bits", CREATE_CASES)
def test_created_images_in_cryptsetup_and_qemu(tmp_path: Path, options: str, name: str,
                                               mode: str, bits: int) -> None:
    """imgfs create (the CLI): cryptsetup reads the header as written, QEMU
    unlocks, writes and reads it."""
    need("qemu-img", "qemu-io", "cryptsetup")
    image = tmp_path / "new.luks"
    imgfs("create", "-f", "luks", *SECRET, "-o", f"key-secret=sec0,iter-time=10,{options}",
          image, str(SIZE))
    dump = run("cryptsetup", "luksDump", image).stdout
    assert f"Cipher name:   \t{name}\n" in dump and f"Cipher mode:   \t{mode}\n" in dump
    assert f"MK bits:       \t{bits}\n" in dump
    exchange(image, tmp_path)


@pytest.mark.parametrize("options", [case[0] for case in CREATE_CASES] + [
    "format=luks2,pbkdf=pbkdf2,cipher-alg=twofish-256"])
def test_created_images_unlock_in_cryptsetup(tmp_path: Path, options: str) -> None:
    need("cryptsetup")
    image = tmp_path / "new.luks"
    imgfs_create(image, options)
    cryptsetup_unlocks(image, tmp_path)


def cryptsetup_unlocks(image: Path, tmp_path: Path) -> None:
    """cryptsetup open --test-passphrase.  cryptsetup decrypts key slots with
    the kernel's crypto API, falling back to a dm-crypt device (Debian's
    libcryptsetup uses OpenSSL, which has no serpent or twofish; LUKS2 key
    slots need the kernel's): a kernel with neither the cipher nor dm-crypt
    cannot say, and the check is skipped."""
    key_file = tmp_path / "pass.key"
    key_file.write_text(PASS)
    result = subprocess.run(["cryptsetup", "open", "--test-passphrase",
                             f"--key-file={key_file}", str(image)],
                            capture_output=True, text=True, check=False)
    if result.returncode and any(reason in result.stderr for reason in (
            "Cannot initialize device-mapper", "cipher for keyslot encryption")):
        pytest.skip("this kernel has neither the cipher nor dm-crypt for cryptsetup")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("cipher,key_bits", [("serpent-xts-plain64", 512),
                                             ("twofish-xts-plain64", 512),
                                             ("cast5-cbc-essiv:md5", 128)])
def test_cryptsetup_images(tmp_path: Path, cipher: str, key_bits: int) -> None:
    """luksFormat needs the cipher in the kernel (or dm-crypt): skipped on a
    kernel that has neither, as cryptsetup_unlocks."""
    need("cryptsetup", "qemu-img", "qemu-io")
    image = tmp_path / "disk.luks"
    key_file = tmp_path / "pass.key"
    key_file.write_text(PASS)
    with open(image, "wb") as handle:
        handle.truncate(SIZE + 2 * MiB)
    result = subprocess.run(["cryptsetup", "luksFormat", "--type", "luks1", "--batch-mode",
                             f"--key-file={key_file}", "--pbkdf-force-iterations", "1000",
                             "--cipher", cipher, "--key-size", str(key_bits), str(image)],
                            capture_output=True, text=True, check=False)
    if result.returncode and "Cannot initialize device-mapper" in result.stderr:
        pytest.skip(f"this kernel has neither {cipher} nor dm-crypt for cryptsetup")
    assert result.returncode == 0, result.stderr
    payload = bytearray(random_bytes(len(read_all(image)), seed=8))
    write_at(image, [(0, bytes(payload))])
    assert qemu_contents(image, tmp_path) == payload


def test_serpent_and_twofish_through_a_mount(tmp_path: Path, mnt: Path,
                                             fast_qemu_pbkdf: dict[str, str]) -> None:
    need("qemu-img", "qemu-io")
    images = {"serpent.luks": "cipher-alg=serpent-256,cipher-mode=xts,ivgen-alg=plain64",
              "twofish.luks": "cipher-alg=twofish-128,cipher-mode=cbc,ivgen-alg=essiv"}
    for name, options in images.items():
        image = tmp_path / name
        qemu_create(image, options, fast_qemu_pbkdf)
        expected = qemu_writes(image, luks_opts(image))
        with mounted(image, mountpoint=mnt, options="key-secret=sec0", extra=tuple(SECRET)):
            exposed = mnt / image.with_suffix(".raw").name
            assert exposed.read_bytes() == expected
            pwrite_all(exposed, IMGFS_WRITES, expected)
            assert exposed.read_bytes() == expected
        assert qemu_contents(image, tmp_path) == expected


def qcow2_opts(image: Path) -> str:
    return f"driver=qcow2,file.filename={image},encrypt.key-secret=sec0"


def qcow2_contents(image: Path, tmp_path: Path) -> bytes:
    result = run("qemu-img", "check", *SECRET, "--image-opts", qcow2_opts(image))
    assert "No errors were found" in result.stdout
    out = tmp_path / "qcow2.raw"
    run("qemu-img", "convert", *SECRET, "--image-opts", qcow2_opts(image), "-O", "raw", out)
    return out.read_bytes()


@pytest.mark.parametrize("options", [
    "cipher-alg=twofish-256,cipher-mode=xts,ivgen-alg=plain64",
    "cipher-alg=serpent-128,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha256",
])
def test_qcow2_encrypt_luks(tmp_path: Path, fast_qemu_pbkdf: dict[str, str],
                            options: str) -> None:
    """qcow2 encrypt.format=luks shares the LUKS ciphers: a qemu-img image
    read and written, and one imgfs creates, opened by QEMU."""
    need("qemu-img", "qemu-io")
    image = tmp_path / "disk.qcow2"
    qemu_create(image, options, fast_qemu_pbkdf, fmt="qcow2")
    expected = qemu_writes(image, qcow2_opts(image))
    assert read_all(image) == expected
    write_at(image, IMGFS_WRITES, expected)
    assert qcow2_contents(image, tmp_path) == expected
    ours = tmp_path / "new.qcow2"
    encrypt = ",".join(f"encrypt.{option}" for option in options.split(","))
    imgfs("create", "-f", "qcow2", *SECRET, "-o",
          f"encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,{encrypt}",
          ours, str(SIZE))
    info = json.loads(run("qemu-img", "info", "--output", "json", ours).stdout)
    algorithm = options.split(",")[0].split("=")[1]
    assert info["format-specific"]["data"]["encrypt"]["cipher-alg"] == algorithm
    expected = bytearray(SIZE)
    write_at(ours, IMGFS_WRITES, expected)
    assert qcow2_contents(ours, tmp_path) == expected
    expected = qemu_writes(ours, qcow2_opts(ours))
    assert read_all(ours) == expected


def test_luks2_serpent(tmp_path: Path) -> None:
    """LUKS2 (which QEMU cannot open): imgfs creates serpent-xts, cryptsetup
    reads the header, imgfs reads back what it wrote."""
    need("cryptsetup")
    image = tmp_path / "new.luks"
    parsed = {"format": "luks2", "pbkdf": "pbkdf2", "cipher-alg": "serpent-256",
              "key-secret": "sec0", "iter-time": "10"}
    trio.run(create_image, str(image), "luks", SIZE, parsed,
             OpenContext(read_only=False, secrets={"sec0": PASS.encode()}, key_secret="sec0"))
    dump = run("cryptsetup", "luksDump", image).stdout
    assert "Version:       \t2" in dump and "cipher: serpent-xts-plain64" in dump
    expected = bytearray(read_all(image))
    write_at(image, IMGFS_WRITES, expected)
    assert read_all(image) == expected
