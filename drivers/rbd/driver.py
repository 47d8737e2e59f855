"""The ``rbd`` protocol driver: an image in a Ceph RBD pool.

Reads, writes, flushes, discards and zero writes are librbd's aio calls,
many in flight at once; the blocking calls (connect, open, resize, close)
run on a worker thread with a time limit, so a cluster that stops answering
gives EIO, never a hang.  A snapshot (``@SNAP``) opens read-only.
"""
from __future__ import annotations

import base64
import errno
import os
from dataclasses import dataclass
from typing import Any, TypeVar

from imgfs.block import Kind
from imgfs.errors import (
    ImgfsError,
    NotFound,
    PermissionDenied,
    Unreachable,
    UsageError,
    from_oserror,
)
from imgfs.foreign_io import LibraryDriver, blocking_call
from imgfs.node import OpenContext
from imgfs.options import Int, Opt, Schema, Str, in_range

from . import librbd
from .spec import describe, parse_ceph_settings, parse_monitors, parse_rbd_filename

T = TypeVar("T")

#: seconds a request may take before it fails with EIO
DEFAULT_TIMEOUT = 30
#: seconds to reach the monitors before the source is refused
CONNECT_TIMEOUT = 8
#: largest request handed to librbd at once
MAX_TRANSFER = 4 << 20


@dataclass(frozen=True)
class RbdSnapshot:
    """An RBD snapshot, named (as the `snapshot` option opens it) by its name."""

    name: str
    size: int

    @property
    def id(self) -> str:
        return self.name

    def info(self) -> dict[str, Any]:
        return {"id": self.name, "name": self.name, "vm-state-size": 0,
                "date-sec": 0, "date-nsec": 0, "vm-clock-sec": 0, "vm-clock-nsec": 0}


class RbdDriver(LibraryDriver):
    name = "rbd"
    kind = Kind.PROTOCOL
    read_only_message = "the RBD image is open read-only"
    path_opts = frozenset({"conf"})
    description = "images in Ceph RBD pools (rbd:POOL/IMAGE[@SNAP]), through librbd"
    can_resize = True
    #: librbd signals completions on an eventfd trio watches, no Python on its threads
    busy_poll = True
    has_internal_snapshots = True
    open_opts = Schema(
        Opt("pool", Str, help="the pool"),
        Opt("namespace", Str, help="the namespace in the pool"),
        Opt("image", Str, help="the image"),
        Opt("snapshot", Str, help="open this snapshot, read-only"),
        Opt("conf", Str, help="a Ceph configuration file (default: Ceph's search path)"),
        Opt("user", Str, help="the client's user (client.USER)"),
        Opt("server", parse_monitors, help="monitors: a list of host and port"),
        Opt("key-secret", Str, help="the secret (--object secret) holding the user's key"),
        Opt("ceph", parse_ceph_settings, help="further Ceph options (from the filename)"),
        Opt("timeout", Int, default=DEFAULT_TIMEOUT, check=in_range(1, 3600),
            help="seconds after which a request that got no answer fails"),
        Opt("filename", Str, help="an rbd: filename"),
    )
    create_opts = Schema()

    cluster: librbd.Cluster | None = None
    image: librbd.Image | None = None
    timeout = DEFAULT_TIMEOUT
    snapshots: list[RbdSnapshot] = []

    @classmethod
    def parse_filename(cls, filename: str) -> dict[str, Any]:
        return parse_rbd_filename(filename)

    @classmethod
    def source_path(cls, filename: str) -> str:
        options = parse_rbd_filename(filename)
        snapshot = options.get("snapshot")
        return f"{options['image']}@{snapshot}" if snapshot else str(options["image"])

    # -- life cycle -------------------------------------------------------------------

    async def open(self, options: dict[str, Any], ctx: OpenContext) -> None:
        self.timeout = options["timeout"]
        self.cluster = await self._connect(options, ctx)
        snapshot = options.get("snapshot")
        read_only = bool(ctx.read_only) or snapshot is not None
        try:
            self.image = await blocking_call(self.timeout, self.cluster.open,
                                             options["image"], snapshot, read_only)
        except OSError as exc:
            raise _refused(options, exc, "image") from None
        self.image.timeout = self.timeout
        self.size = await blocking_call(self.timeout, self.image.size)
        self.snapshots = [RbdSnapshot(name, size) for name, size in
                          await blocking_call(self.timeout, self.image.snapshots)]
        self.writable = not read_only
        if snapshot is not None:
            self.read_only_reason = "an RBD snapshot is read-only; use -o ro"
            self.read_only_by_default = True
        self.max_transfer = MAX_TRANSFER

    async def _connect(self, options: dict[str, Any], ctx: OpenContext) -> librbd.Cluster:
        if not options.get("pool") or not options.get("image"):
            raise UsageError("rbd: needs 'pool' and 'image' (or an rbd: filename)")
        settings = dict(options.get("ceph") or {})
        # refuse an unreachable cluster in seconds (librados waits 300 by default)
        settings.setdefault("client_mount_timeout", str(min(self.timeout, CONNECT_TIMEOUT)))
        if options.get("server"):
            settings["mon_host"] = ",".join(m.address() for m in options["server"])
        secret = options.get("key-secret")
        if secret:
            if secret not in ctx.secrets:
                raise UsageError(f"rbd: no secret with id '{secret}' (--object secret)")
            # as QEMU: the secret holds the key's bytes (give the key as Ceph
            # prints it with format=base64), passed to Ceph in base64
            settings["key"] = base64.b64encode(ctx.secrets[secret]).decode()
        if settings.get("auth_supported") and "auth_client_required" not in settings:
            settings["auth_client_required"] = settings.pop("auth_supported")
        try:
            return await blocking_call(
                self.timeout, lambda: librbd.Cluster.connect(
                    user=options.get("user"), conf=options.get("conf"), settings=settings,
                    pool=options["pool"], namespace=options.get("namespace")))
        except OSError as exc:
            raise _refused(options, exc, "cluster") from None

    async def aclose(self) -> None:
        image, cluster, self.image, self.cluster = self.image, self.cluster, None, None
        try:
            if image is not None:
                await blocking_call(self.timeout, image.close)
                # not before: librbd may signal until closed
                image.close_events()
        finally:
            if cluster is not None:
                await blocking_call(self.timeout, cluster.close)

    def handle(self) -> librbd.Image:
        if self.image is None:
            raise Unreachable("not connected to the cluster")
        return self.image

    async def truncate(self, size: int, preallocation: str = "off") -> None:
        if preallocation != "off":
            raise UsageError(f"rbd: preallocation={preallocation} is not supported")
        await blocking_call(self.timeout, self.handle().resize, size)
        self.size = size

    def info(self) -> dict[str, Any]:
        return {}

    def internal_snapshots(self) -> list[RbdSnapshot]:
        """The image's RBD snapshots (-o snapshots shows each read-only)."""
        return self.snapshots

    # -- creation -----------------------------------------------------------------

    @classmethod
    async def create(cls, target: Any, size: int, options: dict[str, Any],
                     ctx: OpenContext) -> None:
        given = parse_rbd_filename(str(target)) if isinstance(target, str) else target
        parsed = cls.open_opts.parse(given, what="rbd")
        if parsed.get("snapshot"):
            raise UsageError("rbd: cannot create a snapshot with imgfs create")
        driver = cls()
        driver.timeout = parsed["timeout"]
        driver.cluster = await driver._connect(parsed, ctx)
        try:
            await blocking_call(driver.timeout, driver.cluster.create, parsed["image"], size)
        except OSError as exc:
            if exc.errno == errno.EEXIST:
                # as QEMU: an existing image is truncated to the new size
                image = await blocking_call(driver.timeout, driver.cluster.open,
                                            parsed["image"], None, False)
                driver.image = image
                await blocking_call(driver.timeout, image.resize, size)
            else:
                raise _refused(parsed, exc, "image") from None
        finally:
            await driver.aclose()


def _refused(options: dict[str, Any], exc: OSError, what: str) -> ImgfsError:
    """Why the cluster (connecting) or the image (opening) was refused; the
    core puts the source's name before the message."""
    source = describe(options["pool"], options.get("namespace"), options["image"],
                      options.get("snapshot"))
    if exc.errno == errno.ENOENT:
        if what == "cluster":
            return NotFound(f"no pool '{options['pool']}' (or no Ceph configuration)")
        return NotFound(f"no image {source}")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return PermissionDenied(f"the {what} refused access ({os.strerror(exc.errno)})")
    if what == "cluster":
        return Unreachable(f"cannot reach the cluster: {os.strerror(exc.errno or errno.EIO)}")
    return from_oserror(exc, source)


DRIVERS = [RbdDriver]
