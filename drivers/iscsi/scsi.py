"""SCSI data the driver reads, decoded (pure functions, unit-tested).

Layouts from T10's SPC-4 (standard INQUIRY, VPD pages, MODE SENSE(6)
header, sense keys) and SBC-3 (READ CAPACITY, the Block Limits and Logical
Block Provisioning VPD pages).
"""
from __future__ import annotations

import errno
import struct
from dataclasses import dataclass

from imgfs.errors import ImgfsError, NoSpace, ReadOnly, Unsupported

# Peripheral device types (SPC-4 6.4.2, table 138)
TYPE_DISK = 0x00
TYPE_MMC = 0x05

# VPD page codes
VPD_SUPPORTED_PAGES = 0x00
VPD_BLOCK_LIMITS = 0xB0
VPD_LOGICAL_BLOCK_PROVISIONING = 0xB2

# Sense keys (SPC-4 4.5.6)
SENSE_NOT_READY = 0x02
SENSE_MEDIUM_ERROR = 0x03
SENSE_ILLEGAL_REQUEST = 0x05
SENSE_DATA_PROTECTION = 0x07

# Additional sense code and qualifier, as libiscsi combines them (ASC << 8 | ASCQ)
ASCQ_INVALID_OPERATION_CODE = 0x2000
ASCQ_LBA_OUT_OF_RANGE = 0x2100
ASCQ_INVALID_FIELD_IN_CDB = 0x2400
ASCQ_LUN_NOT_SUPPORTED = 0x2500
ASCQ_WRITE_PROTECTED = 0x2700
ASCQ_SPACE_ALLOCATION_FAILED = 0x2707
ASCQ_MEDIUM_NOT_PRESENT = 0x3A00

SENSE_KEY_NAMES = {
    0x00: "no sense", 0x01: "recovered error", 0x02: "not ready", 0x03: "medium error",
    0x04: "hardware error", 0x05: "illegal request", 0x06: "unit attention",
    0x07: "data protection", 0x08: "blank check", 0x0B: "aborted command",
    0x0D: "volume overflow", 0x0E: "miscompare",
}
ASCQ_NAMES = {
    ASCQ_INVALID_OPERATION_CODE: "invalid operation code",
    ASCQ_LBA_OUT_OF_RANGE: "logical block address out of range",
    ASCQ_INVALID_FIELD_IN_CDB: "invalid field in CDB",
    ASCQ_LUN_NOT_SUPPORTED: "logical unit not supported",
    ASCQ_WRITE_PROTECTED: "write protected",
    ASCQ_SPACE_ALLOCATION_FAILED: "space allocation failed",
    ASCQ_MEDIUM_NOT_PRESENT: "medium not present",
}

#: READ CAPACITY(16) parameter data: last LBA, block length, then flags
CAPACITY16 = struct.Struct(">QI")
#: READ CAPACITY(10) parameter data: last LBA, block length
CAPACITY10 = struct.Struct(">II")
#: the last LBA READ CAPACITY(10) can report; beyond it READ CAPACITY(16) is needed
CAPACITY10_MAX_LBA = 0xFFFFFFFF


@dataclass(frozen=True)
class Capacity:
    blocks: int
    block_size: int
    #: SBC-3 5.16.2: LBPME (the LUN is thin) and LBPRZ (unmapped reads zero)
    thin: bool = False
    unmapped_reads_zero: bool = False


def parse_capacity16(data: bytes) -> Capacity:
    if len(data) < 15:
        raise ValueError(f"READ CAPACITY(16) returned {len(data)} bytes, expected 32")
    last_lba, block_size = CAPACITY16.unpack_from(data)
    return Capacity(last_lba + 1, block_size, bool(data[14] & 0x80), bool(data[14] & 0x40))


def parse_capacity10(data: bytes) -> Capacity:
    if len(data) < CAPACITY10.size:
        raise ValueError(f"READ CAPACITY(10) returned {len(data)} bytes, expected 8")
    last_lba, block_size = CAPACITY10.unpack_from(data)
    return Capacity(last_lba + 1, block_size)


def device_type(inquiry: bytes) -> int:
    """Standard INQUIRY byte 0: peripheral qualifier (must be 0: connected)
    and device type; -1 when no device is connected at this LUN."""
    if not inquiry or inquiry[0] >> 5:
        return -1
    return inquiry[0] & 0x1F


def vpd_payload(data: bytes, page: int) -> bytes:
    """The body of VPD page `page` (after its 4-byte header), checked."""
    if len(data) < 4 or data[1] != page:
        raise ValueError(f"VPD page {page:#x}: malformed reply")
    length = struct.unpack_from(">H", data, 2)[0]
    return data[4:4 + length]


def supported_vpd_pages(data: bytes) -> frozenset[int]:
    return frozenset(vpd_payload(data, VPD_SUPPORTED_PAGES))


@dataclass(frozen=True)
class BlockLimits:
    """SBC-3 6.6.4 (page B0h); counts are in logical blocks, 0 = not reported."""

    max_transfer: int = 0
    max_unmap: int = 0
    max_unmap_descriptors: int = 0
    unmap_granularity: int = 0
    max_write_same: int = 0


def parse_block_limits(data: bytes) -> BlockLimits:
    body = vpd_payload(data, VPD_BLOCK_LIMITS)
    if len(body) < 12:
        raise ValueError("Block Limits VPD page too short")
    max_transfer = struct.unpack_from(">I", body, 4)[0]
    if len(body) < 0x3C:
        return BlockLimits(max_transfer)
    max_unmap, descriptors, granularity = struct.unpack_from(">III", body, 16)
    max_write_same = struct.unpack_from(">Q", body, 32)[0]
    return BlockLimits(max_transfer, max_unmap, descriptors, granularity, max_write_same)


@dataclass(frozen=True)
class Provisioning:
    """SBC-3 6.6.6 (page B2h): which commands may unmap."""

    unmap: bool = False            # LBPU: UNMAP
    write_same_unmap: bool = False  # LBPWS: WRITE SAME(16) with UNMAP


def parse_provisioning(data: bytes) -> Provisioning:
    body = vpd_payload(data, VPD_LOGICAL_BLOCK_PROVISIONING)
    if len(body) < 2:
        raise ValueError("Logical Block Provisioning VPD page too short")
    return Provisioning(bool(body[1] & 0x80), bool(body[1] & 0x40))


#: GET LBA STATUS parameter data (SBC-3 5.6): a header of 8 bytes, then
#: descriptors of LBA, number of blocks and provisioning status
LBA_STATUS_HEADER = 8
LBA_STATUS_DESCRIPTOR = struct.Struct(">QIB3x")
#: provisioning status values: mapped, deallocated, anchored
LBA_MAPPED = 0


@dataclass(frozen=True)
class LbaStatus:
    lba: int
    blocks: int
    mapped: bool


def parse_lba_status(data: bytes, lba: int) -> LbaStatus | None:
    """The first descriptor of GET LBA STATUS, if it covers `lba` (the
    standard says it starts there; a target that says otherwise, or sends
    none, gets no trust)."""
    if len(data) < LBA_STATUS_HEADER + LBA_STATUS_DESCRIPTOR.size:
        return None
    first, blocks, status = LBA_STATUS_DESCRIPTOR.unpack_from(data, LBA_STATUS_HEADER)
    if not first <= lba < first + blocks:
        return None
    return LbaStatus(lba, first + blocks - lba, status & 0x0F == LBA_MAPPED)


def write_protected(mode_sense6: bytes) -> bool:
    """MODE SENSE(6) header byte 2, bit 7: WP (SBC-3 6.5.1, direct access)."""
    return len(mode_sense6) >= 4 and bool(mode_sense6[2] & 0x80)


def sense_text(key: int, ascq: int) -> str:
    name = SENSE_KEY_NAMES.get(key, f"sense key {key:#x}")
    detail = ASCQ_NAMES.get(ascq, f"ASC/ASCQ {ascq >> 8:#04x}/{ascq & 0xFF:#04x}")
    return f"{name}: {detail}"


def sense_error(what: str, key: int, ascq: int) -> ImgfsError:
    """The error a CHECK CONDITION means, with the errno QEMU gives it."""
    message = f"{what}: {sense_text(key, ascq)}"
    if key == SENSE_DATA_PROTECTION:
        if ascq == ASCQ_SPACE_ALLOCATION_FAILED:
            return NoSpace(message)
        return ReadOnly(message)
    if key == SENSE_ILLEGAL_REQUEST:
        if ascq == ASCQ_INVALID_OPERATION_CODE:
            return Unsupported(message)
        return ImgfsError(message, errno_=errno.EINVAL)
    if key == SENSE_NOT_READY and ascq == ASCQ_MEDIUM_NOT_PRESENT:
        return ImgfsError(message, errno_=errno.ENOMEDIUM)
    return ImgfsError(message, errno_=errno.EIO)


def unsupported_command(error: ImgfsError) -> bool:
    """True when a command failed because the LUN does not implement it
    (or that form of it), so that a fallback is in order."""
    return error.errno in (errno.ENOTSUP, errno.EINVAL)
