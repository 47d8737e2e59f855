"""`iscsi`: a LUN of an iSCSI target, through libiscsi.

Sources and options: see `config` (QEMU's URL, json:/-o options, the
configuration file and libiscsi's environment variables).  Supported: CHAP
and mutual CHAP, header digests, direct-access LUNs (read and write, 512
or 4096-byte blocks) and CD-ROM LUNs (read-only).  Commands: READ(16) and
WRITE(16) (READ(10) on a CD-ROM), SYNCHRONIZE CACHE(16), UNMAP where the
Logical Block Provisioning VPD page says the LUN supports it, and WRITE
SAME(16) for zeroes where the LUN accepts it (plain writes otherwise).
The LUN's block size is the driver's request alignment: the core widens
and read-modify-writes.

Refused: the iSER transport; LUNs of other device types (tapes, ...).
"""
from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from typing import Any, cast

from imgfs.block import DATA, ZERO, BlockDriver, Extent, Kind
from imgfs.errors import (
    ImgfsError,
    NotFound,
    PermissionDenied,
    ReadOnly,
    Unreachable,
    Unsupported,
)
from imgfs.foreign_io import read_buffer
from imgfs.node import OpenContext
from imgfs.options import MiB, Opt, Schema, Str, in_range, parse_int

from . import binding, scsi
from .binding import ScsiIovec
from .config import parse_header_digest, parse_iscsi_url, parse_lun, public_url, resolve_target
from .session import LoginFailed, Session, buffer_address, unmap_list

#: largest READ/WRITE when the LUN reports no limit (libiscsi splits it
#: into PDUs of the negotiated MaxBurstLength itself)
DEFAULT_MAX_TRANSFER = 8 * MiB
#: writes are split into commands of this size, sent together (the
#: MaxBurstLength tgt and most targets offer: one R2T per command)
WRITE_PIECE = 256 * 1024
#: READ(10)'s transfer length is 16 bits
READ10_MAX_BLOCKS = 0xFFFF
#: UNMAP and WRITE SAME lengths are 32-bit block counts; keep each command modest
MAX_ZERO_BYTES = 256 * MiB
#: INQUIRY allocation length for the standard data and VPD pages
INQUIRY_LENGTH = 255
#: the block sizes a LUN may have here (a power of two in this range)
MIN_BLOCK, MAX_BLOCK = 512, 64 * 1024


class IscsiDriver(BlockDriver):
    name = "iscsi"
    kind = Kind.PROTOCOL
    description = "iSCSI LUNs through libiscsi (iscsi://[USER[%PASSWORD]@]HOST[:PORT]/IQN/LUN)"
    async_io = True
    busy_poll = True
    open_opts = Schema(
        Opt("transport", Str, help="tcp (iser is not supported)"),
        Opt("portal", Str, help="HOST[:PORT] of the target (port 3260 by default)"),
        Opt("target", Str, help="the target's IQN"),
        Opt("lun", parse_lun, help="the LUN number"),
        Opt("user", Str, help="CHAP user name"),
        Opt("password", Str, help="CHAP password (as the URL gives it; prefer password-secret)"),
        Opt("password-secret", Str, help="id of the --object secret holding the CHAP password"),
        Opt("target-user", Str, help="mutual CHAP: the target's user name"),
        Opt("target-password", Str, help="mutual CHAP: the target's password (as the URL "
                                         "gives it; prefer target-password-secret)"),
        Opt("target-password-secret", Str, help="mutual CHAP: id of the secret holding "
                                                "the target's password"),
        Opt("initiator-name", Str,
            help="initiator IQN (default iqn.2008-11.org.linux-kvm:imgfs)"),
        Opt("header-digest", parse_header_digest,
            help="CRC32C, CRC32C-NONE, NONE-CRC32C (default) or NONE"),
        Opt("timeout", parse_int, check=in_range(0, 3600),
            help="seconds before a command times out (0: no limit)"),
        Opt("iscsi-config", Str, help="configuration file with [iscsi] sections "
                                      "(default /etc/imgfs/iscsi.conf if it exists)"),
        Opt("filename", Str, help="an iscsi:// URL"),
    )

    leaf_opts = frozenset({"user", "password-secret", "target-user", "target-password-secret",
                           "initiator-name", "header-digest", "timeout", "iscsi-config"})

    session: Session | None = None
    block_size: int = 512
    use_read10 = False
    can_unmap = False
    unmap_with_write_same = False
    #: FUA on writes: under cache=writethrough/none a write is acknowledged
    #: once it is stable
    fua = 0
    #: a thin LUN whose unmapped blocks read as zeros: block status asks
    #: GET LBA STATUS (False again once the LUN refused it)
    lba_status = False
    #: False once the LUN refused WRITE SAME / SYNCHRONIZE CACHE
    write_same_works = True
    sync_cache_works = True
    limits = scsi.BlockLimits()

    @classmethod
    def parse_filename(cls, filename: str) -> dict[str, Any]:
        options = parse_iscsi_url(filename)
        # What messages and the mount table show: the URL without its secrets
        options["filename"] = public_url(filename)
        return options

    @classmethod
    def public_name(cls, filename: str) -> str:
        return public_url(filename)

    async def open(self, options: dict[str, Any], ctx: OpenContext) -> None:
        target = resolve_target(options, ctx.secrets, os.environ)
        self.session = session = Session(target)
        try:
            await session.login()
        except LoginFailed as exc:
            raise login_error(str(exc), target.url()) from None
        await self._inspect(session)
        self.fua = int(ctx.cache != "writeback")

    async def _inspect(self, session: Session) -> None:
        inquiry = await self._inquiry(0)
        kind = scsi.device_type(inquiry)
        if kind == scsi.TYPE_MMC:
            self.use_read10 = True
            self.writable = False
            self.read_only_by_default = True
            self.read_only_reason = "a CD-ROM LUN is read-only"
        elif kind < 0:
            raise NotFound(f"{session.name}: no device is connected at LUN {session.lun}")
        elif kind != scsi.TYPE_DISK:
            raise Unsupported(f"{session.name}: LUN {session.lun} is a SCSI device of type "
                              f"{kind:#x}, not a disk or CD-ROM")
        capacity = await self._capacity()
        if capacity.block_size & (capacity.block_size - 1) or \
                not MIN_BLOCK <= capacity.block_size <= MAX_BLOCK:
            raise Unsupported(f"{session.name}: block size {capacity.block_size} "
                              f"(expected a power of two from {MIN_BLOCK} to {MAX_BLOCK})")
        self.block_size = self.request_alignment = capacity.block_size
        self.size = capacity.blocks * capacity.block_size
        if kind == scsi.TYPE_DISK:
            await self._inspect_disk(capacity)
        self.max_transfer = self._transfer_limit()

    async def _inspect_disk(self, capacity: scsi.Capacity) -> None:
        pages = await self._vpd_pages()
        if scsi.VPD_BLOCK_LIMITS in pages:
            self.limits = scsi.parse_block_limits(
                await self._inquiry(scsi.VPD_BLOCK_LIMITS, vpd=True))
        if capacity.thin and scsi.VPD_LOGICAL_BLOCK_PROVISIONING in pages:
            provisioning = scsi.parse_provisioning(
                await self._inquiry(scsi.VPD_LOGICAL_BLOCK_PROVISIONING, vpd=True))
            self.can_unmap = provisioning.unmap
            self.unmap_with_write_same = provisioning.write_same_unmap
        self.lba_status = capacity.thin and capacity.unmapped_reads_zero
        mode = await self._try(self._command("mode sense", binding.lib().iscsi_modesense6_task,
                                             1, 0, 0x3F, 0, INQUIRY_LENGTH))
        if mode is not None and scsi.write_protected(mode):
            self.writable = False
            self.read_only_reason = "the LUN is write-protected"

    def _transfer_limit(self) -> int:
        blocks = self.limits.max_transfer
        limit = blocks * self.block_size if blocks else DEFAULT_MAX_TRANSFER
        if self.use_read10:
            limit = min(limit, READ10_MAX_BLOCKS * self.block_size)
        limit = min(limit, DEFAULT_MAX_TRANSFER)
        return max(limit - limit % self.block_size, self.block_size)

    # -- set-up commands ------------------------------------------------------------

    def _session(self) -> Session:
        if self.session is None:
            raise Unreachable("iscsi: not connected")
        return self.session

    async def _command(self, what: str, queue: Any, *args: Any) -> bytes:
        return (await self._session().run(what, queue, *args)).data

    @staticmethod
    async def _try(pending: Any) -> bytes | None:
        """The data of a command the LUN may not implement; None if it does not."""
        try:
            return cast(bytes, await pending)
        except ImgfsError as exc:
            if scsi.unsupported_command(exc):
                return None
            raise

    async def _inquiry(self, page: int, *, vpd: bool = False) -> bytes:
        return await self._command("inquiry", binding.lib().iscsi_inquiry_task,
                                   int(vpd), page, INQUIRY_LENGTH)

    async def _vpd_pages(self) -> frozenset[int]:
        data = await self._try(self._inquiry(scsi.VPD_SUPPORTED_PAGES, vpd=True))
        return scsi.supported_vpd_pages(data) if data else frozenset()

    async def _capacity(self) -> scsi.Capacity:
        lib = binding.lib()
        if not self.use_read10:
            data = await self._try(self._command("read capacity",
                                                 lib.iscsi_readcapacity16_task))
            if data is not None:
                return scsi.parse_capacity16(data)
        capacity = scsi.parse_capacity10(await self._command(
            "read capacity", lib.iscsi_readcapacity10_task, 0, 0))
        if capacity.blocks - 1 == scsi.CAPACITY10_MAX_LBA:
            raise Unsupported(f"{self._session().name}: the LUN is larger than READ "
                              "CAPACITY(10) can say, and READ CAPACITY(16) failed")
        return capacity

    # -- I/O ------------------------------------------------------------------------------

    async def aclose(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def read(self, offset: int, length: int) -> bytes:
        """One READ (the core splits at max_transfer), received in place.
        Not in pieces: each is one more command for both ends, and a fresh
        tgtd gave the buffer of every 256 KiB piece back to the system
        (bench/README.md, twelfth session)."""
        lib, buffer = binding.lib(), read_buffer(length)
        queue = lib.iscsi_read10_iov_task if self.use_read10 else lib.iscsi_read16_iov_task
        address, storage = buffer_address(buffer)
        vec = ScsiIovec(address, length)
        session = self._session()
        command = await session.submit(
            "read", queue, offset // self.block_size, length, self.block_size, 0, 0, 0, 0, 0,
            after=(vec, 1), keep=(storage, vec), must_fill=True)
        await session.wait(command)
        # Received in place: a bytearray serves every caller as bytes would.
        return cast(bytes, buffer)

    async def write(self, offset: int, data: bytes) -> None:
        await self.write_parts(offset, (data,))

    async def write_parts(self, offset: int, parts: tuple[bytes, ...]) -> None:
        """WRITE(16)s in pieces in flight together: each waits for the
        target's R2Ts on its own, so their round trips overlap.  Sent from
        the parts where they lie (a piece's iovecs may span several)."""
        if not self.writable:
            raise ReadOnly(f"{self._session().name}: {self.read_only_reason}")
        lib, session = binding.lib(), self._session()
        segments = [(*buffer_address(part), len(part)) for part in parts if len(part)]
        keep = tuple(storage for _, storage, _ in segments)
        commands, start = [], offset
        for vecs, count, size in _iovecs(segments, WRITE_PIECE):
            commands.append(await session.submit(
                "write", lib.iscsi_write16_iov_task, start // self.block_size, None, size,
                self.block_size, 0, 0, self.fua, 0, 0, after=(vecs, count), keep=(keep, vecs)))
            start += size
        for command in commands:
            await session.wait(command)

    async def flush(self) -> None:
        if not self.writable or not self.sync_cache_works:
            return
        try:
            await self._session().run("synchronize cache",
                                      binding.lib().iscsi_synchronizecache16_task,
                                      0, 0, 0, 0)
        except ImgfsError as exc:
            if exc.errno != errno.ENOTSUP:
                raise
            self.sync_cache_works = False     # a LUN without a volatile cache

    def _pieces(self, offset: int, length: int, max_blocks: int) -> list[tuple[int, int]]:
        """(lba, blocks) runs covering the aligned range, each at most
        `max_blocks` (0: no limit of the LUN's) and MAX_ZERO_BYTES."""
        limit = MAX_ZERO_BYTES // self.block_size
        if max_blocks:
            limit = min(limit, max_blocks)
        lba, end = offset // self.block_size, (offset + length) // self.block_size
        pieces = []
        while lba < end:
            count = min(limit, end - lba)
            pieces.append((lba, count))
            lba += count
        return pieces

    async def discard(self, offset: int, length: int) -> None:
        if not self.can_unmap or not self.writable:
            return
        session, lib = self._session(), binding.lib()
        for lba, count in self._pieces(offset, length, self.limits.max_unmap):
            ranges = unmap_list([(lba, count)])
            await session.run("unmap", lib.iscsi_unmap_task, 0, 0, ranges, 1, keep=(ranges,))

    async def write_zeroes(self, offset: int, length: int, *, may_unmap: bool = False) -> None:
        if self.write_same_works and self.writable:
            try:
                await self._write_same_zeroes(offset, length, may_unmap)
                return
            except ImgfsError as exc:
                if not scsi.unsupported_command(exc):
                    raise
                self.write_same_works = False
        await super().write_zeroes(offset, length, may_unmap=may_unmap)

    async def _write_same_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        session, lib = self._session(), binding.lib()
        zero_block = bytes(self.block_size)
        unmap = int(may_unmap and self.unmap_with_write_same)
        for lba, count in self._pieces(offset, length, self.limits.max_write_same):
            await session.run("write same", lib.iscsi_writesame16_task, lba, zero_block,
                              self.block_size, count, 0, unmap, 0, 0, keep=(zero_block,))

    async def block_status(self, offset: int, length: int) -> Extent:
        """Where the LUN is thin and unmapped blocks read as zeros, those are
        ZERO (so `imgfs map` and `convert` see the holes); all else is DATA."""
        if not self.lba_status:
            return Extent(length, DATA)
        lba = offset // self.block_size
        data = await self._try(self._command(
            "get lba status", binding.lib().iscsi_get_lba_status_task, lba,
            scsi.LBA_STATUS_HEADER + scsi.LBA_STATUS_DESCRIPTOR.size))
        if data is None:
            self.lba_status = False
        status = scsi.parse_lba_status(data or b"", lba)
        if status is None:
            return Extent(length, DATA)
        covered = min((lba + status.blocks) * self.block_size - offset, length)
        return Extent(covered, DATA if status.mapped else ZERO)

    def info(self) -> dict[str, Any]:
        return {"block-size": self.block_size}


def _iovecs(segments: list[tuple[int, Any, int]], piece: int) -> Iterator[tuple[Any, int, int]]:
    """(iovecs, their count, bytes) of consecutive pieces of `piece` bytes
    (the last shorter) over `segments` ((address, owner, length) laid end
    to end)."""
    if len(segments) == 1 and segments[0][2] <= piece:
        # a small write, most of them: one iovec, no array
        address, _, length = segments[0]
        yield ScsiIovec(address, length), 1, length
        return
    vecs: list[ScsiIovec] = []
    room = piece
    for address, _, length in segments:
        done = 0
        while done < length:
            take = min(room, length - done)
            vecs.append(ScsiIovec(address + done, take))
            done, room = done + take, room - take
            if not room:
                yield (ScsiIovec * len(vecs))(*vecs), len(vecs), piece
                vecs, room = [], piece
    if vecs:
        yield (ScsiIovec * len(vecs))(*vecs), len(vecs), piece - room


def login_error(reason: str, url: str) -> ImgfsError:
    """The error for a failed connection or login: the CLI prints it after
    the URL (without secrets)."""
    message = reason if reason.startswith(("cannot connect", "no answer")) \
        else f"cannot log in to the iSCSI target: {reason}"
    lowered = reason.lower()
    if "authentication" in lowered or "authoriz" in lowered:
        error: ImgfsError = PermissionDenied(message)
    elif "not found" in lowered or "not supported" in lowered or "unknown" in lowered:
        error = NotFound(message)
    else:
        error = Unreachable(message)
    error.path = url
    return error


DRIVERS = [IscsiDriver]
