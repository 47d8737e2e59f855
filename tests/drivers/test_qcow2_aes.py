"""Legacy qcow2 AES encryption (crypt_method 1) against qemu-img / qemu-io.

Readable for data liberation only: info and convert read it (QEMU's
``convert -O raw`` with the same secret is the reference), read-write
opens are refused, creation is refused.  The scheme has no key check, so
a wrong passphrase reads garbage, the same garbage QEMU reads.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import trio

from imgfs.errors import ReadOnly
from imgfs.graph import open_image
from imgfs.node import OpenContext
from tests.conftest import imgfs, run

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None or
                                shutil.which("qemu-io") is None,
                                reason="qemu-img / qemu-io not installed")

KiB = 1024
MiB = 1024 * KiB
SECRET = ["--object", "secret,id=sec0,data=pass"]
SIZE = 4 * MiB
#: written by qemu-io: (offset, length, pattern)
QEMU_WRITES = [(0, 64 * KiB, 0x5A), (MiB + 512, 4 * KiB, 0x33), (3 * MiB - 512, 1024, 0x77)]
WARNING = "legacy qcow2 AES encryption is broken by design"


def image_opts(image: Path) -> str:
    return f"driver=qcow2,file.filename={image},encrypt.format=aes,encrypt.key-secret=sec0"


def source(image: Path) -> str:
    return "json:" + json.dumps({"driver": "qcow2", "encrypt.key-secret": "sec0",
                                 "file": {"driver": "file", "filename": str(image)}})


def create_aes(image: Path, *extra: str) -> None:
    """A legacy AES image filled by qemu-io (QEMU 7.2 may warn that it is deprecated)."""
    options = "encrypt.format=aes,encrypt.key-secret=sec0" + "".join("," + e for e in extra)
    run("qemu-img", "create", "-q", "-f", "qcow2", *SECRET, "-o", options, image, str(SIZE))
    args = ["qemu-io", *SECRET, "--image-opts", image_opts(image)]
    for offset, length, pattern in QEMU_WRITES:
        args += ["-c", f"write -P {pattern:#x} {offset} {length}"]
    run(*args)


def expected() -> bytes:
    data = bytearray(SIZE)
    for offset, length, pattern in QEMU_WRITES:
        data[offset:offset + length] = bytes([pattern]) * length
    return bytes(data)


def qemu_contents(image: Path, tmp_path: Path, secret: list[str] = SECRET) -> bytes:
    out = tmp_path / "qemu.raw"
    run("qemu-img", "convert", *secret, "--image-opts", image_opts(image), "-O", "raw", out)
    return out.read_bytes()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "aes.qcow2"
    create_aes(path)
    return path


@pytest.mark.parametrize("extra", [(), ("compat=0.10", "cluster_size=4096")])
def test_convert_matches_qemu(tmp_path: Path, extra: tuple[str, ...]) -> None:
    image = tmp_path / "aes.qcow2"
    create_aes(image, *extra)
    out = tmp_path / "ours.raw"
    result = imgfs("convert", *SECRET, "-O", "raw", source(image), out)
    assert WARNING in result.stderr
    theirs = qemu_contents(image, tmp_path)
    assert theirs == expected()
    assert out.read_bytes() == theirs


def test_info_reports_encryption_like_qemu(image: Path) -> None:
    ours = json.loads(imgfs("info", *SECRET, "--output", "json", source(image)).stdout)
    theirs = json.loads(run("qemu-img", "info", "--output", "json", image).stdout)
    assert ours["encrypted"] is True
    assert ours["format-specific"]["data"]["encrypt"] == {"format": "aes"}
    assert ours["format-specific"]["data"]["encrypt"] == \
        theirs["format-specific"]["data"]["encrypt"]
    assert "encrypted: yes" in imgfs("info", *SECRET, source(image)).stdout


def test_wrong_passphrase_reads_what_qemu_reads(image: Path, tmp_path: Path) -> None:
    """No key check in the scheme: a wrong key decrypts to garbage, as in QEMU."""
    wrong = ["--object", "secret,id=sec0,data=not-it"]
    out = tmp_path / "ours.raw"
    imgfs("convert", *wrong, "-O", "raw", source(image), out)
    theirs = qemu_contents(image, tmp_path, wrong)
    assert theirs != expected()
    assert out.read_bytes() == theirs


def test_info_needs_no_passphrase(image: Path) -> None:
    """As qemu-img info, which shows an AES image without its secret."""
    ours = json.loads(imgfs("info", "--output", "json", str(image)).stdout)
    theirs = json.loads(run("qemu-img", "info", "--output", "json", image).stdout)
    assert ours["format-specific"] == theirs["format-specific"]
    assert ours["encrypted"] is theirs["encrypted"] is True


def test_missing_secret_is_a_clear_error(image: Path) -> None:
    result = imgfs("map", str(image), check=False)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "aes.qcow2 is encrypted: give key-secret=ID" in result.stderr


def test_read_write_open_is_refused(image: Path) -> None:
    before = image.read_bytes()

    async def open_rw() -> None:
        ctx = OpenContext(read_only=False, secrets={"sec0": b"pass"}, key_secret="sec0")
        with pytest.raises(ReadOnly, match="broken by design"):
            await open_image(str(image), ctx)
    trio.run(open_rw)
    result = imgfs("check", *SECRET, "-r", "all", source(image), check=False)
    assert result.returncode == 1
    assert "broken by design" in result.stderr
    assert image.read_bytes() == before


def test_create_is_refused(tmp_path: Path) -> None:
    result = imgfs("create", "-f", "qcow2", *SECRET, "-o",
                   "encrypt.format=aes,encrypt.key-secret=sec0", tmp_path / "x.qcow2", "1M",
                   check=False)
    assert result.returncode != 0
    assert "legacy qcow2 AES encryption cannot be created" in result.stderr
    assert not (tmp_path / "x.qcow2").exists()
