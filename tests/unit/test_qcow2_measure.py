"""qcow2 measure math and the backing-name header rewrite, against figures
qemu-img 7.2 printed (`qemu-img measure -O qcow2 ... --output=json`)."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from imgfs.drivers.qcow2 import create, header, measure

from imgfs.block import MeasureSource

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


def options(**given: object) -> dict[str, object]:
    return create.CREATE_OPTS.parse({key: str(value) for key, value in given.items()},
                                    what="qcow2")


@pytest.mark.parametrize("size, given, required, fully", [
    (10 * GiB, {}, 1900544, 10739318784),
    (10 * GiB, {"cluster_size": 512}, 213841408, 10951259648),
    (10 * GiB, {"cluster_size": "2M"}, 10485760, 10747904000),
    (10 * GiB, {"preallocation": "metadata"}, 1900544, 10739318784),
    (10 * GiB, {"preallocation": "full"}, 10739318784, 10739318784),
    (10 * GiB, {"compat": "0.10"}, 1900544, 10739318784),
    (10 * GiB, {"extended_l2": "on"}, 3211264, 10740629504),
    (10 * GiB, {"refcount_bits": 1}, 1572864, 10738991104),
    (10 * GiB, {"refcount_bits": 64}, 2883584, 10740301824),
    (1000, {"cluster_size": "4k"}, 20480, 24576),
])
def test_new_image_sizes_match_qemu_img(size: int, given: dict[str, object],
                                        required: int, fully: int) -> None:
    result = measure.measure(size, options(**given), None, 0)
    assert (result.required, result.fully_allocated, result.bitmaps) == (required, fully, None)


def test_luks_header_is_rounded_to_clusters() -> None:
    # qemu-img: 1 GiB, encrypt.format=luks (aes-256-xts: 2068480 header bytes)
    result = measure.measure(GiB, options(), None, 2068480)
    assert (result.required, result.fully_allocated) == (2490368, 1076232192)


def test_bitmaps_size_matches_qemu_img() -> None:
    bitmaps = (("bitmap0", 64 * KiB), ("someotherlongname", 4 * KiB))
    assert measure.bitmaps_size(bitmaps, 10 * MiB, 64 * KiB) == 327680
    assert measure.bitmaps_size(bitmaps, 10 * MiB, 4 * KiB) == 20480
    assert measure.bitmaps_size((), 10 * MiB, 64 * KiB) == 0


def test_source_with_backing_file_counts_every_cluster() -> None:
    source = MeasureSource(MiB, ((0, 4 * KiB),), ())
    result = measure.measure(0, options(backing_file="b.qcow2"), source, 0)
    assert (result.required, result.fully_allocated, result.bitmaps) == (1376256, 1376256, 0)


def qemu_count(data: list[tuple[int, int]], size: int, cluster: int) -> int:
    """qemu's loop: walk extents, a data extent widened to the end of its
    last cluster, the walk continuing from there."""
    offset, required = 0, 0
    while offset < size:
        inside = [(start, length) for start, length in data if start <= offset < start + length]
        if inside:
            start, length = inside[0]
            end = -(-(start + length) // cluster) * cluster
            required += offset % cluster + end - offset
            offset = end
        else:
            following = [start for start, _ in data if start > offset]
            offset = min(following) if following else size
    return required


@given(st.lists(st.tuples(st.integers(0, 63), st.integers(1, 8)), max_size=8),
       st.sampled_from([512, 4096, 65536]))
def test_data_clusters_count_as_qemu_walks_them(runs: list[tuple[int, int]],
                                                cluster: int) -> None:
    covered = sorted({sector for start, length in runs for sector in range(start, start + length)})
    data: list[tuple[int, int]] = []
    for sector in covered:
        if data and data[-1][0] + data[-1][1] == sector * 1000:
            data[-1] = (data[-1][0], data[-1][1] + 1000)
        else:
            data.append((sector * 1000, 1000))
    assert measure.data_clusters_bytes(tuple(data), cluster) == \
        qemu_count(data, 80_000, cluster)


def test_with_backing_keeps_other_extensions() -> None:
    settings = create.settings_from_options(MiB, options(backing_file="old.img",
                                                         backing_fmt="raw"))
    layout = create.initial_layout(MiB, settings)
    head = create.header_cluster(MiB, settings, layout)
    image = header.parse_image_header(head, 10 * MiB)
    body = header.with_backing(head, image, "new-name.qcow2", "qcow2")
    rewritten = header.parse_image_header(body.ljust(len(head), b"\0"), 10 * MiB)
    assert (rewritten.backing_file, rewritten.backing_format) == ("new-name.qcow2", "qcow2")
    assert rewritten.feature_names == image.feature_names
    assert rewritten.header._replace(backing_file_offset=0, backing_file_size=0) == \
        image.header._replace(backing_file_offset=0, backing_file_size=0)
    removed = header.parse_image_header(
        header.with_backing(head, image, None, None).ljust(len(head), b"\0"), 10 * MiB)
    assert (removed.backing_file, removed.backing_format) == (None, None)
