"""The driver interface: what a format or protocol driver implements.

A driver answers only for its own layer.  The core (`imgfs.node.Node`) wraps
every driver instance: it checks bounds and read-only state, widens requests
to the driver's alignment (read-modify-write for writes), and resolves
ranges a format reports as not allocated to its backing node or to zeros.

Protocol drivers are leaves (a file, an NBD export, a generated FAT disk);
format drivers talk only to their children: ``file``, and maybe ``backing``
and ``data-file``.  A driver never opens a path itself: it reports
`ChildRef`s and the core opens them.
"""
from __future__ import annotations

import abc
import enum
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from .errors import ReadOnly, Unsupported
from .options import Schema

if TYPE_CHECKING:
    from .check import CheckResult
    from .node import Node, OpenContext


class Kind(enum.Enum):
    FORMAT = "format"
    PROTOCOL = "protocol"


class Status(enum.Flag):
    """Where the bytes of an extent live (QEMU's BDRV_BLOCK_* in spirit).

    Not ALLOCATED means "not in *this* layer": the core reads the backing
    node, or zeros when there is none.  ZERO means the layer itself says the
    range reads as zeros.  DATA means bytes are stored in this layer.
    """

    NONE = 0
    ALLOCATED = 1
    DATA = 2
    ZERO = 4


DATA = Status.ALLOCATED | Status.DATA
ZERO = Status.ALLOCATED | Status.ZERO
UNALLOCATED = Status.NONE


@dataclass(frozen=True, slots=True)
class Extent:
    """One run of a node's address space with a single status.

    `length` > 0 and may stop short of what was asked.  When `host_offset`
    is set, the bytes are stored untransformed at that offset in the child
    named `child` (the core reads them there, coalesced into one call);
    otherwise a DATA extent is produced by the driver's `read_data`, which
    finds in `token` whatever the driver put there (so that it need not look
    the mapping up again).
    """

    length: int
    status: Status
    host_offset: int | None = None
    child: str = "file"
    token: object = None


@dataclass(frozen=True, slots=True)
class ChildRef:
    """A child a format names inside its metadata (backing file, data file).

    `filename` is as written in the image; the core resolves a relative name
    against the directory of the image's own file.  `fmt` None means probe.
    """

    filename: str
    fmt: str | None = None
    read_only: bool = True
    options: dict[str, Any] = field(default_factory=dict)
    #: a child the image identifies without naming it (a differencing
    #: VDI's parent, known by UUID): unless the user names the child, the
    #: core awaits this for its filename (it raises when there is none)
    locate: Callable[[], Awaitable[str]] | None = None


class InternalSnapshot(Protocol):
    """A snapshot stored inside an image (qcow2's internal snapshots)."""

    @property
    def id(self) -> str: ...
    @property
    def name(self) -> str: ...
    def info(self) -> dict[str, Any]:
        """qemu-img info's JSON entry for the snapshot."""
@dataclass(frozen=True, slots=True)
class MeasureSource:
    """What `imgfs measure FILE` knows of the image it measures a copy of."""

    size: int
    #: (offset, length) of the ranges that hold data, through the whole chain
    data: tuple[tuple[int, int], ...]
    #: (name, granularity) of its persistent bitmaps; None when its format
    #: cannot hold any
    bitmaps: tuple[tuple[str, int], ...] | None = None


@dataclass(frozen=True, slots=True)
class Measurement:
    """qemu-img measure's answer: bytes a new image needs now and at most."""

    required: int
    fully_allocated: int
    #: bytes the source's persistent bitmaps would take (None: not shown)
    bitmaps: int | None = None


class BlockDriver(abc.ABC):
    """Base class of every driver; instances are wrapped by `Node`.

    Everything the core and the commands may ask of a driver is declared
    here with a default (QEMU's struct BlockDriver, nbdkit's can_*): the
    optional capabilities are a flag saying whether the driver has them
    and a method that refuses by default.
    """

    name: ClassVar[str]
    kind: ClassVar[Kind]
    #: True when the format or protocol can only be read (a driver may also
    #: set it when it opens an image of a variant it only reads)
    read_only_format: bool = False
    #: what a read-write open refuses, when not "<format> images"
    read_only_what: str = ""
    supports_backing: ClassVar[bool] = False
    open_opts: ClassVar[Schema] = Schema()
    #: None: this driver cannot create images
    create_opts: ClassVar[Schema | None] = None
    #: options `imgfs amend` can change (None: this format cannot amend)
    amend_opts: ClassVar[Schema | None] = None
    #: one line for `imgfs formats`
    description: ClassVar[str] = ""
    #: protocol options a user may give at the top of a source (``-o NAME=``
    #: on the command line, as QEMU's ``-iscsi`` group): the core hands them
    #: down to this leaf under the format, unless the format knows the name
    leaf_opts: ClassVar[frozenset[str]] = frozenset()
    #: options whose value is a path on this host (dotted for a nested one:
    #: ``server.path``): a mount makes relative ones absolute, as
    #: `absolute_filename` does a filename, before its daemon moves to /
    path_opts: ClassVar[frozenset[str]] = frozenset()

    # Set by the core before `open` is awaited.
    node: Node
    children: dict[str, Node]
    # Set by the driver's `open`.
    size: int = 0
    #: requests reach the driver aligned to this many bytes (a power of two)
    request_alignment: int = 1
    #: largest request the driver wants in one call (0: no limit)
    max_transfer: int = 0
    #: True when the driver's I/O really waits (a network protocol), so that
    #: requests gain from being in flight at once; local files and generated
    #: disks answer with blocking calls on the trio thread instead
    async_io: ClassVar[bool] = False
    #: True when the driver's answers arrive on file descriptors trio
    #: watches, with no Python on the library's threads, so that keeping
    #: trio's loop awake around requests (imgfs.spin) shortens them
    busy_poll: ClassVar[bool] = False
    #: the disk's logical sector size, the unit of its partition table: 512
    #: unless a host device says otherwise (set by `open`)
    sector_size: int = 512
    #: True when the driver can shrink or grow (`truncate`)
    can_resize: bool = False
    #: True when `write_past_end` works: a write that grows the node, its
    #: bytes and its new size appearing together (a plain file's pwrite)
    can_write_past_end: bool = False
    #: False when this source cannot be written (a read-only NBD export, a
    #: file without write permission): opened read-only unless rw was asked
    writable: bool = True
    #: True when read-only is this source's normal mode (fat: without rw:),
    #: so opening it read-only deserves no warning
    read_only_by_default: bool = False
    #: why a source that is not `writable` cannot be opened read-write
    read_only_reason: str = "read-only source or permission denied; use -o ro"

    # -- optional capabilities ----------------------------------------------------
    #: a new image reads as zeros, so convert may skip zero runs (QEMU's
    #: bdrv_has_zero_init; an encrypted image reads as noise)
    has_zero_init: ClassVar[bool] = True
    #: `write_compressed` works (convert -c)
    can_write_compressed: ClassVar[bool] = False
    #: `check` works (imgfs check); otherwise check exits 63, as qemu-img
    can_check: ClassVar[bool] = False
    #: `check(repair=...)` works too; otherwise check -r exits 63, as qemu-img
    can_repair: ClassVar[bool] = True
    #: the format stores internal snapshots (imgfs snapshot, -o snapshots)
    has_internal_snapshots: ClassVar[bool] = False
    #: `imgfs info` shows dirty-flag, as qemu-img does for formats whose
    #: QEMU driver reports image information (not dmg, bochs, cloop)
    reports_dirty_flag: ClassVar[bool] = True

    # -- probing and filename parsing (pure) ------------------------------------

    @staticmethod
    def probe(head: bytes, filename: str) -> int:
        """Score 0..100 how surely `head` (first bytes of the file) is ours."""
        return 0

    @classmethod
    def public_name(cls, filename: str) -> str:
        """`filename` as messages, `imgfs info` and the mount table show it:
        without the secrets a URL may carry (a password)."""
        return filename

    @classmethod
    def parse_filename(cls, filename: str) -> dict[str, Any]:
        """Protocol drivers: turn "nbd://h/e" into this driver's options."""
        return {"filename": filename}

    @classmethod
    def source_path(cls, filename: str) -> str:
        """The path inside a ``proto:...`` filename that names the image,
        whose last component names the mount's raw file (a URL's path,
        without query or fragment, by default)."""
        path = filename.partition(":")[2].partition("?")[0]
        return path.partition("#")[0]

    @classmethod
    def absolute_filename(cls, filename: str) -> str:
        """The filename with any local path in it made absolute (a mount's
        daemon runs in /); a URL stays as it is."""
        return filename

    # -- life cycle ---------------------------------------------------------------

    @abc.abstractmethod
    async def open(self, options: dict[str, Any], ctx: OpenContext) -> None:
        """Validate the image and fill `size` (options parsed by `open_opts`)."""

    def child_location(self, name: str) -> str | dict[str, Any] | None:
        """Protocols: where a relative name written inside an image stored
        here (a backing file) lives, as a filename or a protocol tree; None
        when this protocol has no notion of directories (the name is then
        taken as it is).  The file driver's rule (the image's directory) is
        the core's own."""
        return None

    def child_refs(self) -> dict[str, ChildRef]:
        """Children the image names (``backing``, ``data-file``), after open."""
        return {}

    async def attach(self) -> None:
        """Called once the children from `child_refs` are in `children`."""

    async def activate(self) -> None:
        """Take locks once the graph's read-only decisions are final."""

    async def aclose(self) -> None:
        """Write back what is cached; the core closes children afterwards."""

    # -- I/O ----------------------------------------------------------------------

    async def block_status(self, offset: int, length: int) -> Extent:
        """Describe the range starting at `offset` (default: all data here)."""
        return Extent(length, DATA)

    async def read_data(self, offset: int, length: int, extent: Extent) -> bytes:
        """Produce the bytes of a DATA extent that has no `host_offset`."""
        raise Unsupported(f"{self.name}: read not implemented")

    async def read(self, offset: int, length: int) -> bytes:
        """Read a checked, aligned range.  Formats keep the core's default."""
        return await self.node.read_via_status(offset, length)

    async def write(self, offset: int, data: bytes) -> None:
        raise ReadOnly(f"{self.name} images cannot be written")

    async def write_parts(self, offset: int, parts: tuple[bytes, ...]) -> None:
        """Write `parts` one after the other from `offset`, as one request
        (the core's read-modify-write: head, data, tail).  The default
        joins them; a driver that sends from several buffers at once saves
        the copy."""
        await self.write(offset, b"".join(parts))

    async def write_zeroes(self, offset: int, length: int, *, may_unmap: bool = False) -> None:
        """Make the range read as zeros (default: write zero bytes)."""
        chunk = min(length, 1 << 20)
        zeros = bytes(chunk)
        end = offset + length
        while offset < end:
            step = min(chunk, end - offset)
            await self.write(offset, zeros[:step] if step < chunk else zeros)
            offset += step

    async def discard(self, offset: int, length: int) -> None:
        """Hint that the range is unused; contents become unspecified."""

    async def flush(self) -> None:
        """Write this layer's cached metadata to its children (the core then
        flushes the children themselves)."""

    async def truncate(self, size: int, preallocation: str = "off") -> None:
        raise Unsupported(f"{self.name} images cannot be resized")

    async def write_compressed(self, offset: int, data: bytes) -> None:
        """Write whole clusters compressed (when `can_write_compressed`)."""
        raise Unsupported(f"{self.name} images cannot hold compressed data")

    async def write_past_end(self, offset: int, data: bytes) -> None:
        """Write `data`, growing the node to its end (when
        `can_write_past_end`)."""
        raise Unsupported(f"{self.name} cannot grow by a write")

    # -- checks and internal snapshots -----------------------------------------------

    async def check(self, repair: str | None = None) -> CheckResult:
        """qemu-img check's findings, after repairing ``leaks`` or ``all``
        when asked (when `can_check`).  Reports; never prints."""
        raise Unsupported(f"{self.name} images cannot be checked")

    def internal_snapshots(self) -> Sequence[InternalSnapshot]:
        """The image's internal snapshots (when `has_internal_snapshots`)."""
        return ()

    async def create_snapshot(self, name: str) -> None:
        raise Unsupported(f"{self.name} images have no internal snapshots")

    async def apply_snapshot(self, name: str) -> None:
        raise Unsupported(f"{self.name} images have no internal snapshots")

    async def delete_snapshot(self, name: str) -> None:
        raise Unsupported(f"{self.name} images have no internal snapshots")
    # -- whole-image operations (imgfs commit / rebase / amend) ------------------------

    async def make_empty(self) -> None:
        """Drop everything this layer holds, so that the whole image reads
        through to its backing file (what `commit` leaves in the top image)."""
        raise Unsupported(f"{self.name} images cannot be emptied")

    async def set_backing(self, filename: str | None, fmt: str | None) -> None:
        """Rewrite the backing file name (None: no backing file) and its
        format (None: none recorded) in the image's metadata."""
        raise Unsupported(f"{self.name} images cannot change their backing file")

    async def holes_in_file_are_zeros(self) -> bool:
        """True when the holes of the child a DATA extent's bytes live in
        should be reported as zeros (QEMU recurses into the file for the
        status of a format that preallocates its metadata)."""
        return False

    async def persistent_bitmaps(self) -> list[tuple[str, int]] | None:
        """(name, granularity) of the bitmaps stored in the image; None when
        the format cannot store bitmaps."""
        return None

    @classmethod
    def measure(cls, size: int, options: dict[str, Any],
                source: MeasureSource | None) -> Measurement:
        """Bytes a new image of this format needs (create `options` parsed),
        for a disk of `size` bytes or for a copy of `source`."""
        raise Unsupported(f"Block driver '{cls.name}' does not support size measurement")

    async def amend(self, options: dict[str, Any]) -> None:
        """Change the options (parsed by `amend_opts`; only those given)."""
        raise Unsupported(f"Format driver '{self.name}' does not support option amendment")

    def allocated_bytes(self) -> int | None:
        """Bytes this node itself occupies on its host storage, if known."""
        return None

    def info(self) -> dict[str, Any]:
        """Format-specific fields for `imgfs info` (qemu-img's key names)."""
        return {}

    # -- creation -------------------------------------------------------------------

    @classmethod
    async def create(cls, target: Any, size: int, options: dict[str, Any],
                     ctx: OpenContext) -> None:
        """Create an image.  Protocols get a filename, formats an empty
        writable protocol `Node` to write their metadata into."""
        raise Unsupported(f"{cls.name} cannot create images")
