"""Images of every format imgfs recognises but may have no driver for: made
by qemu-img where it can, decompressed from ../shared/sample-images/ (images
written by the formats' own tools), or, where neither exists (VMDK's COWD and
seSparse extents, descriptor spellings), built from the layout in a few lines.

Each case is (id, expected format name, build function); a build function
gets an empty directory and returns the image's path.
"""
from __future__ import annotations

import bz2
import struct
from collections.abc import Callable
from pathlib import Path

from tests.conftest import need, run

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_IMAGES = ROOT.parent / "shared" / "sample-images"
MiB = 1 << 20

Builder = Callable[[Path], Path]


def qemu_img(fmt: str, name: str, *options: str) -> Builder:
    def build(directory: Path) -> Path:
        need("qemu-img")
        image = directory / name
        args = ["-o", ",".join(options)] if options else []
        run("qemu-img", "create", "-q", "-f", fmt, *args, image, "4M")
        return image
    return build


def sample(name: str, rename: str | None = None) -> Builder:
    def build(directory: Path) -> Path:
        packed = SAMPLE_IMAGES / f"{name}.bz2"
        assert packed.exists(), f"sample image {packed} not found (see SPECS.md)"
        image = directory / (rename or name)
        image.write_bytes(bz2.decompress(packed.read_bytes()))
        return image
    return build


def cowd_extent(directory: Path) -> Path:
    """An ESX sparse (COWD) extent: its 2048-byte header (libvmdk's VMDK
    document: magic, version 1, flags 3, capacity and grain in sectors, grain
    directory at sector 4 with one entry) and an empty grain directory."""
    header = struct.pack("<4sIIIIIII", b"COWD", 1, 3, 8192, 16, 4, 1, 5)
    image = directory / "disk-delta.vmdk"
    image.write_bytes(header.ljust(2048, b"\0") + bytes(512))
    return image


def sesparse_extent(directory: Path) -> Path:
    """The start of a seSparse extent: its constant header (magic
    0xcafebabe and version 0x200000001, little-endian 64-bit) and capacity."""
    header = struct.pack("<QQQQQ", 0xCAFEBABE, 0x200000001, 8192, 8, 64)
    image = directory / "disk-sesparse.vmdk"
    image.write_bytes(header.ljust(512, b"\0") + bytes(4 * 512))
    return image


def descriptor(text: str, name: str = "disk.vmdk") -> Builder:
    def build(directory: Path) -> Path:
        (directory / "disk-flat.vmdk").write_bytes(bytes(MiB))
        image = directory / name
        image.write_bytes(text.encode())
        return image
    return build


VMWARE_DESCRIPTOR = """# Disk DescriptorFile
version=1
encoding="UTF-8"
CID=fffffffe
parentCID=ffffffff
createType="monolithicFlat"

# Extent description
RW 2048 FLAT "disk-flat.vmdk" 0

# The Disk Data Base
#DDB

ddb.adapterType = "lsilogic"
"""

#: (id, format name, builder): one per signature and per subformat
CASES: list[tuple[str, str, Builder]] = [
    ("qed", "qed", qemu_img("qed", "disk.qed")),
    ("vmdk-monolithicSparse", "vmdk", qemu_img("vmdk", "disk.vmdk")),
    ("vmdk-monolithicFlat", "vmdk",
     qemu_img("vmdk", "disk.vmdk", "subformat=monolithicFlat")),
    ("vmdk-streamOptimized", "vmdk",
     qemu_img("vmdk", "disk.vmdk", "subformat=streamOptimized")),
    ("vmdk-twoGbMaxExtentSparse", "vmdk",
     qemu_img("vmdk", "disk.vmdk", "subformat=twoGbMaxExtentSparse")),
    ("vmdk-twoGbMaxExtentFlat", "vmdk",
     qemu_img("vmdk", "disk.vmdk", "subformat=twoGbMaxExtentFlat")),
    ("vmdk-esxi-streamOptimized", "vmdk", sample("iotest-version3.vmdk")),
    ("vmdk-cowd", "vmdk", cowd_extent),
    ("vmdk-sesparse", "vmdk", sesparse_extent),
    ("vmdk-descriptor-vmware", "vmdk", descriptor(VMWARE_DESCRIPTOR)),
    ("vmdk-descriptor-crlf-spaced", "vmdk",
     descriptor(VMWARE_DESCRIPTOR.replace("# Disk DescriptorFile", "#Disk Descriptor File")
                .replace("\n", "\r\n"))),
    ("vmdk-descriptor-version-first", "vmdk",
     descriptor("version=1\nCID=12345678\ncreateType=\"vmfs\"\n"
                "RW 2048 VMFS \"disk-flat.vmdk\"\n")),
    ("vmdk-descriptor-blank-lines", "vmdk",
     descriptor("\n\n  version=1\nCID=12345678\ncreateType=\"vmfs\"\n"
                "RW 2048 VMFS \"disk-flat.vmdk\"\n")),
    ("vhdx", "vhdx", qemu_img("vhdx", "disk.vhdx")),
    ("vhdx-hyperv", "vhdx", sample("iotest-dynamic-1G.vhdx")),
    ("vpc-dynamic", "vpc", qemu_img("vpc", "disk.vhd")),
    ("vpc-fixed", "vpc", qemu_img("vpc", "disk.vhd", "subformat=fixed")),
    ("vpc-virtualpc", "vpc", sample("virtualpc-dynamic.vhd")),
    ("vpc-hyperv", "vpc", sample("hyperv2012r2-dynamic.vhd")),
    ("vdi", "vdi", qemu_img("vdi", "disk.vdi")),
    ("vdi-static", "vdi", qemu_img("vdi", "disk.vdi", "static=on")),
    ("parallels", "parallels", qemu_img("parallels", "disk.hds")),
    ("parallels-old-magic", "parallels", sample("parallels-v1")),
    ("bochs", "bochs", sample("empty.bochs")),
    ("cloop", "cloop", sample("simple-pattern.cloop")),
    ("dmg", "dmg", sample("simple-dmg.dmg")),
    ("dmg-koly-only", "dmg", sample("simple-dmg.dmg", rename="apple-image")),
]


def refusal(name: str, fmt: str) -> str:
    """The one line imgfs prints for a recognised format without a driver."""
    return (f"imgfs: {name}: {fmt} images are not supported by this version "
            "(see 'imgfs formats')\n")


#: format name -> (head, tail): the bytes of its signature and little else,
#: as the first sector of a file (head) or as its last bytes (tail)
_SIGNATURE_BYTES = {
    "qed": (b"QED\0" + struct.pack("<III", 65536, 4, 1), b""),
    "vmdk": (b"KDMV\1\0\0\0", b""),
    "vhdx": (b"vhdxfile", b""),
    "vpc": (b"", b"conectix".ljust(512, b"\0")),
    "vdi": (b"<<< Oracle VM VirtualBox Disk Image >>>\n".ljust(0x40, b"\0")
            + struct.pack("<I", 0xBEDA107F), b""),
    "parallels": (b"WithoutFreeSpace" + struct.pack("<I", 2), b""),
    "bochs": (b"Bochs Virtual HD Image".ljust(32, b"\0") + b"Redolog".ljust(16, b"\0")
              + b"Growing".ljust(16, b"\0"), b""),
    "cloop": (b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 "
              b"/dev/cloop $1\n", b""),
    "dmg": (b"", b"koly\0\0\0\4\0\0\2\0".ljust(512, b"\0")),
    "qcow2": (b"QFI\xfb\0\0\0\3", b""),
    "qcow": (b"QFI\xfb\0\0\0\1", b""),
    "luks": (b"LUKS\xba\xbe\0\1", b""),
}
MINIMAL = {fmt: (head.ljust(512, b"\0") if head else head, tail)
           for fmt, (head, tail) in _SIGNATURE_BYTES.items()}

#: the byte of each signature (offset in its head or tail) that completes it
#: when written last; 0 unless the signature does not start at offset 0
KEY_BYTE = {"vdi": 0x40}
