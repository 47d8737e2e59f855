"""Parallels expandable images against qemu-img / qemu-io.

Images are made by ``qemu-img create -f parallels`` (several cluster
sizes, including ones that are not a power of two), by rewriting such an
image into the old sector-addressed layout (``WithoutFreeSpace``), and
read from the sample image written by Parallels software; qemu-io fills
them out of order.  What imgfs reads (``convert -O raw``, ``map``,
``info``, ``check``) is compared with qemu-img on the same image; what
imgfs writes, creates, converts or repairs is judged by ``qemu-img check``
and ``qemu-img compare``.
"""
from __future__ import annotations

import array
import bz2
import json
import struct
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from imgfs.drivers.parallels.catalog import same_run, zero_run
from imgfs.drivers.parallels.layout import (
    HEADER,
    INUSE_OPEN,
    MAGIC_SECTORS,
    Header,
    check_header,
    new_image,
    probe,
)

from imgfs.errors import InvalidImage, Unsupported
from imgfs.graph import open_image
from imgfs.node import OpenContext
from tests.conftest import imgfs, need, random_bytes, write_through_api
from tests.drivers.test_qed import (
    check_json,
    human_info,
    imgfs_raw,
    info_json,
    map_json,
    patch,
    qemu_raw,
    run,
)
from tests.drivers.test_qed import out_of_order as qed_out_of_order
from tests.drivers.test_qed import qemu_create as qed_qemu_create
from tests.drivers.test_qed import qemu_io as qed_qemu_io
from tests.probe_samples import SAMPLE_IMAGES

KiB = 1024
MiB = 1024 * KiB
FMT = "parallels"
SAMPLE = SAMPLE_IMAGES / "parallels-v1.bz2"


@pytest.fixture(autouse=True)
def _in_workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    need("qemu-img", "qemu-io")
    monkeypatch.chdir(tmp_path)


# -- helpers ------------------------------------------------------------------------------

def qemu_create(image: Path, size: int, *options: str) -> Path:
    return qed_qemu_create(image, size, *options, fmt=FMT)


def qemu_io(image: Path, *commands: str) -> None:
    qed_qemu_io(image, *commands, fmt=FMT)


def out_of_order(image: Path, cluster: int, size: int) -> None:
    qed_out_of_order(image, cluster, size, fmt=FMT)


def header_of(image: Path) -> Header:
    return Header.unpack(image.read_bytes()[:HEADER.size])


def to_sector_entries(image: Path, data_off: int | None = None) -> None:
    """Rewrite an image as the old layout: ``WithoutFreeSpace``, catalog
    entries counting sectors (and maybe data_off 0: the data area then
    starts at the first sector after the catalog)."""
    header = header_of(image)
    if data_off is not None:
        header = header._replace(data_off=data_off)
    with open(image, "r+b") as handle:
        handle.write(header._replace(magic=MAGIC_SECTORS).pack())
        raw = handle.read(4 * header.bat_entries)
        entries = [entry * header.tracks for entry in
                   struct.unpack(f"<{header.bat_entries}I", raw)]
        handle.seek(HEADER.size)
        handle.write(struct.pack(f"<{header.bat_entries}I", *entries))


def sample(tmp_path: Path) -> Path:
    image = tmp_path / "sample.hds"
    image.write_bytes(bz2.decompress(SAMPLE.read_bytes()))
    return image


def check_clean(image: Path) -> None:
    result = run("qemu-img", "check", "-f", FMT, "--output=json", image, check=False)
    report = json.loads(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not report.get("corruptions") and not report.get("leaks"), report


def compare_raw(expected: bytes, image: Path) -> None:
    raw = image.parent / "expected.raw"
    raw.write_bytes(expected)
    run("qemu-img", "compare", "-q", "-f", "raw", "-F", FMT, raw, image)


def read_header_while_open(image: Path, read_only: bool) -> Header:
    async def main() -> Header:
        node = await open_image(str(image), OpenContext(read_only=read_only))
        try:
            return header_of(image)
        finally:
            await node.aclose()
    return trio.run(main)


# -- layout (pure) ------------------------------------------------------------------------

def test_header_struct_is_64_bytes_and_round_trips() -> None:
    assert HEADER.size == 64
    header = Header(b"WithouFreSpacExt", 2, 16, 40, 2048, 10, 20480, 0, 2048, 0, 0)
    assert Header.unpack(header.pack()) == header
    assert probe(header.pack(), "x") == 100
    assert probe(header._replace(magic=MAGIC_SECTORS).pack(), "x") == 100
    assert probe(header._replace(version=3).pack(), "x") == 0     # QEMU: raw
    assert probe(b"QFI\xfb" + bytes(60), "x") == 0


@pytest.mark.parametrize("option, cluster, size", [
    ("", MiB, 10 * MiB), ("cluster_size=64k", 65536, 3 * MiB),
    ("cluster_size=3k", 3072, MiB), ("cluster_size=1000", 1000, MiB),
    ("cluster_size=100", 100, MiB), ("cluster_size=64k", 65536, 1001),
    ("cluster_size=4k", 4096, 100 * MiB), ("cluster_size=64k", 65536, 0),
    ("cluster_size=1M", MiB, 64 * 1024 * MiB)])
def test_new_image_is_what_qemu_img_creates(tmp_path: Path, option: str, cluster: int,
                                            size: int) -> None:
    image = qemu_create(tmp_path / "q.prl", size, *([option] if option else []))
    head, length = new_image(-(-size // 512) * 512, {"cluster_size": cluster})
    data = image.read_bytes()
    assert len(data) == length
    assert data[:len(head)] == head and not any(data[len(head):])


@pytest.mark.parametrize("field, value, error", [
    ("magic", b"WithoutFreeSpacX", InvalidImage), ("version", 3, InvalidImage),
    ("tracks", 0, InvalidImage), ("tracks", 1 << 28, InvalidImage),
    ("bat_entries", 1 << 30, InvalidImage), ("nb_sectors", 1 << 63, InvalidImage),
    ("data_off", 3, InvalidImage), ("ext_off", 8, Unsupported)])
def test_check_header_refuses(field: str, value: object, error: type) -> None:
    header = Header(b"WithouFreSpacExt", 2, 16, 40, 128, 480, 61440, 0, 128, 0, 0)
    check_header(header)
    with pytest.raises(error):
        check_header(header._replace(**{field: value}))


@given(st.lists(st.integers(0, 0xFFFF_FFFF), min_size=1, max_size=40),
       st.integers(1, 3), st.integers(0, 40), st.sampled_from([1, 8, 128]))
def test_runs_match_a_plain_loop(tail: list[int], start: int, length: int,
                                 step: int) -> None:
    """zero_run and same_run (slice comparisons) agree with counting one
    entry at a time."""
    for first in (0, start, 0xFFFF_FFFF - step):
        entries = array.array("I", [min(first + number * step, 0xFFFF_FFFF)
                                    for number in range(length)] + tail)
        expected = 1
        wanted_step = step if entries[0] else 0
        while expected < len(entries) and \
                entries[expected] == entries[0] + expected * wanted_step:
            expected += 1
        found = same_run(entries, step) if entries[0] else zero_run(entries)
        assert found == expected


# -- reading ------------------------------------------------------------------------------

@pytest.mark.parametrize("options, cluster", [
    (("cluster_size=64k",), 65536), (("cluster_size=4k",), 4096),
    (("cluster_size=3k",), 3072), ((), MiB)])
def test_reads_what_qemu_reads(tmp_path: Path, options: tuple[str, ...], cluster: int) -> None:
    size = 20 * cluster + 512
    image = qemu_create(tmp_path / "a.prl", size, *options)
    out_of_order(image, cluster, size)
    assert imgfs_raw(image) == qemu_raw(image)
    assert map_json("imgfs", image) == map_json("qemu-img", image)
    assert check_json("imgfs", image) == check_json("qemu-img", image)


@pytest.mark.parametrize("data_off", [None, 0])
def test_sector_addressed_images_read_and_write_like_qemu(tmp_path: Path,
                                                          data_off: int | None) -> None:
    """The old layout: entries in sectors; qemu-io then adds clusters to it,
    and imgfs more (not cluster aligned in the file when data_off is 0)."""
    image = qemu_create(tmp_path / "old.prl", 2 * MiB, "cluster_size=64k")
    qemu_io(image, "write -P 0x61 70000 100000", "write -P 0x62 0 512")
    to_sector_entries(image, data_off)
    qemu_io(image, "write -P 0x63 1500000 200000", "write -P 0x64 65536 3")
    assert header_of(image).magic == MAGIC_SECTORS
    assert imgfs_raw(image) == qemu_raw(image)
    assert map_json("imgfs", image) == map_json("qemu-img", image)
    assert check_json("imgfs", image) == check_json("qemu-img", image)
    expected = bytearray(qemu_raw(image))
    writes = [(300000, random_bytes(70000, seed=4)), (2 * MiB - 5, b"12345")]
    write_through_api(image, writes)
    for offset, data in writes:
        expected[offset:offset + len(data)] = data
    check_clean(image)
    compare_raw(bytes(expected), image)


def test_sample_from_parallels_reads_like_qemu(tmp_path: Path) -> None:
    image = sample(tmp_path)
    assert imgfs_raw(image) == qemu_raw(image)
    assert map_json("imgfs", image) == map_json("qemu-img", image)
    assert check_json("imgfs", image) == check_json("qemu-img", image)


def test_info_agrees_with_qemu_img(tmp_path: Path) -> None:
    for image in [sample(tmp_path), qemu_create(tmp_path / "a.prl", 5 * MiB + 512,
                                                "cluster_size=4k")]:
        ours, theirs = info_json("imgfs", image), info_json("qemu-img", image)
        assert set(ours) == set(theirs)
        shared = set(theirs) - {"actual-size"}
        assert {key: ours.get(key) for key in shared} == {key: theirs[key] for key in shared}
        assert human_info("imgfs", image) == human_info("qemu-img", image)


def test_clusters_past_the_catalog_or_the_file_read_as_zeros(tmp_path: Path) -> None:
    """As QEMU: a disk larger than its catalog, an entry past the end."""
    image = qemu_create(tmp_path / "a.prl", MiB, "cluster_size=64k")
    qemu_io(image, "write -P 0x71 0 128k")
    patch(image, 32, struct.pack("<I", 4))          # 4 catalog entries for 16 clusters
    patch(image, 64 + 4, struct.pack("<I", 99))     # cluster 1 far past the end
    assert imgfs_raw(image) == qemu_raw(image)
    assert check_json("imgfs", image) == check_json("qemu-img", image)


# -- writing, creating, converting -----------------------------------------------------------

@pytest.mark.parametrize("options, cluster", [(("cluster_size=64k",), 65536),
                                              (("cluster_size=3k",), 3072)])
def test_writes_through_the_api_pass_qemu_check(tmp_path: Path, options: tuple[str, ...],
                                                cluster: int) -> None:
    size = 30 * cluster
    image = qemu_create(tmp_path / "w.prl", size, *options)
    out_of_order(image, cluster, size)
    expected = bytearray(qemu_raw(image))
    writes = [(5 * cluster - 7, random_bytes(3 * cluster, seed=1)),
              (cluster // 2, b"in place"), (20 * cluster + 1, bytes(2 * cluster)),
              (25 * cluster, random_bytes(cluster, seed=2)), (size - 1, b"!"),
              (14 * cluster + 100, random_bytes(100, seed=3))]
    write_through_api(image, writes)
    for offset, data in writes:
        expected[offset:offset + len(data)] = data
    check_clean(image)
    compare_raw(bytes(expected), image)
    assert header_of(image).inuse == 0


def test_create_and_convert_are_what_qemu_opens(tmp_path: Path) -> None:
    source = tmp_path / "src.raw"
    data = bytearray(3 * MiB + 512)
    data[100:200] = b"x" * 100
    data[2 * MiB:2 * MiB + 70000] = random_bytes(70000, seed=5)
    source.write_bytes(bytes(data))
    for options in ["cluster_size=64k", "cluster_size=1000"]:
        ours = tmp_path / "ours.prl"
        theirs = tmp_path / "theirs.prl"
        imgfs("create", "-q", "-f", FMT, "-o", options, ours, "7M")
        qemu_create(theirs, 7 * MiB, options)
        assert ours.read_bytes() == theirs.read_bytes()
        converted = tmp_path / "c.prl"
        imgfs("convert", "-O", FMT, "-o", options, source, converted)
        check_clean(converted)
        compare_raw(bytes(data), converted)
        for path in (ours, theirs, converted):
            path.unlink()


def test_create_refuses_what_qemu_refuses(tmp_path: Path) -> None:
    for options, size in [("cluster_size=2G", "4G"), ("cluster_size=1M", "4P"),
                          ("cluster_size=0", "1M"), ("cluster_size=4k", "8T")]:
        result = imgfs("create", "-q", "-f", FMT, "-o", options, tmp_path / "x.prl", size,
                       check=False)
        assert result.returncode != 0 and result.stderr.count("\n") == 1, result.stderr


def test_resize_is_refused_as_in_qemu(tmp_path: Path) -> None:
    image = qemu_create(tmp_path / "r.prl", MiB)
    result = imgfs("resize", image, "2M", check=False)
    assert result.returncode == 1 and "resize" in result.stderr


# -- the in-use flag, check and repair --------------------------------------------------------

def test_in_use_while_open_read_write_and_cleared_on_close(tmp_path: Path) -> None:
    image = qemu_create(tmp_path / "f.prl", MiB, "cluster_size=64k")
    assert read_header_while_open(image, read_only=False).inuse == INUSE_OPEN
    assert header_of(image).inuse == 0
    assert read_header_while_open(image, read_only=True).inuse == 0


def test_an_image_left_in_use_opens_read_only_only(tmp_path: Path) -> None:
    image = qemu_create(tmp_path / "d.prl", MiB, "cluster_size=64k")
    qemu_io(image, "write -P 0x33 0 64k")
    patch(image, 44, struct.pack("<I", INUSE_OPEN))
    imgfs("convert", "-O", "raw", image, tmp_path / "out.raw")
    assert (tmp_path / "out.raw").read_bytes()[:65536] == b"\x33" * 65536
    result = run("qemu-io", "-f", FMT, "-c", "write 0 512", image, check=False)
    assert "not closed correctly" in result.stderr
    with pytest.raises(Exception, match="not closed correctly"):
        write_through_api(image, [(0, b"x")])
    assert check_json("imgfs", image) == check_json("qemu-img", image)


@pytest.mark.parametrize("damage, mode", [("in use", "leaks"), ("in use", "all"),
                                          ("leak", "leaks"), ("outside", "all"),
                                          ("all", "leaks"), ("all", "all")])
def test_check_and_repair_as_qemu_img(tmp_path: Path, damage: str, mode: str) -> None:
    base = qemu_create(tmp_path / "base.prl", 3 * MiB, "cluster_size=64k")
    qemu_io(base, "write -P 0x11 2M 100k", "write -P 0x22 0 4k", "write -P 0x33 1M 64k")
    if damage in ("in use", "all"):
        patch(base, 44, struct.pack("<I", INUSE_OPEN))
    if damage in ("leak", "all"):
        with open(base, "r+b") as handle:
            handle.truncate(base.stat().st_size + 100000)
    if damage in ("outside", "all"):
        patch(base, 64 + 4 * 3, struct.pack("<I", 0x40))
    ours, theirs = tmp_path / "ours.prl", tmp_path / "theirs.prl"
    ours.write_bytes(base.read_bytes())
    theirs.write_bytes(base.read_bytes())
    assert check_json("imgfs", ours) == check_json("qemu-img", theirs)
    assert check_json("imgfs", ours, "-r", mode) == check_json("qemu-img", theirs, "-r", mode)
    assert header_of(ours).inuse == header_of(theirs).inuse
    if damage in ("outside", "all"):
        # QEMU 7.2 then grows the file to the end of the entry it cleared
        # (fixed in later QEMUs); imgfs never makes a file longer
        assert ours.stat().st_size <= base.stat().st_size
        assert check_json("imgfs", ours)[0] == (0 if mode == "all" else 2)
    else:
        assert check_json("imgfs", ours) == check_json("qemu-img", theirs)
    if mode == "all":
        check_clean(ours)
    assert imgfs_raw(ours) == qemu_raw(ours)


# -- .hdd bundles -----------------------------------------------------------------------------

TOP_GUID = "{5fbaabe3-6958-40ff-92a7-860e329aab41}"
ROOT_GUID = "{2cd4a1e0-7c3b-4f5e-9d1a-0b6c8e2f4a11}"
MIDDLE_GUID = "{9e8d7c6b-5a49-4382-a170-f6e5d4c3b2a1}"
NO_PARENT = "{00000000-0000-0000-0000-000000000000}"


def descriptor(size: int, images: list[tuple[str, str, str]], shots: list[tuple[str, str]],
               top: str | None = None, block_sectors: int = 2048) -> str:
    """DiskDescriptor.xml as Parallels writes it (prl-xml.txt), with the
    nodes its software adds and QEMU's spec says to leave alone."""
    sectors = size // 512
    image_xml = "".join(f"""
            <Image>
                <GUID>{guid}</GUID>
                <Type>{kind}</Type>
                <File>{name}</File>
            </Image>""" for guid, kind, name in images)
    shot_xml = "".join(f"""
        <Shot>
            <GUID>{guid}</GUID>
            <ParentGUID>{parent}</ParentGUID>
        </Shot>""" for guid, parent in shots)
    top_xml = f"\n        <TopGUID>{top}</TopGUID>" if top else ""
    return f"""<?xml version='1.0' encoding='UTF-8'?>
<Parallels_disk_image Version="1.0">
    <Disk_Parameters>
        <Disk_size>{sectors}</Disk_size>
        <Cylinders>{sectors // 512}</Cylinders>
        <Heads>16</Heads>
        <Sectors>32</Sectors>
        <Padding>0</Padding>
        <Encryption>
            <Engine>{NO_PARENT}</Engine>
            <Data></Data>
        </Encryption>
        <UID>{{6b0e1f4c-2d3a-4b5c-8e9f-0a1b2c3d4e5f}}</UID>
        <Name>disk</Name>
        <Miscellaneous>
            <CompatLevel>level2</CompatLevel>
            <Bootable>1</Bootable>
            <SuspendState>0</SuspendState>
        </Miscellaneous>
    </Disk_Parameters>
    <StorageData>
        <Storage>
            <Start>0</Start>
            <End>{sectors}</End>
            <Blocksize>{block_sectors}</Blocksize>{image_xml}
        </Storage>
    </StorageData>
    <Snapshots>{top_xml}{shot_xml}
    </Snapshots>
</Parallels_disk_image>
"""


def hds_name(guid: str) -> str:
    return f"harddisk.hdd.0.{guid}.hds"


def bundle(tmp_path: Path, size: int = 4 * MiB, plain_root: bool = False) -> Path:
    """disk.hdd/: a root written by qemu-io, a middle snapshot and the top
    one, each an overlay holding what changed (as Parallels lays it out)."""
    directory = tmp_path / "disk.hdd"
    directory.mkdir()
    root = directory / hds_name(ROOT_GUID)
    if plain_root:
        root.write_bytes(random_bytes(size, seed=21))
    else:
        qemu_create(root, size, "cluster_size=64k")
        qemu_io(root, "write -P 0x11 0 1M", "write -P 0x12 3M 100k")
    for guid, pattern in ((MIDDLE_GUID, "0x22 512k 128k"), (TOP_GUID, "0x33 576k 200k")):
        qemu_create(directory / hds_name(guid), size, "cluster_size=64k")
        qemu_io(directory / hds_name(guid), f"write -P {pattern}")
    images = [(ROOT_GUID, "Plain" if plain_root else "Compressed", hds_name(ROOT_GUID)),
              (MIDDLE_GUID, "Compressed", hds_name(MIDDLE_GUID)),
              (TOP_GUID, "Compressed", hds_name(TOP_GUID))]
    shots = [(ROOT_GUID, NO_PARENT), (MIDDLE_GUID, ROOT_GUID), (TOP_GUID, MIDDLE_GUID)]
    (directory / "DiskDescriptor.xml").write_text(descriptor(size, images, shots))
    return directory


def qemu_chain(directory: Path, guids: list[str], plain_root: bool = False) -> dict:
    """The same chain as a QEMU json: tree (QEMU opens no descriptor)."""
    tree: dict | None = None
    for number, guid in enumerate(reversed(guids)):
        driver = "raw" if plain_root and number == 0 else FMT
        layer: dict = {"driver": driver, "file": {"driver": "file",
                                                  "filename": str(directory / hds_name(guid))}}
        if tree is not None:
            layer["backing"] = tree
        tree = layer
    assert tree is not None
    return tree


def qemu_chain_raw(directory: Path, guids: list[str], plain_root: bool = False) -> bytes:
    out = directory.parent / "chain.raw"
    run("qemu-img", "convert", "-O", "raw",
        "json:" + json.dumps(qemu_chain(directory, guids, plain_root)), out)
    return out.read_bytes()


@pytest.mark.parametrize("plain_root", [False, True])
def test_bundle_reads_as_qemu_reads_its_chain(tmp_path: Path, plain_root: bool) -> None:
    directory = bundle(tmp_path, plain_root=plain_root)
    expected = qemu_chain_raw(directory, [TOP_GUID, MIDDLE_GUID, ROOT_GUID], plain_root)
    assert imgfs_raw(directory) == expected
    assert imgfs_raw(directory / "DiskDescriptor.xml", "xml.raw") == expected
    chain = map_json("qemu-img", "json:" + json.dumps(qemu_chain(
        directory, [TOP_GUID, MIDDLE_GUID, ROOT_GUID], plain_root)))   # type: ignore[arg-type]
    assert map_json("imgfs", directory) == chain


def test_bundle_opens_an_older_snapshot_by_guid(tmp_path: Path) -> None:
    directory = bundle(tmp_path)
    tree = {"driver": FMT, "guid": MIDDLE_GUID, "file": {"driver": "file",
                                                         "filename": str(directory)}}
    out = tmp_path / "middle.raw"
    imgfs("convert", "-O", "raw", "json:" + json.dumps(tree), out)
    assert out.read_bytes() == qemu_chain_raw(directory, [MIDDLE_GUID, ROOT_GUID])


def test_bundle_top_guid_element_names_the_top(tmp_path: Path) -> None:
    directory = bundle(tmp_path)
    xml = directory / "DiskDescriptor.xml"
    text = xml.read_text().replace("<Snapshots>", f"<Snapshots>\n<TopGUID>{MIDDLE_GUID}"
                                   "</TopGUID>")
    xml.write_text(text)
    assert imgfs_raw(directory) == qemu_chain_raw(directory, [MIDDLE_GUID, ROOT_GUID])


def test_bundle_writes_go_to_the_top_image(tmp_path: Path) -> None:
    directory = bundle(tmp_path)
    before = {path.name: path.read_bytes() for path in directory.iterdir()
              if TOP_GUID not in path.name}
    expected = bytearray(imgfs_raw(directory))
    writes = [(600 * KiB + 3, random_bytes(70000, seed=8)), (3 * MiB + 10, b"top"),
              (4 * MiB - 1, b"!")]
    write_through_api(directory, writes)
    for offset, data in writes:
        expected[offset:offset + len(data)] = data
    assert imgfs_raw(directory, "after.raw") == bytes(expected)
    assert qemu_chain_raw(directory, [TOP_GUID, MIDDLE_GUID, ROOT_GUID]) == bytes(expected)
    assert before == {path.name: path.read_bytes() for path in directory.iterdir()
                      if TOP_GUID not in path.name}
    check_clean(directory / hds_name(TOP_GUID))
    assert header_of(directory / hds_name(TOP_GUID)).inuse == 0


def test_bundle_of_one_plain_image_reads_and_writes(tmp_path: Path) -> None:
    directory = tmp_path / "plain.hdd"
    directory.mkdir()
    data = bytearray(random_bytes(2 * MiB, seed=12))
    (directory / hds_name(TOP_GUID)).write_bytes(bytes(data))
    (directory / "DiskDescriptor.xml").write_text(descriptor(
        2 * MiB, [(TOP_GUID, "Plain", hds_name(TOP_GUID))], [(TOP_GUID, NO_PARENT)]))
    assert imgfs_raw(directory) == bytes(data)
    write_through_api(directory, [(70000, b"plain write")])
    data[70000:70011] = b"plain write"
    assert (directory / hds_name(TOP_GUID)).read_bytes() == bytes(data)


BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>
<Parallels_disk_image Version="1.0"><Disk_Parameters><Disk_size>&lol3;</Disk_size>
</Disk_Parameters></Parallels_disk_image>
"""


@pytest.mark.parametrize("damage", ["not xml", "entities", "external entity", "too large",
                                    "loop", "missing image", "split", "padding", "deep",
                                    "size mismatch", "not a number", "unknown type"])
def test_hostile_descriptors_are_one_line_refusals(tmp_path: Path, damage: str) -> None:
    directory = bundle(tmp_path)
    xml = directory / "DiskDescriptor.xml"
    text = xml.read_text()
    damaged = {
        "not xml": "<Parallels_disk_image Version='1.0'><Disk_Parameters>",
        "entities": BILLION_LAUGHS,
        "external entity": '<?xml version="1.0"?><!DOCTYPE p [<!ENTITY x SYSTEM '
                           '"file:///etc/passwd">]><Parallels_disk_image>&x;'
                           '</Parallels_disk_image>',
        "too large": text.replace("<Name>disk</Name>", "<Name>" + "x" * (2 * MiB) + "</Name>"),
        "loop": text.replace(f"<ParentGUID>{NO_PARENT}</ParentGUID>",
                             f"<ParentGUID>{TOP_GUID}</ParentGUID>"),
        "missing image": text.replace(f"<GUID>{ROOT_GUID}</GUID>\n                <Type>",
                                      "<GUID>{x}</GUID>\n                <Type>"),
        "split": text.replace("<Storage>", "<Storage><Start>0</Start></Storage><Storage>"),
        "padding": text.replace("<Padding>0</Padding>", "<Padding>1</Padding>"),
        "deep": text.replace("<Name>disk</Name>", "<a>" * 40 + "</a>" * 40),
        "size mismatch": text.replace("<Disk_size>8192</Disk_size>",
                                      "<Disk_size>4096</Disk_size>").replace(
                                          "<End>8192</End>", "<End>4096</End>"),
        "not a number": text.replace("<Disk_size>8192</Disk_size>",
                                     "<Disk_size>-1</Disk_size>"),
        "unknown type": text.replace("<Type>Compressed</Type>", "<Type>Exotic</Type>", 1),
    }[damage]
    xml.write_text(damaged)
    for command in ("info", "map"):
        result = imgfs(command, directory, check=False, timeout=30)
        assert result.returncode == 1, result
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("imgfs:"), result.stderr


@pytest.mark.parametrize("cluster, extra", [("cluster_size=4k", 0), ("cluster_size=64k", 70000)])
def test_check_of_an_empty_old_image_counts_as_qemu(tmp_path: Path, cluster: str,
                                                    extra: int) -> None:
    """data_off 0 and no cluster: QEMU's image end is the catalog's end
    rounded up to a cluster (past it: leaked)."""
    image = qemu_create(tmp_path / "e.prl", 3 * MiB, cluster)
    to_sector_entries(image, data_off=0)
    with open(image, "r+b") as handle:
        handle.truncate(image.stat().st_size + extra)
    assert check_json("imgfs", image) == check_json("qemu-img", image)
