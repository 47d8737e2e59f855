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

import bz2
import contextlib
import copy
import errno
import hashlib
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import zlib
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
    write_through_api,
)
from tests.drivers.test_parallels import NO_PARENT, ROOT_GUID, TOP_GUID, descriptor, hds_name
from tests.probe_samples import SAMPLE_IMAGES

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

#: written by Parallels software (entries in sectors)
PARALLELS_SAMPLE = SAMPLE_IMAGES / "parallels-v1.bz2"
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


def vdi_regions(data: bytes) -> list[tuple[int, int]]:
    """The header behind the signature (version, sizes, offsets, counts,
    UUIDs) and the first entries of the block map."""
    offset_bmap = struct.unpack_from("<I", data, 0x154)[0]
    return [(0x44, 0x188 - 0x44), (0x188, 64), (offset_bmap, 64)]


def vdi_samples(directory: Path) -> dict[str, Sample]:
    """Dynamic and static images written out of order, and a differencing
    image (in a folder of its own, so that its parent is found by UUID)."""
    built = {}
    for name, static in (("vdi", "off"), ("vdi-static", "on")):
        path = directory / f"{name}.vdi"
        tool("qemu-img", "create", "-q", "-f", "vdi", "-o", f"static={static}", path, "3M")
        qemu_io(path, "vdi", "write -P 0x11 1M 8k", "write -P 0x22 100 1M")
        built[name] = Sample(name, "vdi", path, vdi_regions(path.read_bytes()),
                             magic_length=0x44)
    chain = directory / "vdi-chain"
    chain.mkdir()
    parent = chain / "parent.vdi"
    tool("qemu-img", "convert", "-O", "vdi", built["vdi"].path, parent)
    child = chain / "child.vdi"
    imgfs("create", "-q", "-f", "vdi", "-b", parent.name, child, cwd=chain)
    built["vdi-diff"] = Sample("vdi-diff", "vdi", child, vdi_regions(child.read_bytes()),
                               magic_length=0x44)
    return built
def parallels_regions(data: bytes) -> list[tuple[int, int]]:
    """The header and the first bytes of the catalog, which follows it."""
    return [(0, 64), (64, 256)]
def vhdx_regions(data: bytes) -> list[tuple[int, int]]:
    """Both headers, both region tables, the metadata table and its items,
    the first BAT entries and the first log entry (VHDX is little-endian;
    the checksummed ones are resealed by `vhdx_reseal` half of the time)."""
    regions = [(64 * KiB, 80), (128 * KiB, 80), (192 * KiB, 80), (256 * KiB, 80)]
    _, log_length, log_offset = struct.unpack_from("<HIQ", data, 64 * KiB + 66)
    bat_offset, metadata_offset = (struct.unpack_from("<Q", data, 192 * KiB + 32 + 32 * i)[0]
                                   for i in range(2))
    regions += [(metadata_offset, 32 + 5 * 32), (metadata_offset + 64 * KiB, 40),
                (bat_offset, 64), (log_offset, 64 + 2 * 32)]
    return regions


def vhdx_child_regions(data: bytes) -> list[tuple[int, int]]:
    """A differencing VHDX's regions, its parent locator and the BAT's
    first sector bitmap entry and first bitmap bytes."""
    regions = vhdx_regions(data)
    metadata_offset = struct.unpack_from("<Q", data, 192 * KiB + 64)[0]
    item = struct.unpack_from("<I", data, metadata_offset + 32 + 5 * 32 + 16)[0]
    bat_offset = struct.unpack_from("<Q", data, 192 * KiB + 32)[0]
    # 1 MiB blocks of 512-byte sectors: 4096 payload entries, then a bitmap entry
    bitmap = struct.unpack_from("<Q", data, bat_offset + 8 * 4096)[0] & ~(MiB - 1)
    regions += [(metadata_offset + item, 128), (bat_offset + 8 * 4096, 8), (bitmap, 512)]
    return regions


def vhdx_reseal(image: bytearray) -> None:
    """Recompute the CRC-32C of the headers, region tables and the log
    entry at the start of the log, so the damage behind them is reached."""
    from imgfs.drivers.vhdx.layout import checksummed
    for offset, length in ((64 * KiB, 4 * KiB), (128 * KiB, 4 * KiB),
                           (192 * KiB, 64 * KiB), (256 * KiB, 64 * KiB)):
        image[offset:offset + length] = checksummed(image[offset:offset + length])
    log_offset = struct.unpack_from("<Q", image, 64 * KiB + 72)[0]
    if log_offset + 64 <= len(image) and image[log_offset:log_offset + 4] == b"loge":
        length = struct.unpack_from("<I", image, log_offset + 8)[0]
        if 0 < length <= 64 * KiB and log_offset + length <= len(image):
            image[log_offset:log_offset + length] = checksummed(
                image[log_offset:log_offset + length])


def vhdx_with_log(clean: Path, target: Path) -> None:
    """`clean` with one log entry (rewriting the first BAT sector so that
    block 0 becomes a zero block) that a replay must apply."""
    import uuid

    from imgfs.drivers.vhdx.layout import Header
    from imgfs.drivers.vhdx.log import build_entry
    data = bytearray(clean.read_bytes())
    log_guid = uuid.uuid4().bytes_le
    for offset in (64 * KiB, 128 * KiB):
        header = Header.unpack(bytes(data[offset:offset + 4 * KiB]))
        data[offset:offset + 4 * KiB] = header._replace(log_guid=log_guid).pack()
    log_offset = struct.unpack_from("<Q", data, 64 * KiB + 72)[0]
    bat_offset = struct.unpack_from("<Q", data, 192 * KiB + 32)[0]
    sector = bytearray(data[bat_offset:bat_offset + 4 * KiB])
    sector[0:8] = struct.pack("<Q", 2)
    entry = build_entry(sequence=5, tail=0, log_guid=log_guid,
                        sectors=[(bat_offset, bytes(sector))],
                        flushed_file_offset=len(data), last_file_offset=len(data))
    data[log_offset:log_offset + len(entry)] = entry
    target.write_bytes(data)


def vmdk_regions(data: bytes) -> list[tuple[int, int]]:
    """A sparse extent's header (or a stream's footer copy), its embedded
    descriptor, both grain directories and the first grain table and
    grain (VMDK's fields are little-endian sector numbers)."""
    header_at = len(data) - 1024 if struct.unpack_from("<Q", data, 56)[0] == (1 << 64) - 1 \
        else 0
    descriptor = struct.unpack_from("<Q", data, 28)[0]
    rgd, gd = struct.unpack_from("<QQ", data, header_at + 48)
    regions = [(0, 79), (header_at, 79), (descriptor * 512, 256)]
    for table in (gd, rgd):
        if table and table * 512 < len(data):
            regions.append((table * 512, 64))
            gt = struct.unpack_from("<I", data, table * 512)[0]
            if gt and gt * 512 < len(data):
                regions.append((gt * 512, 256))
                grain = struct.unpack_from("<I", data, gt * 512)[0]
                regions.append((grain * 512, 16))
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

    prl = directory / "plain.prl"
    tool("qemu-img", "create", "-q", "-f", "parallels", "-o", "cluster_size=4k", prl, "2M")
    qemu_io(prl, "parallels", "write -P 0x11 0 8k", "write -P 0x22 1M 4k",
            "write -P 0x33 12k 4k")
    built["parallels"] = Sample("parallels", "parallels", prl,
                                parallels_regions(prl.read_bytes()), magic_length=16)
    prl_v1 = directory / "v1.prl"
    prl_v1.write_bytes(bz2.decompress(PARALLELS_SAMPLE.read_bytes()))
    built["parallels-v1"] = Sample("parallels-v1", "parallels", prl_v1,
                                   parallels_regions(prl_v1.read_bytes()), magic_length=16)

    hdd = directory / "disk.hdd"
    hdd.mkdir()
    for guid, pattern in ((ROOT_GUID, "0x44 0 64k"), (TOP_GUID, "0x55 32k 64k")):
        layer = hdd / hds_name(guid)
        tool("qemu-img", "create", "-q", "-f", "parallels", "-o", "cluster_size=4k", layer,
             "1M")
        qemu_io(layer, "parallels", f"write -P {pattern}")
    xml = hdd / "DiskDescriptor.xml"
    xml.write_text(descriptor(MiB, [(guid, "Compressed", hds_name(guid))
                                    for guid in (ROOT_GUID, TOP_GUID)],
                              [(ROOT_GUID, NO_PARENT), (TOP_GUID, ROOT_GUID)]))
    built["parallels-bundle"] = Sample("parallels-bundle", "parallels", xml,
                                       [(0, len(xml.read_bytes()))], magic_length=0)
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

    built.update(vdi_samples(directory))
    vhdx = directory / "plain.vhdx"
    tool("qemu-img", "create", "-q", "-f", "vhdx", "-o", "block_size=1M", vhdx, "6M")
    qemu_io(vhdx, "vhdx", "write -P 0x11 0 8k", "write -P 0x22 2M 4k", "write -P 0x33 5M 1k")
    built["vhdx"] = Sample("vhdx", "vhdx", vhdx, vhdx_regions(vhdx.read_bytes()),
                           magic_length=8)
    vhdx_log = directory / "log.vhdx"
    vhdx_with_log(vhdx, vhdx_log)
    built["vhdx-log"] = Sample("vhdx-log", "vhdx", vhdx_log,
                               vhdx_regions(vhdx_log.read_bytes()), magic_length=8)
    vhdx_child = directory / "child.vhdx"
    imgfs("create", "-q", "-f", "vhdx", "-b", vhdx.name, "-o", "block_size=1M", vhdx_child,
          cwd=directory)
    write_through_api(vhdx_child, [(MiB + 512, b"\x44" * 1000), (3 * MiB, b"\x55" * MiB)])
    built["vhdx-diff"] = Sample("vhdx-diff", "vhdx", vhdx_child,
                                vhdx_child_regions(vhdx_child.read_bytes()), magic_length=8)
    sparse = directory / "sparse.vmdk"
    tool("qemu-img", "create", "-q", "-f", "vmdk", "-o", "zeroed_grain=on", sparse, "2M")
    qemu_io(sparse, "vmdk", "write -P 0x11 0 8k", "write -z 64k 64k", "write -P 0x22 1M 4k")
    built["vmdk-sparse"] = Sample("vmdk-sparse", "vmdk", sparse,
                                  vmdk_regions(sparse.read_bytes()))
    stream = directory / "stream.vmdk"
    tool("qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=streamOptimized", stream,
         "2M")
    qemu_io(stream, "vmdk", "write -P 0x11 0 64k", "write -P 0x22 1M 64k")
    built["vmdk-stream"] = Sample("vmdk-stream", "vmdk", stream,
                                  vmdk_regions(stream.read_bytes()))
    esxi = directory / "esxi.vmdk"
    esxi.write_bytes(bz2.decompress((SAMPLE_IMAGES / "iotest-version3.vmdk.bz2").read_bytes()))
    built["vmdk-esxi"] = Sample("vmdk-esxi", "vmdk", esxi, vmdk_regions(esxi.read_bytes()))
    two_gb = directory / "twogb.vmdk"
    tool("qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse",
         two_gb, "2M")
    qemu_io(two_gb, "vmdk", "write -P 0x11 4k 8k")
    built["vmdk-descriptor"] = Sample("vmdk-descriptor", "vmdk", two_gb, [(0, 400)],
                                      magic_length=0)

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
           "luks1", "luks2", "vdi", "vdi-static", "vdi-diff", "parallels", "parallels-v1",
           "parallels-bundle", "vhdx", "vhdx-log", "vhdx-diff", "vmdk-sparse", "vmdk-stream",
           "vmdk-esxi", "vmdk-descriptor"]


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
    if sample.fmt == "vhdx" and data.draw(st.booleans(), label="reseal"):
        vhdx_reseal(image)
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
          b"LUKS\xba\xbe\x00\x01", b"LUKS\xba\xbe\x00\x02", b"QED\x00",
          b"WithoutFreeSpace\x02\0\0\0", b"WithouFreSpacExt\x02\0\0\0", b"conectix", b""]


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


def test_parallels_largest_catalog_past_the_end(samples: dict[str, Sample]) -> None:
    """The largest catalog QEMU allows (2 GiB of entries) in a file that
    holds none of it, with the data area after it: the catalog is read in
    pages and its tail past the end of the file reads as zeros, so open,
    reads, map and check stay within their time limits (walking it page
    by page once took half a minute)."""
    sample = samples["parallels"]
    entries, tracks = 0x1FFF_FFFF, 8
    data_off = -(-(64 + 4 * entries) // 4096) * 4096 // 512
    image = apply_edits(sample.data[:4096], [
        (28, _le(4, tracks)), (32, _le(4, entries)), (36, _le(8, entries * tracks)),
        (48, _le(4, data_off))], [])
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
    "vdi version": ("vdi", [(0x44, _le(4, 0x0001_0002))]),
    "vdi block map past EOF": ("vdi", [(0x154, _le(4, 0x7FFF_FE00))]),
    "vdi blocks need a huge map": ("vdi", [(0x180, _le(4, 0x1FFF_FF00))]),
    "vdi too many blocks": ("vdi", [(0x180, _le(4, 0xFFFF_FFFF))]),
    "vdi block size": ("vdi", [(0x178, _le(4, 3 << 20))]),
    "vdi block size zero": ("vdi-static", [(0x178, _le(4, 0))]),
    "vdi data over the map": ("vdi", [(0x158, _le(4, 0x200))]),
    "vdi map over the header": ("vdi", [(0x154, _le(4, 0x100))]),
    "vdi disk size": ("vdi", [(0x170, _le(8, (1 << 64) - 1))]),
    "vdi parent not found": ("vdi-diff", [(0x1A8, b"\x55" * 16)]),
    "parallels zero cluster": ("parallels", [(28, _le(4, 0))]),
    "parallels huge cluster": ("parallels", [(28, _le(4, 0xFFFF_FFFF))]),
    "parallels huge catalog": ("parallels", [(32, _le(4, 0xFFFF_FFFF))]),
    "parallels nb_sectors": ("parallels", [(36, _le(8, (1 << 64) - 1))]),
    "parallels data inside catalog": ("parallels", [(48, _le(4, 1))]),
    "parallels format extension": ("parallels", [(56, _le(8, 1))]),
    "parallels-v1 huge catalog": ("parallels-v1", [(32, _le(4, 0x2000_0000))]),
    "vmdk capacity": ("vmdk-sparse", [(12, _le(8, (1 << 64) - 1))]),
    "vmdk grain size": ("vmdk-sparse", [(20, _le(8, 100))]),
    "vmdk numGTEsPerGT": ("vmdk-sparse", [(44, _le(4, 0xFFFF_FFFF))]),
    "vmdk GD past EOF": ("vmdk-sparse", [(56, _le(8, 1 << 40))]),
    "vmdk version": ("vmdk-stream", [(4, _le(4, 9))]),
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


#: VHDX damage, resealed so that the checksums hold: (sample, [(offset, bytes)]),
#: offsets relative to the log ("log"), the BAT ("bat"), the metadata region
#: ("meta") or the file ("file"), as qemu-img lays out a 6 MiB image
VHDX_DAMAGE = {
    "regions overlap": ("vhdx", [("file", 192 * KiB + 16 + 32 + 16, _le(8, 2 * MiB)),
                                 ("file", 256 * KiB + 16 + 32 + 16, _le(8, 2 * MiB))]),
    "region entry count": ("vhdx", [("file", 192 * KiB + 8, _le(4, 5000)),
                                    ("file", 256 * KiB + 8, _le(4, 5000))]),
    "log past EOF": ("vhdx", [("file", 64 * KiB + 72, _le(8, 1 << 40)),
                              ("file", 128 * KiB + 72, _le(8, 1 << 40))]),
    "BAT past EOF": ("vhdx", [("bat", 0, _le(8, 1 << 40 | 6))]),
    "BAT over the metadata": ("vhdx", [("bat", 8, _le(8, 3 * MiB | 6))]),
    "BAT over the log": ("vhdx", [("bat", 8, _le(8, 1 * MiB | 6))]),
    "BAT block used twice": ("vhdx", [("bat", 16, None)]),
    "BAT unknown state": ("vhdx", [("bat", 8, _le(8, 4))]),
    "BAT partially present without parent": ("vhdx", [("bat", 0, b"\x07")]),
    "metadata entry count": ("vhdx", [("meta", 10, _le(2, 0xFFFF))]),
    "block size 3 MiB": ("vhdx", [("meta", 64 * KiB, _le(4, 3 * MiB))]),
    "block size 512 MiB": ("vhdx", [("meta", 64 * KiB, _le(4, 512 * MiB))]),
    "block size 0": ("vhdx", [("meta", 64 * KiB, _le(4, 0))]),
    "logical sector size": ("vhdx", [("meta", 64 * KiB + 32, _le(4, 1000))]),
    "virtual size": ("vhdx", [("meta", 64 * KiB + 8, _le(8, 1 << 63))]),
    "log entry over the headers": ("vhdx-log", [("log", 64 + 16, _le(8, 64 * KiB))]),
    "log needs a longer file": ("vhdx-log", [("log", 48, _le(8, 1 << 40))]),
}


def vhdx_damaged(sample: Sample, changes: list[tuple[str, int, bytes | None]]) -> bytearray:
    image = bytearray(sample.data)
    bases = {"file": 0, "log": struct.unpack_from("<Q", image, 64 * KiB + 72)[0],
             "bat": struct.unpack_from("<Q", image, 192 * KiB + 32)[0],
             "meta": struct.unpack_from("<Q", image, 192 * KiB + 64)[0]}
    for base, offset, blob in changes:
        if blob is None:        # (a copy of the first BAT entry)
            blob = bytes(image[bases["bat"]:bases["bat"] + 8])
        image[bases[base] + offset:bases[base] + offset + len(blob)] = blob
    vhdx_reseal(image)
    return image


@pytest.mark.parametrize("damage", sorted(VHDX_DAMAGE))
def test_cli_one_line_vhdx(samples: dict[str, Sample], damage: str) -> None:
    name, changes = VHDX_DAMAGE[damage]
    sample = samples[name]
    target = sample.path.with_name("cli-" + sample.path.name)
    target.write_bytes(vhdx_damaged(sample, changes))
    assert_one_line_refusal(imgfs("info", "-f", "vhdx", target, check=False, timeout=30))


@pytest.mark.parametrize("torn", ["entry checksum", "data sector sequence",
                                  "descriptor sequence", "other log GUID"])
def test_vhdx_torn_log_is_ignored(samples: dict[str, Sample], torn: str) -> None:
    """A log entry that is not whole is never replayed (2.3.3): the image
    reads as it did before the entry; the whole entry is replayed (read
    only: block 0 reads as zeros, and the file is left alone)."""
    sample = samples["vhdx-log"]
    clean = imgfs("convert", "-O", "raw", samples["vhdx"].path,
                  sample.path.with_name("clean.raw"))
    assert clean.returncode == 0
    before = sample.path.with_name("clean.raw").read_bytes()
    replayed = sample.path.with_name("replayed.raw")
    imgfs("convert", "-O", "raw", sample.path, replayed)
    assert before[:8 * KiB] == b"\x11" * 8 * KiB
    assert replayed.read_bytes() == bytes(8 * KiB) + before[8 * KiB:]
    image = bytearray(sample.data)
    log_offset = struct.unpack_from("<Q", image, 64 * KiB + 72)[0]
    if torn == "entry checksum":
        image[log_offset + 4 * KiB + 100] ^= 1
    elif torn == "data sector sequence":
        image[log_offset + 4 * KiB + 4] ^= 1
        vhdx_reseal(image)
    elif torn == "descriptor sequence":
        image[log_offset + 64 + 24] ^= 1
        vhdx_reseal(image)
    else:
        image[log_offset + 32] ^= 1
        vhdx_reseal(image)
    target = sample.path.with_name("torn.vhdx")
    target.write_bytes(image)
    out = sample.path.with_name("torn.raw")
    imgfs("convert", "-O", "raw", target, out)
    assert out.read_bytes() == before
    assert target.read_bytes() == image
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


# -- read-only formats: bochs and cloop ------------------------------------------------------
# (their own samples, written from the layouts by tests/roformat_images.py: no
# tool is needed to damage them)

BOCHS_CATALOG = 512


@pytest.fixture(scope="module")
def read_only_samples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Sample]:
    from tests.roformat_images import BochsLayout, cloop_image, deflate
    directory = tmp_path_factory.mktemp("hostile-ro")
    built: dict[str, Sample] = {}
    for name, version in (("bochs-v2", 0x00020000), ("bochs-v1", 0x00010000)):
        path = directory / f"{name}.bochs"
        layout = BochsLayout(disk=1 * MiB, version=version,
                             stored=[(3, 0b1011_0001), (0, 0xFF), (200, 0x80)])
        layout.write(path)
        data_offset = BOCHS_CATALOG + 4 * (256 + layout.spare_entries)
        # the fields after magic, type and subtype; the catalog; the first bitmap
        built[name] = Sample(name, "bochs", path, [(64, 32), (BOCHS_CATALOG, 64),
                                                   (data_offset, 16)], magic_length=64)
    path = directory / "disk.cloop"
    blocks = [bytes([index]) * (16 * KiB) for index in range(6)]
    cloop_image(path, 16 * KiB, [deflate(block) for block in blocks])
    first_chunk = 136 + 8 * 7
    # block_size and n_blocks; the offsets; the first chunk's zlib header
    built["cloop"] = Sample("cloop", "cloop", path, [(128, 8), (136, 56), (first_chunk, 16)],
                            magic_length=128)
    return built


@pytest.mark.parametrize("name", ["bochs-v2", "bochs-v1", "cloop"])
@SETTINGS
@given(data=st.data())
def test_damaged_read_only_formats(read_only_samples: dict[str, Sample], name: str,
                                   data: st.DataObject) -> None:
    sample = read_only_samples[name]
    run_damaged(sample, data.draw(damage(sample)))


def test_valid_read_only_samples_read(read_only_samples: dict[str, Sample]) -> None:
    for sample in read_only_samples.values():
        with guarded():
            trio.run(exercise, sample.path, sample.fmt, False)


#: (sample, [(offset, bytes)], what the one line says): refused at open
READ_ONLY_CLI_DAMAGE = {
    "bochs catalog past EOF": ("bochs-v2", [(68, _le(4, 1 << 31))], "past the end"),
    "bochs catalog of 2^32 entries": ("bochs-v2", [(72, _le(4, 0xFFFF_FFFF))], "too large"),
    "bochs catalog too small": ("bochs-v2", [(72, _le(4, 1))], "too small"),
    "bochs disk of 2^63 bytes": ("bochs-v2", [(88, _le(8, 1 << 63))], "too small"),
    "bochs v1 disk of 2^64-1 bytes": ("bochs-v1", [(84, _le(8, (1 << 64) - 1))], "too small"),
    "bochs extent 0": ("bochs-v2", [(80, _le(4, 0))], "extent size 0"),
    "bochs extent 2^31": ("bochs-v2", [(80, _le(4, 1 << 31))], "extent size"),
    "bochs extent not a power of two": ("bochs-v2", [(80, _le(4, 4097))], "extent size"),
    "bochs bitmap 0": ("bochs-v2", [(76, _le(4, 0))], "bitmap size 0"),
    "bochs version": ("bochs-v2", [(64, _le(4, 0x00030000))], "version"),
    "cloop block_size 0": ("cloop", [(128, _be(4, 0))], "block_size 0"),
    "cloop block_size 4 GiB - 512": ("cloop", [(128, _be(4, 0xFFFF_FE00))], "block_size"),
    "cloop block_size unaligned": ("cloop", [(128, _be(4, 1000))], "block_size 1000"),
    "cloop n_blocks 2^32 - 1": ("cloop", [(132, _be(4, 0xFFFF_FFFF))], "offset table"),
    "cloop n_blocks past EOF": ("cloop", [(132, _be(4, 1 << 20))], "past the end"),
    "cloop offsets decrease": ("cloop", [(144, _be(8, 1))], "decrease"),
    "cloop chunk of 1 TiB": ("cloop", [(144, _be(8, 1 << 40))], "larger than"),
}


@pytest.mark.parametrize("damage", sorted(READ_ONLY_CLI_DAMAGE))
def test_read_only_formats_cli_one_line(read_only_samples: dict[str, Sample],
                                        damage: str) -> None:
    name, changes, says = READ_ONLY_CLI_DAMAGE[damage]
    sample = read_only_samples[name]
    target = sample.path.with_name("cli-" + sample.path.name)
    target.write_bytes(apply_edits(sample.data, changes, []))
    result = imgfs("info", target, check=False, timeout=30)
    assert_one_line_refusal(result)
    assert says in result.stderr


def hostile_cloop(path: Path, chunks: list[bytes], block_size: int = 64 * KiB) -> Path:
    from tests.roformat_images import cloop_image
    cloop_image(path, block_size, chunks)
    return path


@pytest.mark.parametrize("case", ["empty chunk", "bomb", "cut short", "cut by the end",
                                  "short block", "garbage"])
def test_cloop_chunks_refused_when_read(tmp_path: Path, case: str) -> None:
    """Opened (the table is sane), refused by the read that meets the chunk,
    in one line; qemu-img fails the same conversions.  A bomb (64 MiB of
    zeros in 64 KiB of zlib) stops one byte past its 64 KiB block."""
    from tests.roformat_images import deflate
    block = 64 * KiB
    good = deflate(b"\x11" * block)
    bad = {"empty chunk": b"", "bomb": zlib.compress(bytes(64 * MiB), 9),
           "cut short": deflate(b"\x22" * block)[:-9], "cut by the end": good[:-9],
           "short block": deflate(b"\x33" * (block - 512)), "garbage": b"\x99" * 100}[case]
    chunks = [good, bad, good] if case != "cut by the end" else [good, good, bad]
    image = hostile_cloop(tmp_path / "chunk.cloop", chunks)
    if case == "cut by the end":        # the last offset past the end of the file
        data = bytearray(image.read_bytes())
        struct.pack_into(">Q", data, 136 + 8 * 3, len(data) + 9 + 4096)
        image.write_bytes(data)
    result = imgfs("convert", "-O", "raw", image, tmp_path / "out.raw", check=False)
    assert_one_line_refusal(result)
    assert "chunk 1" in result.stderr or "chunk 2" in result.stderr
    if shutil.which("qemu-img"):
        qemu = subprocess.run(["qemu-img", "convert", "-O", "raw", image, tmp_path / "q.raw"],
                              capture_output=True, check=False, timeout=60)
        assert qemu.returncode != 0
    sample = Sample("chunk", "cloop", image, [(128, 8)])
    run_damaged(sample, image.read_bytes())


def test_cloop_chunk_past_the_end_of_the_file_reads_as_qemu(tmp_path: Path) -> None:
    """The last offset past the end of the file: QEMU reads zeros there, so
    a stream that ends inside the file inflates; imgfs reads it too."""
    from tests.roformat_images import deflate
    blocks = [b"\x11" * 4 * KiB, b"\x22" * 4 * KiB]
    image = hostile_cloop(tmp_path / "long.cloop", [deflate(block) for block in blocks],
                          block_size=4 * KiB)
    data = bytearray(image.read_bytes())
    struct.pack_into(">Q", data, 136 + 8 * 2, len(data) + 64 * KiB)
    image.write_bytes(data)
    imgfs("convert", "-O", "raw", image, tmp_path / "out.raw")
    assert (tmp_path / "out.raw").read_bytes() == b"".join(blocks)
    if shutil.which("qemu-img"):
        tool("qemu-img", "compare", "-f", "cloop", "-F", "raw", image, tmp_path / "out.raw")


READ_ONLY_MAGICS = [
    b"Bochs Virtual HD Image".ljust(32, b"\0") + b"Redolog".ljust(16, b"\0") +
    b"Growing".ljust(16, b"\0") + _le(4, 0x00020000),
    b"Bochs Virtual HD Image".ljust(32, b"\0") + b"Redolog".ljust(16, b"\0") +
    b"Growing".ljust(16, b"\0") + _le(4, 0x00010000),
    b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"
    .ljust(128, b"\0"),
]


@SETTINGS
@given(magic=st.sampled_from(READ_ONLY_MAGICS), head=st.binary(min_size=0, max_size=600),
       tail=st.sampled_from([0, 1, 511, 4096, 70000]))
def test_probed_garbage_read_only_formats(read_only_samples: dict[str, Sample], magic: bytes,
                                          head: bytes, tail: int) -> None:
    """A Bochs or cloop header, then anything: probed, opened or refused."""
    run_damaged(read_only_samples["cloop"], magic + head + bytes(tail), fmt=None)


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
            "qed", "qed-backing", "luks1", "vdi", "vdi-static", "vdi-diff", "parallels",
            "parallels-v1", "vhdx", "vhdx-log", "vhdx-diff", "vmdk-sparse", "vmdk-stream",
            "vmdk-esxi", "vmdk-descriptor"]


@pytest.mark.parametrize("name", WRITABLE)
@settings(SETTINGS, max_examples=max(10, EXAMPLES // 3))
@given(data=st.data())
def test_damaged_metadata_written(samples: dict[str, Sample], name: str,
                                  data: st.DataObject) -> None:
    """Writes through a damaged image: refused or done, never a crash."""
    sample = samples[name]
    image = data.draw(damage(sample))
    if sample.fmt == "vhdx" and data.draw(st.booleans(), label="reseal"):
        vhdx_reseal(image)
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


# -- DMG (UDIF) ------------------------------------------------------------------------------
# Built by the tests' own UDIF writer (tests/dmg_images.py): QEMU cannot write DMG.

def dmg_regions(data: bytes) -> list[tuple[int, int]]:
    """The trailer, and the block tables: the resource fork's header and
    its mish tables, or the first bytes of the XML plist."""
    from imgfs.drivers.dmg.layout import Trailer
    trailer = Trailer.unpack(data)
    regions = [(len(data) - 512, 512)]
    if trailer.rsrc_fork_length:
        start = trailer.rsrc_fork_offset
        data_offset = struct.unpack_from(">I", data, start)[0]
        regions += [(start, 16), (start + data_offset, 4 + 204 + 3 * 40)]
    else:
        regions.append((trailer.xml_offset, min(trailer.xml_length, 2048)))
    return regions


@pytest.fixture(scope="module")
def dmg_samples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Sample]:
    from tests import dmg_images as udif
    directory = tmp_path_factory.mktemp("hostile-dmg")
    chunks = [udif.Chunk(udif.ZLIB, 128, udif.pattern(64 * KiB)),
              udif.Chunk(udif.RAW, 8, udif.pattern(4 * KiB, 2)),
              udif.Chunk(udif.ZERO, 64), udif.Chunk(udif.BZIP2, 16, udif.pattern(8 * KiB, 3)),
              udif.Chunk(udif.ADC, 16, udif.pattern(8 * KiB, 4)),
              udif.Chunk(udif.LZFSE, 16, udif.pattern(8 * KiB, 5))]
    built = {}
    for name, fork in (("dmg-xml", False), ("dmg-rsrc", True)):
        path = directory / f"{name}.dmg"
        path.write_bytes(udif.build(udif.Image([udif.Partition(chunks),
                                                udif.Partition(chunks[:2])],
                                               resource_fork=fork)))
        built[name] = Sample(name, "dmg", path, dmg_regions(path.read_bytes()),
                             magic_length=0)
    return built


@pytest.mark.parametrize("name", ["dmg-xml", "dmg-rsrc"])
@SETTINGS
@given(data=st.data())
def test_damaged_dmg(dmg_samples: dict[str, Sample], name: str, data: st.DataObject) -> None:
    sample = dmg_samples[name]
    run_damaged(sample, data.draw(damage(sample)))


def test_valid_dmg_samples_read(dmg_samples: dict[str, Sample]) -> None:
    for sample in dmg_samples.values():
        async def check(sample: Sample = sample) -> None:
            node = await open_image(str(sample.path), OpenContext(read_only=True))
            try:
                assert len(await node.read(0, node.size)) == node.size
            finally:
                await node.aclose()

        trio.run(check)


def _dmg(**changes: Any) -> bytes:
    """A small UDIF image with `changes` to its first chunk ("chunk"), its
    partition ("partition") or the image ("image")."""
    from tests import dmg_images as udif
    chunk = udif.Chunk(udif.ZLIB, 8, udif.pattern(4 * KiB))
    for key, value in changes.get("chunk", {}).items():
        setattr(chunk, key, value)
    partition = udif.Partition([chunk, udif.Chunk(udif.RAW, 8, udif.pattern(4 * KiB, 2))])
    for key, value in changes.get("partition", {}).items():
        setattr(partition, key, value)
    image = udif.Image([partition], **changes.get("image", {}))
    return udif.build(image)


BILLION_LAUGHS = (b'<?xml version="1.0"?><!DOCTYPE plist [<!ENTITY a "aaaaaaaaaa">'
                  b'<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">'
                  b'<!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;">]>'
                  b'<plist><dict><key>resource-fork</key><string>&c;</string></dict></plist>')
PLIST_HEAD = b'<?xml version="1.0"?><plist version="1.0">'

#: damage `imgfs info` refuses at open, in one line
DMG_CLI_DAMAGE: dict[str, dict[str, Any]] = {
    "chunk past the end": {"chunk": {"offset": 1 << 40}},
    "chunk length past the end": {"chunk": {"length": 1 << 62}},
    "huge chunk count": {"partition": {"entry_count": 0xFFFF_FFFF}},
    "huge chunk": {"chunk": {"sectors": 1 << 40}},
    "chunk past the last sector": {"chunk": {"start": (1 << 64) - 4}},
    "zero-length chunk": {"chunk": {"length": 0}},
    "overlapping chunks": {"chunk": {"start": 4}},
    "LZMA chunk": {"chunk": {"kind": 0x80000008}},
    "unknown chunk": {"chunk": {"kind": 0x12345}},
    "huge sector count": {"image": {"sector_count": 1 << 60}},
    "trailer version": {"image": {"extra": {"version": 5}}},
    "huge XML length": {"image": {"extra": {"xml_length": 1 << 62}}},
    "XML past the end": {"image": {"extra": {"xml_offset": 1 << 40}}},
    "no block tables": {"image": {"extra": {"xml_length": 0}}},
    "resource fork past the end": {"image": {"resource_fork": True,
                                             "extra": {"rsrc_offset": 1 << 40}}},
    "XML that is not XML": {"image": {"xml_override": b"\x00\xff not xml at all"}},
    "XML cut short": {"image": {"xml_override": PLIST_HEAD + b"<dict><key>resource-fork"}},
    "XML entities": {"image": {"xml_override": BILLION_LAUGHS}},
    "plist without blkx": {"image": {"xml_override": PLIST_HEAD + b"<dict><key>resource-fork"
                                     b"</key><dict/></dict></plist>"}},
    "blkx Data not base64": {"image": {"xml_override": PLIST_HEAD + b"<dict><key>resource-"
                                       b"fork</key><dict><key>blkx</key><array><dict><key>"
                                       b"Data</key><data>!!!</data></dict></array></dict>"
                                       b"</dict></plist>"}},
    "blkx Data not mish": {"image": {"xml_override": PLIST_HEAD + b"<dict><key>resource-"
                                     b"fork</key><dict><key>blkx</key><array><dict><key>"
                                     b"Data</key><data>AAAA</data></dict></array></dict>"
                                     b"</dict></plist>"}},
}


@pytest.mark.parametrize("damage", sorted(DMG_CLI_DAMAGE))
def test_dmg_cli_one_line(tmp_path: Path, damage: str) -> None:
    target = tmp_path / "cli.dmg"
    target.write_bytes(_dmg(**DMG_CLI_DAMAGE[damage]))
    assert_one_line_refusal(imgfs("info", target, check=False, timeout=30))
    with guarded():
        trio.run(exercise, target, None, False)


def _zlib_bomb(size: int) -> bytes:
    """A zlib stream of `size` zero bytes, made by repeating one flushed
    deflate block (cheap to build, unlike compressing `size` bytes)."""
    import zlib
    piece_size = 8 * MiB
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    piece = deflate.compress(bytes(piece_size)) + deflate.flush(zlib.Z_SYNC_FLUSH)
    return b"\x78\xda" + piece * (size // piece_size) + deflate.flush()


def _adc_bomb(size: int) -> bytes:
    """One literal zero, then copies of 67 bytes from one byte back."""
    return b"\x80\x00" + b"\x7f\x00\x00" * (size // 67)


@pytest.mark.parametrize("kind", ["zlib", "bzip2", "adc", "lzfse"])
def test_dmg_decompression_bombs(tmp_path: Path, kind: str) -> None:
    """A chunk declared as 4 KiB that inflates far past it: an error after
    at most the declared size, with the address space capped (an unbounded
    zlib decoder would need 2 GiB here)."""
    import bz2

    import lzfse

    from tests import dmg_images as udif
    stored = {"zlib": lambda: _zlib_bomb(2048 * MiB),
              "bzip2": lambda: bz2.compress(bytes(16 * MiB)),
              "adc": lambda: _adc_bomb(48 * MiB),
              "lzfse": lambda: bytes(lzfse.compress(bytes(2 * MiB)))}[kind]()
    code = {"zlib": udif.ZLIB, "bzip2": udif.BZIP2, "adc": udif.ADC, "lzfse": udif.LZFSE}[kind]
    target = tmp_path / "bomb.dmg"
    target.write_bytes(udif.build(udif.Image([udif.Partition([
        udif.Chunk(code, 8, stored=stored)])])))

    async def read_bomb() -> None:
        node = await open_image(str(target), OpenContext(read_only=True))
        try:
            with trio.fail_after(REQUEST_SECONDS), \
                    pytest.raises(ImgfsError, match="decodes to more than the 4096 bytes"):
                await node.read(0, 4096)
        finally:
            await node.aclose()

    with guarded():
        trio.run(read_bomb)
    result = imgfs("convert", "-O", "raw", target, tmp_path / "out.raw", check=False)
    assert_one_line_refusal(result)
# -- VMDK descriptors and extents --------------------------------------------------------------

def vmdk_descriptor(directory: Path, name: str, *lines: str) -> Path:
    path = directory / name
    path.write_text("# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n"
                    + "\n".join(lines) + "\n")
    return path


def test_vmdk_grain_table_past_eof_is_one_line(samples: dict[str, Sample]) -> None:
    """A grain directory entry naming a grain table past the end: reading
    (convert) fails in one line, info still opens."""
    sample = samples["vmdk-sparse"]
    gd = struct.unpack_from("<Q", sample.data, 56)[0]
    image = apply_edits(sample.data, [(gd * 512, _le(4, 1 << 30))], [])
    target = sample.path.with_name("gt-" + sample.path.name)
    target.write_bytes(image)
    out = target.with_suffix(".raw")
    assert_one_line_refusal(imgfs("convert", "-O", "raw", target, out, check=False,
                                  timeout=30))


@pytest.mark.parametrize("case", ["self-extent", "self-parent", "missing-extent",
                                  "huge-sectors", "megabytes", "many-extents"])
def test_vmdk_descriptor_damage_is_one_line(tmp_path: Path, case: str) -> None:
    create = 'createType="monolithicFlat"'
    if case == "self-extent":
        image = vmdk_descriptor(tmp_path, "d.vmdk", 'createType="twoGbMaxExtentSparse"',
                                'RW 2048 SPARSE "d.vmdk"')
    elif case == "self-parent":
        (tmp_path / "f.raw").write_bytes(bytes(MiB))
        image = vmdk_descriptor(tmp_path, "d.vmdk", create, 'parentFileNameHint="d.vmdk"',
                                'parentCID=12345678', 'RW 2048 FLAT "f.raw" 0')
    elif case == "missing-extent":
        image = vmdk_descriptor(tmp_path, "d.vmdk", create, 'RW 2048 FLAT "nothing.raw" 0')
    elif case == "huge-sectors":
        image = vmdk_descriptor(tmp_path, "d.vmdk", create,
                                f'RW {1 << 70} FLAT "d.vmdk" 0')
    elif case == "megabytes":
        image = vmdk_descriptor(tmp_path, "d.vmdk", create,
                                *(["# padding " + "x" * 1000] * 4000))
    else:
        image = vmdk_descriptor(tmp_path, "d.vmdk", create,
                                *(['RW 1 FLAT "d.vmdk" 0'] * 70000))
    if case == "self-parent":
        # qemu-img info describes the image without opening its parent
        assert imgfs("info", image, check=False).returncode == 0 == \
            subprocess.run(["qemu-img", "info", image], capture_output=True).returncode
        assert_one_line_refusal(imgfs("info", "--backing-chain", image, check=False))
        return
    assert_one_line_refusal(imgfs("info", image, check=False, timeout=30))


# -- VMDK seSparse extents -------------------------------------------------------------------
# (built from the layout by tests/sesparse_images.py, named by a descriptor;
# only the extent is damaged)

@pytest.fixture(scope="module")
def sesparse_sample(tmp_path_factory: pytest.TempPathFactory) -> Sample:
    from tests.sesparse_images import GT_SPAN_SECTORS, UNMAPPED, ZERO, SeSparse, descriptor
    directory = tmp_path_factory.mktemp("hostile-sesparse")
    extent = SeSparse(2 * GT_SPAN_SECTORS, {0: b"\x11" * 4096, 1: ZERO, 2: UNMAPPED,
                                            4096: b"\x22" * 4096, 4097: b"\x33" * 10},
                      clusters={4096: 4100})
    path = directory / "se-sesparse.vmdk"
    layout = extent.write(path)
    descriptor(directory / "damaged-se.vmdk", [(extent.capacity, "damaged-se-sesparse.vmdk")])
    gd = layout["grain_directory_offset"] * 512
    tables = layout["grain_tables_offset"] * 512
    # both headers; the directory; the first entries of both tables
    return Sample("vmdk-sesparse", "vmdk", path,
                  [(8, 26 * 8), (512, 32), (gd, 16), (tables, 64), (tables + 32768, 64)],
                  magic_length=8)


def damaged_sesparse(sample: Sample, image: bytes | bytearray) -> Path:
    """The damaged extent beside its descriptor; the descriptor's path."""
    sample.path.with_name("damaged-" + sample.path.name).write_bytes(image)
    return sample.path.with_name("damaged-se.vmdk")


@SETTINGS
@given(data=st.data())
def test_damaged_sesparse(sesparse_sample: Sample, data: st.DataObject) -> None:
    image = damaged_sesparse(sesparse_sample, data.draw(damage(sesparse_sample)))
    with guarded():
        trio.run(exercise, image, "vmdk", False)


def test_valid_sesparse_sample_reads(sesparse_sample: Sample) -> None:
    image = damaged_sesparse(sesparse_sample, sesparse_sample.data)
    with guarded():
        trio.run(exercise, image, "vmdk", False)
    assert imgfs("info", image).returncode == 0


#: (constant header field's index or (volatile, byte offset), value, what the
#: line says, whether qemu-img 7.2 refuses it too)
SESPARSE_CLI_DAMAGE = {
    "grain size 16": (3, 16, "grain size", True),
    "grain size 2^63": (3, 1 << 63, "grain size", True),
    "grain table size 128": (4, 128, "grain table size", True),
    "version": (1, 0x300000001, "version", True),
    "flags": (5, 1, "flags", True),
    "reserved": (7, 1, "reserved", True),
    "volatile header past EOF": (10, 1 << 40, "volatile header", False),
    "volatile header inside the journal": (10, 3, "volatile header magic", True),
    "capacity 2^63 sectors": (2, 1 << 63, "capacity", False),
    "directory of 2^40 sectors": (17, 1 << 40, "too large", False),
    "directory of 2^19+1 sectors": (17, (1 << 19) + 1, "too large", True),
    "directory too small": (17, 0, "does not map", False),
    "directory past EOF": (16, 1 << 40, "grain directory", False),
    "grain tables past EOF": (18, 1 << 40, "grain tables", False),
    "grains past EOF": (24, 1 << 50, "grains offset", False),
    "grains in the header": (24, 1, "grains offset", False),
    "replay journal": ((512 + 24), 1, "journal", True),
    "volatile magic": ((512 + 0), 0xCAFEBABE, "volatile header magic", True),
}


@pytest.mark.parametrize("case", sorted(SESPARSE_CLI_DAMAGE))
def test_sesparse_header_damage_is_one_line(sesparse_sample: Sample, case: str) -> None:
    """Refused at open, in one line, within the memory cap; qemu-img refuses
    the fields it checks (where it reads zeros past the end, imgfs refuses)."""
    where, value, says, qemu_refuses = SESPARSE_CLI_DAMAGE[case]
    offset = where if where >= 512 else where * 8
    image = damaged_sesparse(sesparse_sample, apply_edits(sesparse_sample.data,
                                                          [(offset, _le(8, value))], []))
    with guarded():
        trio.run(exercise, image, "vmdk", False)
    result = imgfs("info", image, check=False, timeout=30)
    assert_one_line_refusal(result)
    assert says in result.stderr
    if qemu_refuses:
        qemu = subprocess.run(["qemu-img", "info", image], capture_output=True, check=False)
        assert qemu.returncode == 1, qemu
