"""The qcow2 format driver: open, block_status, read, flush, info, check.

Spec: qemu/qemu docs/interop/qcow2.txt.  Supported: versions 2 and 3,
cluster sizes 512 B .. 2 MiB, zero clusters, compressed clusters (zlib,
and zstd through the `zstandard` module: `compress`), backing files (the
core reads them), external data files, extended L2 entries, every refcount
width, lazy refcounts and the dirty bit (a dirty image opened read-write
gets its refcounts rebuilt), the corrupt bit, persistent dirty bitmaps
(`bitmaps`: writes set their bits, stored at close), and internal snapshots (listed, readable
through the `snapshot` open option, created / applied / deleted through
the core's snapshot capability), and ``encrypt.format=luks`` (`crypt`: data clusters
decrypted in `read_data`, encrypted on the way out).  Legacy AES
encryption (crypt_method 1) is read-only, for data liberation: opening it
read-write fails, a read-only open warns that the scheme is broken.

Module map: `metadata` (the state every part shares, as one object:
header, L1 table and L2 cache, refcounts, snapshots, bitmaps, the lock,
and the crash-safe write-back), `header` (fields, features, extensions),
`cluster` (L1/L2 math), `refcount` (refcount cache, allocation, table
growth), `write` (the write path), `repair` (check and refcount rebuild),
`snapshot` / `snapshot_ops`, `bitmaps`, `create`, `amend`.  Each takes
the metadata object; none imports this module.

Reads are `block_status` alone: host-contiguous runs become one read by
the core; compressed clusters go through `read_data`.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, NamedTuple

import trio

from imgfs.block import (
    DATA,
    UNALLOCATED,
    ZERO,
    BlockDriver,
    ChildRef,
    Extent,
    Kind,
    Measurement,
    MeasureSource,
)
from imgfs.errors import (
    CorruptImage,
    ImgfsError,
    InvalidImage,
    ReadOnly,
    Unsupported,
)
from imgfs.node import OpenContext
from imgfs.options import Bool, Opt, Schema, Size, Str

from . import bitmaps, snapshot_ops
from . import create as create_mod
from .amend import AMEND_OPTS
from .cluster import (
    L1E_OFFSET_MASK,
    QCOW_OFLAG_COMPRESSED,
    ClusterType,
    compressed_range,
    l2_run,
    unpack_table,
)
from .compress import InflatedClusters
from .crypt_options import (
    LEGACY_AES_READ_ONLY,
    SECTOR_SIZE,
    encrypt_create_options,
    legacy_aes_warning,
    parse_encrypt_options,
)
from .header import (
    COMPAT_LAZY_REFCOUNTS,
    COMPRESSION_NAMES,
    INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
    QCOW_CRYPT_AES,
    QCOW_CRYPT_LUKS,
    Header,
    parse_image_header,
    with_backing,
)
from .header import probe as probe_header
from .metadata import Qcow2Metadata
from .snapshot import (
    Snapshot,
)
from .write import WriteMixin

if TYPE_CHECKING:
    from imgfs.check import CheckResult

    from . import repair as checks
    from .crypt import AesCipher, ClusterCipher

#: bytes read before the cluster size is known (the fixed header fits)
FIRST_READ = 4096
#: bytes of metadata cache per kind, as QEMU's default l2-cache-size
DEFAULT_L2_CACHE = 4 * 1024 * 1024

log = logging.getLogger("imgfs")


class EncryptedRun(NamedTuple):
    """The token of an encrypted extent: where its clusters are stored, found
    once by block_status (the extent itself is plain DATA to the core, so
    that its bytes come from `read_data`, which decrypts them)."""

    host_offset: int
    child: str




class Qcow2Driver(WriteMixin, BlockDriver):
    name = "qcow2"
    kind = Kind.FORMAT
    supports_backing = True
    can_write_compressed = can_check = has_internal_snapshots = True
    description = "QEMU copy-on-write v2/v3 (read, write, create)"
    #: opened by `imgfs check`; read-only too (set by `open`)
    check_mode = tolerate_tables = False
    open_opts = Schema(
        Opt("l2-cache-size", Size, help="bytes of L2 tables kept in memory"),
        Opt("lazy-refcounts", Bool, help="accepted for QEMU compatibility"),
        Opt("snapshot", Str, help="open this internal snapshot (ID or name), read-only"),
        Opt("encrypt", parse_encrypt_options,
            help="encrypt.key-secret=ID: the secret that provides the passphrase"),
        passthrough=("encrypt.", "cache-size", "refcount-cache-size", "overlap-check",
                     "pass-discard-", "cache-clean-interval", "discard-no-unref"),
    )
    create_opts = create_mod.CREATE_OPTS
    amend_opts = AMEND_OPTS

    # -- probing and opening ----------------------------------------------------------

    @staticmethod
    def probe(head: bytes, filename: str) -> int:
        return probe_header(head, filename)

    async def open(self, options: dict[str, Any], ctx: OpenContext) -> None:
        file = self.children["file"]
        head = await file.read(0, min(file.size, FIRST_READ))
        header = Header.unpack(head)
        if 9 <= header.cluster_bits <= 21 and file.size > len(head):
            head = await file.read(0, min(file.size, 1 << header.cluster_bits))
        image = parse_image_header(head, file.size, check=ctx.check,
                                   repair=not self.node.read_only)
        self.meta = Qcow2Metadata(image, self.children, filename=self.node.filename,
                                  read_only=self.node.read_only, check_mode=ctx.check,
                                  l2_cache_bytes=options["l2-cache-size"] or DEFAULT_L2_CACHE)
        self.inflated = InflatedClusters(self.meta.cluster_size, image.header.compression_type)
        self.crypto: ClusterCipher | AesCipher | None = None
        self.can_resize = True
        #: where the next compressed cluster's bytes go (0: a new cluster)
        self.compressed_cursor = 0
        #: see holes_in_file_are_zeros (None: not looked at yet)
        self.preallocated_metadata: bool | None = None
        #: the bitmaps whose bits the write paths set (None: nothing to track)
        self.dirty_bitmaps: bitmaps.Directory | None = None
        if image.header.crypt_method == QCOW_CRYPT_LUKS:
            from .crypt import open_cipher  # (cryptography: only when needed)
            self.crypto = await open_cipher(image, file, options, ctx, self.node.filename)
            self.request_alignment = SECTOR_SIZE
        elif image.header.crypt_method == QCOW_CRYPT_AES:
            if not self.node.read_only:
                raise ReadOnly(LEGACY_AES_READ_ONLY)
            from .crypt import open_aes_cipher
            self.crypto = open_aes_cipher(options, ctx, self.node.filename)
            self.request_alignment = SECTOR_SIZE
            log.warning("%s", legacy_aes_warning("qcow2", self.node.filename))
        await self.meta.load()
        if options["snapshot"]:
            await self._select_snapshot(options["snapshot"])
        elif not self.node.read_only:
            await self._open_for_writing()

    @property
    def size(self) -> int:  # type: ignore[override]
        """The guest size: the metadata's (resize and snapshots change it)."""
        return self.meta.size

    @size.setter
    def size(self, size: int) -> None:
        self.meta.size = size

    async def _select_snapshot(self, wanted: str) -> None:
        meta = self.meta
        for snap in meta.snapshots:
            if wanted in (snap.id, snap.name):
                break
        else:
            raise InvalidImage(f"no snapshot with ID or name '{wanted}'")
        if not self.node.read_only:
            raise ReadOnly("a snapshot can only be opened read-only")
        meta.snapshot_view = True
        self.can_resize = False
        self.size = snap.disk_size if snap.disk_size is not None else self.size
        if snap.l1_size < meta.geometry.l1_entries_for(self.size):
            raise InvalidImage(f"snapshot '{wanted}': l1_size {snap.l1_size} too small "
                               f"for its {self.size}-byte disk")
        meta.l1 = unpack_table(await self.children["file"].read(
            snap.l1_table_offset, snap.l1_size * 8))

    async def attach(self) -> None:
        if self.meta.has_data_file and "data-file" not in self.children:
            raise InvalidImage("the image uses an external data file but names none "
                               "(give one with the data-file option)")

    async def _open_for_writing(self) -> None:
        meta = self.meta
        # A corrupt image opens (so that check -r all can repair it) but
        # refuses every guest write (_prepare_for_write).
        incompat = meta.header.incompatible_features
        if incompat & INCOMPAT_DIRTY and self.children["file"].driver.writable:
            from . import repair as checks
            await checks.rebuild_refcounts(self.meta)
            await meta.set_incompat(meta.header.incompatible_features & ~INCOMPAT_DIRTY)
        if meta.bitmap_directory is not None:
            meta.bitmap_directory.start_tracking(self.meta)
            if meta.bitmap_directory.trackers:
                self.dirty_bitmaps = meta.bitmap_directory

    def child_refs(self) -> dict[str, ChildRef]:
        meta = self.meta
        refs: dict[str, ChildRef] = {}
        if meta.image.backing_file:
            refs["backing"] = ChildRef(meta.image.backing_file, meta.image.backing_format)
        if meta.has_data_file:
            refs["data-file"] = ChildRef(meta.data_file_name or "", "raw",
                                         read_only=self.node.read_only)
        return refs

    # -- header updates -------------------------------------------------------------------

    async def set_backing(self, filename: str | None, fmt: str | None) -> None:
        """Rewrite the header cluster with the new name (spec: backing_file_offset,
        "Backing file format name" extension); what follows the header and its
        extensions in the cluster is zeroed, as it holds nothing else."""
        meta = self.meta
        file = self.children["file"]
        async with meta.lock:
            await meta.write_back()
            await file.flush()
            head = await file.read(0, min(file.size, meta.cluster_size))
            body = with_backing(head, meta.image, filename, fmt)
            used = max(len(body), meta.header_bytes_used())
            await meta.write_header_bytes(0, body.ljust(min(used, len(head)), b"\0"))
            meta.image = parse_image_header(body.ljust(len(head), b"\0"), file.size)
            meta.header = meta.image.header

    async def holes_in_file_are_zeros(self) -> bool:
        """QEMU's test for an image made with preallocation=metadata: more
        clusters in use by the refcounts than the file really stores (by a
        ninth, and by two clusters); then holes in data clusters read as
        zeros there.  Encrypted clusters are never looked through."""
        if self.crypto is not None:
            return False
        if self.preallocated_metadata is None:
            self.preallocated_metadata = await self._detect_preallocated_metadata()
        return self.preallocated_metadata

    async def _detect_preallocated_metadata(self) -> bool:
        meta = self.meta
        file = self.children["file"]
        stored = (file.allocated_bytes() or 0) // meta.cluster_size
        threshold = max(stored * 10 // 9, stored + 2)
        in_use = 0
        for cluster in range(-(-file.size // meta.cluster_size)):
            in_use += await meta.refcounts.get(cluster) > 0
            if in_use > threshold:
                return True
        return False

    async def persistent_bitmaps(self) -> list[tuple[str, int]] | None:
        if self.meta.version < 3:
            return None
        directory = self.meta.bitmap_directory
        if directory is None:
            return []
        return [(bitmap.name, 1 << bitmap.granularity_bits) for bitmap in directory.bitmaps]

    @classmethod
    def measure(cls, size: int, options: dict[str, Any],
                source: MeasureSource | None) -> Measurement:
        from .measure import measure
        encrypt = encrypt_create_options(options)
        luks_bytes = 0
        if encrypt is not None:
            from ..luks.create import payload_bytes
            try:
                luks_bytes = payload_bytes(encrypt)
            except ImgfsError as exc:
                raise ImgfsError(str(exc).replace("'key-secret'", "'encrypt.key-secret'")) \
                    from None
        return measure(size, options, source, luks_bytes)

    async def make_empty(self) -> None:
        """Every cluster unallocated (released), so reads go to the backing file."""
        await self.discard_to_unallocated(0, self.size)

    async def discard_to_unallocated(self, offset: int, length: int) -> None:
        """Whole clusters in the range unallocated (released): they read from
        the backing file, or as zeros without one."""
        if self.dirty_bitmaps is not None:
            self.dirty_bitmaps.mark(offset, length)
        await self._clear_range(offset, length, zero=False, unmap=True)

    async def amend(self, options: dict[str, Any]) -> None:
        from .amend import amend
        await amend(self, options)

    # -- metadata lookups -------------------------------------------------------------------

    async def block_status(self, offset: int, length: int) -> Extent:
        extent = await self._mapped_status(offset, length)
        if self.crypto is not None and extent.host_offset is not None:
            return Extent(extent.length, DATA,
                          token=EncryptedRun(extent.host_offset, extent.child))
        return extent

    async def _mapped_status(self, offset: int, length: int) -> Extent:
        """block_status with the host offsets of encrypted clusters."""
        meta = self.meta
        geometry = meta.geometry
        l1_index = geometry.l1_index(offset)
        span_end = (l1_index + 1) << (geometry.cluster_bits + geometry.l2_bits)
        length = min(length, span_end - offset)
        if l1_index >= len(meta.l1):
            return Extent(length, UNALLOCATED)
        l2_offset = meta.l1[l1_index] & L1E_OFFSET_MASK
        if not l2_offset:
            return Extent(length, UNALLOCATED)
        table = await meta.l2_table(l2_offset)
        await meta.check_host_alignment(table, offset)
        run = l2_run(table.entries, geometry, offset, length, zero_flag=meta.zero_flag)
        if run.type is ClusterType.NORMAL:
            # Past the end of its file a cluster reads as zeros, as in QEMU.
            available = self.children[meta.data_child].size - run.host_offset
            if available <= 0:
                return Extent(run.length, ZERO)
            return Extent(min(run.length, available), DATA, run.host_offset,
                          meta.data_child)
        if run.type is ClusterType.ZERO:
            return Extent(run.length, ZERO)
        if run.type is ClusterType.COMPRESSED:
            return Extent(run.length, DATA)
        return Extent(run.length, UNALLOCATED)

    async def _entry_at(self, offset: int) -> int:
        """The (first word of the) L2 entry of guest `offset`; 0 if none."""
        meta = self.meta
        l1_index = meta.geometry.l1_index(offset)
        if l1_index >= len(meta.l1) or not meta.l1[l1_index] & L1E_OFFSET_MASK:
            return 0
        table = await meta.l2_table(meta.l1[l1_index] & L1E_OFFSET_MASK)
        words = 2 if meta.geometry.extended_l2 else 1
        return table.entries[meta.geometry.l2_index(offset) * words]

    async def read_data(self, offset: int, length: int, extent: Extent) -> bytes:
        stored = extent.token
        if self.crypto is not None and isinstance(stored, EncryptedRun):
            # (the core reads from `offset`, the start of the extent)
            raw = await self.children[stored.child].read(stored.host_offset, length)
            at = stored.host_offset if self.crypto.physical else offset
            return await self.crypto.decrypt(at, raw)
        entry = await self._entry_at(offset)
        if not entry & QCOW_OFLAG_COMPRESSED:
            raise CorruptImage(f"no compressed cluster at guest offset {offset}")
        return await self.inflated.read(entry, self.meta.geometry.offset_in_cluster(offset), length,
                                        self._compressed_bytes)

    async def read(self, offset: int, length: int) -> bytes:
        meta = self.meta
        # Once the image has shown compressed clusters, a request of several
        # clusters inflates its compressed ones in threads first, at once.
        if self.inflated.used and length > meta.cluster_size:
            start = meta.geometry.cluster_start(offset)
            entries = [await self._entry_at(cluster)
                       for cluster in range(start, offset + length, meta.cluster_size)]
            await self.inflated.prefetch(
                (entry for entry in entries if entry & QCOW_OFLAG_COMPRESSED),
                self._compressed_bytes)
        return await self.node.read_via_status(offset, length)

    async def _compressed_bytes(self, entry: int) -> bytes:
        """The host bytes of the compressed cluster of L2 entry `entry`."""
        host_offset, most = compressed_range(entry, self.meta.geometry.cluster_bits)
        file = self.children["file"]
        if host_offset >= file.size:
            raise await self.meta.mark_corrupt(f"compressed cluster at {host_offset:#x} lies "
                                               f"beyond the end of the {file.size}-byte file")
        return await file.read(host_offset, min(most, file.size - host_offset))

    # -- flush and close -----------------------------------------------------------------

    async def flush(self) -> None:
        async with self.meta.lock:
            await self.meta.write_back()

    async def aclose(self) -> None:
        meta: Qcow2Metadata | None = getattr(self, "meta", None)   # (None: open failed early)
        if self.node.read_only or meta is None or not meta.loaded:
            return
        with trio.CancelScope(shield=True):
            async with meta.lock:
                await meta.write_back()
                if meta.refcounts.pending_frees:
                    await meta.write_back()
                await meta.store_bitmaps()
                incompat = meta.header.incompatible_features
                if incompat & INCOMPAT_DIRTY and meta.prepared:
                    await self.children["file"].flush()
                    await meta.set_incompat(incompat & ~INCOMPAT_DIRTY)

    # -- information ----------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        meta = self.meta
        header = meta.header
        report: dict[str, Any] = {"cluster-size": meta.cluster_size}
        if header.incompatible_features & INCOMPAT_DIRTY:
            report["dirty-flag"] = True
        if meta.snapshots:
            report["snapshots"] = [snap.info() for snap in meta.snapshots]
        report["compat"] = "0.10" if header.version < 3 else "1.1"
        report["compression-type"] = COMPRESSION_NAMES.get(header.compression_type, "?")
        if header.version >= 3:
            report["lazy-refcounts"] = bool(header.compatible_features
                                            & COMPAT_LAZY_REFCOUNTS)
        if meta.bitmap_directory is not None:
            report["bitmaps"] = [bitmap.info() for bitmap in meta.bitmap_directory.bitmaps]
        report["refcount-bits"] = 1 << header.refcount_order
        if self.crypto is not None:
            report["encrypt"] = self.crypto.info()
            report["encrypted"] = True
        if meta.has_data_file and meta.data_file_name:
            report["data-file"] = meta.data_file_name
        if meta.has_data_file:
            report["data-file-raw"] = meta.data_file_raw
        if header.version >= 3:
            report["corrupt"] = bool(header.incompatible_features & INCOMPAT_CORRUPT)
            report["extended-l2"] = meta.geometry.extended_l2
        return report

    async def check(self, repair: str | None = None) -> CheckResult:
        """`imgfs check`: qemu-img check's findings, counts and messages."""
        from . import repair as checks  # (here: ~6 ms of every mount otherwise)
        messages: list[str] = []
        fixed: tuple[int, int] | None = (0, 0)
        async with self.meta.lock:
            await self.meta.write_back()
            report = await checks.check_image(self.meta)
            if repair and (report.leaks or report.corruptions):
                fixed, report = await self._repair(report, repair, messages)
        if fixed is None:
            return checks.as_result(report, messages, failure=(
                "check failed: the refcount structures need a rebuild (use -r all)"))
        return checks.as_result(report, messages, fixed=fixed)

    async def _repair(self, report: checks.CheckReport, repair: str, messages: list[str],
                      ) -> tuple[tuple[int, int] | None, checks.CheckReport]:
        """`check -r leaks|all` as QEMU's qcow2_check_refcounts: returns
        (leaks fixed, corruptions fixed) and the report after the repair,
        or None when -r leaks cannot repair the image.
        -r all also turns unaligned preallocated clusters into zero clusters
        and, when the refcount structures themselves are damaged, builds
        new ones.  Corruptions fixed are those the refcount repair removed
        plus the bit-63 flags still wrong once the refcounts are right;
        other errors in the tables themselves stay."""
        meta = self.meta
        from . import repair as checks
        if repair == "leaks" and report.needs_rebuild:
            # a referenced cluster with refcount 0: only -r all may fix that
            messages += [*report.messages, "ERROR need to rebuild refcount structures"]
            report.messages = []
            return None, report
        fixed_first = 0     # snapshot entries rewritten, preallocated entries zeroed
        if repair == "all":
            fixed_first = await snapshot_ops.rewrite_incomplete_table(self.meta, messages)
            fixed_first += await checks.zero_unaligned_preallocated(self.meta, messages)
            if fixed_first:     # QEMU fixes those before it compares refcounts
                report = await checks.check_image(self.meta)
        if repair == "all" and report.damaged_structures:
            await checks.rebuild_refcount_structures(self.meta)
        else:
            await checks.rebuild_refcounts(self.meta, leaks_only=repair == "leaks")
        rebuilt = await checks.check_image(self.meta)
        if repair == "leaks" and (rebuilt.check_errors or rebuilt.leaks or
                                  rebuilt.corruptions != rebuilt.copied_errors):
            # as QEMU: -r leaks fixes the flags only once all else is clean
            return (report.leaks, 0), rebuilt
        await checks.fix_copied_flags(self.meta)
        after = await checks.check_image(self.meta)
        if not after.corruptions and meta.header.incompatible_features & INCOMPAT_CORRUPT:
            await meta.set_incompat(meta.header.incompatible_features & ~INCOMPAT_CORRUPT)
        fixed_flags = rebuilt.corruptions - after.corruptions
        if repair == "leaks":
            return (report.leaks, fixed_flags), after
        # QEMU's count: what the refcount repair removed, then the flags
        before = report.corruptions - report.copied_errors
        fixed = max(0, before - (rebuilt.corruptions - rebuilt.copied_errors))
        fixed += report.outside_blocks if report.damaged_structures else 0
        return (report.leaks, fixed_first + fixed + fixed_flags), after

    # -- internal snapshots -----------------------------------------------------------------

    def internal_snapshots(self) -> list[Snapshot]:
        return self.meta.snapshots

    async def create_snapshot(self, name: str) -> None:
        async with self.meta.lock:
            await snapshot_ops.create_snapshot(self.meta, name)

    async def apply_snapshot(self, name: str) -> None:
        if self.meta.bitmaps is not None:
            # as QEMU: switching snapshots would invalidate the bitmaps
            raise Unsupported(f"Could not apply snapshot '{name}': Device has "
                              "active dirty bitmaps")
        async with self.meta.lock:
            await snapshot_ops.apply_snapshot(self.meta, name)

    async def delete_snapshot(self, name: str) -> None:
        async with self.meta.lock:
            await snapshot_ops.delete_snapshot(self.meta, name)

    @classmethod
    async def create(cls, target: Any, size: int, options: dict[str, Any],
                     ctx: OpenContext) -> None:
        await create_mod.create_image(target, size, options, ctx)
