"""The signature probes (pure), the registry's choice between a driver's own
probe and a signature, and the merge the probed-raw guard judges."""
from __future__ import annotations

import struct
import subprocess
import sys
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from imgfs.drivers.raw import merged_window

from imgfs import signatures
from imgfs.registry import FORMATS, probe_name, unsupported_formats
from imgfs.signatures import SIGNATURES, is_vmdk_descriptor
from tests.probe_samples import MINIMAL


@pytest.mark.parametrize("fmt", sorted(MINIMAL))
def test_each_signature_is_recognised(fmt: str) -> None:
    head, tail = MINIMAL[fmt]
    assert probe_name(head, "disk.img", tail) == fmt


@pytest.mark.parametrize("fmt", sorted(MINIMAL))
def test_a_signature_cut_short_is_never_a_crash(fmt: str) -> None:
    head, tail = MINIMAL[fmt]
    for length in range(len(head)):
        assert probe_name(head[:length], "disk.img") in FORMATS
    for length in range(len(tail)):
        assert probe_name(b"", "disk.img", tail[len(tail) - length:]) in FORMATS


def test_every_signature_is_keyed_by_a_format_probing_asks() -> None:
    assert set(SIGNATURES) <= set(FORMATS)
    assert {name for name, _ in unsupported_formats()} <= set(SIGNATURES)


@pytest.mark.parametrize("head", [
    b"KDMV", b"COWD", struct.pack("<Q", 0xCAFEBABE) + struct.pack("<Q", 0x200000001),
    b"# Disk DescriptorFile\nversion=1\n", b"#Disk DescriptorFile\r\nversion=1\r\n",
    b"# Disk Descriptor File\nCID=ffffffff\n", b"# disk descriptorfile\n",
    b"version=1\nCID=ffffffff\n", b"  \n\n# comment\n \t\nversion=3\r\n",
    b"# a comment\n# another\nversion=2\n", b"version = \"1\"\n",
])
def test_vmdk_signatures(head: bytes) -> None:
    assert signatures.probe_vmdk(head, "x") == 100


@pytest.mark.parametrize("head", [
    b"", b"KDM", b"# just a shell script\necho version=1\n", b"CID=ffffffff\nversion=1\n",
    b"# comment only", b"\xeb\x63\x90" + bytes(509), b"versions=1\n", b"version=\n",
])
def test_not_vmdk(head: bytes) -> None:
    assert signatures.probe_vmdk(head, "x") == 0
    assert not is_vmdk_descriptor(head)


def test_vhd_footer_at_the_end_of_any_short_file() -> None:
    footer = b"conectix".ljust(512, b"\0")
    assert signatures.probe_vpc_tail(footer, "x") == signatures.TAIL_SCORE
    assert signatures.probe_vpc_tail(footer[:511], "x") == signatures.TAIL_SCORE  # old 511
    assert signatures.probe_vpc_tail(footer[:510], "x") == 0
    assert signatures.probe_vpc_tail(b"conectix", "x") == 0


def test_a_head_signature_beats_a_tail_one() -> None:
    """A qcow2 image whose last cluster holds a VHD's footer as guest data."""
    assert probe_name(b"QFI\xfb\0\0\0\3", "x.qcow2", b"conectix".ljust(512, b"\0")) == "qcow2"
    assert probe_name(b"vhdxfile", "x", b"koly".ljust(512, b"\0")) == "vhdx"


def test_dmg_by_name_only_as_a_guess() -> None:
    assert probe_name(bytes(512), "Disk.DMG") == "dmg"
    assert probe_name(b"QFI\xfb\0\0\0\3", "disk.dmg") == "qcow2"


def test_weak_signatures_only_beat_raw() -> None:
    cloop = MINIMAL["cloop"][0]
    assert signatures.probe_cloop(cloop, "x") == signatures.GUESS_SCORE
    assert signatures.probe_cloop(cloop[:20], "x") == 0


@settings(max_examples=300, deadline=None)
@given(head=st.binary(max_size=4096), tail=st.binary(max_size=512),
       name=st.sampled_from(["disk.img", "x.dmg", "", "a.vmdk"]))
def test_any_bytes_probe_to_a_format_name(head: bytes, tail: bytes, name: str) -> None:
    assert probe_name(head, name, tail) in FORMATS


@settings(max_examples=300, deadline=None)
@given(old=st.binary(max_size=64), start=st.integers(0, 80), offset=st.integers(0, 160),
       data=st.binary(min_size=1, max_size=80), zeros=st.booleans())
def test_merged_window_is_the_window_after_the_write(old: bytes, start: int, offset: int,
                                                     data: bytes, zeros: bool) -> None:
    disk = bytearray(start + len(old) + 300)
    disk[start:start + len(old)] = old
    written = bytes(len(data)) if zeros else data
    disk[offset:offset + len(data)] = written
    merged = merged_window(old, start, offset, len(data), None if zeros else data)
    assert merged == bytes(disk[start:start + len(old)])


def test_a_driver_module_takes_over_from_its_signature() -> None:
    """Once drivers/vdi exists, its own light probe is asked, not the table's
    (run in a fresh interpreter: the registry caches what it looked up)."""
    script = textwrap.dedent("""
        import sys, types
        from imgfs.block import BlockDriver, Kind
        from imgfs.registry import get_driver, probe_format, unsupported_formats

        class StandIn(BlockDriver):
            name = "vdi"
            kind = Kind.FORMAT
            async def open(self, options, ctx):
                pass

        module = types.ModuleType("imgfs.drivers.vdi")
        module.DRIVERS = [StandIn]
        module.probe = lambda head, filename: 100 if head.startswith(b"STANDIN") else 0
        sys.modules["imgfs.drivers.vdi"] = module
        vdi_head = bytes(0x40) + (0xBEDA107F).to_bytes(4, "little")
        assert probe_format(b"STANDIN", "x") is StandIn
        assert probe_format(vdi_head, "x").name == "raw"     # the table is not asked
        assert "vdi" not in dict(unsupported_formats())
        assert get_driver("vdi") is StandIn
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60)
    assert result.stdout == "ok\n", result.stderr
