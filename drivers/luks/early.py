"""Start unlocking a mount's LUKS images before the rest of imgfs has loaded.

Opening an encrypted image is mostly its PBKDF (QEMU's default iter-time is
2 s; cryptsetup's 1-2 s): everything else a mount does before it (loading
trio, pyfuse3, the block graph and the drivers) would simply add to it.
So the mount process, before anything else, reads the header of each local
LUKS image (standalone, or the one a qcow2 image embeds) and the first
key slot its open will try, resolves the passphrase the open will use, and
starts opening that slot in a thread (`luks1.open_slot`, `luks2.open_slot`:
the PBKDF2 or Argon2, the AF merge and the digest check).  The KDF releases
the GIL: imgfs goes on loading meanwhile, and when the driver gets to the
same slot with the same bytes it takes the result instead of starting again
(`EARLY`; `try_slots`, the unlock loop of both LUKS versions, takes it).

This is a head start, never a second opinion: anything unusual (a URL, a
json: source, no secret given, a header that does not parse, any error at
all) just skips it, and the open proceeds and reports as it always does.
Only light modules are imported here (no cryptography, trio or numpy).
"""
from __future__ import annotations

import os
import stat
import threading
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import Future
from typing import Any, NamedTuple, TypeVar

from imgfs.errors import CorruptImage, PermissionDenied

from . import LUKS_MAGIC

#: qcow2.header.MAGIC, spelled out: importing that module here would delay
#: the start of a LUKS image's PBKDF
QCOW2_MAGIC = b"QFI\xfb"
#: the largest header area read here (qcow2's first cluster is at most 2 MiB)
MAX_HEAD = 2 * 1024 * 1024


def start_unlocking(sources: list[str], opts: Any) -> None:
    """Begin the first key slot's PBKDF2 of each local LUKS1 source."""
    for source in sources:
        try:
            _start(source, opts)
        except Exception:          # noqa: BLE001  (the open reports any problem itself)
            continue


def _start(source: str, opts: Any) -> None:
    from imgfs.registry import protocol_for
    from imgfs.secrets import given_passphrase
    if source.startswith("json:") or protocol_for(source) is not None:
        return
    if opts.fmt not in (None, "luks", "qcow2"):
        return
    # O_NONBLOCK: a FIFO given as the source must not hold the mount up
    # waiting for a writer; only files and block devices go on (the open
    # refuses anything else itself)
    fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode) and not stat.S_ISBLK(mode):
            return
        file_size = os.lseek(fd, 0, os.SEEK_END)    # (block devices too)
        head = os.pread(fd, 4096, 0)
        if head[:6] == LUKS_MAGIC and opts.fmt in (None, "luks"):
            secret_id = None               # (-o key-secret is the mount's, in opts)
            offset, area = 0, file_size
        elif head[:4] == QCOW2_MAGIC and opts.fmt in (None, "qcow2"):
            secret_id = opts.driver_options.get("encrypt.key-secret")
            located = _qcow2_luks_header(fd, head, file_size)
            if located is None:
                return
            offset, area = located
        else:
            return
        _open_first_slot(fd, offset, area, given_passphrase(opts, secret_id))
    finally:
        os.close(fd)


def _qcow2_luks_header(fd: int, head: bytes, file_size: int) -> tuple[int, int] | None:
    """(offset, length) of the LUKS header a qcow2 image embeds, if any."""
    from ..qcow2.header import Header, parse_image_header
    cluster_size = Header.unpack(head).cluster_size
    if len(head) < min(cluster_size, file_size) <= MAX_HEAD:
        head = os.pread(fd, min(cluster_size, file_size), 0)
    return parse_image_header(head, file_size).crypto_header


def _open_first_slot(fd: int, offset: int, area_size: int, passphrase: bytes | None) -> None:
    """Start opening the key slot the open of the LUKS header at `offset`
    will try first.  (numpy, which the Python sector cipher needs for
    ciphers other than AES, is not prefetched here: its import holds the
    GIL and would only slow the loading of trio and the drivers; unlock()
    starts it, while the KDF still runs.)"""
    from . import luks1, probe_version
    if passphrase is None:
        return
    header: Any
    head = os.pread(fd, luks1.HEADER_SIZE, offset)
    version = probe_version(head)
    if version == 1:
        header = luks1.parse_header(head, area_size)
        open_slot: Callable[..., bytes | None] = luks1.open_slot
    elif version == 2:
        from . import luks2

        async def read(position: int, length: int) -> bytes:
            return os.pread(fd, length, offset + position)
        header = _run_unsuspended(luks2.parse_header(read, area_size, quiet=True))
        open_slot = luks2.open_slot
    else:
        return
    slots: list[SlotToTry] = header.slots_to_try()
    if slots:
        first = slots[0]
        material = os.pread(fd, first.size, offset + first.start)
        if len(material) == first.size:
            EARLY.start(open_slot, header, first.slot, material, passphrase)


T = TypeVar("T")


def _run_unsuspended(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never suspends (its only awaits are reads that
    return at once) without an event loop: trio is not loaded yet."""
    try:
        coroutine.send(None)
    except StopIteration as finished:
        result: T = finished.value
        return result
    coroutine.close()
    raise RuntimeError("a header read suspended")


class AheadOfNeed:
    """Calls started in a thread before they are needed: the same call made
    later (the same function with equal arguments) takes the result, once,
    instead of computing it again.  Results stay in memory only, until taken
    or forgotten."""

    def __init__(self, thread_name: str) -> None:
        self.thread_name = thread_name
        #: (function, *args) -> the result to come
        self.started: dict[tuple[Any, ...], Future[Any]] = {}
        self.lock = threading.Lock()

    def start(self, function: Callable[..., Any], *args: Any) -> None:
        result: Future[Any] = Future()

        def run() -> None:
            try:
                result.set_result(function(*args))
            except BaseException as exc:      # the caller that takes it raises it
                result.set_exception(exc)
        with self.lock:
            self.started[(function, *args)] = result
        threading.Thread(target=run, name=self.thread_name, daemon=True).start()

    def call(self, function: Callable[..., T], *args: Any) -> T:
        """function(*args): the result of the same call started ahead, if
        one was (waiting for it to finish), else computed now."""
        with self.lock:
            started = self.started.pop((function, *args), None)
        if started is None:
            return function(*args)
        result: T = started.result()
        return result

    def forget(self, unwanted: Callable[[tuple[Any, ...]], bool]) -> None:
        """Drop the calls nothing took whose arguments are `unwanted`."""
        with self.lock:
            for key in [key for key in self.started if unwanted(key[1:])]:
                del self.started[key]


#: the key slots a mount began opening before their driver asked
EARLY = AheadOfNeed("imgfs-early-unlock")


class SlotToTry(NamedTuple):
    """A key slot an open tries, and where its AF-split key lies."""

    name: str               # in messages: "key slot 1" (LUKS1), "keyslot 1" (LUKS2)
    slot: Any
    start: int              # bytes from the start of the LUKS header
    size: int


async def try_slots(open_slot: Callable[[Any, Any, bytes, bytes], bytes | None], header: Any,
                    slots: list[SlotToTry], read: Callable[[int, int], Awaitable[bytes]],
                    passphrase: bytes) -> bytes:
    """A LUKS1 or LUKS2 unlock: each slot's key material read and tried in
    turn (open_slot in a worker thread, or the head start a mount made on
    it); the volume key, or PermissionDenied."""
    import trio  # (here: this module is imported before trio is loaded)

    from .spec import prefetch_sector_cipher
    prefetch_sector_cipher(header.spec)
    try:
        for attempt in slots:
            material = await read(attempt.start, attempt.size)
            if len(material) != attempt.size:
                raise CorruptImage(f"{attempt.name}: key material is truncated")
            key = await trio.to_thread.run_sync(EARLY.call, open_slot, header, attempt.slot,
                                                material, passphrase)
            if key is not None:
                return key
    finally:
        EARLY.forget(lambda args: args[0] == header)
    raise PermissionDenied("no key slot matches this passphrase")
