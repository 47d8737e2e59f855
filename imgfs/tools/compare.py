"""`imgfs compare`: do two images read the same? (qemu-img compare)

Both images are walked by `block_status_above`, so ranges that read as
zeros in both are never read.  Differences are reported at 512-byte sector
granularity, as qemu-img reports them.  With different sizes, the excess
of the larger image must read as zeros; `strict` also fails on a size
difference and on any difference in allocation status.
"""
from __future__ import annotations

from dataclasses import dataclass

from imgfs.block import Status
from imgfs.node import Node

from .progress import Progress

SECTOR = 512
#: bytes read from each image at a time
CHUNK = 2 * 1024 * 1024
#: the status bits strict mode compares
STRICT_BITS = Status.ALLOCATED | Status.DATA | Status.ZERO


@dataclass
class Verdict:
    """The outcome: 0 identical, 1 different; the lines qemu-img prints."""

    status: int
    lines: list[str]


def first_difference(left: bytes, right: bytes) -> int | None:
    """Index of the first differing byte, or None."""
    if left == right:
        return None
    for sector in range(0, len(left), SECTOR):
        if left[sector:sector + SECTOR] != right[sector:sector + SECTOR]:
            return sector
    return len(left)


def first_nonzero_sector(data: bytes) -> int | None:
    """Offset of the first sector holding a non-zero byte, or None."""
    if data.count(0) == len(data):
        return None
    return first_difference(data, bytes(len(data)))


def mismatch(offset: int) -> Verdict:
    return Verdict(1, [f"Content mismatch at offset {offset}!"])


async def compare_images(first: Node, second: Node, *, strict: bool,
                         progress: Progress) -> Verdict:
    if strict and first.size != second.size:
        return Verdict(1, ["Strict mode: Image size mismatch!"])
    common = min(first.size, second.size)
    verdict = await _compare_common(first, second, common, strict, progress)
    if verdict is None and first.size != second.size:
        # as qemu-img, the warning comes once the common part is found equal
        larger = first if first.size > second.size else second
        verdict = await _check_zeros(larger, common, progress)
        lines = verdict.lines if verdict else ["Images are identical."]
        verdict = Verdict(verdict.status if verdict else 0,
                          ["Warning: Image size mismatch!", *lines])
    progress.done()
    return verdict or Verdict(0, ["Images are identical."])


async def _compare_common(first: Node, second: Node, end: int, strict: bool,
                          progress: Progress) -> Verdict | None:
    offset = 0
    while offset < end:
        length1, status1, _ = await first.block_status_above(offset, min(CHUNK, end - offset))
        length2, status2, _ = await second.block_status_above(offset, length1)
        if strict and status1 & STRICT_BITS != status2 & STRICT_BITS:
            return Verdict(1, [f"Strict mode: Offset {offset} block status mismatch!"])
        length = min(length1, length2)
        if (status1 | status2) & Status.DATA:
            left = await first.read(offset, length)
            right = await second.read(offset, length)
            differs = first_difference(left, right)
            if differs is not None:
                return mismatch(offset + differs)
        offset += length
        progress.update(offset)
    return None


async def _check_zeros(node: Node, offset: int, progress: Progress) -> Verdict | None:
    """The part of the larger image past the smaller one's end reads as zeros."""
    while offset < node.size:
        length, status, _ = await node.block_status_above(offset,
                                                          min(CHUNK, node.size - offset))
        if status & Status.DATA:
            nonzero = first_nonzero_sector(await node.read(offset, length))
            if nonzero is not None:
                return mismatch(offset + nonzero)
        offset += length
        progress.update(offset)
    return None
