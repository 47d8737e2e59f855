"""`imgfs measure`: how many bytes an image of a format needs (qemu-img measure).

The format's driver does the layout math (`BlockDriver.measure`); this
module describes the source image to it (its size, the ranges that hold
data through its chain, its persistent bitmaps) and prints the answer as
qemu-img does.
"""
from __future__ import annotations

import json

from imgfs.block import Measurement, MeasureSource, Status
from imgfs.node import Node

#: the longest range asked of block_status at a time
CHUNK = 1 << 30


async def data_status(node: Node, offset: int, length: int) -> tuple[int, bool]:
    """(length, holds data) of the range at `offset`, through the chain, as
    QEMU's block status answers it: a layer that holds the range decides;
    data whose file has a hole there is zeros when the layer says so."""
    layer: Node | None = node
    while layer is not None:
        if offset >= layer.size:
            return length, False
        extent = await layer.block_status(offset, min(length, layer.size - offset))
        length = extent.length
        if extent.status & Status.ALLOCATED:
            has_data = bool(extent.status & Status.DATA) and not extent.status & Status.ZERO
            child = layer.children.get(extent.child)
            if has_data and extent.host_offset is not None and child is not None \
                    and await layer.driver.holes_in_file_are_zeros():
                stored = await child.block_status(extent.host_offset, length)
                return stored.length, not stored.status & Status.ZERO
            return length, has_data
        layer = layer.backing
    return length, False


async def describe_source(node: Node) -> MeasureSource:
    data: list[tuple[int, int]] = []
    offset = 0
    while offset < node.size:
        length, has_data = await data_status(node, offset, min(CHUNK, node.size - offset))
        if has_data:
            if data and data[-1][0] + data[-1][1] == offset:
                data[-1] = (data[-1][0], data[-1][1] + length)
            else:
                data.append((offset, length))
        offset += length
    bitmaps = await node.driver.persistent_bitmaps()
    return MeasureSource(node.size, tuple(data),
                         tuple(bitmaps) if bitmaps is not None else None)


def render(measurement: Measurement, output: str) -> str:
    """qemu-img's text: human lines, or its JSON object (4-space indent)."""
    if output == "json":
        fields: dict[str, int] = {}
        if measurement.bitmaps is not None:
            fields["bitmaps"] = measurement.bitmaps
        fields["required"] = measurement.required
        fields["fully-allocated"] = measurement.fully_allocated
        return json.dumps(fields, indent=4)
    lines = [f"required size: {measurement.required}",
             f"fully allocated size: {measurement.fully_allocated}"]
    if measurement.bitmaps is not None:
        lines.append(f"bitmaps size: {measurement.bitmaps}")
    return "\n".join(lines)
