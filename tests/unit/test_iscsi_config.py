"""iscsi: URLs, options, the configuration file, the environment, SCSI data
decoding, and the ctypes struct layout against libiscsi's C header."""
from __future__ import annotations

import ctypes
import errno
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from imgfs.drivers.iscsi import binding, scsi
from imgfs.drivers.iscsi.config import (
    DEFAULT_INITIATOR,
    Login,
    parse_config,
    parse_iscsi_url,
    public_url,
    resolve_target,
    split_portal,
)

from imgfs.errors import UsageError
from imgfs.secrets import _inline_secret_spans

IQN = "iqn.2026-01.test.imgfs:t1"


def test_portals() -> None:
    assert split_portal("h") == ("h", 3260)
    assert split_portal("[::1]:3261") == ("::1", 3261)
    assert split_portal("10.0.0.1:999") == ("10.0.0.1", 999)
    for bad in ("h:0", "h:x", "h:70000", "[::1", ":3260", "h/x", "u@h"):
        with pytest.raises(UsageError):
            split_portal(bad)


def test_url_forms() -> None:
    assert parse_iscsi_url(f"iscsi://host/{IQN}/1") == {
        "portal": "host:3260", "target": IQN, "lun": "1"}
    assert parse_iscsi_url(f"iscsi://bob%pw@[::1]:3261/{IQN}/0") == {
        "portal": "[::1]:3261", "user": "bob", "password": "pw", "target": IQN, "lun": "0"}
    parsed = parse_iscsi_url(f"iscsi://u%p@h/{IQN}/2?target_user=t&target_password=tp")
    assert (parsed["target-user"], parsed["target-password"]) == ("t", "tp")


@pytest.mark.parametrize("url", [f"iscsi://h/{IQN}", "iscsi://h//1", f"iscsi://h:0/{IQN}/1",
                                 f"iscsi://h:x/{IQN}/1", f"iscsi://%pw@h/{IQN}/1",
                                 f"iscsi://h/{IQN}/1?x=1", f"iscsi://h/{IQN}/1/2"])
def test_bad_urls_are_refused_without_the_password(url: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_iscsi_url(url.replace("iscsi://", "iscsi://u%SECRET@") if "@" not in url
                        else url)
    assert "SECRET" not in str(info.value) and "pw" not in str(info.value)


def test_public_url_hides_passwords() -> None:
    assert public_url(f"iscsi://bob%s3cret@h/{IQN}/1?target_user=t&target_password=x") == \
        f"iscsi://bob%***@h/{IQN}/1?target_user=t&target_password=***"
    assert public_url(f"iscsi://h/{IQN}/1") == f"iscsi://h/{IQN}/1"


def test_config_file_sections() -> None:
    text = ('# QEMU -readconfig style\n[drive "x"]\n  file = "a"\n[iscsi]\n  user = "all"\n'
            '  password = "pw-all"\n  header-digest = "CRC32C"\n'
            f'[iscsi "{IQN}"]\n  user = "one"\n  password = "pw one"\n'
            '  initiator-name = "iqn.2026-01.test:me"\n')
    sections = parse_config(text, "f")
    assert sections[""] == {"user": "all", "password": "pw-all", "header-digest": "CRC32C"}
    assert sections[IQN]["password"] == "pw one"
    with pytest.raises(UsageError, match="f:2: unknown iscsi key 'colour'"):
        parse_config('[iscsi]\ncolour = "red"\n', "f")


def test_precedence(tmp_path: Path) -> None:
    config = tmp_path / "iscsi.conf"
    config.write_text(f'[iscsi]\n user = "all"\n password = "pw-all"\n'
                      f'[iscsi "{IQN}"]\n initiator-name = "iqn.2026-01.test:me"\n')
    env = {"LIBISCSI_CHAP_USERNAME": "envuser", "LIBISCSI_CHAP_PASSWORD": "envpw"}
    base = {"portal": "h", "target": IQN, "lun": 3}
    target = resolve_target({**base, "iscsi-config": str(config)}, {}, env)
    assert target.login == Login("all", b"pw-all")
    assert target.initiator_name == "iqn.2026-01.test:me"
    assert target.header_digest == "none-crc32c"
    assert resolve_target(base, {}, env).login == Login("envuser", b"envpw")
    given = resolve_target({**base, "user": "me", "password-secret": "s"}, {"s": b"s3c"}, env)
    assert given.login == Login("me", b"s3c")
    assert resolve_target(base, {}, {}).initiator_name == DEFAULT_INITIATOR
    assert "s3c" not in repr(given) and "pw" not in repr(target)
    with pytest.raises(UsageError, match="no secret with id 'nope'"):
        resolve_target({**base, "user": "me", "password-secret": "nope"}, {}, {})
    with pytest.raises(UsageError, match="header digest"):
        resolve_target({**base, "header-digest": "md5"}, {}, {})


def test_url_password_out_of_the_command_line() -> None:
    cmdline = (b"imgfs\0mount\0iscsi://u%hunter2@h/iqn.x:t/1?target_password=tpw\0/mnt\0"
               b'json:{"driver":"iscsi","password": "j\\"pw","target-password":"t2"}')
    assert [cmdline[a:b] for a, b in _inline_secret_spans(cmdline)] == [
        b"hunter2", b"tpw", b'j\\"pw', b"t2"]


# -- SCSI data ---------------------------------------------------------------------------


def test_capacity_and_vpd_pages() -> None:
    cap = struct.pack(">QI", 8191, 4096) + bytes([0, 0, 0xC0, 0]) + bytes(16)
    assert scsi.parse_capacity16(cap) == scsi.Capacity(8192, 4096, True, True)
    assert scsi.parse_capacity10(struct.pack(">II", 99, 2048)) == scsi.Capacity(100, 2048)
    limits = bytearray(0x40)
    limits[1], limits[3] = 0xB0, 0x3C
    struct.pack_into(">I", limits, 8, 2048)
    struct.pack_into(">III", limits, 20, 65536, 16, 8)
    struct.pack_into(">Q", limits, 36, 1 << 20)
    assert scsi.parse_block_limits(bytes(limits)) == scsi.BlockLimits(2048, 65536, 16, 8,
                                                                      1 << 20)
    assert scsi.parse_provisioning(bytes([0, 0xB2, 0, 4, 0, 0xC0, 2, 0])) == \
        scsi.Provisioning(True, True)
    assert scsi.supported_vpd_pages(bytes([0, 0, 0, 3, 0, 0xB0, 0xB2])) == {0, 0xB0, 0xB2}
    with pytest.raises(ValueError):
        scsi.vpd_payload(bytes([0, 0xB0, 0, 4]), 0xB2)
    assert scsi.device_type(bytes([0x05])) == scsi.TYPE_MMC
    assert scsi.device_type(bytes([0x7F])) == -1
    assert scsi.write_protected(bytes([3, 0, 0x80, 0]))


def test_lba_status() -> None:
    header = bytes(8)
    descriptor = scsi.LBA_STATUS_DESCRIPTOR.pack
    assert scsi.parse_lba_status(header + descriptor(100, 50, 1), 120) == \
        scsi.LbaStatus(120, 30, False)
    assert scsi.parse_lba_status(header + descriptor(100, 50, 0), 100) == \
        scsi.LbaStatus(100, 50, True)
    assert scsi.parse_lba_status(header + descriptor(100, 50, 0), 150) is None
    assert scsi.parse_lba_status(header, 0) is None


def test_sense_errnos() -> None:
    assert scsi.sense_error("w", scsi.SENSE_DATA_PROTECTION, 0x2700).errno == errno.EROFS
    assert scsi.sense_error("w", scsi.SENSE_DATA_PROTECTION, 0x2707).errno == errno.ENOSPC
    assert scsi.sense_error("x", scsi.SENSE_ILLEGAL_REQUEST, 0x2000).errno == errno.ENOTSUP
    assert scsi.sense_error("r", scsi.SENSE_MEDIUM_ERROR, 0x1100).errno == errno.EIO
    assert str(scsi.sense_error("r", 5, 0x2100)) == \
        "r: illegal request: logical block address out of range"


# -- the binding against the C header -----------------------------------------------------

C_PROGRAM = r"""
#include <stddef.h>
#include <stdio.h>
#include <stdint.h>
#include <iscsi/iscsi.h>
#include <iscsi/scsi-lowlevel.h>
int main(void) {
    printf("%zu %zu %zu %zu %zu %zu %zu %zu %zu %zu\n",
           offsetof(struct scsi_task, status), offsetof(struct scsi_task, residual_status),
           offsetof(struct scsi_task, residual), offsetof(struct scsi_task, sense),
           offsetof(struct scsi_task, datain), offsetof(struct scsi_sense, key),
           offsetof(struct scsi_sense, ascq), sizeof(struct scsi_sense),
           sizeof(struct unmap_list), sizeof(struct scsi_iovec));
    return 0;
}
"""


def test_struct_layout_matches_the_header(tmp_path: Path) -> None:
    if not (shutil.which("gcc") and Path("/usr/include/iscsi/iscsi.h").exists()):
        pytest.skip("libiscsi-dev not installed")
    source, program = tmp_path / "layout.c", tmp_path / "layout"
    source.write_text(C_PROGRAM)
    subprocess.run(["gcc", "-o", str(program), str(source)], check=True)
    c_values = [int(v) for v in subprocess.run([str(program)], capture_output=True, text=True,
                                               check=True).stdout.split()]
    task, sense = binding.ScsiTask, binding.ScsiSense
    ours = [task.status.offset, task.residual_status.offset, task.residual.offset,
            task.sense.offset, task.datain.offset, sense.key.offset, sense.ascq.offset,
            ctypes.sizeof(sense), ctypes.sizeof(binding.UnmapList),
            ctypes.sizeof(binding.ScsiIovec)]
    assert ours == c_values
