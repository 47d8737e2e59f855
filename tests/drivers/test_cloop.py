"""cloop V2.0 against QEMU: the sample image, and images Debian's
create_compressed_fs makes at several block sizes from disks with data.
``convert -O raw``, ``info`` and ``map`` are compared with ``qemu-img``;
a sequential read inflates each chunk once.  (Damaged images: see
tests/unit/test_hostile_images.py.)"""
from __future__ import annotations

import bz2
import json
import zlib
from pathlib import Path

import pytest
import trio
from imgfs.drivers.cloop.driver import CloopDriver
from imgfs.drivers.cloop.layout import (
    HEADER,
    OFFSETS_START,
    Header,
    check_header,
    check_preamble,
    decode_offsets,
    inflate_block,
)

from imgfs.errors import CorruptImage, InvalidImage, Unsupported
from imgfs.graph import open_image
from imgfs.node import OpenContext
from tests.conftest import imgfs, need, run
from tests.drivers.test_bochs import assert_info_equal, convert_both
from tests.probe_samples import SAMPLE_IMAGES
from tests.roformat_images import (
    CLOOP_PREAMBLE,
    KiB,
    MiB,
    cloop_image,
    create_compressed_fs,
    deflate,
    raw_disk,
)

# -- layout (pure) ------------------------------------------------------------------------


def test_header_struct() -> None:
    assert HEADER.size == 8 and OFFSETS_START == 136
    raw = CLOOP_PREAMBLE + Header(65536, 7).pack()
    assert Header.unpack(raw) == (65536, 7)


@pytest.mark.parametrize("header, refusal", [
    (Header(0, 1), "block_size 0"),
    (Header(1000, 1), "block_size 1000"),
    (Header(128 * MiB, 1), "block_size"),
    (Header(65536, 0xFFFF_FFFF), "offset table"),
    (Header(65536, 1 << 26), "at most"),
    (Header(65536, 200), "past the end"),
])
def test_header_refusals(header: Header, refusal: str) -> None:
    with pytest.raises(InvalidImage, match=refusal):
        check_header(header, 1000)


def test_preamble_versions() -> None:
    check_preamble(CLOOP_PREAMBLE)
    check_preamble(b"anything else: QEMU reads it as cloop when told to")
    with pytest.raises(Unsupported, match="V4.0"):
        check_preamble(CLOOP_PREAMBLE.replace(b"V2.0", b"V4.0"))


def big_endian(*values: int) -> bytes:
    return b"".join(value.to_bytes(8, "big") for value in values)


def test_offsets() -> None:
    assert list(decode_offsets(big_endian(144, 144, 200))) == [144, 144, 200]
    with pytest.raises(InvalidImage, match="decrease at index 2"):
        decode_offsets(big_endian(144, 300, 200))
    with pytest.raises(InvalidImage, match="larger than"):
        decode_offsets(big_endian(144, 144 + (128 << 20) + 1))


def test_inflate_block() -> None:
    block = bytes(range(256)) * 16
    assert inflate_block(deflate(block), 4096, 0) == block
    with pytest.raises(CorruptImage, match="chunk 3 inflates past the block size"):
        inflate_block(deflate(block + b"x"), 4096, 3)
    with pytest.raises(CorruptImage, match="inflates to 4095 bytes"):
        inflate_block(deflate(block[:-1]), 4096, 0)
    with pytest.raises(CorruptImage, match="ends before"):
        inflate_block(deflate(block)[:-9], 4096, 0)
    with pytest.raises(CorruptImage, match="chunk 0 is empty"):
        inflate_block(b"", 4096, 0)
    with pytest.raises(CorruptImage, match="does not decompress"):
        inflate_block(b"not zlib at all", 4096, 0)


def test_a_bomb_inflates_at_most_one_block_and_a_byte() -> None:
    bomb = zlib.compress(bytes(64 * MiB), 9)
    assert len(bomb) < 128 * KiB
    with pytest.raises(CorruptImage, match="past the block size"):
        inflate_block(bomb, 64 * KiB, 0)


# -- against QEMU -----------------------------------------------------------------------------


def map_entries(tool: str, image: Path) -> list[dict]:
    args = ["-U"] if tool == "qemu-img" else []
    command = imgfs if tool == "imgfs" else run
    prefix = [] if tool == "imgfs" else ["qemu-img"]
    return json.loads(command(*prefix, "map", *args, "--output=json", image).stdout)


def test_sample_image(tmp_path: Path) -> None:
    need("qemu-img")
    image = tmp_path / "simple-pattern.cloop"
    image.write_bytes(bz2.decompress((SAMPLE_IMAGES / "simple-pattern.cloop.bz2").read_bytes()))
    disk = convert_both(image, tmp_path)
    assert len(disk) == 1 * MiB and any(disk)
    assert_info_equal(image)
    assert map_entries("imgfs", image) == map_entries("qemu-img", image)


@pytest.mark.parametrize("block_size", [512, 4 * KiB, 64 * KiB, 1 * MiB])
def test_create_compressed_fs_images(tmp_path: Path, block_size: int) -> None:
    need("qemu-img")
    flat = tmp_path / "flat.img"
    disk = raw_disk(flat, 2 * MiB + 3 * KiB, seed=block_size)
    image = tmp_path / "disk.cloop"
    create_compressed_fs(flat, image, block_size)
    ours = convert_both(image, tmp_path)
    # the last block is padded with zeros to a whole block
    assert ours[:len(disk)] == disk and not any(ours[len(disk):])
    assert len(ours) % block_size == 0
    assert_info_equal(image)
    assert map_entries("imgfs", image) == map_entries("qemu-img", image)


def test_convert_to_qcow2(tmp_path: Path) -> None:
    need("qemu-img")
    flat = tmp_path / "flat.img"
    raw_disk(flat, 1 * MiB, seed=3)
    image = tmp_path / "disk.cloop"
    create_compressed_fs(flat, image, 64 * KiB)
    target = tmp_path / "copy.qcow2"
    imgfs("convert", "-O", "qcow2", image, target)
    run("qemu-img", "compare", "-f", "cloop", "-F", "qcow2", image, target)
    run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", flat, target)


def test_read_only_format(tmp_path: Path) -> None:
    image = tmp_path / "disk.cloop"
    cloop_image(image, 4 * KiB, [deflate(bytes(4 * KiB))])
    result = imgfs("create", "-f", "cloop", tmp_path / "new.cloop", "1M", check=False)
    assert (result.returncode, result.stderr) == \
        (1, "imgfs: format 'cloop' does not support image creation\n")
    assert "\n  cloop        ro " in imgfs("formats").stdout
    # neither tool checks the format (qemu-img check's exit status 63)
    assert imgfs("check", image, check=False).returncode == 63
    assert run("qemu-img", "check", image, check=False).returncode == 63


@pytest.mark.parametrize("piece", [4 * KiB, 48 * KiB, 256 * KiB])
def test_a_sequential_read_inflates_each_chunk_once(tmp_path: Path, piece: int,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = [bytes([index]) * (64 * KiB) for index in range(12)]
    image = tmp_path / "disk.cloop"
    cloop_image(image, 64 * KiB, [deflate(block) for block in blocks])
    inflated: list[int] = []
    decode = CloopDriver.decode_block

    async def counting(self: CloopDriver, token: int) -> bytes:
        inflated.append(token)
        return await decode(self, token)
    monkeypatch.setattr(CloopDriver, "decode_block", counting)

    async def main() -> bytes:
        node = await open_image(str(image), OpenContext(read_only=True))
        try:
            return b"".join([await node.read(offset, min(piece, node.size - offset))
                             for offset in range(0, node.size, piece)])
        finally:
            await node.aclose()
    assert trio.run(main) == b"".join(blocks)
    assert inflated == list(range(12))
