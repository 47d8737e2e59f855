"""The mapped layer's partially present blocks (differencing images whose
sector bitmaps say which sectors of an allocated block hold data), through
a toy format: block i lives at host offset (i + 1) * BLOCK once allocated
(never at 0, which the layer's mappings reserve for "no host space"), and a
bitmap per block (kept in memory) says which 512-byte units are present.
Every read is judged against the same writes applied to a copy of the
backing file."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import trio
from hypothesis import example, given, settings
from hypothesis import strategies as st

from imgfs.block import Kind
from imgfs.graph import open_image
from imgfs.mapped import MapKind, MappedDriver, Mapping
from imgfs.node import Node, OpenContext
from imgfs.options import Schema

BLOCK = 8192
UNIT = 512
SIZE = 8 * BLOCK


class SectorBitmapToy(MappedDriver):
    name = "toy"
    kind = Kind.FORMAT
    open_opts = Schema()
    present_unit = UNIT

    async def open(self, options: dict[str, Any], ctx: OpenContext) -> None:
        self.size = SIZE
        self.setup_mapping(BLOCK)
        self.allocated: set[int] = set()
        self.present: dict[int, list[bool]] = {}

    async def lookup(self, offset: int, length: int) -> Mapping:
        block, within = divmod(offset, BLOCK)
        length = min(length, BLOCK - within)
        if block not in self.allocated:
            return Mapping(length, MapKind.UNALLOCATED)
        bits = self.present[block]
        first = bits[within // UNIT]
        end = within
        while end < within + length and bits[end // UNIT] == first:
            end = (end // UNIT + 1) * UNIT
        count = min(end, within + length) - within
        host = (block + 1) * BLOCK + within
        return Mapping(count, MapKind.DATA if first else MapKind.UNALLOCATED, host)

    async def map_blocks(self, guest_offset: int, count: int, host_offset: int | None) -> None:
        assert host_offset is not None
        for number in range(count):
            block = guest_offset // BLOCK + number
            self.allocated.add(block)
            self.present[block] = [True] * (BLOCK // UNIT)
            data = await self.children["file"].read(host_offset + number * BLOCK, BLOCK)
            await self.children["file"].write((block + 1) * BLOCK, data)

    async def allocate(self, length: int) -> int:
        await self.grow_file(2 * SIZE + length)
        return 2 * SIZE

    async def mark_present(self, guest_offset: int, length: int) -> None:
        assert guest_offset % UNIT == 0 and length % UNIT == 0
        for unit in range(guest_offset // UNIT, (guest_offset + length) // UNIT):
            self.present[unit * UNIT // BLOCK][unit % (BLOCK // UNIT)] = True


async def open_toy(tmp: Path, parent: bytes, allocated: list[int]) -> Node:
    ctx = OpenContext(read_only=False, locking="off")
    (tmp / "child").write_bytes(bytes(2 * SIZE))
    (tmp / "parent").write_bytes(parent)
    file = await open_image(str(tmp / "child"), ctx, fmt="file")
    backing = await open_image(str(tmp / "parent"), ctx, fmt="raw")
    node = Node(SectorBitmapToy(), "toy", False, ctx)
    node.driver.children.update(file=file, backing=backing)
    await node.driver.open({}, ctx)
    for block in allocated:         # allocated, nothing present yet
        node.driver.allocated.add(block)
        node.driver.present[block] = [False] * (BLOCK // UNIT)
    return node


writes = st.lists(st.tuples(st.integers(0, SIZE - 1), st.integers(1, 3 * UNIT)),
                  min_size=1, max_size=12)


@settings(max_examples=40, deadline=None)
@given(writes=writes, allocated=st.sets(st.integers(0, 7)), seed=st.integers(0, 99))
@example(writes=[(512, 1), (0, 1)], allocated={0}, seed=0)
def test_partially_present_blocks_read_what_was_written(
        tmp_path_factory: Any, writes: list[tuple[int, int]], allocated: set[int],
        seed: int) -> None:
    """Unaligned writes into allocated blocks with nothing present, into
    unallocated blocks and over each other: the image reads the parent with
    every write applied, and only whole units were marked present."""
    tmp = tmp_path_factory.mktemp("toy")
    parent = random.Random(seed).randbytes(SIZE)
    expected = bytearray(parent)

    async def main() -> None:
        node = await open_toy(tmp, parent, sorted(allocated))
        try:
            for offset, length in writes:
                length = min(length, SIZE - offset)
                data = random.Random(offset).randbytes(length)
                expected[offset:offset + length] = data
                await node.write(offset, data)
            assert await node.read(0, SIZE) == bytes(expected)
        finally:
            await node.aclose()
    trio.run(main)


def test_write_into_a_present_gap_goes_in_place(tmp_path: Path) -> None:
    """A write into a not-present unit of an allocated block allocates
    nothing: it lands at the block's own host offset and marks the unit."""
    parent = bytes(range(256)) * (SIZE // 256)

    async def main() -> None:
        node = await open_toy(tmp_path, parent, [1])
        toy = node.driver
        try:
            await node.write(BLOCK + 700, b"new")
            assert toy.present[1][1] and sum(toy.present[1]) == 1
            assert toy.file_end == 2 * SIZE      # nothing appended
            unit = await toy.children["file"].read(2 * BLOCK + UNIT, UNIT)
            assert unit == parent[BLOCK + UNIT:BLOCK + 700] + b"new" + \
                parent[BLOCK + 703:BLOCK + 2 * UNIT]
        finally:
            await node.aclose()
    trio.run(main)
