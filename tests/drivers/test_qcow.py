"""qcow (version 1) against qemu-img / qemu-io.

Images are made by ``qemu-img create -f qcow`` and filled by qemu-io;
what imgfs reads (``convert -O raw``, ``map``, ``info``) is compared with
what qemu-img reads from the same image, and what imgfs writes or creates
is judged by ``qemu-img compare`` / ``info`` (qemu-img cannot ``check``
qcow: it says so and exits 63, and so does imgfs).  Legacy AES images come
from ``qemu-img create -f qcow -o encrypt.format=aes``: readable, never
writable, never created.  Damaged headers are one line and exit 1.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import trio
from imgfs.drivers.qcow.layout import (
    HEADER,
    QCOW_OFLAG_COMPRESSED,
    Geometry,
    Header,
    compressed_entry,
    compressed_location,
    new_image,
    plain_run,
    probe,
    unpack_table,
)

from imgfs.errors import CorruptImage, InvalidImage, ReadOnly
from imgfs.graph import open_image
from imgfs.node import OpenContext
from tests.conftest import imgfs, need, random_bytes, run, write_through_api
from tests.drivers.test_qcow2_cli import _map_runs, shared_info

KiB = 1024
MiB = 1024 * KiB
SECRET = ["--object", "secret,id=sec0,data=pass"]
#: (offset, length, pattern) written by qemu-io, out of order and unaligned
QEMU_WRITES = [(3 * MiB + 512, 5000, 0x33), (0, 64 * KiB, 0x5A), (MiB - 512, 4 * KiB, 0x77),
               (2 * MiB + 4096, 1, 0x01), (5 * MiB + 100, 300, 0xEE)]
SIZE = 6 * MiB


@pytest.fixture(autouse=True)
def _in_workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Relative backing names resolve the same way for both tools."""
    need("qemu-img", "qemu-io")
    monkeypatch.chdir(tmp_path)


# -- helpers ------------------------------------------------------------------------------

def qemu_create(image: Path, size: int | str | None = None, *options: str) -> Path:
    run("qemu-img", "create", "-q", "-f", "qcow",
        *(["-o", ",".join(options)] if options else []), image,
        *([str(size)] if size is not None else []))
    return image


def qemu_io(image: Path, *commands: str) -> None:
    args: list[str] = []
    for command in commands:
        args += ["-c", command]
    output = run("qemu-io", "-f", "qcow", *args, image).stdout
    assert "error" not in output.lower(), output


def pattern_writes(writes: list[tuple[int, int, int]]) -> list[str]:
    return [f"write -P {pattern:#x} {offset} {length}" for offset, length, pattern in writes]


def apply(data: bytearray, writes: list[tuple[int, int, int]]) -> bytearray:
    for offset, length, pattern in writes:
        data[offset:offset + length] = bytes([pattern]) * length
    return data


def qemu_raw(image: Path, out: Path, *extra: str) -> bytes:
    run("qemu-img", "convert", "-U", *extra, "-O", "raw", image, out)
    return out.read_bytes()


def imgfs_raw(source: str | Path, out: Path, *extra: str) -> bytes:
    imgfs("convert", *extra, "-O", "raw", source, out)
    return out.read_bytes()


def compare(image: Path, expected: Path) -> None:
    result = run("qemu-img", "compare", "-U", image, expected, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def qemu_compressed(source: Path, target: Path) -> Path:
    """``qemu-img convert -c -O qcow``.  QEMU 7.2 writes every cluster, then
    exits 1 without a message (its end-of-stream compressed write of zero
    bytes, which the qcow driver refuses): judge the image by what QEMU
    reads back, not by the exit status."""
    run("qemu-img", "convert", "-c", "-O", "qcow", source, target, check=False)
    compare(target, source)
    return target


def filled(tmp_path: Path, name: str = "disk.qcow") -> Path:
    image = qemu_create(tmp_path / name, SIZE)
    qemu_io(image, *pattern_writes(QEMU_WRITES))
    return image


def chain(tmp_path: Path) -> tuple[Path, bytearray]:
    """base (raw) <- mid (qcow) <- top (qcow), each layer written by qemu-io;
    returns the top and what it reads as."""
    base = tmp_path / "base.raw"
    base.write_bytes(random_bytes(4 * MiB, seed=5))
    mid = qemu_create(tmp_path / "mid.qcow", SIZE, "backing_file=base.raw", "backing_fmt=raw")
    top = qemu_create(tmp_path / "top.qcow", SIZE, "backing_file=mid.qcow", "backing_fmt=qcow")
    mid_writes = [(MiB, 64 * KiB, 0x21), (4 * MiB + 512, 512, 0x22)]
    top_writes = [(MiB + 4096, 1000, 0x31), (5 * MiB, 4096, 0x32)]
    qemu_io(mid, *pattern_writes(mid_writes))
    qemu_io(top, *pattern_writes(top_writes))
    expected = bytearray(base.read_bytes()).ljust(SIZE, b"\0")
    return top, apply(apply(expected, mid_writes), top_writes)


# -- layout (pure) ------------------------------------------------------------------------

def test_header_struct_is_48_bytes_and_round_trips() -> None:
    assert HEADER.size == 48
    header = Header(b"QFI\xfb", 1, 48, 6, 0, 10 * MiB, 9, 12, 0, 0, 56)
    assert Header.unpack(header.pack()) == header
    assert probe(header.pack(), "x") == 100
    assert probe(header._replace(version=2).pack(), "x") == 0


def test_geometry_and_entries() -> None:
    geometry = Geometry(12, 9)
    assert (geometry.cluster_size, geometry.l2_bytes, geometry.l1_span) == (4096, 4096, 2 * MiB)
    assert geometry.l1_index(2 * MiB + 5) == 1 and geometry.l2_index(2 * MiB + 8192) == 2
    assert geometry.l1_entries_for(10 * MiB + 1) == 6
    entry = compressed_entry(0x12345, 700, 12)
    assert entry & QCOW_OFLAG_COMPRESSED and compressed_location(entry, 12) == (0x12345, 700)
    table = unpack_table(struct.pack(">4Q", 4096, 8192, 16384, 0))
    assert plain_run(table, 0, 4, 4096) == 2


def test_new_image_is_what_qemu_img_creates(tmp_path: Path) -> None:
    for backing in (None, "some/base.img"):
        options = ["-u", "-F", "raw", "-b", backing] if backing else []
        run("qemu-img", "create", "-q", "-f", "qcow", *options, tmp_path / "q.qcow",
            str(3 * MiB + 512))
        head, length = new_image(3 * MiB + 512, backing)
        made = (tmp_path / "q.qcow").read_bytes()
        assert made == head.ljust(length, b"\0")


# -- reading ------------------------------------------------------------------------------

def test_convert_reads_what_qemu_reads(tmp_path: Path) -> None:
    image = filled(tmp_path)
    theirs = qemu_raw(image, tmp_path / "qemu.raw")
    assert theirs == apply(bytearray(SIZE), QEMU_WRITES)
    assert imgfs_raw(image, tmp_path / "ours.raw") == theirs


def test_compressed_clusters(tmp_path: Path) -> None:
    plain = filled(tmp_path)
    packed = qemu_compressed(plain, tmp_path / "packed.qcow")
    assert packed.stat().st_size < plain.stat().st_size
    assert imgfs_raw(packed, tmp_path / "ours.raw") == qemu_raw(plain, tmp_path / "q.raw")
    for image in (plain, packed):
        ours = json.loads(imgfs("map", "--output=json", image).stdout)
        theirs = json.loads(run("qemu-img", "map", "--output=json", image).stdout)
        assert _map_runs(ours) == _map_runs(theirs)


def test_backing_chain_three_deep(tmp_path: Path) -> None:
    top, expected = chain(tmp_path)
    assert qemu_raw(top, tmp_path / "qemu.raw") == expected
    assert imgfs_raw(top, tmp_path / "ours.raw") == expected
    ours = json.loads(imgfs("map", "--output=json", top).stdout)
    theirs = json.loads(run("qemu-img", "map", "--output=json", top).stdout)
    assert _map_runs(ours, depth_everywhere=True) == _map_runs(theirs, depth_everywhere=True)


def test_info_agrees_with_qemu_img(tmp_path: Path) -> None:
    top, _ = chain(tmp_path)
    for image in (top, tmp_path / "mid.qcow", filled(tmp_path)):
        ours = json.loads(imgfs("info", "--output=json", image).stdout)
        theirs = json.loads(run("qemu-img", "info", "--output=json", image).stdout)
        assert shared_info(ours) == shared_info(theirs)
        assert "format-specific" not in ours and "format-specific" not in theirs
    human = imgfs("info", top).stdout
    assert "file format: qcow\n" in human and "cluster_size: 512" in human
    assert "backing file: mid.qcow" in human


def test_check_is_unsupported_as_in_qemu_img(tmp_path: Path) -> None:
    image = filled(tmp_path)
    assert run("qemu-img", "check", image, check=False).returncode == 63
    result = imgfs("check", image, check=False)
    assert result.returncode == 63 and "does not support checks" in result.stderr


# -- writing and creating ---------------------------------------------------------------

def test_create_agrees_with_qemu_img(tmp_path: Path) -> None:
    """Byte for byte: geometry, backing name, L1 table and its padding."""
    (tmp_path / "base.raw").write_bytes(bytes(MiB))
    cases = {"plain": ([], ["10M"]), "odd-size": ([], ["1000k"]),
             "backing": (["-o", "backing_file=base.raw,backing_fmt=raw"], []),
             "flags": (["-b", "base.raw", "-F", "raw"], ["3M"])}
    for name, (options, size) in cases.items():
        ours, theirs = tmp_path / f"{name}.ours.qcow", tmp_path / f"{name}.qemu.qcow"
        imgfs("create", "-f", "qcow", *options, ours, *size)
        run("qemu-img", "create", "-q", "-f", "qcow", *options, theirs, *size)
        assert ours.read_bytes() == theirs.read_bytes(), name


@pytest.mark.parametrize("options", ["encryption=on", "encrypt.format=aes",
                                     "encrypt.format=aes,encrypt.key-secret=sec0"])
def test_create_refuses_aes(tmp_path: Path, options: str) -> None:
    result = imgfs("create", "-f", "qcow", *SECRET, "-o", options, tmp_path / "x.qcow", "1M",
                   check=False)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert "cannot be created" in result.stderr and "encrypt.format=luks" in result.stderr
    assert not (tmp_path / "x.qcow").exists()


def test_create_help_lists_qemu_options() -> None:
    text = imgfs("create", "-f", "qcow", "-o", "help").stdout
    for name in ("backing_file", "backing_fmt", "encrypt.format", "encrypt.key-secret",
                 "encryption"):
        assert f"  {name}=" in text


def test_convert_to_qcow_plain_and_compressed(tmp_path: Path) -> None:
    source = filled(tmp_path)
    expected = tmp_path / "expected.raw"
    qemu_raw(source, expected)
    for extra in ([], ["-c"]):
        target = tmp_path / f"out{len(extra)}.qcow"
        imgfs("convert", *extra, "-O", "qcow", source, target)
        compare(target, expected)
        info = json.loads(run("qemu-img", "info", "--output=json", target).stdout)
        assert info["format"] == "qcow" and info["virtual-size"] == SIZE
    assert (tmp_path / "out1.qcow").stat().st_size < (tmp_path / "out0.qcow").stat().st_size


def write_through_driver(image: Path, writes: list[tuple[int, bytes]]) -> None:
    write_through_api(image, writes)


def test_writes_over_plain_compressed_and_backing_clusters(tmp_path: Path) -> None:
    """Partial clusters over unallocated (with and without backing),
    compressed and plain clusters, and a run across an L2 table boundary."""
    top, expected = chain(tmp_path)
    packed = qemu_compressed(filled(tmp_path), tmp_path / "packed.qcow")
    packed_expected = apply(bytearray(SIZE), QEMU_WRITES)
    writes = [(100, b"a" * 50), (MiB - 4000, random_bytes(10_000, seed=2)),
              (2 * MiB - 3000, random_bytes(9000, seed=3)), (3 * MiB + 700, b"b" * 9000),
              (5 * MiB + 1, b"c"), (SIZE - 10, b"d" * 10), (4 * MiB, bytes(8192))]
    for image, contents in ((top, expected), (packed, packed_expected)):
        write_through_driver(image, writes)
        for offset, data in writes:
            contents[offset:offset + len(data)] = data
        (tmp_path / "expected.raw").write_bytes(contents)
        compare(image, tmp_path / "expected.raw")
        assert imgfs_raw(image, tmp_path / "ours.raw") == contents


def test_zeros_over_unallocated_clusters_allocate_nothing(tmp_path: Path) -> None:
    image = qemu_create(tmp_path / "z.qcow", SIZE)
    before = image.stat().st_size
    write_through_driver(image, [(0, bytes(MiB)), (3 * MiB + 5, bytes(100))])
    assert image.stat().st_size == before


def test_created_overlay_takes_writes(tmp_path: Path) -> None:
    base = filled(tmp_path, "base.qcow")
    overlay = tmp_path / "over.qcow"
    imgfs("create", "-q", "-f", "qcow", "-b", "base.qcow", "-F", "qcow", overlay)
    write_through_driver(overlay, [(MiB - 100, b"x" * 300)])
    contents = apply(bytearray(SIZE), QEMU_WRITES)
    contents[MiB - 100:MiB + 200] = b"x" * 300
    (tmp_path / "expected.raw").write_bytes(contents)
    compare(overlay, tmp_path / "expected.raw")
    assert qemu_raw(base, tmp_path / "b.raw") == apply(bytearray(SIZE), QEMU_WRITES)


# -- legacy AES ---------------------------------------------------------------------------

AES_WARNING = "legacy qcow AES encryption is broken by design"


def aes_source(image: Path) -> str:
    return "json:" + json.dumps({"driver": "qcow", "encrypt.key-secret": "sec0",
                                 "file": {"driver": "file", "filename": str(image)}})


def create_aes(image: Path, option: str = "encrypt.format=aes") -> Path:
    run("qemu-img", "create", "-q", "-f", "qcow", *SECRET, "-o",
        f"{option},encrypt.key-secret=sec0", image, str(SIZE))
    run("qemu-io", *SECRET, "--image-opts",
        f"driver=qcow,file.filename={image},encrypt.key-secret=sec0",
        *[arg for command in pattern_writes(QEMU_WRITES) for arg in ("-c", command)])
    return image


def qemu_aes_raw(image: Path, out: Path, secret: list[str] = SECRET) -> bytes:
    run("qemu-img", "convert", *secret, "--image-opts",
        f"driver=qcow,file.filename={image},encrypt.key-secret=sec0", "-O", "raw", out)
    return out.read_bytes()


@pytest.mark.parametrize("option", ["encrypt.format=aes", "encryption=on"])
def test_aes_convert_reads_what_qemu_reads(tmp_path: Path, option: str) -> None:
    image = create_aes(tmp_path / "aes.qcow", option)
    theirs = qemu_aes_raw(image, tmp_path / "qemu.raw")
    assert theirs == apply(bytearray(SIZE), QEMU_WRITES)
    result = imgfs("convert", *SECRET, "-O", "raw", aes_source(image), tmp_path / "ours.raw")
    assert AES_WARNING in result.stderr
    assert (tmp_path / "ours.raw").read_bytes() == theirs


def test_aes_wrong_passphrase_reads_what_qemu_reads(tmp_path: Path) -> None:
    image = create_aes(tmp_path / "aes.qcow")
    wrong = ["--object", "secret,id=sec0,data=not-it"]
    theirs = qemu_aes_raw(image, tmp_path / "qemu.raw", wrong)
    assert theirs != apply(bytearray(SIZE), QEMU_WRITES)
    assert imgfs_raw(aes_source(image), tmp_path / "ours.raw", *wrong) == theirs


def test_aes_info_and_missing_secret(tmp_path: Path) -> None:
    image = create_aes(tmp_path / "aes.qcow")
    ours = json.loads(imgfs("info", *SECRET, "--output=json", aes_source(image)).stdout)
    theirs = json.loads(run("qemu-img", "info", "--output=json", image).stdout)
    assert ours["encrypted"] is True
    assert shared_info(ours) == shared_info(theirs)
    assert "encrypted: yes" in imgfs("info", *SECRET, aes_source(image)).stdout
    # (map: qemu-img info shows an AES image without its secret, and so may imgfs info)
    result = imgfs("map", image, check=False)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "aes.qcow is encrypted: give key-secret=ID" in result.stderr


def test_aes_read_write_open_is_refused(tmp_path: Path) -> None:
    image = create_aes(tmp_path / "aes.qcow")
    before = image.read_bytes()

    async def open_rw() -> None:
        ctx = OpenContext(read_only=False, secrets={"sec0": b"pass"}, key_secret="sec0")
        with pytest.raises(ReadOnly, match="broken by design.*-o ro"):
            await open_image(str(image), ctx)
    trio.run(open_rw)
    result = imgfs("check", *SECRET, "-r", "all", aes_source(image), check=False)
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "broken by design" in result.stderr
    assert image.read_bytes() == before


# -- hostile headers ------------------------------------------------------------------------

#: header field -> (offset, struct format)
FIELDS = {"version": (4, ">I"), "backing_file_offset": (8, ">Q"),
          "backing_file_size": (16, ">I"), "size": (24, ">Q"), "cluster_bits": (32, ">B"),
          "l2_bits": (33, ">B"), "crypt_method": (36, ">I"), "l1_table_offset": (40, ">Q")}

DAMAGE = [
    ({"cluster_bits": 8}, "cluster_bits 8 out of range"),
    ({"cluster_bits": 17}, "cluster_bits 17 out of range"),
    ({"l2_bits": 5}, "l2_bits 5 out of range"),
    ({"l2_bits": 14}, "l2_bits 14 out of range"),
    ({"l1_table_offset": 1 << 40}, "runs past the end of the"),
    ({"size": (1 << 63) - 1}, "too large"),
    ({"size": 1 << 50}, "too large"),
    ({"crypt_method": 2}, "crypt_method 2 unknown"),
    ({"version": 2}, "not a qcow version 1 image"),
    ({"backing_file_offset": 1 << 30, "backing_file_size": 8}, "backing file name at"),
    ({"backing_file_offset": 48, "backing_file_size": 5000}, "backing_file_size 5000 too long"),
]


def patch(image: Path, offset: int, data: bytes) -> None:
    with open(image, "r+b") as handle:
        handle.seek(offset)
        handle.write(data)


def damage_header(image: Path, fields: dict[str, int]) -> Path:
    for name, value in fields.items():
        offset, fmt = FIELDS[name]
        patch(image, offset, struct.pack(fmt, value))
    return image


def damage_id(fields: dict[str, int]) -> str:
    return ",".join(f"{name}={value}" for name, value in fields.items())


@pytest.mark.parametrize("fields, message", DAMAGE, ids=[damage_id(d) for d, _ in DAMAGE])
def test_damaged_header_is_refused(tmp_path: Path, fields: dict[str, int],
                                   message: str) -> None:
    image = damage_header(filled(tmp_path), fields)

    async def main() -> None:
        with pytest.raises(InvalidImage, match=message):
            await open_image(str(image), OpenContext(read_only=True), fmt="qcow")
    trio.run(main)


@pytest.mark.parametrize("index", [0, 2, 4, 5])
def test_damaged_header_is_one_line_from_the_cli(tmp_path: Path, index: int) -> None:
    """Bad cluster_bits, l2_bits, L1 offset beyond the file, huge size."""
    fields, message = DAMAGE[index]
    image = damage_header(filled(tmp_path), fields)
    commands = [["info", image]]
    if index == 4:
        commands.append(["convert", "-O", "raw", image, tmp_path / "o.raw"])
    for args in commands:
        result = imgfs(*args, check=False)
        assert result.returncode == 1, result.stderr
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
        assert message in result.stderr, result.stderr


@pytest.mark.parametrize("damage", ["l1-beyond-file", "l1-into-header", "compressed-garbage"])
def test_damaged_tables_are_one_line(tmp_path: Path, damage: str) -> None:
    image = filled(tmp_path)
    if damage == "compressed-garbage":
        image = qemu_compressed(image, tmp_path / "packed.qcow")
    l1_offset = struct.unpack(">Q", image.read_bytes()[40:48])[0]
    if damage == "l1-beyond-file":
        patch(image, l1_offset, struct.pack(">Q", 1 << 40))
    elif damage == "l1-into-header":
        patch(image, l1_offset, struct.pack(">Q", 8))
    else:
        l2_offset = struct.unpack(">Q", image.read_bytes()[l1_offset:l1_offset + 8])[0]
        entry = struct.unpack(">Q", image.read_bytes()[l2_offset:l2_offset + 8])[0]
        host, _ = compressed_location(entry, 12)
        patch(image, host, b"\xff" * 32)
    result = imgfs("convert", "-O", "raw", image, tmp_path / "o.raw", check=False)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "L2 table offset" in result.stderr or "decompress" in result.stderr


@pytest.mark.parametrize("target", ["l2-table", "header", "beyond-file"])
def test_write_through_a_hostile_l2_entry_is_refused(tmp_path: Path, target: str) -> None:
    """An L2 entry aimed at the mapping itself, the header, or far past the
    end of the file: the write fails and the file is left as it was."""
    image = filled(tmp_path)
    raw = image.read_bytes()
    l2_offset = struct.unpack(">Q", raw[48:56])[0]
    host = {"l2-table": l2_offset, "header": 32, "beyond-file": 1 << 40}[target]
    patch(image, l2_offset, struct.pack(">Q", host))
    before = image.read_bytes()
    with pytest.raises(CorruptImage, match="overlaps|beyond"):
        write_through_driver(image, [(0, b"x" * 512)])
    assert image.read_bytes() == before
