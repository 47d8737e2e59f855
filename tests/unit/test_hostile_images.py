"""Hostile input is normal input: damaged images of every format imgfs reads.

Each format gets small valid images, built once by qemu-img / qemu-io /
cryptsetup.  Hypothesis then writes random bytes, flipped bits, extreme
integers and the offsets of the image's own tables into its header fields
and first metadata tables (L1/L2 entries, refcount table and block,
snapshot table, header extensions, bitmap directory, LUKS key slots, and
the LUKS2 JSON area with its checksums made valid again so that the parser
behind them is reached).  Each damaged image is opened through the Python
API, read in 64 KiB chunks, walked with block_status, described as `imgfs
info`, `map` and `check` describe it, and (a second test) written through.

Only `imgfs.errors.ImgfsError` may come out, and not one the core made by
wrapping a driver's accident (struct.error, ValueError, ...).  Anything
else (IndexError, ZeroDivisionError, MemoryError, an open slower than 20 s,
a request slower than 5 s) is a bug.  The address space is capped while an
example runs, so that a header field sizing an allocation shows up as
MemoryError instead of taking the machine down, and a watchdog signal
catches loops that never reach a trio checkpoint.

The CLI turns a damaged image into one `imgfs:` line and a non-zero
status; a mount answers EIO for the one request that meets the damage and
stays up.  Bugs found this way keep a regression case near the end.

Every run is deterministic (derandomize, no example database);
HOSTILE_EXAMPLES=N runs a longer hunt.
"""
from __future__ import annotations

import contextlib
import copy
import errno
import hashlib
import json
import os
import resource
import signal
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imgfs.check import render_json as render_check
from imgfs.commands import allocation_map
from imgfs.errors import ImgfsError
from imgfs.graph import open_image
from imgfs.info import image_info, render_human, render_json
from imgfs.node import OpenContext
from tests.conftest import (
    imgfs,
    is_mounted,
    mounted,
    need,
    need_root_or_fuse,
    qemu_img_create_encrypted,
)

KiB = 1024
MiB = 1024 * KiB
CHUNK = 64 * KiB
PASS = "hostile-pass"
#: a request (open, one chunk, one block_status) slower than this is a hang
REQUEST_SECONDS = 5
#: an example allocating more than this beyond what the process holds is a bug
MEMORY_HEADROOM = 1 << 30
#: reads and block_status calls per example when a damaged size is huge
MAX_CALLS = 256

#: examples per test; HOSTILE_EXAMPLES=1000 for a longer (still deterministic) hunt
EXAMPLES = int(os.environ.get("HOSTILE_EXAMPLES", "60"))
#: most edits in one damaged image (HOSTILE_EDITS=8: heavier damage)
MAX_EDITS = int(os.environ.get("HOSTILE_EDITS", "3"))
SETTINGS = settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# -- building the images ----------------------------------------------------------------------

@dataclass
class Sample:
    """One valid image and where its metadata lives."""

    name: str
    fmt: str
    path: Path
    #: (start, length): header fields and the first bytes of each metadata table
    regions: list[tuple[int, int]] = field(default_factory=list)
    secret: bool = False
    #: bytes at the start the damage leaves alone (the magic)
    magic_length: int = 4

    def __post_init__(self) -> None:
        size = self.path.stat().st_size
        self.regions = [(start, min(length, size - start)) for start, length in self.regions
                        if 0 <= start < size and length > 0]

    def __repr__(self) -> str:
        return f"<{self.name}>"

    @property
    def data(self) -> bytes:
        return self.path.read_bytes()


def tool(*args: str | os.PathLike[str], stdin: bytes | None = None,
         cwd: Path | None = None) -> None:
    # (QEMU 7.2 opens a relative data_file name against its working
    # directory, imgfs against the image's: run where the two agree)
    result = subprocess.run([str(arg) for arg in args], input=stdin, capture_output=True,
                            check=False, timeout=60, cwd=cwd)
    assert result.returncode == 0, (args, result.stdout, result.stderr)


def qemu_io(path: Path, fmt: str, *commands: str) -> None:
    args: list[str] = ["qemu-io", "-f", fmt]
    for command in commands:
        args += ["-c", command]
    tool(*args, path, cwd=path.parent)


def qcow2_image(directory: Path, name: str, *options: str, compressed: bool = False,
                backing: Path | None = None) -> Path:
    path = directory / f"{name}.qcow2"
    args: list[str | Path] = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if options:
        args += ["-o", ",".join(options)]
    if backing is not None:
        args += ["-b", backing.name, "-F", "qcow2"]
    tool(*args, path, "1M", cwd=directory)
    flag = "-c " if compressed else ""
    qemu_io(path, "qcow2", f"write {flag}-P 0x11 0 64k", f"write {flag}-P 0x22 192k 64k",
            "write -P 0x33 700k 4k", "write -z 512k 64k")
    return path


def qemu_img_luks(path: Path) -> None:
    """LUKS1 as qemu-img makes it, with a fast PBKDF."""
    qemu_img_create_encrypted("-f", "luks", "--object", f"secret,id=sec0,data={PASS}",
                              "-o", "key-secret=sec0,iter-time=10", path, "256k")


BITMAPS_EXTENSION = 0x23852875


def qcow2_luks_image(directory: Path) -> Path:
    """qcow2 with encrypt.format=luks (a fast PBKDF)."""
    path = directory / "crypt.qcow2"
    qemu_img_create_encrypted("-f", "qcow2", "--object", f"secret,id=sec0,data={PASS}",
                              "-o", "encrypt.format=luks,encrypt.key-secret=sec0,"
                              "encrypt.iter-time=10,cluster_size=4k", path, "1M")
    tool("qemu-io", "--object", f"secret,id=sec0,data={PASS}", "--image-opts",
         f"driver=qcow2,encrypt.key-secret=sec0,file.filename={path}",
         "-c", "write -P 0x11 0 8k", "-c", "write -P 0x22 300k 4k")
    return path


CRYPTO_EXTENSION = 0x0537BE77


def qcow2_extensions(data: bytes, start: int, end: int) -> dict[int, tuple[int, int]]:
    """Header extensions by type: (offset of their data, length)."""
    found = {}
    offset = start
    while offset + 8 <= end:
        kind, length = struct.unpack_from(">II", data, offset)
        if kind == 0:
            break
        found[kind] = (offset + 8, length)
        offset += 8 + (length + 7) // 8 * 8
    return found


def qcow2_regions(data: bytes) -> list[tuple[int, int]]:
    """The header, its extensions, and the first bytes of every table
    (all of the first L2 table that maps the 1 MiB disk)."""
    (version, backing_offset, backing_len, cluster_bits, size, _crypt, l1_size, l1_offset,
     refcount_offset, _refcount_clusters, nb_snapshots, snapshots_offset) = struct.unpack_from(
        ">IQIIQIIQQIIQ", data, 4)
    cluster = 1 << cluster_bits
    header_length = 72 if version == 2 else struct.unpack_from(">I", data, 100)[0]
    extended_l2 = version == 3 and struct.unpack_from(">Q", data, 72)[0] & 16
    regions = [(0, header_length)]
    extensions_end = min(cluster, backing_offset or cluster)
    if extensions_end > header_length:
        regions.append((header_length, min(extensions_end - header_length, 512)))
    if backing_offset:
        regions.append((backing_offset, backing_len))
    regions.append((l1_offset, min(l1_size * 8, 64)))
    l2_offset = struct.unpack_from(">Q", data, l1_offset)[0] & 0x00FF_FFFF_FFFF_FE00
    if l2_offset:
        regions.append((l2_offset, min(cluster, size // cluster * (16 if extended_l2 else 8))))
    regions.append((refcount_offset, 64))
    block_offset = struct.unpack_from(">Q", data, refcount_offset)[0]
    if block_offset:
        regions.append((block_offset, 128))
    if nb_snapshots:
        regions.append((snapshots_offset, 512))
        snapshot_l1 = struct.unpack_from(">Q", data, snapshots_offset)[0]
        regions.append((snapshot_l1, 64))
    crypto = qcow2_extensions(data, header_length, extensions_end).get(CRYPTO_EXTENSION)
    if crypto is not None:
        luks_offset = struct.unpack_from(">Q", data, crypto[0])[0]
        regions += [(luks_offset, 208), (luks_offset + 208, 96)]     # as LUKS1_REGIONS
    bitmaps = qcow2_extensions(data, header_length, extensions_end).get(BITMAPS_EXTENSION)
    if bitmaps is not None:
        directory = struct.unpack_from(">Q", data, bitmaps[0] + 16)[0]
        regions.append((directory, 128))
        table = struct.unpack_from(">Q", data, directory)[0]
        regions.append((table, 64))
    return regions


def qcow_regions(data: bytes) -> list[tuple[int, int]]:
    backing_offset, backing_len = struct.unpack_from(">QI", data, 8)
    l1_offset = struct.unpack_from(">Q", data, 40)[0]
    regions = [(0, 48), (l1_offset, 64)]
    if backing_offset:
        regions.append((backing_offset, backing_len))
    l2_offset = struct.unpack_from(">Q", data, l1_offset)[0] & ~(1 << 63)
    if l2_offset:
        regions.append((l2_offset, 256))
    return regions


def qed_regions(data: bytes) -> list[tuple[int, int]]:
    """The header, the backing name, and the first bytes of L1 and of the
    first L2 table (QED's fields are little-endian)."""
    l1_offset, _size, name_offset, name_size = struct.unpack_from("<QQII", data, 40)
    regions = [(0, 64), (l1_offset, 64)]
    if name_offset:
        regions.append((name_offset, name_size))
    l2_offset = struct.unpack_from("<Q", data, l1_offset)[0]
    if l2_offset:
        regions.append((l2_offset, 256))
    return regions


def vpc_regions(data: bytes) -> list[tuple[int, int]]:
    """The footer (its copy at 0 too), the dynamic header's fields and its
    first parent locator, and the first BAT entries (VHD is big-endian)."""
    regions = [(len(data) - 512, 85)]
    if data[:8] == b"conectix":
        header = struct.unpack_from(">Q", data, 16)[0]
        table = struct.unpack_from(">Q", data, header + 16)[0]
        regions += [(0, 85), (header, 64), (header + 576, 48), (table, 64)]
        first_locator = struct.unpack_from(">Q", data, header + 576 + 16)[0]
        if first_locator:
            regions.append((first_locator, 32))
    return regions


def vpc_reseal(image: bytearray) -> None:
    """Make the footers' and the dynamic header's checksums valid again after
    an edit, so that the fields behind them are what is refused or used."""
    def seal(start: int, length: int, field: int) -> None:
        if 0 <= start and start + length <= len(image):
            image[start + field:start + field + 4] = bytes(4)
            total = ~sum(image[start:start + length]) & 0xFFFF_FFFF
            image[start + field:start + field + 4] = total.to_bytes(4, "big")
    seal(len(image) - 512, 512, 64)
    if image[:8] == b"conectix":
        seal(0, 512, 64)
        seal(struct.unpack_from(">Q", image, 16)[0], 1024, 36)


#: LUKS1: the phdr (version, cipher, payload offset, key bytes, digest) and slots 0-1
LUKS1_REGIONS = [(0, 208), (208, 96)]
#: LUKS2: the binary header up to the checksum (the JSON gets its own strategy)
LUKS2_REGIONS = [(0, 448)]


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Sample]:
    need("qemu-img", "qemu-io", "cryptsetup")
    directory = tmp_path_factory.mktemp("hostile")
    built: dict[str, Sample] = {}

    def add_qcow2(name: str, path: Path) -> None:
        built[name] = Sample(name, "qcow2", path, qcow2_regions(path.read_bytes()))

    add_qcow2("qcow2-v2", qcow2_image(directory, "v2", "compat=0.10"))
    base = qcow2_image(directory, "base", "cluster_size=4k")
    add_qcow2("qcow2-backing", qcow2_image(directory, "top", "cluster_size=4k",
                                           backing=base))
    snap = qcow2_image(directory, "snap", "cluster_size=4k")
    tool("qemu-img", "snapshot", "-c", "first", snap)
    qemu_io(snap, "qcow2", "write -P 0x44 0 8k")
    tool("qemu-img", "snapshot", "-c", "second", snap)
    add_qcow2("qcow2-snapshots", snap)
    add_qcow2("qcow2-compressed", qcow2_image(directory, "comp", compressed=True))
    add_qcow2("qcow2-extended-l2", qcow2_image(directory, "ext", "extended_l2=on",
                                               "cluster_size=16k"))

    bitmaps = qcow2_image(directory, "bitmaps", "cluster_size=4k")
    tool("qemu-img", "bitmap", "--add", bitmaps, "b0")
    tool("qemu-img", "bitmap", "--add", "-g", "64k", bitmaps, "b1")
    qemu_io(bitmaps, "qcow2", "write -P 0x55 0 4k")
    add_qcow2("qcow2-bitmaps", bitmaps)
    zstd = qcow2_image(directory, "zstd", "compression_type=zstd", compressed=True)
    add_qcow2("qcow2-zstd", zstd)
    external = qcow2_image(directory, "external", "data_file=external.data",
                           "data_file_raw=on")
    add_qcow2("qcow2-data-file", external)

    add_qcow2("qcow2-luks", qcow2_luks_image(directory))
    built["qcow2-luks"].secret = True

    qcow = directory / "v1.qcow"
    tool("qemu-img", "create", "-q", "-f", "qcow", qcow, "1M")
    qemu_io(qcow, "qcow", "write -P 0x11 0 8k", "write -P 0x22 300k 4k")
    built["qcow"] = Sample("qcow", "qcow", qcow, qcow_regions(qcow.read_bytes()))
    plain = directory / "plain.raw"
    with open(plain, "wb") as handle:
        handle.truncate(1 * MiB)
    qemu_io(plain, "raw", "write -P 0x11 0 64k", "write -P 0x22 300k 8k")
    packed = directory / "packed.qcow"
    # QEMU 7.2's convert -c -O qcow writes the image and then exits 1 with no
    # message: judge the image by compare instead of by that status
    subprocess.run(["qemu-img", "convert", "-c", "-O", "qcow", plain, packed],
                   capture_output=True, check=False, timeout=60)
    tool("qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow", plain, packed)
    built["qcow-compressed"] = Sample("qcow-compressed", "qcow", packed,
                                      qcow_regions(packed.read_bytes()))
    over = directory / "over.qcow"
    tool("qemu-img", "create", "-q", "-f", "qcow", "-b", packed.name, "-F", "qcow", over,
         cwd=directory)
    qemu_io(over, "qcow", "write -P 0x33 4k 4k")
    built["qcow-backing"] = Sample("qcow-backing", "qcow", over,
                                   qcow_regions(over.read_bytes()))

    luks1 = directory / "one.luks"
    qemu_img_luks(luks1)
    built["luks1"] = Sample("luks1", "luks", luks1, LUKS1_REGIONS, secret=True,
                             magic_length=6)

    qed = directory / "plain.qed"
    tool("qemu-img", "create", "-q", "-f", "qed", "-o", "cluster_size=4k,table_size=2", qed,
         "2M")
    qemu_io(qed, "qed", "write -P 0x11 0 8k", "write -z 64k 8k", "write -P 0x22 1M 4k")
    built["qed"] = Sample("qed", "qed", qed, qed_regions(qed.read_bytes()))
    qed_over = directory / "over.qed"
    tool("qemu-img", "create", "-q", "-f", "qed", "-b", qed.name, "-F", "qed", qed_over,
         "3M", cwd=directory)
    qemu_io(qed_over, "qed", "write -P 0x33 4k 100k")
    built["qed-backing"] = Sample("qed-backing", "qed", qed_over,
                                  qed_regions(qed_over.read_bytes()))

    for subformat in ("dynamic", "fixed"):
        vhd = directory / f"{subformat}.vhd"
        tool("qemu-img", "create", "-q", "-f", "vpc", "-o", f"subformat={subformat}", vhd,
             "5M")
        qemu_io(vhd, "vpc", "write -P 0x11 0 8k", "write -P 0x22 4M 4k")
        built[f"vpc-{subformat}"] = Sample(f"vpc-{subformat}", "vpc", vhd,
                                           vpc_regions(vhd.read_bytes()), magic_length=8)
    child = directory / "child.vhd"
    imgfs("create", "-q", "-f", "vpc", "-b", "dynamic.vhd", "-F", "vpc", child, cwd=directory)
    qemu_io(child, "vpc", "write -P 0x33 4k 8k")    # QEMU writes whole blocks present
    built["vpc-differencing"] = Sample("vpc-differencing", "vpc", child,
                                       vpc_regions(child.read_bytes()), magic_length=8)

    luks2 = directory / "two.luks"
    with open(luks2, "wb") as handle:
        handle.truncate(1 * MiB + 256 * KiB)
    tool("cryptsetup", "luksFormat", "-q", "--type", "luks2", "--pbkdf", "pbkdf2",
         "--pbkdf-force-iterations", "1000", "--luks2-metadata-size", "16k",
         "--luks2-keyslots-size", "256k", "--key-file", "-", luks2, stdin=PASS.encode())
    built["luks2"] = Sample("luks2", "luks", luks2, LUKS2_REGIONS, secret=True,
                             magic_length=6)

    raw = directory / "disk.raw"
    raw.write_bytes(bytes(range(256)) * 1024)
    built["raw"] = Sample("raw", "raw", raw, [(0, 512)], magic_length=0)
    return built


# -- LUKS2 checksums ----------------------------------------------------------------------------

LUKS2_CSUM = slice(448, 512)


def luks2_reseal(image: bytearray) -> None:
    """Make both LUKS2 header copies' checksums valid again after an edit, so
    the parser behind the checksum sees the damage."""
    offset = 0
    for _copy in range(2):
        if offset + 4096 > len(image):
            return
        hdr_size = struct.unpack_from(">Q", image, offset + 8)[0]
        if not 4096 <= hdr_size <= len(image) - offset or offset + hdr_size > len(image):
            return
        area = bytearray(image[offset:offset + hdr_size])
        area[LUKS2_CSUM] = bytes(64)
        digest = hashlib.sha256(area).digest()
        image[offset + 448:offset + 448 + 64] = digest.ljust(64, b"\0")
        offset += hdr_size


def luks2_json(image: bytes) -> tuple[int, dict[str, Any]]:
    hdr_size = struct.unpack_from(">Q", image, 8)[0]
    text = image[4096:hdr_size].split(b"\0", 1)[0]
    return hdr_size, json.loads(text)


def luks2_with_json(image: bytes, metadata: dict[str, Any]) -> bytes | None:
    """Both copies carrying `metadata`, resealed; None when it does not fit."""
    hdr_size = struct.unpack_from(">Q", image, 8)[0]
    text = json.dumps(metadata).encode()
    if len(text) >= hdr_size - 4096:
        return None
    out = bytearray(image)
    for base in (0, hdr_size):
        out[base + 4096:base + hdr_size] = text.ljust(hdr_size - 4096, b"\0")
    luks2_reseal(out)
    return bytes(out)


def json_paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every key path inside a JSON document (containers and leaves)."""
    if prefix:
        yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from json_paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from json_paths(item, (*prefix, index))


DELETE = object()
HOSTILE_JSON = [DELETE, None, True, 0, -1, 1, 7, 512, 4095, 2 ** 31, 2 ** 63, 2 ** 64,
                10 ** 30, 1.5, "", "0", "-1", "4096", "18446744073709551615",
                "99999999999999999999999", "-4096", "not a number", "aes", "xts-plain64",
                "sha1", "argon2id", "AAAA", "!!!notbase64", [], {}, ["0"], {"0": {}}]


def set_path(document: Any, path: tuple[Any, ...], value: Any) -> None:
    parent = document
    for key in path[:-1]:
        parent = parent[key]
    if value is DELETE:
        del parent[path[-1]]
    else:
        # a copy: later changes inside it must not reach HOSTILE_JSON
        parent[path[-1]] = copy.deepcopy(value)


# -- mutations -----------------------------------------------------------------------------------

def extreme_ints(width: int, file_size: int) -> st.SearchStrategy[int]:
    bits = 8 * width
    limit = 1 << bits
    specials = [0, 1, 2, 3, 7, 8, 9, 12, 16, 20, 21, 22, 30, 31, 32, 33, 63, 64, 511, 512, 4095,
                4096, 65535, 65536, 1 << 20, file_size - 1, file_size, file_size + 1,
                file_size + 4096, (1 << (bits - 1)) - 1, 1 << (bits - 1), limit - 512,
                limit - 1]
    return st.one_of(st.sampled_from(sorted({value % limit for value in specials})),
                     st.integers(0, limit - 1))


def aliases(sample: Sample, width: int) -> st.SearchStrategy[int]:
    """Offsets of the image's own metadata (with qcow flag bits), so that one
    table is aimed at another, at the header, or at itself."""
    limit = 1 << (8 * width)
    starts = sorted({start for start, _length in sample.regions})
    flags = [0, 1 << 63, 1 << 62, 1 << 63 | 1 << 62, 1, 1 << 63 | 1]
    return st.builds(lambda start, flag: (start | flag) % limit,
                     st.sampled_from(starts), st.sampled_from(flags))


def apply_edits(original: bytes, changes: list[tuple[int, bytes]],
                flips: list[tuple[int, int]]) -> bytearray:
    image = bytearray(original)
    for offset, blob in changes:
        image[offset:offset + len(blob)] = blob
    for offset, bit in flips:
        image[offset] ^= 1 << bit
    return image


@st.composite
def damage(draw: st.DrawFn, sample: Sample) -> bytearray:
    """The sample with its metadata damaged: field writes and bit flips."""
    original = sample.data
    changes: list[tuple[int, bytes]] = []
    flips: list[tuple[int, int]] = []
    for _ in range(draw(st.integers(1, MAX_EDITS))):
        start, length = draw(st.sampled_from(sample.regions))
        kind = draw(st.sampled_from(["int", "int", "bytes", "bit"]))
        # (a bad magic is refused at once: damage what lies behind it)
        first = max(start, sample.magic_length)
        if kind == "int":
            width = draw(st.sampled_from([w for w in (1, 2, 4, 8) if w <= length]))
            slots = [offset for offset in range(start, start + length - width + 1, width)
                     if offset >= first]
            offset = draw(st.sampled_from(slots))
            value = draw(extreme_ints(width, len(original)) | aliases(sample, width))
            changes.append((offset, value.to_bytes(width, "big")))
        elif kind == "bytes":
            offset = draw(st.integers(first, start + length - 1))
            changes.append((offset, draw(st.binary(min_size=1, max_size=16))))
        else:
            flips.append((draw(st.integers(first, start + length - 1)),
                          draw(st.integers(0, 7))))
    return apply_edits(original, changes, flips)


# -- exercising an image ---------------------------------------------------------------------------

#: what a driver lets escape by accident: the core wraps them into CorruptImage
#: ("malformed metadata"), a safety net the drivers must not rely on
ACCIDENTS = (struct.error, ValueError, IndexError, KeyError, TypeError, ArithmeticError)


@contextlib.contextmanager
def refused() -> Iterator[None]:
    """Let an ImgfsError pass, unless it only wraps a driver's accident."""
    try:
        yield
    except ImgfsError as exc:
        cause = exc.__cause__
        if isinstance(cause, ACCIDENTS):
            raise AssertionError(f"the core had to wrap {cause!r}") from exc


class Hang(Exception):
    """The watchdog fired: a loop that never reaches a trio checkpoint."""


@contextlib.contextmanager
def guarded() -> Iterator[None]:
    """Cap the address space and fire a watchdog for CPU-bound loops that
    trio.fail_after cannot interrupt."""
    with open("/proc/self/status") as status:
        vm_kib = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)

    def on_alarm(signum: int, frame: Any) -> None:
        raise Hang("no progress for 20 s (a loop sized by a header field?)")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    resource.setrlimit(resource.RLIMIT_AS, (vm_kib * KiB + MEMORY_HEADROOM, hard))
    signal.setitimer(signal.ITIMER_REAL, 20)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def offsets_to_visit(size: int, step: int) -> list[int]:
    """Every `step` of a small disk; for a huge (damaged) size, the start,
    evenly spread points and the end."""
    if size <= MAX_CALLS * step:
        return list(range(0, size, step))
    spread = [size * index // 64 // step * step for index in range(64)]
    return sorted(set(range(0, MAX_CALLS // 2 * step, step)) | set(spread) |
                  {max(0, size - step)})


async def exercise(path: Path, fmt: str | None, secret: bool,
                   options: dict[str, Any] | None = None) -> None:
    """Open, read every chunk, walk block_status; only ImgfsError may escape."""
    ctx = OpenContext(read_only=True, secrets={"sec0": PASS.encode()} if secret else {},
                      key_secret="sec0" if secret else None)
    node = None
    with trio.fail_after(REQUEST_SECONDS * 4), refused():
        node = await open_image(str(path), ctx, fmt=fmt, options=options)
    if node is None:
        return
    try:
        size = node.size
        assert isinstance(size, int) and size >= 0, size
        for offset in offsets_to_visit(size, CHUNK):
            with trio.fail_after(REQUEST_SECONDS), refused():
                data = await node.read(offset, min(CHUNK, size - offset))
                assert len(data) == min(CHUNK, size - offset)
        await walk_block_status(node, size)
        await describe(node, str(path))
    finally:
        with trio.fail_after(REQUEST_SECONDS):
            await node.aclose()


async def describe(node: Any, filename: str) -> None:
    """What `imgfs info`, `map` and `check` do with an opened image."""
    with refused():
        report = image_info(node, filename)
        render_human(report)
        render_json(report)
    if node.size <= 64 * MiB:
        with trio.fail_after(REQUEST_SECONDS), refused():
            await allocation_map(node)
    if node.driver.can_check:
        with trio.fail_after(REQUEST_SECONDS * 2), refused():
            render_check(await node.check(), filename, node.format_name)


async def walk_block_status(node: Any, size: int) -> None:
    """From the start to the end (at most MAX_CALLS extents), stepping over
    ranges that fail; then from the last few chunk offsets."""
    offset, calls = 0, 0
    while offset < size and calls < MAX_CALLS:
        calls += 1
        extent = None
        with trio.fail_after(REQUEST_SECONDS), refused():
            extent = await node.block_status(offset, size - offset)
        if extent is None:
            offset += CHUNK
            continue
        assert 0 < extent.length <= size - offset, (offset, extent)
        offset += extent.length
    for offset in offsets_to_visit(size, CHUNK)[-16:]:
        with trio.fail_after(REQUEST_SECONDS), refused():
            await node.block_status(offset, size - offset)


def run_damaged(sample: Sample, image: bytes | bytearray, fmt: str | None = "same",
                options: dict[str, Any] | None = None) -> None:
    target = sample.path.with_name("damaged-" + sample.path.name)
    target.write_bytes(image)
    with guarded():
        trio.run(exercise, target, sample.fmt if fmt == "same" else fmt, sample.secret,
                 options)


async def exercise_writes(path: Path, secret: bool) -> None:
    """Open read-write and write, zero, discard and flush a few ranges (as a
    guest would through a mount); only ImgfsError may escape."""
    ctx = OpenContext(read_only=False, locking="off",
                      secrets={"sec0": PASS.encode()} if secret else {},
                      key_secret="sec0" if secret else None)
    node = None
    with trio.fail_after(REQUEST_SECONDS * 4), refused():
        node = await open_image(str(path), ctx)
    if node is None:
        return
    try:
        size = node.size
        for offset in sorted({0, 4 * KiB + 512, size // 3, size // 2, max(0, size - 8 * KiB)}):
            length = min(8 * KiB, size - offset)
            if length <= 0:
                continue
            with trio.fail_after(REQUEST_SECONDS), refused():
                await node.write(offset, b"\x5a" * length)
            with trio.fail_after(REQUEST_SECONDS), refused():
                await node.read(offset, length)
        for operation in (node.write_zeroes, node.discard):
            with trio.fail_after(REQUEST_SECONDS), refused():
                await operation(0, min(size, 128 * KiB))
        with trio.fail_after(REQUEST_SECONDS), refused():
            await node.flush()
    finally:
        with trio.fail_after(REQUEST_SECONDS * 2), refused():
            await node.aclose()


# -- the hypothesis tests ----------------------------------------------------------------------

FORMATS = ["qcow2-v2", "qcow2-backing", "qcow2-snapshots", "qcow2-compressed",
           "qcow2-extended-l2", "qcow2-bitmaps", "qcow2-zstd", "qcow2-data-file",
           "qcow2-luks", "qcow", "qcow-compressed", "qcow-backing", "qed", "qed-backing",
           "luks1", "luks2"]


def test_valid_samples_read(samples: dict[str, Sample]) -> None:
    """The undamaged images open and read: the damage below is what fails."""
    for sample in samples.values():
        ctx = OpenContext(read_only=True, secrets={"sec0": PASS.encode()},
                          key_secret="sec0" if sample.secret else None)

        async def check(sample: Sample = sample, ctx: OpenContext = ctx) -> None:
            node = await open_image(str(sample.path), ctx, fmt=sample.fmt)
            try:
                await node.read(0, min(node.size, 4 * CHUNK))
            finally:
                await node.aclose()

        trio.run(check)


@pytest.mark.parametrize("name", FORMATS)
@SETTINGS
@given(data=st.data())
def test_damaged_metadata(samples: dict[str, Sample], name: str, data: st.DataObject) -> None:
    sample = samples[name]
    image = data.draw(damage(sample))
    if sample.name == "luks2" and data.draw(st.booleans(), label="reseal"):
        luks2_reseal(image)
    run_damaged(sample, image)


VPC_SAMPLES = ["vpc-dynamic", "vpc-fixed", "vpc-differencing"]


@pytest.mark.parametrize("name", VPC_SAMPLES)
@SETTINGS
@given(data=st.data())
def test_damaged_vpc_metadata(samples: dict[str, Sample], name: str,
                              data: st.DataObject) -> None:
    """VHD: the checksums resealed half the time, so that the fields behind
    them are reached."""
    sample = samples[name]
    image = data.draw(damage(sample))
    if data.draw(st.booleans(), label="reseal"):
        vpc_reseal(image)
    run_damaged(sample, image)


@pytest.mark.parametrize("name", VPC_SAMPLES)
@settings(SETTINGS, max_examples=max(10, EXAMPLES // 3))
@given(data=st.data())
def test_damaged_vpc_metadata_written(samples: dict[str, Sample], name: str,
                                      data: st.DataObject) -> None:
    sample = samples[name]
    image = data.draw(damage(sample))
    if data.draw(st.booleans(), label="reseal"):
        vpc_reseal(image)
    target = sample.path.with_name("written-" + sample.path.name)
    target.write_bytes(image)
    with guarded():
        trio.run(exercise_writes, target, sample.secret)


@SETTINGS
@given(data=st.data())
def test_damaged_luks2_json(samples: dict[str, Sample], data: st.DataObject) -> None:
    sample = samples["luks2"]
    original = sample.data
    _hdr_size, metadata = luks2_json(original)
    changes = data.draw(st.integers(1, MAX_EDITS), label="changes")
    for _ in range(changes):
        paths = list(json_paths(metadata))
        if not paths:
            break
        path = data.draw(st.sampled_from(paths), label="path")
        values = list(HOSTILE_JSON)
        set_path(metadata, path, data.draw(st.sampled_from(values), label="value"))
    image = luks2_with_json(original, metadata)
    if image is not None:
        run_damaged(sample, image)


@SETTINGS
@given(offset=extreme_ints(8, 256 * KiB), size=st.none() | extreme_ints(8, 256 * KiB))
def test_raw_windows(samples: dict[str, Sample], offset: int, size: int | None) -> None:
    """raw's offset / size options take any 64-bit value."""
    options: dict[str, Any] = {"offset": str(offset)}
    if size is not None:
        options["size"] = str(size)
    sample = samples["raw"]
    run_damaged(sample, sample.data, options=options)


MAGICS = [b"QFI\xfb\x00\x00\x00\x01", b"QFI\xfb\x00\x00\x00\x02", b"QFI\xfb\x00\x00\x00\x03",
          b"LUKS\xba\xbe\x00\x01", b"LUKS\xba\xbe\x00\x02", b"QED\x00", b"conectix", b""]


@SETTINGS
@given(magic=st.sampled_from(MAGICS), head=st.binary(min_size=0, max_size=600),
       tail=st.sampled_from([0, 1, 511, 4096, 70000]))
def test_probed_garbage(samples: dict[str, Sample], magic: bytes, head: bytes,
                        tail: int) -> None:
    """A file that starts with a format's magic and then anything: probed."""
    run_damaged(samples["raw"], magic + head + bytes(tail), fmt=None)


# -- regressions of bugs found here ------------------------------------------------------------

@pytest.mark.parametrize("key", ["segments", "keyslots"])
@pytest.mark.parametrize("value", [True, 1])
def test_luks2_digest_scalar_lists(samples: dict[str, Sample], key: str, value: Any) -> None:
    """A digest whose 'segments' or 'keyslots' is a JSON scalar once raised
    TypeError in luks2.parse_digest."""
    sample = samples["luks2"]
    _hdr_size, metadata = luks2_json(sample.data)
    metadata["digests"]["0"][key] = value
    image = luks2_with_json(sample.data, metadata)
    assert image is not None
    run_damaged(sample, image)


# -- the command line ------------------------------------------------------------------------------

def _be(width: int, value: int) -> bytes:
    return value.to_bytes(width, "big")


def _le(width: int, value: int) -> bytes:
    return value.to_bytes(width, "little")


#: (sample, [(offset, bytes)]): damage every tool must refuse at open
CLI_DAMAGE = {
    "qcow2 cluster_bits": ("qcow2-v2", [(20, _be(4, 0xFFFF_FFFF))]),
    "qcow2 l1_size": ("qcow2-snapshots", [(36, _be(4, 0xFFFF_FFFF))]),
    "qcow2 refcount table past EOF": ("qcow2-compressed", [(48, _be(8, 1 << 50))]),
    "qcow2 size": ("qcow2-extended-l2", [(24, _be(8, (1 << 64) - 1))]),
    "qcow size": ("qcow", [(24, _be(8, (1 << 64) - 1))]),
    "qcow cluster_bits": ("qcow", [(32, b"\0")]),
    "qed cluster_size": ("qed", [(4, _le(4, 3 << 12))]),
    "qed table_size": ("qed", [(8, _le(4, 32))]),
    "qed header_size": ("qed", [(12, _le(4, 0xFFFF_FFFF))]),
    "qed unknown feature": ("qed", [(16, _le(8, 1 << 40))]),
    "qed L1 unaligned": ("qed", [(40, _le(8, 4096 + 512))]),
    "qed L1 past EOF": ("qed", [(40, _le(8, 1 << 40))]),
    "qed image_size": ("qed", [(48, _le(8, (1 << 64) - 512))]),
    "qed backing name size": ("qed-backing", [(60, _le(4, 0xFFFF_FFFF))]),
    "qed backing name offset": ("qed-backing", [(56, _le(4, 0xFFFF_FF00))]),
    "luks1 stripes": ("luks1", [(252, _be(4, 0xFFFF_FFFF))]),
    "luks1 payload offset": ("luks1", [(104, _be(4, 0xFFFF_FFFF))]),
}


@pytest.mark.parametrize("command", ["info", "check"])
@pytest.mark.parametrize("damage", sorted(CLI_DAMAGE))
def test_cli_one_line(samples: dict[str, Sample], damage: str, command: str) -> None:
    name, changes = CLI_DAMAGE[damage]
    sample = samples[name]
    image = apply_edits(sample.data, changes, [])
    target = sample.path.with_name("cli-" + sample.path.name)
    target.write_bytes(image)
    result = imgfs(command, target, check=False, timeout=30)
    if command == "check" and damage in CHECK_REPORTS:
        # qemu-img check opens these to report them (exit 2: corruptions)
        assert result.returncode == 2, result
        assert "Traceback" not in result.stderr and "internal error" not in result.stderr
        return
    assert_one_line_refusal(result)


#: damage that `check` opens and reports, as qemu-img check does, instead of refusing
CHECK_REPORTS = {"qcow2 refcount table past EOF"}


def test_cli_one_line_luks2_both_copies(samples: dict[str, Sample]) -> None:
    """LUKS2 falls back to its second copy: damage both."""
    sample = samples["luks2"]
    hdr_size = struct.unpack_from(">Q", sample.data, 8)[0]
    image = apply_edits(sample.data, [(8, _be(8, 1)), (hdr_size + 8, _be(8, 1))], [])
    target = sample.path.with_name("cli-" + sample.path.name)
    target.write_bytes(image)
    for command in ("info", "check"):
        assert_one_line_refusal(imgfs(command, target, check=False, timeout=30))


#: (sample, [(offset, bytes)], reseal): VHD damage QEMU refuses too; negative
#: offsets count from the end of the file (the footer); resealed damage has
#: valid checksums, so that the field itself is what is refused
VPC_HEADER, VPC_BAT = 512, 1536
VPC_DAMAGE = {
    "footer checksum": ("vpc-dynamic", [(48, _be(8, 1 << 40))], False),
    "fixed footer checksum": ("vpc-fixed", [(-512 + 48, _be(8, 1 << 40))], False),
    "fixed footer of a dynamic disk": ("vpc-fixed", [(-512 + 60, _be(4, 3))], True),
    "unknown disk type": ("vpc-dynamic", [(60, _be(4, 9))], True),
    "header offset": ("vpc-dynamic", [(16, _be(8, 1 << 40))], True),
    "header cookie": ("vpc-dynamic", [(VPC_HEADER, b"cxsparsX")], True),
    "block size 3": ("vpc-dynamic", [(VPC_HEADER + 32, _be(4, 3))], True),
    "block size 256": ("vpc-dynamic", [(VPC_HEADER + 32, _be(4, 256))], True),
    "block size 1 GiB": ("vpc-dynamic", [(VPC_HEADER + 32, _be(4, 1 << 30))], True),
    "max table entries": ("vpc-dynamic", [(VPC_HEADER + 28, _be(4, 0x7FFF_FFFF))], True),
    "page table too small": ("vpc-dynamic", [(VPC_HEADER + 28, _be(4, 1))], True),
    "BAT past EOF": ("vpc-dynamic", [(VPC_HEADER + 16, _be(8, 1 << 40))], True),
    "BAT over the footer copy": ("vpc-dynamic", [(VPC_HEADER + 16, _be(8, 0))], True),
    "BAT entry past EOF": ("vpc-dynamic", [(VPC_BAT, _be(4, 1 << 30))], True),
    "size past 2040 GiB": ("vpc-dynamic", [(28, b"win "), (48, _be(8, 2041 << 30))], True),
}


#: damage QEMU opens anyway: a disk type the spec does not define reads as
#: a dynamic disk there
VPC_QEMU_OPENS = {"unknown disk type"}


@pytest.mark.parametrize("damage", sorted(VPC_DAMAGE))
def test_vpc_cli_one_line_as_qemu(samples: dict[str, Sample], damage: str) -> None:
    name, changes, reseal = VPC_DAMAGE[damage]
    sample = samples[name]
    size = len(sample.data)
    image = apply_edits(sample.data, [(offset % size, blob) for offset, blob in changes], [])
    if reseal:
        vpc_reseal(image)
    target = sample.path.with_name("cli-" + sample.path.name)
    target.write_bytes(image)
    qemu = subprocess.run(["qemu-img", "info", "-f", "vpc", target], capture_output=True,
                          text=True, check=False)
    assert qemu.returncode == (0 if damage in VPC_QEMU_OPENS else 1), qemu
    for command in ("info", "map"):
        assert_one_line_refusal(imgfs(command, target, check=False, timeout=30))


def assert_one_line_refusal(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("imgfs:"), result.stderr


# -- a mount --------------------------------------------------------------------------------

def test_mount_damaged_l2_entries(tmp_path: Path) -> None:
    """Two L2 entries aimed past the end of the file: a compressed cluster
    (EIO for that request, as qemu-io fails it) and a data cluster (zeros,
    as QEMU reads it); the rest reads, and the mount stays up."""
    need("qemu-img", "qemu-io")
    need_root_or_fuse()
    image = tmp_path / "l2.qcow2"
    tool("qemu-img", "create", "-q", "-f", "qcow2", image, "1M")
    qemu_io(image, "qcow2", "write -P 0x11 0 192k", "write -P 0x22 512k 64k")
    data = bytearray(image.read_bytes())
    l1_offset = struct.unpack_from(">Q", data, 40)[0]
    l2_offset = struct.unpack_from(">Q", data, l1_offset)[0] & 0x00FF_FFFF_FFFF_FE00
    past_end = (len(data) // CHUNK + 100) * CHUNK
    # cluster 1: compressed (bit 62), host offset past the end; cluster 2: data
    struct.pack_into(">Q", data, l2_offset + 8, 1 << 62 | past_end)
    struct.pack_into(">Q", data, l2_offset + 16, 1 << 63 | past_end)
    image.write_bytes(data)
    qemu = subprocess.run(["qemu-io", "-r", "-f", "qcow2", "-c", f"read {CHUNK} {CHUNK}",
                           image], capture_output=True, text=True, check=False)
    assert "error" in (qemu.stdout + qemu.stderr).lower(), qemu
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    with mounted(image, mountpoint=mountpoint, options="ro"):
        view = mountpoint / "l2.raw"
        fd = os.open(view, os.O_RDONLY)
        try:
            with pytest.raises(OSError) as info:
                os.pread(fd, CHUNK, CHUNK)
            assert info.value.errno == errno.EIO
            assert os.pread(fd, CHUNK, 0) == b"\x11" * CHUNK
            assert os.pread(fd, CHUNK, 2 * CHUNK) == bytes(CHUNK)
            assert os.pread(fd, CHUNK, 8 * CHUNK) == b"\x22" * CHUNK
        finally:
            os.close(fd)
        assert is_mounted(mountpoint)
        assert os.stat(view).st_size == 1 * MiB


def test_mount_of_a_fifo_is_refused_at_once(tmp_path: Path) -> None:
    """A FIFO named as the source: one line and exit 1, for every format
    the early unlock looks at (it once opened the source blocking, and the
    mount waited for a writer forever)."""
    need_root_or_fuse()
    os.mkfifo(tmp_path / "pipe")
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    for options in ([], ["-o", "format=luks,passphrase-file=/dev/null"],
                    ["-o", "format=qcow2"]):
        result = imgfs("mount", *options, tmp_path / "pipe", mountpoint, check=False,
                       timeout=30)
        assert_one_line_refusal(result)
        assert "not a regular file or block device" in result.stderr
        assert not is_mounted(mountpoint)


def test_check_bitmap_table_size(samples: dict[str, Sample]) -> None:
    """imgfs check once sized an allocation by bitmap_table_size (32 GiB for
    0xFFFFFFFF); fixed in repair.py, kept as a regression case."""
    sample = samples["qcow2-bitmaps"]
    original = sample.data
    header_length = struct.unpack_from(">I", original, 100)[0]
    start = qcow2_extensions(original, header_length, 4096)[BITMAPS_EXTENSION][0]
    directory = struct.unpack_from(">Q", original, start + 16)[0]
    image = apply_edits(original, [(directory + 8, _be(4, 0xFFFF_FFFF))], [])
    run_damaged(sample, image)


def test_backing_file_names_a_fifo(tmp_path: Path) -> None:
    """A backing file name may name anything: a FIFO is refused at once
    instead of waiting for a writer (QEMU 7.2 waits forever)."""
    need("qemu-img")
    os.mkfifo(tmp_path / "pipe")
    image = tmp_path / "top.qcow2"
    tool("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "pipe", "-F", "raw", image,
         "1M", cwd=tmp_path)

    async def open_it() -> None:
        with trio.fail_after(REQUEST_SECONDS), pytest.raises(ImgfsError) as info:
            await open_image(str(image), OpenContext(read_only=True))
        assert "not a regular file or block device" in str(info.value)

    with guarded():
        trio.run(open_it)
    result = imgfs("info", "--backing-chain", image, check=False, timeout=30)
    assert_one_line_refusal(result)


WRITABLE = ["qcow2-v2", "qcow2-backing", "qcow2-snapshots", "qcow2-compressed",
            "qcow2-extended-l2", "qcow2-bitmaps", "qcow", "qcow-compressed", "qcow-backing",
            "qed", "qed-backing", "luks1"]


@pytest.mark.parametrize("name", WRITABLE)
@settings(SETTINGS, max_examples=max(10, EXAMPLES // 3))
@given(data=st.data())
def test_damaged_metadata_written(samples: dict[str, Sample], name: str,
                                  data: st.DataObject) -> None:
    """Writes through a damaged image: refused or done, never a crash."""
    sample = samples[name]
    image = data.draw(damage(sample))
    target = sample.path.with_name("written-" + sample.path.name)
    target.write_bytes(image)
    with guarded():
        trio.run(exercise_writes, target, sample.secret)


@pytest.mark.parametrize("fmt", ["qcow2", "qcow", "qed"])
def test_backing_files_name_each_other(tmp_path: Path, fmt: str) -> None:
    """Two images, each the other's backing file: refused, no recursion."""
    need("qemu-img")
    for name, other in (("x", "y"), ("y", "x")):
        tool("qemu-img", "create", "-q", "-f", fmt, "-u", "-b", f"{other}.{fmt}", "-F", fmt,
             tmp_path / f"{name}.{fmt}", "1M", cwd=tmp_path)

    async def open_it() -> None:
        with trio.fail_after(REQUEST_SECONDS), pytest.raises(ImgfsError):
            await open_image(str(tmp_path / f"x.{fmt}"), OpenContext(read_only=True))

    with guarded():
        trio.run(open_it)
    assert_one_line_refusal(imgfs("map", tmp_path / f"x.{fmt}", check=False, timeout=30))
