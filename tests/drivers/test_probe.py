"""Probing every format QEMU knows: a format imgfs has no driver for is refused
in one line by every command, never opened as raw; -f raw still reads the
file's bytes.  qemu-img's own probe is the oracle for what is not raw."""
from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imgfs.errors import ImgfsError, PermissionDenied
from imgfs.graph import open_image
from imgfs.node import Node, OpenContext
from imgfs.registry import available_drivers, probe_name
from tests.conftest import imgfs, need, run
from tests.probe_samples import CASES, KEY_BYTE, MINIMAL, refusal

#: cases QEMU 7.2's probe calls raw and imgfs does not: QEMU finds a VHD
#: footer only at offset 0, a DMG only by its ".dmg" name, a seSparse
#: extent only through a descriptor, and skips no empty line before a
#: descriptor's version
QEMU_CALLS_RAW = {"vpc-fixed", "dmg-koly-only", "vmdk-sesparse", "vmdk-descriptor-blank-lines"}


def has_driver(fmt: str) -> bool:
    return any(cls.name == fmt for cls in available_drivers())


@pytest.fixture(params=CASES, ids=[case[0] for case in CASES])
def case(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str, Path]:
    case_id, fmt, build = request.param
    return case_id, fmt, build(tmp_path)


def assert_refused_or_driven(args: list[str], image: Path, fmt: str) -> None:
    """Refused in one line, exit 1 (no driver); or, once a driver exists,
    handled by that driver and never as raw."""
    if has_driver(fmt):
        info = imgfs("info", "--output", "json", image, check=False)
        assert info.returncode in (0, 1), info.stderr
        if info.returncode == 0:
            assert json.loads(info.stdout)["format"] == fmt
        return
    result = imgfs(*args, image.name, check=False, cwd=image.parent)
    assert result.returncode == 1, result.stdout
    assert result.stderr == refusal(image.name, fmt)


@pytest.mark.parametrize("command", [["info", "--output", "json"], ["check"], ["map"]])
def test_recognised_format_is_refused(case: tuple[str, str, Path], command: list[str]) -> None:
    _case_id, fmt, image = case
    before = image.read_bytes()
    assert_refused_or_driven(command, image, fmt)
    assert image.read_bytes() == before


def test_convert_refuses_and_writes_nothing(case: tuple[str, str, Path]) -> None:
    _case_id, fmt, image = case
    if has_driver(fmt):
        pytest.skip(f"{fmt} has a driver now")
    target = image.parent / "converted.raw"
    result = imgfs("convert", "-O", "raw", image.name, target.name, check=False,
                   cwd=image.parent)
    assert (result.returncode, result.stderr) == (1, refusal(image.name, fmt))
    assert not target.exists()


def test_format_raw_opens_anything(case: tuple[str, str, Path]) -> None:
    _case_id, _fmt, image = case
    info = json.loads(imgfs("info", "-f", "raw", "--output", "json", image).stdout)
    assert info["format"] == "raw"
    assert info["virtual-size"] == image.stat().st_size


def test_qemu_probes_it_as_no_raw_image(case: tuple[str, str, Path]) -> None:
    """The oracle: qemu-img's probe names the same format, or fails opening
    it (QEMU opens anything it probes as raw) -- except where QEMU is laxer."""
    case_id, fmt, image = case
    need("qemu-img")
    result = run("qemu-img", "info", "-U", "--output", "json", image, check=False)
    if case_id in QEMU_CALLS_RAW:
        assert json.loads(result.stdout)["format"] == "raw"
    elif result.returncode == 0:
        assert json.loads(result.stdout)["format"] == fmt
    else:
        assert "Could not open" in result.stderr


def test_formats_lists_what_is_refused() -> None:
    listing = imgfs("formats").stdout
    refused = listing.split("Recognised but not supported")[-1] \
        if "Recognised but not supported" in listing else ""
    for fmt in sorted({case[1] for case in CASES}):
        if has_driver(fmt):
            assert f"\n  {fmt} " in listing.split("Protocols and sources:")[0]
        else:
            assert f"\n  {fmt} " in refused


def test_a_named_format_without_a_driver_is_refused(tmp_path: Path) -> None:
    missing = [fmt for fmt in ("vdi", "vhdx", "bochs") if not has_driver(fmt)]
    if not missing:
        pytest.skip("every one has a driver now")
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(65536))
    result = imgfs("info", "-f", missing[0], image, check=False)
    assert result.returncode == 1
    assert f"{missing[0]} images are not supported by this version" in result.stderr


def test_a_qcow2_backing_file_in_such_a_format_is_refused(tmp_path: Path) -> None:
    """A backing file without backing_fmt is probed too: never read as raw."""
    need("qemu-img")
    if has_driver("vdi"):
        pytest.skip("vdi has a driver now")
    run("qemu-img", "create", "-q", "-f", "vdi", tmp_path / "base.vdi", "4M")
    top = tmp_path / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "base.vdi", "-F", "vdi", top, "4M")
    # qemu-img 7.2 insists on a backing format: end the header extensions at
    # the backing-format one (qcow2.txt, header extension type 0xe2792aca)
    header = bytearray(top.read_bytes())
    where = header.index(bytes.fromhex("e2792aca"))
    header[where:where + 4] = bytes(4)
    top.write_bytes(header)
    assert "backing file format" not in run("qemu-img", "info", top).stdout
    result = imgfs("info", top, check=False)
    assert result.returncode == 1
    assert "vdi images are not supported by this version" in result.stderr


# -- hostile and short files ------------------------------------------------------------

SIGNATURE_PREFIXES = [b"QED\0", b"KDMV", b"COWD", b"\xbe\xba\xfe\xca\0\0\0\0", b"vhdxfile",
                      b"conectix", b"WithoutFreeSpace", b"Bochs Virtual HD Image\0",
                      b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop ", b"# Disk DescriptorFile\n",
                      b"version=1\n", b"koly", b"QFI\xfb\0\0\0\3", b"LUKS\xba\xbe\0\1"]


CUT_SIZES = [0, 1, 3, 7, 64, 511, 512, 513, 4095, 4096, 4097, 4607]


def cut_files(size: int) -> list[bytes]:
    """Every signature cut to `size` bytes, at the start, at the end (where a
    footer would be) and at both."""
    files = []
    for prefix in SIGNATURE_PREFIXES:
        head = bytearray(size)
        head[:len(prefix)] = prefix[:size]
        tail = bytearray(size)
        start = max(0, size - 512)
        tail[start:start + len(prefix)] = prefix[:size - start]
        both = bytearray(head)
        both[start:] = tail[start:size]
        files += [bytes(head), bytes(tail[:size]), bytes(both[:size])]
    return files


@pytest.mark.parametrize("size", CUT_SIZES)
def test_short_and_cut_files_never_crash_probing(tmp_path: Path, size: int) -> None:
    """Opened (probed) through the block graph: an image, or an ImgfsError."""
    image = tmp_path / "cut.img"

    async def main() -> None:
        for data in cut_files(size):
            image.write_bytes(data)
            try:
                node = await open_image(str(image), OpenContext(read_only=True, locking="off"))
            except ImgfsError:
                continue
            await node.aclose()
    trio.run(main)


def test_short_files_give_one_line(tmp_path: Path) -> None:
    """The same through the command line, for the footer-sized cut."""
    for index, data in enumerate(cut_files(511)[2::3]):
        image = tmp_path / f"cut-{index}.img"
        image.write_bytes(data)
        result = imgfs("info", "--output", "json", image, check=False)
        assert result.returncode in (0, 1), result.stderr
        assert "internal error" not in result.stderr and "Traceback" not in result.stderr
        if result.returncode == 1:
            assert result.stderr.count("\n") == 1, result.stderr


# -- the probed-raw guard through the block graph (zeroing, discarding) ----------------

def with_raw_node(image: Path, check: object, *, fmt: str | None = None) -> None:
    async def main() -> None:
        node = await open_image(str(image), OpenContext(read_only=False, locking="off"),
                                fmt=fmt)
        try:
            await check(node)  # type: ignore[operator]
        finally:
            await node.aclose()
    trio.run(main)


def test_zeroing_that_completes_a_header_is_refused(tmp_path: Path) -> None:
    """'QFI\\xfb' then version 0xff000003: raw; zeroing byte 4 would make it a
    qcow2 v3 header.  write_zeroes and discard are judged as writes of zeros."""
    image = tmp_path / "disk.img"
    image.write_bytes(b"QFI\xfb\xff\0\0\3".ljust(1 << 20, b"\0"))

    async def check(node: Node) -> None:
        assert node.format_name == "raw" and node.probed
        for operation in (node.write_zeroes, node.discard):
            with pytest.raises(PermissionDenied) as caught:
                await operation(4, 1)
            assert caught.value.errno == errno.EPERM
        await node.write_zeroes(4096, 65536)          # past the probed bytes: fine
    with_raw_node(image, check)
    assert image.read_bytes()[:8] == b"QFI\xfb\xff\0\0\3"


def test_a_footer_written_in_pieces_into_the_tail_is_refused(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    size = 1 << 20
    image.write_bytes(bytes(size))

    async def check(node: Node) -> None:
        await node.write(size - 512 + 4, b"ctix")              # harmless alone
        with pytest.raises(PermissionDenied):
            await node.write(size - 512, b"cone")              # completes "conectix"
        await node.write(size - 4096, b"koly".ljust(4096 - 512, b"\0"))   # not the trailer
        with pytest.raises(PermissionDenied):
            await node.write(size - 1024, bytes(512) + b"koly")
    with_raw_node(image, check)
    with_raw_node(image, lambda node: node.write(size - 512, b"cone"), fmt="raw")
    assert image.read_bytes()[size - 512:size - 504] == b"conectix"


@pytest.mark.parametrize("fmt", sorted(MINIMAL))
def test_every_signature_written_byte_by_byte_is_refused(tmp_path: Path, fmt: str) -> None:
    """Each signature written with its key byte last: everything before it
    is accepted, the byte that completes it is refused (EPERM) on a guessed
    raw image, and accepted with format=raw -- after which the file no
    longer probes as raw, which is what the guard prevents."""
    head, tail = MINIMAL[fmt]
    signature = head or tail
    size = 1 << 20
    start = 0 if head else size - len(tail)
    key = start + KEY_BYTE.get(fmt, 0)
    pieces = [(start, signature[:key - start]), (key + 1, signature[key - start + 1:])]
    last = (key, signature[key - start:key - start + 1])
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(size))

    async def guessed(node: Node) -> None:
        assert node.format_name == "raw" and node.probed
        for offset, data in pieces:
            if data:
                await node.write(offset, data)
        with pytest.raises(PermissionDenied) as caught:
            await node.write(*last)
        assert caught.value.errno == errno.EPERM

    async def named(node: Node) -> None:
        await node.write(*last)
    with_raw_node(image, guessed)
    with_raw_node(image, named, fmt="raw")
    data = image.read_bytes()
    assert probe_name(data[:4096], image.name, data[-512:]) == fmt


FRAGMENTS = [data for head, tail in MINIMAL.values() for data in (head, tail) if data] + [
    b"conectix", b"koly", b"version=1\n", b"# Disk DescriptorFile\n", b"\xfb", b"Q", b"\n"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(size=st.sampled_from([600, 4096, 9000]),
       writes=st.lists(st.tuples(st.integers(0, 9000), st.sampled_from(FRAGMENTS),
                                 st.integers(0, 200), st.booleans()), min_size=1, max_size=12))
def test_a_guessed_raw_never_comes_to_probe_as_another_format(
        tmp_path_factory: pytest.TempPathFactory, size: int,
        writes: list[tuple[int, bytes, int, bool]]) -> None:
    """Whatever the writes (signature fragments, cut anywhere, at any offset,
    zeroing too), the file a guessed raw leaves behind still probes as raw,
    and a refused write changes nothing."""
    image = tmp_path_factory.mktemp("guard") / "disk.img"
    image.write_bytes(bytes(size))

    async def check(node: Node) -> None:
        for offset, fragment, cut, zero in writes:
            data = fragment[cut % len(fragment):] or fragment
            offset = min(offset, size - len(data))
            before = image.read_bytes()
            try:
                if zero:
                    await node.write_zeroes(offset, len(data))
                else:
                    await node.write(offset, data)
            except PermissionDenied:
                assert image.read_bytes() == before
            after = image.read_bytes()
            assert probe_name(after[:4096], image.name, after[-512:]) == "raw"
    with_raw_node(image, check)
