"""DMG (UDIF) against qemu-img, dmg2img and the bytes the images were built from.

Images: the Apple-made sample (../shared/sample-images), zlib images
written by PyPI pydmg (an MBR and a FAT32 partition), and images from the
tests' own UDIF writer (tests/dmg_images.py) with every chunk kind, several
partitions, a resource fork instead of the XML plist.  QEMU on Debian reads
raw, zero, ignore and zlib chunks; bzip2 and ADC chunks are checked
against Debian's dmg2img, LZFSE chunks (which neither reads) against the
bytes the image was built from.
"""
from __future__ import annotations

import bz2
import json
import struct
from pathlib import Path

import pytest
import trio
from imgfs.drivers.dmg import codecs
from imgfs.drivers.dmg.layout import CHUNK_ENTRY, MISH_HEADER, TRAILER, Trailer

from imgfs.errors import CorruptImage, Unsupported
from imgfs.graph import open_image
from imgfs.node import OpenContext
from tests.conftest import imgfs, need, qemu_raw, run
from tests.dmg_images import (
    ADC,
    BZIP2,
    CHUNK,
    IGNORE,
    LZFSE,
    RAW,
    ZERO,
    ZLIB,
    Chunk,
    Image,
    Partition,
    adc_compress,
    build,
    mish_table,
    pattern,
    plist,
)

KiB = 1024
MiB = 1024 * KiB
SAMPLES = Path(__file__).resolve().parents[2].parent / "shared" / "sample-images"


def write(path: Path, image: Image) -> Path:
    path.write_bytes(build(image))
    return path


def sample_dmg(tmp_path: Path) -> Path:
    source = SAMPLES / "simple-dmg.dmg.bz2"
    assert source.exists(), f"sample image missing: {source}"
    target = tmp_path / "simple.dmg"
    target.write_bytes(bz2.decompress(source.read_bytes()))
    return target


def pydmg_image(tmp_path: Path) -> Path:
    pydmg = pytest.importorskip("pydmg")
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "random.bin").write_bytes(pattern(300 * KiB, seed=5))
    (tree / "text.txt").write_bytes(b"hello dmg\n" * 50_000)
    target = tmp_path / "pydmg.dmg"
    pydmg.create_dmg(tree, target, total_sectors=8192)
    return target


def mixed_image(tmp_path: Path) -> Path:
    """Two partitions: zlib, raw, zero-fill, ignore, then zlib and raw again."""
    return write(tmp_path / "mixed.dmg", Image([
        Partition([Chunk(ZLIB, 2048, pattern(MiB)), Chunk(RAW, 8, pattern(4 * KiB, 2)),
                   Chunk(RAW, 8, pattern(4 * KiB, 3)), Chunk(ZERO, 300), Chunk(IGNORE, 5)]),
        Partition([Chunk(ZLIB, 100, pattern(50 * KiB, 4)), Chunk(RAW, 3, pattern(1536, 6))]),
    ]))


def kinds_image(tmp_path: Path, kind: int) -> tuple[Path, bytes]:
    """Chunks of one compressed kind (1 MiB, then odd sizes) around a raw
    and a zero chunk; and the bytes they hold."""
    pieces = [pattern(MiB, 7), pattern(3 * 512, 8), bytes(2048), pattern(20 * KiB, 9),
              b"\x5a" * 8 * KiB]
    kinds = [kind, kind, ZERO, RAW, kind]
    chunks = [Chunk(chunk_kind, len(data) // 512, data) for chunk_kind, data in
              zip(kinds, pieces, strict=True)]
    path = write(tmp_path / f"kind-{kind:x}.dmg", Image([Partition(chunks)]))
    return path, b"".join(pieces)


def imgfs_raw(image: Path, out: Path) -> bytes:
    imgfs("convert", "-O", "raw", image, out)
    return out.read_bytes()


def dmg2img_raw(image: Path, out: Path) -> bytes:
    need("dmg2img")
    run("dmg2img", "-s", image, out)
    return out.read_bytes()


def qemu_json(*args: str | Path) -> object:
    return json.loads(run("qemu-img", *args).stdout)


def imgfs_json(*args: str | Path) -> object:
    return json.loads(imgfs(*args).stdout)


IMAGES = {"sample": sample_dmg, "pydmg": pydmg_image, "mixed": mixed_image}


# -- layout ---------------------------------------------------------------------------------

def test_struct_sizes() -> None:
    assert TRAILER.size == 512
    assert MISH_HEADER.size == 204
    assert CHUNK_ENTRY.size == 40


def test_adc_decoder_all_opcodes() -> None:
    data = b"abcdefgh" * 40 + b"z" * 300 + pattern(3000) + b"abcdefgh" * 3
    packed = adc_compress(data)
    assert {byte >> 6 for byte in packed} >= {0, 1, 2, 3}   # literals and both matches
    assert codecs.inflate_adc(packed, len(data)) == data


@pytest.mark.parametrize("stored", [b"\x85ab", b"\x40\x00", b"\x04\x05", b"\x00"])
def test_adc_decoder_refuses_truncated_streams(stored: bytes) -> None:
    with pytest.raises(CorruptImage):
        codecs.inflate_adc(stored, 100)


@pytest.mark.parametrize("kind", [ZLIB, BZIP2, ADC, LZFSE])
def test_decoders_stop_at_the_declared_size(kind: int) -> None:
    from tests.dmg_images import compress
    data = pattern(64 * KiB)
    decoder = codecs.DECODERS[kind]
    stored = compress(kind, data)
    assert decoder(stored, len(data)) == data
    with pytest.raises(CorruptImage, match="more than the 4096 bytes"):
        decoder(stored, 4096)
    with pytest.raises(CorruptImage, match="not the"):
        decoder(stored, len(data) + 512)


# -- against qemu-img -------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(IMAGES))
def test_reads_like_qemu(tmp_path: Path, name: str) -> None:
    image = IMAGES[name](tmp_path)
    expected = qemu_raw(image, tmp_path / "qemu.raw")
    assert imgfs_raw(image, tmp_path / "imgfs.raw") == expected


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_info_like_qemu(tmp_path: Path, name: str) -> None:
    need("qemu-img")
    image = IMAGES[name](tmp_path)
    assert imgfs_json("info", "--output", "json", image) == \
        qemu_json("info", "--output=json", image)
    assert imgfs("info", image).stdout == run("qemu-img", "info", image).stdout


def test_check_is_not_supported_like_qemu(tmp_path: Path) -> None:
    need("qemu-img")
    image = mixed_image(tmp_path)
    assert run("qemu-img", "check", image, check=False).returncode == 63
    result = imgfs("check", image, check=False)
    assert (result.returncode, result.stderr.splitlines()) == \
        (63, [f"imgfs: {image}: this image format does not support checks"])


def test_map_like_qemu_without_zero_chunks(tmp_path: Path) -> None:
    need("qemu-img")
    image = pydmg_image(tmp_path)
    assert imgfs_json("map", "--output", "json", image) == \
        qemu_json("map", "--output=json", image)


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_map_agrees_with_qemu(tmp_path: Path, name: str) -> None:
    """QEMU's dmg driver has no block status: its map calls the whole disk
    data.  imgfs's map covers the same range, present at depth 0, and calls
    zero-fill and ignore chunks zero (they read as zeros in QEMU too)."""
    image = IMAGES[name](tmp_path)
    expected = qemu_raw(image, tmp_path / "qemu.raw")
    assert qemu_json("map", "--output=json", image) == [
        {"start": 0, "length": len(expected), "depth": 0, "present": True, "zero": False,
         "data": True}]
    entries = imgfs_json("map", "--output", "json", image)
    assert isinstance(entries, list)
    offset = 0
    for entry in entries:
        assert (entry["start"], entry["depth"], entry["present"]) == (offset, 0, True)
        assert entry["data"] != entry["zero"]
        if entry["zero"]:
            assert expected[offset:offset + entry["length"]] == bytes(entry["length"])
        offset += entry["length"]
    assert offset == len(expected)


def test_map_shows_zero_chunks_and_where_raw_chunks_lie(tmp_path: Path) -> None:
    """QEMU's dmg driver has no block status (all data); imgfs reports
    zero-fill and ignore chunks as zeros, which convert and SEEK_HOLE use,
    and gives the offset in the file of chunks stored uncompressed."""
    image = mixed_image(tmp_path)
    data = {"depth": 0, "present": True, "zero": False, "data": True}
    zero = {"depth": 0, "present": True, "zero": True, "data": False}
    entries = imgfs_json("map", "--output", "json", image)
    assert isinstance(entries, list)
    offsets = [entry.pop("offset", None) for entry in entries]
    assert entries == [
        {"start": 0, "length": MiB, **data},
        {"start": MiB, "length": 8 * KiB, **data},
        {"start": MiB + 8 * KiB, "length": 305 * 512, **zero},
        {"start": MiB + 8 * KiB + 305 * 512, "length": 100 * 512, **data},
        {"start": MiB + 8 * KiB + 405 * 512, "length": 3 * 512, **data}]
    assert [offset is not None for offset in offsets] == [False, True, False, False, True]
    stored = image.read_bytes()
    assert stored[offsets[1]:offsets[1] + 8 * KiB] == pattern(4 * KiB, 2) + pattern(4 * KiB, 3)
    assert stored[offsets[4]:offsets[4] + 1536] == pattern(1536, 6)


def test_resource_fork_and_trailer_sector_count(tmp_path: Path) -> None:
    """The binary resource fork instead of the XML plist; the size is the
    trailer's sector count, as QEMU takes it, even when smaller than the
    chunks."""
    chunks = [Chunk(ZLIB, 16, pattern(8 * KiB)), Chunk(RAW, 4, pattern(2 * KiB, 2))]
    for name, image in {"rsrc": Image([Partition(chunks)], resource_fork=True),
                        "short": Image([Partition(chunks)], sector_count=9)}.items():
        path = write(tmp_path / f"{name}.dmg", image)
        expected = qemu_raw(path, tmp_path / f"{name}.qemu.raw")
        assert imgfs_raw(path, tmp_path / f"{name}.raw") == expected


def test_resource_fork_wins_over_the_plist_like_qemu(tmp_path: Path) -> None:
    """Both forks, describing different chunks: QEMU reads the resource
    fork's tables, and so does imgfs."""
    both = build(Image([Partition([Chunk(ZLIB, 8, pattern(4 * KiB))])], resource_fork=True))
    body, trailer = both[:-512], bytearray(both[-512:])
    xml = plist([("zeros", mish_table(0, 8, [CHUNK.pack(ZERO, 0, 0, 8, 0, 0)], 0))])
    struct.pack_into(">QQ", trailer, 216, len(body), len(xml))
    path = tmp_path / "both.dmg"
    path.write_bytes(body + xml + bytes(trailer))
    expected = qemu_raw(path, tmp_path / "qemu.raw")
    assert expected == pattern(4 * KiB)
    assert imgfs_raw(path, tmp_path / "imgfs.raw") == expected


@pytest.mark.parametrize("case", ["gap", "past-chunks"])
def test_sectors_no_chunk_maps_fail_like_qemu(tmp_path: Path, case: str) -> None:
    need("qemu-img")
    first = Partition([Chunk(ZLIB, 8, pattern(4 * KiB))])
    image = Image([first, Partition([Chunk(ZLIB, 8, pattern(4 * KiB))], start_sector=20)]) \
        if case == "gap" else Image([first], sector_count=100)
    path = write(tmp_path / "holey.dmg", image)
    assert run("qemu-img", "convert", "-O", "raw", path, tmp_path / "q.raw",
               check=False).returncode != 0
    result = imgfs("convert", "-O", "raw", path, tmp_path / "i.raw", check=False)
    assert result.returncode == 1
    assert result.stderr.strip() == \
        f"imgfs: {path}: no UDIF chunk maps sector 8 (guest offset 4096)"


def test_convert_from_dmg(tmp_path: Path) -> None:
    need("qemu-img")
    image = pydmg_image(tmp_path)
    imgfs("convert", "-O", "qcow2", image, tmp_path / "out.qcow2")
    run("qemu-img", "check", tmp_path / "out.qcow2")
    run("qemu-img", "compare", "-f", "dmg", "-F", "qcow2", image, tmp_path / "out.qcow2")


def test_probed_by_trailer_and_by_name(tmp_path: Path) -> None:
    image = mixed_image(tmp_path)
    renamed = tmp_path / "apple-image"
    renamed.write_bytes(image.read_bytes())
    assert imgfs_json("info", "--output", "json", renamed)["format"] == "dmg"  # type: ignore[index]
    assert imgfs_json("info", "--output", "json", image)["format"] == "dmg"  # type: ignore[index]


# -- chunk kinds QEMU on Debian cannot read ---------------------------------------------------

@pytest.mark.parametrize("kind", [BZIP2, ADC], ids=["bzip2", "adc"])
def test_kinds_like_dmg2img(tmp_path: Path, kind: int) -> None:
    image, data = kinds_image(tmp_path, kind)
    assert dmg2img_raw(image, tmp_path / "dmg2img.raw") == data
    assert imgfs_raw(image, tmp_path / "imgfs.raw") == data


def test_lzfse_chunks(tmp_path: Path) -> None:
    """Neither QEMU on Debian nor dmg2img reads LZFSE: the bytes the image
    was built from (compressed by Apple's reference encoder) are the answer."""
    image, data = kinds_image(tmp_path, LZFSE)
    assert imgfs_raw(image, tmp_path / "imgfs.raw") == data


# -- the decoded-chunk cache, read-only -----------------------------------------------------

def test_sequential_read_decodes_each_chunk_once(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    image = write(tmp_path / "four.dmg", Image([Partition(
        [Chunk(ZLIB, 2048, pattern(MiB, seed)) for seed in range(4)])]))
    decoded: list[int] = []
    inflate = codecs.DECODERS[ZLIB]

    def counting(stored: bytes, size: int) -> bytes:
        decoded.append(size)
        return inflate(stored, size)

    monkeypatch.setitem(codecs.DECODERS, ZLIB, counting)

    async def read_all() -> bytes:
        node = await open_image(str(image), OpenContext(read_only=True))
        try:
            return b"".join([await node.read(offset, 128 * KiB)
                             for offset in range(0, node.size, 128 * KiB)])
        finally:
            await node.aclose()

    data = trio.run(read_all)
    assert data == b"".join(pattern(MiB, seed) for seed in range(4))
    assert decoded == [MiB] * 4


def test_writes_are_refused(tmp_path: Path) -> None:
    image = mixed_image(tmp_path)
    refusal = f"imgfs: {image}: dmg images can only be opened read-only (use -o ro)"
    for args in (["resize", image, "+1M"], ["snapshot", "-c", "s1", image]):
        result = imgfs(*args, check=False)
        assert (result.returncode, result.stderr.splitlines()) == (1, [refusal])

    async def open_rw() -> None:
        with pytest.raises(Unsupported, match="dmg images can only be opened read-only"):
            await open_image(str(image), OpenContext(read_only=False))

    trio.run(open_rw)


def test_trailer_round_trip(tmp_path: Path) -> None:
    image = mixed_image(tmp_path).read_bytes()
    trailer = Trailer.unpack(image)
    assert trailer.magic == b"koly" and trailer.version == 4
    assert trailer.pack() == image[-512:]
