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

Module map: `header` (fields, features, extensions), `cluster` (L1/L2
math, L2 cache), `refcount` (refcount cache, allocation, table growth),
`write` (the write path), `repair` (check and refcount rebuild),
`snapshot` / `snapshot_ops`, `bitmaps`, `create`.

Reads are `block_status` alone: host-contiguous runs become one read by
the core; compressed clusters go through `read_data`.  `flush` writes
metadata in the order that keeps a crashed image consistent: refcount
blocks, flush, L2 tables, flush, L1 entries; clusters that lost their last
reference are released only after that.
"""
from __future__ import annotations

import array
import logging
import struct
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
from imgfs.tablecache import MetadataLock, Table, TableCache

from . import bitmaps, snapshot_ops
from . import create as create_mod
from .amend import AMEND_OPTS
from .cluster import (
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    QCOW_OFLAG_COMPRESSED,
    ClusterType,
    Geometry,
    compressed_range,
    l2_run,
    pack_table,
    unpack_l2,
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
    AUTOCLEAR_BITMAPS,
    AUTOCLEAR_DATA_FILE_RAW,
    COMPAT_LAZY_REFCOUNTS,
    COMPRESSION_NAMES,
    EXT_BITMAPS,
    INCOMPAT_CORRUPT,
    INCOMPAT_DATA_FILE,
    INCOMPAT_DIRTY,
    INCOMPAT_EXTL2,
    OFFSET_AUTOCLEAR,
    OFFSET_INCOMPAT,
    OFFSET_REFCOUNT_ORDER_END,
    OFFSET_REFCOUNT_TABLE,
    QCOW_CRYPT_AES,
    QCOW_CRYPT_LUKS,
    QCOW_MAX_SNAPSHOTS_SIZE,
    Header,
    pack_extensions,
    parse_image_header,
    with_backing,
)
from .header import probe as probe_header
from .refcount import RefcountGeometry, RefcountStore
from .snapshot import (
    SNAPSHOT_ENTRY,
    V3_MIN_EXTRA,
    Snapshot,
    SnapshotEntry,
    parse_snapshot_table,
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


#: QEMU refuses to open (or check) a snapshot entry with more extra data
MAX_SNAPSHOT_EXTRA_DATA = 1024


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
        # imgfs check: damage the check reports does not refuse the open.
        # A bad snapshot table or snapshot L1 table is tolerated even for
        # -r (the repair never writes them); the L1 table past the end of
        # the file only read-only.
        self.check_mode = ctx.check
        self.tolerate_tables = ctx.check and self.node.read_only
        self.image = parse_image_header(head, file.size, check=ctx.check,
                                        repair=not self.node.read_only)
        self.header = self.image.header
        self._setup_state(options)
        if self.header.crypt_method == QCOW_CRYPT_LUKS:
            from .crypt import open_cipher  # (cryptography: only when needed)
            self.crypto = await open_cipher(self.image, file, options, ctx,
                                            self.node.filename)
            self.request_alignment = SECTOR_SIZE
        elif self.header.crypt_method == QCOW_CRYPT_AES:
            if not self.node.read_only:
                raise ReadOnly(LEGACY_AES_READ_ONLY)
            from .crypt import open_aes_cipher
            self.crypto = open_aes_cipher(options, ctx, self.node.filename)
            self.request_alignment = SECTOR_SIZE
            log.warning("%s", legacy_aes_warning("qcow2", self.node.filename))
        self.l1 = unpack_table(await self._read_table(self.header.l1_table_offset,
                                                      self.header.l1_size * 8))
        self.snapshots = await self._read_snapshots()
        self.bitmaps = self._bitmaps_extension()
        self.bitmap_directory = await self._load_bitmap_directory()
        await self._open_refcounts()
        if options["snapshot"]:
            await self._select_snapshot(options["snapshot"])
        elif not self.node.read_only:
            await self._open_for_writing()

    def _setup_state(self, options: dict[str, Any]) -> None:
        header = self.header
        incompat = header.incompatible_features
        self.version = header.version
        self.geometry = Geometry(header.cluster_bits, bool(incompat & INCOMPAT_EXTL2))
        self.cluster_size = header.cluster_size
        self.size = header.size
        self.zero_flag = header.version >= 3 and not self.geometry.extended_l2
        # With no name in the image, the data file must come from the
        # option tree ({"data-file": ...}), which the core opens instead.
        self.data_file_name = self.image.data_file
        self.has_data_file = bool(incompat & INCOMPAT_DATA_FILE)
        self.data_child = "data-file" if self.has_data_file else "file"
        self.data_file_raw = bool(header.autoclear_features & AUTOCLEAR_DATA_FILE_RAW)
        cache_bytes = options["l2-cache-size"] or DEFAULT_L2_CACHE
        self.l2_cache = TableCache(cache_bytes // self.cluster_size)
        self.lock = MetadataLock()
        self.l1_dirty: set[int] = set()
        self.prepared = False
        self.inflight = 0
        self.inflated = InflatedClusters(self.cluster_size, header.compression_type)
        self.crypto: ClusterCipher | AesCipher | None = None
        self.can_resize = True
        self.snapshot_view = False
        #: where the next compressed cluster's bytes go (0: a new cluster)
        self.compressed_cursor = 0
        #: see holes_in_file_are_zeros (None: not looked at yet)
        self.preallocated_metadata: bool | None = None
        #: the bitmaps whose bits the write paths set (None: nothing to track)
        self.dirty_bitmaps: bitmaps.Directory | None = None

    async def _read_table(self, offset: int, length: int) -> bytes:
        """A table's bytes; in check mode only the part inside the file (the
        rest reads as no entries, as in QEMU's check), whole entries only."""
        if self.tolerate_tables:
            inside = await self.read_inside(offset, length)
            return inside[:len(inside) // 8 * 8]
        return await self.children["file"].read(offset, length) if length else b""

    async def read_inside(self, offset: int, length: int) -> bytes:
        """Of `length` bytes at `offset`, the part the file holds (none past
        its end): tables that run past the end, as QEMU's check reads them."""
        file = self.children["file"]
        inside = max(0, min(length, file.size - offset))
        return await file.read(offset, inside) if inside else b""

    async def _read_snapshots(self) -> list[Snapshot]:
        """Read exactly the bytes the snapshot table occupies, walking its
        entries' lengths, so a hostile count costs no big allocation.

        Past the end of the file the table reads as zeros, as QEMU reads it
        (its block layer zero-fills reads past EOF): an entry cut off there
        keeps what the file holds of it, and qemu-img info and check accept
        the image.  QEMU's check calls an entry whose fixed part is cut
        "incomplete" (one error each, `snapshot_errors`); a cut name or
        extra data goes unremarked.  Checked with cuts at every field."""
        header = self.header
        self.snapshot_table_length = 0
        self.snapshot_errors: list[str] = []
        if not header.nb_snapshots:
            return []
        file = self.children["file"]
        start = position = end = header.snapshots_offset
        incomplete: set[int] = set()
        for number in range(header.nb_snapshots):
            if position - start > QCOW_MAX_SNAPSHOTS_SIZE:
                raise InvalidImage(f"snapshot table overflows: entry {number} of "
                                   f"{header.nb_snapshots} starts at {position:#x}")
            if position + SNAPSHOT_ENTRY.size > file.size:
                incomplete.add(number)
            entry = SnapshotEntry.unpack(await self._read_zero_padded(position,
                                                                      SNAPSHOT_ENTRY.size))
            if entry.extra_data_size > MAX_SNAPSHOT_EXTRA_DATA:
                raise InvalidImage(f"snapshot table entry {number}: too much extra data "
                                   f"({entry.extra_data_size} bytes, at most "
                                   f"{MAX_SNAPSHOT_EXTRA_DATA})")
            end = position + SNAPSHOT_ENTRY.size + entry.extra_data_size \
                + entry.id_str_size + entry.name_size
            position = end + -end % 8
        self.snapshot_table_length = end - start   # (QEMU leaves out the last padding)
        table = await self._read_zero_padded(start, end - start)
        snapshots = parse_snapshot_table(table, header.nb_snapshots, self.cluster_size,
                                         file.size, check=self.check_mode)
        if self.check_mode:
            if self.version >= 3:
                # as QEMU's check: v3 entries need the VM state and disk sizes
                incomplete.update(number for number, snap in enumerate(snapshots)
                                  if len(snap.extra) < V3_MIN_EXTRA)
            self.snapshot_errors = [f"ERROR snapshot table entry {number} is incomplete"
                                    for number in sorted(incomplete)]
        return snapshots

    async def _read_zero_padded(self, offset: int, length: int) -> bytes:
        """`length` bytes of the file at `offset`, zeros past its end."""
        return (await self.read_inside(offset, length)).ljust(length, b"\0")

    def _bitmaps_extension(self) -> bitmaps.BitmapsExtension | None:
        """The bitmaps extension, when its auto-clear bit says it is valid."""
        if not self.header.autoclear_features & AUTOCLEAR_BITMAPS:
            return None
        for ext in self.image.extensions:
            if ext.type == EXT_BITMAPS:
                found = bitmaps.BitmapsExtension.unpack(ext.data)
                bitmaps.check_extension(found, self.cluster_size, self.children["file"].size)
                return found
        return None

    async def _load_bitmap_directory(self) -> bitmaps.Directory | None:
        if self.bitmaps is None:
            return None
        offset = bitmaps.extension_data_offset(self.header, self.image.extensions)
        try:
            return await bitmaps.Directory.load(self, self.bitmaps, offset)
        except InvalidImage as error:
            # readable without its bitmaps; writes refuse (_mark_bitmaps_in_use)
            log.warning("%s: %s", self.node.filename, error)
            return None

    async def bitmap_entries(self) -> list[bitmaps.BitmapEntry]:
        if self.bitmaps is None:
            return []
        raw = await self.children["file"].read(self.bitmaps.bitmap_directory_offset,
                                               self.bitmaps.bitmap_directory_size)
        return bitmaps.parse_directory(raw, self.bitmaps.nb_bitmaps)

    async def _mark_bitmaps_in_use(self) -> None:
        """Bitmaps are synced at close only: say so before the first write."""
        if self.bitmaps is None:
            return
        if self.bitmap_directory is None:
            raise InvalidImage("the bitmap directory is damaged: refusing to write")
        await self.bitmap_directory.mark_in_use(self)

    async def _open_refcounts(self) -> None:
        header = self.header
        file = self.children["file"]
        table = unpack_table(await self._read_table(header.refcount_table_offset,
                                                    header.refcount_table_clusters
                                                    << header.cluster_bits))
        geometry = RefcountGeometry(header.cluster_bits, header.refcount_order)
        self.refcounts = RefcountStore(file, geometry, table, header.refcount_table_offset,
                                       header.refcount_table_clusters, self._move_reftable)

    async def _select_snapshot(self, wanted: str) -> None:
        for snap in self.snapshots:
            if wanted in (snap.id, snap.name):
                break
        else:
            raise InvalidImage(f"no snapshot with ID or name '{wanted}'")
        if not self.node.read_only:
            raise ReadOnly("a snapshot can only be opened read-only")
        self.snapshot_view = True
        self.can_resize = False
        self.size = snap.disk_size if snap.disk_size is not None else self.size
        if snap.l1_size < self.geometry.l1_entries_for(self.size):
            raise InvalidImage(f"snapshot '{wanted}': l1_size {snap.l1_size} too small "
                               f"for its {self.size}-byte disk")
        self.l1 = unpack_table(await self.children["file"].read(
            snap.l1_table_offset, snap.l1_size * 8))

    async def attach(self) -> None:
        if self.has_data_file and "data-file" not in self.children:
            raise InvalidImage("the image uses an external data file but names none "
                               "(give one with the data-file option)")

    async def _open_for_writing(self) -> None:
        # A corrupt image opens (so that check -r all can repair it) but
        # refuses every guest write (_prepare_for_write).
        incompat = self.header.incompatible_features
        if incompat & INCOMPAT_DIRTY and self.children["file"].driver.writable:
            from . import repair as checks
            await checks.rebuild_refcounts(self)
            await self._set_incompat(self.header.incompatible_features & ~INCOMPAT_DIRTY)
        if self.bitmap_directory is not None:
            self.bitmap_directory.start_tracking(self)
            if self.bitmap_directory.trackers:
                self.dirty_bitmaps = self.bitmap_directory

    def child_refs(self) -> dict[str, ChildRef]:
        refs: dict[str, ChildRef] = {}
        if self.image.backing_file:
            refs["backing"] = ChildRef(self.image.backing_file, self.image.backing_format)
        if self.has_data_file:
            refs["data-file"] = ChildRef(self.data_file_name or "", "raw",
                                         read_only=self.node.read_only)
        return refs

    # -- header updates -------------------------------------------------------------------

    async def _write_header_bytes(self, offset: int, data: bytes) -> None:
        file = self.children["file"]
        await file.write(offset, data)
        await file.flush()

    async def _set_incompat(self, bits: int) -> None:
        if self.version < 3:
            return
        await self._write_header_bytes(OFFSET_INCOMPAT, struct.pack(">Q", bits))
        self.header = self.header._replace(incompatible_features=bits)

    async def _move_reftable(self, offset: int, clusters: int) -> None:
        await self._write_header_bytes(OFFSET_REFCOUNT_TABLE,
                                       struct.pack(">QI", offset, clusters))
        self.header = self.header._replace(refcount_table_offset=offset,
                                           refcount_table_clusters=clusters)

    async def set_backing(self, filename: str | None, fmt: str | None) -> None:
        """Rewrite the header cluster with the new name (spec: backing_file_offset,
        "Backing file format name" extension); what follows the header and its
        extensions in the cluster is zeroed, as it holds nothing else."""
        file = self.children["file"]
        async with self.lock:
            await self._write_back()
            await file.flush()
            head = await file.read(0, min(file.size, self.cluster_size))
            body = with_backing(head, self.image, filename, fmt)
            used = max(len(body), self._header_bytes_used())
            await self._write_header_bytes(0, body.ljust(min(used, len(head)), b"\0"))
            self.image = parse_image_header(body.ljust(len(head), b"\0"), file.size)
            self.header = self.image.header

    def _header_bytes_used(self) -> int:
        header = self.header
        return max(header.backing_file_offset + header.backing_file_size,
                   (header.header_length if header.version >= 3 else 72)
                   + len(pack_extensions(list(self.image.extensions))))

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
        file = self.children["file"]
        stored = (file.allocated_bytes() or 0) // self.cluster_size
        threshold = max(stored * 10 // 9, stored + 2)
        in_use = 0
        for cluster in range(-(-file.size // self.cluster_size)):
            in_use += await self.refcounts.get(cluster) > 0
            if in_use > threshold:
                return True
        return False

    async def persistent_bitmaps(self) -> list[tuple[str, int]] | None:
        if self.version < 3:
            return None
        directory = self.bitmap_directory
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

    async def switch_refcount_structures(self, offset: int, clusters: int, order: int) -> None:
        """Point the header at a new refcount table (and width) in one write
        of the fields from refcount_table_offset to refcount_order."""
        header = self.header._replace(refcount_table_offset=offset,
                                      refcount_table_clusters=clusters,
                                      refcount_order=order if self.version >= 3 else 4)
        end = OFFSET_REFCOUNT_ORDER_END if self.version >= 3 else OFFSET_INCOMPAT
        await self._write_header_bytes(OFFSET_REFCOUNT_TABLE,
                                       header.pack()[OFFSET_REFCOUNT_TABLE:end])
        self.header = header
        await self._open_refcounts()

    async def discard_to_unallocated(self, offset: int, length: int) -> None:
        """Whole clusters in the range unallocated (released): they read from
        the backing file, or as zeros without one."""
        if self.dirty_bitmaps is not None:
            self.dirty_bitmaps.mark(offset, length)
        await self._clear_range(offset, length, zero=False, unmap=True)

    async def amend(self, options: dict[str, Any]) -> None:
        from .amend import amend
        await amend(self, options)

    async def _prepare_for_write(self) -> None:
        """First modification: drop the auto-clear bits we do not maintain
        (spec: autoclear_features) and, with lazy refcounts, mark dirty."""
        if self.header.incompatible_features & INCOMPAT_CORRUPT:
            raise CorruptImage("the image is marked corrupt; refusing to write (repair it "
                               "with check -r all)")
        if self.prepared:
            return
        if self.snapshot_view:
            raise ReadOnly("internal snapshots are opened read-only")
        await self._mark_bitmaps_in_use()
        header = self.header
        keep = header.autoclear_features & AUTOCLEAR_DATA_FILE_RAW
        if self.bitmaps is not None:
            keep |= AUTOCLEAR_BITMAPS
        if self.version >= 3 and header.autoclear_features != keep:
            await self._write_header_bytes(OFFSET_AUTOCLEAR, struct.pack(">Q", keep))
            self.header = header._replace(autoclear_features=keep)
        if self.version >= 3 and header.compatible_features & COMPAT_LAZY_REFCOUNTS:
            await self._set_incompat(self.header.incompatible_features | INCOMPAT_DIRTY)
        self.prepared = True

    async def _mark_corrupt(self, message: str) -> CorruptImage:
        """Set the corrupt bit (spec: incompatible bit 1) and return the error."""
        if not self.node.read_only and self.version >= 3 and not self.snapshot_view:
            try:
                await self._set_incompat(self.header.incompatible_features | INCOMPAT_CORRUPT)
            except ImgfsError:
                pass
        return CorruptImage(message)

    # -- metadata lookups -------------------------------------------------------------------

    async def _l2_table(self, l2_offset: int) -> Table:
        table = self.l2_cache.get(l2_offset)
        if table is not None:
            return table
        file = self.children["file"]
        if l2_offset & (self.cluster_size - 1) or l2_offset + self.cluster_size > file.size:
            raise await self._mark_corrupt(f"L2 table offset {l2_offset:#x} is unaligned or "
                                           f"beyond the end of the {file.size}-byte file")
        if self._overlaps_metadata(l2_offset, self.cluster_size):
            raise await self._mark_corrupt(f"L2 table offset {l2_offset:#x} overlaps the "
                                           "header, the L1 table or the refcount table")
        return await self.l2_cache.load(l2_offset, self._read_l2)

    async def _read_l2(self, l2_offset: int) -> array.array[int]:
        return unpack_l2(await self.children["file"].read(l2_offset, self.cluster_size))

    async def block_status(self, offset: int, length: int) -> Extent:
        extent = await self._mapped_status(offset, length)
        if self.crypto is not None and extent.host_offset is not None:
            return Extent(extent.length, DATA,
                          token=EncryptedRun(extent.host_offset, extent.child))
        return extent

    async def _mapped_status(self, offset: int, length: int) -> Extent:
        """block_status with the host offsets of encrypted clusters."""
        geometry = self.geometry
        l1_index = geometry.l1_index(offset)
        span_end = (l1_index + 1) << (geometry.cluster_bits + geometry.l2_bits)
        length = min(length, span_end - offset)
        if l1_index >= len(self.l1):
            return Extent(length, UNALLOCATED)
        l2_offset = self.l1[l1_index] & L1E_OFFSET_MASK
        if not l2_offset:
            return Extent(length, UNALLOCATED)
        table = await self._l2_table(l2_offset)
        await self._check_host_alignment(table, offset)
        run = l2_run(table.entries, geometry, offset, length, zero_flag=self.zero_flag)
        if run.type is ClusterType.NORMAL:
            # Past the end of its file a cluster reads as zeros, as in QEMU.
            available = self.children[self.data_child].size - run.host_offset
            if available <= 0:
                return Extent(run.length, ZERO)
            return Extent(min(run.length, available), DATA, run.host_offset,
                          self.data_child)
        if run.type is ClusterType.ZERO:
            return Extent(run.length, ZERO)
        if run.type is ClusterType.COMPRESSED:
            return Extent(run.length, DATA)
        return Extent(run.length, UNALLOCATED)

    async def _check_host_alignment(self, table: Table, offset: int) -> None:
        """As QEMU, a request that meets a misaligned host offset (see
        _misaligned_host) fails and marks the image corrupt."""
        host = self._misaligned_host(table, offset)
        if host is not None:
            raise await self._mark_corrupt(
                f"cluster allocation offset {host:#x} unaligned (L2 table at "
                f"{table.offset:#x}, index {self.geometry.l2_index(offset)})")

    def _misaligned_host(self, table: Table, offset: int) -> int | None:
        """The host offset of the standard L2 entry for guest `offset` if it
        is not cluster aligned (spec: "Standard Cluster Descriptor", bits
        9..55), else None; a run of contiguous clusters is aligned when its
        first one is."""
        entry = table.entries[self.geometry.l2_index(offset)
                              * (2 if self.geometry.extended_l2 else 1)]
        host = entry & L2E_OFFSET_MASK
        if host & (self.cluster_size - 1) and not entry & QCOW_OFLAG_COMPRESSED:
            return host
        return None

    async def _entry_at(self, offset: int) -> int:
        """The (first word of the) L2 entry of guest `offset`; 0 if none."""
        l1_index = self.geometry.l1_index(offset)
        if l1_index >= len(self.l1) or not self.l1[l1_index] & L1E_OFFSET_MASK:
            return 0
        table = await self._l2_table(self.l1[l1_index] & L1E_OFFSET_MASK)
        words = 2 if self.geometry.extended_l2 else 1
        return table.entries[self.geometry.l2_index(offset) * words]

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
        return await self.inflated.read(entry, self.geometry.offset_in_cluster(offset), length,
                                        self._compressed_bytes)

    async def read(self, offset: int, length: int) -> bytes:
        # Once the image has shown compressed clusters, a request of several
        # clusters inflates its compressed ones in threads first, at once.
        if self.inflated.used and length > self.cluster_size:
            start = self.geometry.cluster_start(offset)
            entries = [await self._entry_at(cluster)
                       for cluster in range(start, offset + length, self.cluster_size)]
            await self.inflated.prefetch(
                (entry for entry in entries if entry & QCOW_OFLAG_COMPRESSED),
                self._compressed_bytes)
        return await self.node.read_via_status(offset, length)

    async def _compressed_bytes(self, entry: int) -> bytes:
        """The host bytes of the compressed cluster of L2 entry `entry`."""
        host_offset, most = compressed_range(entry, self.geometry.cluster_bits)
        file = self.children["file"]
        if host_offset >= file.size:
            raise await self._mark_corrupt(f"compressed cluster at {host_offset:#x} lies "
                                           f"beyond the end of the {file.size}-byte file")
        return await file.read(host_offset, min(most, file.size - host_offset))

    # -- flush and close -----------------------------------------------------------------

    async def flush(self) -> None:
        async with self.lock:
            await self._write_back()

    async def _write_l2(self, table: Table) -> None:
        await self.children["file"].write(table.offset, pack_table(table.entries))

    async def _write_back(self) -> None:
        """Metadata to disk in crash-safe order (see the module docstring)."""
        file = self.children["file"]
        dirty_tables = self.l2_cache.dirty_tables()
        if await self.refcounts.write_back() and (dirty_tables or self.l1_dirty):
            await file.flush()
        if dirty_tables and self.has_data_file:
            await self.children["data-file"].flush()
        await self.l2_cache.write_back(self._write_l2)
        if self.l1_dirty:
            if dirty_tables:
                await file.flush()
            await self._write_l1()
        if self.refcounts.pending_frees and not self.inflight:
            await file.flush()
            await self.refcounts.apply_frees()
            await self.refcounts.write_back()

    async def _write_l1(self) -> None:
        first, last = min(self.l1_dirty), max(self.l1_dirty)
        raw = pack_table(self.l1[first:last + 1])
        await self.children["file"].write(self.header.l1_table_offset + first * 8, raw)
        self.l1_dirty.clear()

    async def aclose(self) -> None:
        if self.node.read_only or not hasattr(self, "refcounts"):
            return
        with trio.CancelScope(shield=True):
            async with self.lock:
                await self._write_back()
                if self.refcounts.pending_frees:
                    await self._write_back()
                await self._store_bitmaps()
                if self.header.incompatible_features & INCOMPAT_DIRTY and self.prepared:
                    await self.children["file"].flush()
                    await self._set_incompat(self.header.incompatible_features
                                             & ~INCOMPAT_DIRTY)

    async def _store_bitmaps(self) -> None:
        """Close: the maintained bitmaps back to the image, in_use cleared."""
        if self.bitmap_directory is None or not self.prepared:
            return
        try:
            await self.bitmap_directory.store(self)
        except ImgfsError as error:
            log.warning("%s: persistent bitmaps left in use: %s", self.node.filename, error)

    # -- information ----------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        header = self.header
        report: dict[str, Any] = {"cluster-size": self.cluster_size}
        if header.incompatible_features & INCOMPAT_DIRTY:
            report["dirty-flag"] = True
        if self.snapshots:
            report["snapshots"] = [snap.info() for snap in self.snapshots]
        report["compat"] = "0.10" if header.version < 3 else "1.1"
        report["compression-type"] = COMPRESSION_NAMES.get(header.compression_type, "?")
        if header.version >= 3:
            report["lazy-refcounts"] = bool(header.compatible_features
                                            & COMPAT_LAZY_REFCOUNTS)
        if self.bitmap_directory is not None:
            report["bitmaps"] = [bitmap.info() for bitmap in self.bitmap_directory.bitmaps]
        report["refcount-bits"] = 1 << header.refcount_order
        if self.crypto is not None:
            report["encrypt"] = self.crypto.info()
            report["encrypted"] = True
        if self.has_data_file and self.data_file_name:
            report["data-file"] = self.data_file_name
        if self.has_data_file:
            report["data-file-raw"] = self.data_file_raw
        if header.version >= 3:
            report["corrupt"] = bool(header.incompatible_features & INCOMPAT_CORRUPT)
            report["extended-l2"] = self.geometry.extended_l2
        return report

    async def check(self, repair: str | None = None) -> CheckResult:
        """`imgfs check`: qemu-img check's findings, counts and messages."""
        from . import repair as checks  # (here: ~6 ms of every mount otherwise)
        messages: list[str] = []
        fixed: tuple[int, int] | None = (0, 0)
        async with self.lock:
            await self._write_back()
            report = await checks.check_image(self)
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
        from . import repair as checks
        if repair == "leaks" and report.needs_rebuild:
            # a referenced cluster with refcount 0: only -r all may fix that
            messages += [*report.messages, "ERROR need to rebuild refcount structures"]
            report.messages = []
            return None, report
        fixed_first = 0     # snapshot entries rewritten, preallocated entries zeroed
        if repair == "all":
            fixed_first = await snapshot_ops.rewrite_incomplete_table(self, messages)
            fixed_first += await checks.zero_unaligned_preallocated(self, messages)
            if fixed_first:     # QEMU fixes those before it compares refcounts
                report = await checks.check_image(self)
        if repair == "all" and report.damaged_structures:
            await checks.rebuild_refcount_structures(self)
        else:
            await checks.rebuild_refcounts(self, leaks_only=repair == "leaks")
        rebuilt = await checks.check_image(self)
        if repair == "leaks" and (rebuilt.check_errors or rebuilt.leaks or
                                  rebuilt.corruptions != rebuilt.copied_errors):
            # as QEMU: -r leaks fixes the flags only once all else is clean
            return (report.leaks, 0), rebuilt
        await checks.fix_copied_flags(self)
        after = await checks.check_image(self)
        if not after.corruptions and self.header.incompatible_features & INCOMPAT_CORRUPT:
            await self._set_incompat(self.header.incompatible_features & ~INCOMPAT_CORRUPT)
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
        return self.snapshots

    async def create_snapshot(self, name: str) -> None:
        async with self.lock:
            await snapshot_ops.create_snapshot(self, name)

    async def apply_snapshot(self, name: str) -> None:
        if self.bitmaps is not None:
            # as QEMU: switching snapshots would invalidate the bitmaps
            raise Unsupported(f"Could not apply snapshot '{name}': Device has "
                              "active dirty bitmaps")
        async with self.lock:
            await snapshot_ops.apply_snapshot(self, name)

    async def delete_snapshot(self, name: str) -> None:
        async with self.lock:
            await snapshot_ops.delete_snapshot(self, name)

    @classmethod
    async def create(cls, target: Any, size: int, options: dict[str, Any],
                     ctx: OpenContext) -> None:
        await create_mod.create_image(target, size, options, ctx)
