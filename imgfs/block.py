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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from .errors import ReadOnly, Unsupported
from .options import Schema

if TYPE_CHECKING:
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
    otherwise a DATA extent is produced by the driver's `read_data`.
    """

    length: int
    status: Status
    host_offset: int | None = None
    child: str = "file"


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


class BlockDriver(abc.ABC):
    """Base class of every driver; instances are wrapped by `Node`."""

    name: ClassVar[str]
    kind: ClassVar[Kind]
    #: filename prefixes this protocol driver owns ("nbd:", "fat:", "http://")
    prefixes: ClassVar[tuple[str, ...]] = ()
    #: True when the format or protocol can only be read
    read_only_format: ClassVar[bool] = False
    supports_backing: ClassVar[bool] = False
    open_opts: ClassVar[Schema] = Schema()
    #: None: this driver cannot create images
    create_opts: ClassVar[Schema | None] = None
    #: one line for `imgfs formats`
    description: ClassVar[str] = ""

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
    #: True when the driver can shrink or grow (`truncate`)
    can_resize: bool = False
    #: False when this source cannot be written (a read-only NBD export, a
    #: file without write permission): opened read-only unless rw was asked
    writable: bool = True
    #: True when read-only is this source's normal mode (fat: without rw:),
    #: so opening it read-only deserves no warning
    read_only_by_default: bool = False
    #: why a source that is not `writable` cannot be opened read-write
    read_only_reason: str = "read-only source or permission denied; use -o ro"

    # -- probing and filename parsing (pure) ------------------------------------

    @staticmethod
    def probe(head: bytes, filename: str) -> int:
        """Score 0..100 how surely `head` (first bytes of the file) is ours."""
        return 0

    @classmethod
    def parse_filename(cls, filename: str) -> dict[str, Any]:
        """Protocol drivers: turn "nbd://h/e" into this driver's options."""
        return {"filename": filename}

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
