"""The core rules and the raw/file drivers, through the Python API,
checked against qemu-img / qemu-io."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import trio

from imgfs.block import Status
from imgfs.errors import ImgfsError, InvalidImage, OutOfRange, PermissionDenied, ReadOnly
from imgfs.graph import open_image
from imgfs.node import Node, OpenContext
from tests.conftest import imgfs, need, qemu_raw, random_bytes, run

MiB = 1 << 20


def with_node(source: object, coro, **ctx_args: object) -> object:
    async def main() -> object:
        ctx = OpenContext(**ctx_args)  # type: ignore[arg-type]
        node = await open_image(source, ctx)  # type: ignore[arg-type]
        try:
            return await coro(node)
        finally:
            await node.aclose()
    return trio.run(main)


@pytest.fixture
def image(workdir: Path) -> Path:
    need("qemu-img", "qemu-io")
    path = workdir / "disk.img"
    run("qemu-img", "create", "-f", "raw", path, "4M")
    run("qemu-io", "-f", "raw", "-c", "write -P 0xab 1M 64k", path)
    return path


def test_bounds_and_read_only_are_enforced_by_the_core(image: Path) -> None:
    async def check(node: Node) -> None:
        with pytest.raises(OutOfRange):
            await node.read(4 * MiB - 1, 2)
        with pytest.raises(ReadOnly):
            await node.write(0, b"x")
        assert await node.read(4 * MiB, 0) == b""
    with_node(str(image), check, read_only=True)


def test_offset_and_size_window(image: Path, workdir: Path) -> None:
    whole = qemu_raw(image, workdir / "whole.raw")
    source = json.dumps({"driver": "raw", "offset": MiB, "size": 65536,
                         "file": {"driver": "file", "filename": str(image)}})

    async def check(node: Node) -> None:
        assert node.size == 65536
        assert await node.read(0, 65536) == whole[MiB:MiB + 65536]
        await node.write(10, b"hello")
    with_node("json:" + source, check, read_only=False)
    run("qemu-io", "-f", "raw", "-c", "read -P 0x68 1048586 1", image)


def test_window_past_the_end_is_refused(image: Path) -> None:
    source = f'json:{{"driver":"raw","offset":"5M","file":"{image}"}}'
    with pytest.raises(InvalidImage, match="beyond the end"):
        with_node(source, lambda node: trio.sleep(0))


def test_probed_raw_refuses_a_format_header_in_sector_0(image: Path) -> None:
    qcow2_header = b"QFI\xfb\0\0\0\3" + bytes(504)       # magic, version 3

    async def check(node: Node) -> None:
        assert node.format_name == "raw" and node.probed
        try:
            from imgfs.registry import get_driver
            get_driver("qcow2")
        except ImgfsError:
            pytest.skip("no qcow2 driver to recognise the header")
        with pytest.raises(PermissionDenied):
            await node.write(0, qcow2_header)
        await node.write(0, b"\x55" * 512)      # an ordinary first sector is fine
    with_node(str(image), check, read_only=False)


def test_o_direct_alignment_and_read_modify_write(image: Path, workdir: Path) -> None:
    expected = bytearray(qemu_raw(image, workdir / "before.raw"))
    writes = [(1, random_bytes(3, 1)), (4095, random_bytes(4098, 2)), (MiB + 7, b"x" * 100)]

    async def check(node: Node) -> None:
        assert node.file is not None and node.file.driver.request_alignment >= 512
        for offset, data in writes:
            await node.write(offset, data)
            expected[offset:offset + len(data)] = data
        await node.flush()
        assert await node.read(3, 9000) == bytes(expected[3:9003])

    with_node(str(image), check, read_only=False, cache="none")
    (workdir / "expected.raw").write_bytes(expected)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", image, workdir / "expected.raw")


def test_an_unaligned_write_reaches_the_file_in_its_parts(image: Path, workdir: Path) -> None:
    """The raw format passes the core's head, data and tail down to its
    file as they are (a driver such as iSCSI's sends them without joining
    them); a write over the probed first bytes is still checked whole."""
    expected = bytearray(qemu_raw(image, workdir / "before.raw"))
    data = random_bytes(MiB - 16, 4)
    received: list[tuple[int, tuple[int, ...]]] = []
    aligns = []

    async def check(node: Node) -> None:
        assert node.file is not None and node.file.driver.request_alignment >= 512
        driver = node.file.driver
        aligns.append(driver.request_alignment)
        write_parts = driver.write_parts

        async def recorded(offset: int, parts: tuple[bytes, ...]) -> None:
            received.append((offset, tuple(map(len, parts))))
            await write_parts(offset, parts)
        driver.write_parts = recorded  # type: ignore[method-assign]
        await node.write_parts(4096, (b"", b""))        # nothing to write
        await node.write(MiB + 100, data)
        expected[MiB + 100:2 * MiB + 84] = data
        await node.write(10, b"\x77" * 20)
        expected[10:30] = b"\x77" * 20
        await node.flush()

    with_node(str(image), check, read_only=False, cache="none")
    tail = -(MiB + 100 + MiB - 16) % aligns[0]
    assert received == [(MiB, (100, MiB - 16, tail))]
    (workdir / "expected.raw").write_bytes(expected)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", image, workdir / "expected.raw")


def test_a_split_write_reads_the_block_its_halves_share_once(image: Path, workdir: Path) -> None:
    """The kernel cuts a 1 MiB write from a buffer 16 bytes into a page in
    two (1048560 bytes, then 16): the second half's read-modify-write uses
    the block as the first half wrote it, and reads it again after any
    other change in between."""
    expected = bytearray(qemu_raw(image, workdir / "before.raw"))
    data = random_bytes(MiB, 3)
    reads: list[tuple[int, int]] = []

    async def check(node: Node) -> None:
        assert node.file is not None and node.file.driver.request_alignment >= 512
        driver = node.file.driver
        read = driver.read

        async def counted(offset: int, length: int) -> bytes:
            reads.append((offset, length))
            return await read(offset, length)
        driver.read = counted  # type: ignore[method-assign]
        await node.write(MiB, data[:-16])
        await node.write(2 * MiB - 16, data[-16:])
        assert len(reads) == 1                  # the first half's last block
        await node.write(2 * MiB, data[:-16])
        await node.write_zeroes(3 * MiB - 4096, 4096)
        await node.write(3 * MiB - 16, data[-16:])
        assert len(reads) == 3                  # read again after the zeroing
        await node.flush()

    with_node(str(image), check, read_only=False, cache="none")
    expected[MiB:3 * MiB] = data * 2
    expected[3 * MiB - 4096:3 * MiB - 16] = bytes(4096 - 16)
    (workdir / "expected.raw").write_bytes(expected)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", image, workdir / "expected.raw")


def test_block_status_matches_qemu_img_map(image: Path) -> None:
    theirs = json.loads(run("qemu-img", "map", "--output=json", "-f", "raw", image).stdout)
    ours = json.loads(imgfs("map", "--output=json", "-f", "raw", image).stdout)
    assert [(e["start"], e["length"], e["data"], e["zero"]) for e in ours] == \
        [(e["start"], e["length"], e["data"], e["zero"]) for e in theirs]


def test_write_zeroes_and_discard(image: Path) -> None:
    async def check(node: Node) -> None:
        await node.write_zeroes(MiB + 5, 1000)
        await node.discard(MiB + 65536 - 4096, 4096)
        await node.write_zeroes(3 * MiB, 65536, may_unmap=True)
        status = await node.block_status(3 * MiB, 65536)
        assert status.status & Status.ZERO
    with_node(str(image), check, read_only=False)
    run("qemu-io", "-f", "raw", "-c", "read -P 0xab 1M 5", "-c", "read -P 0 1048581 1000",
        "-c", "read -P 0xab 1049581 1000", image)


def test_convert_raw_to_raw_keeps_holes(image: Path, workdir: Path) -> None:
    out = workdir / "copy.img"
    imgfs("convert", "-O", "raw", image, out)
    run("qemu-img", "compare", image, out)
    assert os.stat(out).st_blocks * 512 <= 2 * MiB


def test_resize(image: Path) -> None:
    imgfs("resize", image, "+1M")
    assert image.stat().st_size == 5 * MiB
    # shrinking needs --shrink, as in qemu-img 7.2
    assert imgfs("resize", image, "2M", check=False).returncode == 2
    assert image.stat().st_size == 5 * MiB
    imgfs("resize", "--shrink", image, "2M")
    assert image.stat().st_size == 2 * MiB
