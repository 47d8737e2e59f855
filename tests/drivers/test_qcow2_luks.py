"""qcow2 with ``encrypt.format=luks`` against qemu-img / qemu-io.

Images are made by qemu-img (iter-time=10) and filled by qemu-io; QEMU's
``convert -O raw`` with the same secret is the reference.  imgfs writes are
judged by ``qemu-img check`` and by QEMU reading them back.
"""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import trio

from imgfs.block import Status
from imgfs.graph import open_image
from imgfs.node import OpenContext
from tests.conftest import imgfs, qemu_img_create_encrypted, random_bytes, run

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None or
                                shutil.which("qemu-io") is None,
                                reason="qemu-img / qemu-io not installed")

KiB = 1024
MiB = 1024 * KiB
SECRET = ["--object", "secret,id=sec0,data=pass"]
SIZE = 16 * MiB
#: written by qemu-io, out of order: (offset, length, pattern)
QEMU_WRITES = [(3 * MiB, 4 * KiB, 0x33), (0, MiB, 0x5A), (5 * MiB + 512, 70 * KiB, 0x77),
               (MiB - 512, 1024, 0x11)]


def image_opts(image: Path) -> str:
    return f"driver=qcow2,file.filename={image},encrypt.key-secret=sec0"


def create_encrypted(image: Path, size: int = SIZE) -> None:
    qemu_img_create_encrypted("-f", "qcow2", *SECRET, "-o",
                              "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
                              image, str(size))


def qemu_io(image: Path, *commands: str) -> None:
    args = ["qemu-io", *SECRET, "--image-opts", image_opts(image)]
    for command in commands:
        args += ["-c", command]
    run(*args)


def qemu_contents(image: Path, tmp_path: Path) -> bytes:
    out = tmp_path / "qemu.raw"
    run("qemu-img", "convert", *SECRET, "--image-opts", image_opts(image), "-O", "raw", out)
    return out.read_bytes()


def qemu_check(image: Path) -> None:
    result = run("qemu-img", "check", *SECRET, "--image-opts", image_opts(image), check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No errors were found" in result.stdout


def expected_after_qemu_writes() -> bytearray:
    expected = bytearray(SIZE)
    for offset, length, pattern in QEMU_WRITES:
        expected[offset:offset + length] = bytes([pattern]) * length
    return expected


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    image = tmp_path_factory.mktemp("qcow2-luks") / "template.qcow2"
    create_encrypted(image)
    qemu_io(image, *(f"write -P {pattern:#x} {offset} {length}"
                     for offset, length, pattern in QEMU_WRITES),
            "write -z 8M 64k")
    return image


@pytest.fixture
def image(template: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "disk.qcow2"
    shutil.copyfile(template, copy)
    return copy


def context(read_only: bool, passphrase: bytes = b"pass") -> OpenContext:
    return OpenContext(read_only=read_only, secrets={"sec0": passphrase}, key_secret="sec0")


async def read_all(image: Path) -> bytes:
    node = await open_image(str(image), context(True))
    try:
        return await node.read(0, node.size)
    finally:
        await node.aclose()


def test_a_mount_starts_unlocking_the_embedded_header_early(
        image: Path, tmp_path: Path, slot_openings: list[bytes]) -> None:
    """luks.early finds the LUKS header inside the qcow2 image and opens its
    key slot ahead; the open then takes that result (one PBKDF in all)."""
    from imgfs.drivers.luks import early

    from imgfs.mount import MountOptions
    early.start_unlocking([str(image)], MountOptions(
        secrets={"sec0": b"pass"}, driver_options={"encrypt.key-secret": "sec0"}))
    assert len(early.EARLY.started) == 1
    assert trio.run(read_all, image) == qemu_contents(image, tmp_path)
    assert slot_openings == [b"pass"] and not early.EARLY.started


def test_host_offset_numbers_the_sectors(image: Path, tmp_path: Path) -> None:
    """The fact the driver rests on: QEMU encrypts a data cluster with the
    sector numbers of its host offset, not its guest offset."""
    from imgfs.drivers.luks.spec import SectorTransform

    async def check() -> None:
        node = await open_image(str(image), context(True))
        try:
            crypto = node.driver.crypto
            extent = await node.driver._mapped_status(3 * MiB, 4 * KiB)
            assert extent.host_offset is not None and extent.host_offset != 3 * MiB
            key_cipher: SectorTransform = crypto.cipher
            raw = image.read_bytes()[extent.host_offset:extent.host_offset + 512]
            assert key_cipher.decrypt(extent.host_offset // 512, raw) == b"\x33" * 512
            assert key_cipher.decrypt(3 * MiB // 512, raw) != b"\x33" * 512
        finally:
            await node.aclose()
    trio.run(check)


def test_read_matches_qemu(image: Path, tmp_path: Path) -> None:
    expected = qemu_contents(image, tmp_path)
    assert expected == expected_after_qemu_writes()
    assert trio.run(read_all, image) == expected


def test_block_status_hides_host_offsets_but_keeps_zeros(image: Path) -> None:
    async def statuses() -> list[tuple[int, Status, int | None]]:
        node = await open_image(str(image), context(True))
        try:
            found = []
            for offset in (0, 3 * MiB, 8 * MiB, 12 * MiB):
                extent = await node.driver.block_status(offset, 64 * KiB)
                found.append((offset, extent.status, extent.host_offset))
            return found
        finally:
            await node.aclose()
    found = dict((offset, (status, host)) for offset, status, host in trio.run(statuses))
    assert found[0][0] & Status.DATA and found[0][1] is None
    assert found[3 * MiB][0] & Status.DATA
    assert found[8 * MiB][0] & Status.ZERO
    assert not found[12 * MiB][0] & Status.ALLOCATED


def test_writes_are_encrypted_and_qemu_reads_them(image: Path, tmp_path: Path) -> None:
    expected = expected_after_qemu_writes()
    writes = [
        (3 * MiB + 100, b"partial cluster over QEMU's data" * 20),   # CoW in place
        (10 * MiB + 7, random_bytes(200 * KiB, seed=4)),            # new clusters
        (8 * MiB + 4096, b"into a zero cluster" * 10),              # zero cluster
        (0, random_bytes(MiB + 3000, seed=5)),                      # across clusters
        (SIZE - 300, b"\xee" * 300),                                 # last sector
    ]

    async def write() -> None:
        node = await open_image(str(image), context(False))
        try:
            for offset, data in writes:
                await node.write(offset, data)
                expected[offset:offset + len(data)] = data
            await node.write_zeroes(12 * MiB, 128 * KiB)
        finally:
            await node.aclose()
    trio.run(write)
    qemu_check(image)
    assert qemu_contents(image, tmp_path) == expected
    assert trio.run(read_all, image) == expected
    # plaintext never reaches the file
    assert b"partial cluster over QEMU's data" not in image.read_bytes()
    qemu_io(image, "read -P 0xee 16776916 300")


def test_qemu_reads_back_after_imgfs_overwrites_whole_clusters(image: Path,
                                                              tmp_path: Path) -> None:
    async def write() -> None:
        node = await open_image(str(image), context(False))
        try:
            await node.write(0, b"\xab" * (2 * MiB))
        finally:
            await node.aclose()
    trio.run(write)
    qemu_check(image)
    qemu_io(image, "read -P 0xab 0 2M", "read -P 0x33 3M 4k")


def test_info_reports_encryption_like_qemu(image: Path) -> None:
    source = "json:" + json.dumps({"driver": "qcow2", "encrypt.key-secret": "sec0",
                                   "file": {"driver": "file", "filename": str(image)}})
    ours = json.loads(imgfs("info", *SECRET, "--output", "json", source).stdout)
    theirs = json.loads(run("qemu-img", "info", "--output", "json", image).stdout)
    assert ours["encrypted"] is True
    assert ours["format-specific"]["data"]["encrypt"] == \
        theirs["format-specific"]["data"]["encrypt"]
    human = imgfs("info", *SECRET, source).stdout
    assert "encrypted: yes" in human


def test_info_needs_no_passphrase(image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As qemu-img info: the encrypt fields without the secret, line for line."""
    monkeypatch.chdir(image.parent)
    for output in ("human", "json"):
        theirs = run("qemu-img", "info", "--output", output, image.name).stdout
        assert imgfs("info", "--output", output, image.name).stdout == theirs


def test_wrong_passphrase_is_one_line(image: Path) -> None:
    source = "json:" + json.dumps({"driver": "qcow2", "encrypt.key-secret": "sec0",
                                   "file": {"driver": "file", "filename": str(image)}})
    result = imgfs("map", "--object", "secret,id=sec0,data=not-it", source, check=False)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert "no key slot matches this passphrase" in result.stderr
    assert "not-it" not in result.stderr


def test_missing_secret_is_a_clear_error(image: Path) -> None:
    result = imgfs("map", str(image), check=False)
    assert result.returncode == 2                     # a usage error
    assert result.stderr.count("\n") == 1
    assert "disk.qcow2 is encrypted: give key-secret=ID" in result.stderr


def test_compressed_writes_refused(image: Path) -> None:
    from imgfs.errors import Unsupported

    async def write() -> None:
        node = await open_image(str(image), context(False))
        try:
            with pytest.raises(Unsupported, match="encrypted"):
                await node.driver.write_compressed(4 * MiB, b"\x01" * (64 * KiB))
        finally:
            await node.aclose()
    trio.run(write)


def test_luks_header_pointer_beyond_the_file_is_refused(image: Path) -> None:
    raw = bytearray(image.read_bytes())
    at = raw.index(struct.pack(">I", 0x0537BE77))     # extension type, length, offset
    raw[at + 8:at + 16] = struct.pack(">Q", 1 << 40)
    image.write_bytes(raw)
    result = imgfs("info", *SECRET, str(image), check=False)
    assert result.returncode == 1
    assert "LUKS header at 0x10000000000" in result.stderr
    assert result.stderr.count("\n") == 1


def test_check_counts_the_luks_header(image: Path) -> None:
    """The LUKS header clusters are referenced: no leaks, and a refcount
    rebuild (check -r all) must not free them."""
    source = "json:" + json.dumps({"driver": "qcow2", "encrypt.key-secret": "sec0",
                                   "file": {"driver": "file", "filename": str(image)}})
    result = imgfs("check", *SECRET, source)
    assert "No errors were found" in result.stdout
    imgfs("check", *SECRET, "-r", "all", source)
    qemu_check(image)
    qemu_io(image, "read -P 0x33 3M 4k")


# -- creation ---------------------------------------------------------------------------

CREATE_CASES = [
    "",                                                                # aes-256-xts-plain64
    "encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,"
    "encrypt.ivgen-hash-alg=sha256,encrypt.hash-alg=sha1",
]


@pytest.mark.parametrize("extra", CREATE_CASES)
def test_created_images_open_in_qemu(tmp_path: Path, extra: str) -> None:
    image = tmp_path / "new.qcow2"
    options = "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,cluster_size=32k"
    imgfs("create", "-f", "qcow2", *SECRET, "-o", options + ("," + extra if extra else ""),
          image, "4M")
    qemu_check(image)
    info = json.loads(run("qemu-img", "info", "--output", "json", image).stdout)
    assert info["encrypted"] is True
    encrypt = info["format-specific"]["data"]["encrypt"]
    assert encrypt["format"] == "luks"
    if extra:
        assert (encrypt["cipher-alg"], encrypt["cipher-mode"], encrypt["ivgen-alg"],
                encrypt["hash-alg"]) == ("aes-128", "cbc", "essiv", "sha1")
    qemu_io(image, "write -P 0x42 40k 100k")       # QEMU writes, imgfs reads
    expected = bytearray(4 * MiB)
    expected[40 * KiB:140 * KiB] = b"\x42" * (100 * KiB)

    async def write() -> None:                      # imgfs writes, QEMU reads
        node = await open_image(str(image), context(False))
        try:
            await node.write(2 * MiB + 3, b"imgfs" * 1000)
        finally:
            await node.aclose()
    trio.run(write)
    expected[2 * MiB + 3:2 * MiB + 5003] = b"imgfs" * 1000
    qemu_check(image)
    assert qemu_contents(image, tmp_path) == expected
    assert trio.run(read_all, image) == expected


@pytest.mark.parametrize("options, message", [
    ("encryption=on", "legacy qcow2 AES encryption cannot be created"),
    ("encrypt.format=aes,encrypt.key-secret=sec0", "legacy qcow2 AES encryption"),
    ("encrypt.format=luks,encrypt.key-secret=sec0,preallocation=full",
     "preallocation cannot be used with encryption"),
])
def test_create_refusals(tmp_path: Path, options: str, message: str) -> None:
    result = imgfs("create", "-f", "qcow2", *SECRET, "-o", options, tmp_path / "x.qcow2",
                   "1M", check=False)
    assert result.returncode != 0
    assert message in result.stderr
    assert result.stderr.count("\n") == 1
    assert not (tmp_path / "x.qcow2").exists()


def test_convert_to_an_encrypted_qcow2(image: Path, tmp_path: Path) -> None:
    source = tmp_path / "source.raw"
    source.write_bytes(qemu_contents(image, tmp_path))
    target = tmp_path / "converted.qcow2"
    imgfs("convert", "-O", "qcow2", *SECRET, "-o",
          "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10", source, target)
    qemu_check(target)
    result = run("qemu-img", "compare", *SECRET, "--image-opts", image_opts(target),
                 f"driver=raw,file.filename={source}")
    assert "Images are identical" in result.stdout
    assert b"\x5a" * 4096 not in target.read_bytes()
