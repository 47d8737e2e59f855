"""The core of the block graph: `Node` wraps a driver and enforces the rules
every driver relies on.

* bounds: a request that crosses the end of the node is refused;
* read-only: a write to a read-only node is refused;
* alignment: requests are widened to the driver's `request_alignment`
  (read-modify-write for writes), and split at its `max_transfer`;
* allocation: the default format read walks `block_status` and resolves
  what this layer does not allocate to the backing node, or to zeros;
* errors: an OSError or struct.error escaping a driver becomes an
  `ImgfsError` here, so callers see one family of exceptions.
"""
from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from .block import BlockDriver, Extent, InternalSnapshot, Kind, Status
from .errors import CorruptImage, ImgfsError, OutOfRange, ReadOnly, Unsupported, from_oserror

if TYPE_CHECKING:
    from .check import CheckResult


@dataclass
class OpenContext:
    """Settings that apply to a whole graph (from the command line)."""

    #: None: read-write unless the format is read-only
    read_only: bool | None = None
    locking: str = "auto"
    force_share: bool = False
    #: writeback | writethrough | none (none opens files with O_DIRECT)
    cache: str = "writeback"
    #: secrets by id (--object secret,...)
    secrets: dict[str, bytes] = field(default_factory=dict)
    #: the mount's key-secret=ID and passphrase-file=PATH: used by an
    #: encrypted image whose own options name no secret (see imgfs.secrets)
    key_secret: str | None = None
    passphrase_file: str | None = None
    #: True when the top-level format was probed rather than given
    probed: bool = False
    #: a terminal is there to ask for a passphrase
    interactive: bool = False
    #: opened only to be described (imgfs info), as qemu-img's BDRV_O_NO_IO:
    #: encrypted formats read their headers but ask for no passphrase
    no_io: bool = False
    #: the backing file an image names is not opened (qemu-img info, as
    #: QEMU's BDRV_O_NO_BACKING): the image is described even when its
    #: backing file is missing, damaged, locked or loops back to it
    no_backing: bool = False
    #: mount -s: options no driver knows are ignored (with a warning), not refused
    sloppy: bool = False
    #: opened for `imgfs check`, as qemu-img's BDRV_O_CHECK: a read-only
    #: open tolerates the damage the check reports (tables past the end of
    #: the file, bad snapshot L1 tables) instead of refusing the image
    check: bool = False
    #: for drivers that need background tasks (connection readers); the
    #: mount and the CLI own it and cancel it after every node is closed
    nursery: Any = None


#: what a driver may let escape by accident; the core turns them into ImgfsError
DRIVER_FAULTS = (OSError, struct.error, ValueError)


@dataclass(frozen=True, slots=True)
class ChainStatus:
    """One run of an image through its backing chain (`Node.map_above`)."""

    length: int
    status: Status
    #: the layer that holds the run (0: the image itself)
    depth: int
    #: where the run's bytes lie untransformed in a protocol node (the
    #: file, the device...), when they do
    host_offset: int | None = None


class DriverErrors:
    """``with node._driver_errors:`` around every driver call: a fault a
    driver let escape (DRIVER_FAULTS) becomes an ImgfsError naming the node's
    file, and a driver's own ImgfsError names it unless a deeper node did.
    Stateless, so one instance per node serves every (concurrent) call."""

    __slots__ = ("node",)

    def __init__(self, node: Node) -> None:
        self.node = node

    def __enter__(self) -> None:
        pass

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 traceback: Any) -> None:
        if exc is None:
            return
        if isinstance(exc, DRIVER_FAULTS):
            raise self.node._wrap(exc) from exc
        if isinstance(exc, ImgfsError):
            self.node._named(exc)


class Node:
    """One node of the graph: a driver instance plus the core's rules."""

    __slots__ = ("driver", "filename", "read_only", "ctx", "probed",
                 "_rmw_lock", "_tail", "_closed", "_driver_errors")

    def __init__(self, driver: BlockDriver, filename: str, read_only: bool,
                 ctx: OpenContext) -> None:
        self.driver = driver
        self.filename = filename
        self.read_only = read_only
        self.ctx = ctx
        self.probed = False
        self._rmw_lock = trio.Lock()
        #: (offset, bytes) of the partial block a write ended in, as it
        #: wrote it: the next write's read-modify-write needs that block
        #: (a 1 MiB write the kernel cut in two, 1048560 bytes then 16)
        self._tail: tuple[int, bytes] | None = None
        self._closed = False
        self._driver_errors = DriverErrors(self)
        driver.node = self
        driver.children = {}

    # -- graph ----------------------------------------------------------------

    @property
    def size(self) -> int:
        return self.driver.size

    @property
    def sector_size(self) -> int:
        return self.driver.sector_size

    @property
    def children(self) -> dict[str, Node]:
        return self.driver.children

    @property
    def format_name(self) -> str:
        return self.driver.name

    @property
    def kind(self) -> Kind:
        return self.driver.kind

    @property
    def backing(self) -> Node | None:
        return self.driver.children.get("backing")

    @property
    def file(self) -> Node | None:
        return self.driver.children.get("file")

    def chain(self) -> list[Node]:
        """This node and its backing nodes, top first."""
        nodes: list[Node] = []
        node: Node | None = self
        while node is not None:
            nodes.append(node)
            node = node.backing
        return nodes

    def set_read_only(self, read_only: bool) -> None:
        """Propagate a read-only decision to the children that carry our data."""
        self.read_only = read_only
        for name, child in self.children.items():
            if name != "backing":
                child.set_read_only(read_only)

    def allocated_bytes(self) -> int | None:
        """Host bytes used by this node and its non-backing children."""
        own = self.driver.allocated_bytes()
        if own is not None:
            return own
        total, known = 0, False
        for name, child in self.children.items():
            if name == "backing":
                continue
            used = child.allocated_bytes()
            if used is not None:
                total, known = total + used, True
        return total if known else None

    # -- checks ---------------------------------------------------------------

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.driver.size:
            raise OutOfRange(f"request {offset}+{length} outside the "
                             f"{self.driver.size}-byte node {self.filename}")

    def _check_writable(self) -> None:
        """Where every change but `write` begins (they may change the block
        `_tail` keeps)."""
        self._tail = None
        self._refuse_read_only()

    def _refuse_read_only(self) -> None:
        if self.read_only:
            raise ReadOnly(f"{self.filename} is open read-only")

    def _named(self, exc: ImgfsError) -> None:
        """Let a driver's error name this node's file, unless a deeper node did."""
        if exc.path is None:
            exc.path = self.filename

    def _wrap(self, exc: Exception) -> ImgfsError:
        if isinstance(exc, OSError):
            wrapped = from_oserror(exc)
        else:
            wrapped = CorruptImage(f"malformed metadata ({exc})")
        wrapped.path = self.filename
        return wrapped

    # -- reads ----------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes:
        self._check_range(offset, length)
        if length == 0:
            return b""
        align = self.driver.request_alignment
        if align > 1 and (offset | length) & (align - 1):
            start = offset & ~(align - 1)
            end = min(-(-(offset + length) // align) * align, self._aligned_size())
            data = await self._read_split(start, end - start)
            return data[offset - start:offset - start + length]
        return await self._read_split(offset, length)

    def _aligned_size(self) -> int:
        align = self.driver.request_alignment
        return -(-self.driver.size // align) * align

    async def _read_split(self, offset: int, length: int) -> bytes:
        limit = self.driver.max_transfer
        with self._driver_errors:
            if not limit or length <= limit:
                return await self.driver.read(offset, length)
            parts = []
            for start in range(offset, offset + length, limit):
                parts.append(await self.driver.read(start, min(limit, offset + length - start)))
        return b"".join(parts)

    async def read_via_status(self, offset: int, length: int) -> bytes:
        """The default format read: walk block_status, one read per extent."""
        driver = self.driver
        end = offset + length
        parts: list[bytes] = []
        while offset < end:
            extent = await driver.block_status(offset, end - offset)
            count = min(extent.length, end - offset)
            if count <= 0:
                raise CorruptImage(f"{self.filename}: empty extent at offset {offset}")
            parts.append(await self._read_extent(offset, count, extent))
            offset += count
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def _read_extent(self, offset: int, count: int, extent: Extent) -> bytes:
        status = extent.status
        if not status & Status.ALLOCATED:
            return await self.read_unallocated(offset, count)
        if status & Status.ZERO:
            return bytes(count)
        if extent.host_offset is not None:
            child = self.driver.children.get(extent.child)
            if child is None:
                raise CorruptImage(f"{self.filename}: no '{extent.child}' child")
            return await child.read(extent.host_offset, count)
        return await self.driver.read_data(offset, count, extent)

    async def read_unallocated(self, offset: int, length: int) -> bytes:
        """Bytes this layer does not hold: the backing node's, then zeros."""
        backing = self.backing
        if backing is None or offset >= backing.size:
            return bytes(length)
        available = min(length, backing.size - offset)
        data = await backing.read(offset, available)
        return data if available == length else data + bytes(length - available)

    # -- writes ---------------------------------------------------------------

    async def write(self, offset: int, data: bytes) -> None:
        await self.write_parts(offset, (data,))

    async def write_parts(self, offset: int, parts: tuple[bytes, ...]) -> None:
        """Write `parts` laid end to end from `offset` (`write`: one part).
        They reach the driver as they are where they cover whole blocks (a
        format passing the core's head, data and tail down to its file
        saves the copy that joining them costs)."""
        self._refuse_read_only()
        length = sum(map(len, parts))
        self._check_range(offset, length)
        if not length:
            return
        align = self.driver.request_alignment
        with self._driver_errors:
            if align > 1:
                async with self._rmw_lock:
                    await self._write_aligned(offset, parts, length, align)
            else:
                await self._write_parts(offset, parts, length)

    async def _write_aligned(self, offset: int, parts: tuple[bytes, ...], length: int,
                             align: int) -> None:
        end = offset + length
        start = offset & ~(align - 1)
        aligned_end = -(-end // align) * align
        known, self._tail = self._tail, None        # unknown until written
        if start == offset and aligned_end == end:
            await self._write_parts(offset, parts, length)
            return
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        # Read-modify-write of the partial head and tail blocks, and of
        # nothing between them: a 1 MiB write from a buffer that is not page
        # aligned reaches us as 1 MiB - 16 bytes and 16 bytes (FUSE's
        # 256-page limit), and reading the whole range back cost a LUKS
        # image half its time per MiB (bench/README.md).
        first = await self._read_block(start, align, known) if start < offset else None
        head = first[:offset - start] if first is not None else b""
        tail = b""
        last_start = aligned_end - align
        if end < aligned_end:
            last = first if first is not None and last_start == start else \
                await self._read_block(last_start, align, known)
            tail = last[end - last_start:]
        await self._write_parts(start, (head, data, tail), aligned_end - start)
        if tail:
            written = (data[last_start - offset:],) if last_start >= offset else (head, data)
            self._tail = (last_start, b"".join((*written, tail)))

    async def _write_parts(self, offset: int, parts: tuple[bytes, ...], length: int) -> None:
        """One part: the driver's write (split by max_transfer); several:
        its write_parts, unless they exceed max_transfer together."""
        if len(parts) == 1:
            await self._write_split(offset, parts[0])
        elif self.driver.max_transfer and length > self.driver.max_transfer:
            await self._write_split(offset, b"".join(parts))
        else:
            await self.driver.write_parts(offset, parts)

    async def _read_block(self, offset: int, align: int,
                          known: tuple[int, bytes] | None = None) -> bytes:
        """The aligned block at `offset`, zero-padded past the end (`known`:
        a block whose contents are known without reading)."""
        if known is not None and known[0] == offset:
            return known[1]
        length = min(align, self._aligned_size() - offset)
        if length <= 0:
            return bytes(align)
        return (await self._read_split(offset, length)).ljust(align, b"\0")

    async def _write_split(self, offset: int, data: bytes) -> None:
        limit = self.driver.max_transfer
        if not limit or len(data) <= limit:
            await self.driver.write(offset, data)
            return
        view = memoryview(data)
        for start in range(0, len(data), limit):
            await self.driver.write(offset + start, bytes(view[start:start + limit]))

    async def write_zeroes(self, offset: int, length: int, *, may_unmap: bool = False) -> None:
        self._check_writable()
        self._check_range(offset, length)
        align = self.driver.request_alignment
        head = -offset % align if align > 1 else 0
        if head or (align > 1 and length % align):
            # Partial blocks become ordinary writes of zeros.
            first = min(length, head or length)
            await self.write(offset, bytes(first))
            offset, length = offset + first, length - first
            tail = length % align
            if tail:
                await self.write(offset + length - tail, bytes(tail))
                length -= tail
        if length:
            with self._driver_errors:
                await self.driver.write_zeroes(offset, length, may_unmap=may_unmap)

    async def discard(self, offset: int, length: int) -> None:
        self._check_writable()
        self._check_range(offset, length)
        align = self.driver.request_alignment
        start = -(-offset // align) * align
        end = (offset + length) // align * align
        if end > start:
            with self._driver_errors:
                await self.driver.discard(start, end - start)

    async def write_growing(self, offset: int, data: bytes) -> None:
        """Write `data` at `offset`, the node growing to its end if it is
        shorter: in one step where the driver can (a file whose end must
        always hold valid metadata, VMDK's stream footer, is never seen
        grown but not yet written), else a truncate first."""
        self._check_writable()
        end = offset + len(data)
        if end <= self.driver.size:
            await self.write(offset, data)
        elif self.driver.can_write_past_end and self.driver.request_alignment == 1:
            with self._driver_errors:
                await self.driver.write_past_end(offset, data)
        else:
            await self.truncate(end)
            await self.write(offset, data)

    async def write_compressed(self, offset: int, data: bytes) -> None:
        """Whole clusters, stored compressed (convert -c)."""
        self._check_writable()
        self._check_range(offset, len(data))
        if not self.driver.can_write_compressed:
            raise Unsupported(f"{self.driver.name} images cannot hold compressed data")
        if data:
            with self._driver_errors:
                await self.driver.write_compressed(offset, data)

    async def flush(self) -> None:
        """Make everything written so far durable, this layer then its children."""
        if self.read_only:
            return
        with self._driver_errors:
            await self.driver.flush()
        for name, child in self.children.items():
            if name != "backing":
                await child.flush()

    async def truncate(self, size: int, preallocation: str = "off") -> None:
        self._check_writable()
        if not self.driver.can_resize:
            raise Unsupported(f"{self.driver.name} images on {self.filename} cannot be resized")
        if size < 0:
            raise OutOfRange("negative size")
        with self._driver_errors:
            await self.driver.truncate(size, preallocation)

    async def make_empty(self) -> None:
        """Make this layer hold nothing (it then reads as its backing file)."""
        self._check_writable()
        with self._driver_errors:
            await self.driver.make_empty()

    async def set_backing(self, filename: str | None, fmt: str | None) -> None:
        """Record a new backing file name and format in this image."""
        self._check_writable()
        with self._driver_errors:
            await self.driver.set_backing(filename, fmt)

    async def amend(self, options: dict[str, Any]) -> None:
        """Change format options of the image (`imgfs amend`)."""
        self._check_writable()
        with self._driver_errors:
            await self.driver.amend(options)

    # -- allocation -----------------------------------------------------------

    async def block_status(self, offset: int, length: int) -> Extent:
        """This layer's status of the range at `offset` (length clamped)."""
        self._check_range(offset, length)
        with self._driver_errors:
            extent = await self.driver.block_status(offset, length)
        if extent.length <= 0:
            raise CorruptImage(f"{self.filename}: empty extent at offset {offset}")
        if extent.length > length:
            extent = Extent(length, extent.status, extent.host_offset, extent.child,
                            extent.token)
        return extent

    async def block_status_above(self, offset: int, length: int) -> tuple[int, Status, int]:
        """Status resolved through the backing chain.

        Returns (length, status, depth), as qemu-img map counts depth: the
        layer that holds the range; for a range no layer holds, the bottom
        layer (status NONE); past the end of a short backing file, the layer
        above it (status ZERO without ALLOCATED: it reads as zeros).
        """
        length, status, depth, _ = await self._status_above(offset, length)
        return length, status, depth

    async def map_above(self, offset: int, length: int) -> ChainStatus:
        """block_status_above, and where the bytes of the layer that holds
        the range lie untransformed, as qemu-img map's "offset" says."""
        length, status, depth, held = await self._status_above(offset, length)
        if held is None:
            return ChainStatus(length, status, depth)
        node, extent = held
        if extent.host_offset is None:
            return ChainStatus(length, status, depth)
        host, position = node.children[extent.child], extent.host_offset
        while True:
            inner = await host.block_status(position, length)
            length = min(length, inner.length)
            if inner.host_offset is None:
                return ChainStatus(length, status, depth, position)
            host, position = host.children[inner.child], inner.host_offset

    async def _status_above(self, offset: int, length: int
                            ) -> tuple[int, Status, int, tuple[Node, Extent] | None]:
        """(length, status, depth, the holding layer and its extent or None)."""
        node = self
        depth = 0
        while True:
            extent = await node.block_status(offset, length)
            length = extent.length
            if extent.status & Status.ALLOCATED:
                return length, extent.status, depth, (node, extent)
            backing = node.backing
            if backing is None:
                return length, Status.NONE, depth, None
            if offset >= backing.size:
                return length, Status.ZERO, depth, None
            length = min(length, backing.size - offset)
            node, depth = backing, depth + 1

    # -- life cycle -----------------------------------------------------------

    async def activate(self) -> None:
        """Take locks once the graph's read-only decisions are final."""
        for child in self.children.values():
            await child.activate()
        with self._driver_errors:
            await self.driver.activate()

    # -- checks and internal snapshots --------------------------------------------

    async def check(self, repair: str | None = None) -> CheckResult:
        """imgfs check: the driver's findings (Unsupported when it has no check)."""
        if not self.driver.can_check:
            raise Unsupported(f"{self.driver.name} images cannot be checked")
        if repair is not None:
            self._check_writable()
        with self._driver_errors:
            return await self.driver.check(repair)

    def snapshot_holder(self) -> tuple[Node, str] | None:
        """The node of this image's own data that stores internal snapshots
        (the format's, or a protocol's below it: RBD), and the dotted option
        prefix that reaches it from here (``""``, ``"file."``)."""
        node: Node | None = self
        prefix = ""
        while node is not None:
            if node.driver.has_internal_snapshots:
                return node, prefix
            node, prefix = node.file, prefix + "file."
        return None

    def internal_snapshots(self) -> Sequence[InternalSnapshot]:
        if not self.driver.has_internal_snapshots:
            raise Unsupported(f"{self.driver.name} images have no internal snapshots")
        return self.driver.internal_snapshots()

    async def create_snapshot(self, name: str) -> None:
        self._check_snapshots_writable()
        with self._driver_errors:
            await self.driver.create_snapshot(name)

    async def apply_snapshot(self, name: str) -> None:
        self._check_snapshots_writable()
        with self._driver_errors:
            await self.driver.apply_snapshot(name)

    async def delete_snapshot(self, name: str) -> None:
        self._check_snapshots_writable()
        with self._driver_errors:
            await self.driver.delete_snapshot(name)

    def _check_snapshots_writable(self) -> None:
        self.internal_snapshots()
        self._check_writable()

    async def aclose(self) -> None:
        """Flush what the driver caches and close the whole subtree."""
        if self._closed:
            return
        self._closed = True
        with trio.CancelScope(shield=True):
            try:
                await self.driver.aclose()
            finally:
                for child in self.children.values():
                    await child.aclose()


def describe_status(status: Status) -> dict[str, bool]:
    return {"data": bool(status & Status.DATA), "zero": bool(status & Status.ZERO)}

