"""`nbd`: a client for the Network Block Device protocol.

Spec: NetworkBlockDevice/nbd ``doc/proto.md`` (the protocol) and
``doc/uri.md`` (the URI forms).  Sources:

* ``nbd://HOST[:PORT]/[EXPORT]`` and ``nbd+tcp://...`` (TCP, port 10809);
* ``nbd+unix:///[EXPORT]?socket=PATH`` (a unix socket);
* QEMU's older ``nbd:HOST:PORT[:exportname=E]`` and ``nbd:unix:PATH[:exportname=E]``;
* json: trees with QEMU's option names: ``server`` (``type`` inet/unix,
  ``host``, ``port``, ``path``) and ``export``, or the legacy flat
  ``host``, ``port``, ``path``.

Supported: the fixed newstyle handshake with NBD_OPT_GO (falling back to
NBD_OPT_EXPORT_NAME for servers without it, and for plain newstyle
servers); NBD_INFO_BLOCK_SIZE, honoured through `request_alignment` and
`max_transfer` (the core widens, splits and read-modify-writes); structured
replies; the ``base:allocation`` meta context for block status; READ,
WRITE (FUA under cache=writethrough/none), WRITE_ZEROES, TRIM, FLUSH, DISC;
any number of requests in flight on one connection, replies in any order.

Refused: oldstyle negotiation and TLS (``nbds://``, ``tls-creds``).  There is
no reconnect: once the connection is lost, every pending and later request
fails with EIO (the mount stays up).

Concurrency needs no background task (`imgfs.pipeline`, shared with the
ssh driver): the task that sends a request waits for its reply, and one
waiting task at a time reads replies for everyone.  Once the first byte of
a reply (or of a request) has crossed the socket, the rest of that message
is moved under a cancel shield, because half a message would desynchronise
the stream for everyone.
"""
from __future__ import annotations

import errno
import os
import socket
import struct
import urllib.parse
from dataclasses import dataclass
from typing import Any, cast

import trio

from imgfs.block import DATA, ZERO, BlockDriver, Extent, Kind, Status
from imgfs.errors import (
    ImgfsError,
    NoSpace,
    NotFound,
    PermissionDenied,
    ReadOnly,
    Unreachable,
    Unsupported,
    UsageError,
)
from imgfs.netio import printable, socket_reason
from imgfs.node import OpenContext
from imgfs.options import MiB, Opt, Schema, Str
from imgfs.pipeline import Lost, Pipeline, ProtocolError, Request
from imgfs.urls import parse_port, query_params

# -- spec constants (proto.md "Values") -----------------------------------------

NBDMAGIC = 0x4E42444D41474943              # "NBDMAGIC", the INIT_PASSWD
IHAVEOPT = 0x49484156454F5054              # "IHAVEOPT"
CLISERV_MAGIC = 0x00420281861253           # oldstyle negotiation
NBD_OPTION_REPLY_MAGIC = 0x3E889045565A9
NBD_REQUEST_MAGIC = 0x25609513
NBD_SIMPLE_REPLY_MAGIC = 0x67446698
NBD_STRUCTURED_REPLY_MAGIC = 0x668E33EF
NBD_DEFAULT_PORT = 10809                    # IANA, uri.md "NBD URI authority"

# Handshake flags (server) and client flags.
NBD_FLAG_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_NO_ZEROES = 1 << 1
NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_C_NO_ZEROES = 1 << 1

# Transmission flags.
NBD_FLAG_HAS_FLAGS = 1 << 0
NBD_FLAG_READ_ONLY = 1 << 1
NBD_FLAG_SEND_FLUSH = 1 << 2
NBD_FLAG_SEND_FUA = 1 << 3
NBD_FLAG_SEND_TRIM = 1 << 5
NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6

# Options.
NBD_OPT_EXPORT_NAME = 1
NBD_OPT_ABORT = 2
NBD_OPT_GO = 7
NBD_OPT_STRUCTURED_REPLY = 8
NBD_OPT_SET_META_CONTEXT = 10

# Option reply types; errors have bit 31 set.
NBD_REP_ACK = 1
NBD_REP_INFO = 3
NBD_REP_META_CONTEXT = 4
NBD_REP_FLAG_ERROR = 1 << 31
NBD_REP_ERR_UNSUP = NBD_REP_FLAG_ERROR + 1
NBD_REP_ERR_POLICY = NBD_REP_FLAG_ERROR + 2
NBD_REP_ERR_INVALID = NBD_REP_FLAG_ERROR + 3
NBD_REP_ERR_PLATFORM = NBD_REP_FLAG_ERROR + 4
NBD_REP_ERR_TLS_REQD = NBD_REP_FLAG_ERROR + 5
NBD_REP_ERR_UNKNOWN = NBD_REP_FLAG_ERROR + 6
NBD_REP_ERR_SHUTDOWN = NBD_REP_FLAG_ERROR + 7
NBD_REP_ERR_BLOCK_SIZE_REQD = NBD_REP_FLAG_ERROR + 8
NBD_REP_ERR_TOO_BIG = NBD_REP_FLAG_ERROR + 9

# NBD_REP_INFO information types.
NBD_INFO_EXPORT = 0
NBD_INFO_BLOCK_SIZE = 3

# Commands and command flags.
NBD_CMD_READ = 0
NBD_CMD_WRITE = 1
NBD_CMD_DISC = 2
NBD_CMD_FLUSH = 3
NBD_CMD_TRIM = 4
NBD_CMD_WRITE_ZEROES = 6
NBD_CMD_BLOCK_STATUS = 7
NBD_CMD_FLAG_FUA = 1 << 0
NBD_CMD_FLAG_NO_HOLE = 1 << 1

# Structured replies.
NBD_REPLY_FLAG_DONE = 1 << 0
NBD_REPLY_TYPE_NONE = 0
NBD_REPLY_TYPE_OFFSET_DATA = 1
NBD_REPLY_TYPE_OFFSET_HOLE = 2
NBD_REPLY_TYPE_BLOCK_STATUS = 5
NBD_REPLY_TYPE_ERROR_BIT = 1 << 15
NBD_REPLY_TYPE_ERROR = NBD_REPLY_TYPE_ERROR_BIT + 1
NBD_REPLY_TYPE_ERROR_OFFSET = NBD_REPLY_TYPE_ERROR_BIT + 2

# The base:allocation meta context.
BASE_ALLOCATION = b"base:allocation"
NBD_STATE_HOLE = 1 << 0
NBD_STATE_ZERO = 1 << 1

# Error values.
NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108

#: longest string the spec allows (export names, error messages)
NBD_MAX_STRING = 4096
#: no option reply we ask for carries more than a string and a few fields
MAX_OPTION_REPLY = NBD_MAX_STRING + 16
#: READ/WRITE size every server must accept ("Block size constraints")
NBD_MAX_PORTABLE_REQUEST = 32 * MiB
#: the largest minimum block size a server may advertise
NBD_MAX_MINIMUM_BLOCK = 64 * 1024
#: maximum block size meaning "no inherent limit"
NBD_NO_MAXIMUM = 0xFFFFFFFF
#: zeroes and trims are split into pieces of at most this (lengths are 32-bit)
MAX_ZERO_REQUEST = 1 << 30
#: connecting plus the handshake must not hang a mount forever
HANDSHAKE_TIMEOUT = 30.0
#: how long aclose waits to tell the server goodbye
DISCONNECT_TIMEOUT = 2.0

REPLY_ERROR_NAMES = {
    NBD_REP_ERR_UNSUP: "option not supported",
    NBD_REP_ERR_POLICY: "refused by server policy",
    NBD_REP_ERR_INVALID: "invalid request",
    NBD_REP_ERR_PLATFORM: "not supported on the server's platform",
    NBD_REP_ERR_TLS_REQD: "the server requires TLS, which imgfs does not support",
    NBD_REP_ERR_UNKNOWN: "no such export",
    NBD_REP_ERR_SHUTDOWN: "the server is shutting down",
    NBD_REP_ERR_BLOCK_SIZE_REQD: "block size negotiation required",
    NBD_REP_ERR_TOO_BIG: "request too big",
}

#: NBD error value -> local errno (unknown values mean EINVAL, per the spec)
NBD_ERRNO = {
    NBD_EPERM: errno.EPERM, NBD_EIO: errno.EIO, NBD_ENOMEM: errno.ENOMEM,
    NBD_EINVAL: errno.EINVAL, NBD_ENOSPC: errno.ENOSPC, NBD_EOVERFLOW: errno.EOVERFLOW,
    NBD_ENOTSUP: errno.ENOTSUP, NBD_ESHUTDOWN: errno.ESHUTDOWN,
}

COMMAND_NAMES = {
    NBD_CMD_READ: "read", NBD_CMD_WRITE: "write", NBD_CMD_FLUSH: "flush",
    NBD_CMD_TRIM: "trim", NBD_CMD_WRITE_ZEROES: "write zeroes",
    NBD_CMD_BLOCK_STATUS: "block status",
}

# -- wire structs (all big-endian) ------------------------------------------------

#: server greeting: NBDMAGIC, IHAVEOPT, handshake flags
HELLO = struct.Struct(">QQH")
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
#: client option: IHAVEOPT, option, data length
OPTION = struct.Struct(">QII")
#: option reply: magic, option, reply type, data length
OPTION_REPLY = struct.Struct(">QIII")
#: NBD_INFO_EXPORT: type, export size, transmission flags
INFO_EXPORT = struct.Struct(">HQH")
#: NBD_INFO_BLOCK_SIZE: type, minimum, preferred, maximum
INFO_BLOCK_SIZE = struct.Struct(">HIII")
#: reply to NBD_OPT_EXPORT_NAME: size, transmission flags (then 124 zeroes)
EXPORT_NAME_REPLY = struct.Struct(">QH")
EXPORT_NAME_PADDING = 124
#: request: magic, command flags, type, handle, offset, length
REQUEST = struct.Struct(">IHHQQI")
#: simple reply: magic, error, handle
SIMPLE_REPLY = struct.Struct(">IIQ")
#: structured reply chunk: magic, flags, type, handle, payload length
STRUCTURED_REPLY = struct.Struct(">IHHQI")
#: OFFSET_HOLE payload: offset, hole size
OFFSET_HOLE = struct.Struct(">QI")
#: error chunk payload head: error, message length
ERROR_CHUNK = struct.Struct(">IH")
#: one base:allocation block descriptor: extent length, status flags
DESCRIPTOR = struct.Struct(">II")


# -- addresses and URIs (pure) ---------------------------------------------------


@dataclass(frozen=True)
class Address:
    """Where the server listens: TCP (`host`, `port`) or a unix socket `path`."""

    transport: str              # "inet" or "unix"
    host: str = ""
    port: int = NBD_DEFAULT_PORT
    path: str = ""

    def uri(self, export: str) -> str:
        """The NBD URI naming `export` here (for messages)."""
        name = urllib.parse.quote(export, safe="/:@")
        if self.transport == "unix":
            return f"nbd+unix:///{name}?socket={self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"nbd://{host}:{self.port}/{name}"


def parse_server(value: Any) -> dict[str, str]:
    """QEMU's SocketAddress for `server`: {"type": "inet", "host", "port"} or
    {"type": "unix", "path"}; values are kept as strings, as QEMU keeps them."""
    if not isinstance(value, dict):
        raise UsageError("expected an object with 'type' and 'host'/'port' or 'path'")
    allowed = {"inet": {"type", "host", "port"}, "unix": {"type", "path"}}
    kind = value.get("type", "inet")
    if kind not in allowed:
        raise UsageError(f"server type '{kind}' not supported (use inet or unix)")
    unknown = set(value) - allowed[kind]
    if unknown:
        raise UsageError(f"unknown key '{sorted(unknown)[0]}' for a {kind} server")
    server = {key: str(item) for key, item in value.items()}
    server["type"] = kind
    if kind == "inet" and not server.get("host"):
        raise UsageError("an inet server needs a 'host'")
    if kind == "unix" and not server.get("path"):
        raise UsageError("a unix server needs a 'path'")
    if kind == "inet" and "port" in server:
        parse_port(server["port"], "nbd")
    return server


def parse_nbd_filename(filename: str) -> dict[str, Any]:
    """Options for an ``nbd://``, ``nbd+unix://`` or legacy ``nbd:`` filename."""
    scheme, sep, _ = filename.partition("://")
    scheme = scheme.lower()
    if sep and scheme in ("nbd", "nbd+tcp", "nbd+unix"):
        return _parse_uri(filename, unix=scheme == "nbd+unix")
    if scheme.startswith("nbds"):
        raise Unsupported(f"'{filename}': TLS (nbds) is not supported")
    if filename[:4].lower() == "nbd:":
        return _parse_legacy(filename[4:])
    raise UsageError(f"'{filename}' is not an nbd URI")


def _parse_uri(uri: str, *, unix: bool) -> dict[str, Any]:
    try:
        parts = urllib.parse.urlsplit(uri)
        port = parts.port
    except ValueError as exc:
        raise UsageError(f"invalid nbd URI '{uri}': {exc}") from None
    query = query_params(parts.query)
    names = [name for name, _ in query]
    for name in names:
        if name.startswith("tls"):
            raise Unsupported(f"'{uri}': TLS is not supported")
        if name != "socket" or not unix or names.count(name) > 1:
            raise UsageError(f"invalid nbd URI '{uri}': unexpected query parameter '{name}'")
    # uri.md: the path minus its leading '/' is the export name, percent-decoded.
    options: dict[str, Any] = {}
    export = urllib.parse.unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    if export:
        options["export"] = export
    if unix:
        if parts.netloc:
            raise UsageError(f"invalid nbd URI '{uri}': nbd+unix takes no host")
        if not query or not query[0][1]:
            raise UsageError(f"invalid nbd URI '{uri}': nbd+unix needs ?socket=PATH")
        options["server"] = {"type": "unix", "path": query[0][1]}
        return options
    if not parts.hostname:
        raise UsageError(f"invalid nbd URI '{uri}': no host")
    options["server"] = {"type": "inet", "host": parts.hostname,
                         "port": str(port if port is not None else NBD_DEFAULT_PORT)}
    return options


def _parse_legacy(spec: str) -> dict[str, Any]:
    """``HOST[:PORT][:exportname=E]`` or ``unix:PATH[:exportname=E]``."""
    body, sep, export = spec.partition(":exportname=")
    options: dict[str, Any] = {"export": export} if sep and export else {}
    if body.startswith("unix:"):
        if not body[5:]:
            raise UsageError("nbd:unix: needs a socket path")
        options["server"] = {"type": "unix", "path": body[5:]}
        return options
    if body.startswith("["):                   # [IPv6]:PORT
        host, bracket, rest = body[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise UsageError(f"invalid nbd address '{body}'")
        port = rest[1:]
    else:
        host, _, port = body.partition(":")
    if not host:
        raise UsageError(f"invalid nbd address '{body}': no host")
    options["server"] = {"type": "inet", "host": host,
                         "port": str(parse_port(port, "nbd") if port else NBD_DEFAULT_PORT)}
    return options


def resolve_target(options: dict[str, Any]) -> tuple[Address, str]:
    """The server address and export name from parsed open options."""
    given = {key: value for key, value in options.items() if value is not None}
    if given.get("filename"):
        for key, value in parse_nbd_filename(given.pop("filename")).items():
            given.setdefault(key, value)
    export = str(given.get("export") or "")
    encoded = export.encode()
    if len(encoded) > NBD_MAX_STRING or b"\0" in encoded:
        raise UsageError("nbd export names are at most 4096 bytes, without NUL")
    legacy = [key for key in ("host", "port", "path") if key in given]
    if "server" in given:
        if legacy:
            raise UsageError(f"nbd: give either 'server' or '{legacy[0]}', not both")
        server = parse_server(given["server"])
    elif "path" in given:
        if "host" in given or "port" in given:
            raise UsageError("nbd: 'path' and 'host'/'port' are mutually exclusive")
        server = {"type": "unix", "path": given["path"]}
    elif "host" in given:
        server = {"type": "inet", "host": given["host"],
                  "port": given.get("port", str(NBD_DEFAULT_PORT))}
    else:
        raise UsageError("nbd: no server given (use nbd://HOST/EXPORT or server.host=...)")
    if server["type"] == "unix":
        return Address("unix", path=server["path"]), export
    return Address("inet", host=server["host"],
                   port=parse_port(server.get("port", NBD_DEFAULT_PORT), "nbd")), export


def status_of(flags: int) -> Status:
    """base:allocation flags as a protocol leaf's Status: a hole that reads as
    zeros is ZERO, everything else DATA (allocated zeros are both)."""
    if flags & NBD_STATE_ZERO:
        return ZERO if flags & NBD_STATE_HOLE else DATA | Status.ZERO
    return DATA


def server_errno(code: int) -> int:
    return NBD_ERRNO.get(code, errno.EINVAL)


# -- the connection ---------------------------------------------------------------


@dataclass(frozen=True)
class BlockSizes:
    """NBD_INFO_BLOCK_SIZE, or the defaults when the server sends none."""

    minimum: int = 1
    preferred: int = 4096
    maximum: int = NBD_NO_MAXIMUM

    def check(self, size: int) -> None:
        """Raise ProtocolError unless the constraints are what the spec allows."""
        minimum, preferred, maximum = self.minimum, self.preferred, self.maximum
        if not 0 < minimum <= NBD_MAX_MINIMUM_BLOCK or minimum & (minimum - 1):
            raise ProtocolError(f"minimum block size {minimum} is not a power of "
                                 f"two up to {NBD_MAX_MINIMUM_BLOCK}")
        if preferred < max(minimum, 512) or preferred & (preferred - 1):
            raise ProtocolError(f"preferred block size {preferred} is not a power of "
                                 f"two of at least {max(minimum, 512)}")
        if maximum != NBD_NO_MAXIMUM and (maximum % minimum
                                          or maximum < min(preferred, size)):
            raise ProtocolError(f"maximum block size {maximum} is not a multiple of "
                                 f"{minimum} of at least {min(preferred, size)}")


class _Request(Request):
    """One request in flight: what was asked and, as replies arrive, its result."""

    __slots__ = ("command", "offset", "length", "buffer", "covered", "extent")

    def __init__(self, command: int, offset: int, length: int,
                 buffer: bytearray | None) -> None:
        super().__init__()
        self.command = command
        self.offset = offset
        self.length = length
        #: READ: receives the data (zero-filled, so holes need no writing)
        self.buffer = buffer
        #: READ: bytes covered by data and hole chunks so far
        self.covered = 0
        #: BLOCK_STATUS: (length, base:allocation flags) of the first run
        self.extent: tuple[int, int] | None = None


class NbdConnection(Pipeline):
    """One connection to an NBD server, in the transmission phase after `connect`."""

    def __init__(self, sock: trio.socket.SocketType, name: str) -> None:
        # handles are 64-bit (proto.md "Request message")
        super().__init__(name, id_limit=1 << 64)
        self.sock = sock
        self.size = 0
        self.flags = 0
        self.structured = False
        self.meta_context_id: int | None = None
        self.block_sizes = BlockSizes()
        self._shutting_down = False
        self._header = bytearray(STRUCTURED_REPLY.size)

    # -- opening ------------------------------------------------------------------

    @classmethod
    async def connect(cls, address: Address, export: str) -> NbdConnection:
        name = address.uri(export)
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                sock = await open_socket(address)
        except OSError as exc:
            raise Unreachable(f"cannot connect to {name}: {socket_reason(exc)}") from None
        except trio.TooSlowError:
            raise Unreachable(f"cannot connect to {name}: timed out") from None
        conn = cls(sock, name)
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                await conn._handshake(export)
        except Lost as exc:
            sock.close()
            raise Unreachable(f"cannot connect to {name}: the server hung up during the "
                              f"handshake ({exc})") from None
        except ProtocolError as exc:
            sock.close()
            raise Unreachable(f"cannot connect to {name}: not a usable NBD server "
                              f"({exc})") from None
        except trio.TooSlowError:
            sock.close()
            raise Unreachable(f"cannot connect to {name}: the handshake timed out") from None
        except BaseException:
            sock.close()
            raise
        return conn

    async def _handshake(self, export: str) -> None:
        magic, second, handshake_flags = HELLO.unpack(await self._recv(HELLO.size))
        if magic != NBDMAGIC:
            raise ProtocolError(f"greeting magic {magic:#x}, expected NBDMAGIC")
        if second == CLISERV_MAGIC:
            raise Unsupported("the server uses oldstyle negotiation, which imgfs "
                              "does not support")
        if second != IHAVEOPT:
            raise ProtocolError(f"greeting magic {second:#x}, expected IHAVEOPT")
        fixed = bool(handshake_flags & NBD_FLAG_FIXED_NEWSTYLE)
        no_zeroes = bool(handshake_flags & NBD_FLAG_NO_ZEROES)
        await self.transmit(U32.pack((NBD_FLAG_C_FIXED_NEWSTYLE if fixed else 0)
                                  | (NBD_FLAG_C_NO_ZEROES if no_zeroes else 0)))
        if fixed:
            self.structured = await self._negotiate_structured_replies()
            if self.structured:
                self.meta_context_id = await self._negotiate_meta_context(export)
            if await self._go(export):
                return
        # Plain newstyle, or a fixed newstyle server without NBD_OPT_GO.
        await self._export_name(export, no_zeroes)

    async def _send_option(self, option: int, data: bytes = b"") -> None:
        await self.transmit(OPTION.pack(IHAVEOPT, option, len(data)), data)

    async def _option_reply(self, option: int) -> tuple[int, bytes]:
        magic, echoed, reply_type, length = OPTION_REPLY.unpack(
            await self._recv(OPTION_REPLY.size))
        if magic != NBD_OPTION_REPLY_MAGIC:
            raise ProtocolError(f"option reply magic {magic:#x}")
        if echoed != option:
            raise ProtocolError(f"reply to option {echoed} while option {option} was asked")
        if length > MAX_OPTION_REPLY:
            raise ProtocolError(f"option reply of {length} bytes (at most "
                                 f"{MAX_OPTION_REPLY} expected)")
        return reply_type, bytes(await self._recv(length))

    async def _negotiate_structured_replies(self) -> bool:
        await self._send_option(NBD_OPT_STRUCTURED_REPLY)
        reply_type, _ = await self._option_reply(NBD_OPT_STRUCTURED_REPLY)
        if reply_type == NBD_REP_ACK:
            return True
        if reply_type & NBD_REP_FLAG_ERROR:
            return False                # an older server: simple replies only
        raise ProtocolError(f"reply type {reply_type} to NBD_OPT_STRUCTURED_REPLY")

    async def _negotiate_meta_context(self, export: str) -> int | None:
        name = export.encode()
        await self._send_option(NBD_OPT_SET_META_CONTEXT, b"".join((
            U32.pack(len(name)), name, U32.pack(1), U32.pack(len(BASE_ALLOCATION)),
            BASE_ALLOCATION)))
        context_id = None
        while True:
            reply_type, payload = await self._option_reply(NBD_OPT_SET_META_CONTEXT)
            if reply_type == NBD_REP_META_CONTEXT:
                if len(payload) < U32.size:
                    raise ProtocolError("NBD_REP_META_CONTEXT shorter than its id")
                if payload[U32.size:] == BASE_ALLOCATION:
                    context_id = U32.unpack_from(payload)[0]
            elif reply_type == NBD_REP_ACK:
                return context_id
            elif reply_type & NBD_REP_FLAG_ERROR:
                return None             # no block status; reads still work
            else:
                raise ProtocolError(f"reply type {reply_type} to NBD_OPT_SET_META_CONTEXT")

    async def _go(self, export: str) -> bool:
        """NBD_OPT_GO; False when the server does not know the option."""
        name = export.encode()
        await self._send_option(NBD_OPT_GO, b"".join((
            U32.pack(len(name)), name, U16.pack(1), U16.pack(NBD_INFO_BLOCK_SIZE))))
        export_info: tuple[int, int] | None = None
        sizes = BlockSizes()
        while True:
            reply_type, payload = await self._option_reply(NBD_OPT_GO)
            if reply_type == NBD_REP_INFO:
                export_info, sizes = self._parse_info(payload, export_info, sizes)
            elif reply_type == NBD_REP_ACK:
                if export_info is None:
                    raise ProtocolError("NBD_OPT_GO succeeded without NBD_INFO_EXPORT")
                self._set_export(*export_info, sizes)
                return True
            elif reply_type == NBD_REP_ERR_UNSUP:
                return False
            elif reply_type & NBD_REP_FLAG_ERROR:
                await self._abort()
                raise self._export_refused(export, reply_type, payload)
            else:
                raise ProtocolError(f"reply type {reply_type} to NBD_OPT_GO")

    @staticmethod
    def _parse_info(payload: bytes, export_info: tuple[int, int] | None,
                    sizes: BlockSizes) -> tuple[tuple[int, int] | None, BlockSizes]:
        if len(payload) < U16.size:
            raise ProtocolError("NBD_REP_INFO without an information type")
        info_type = U16.unpack_from(payload)[0]
        if info_type == NBD_INFO_EXPORT:
            if len(payload) != INFO_EXPORT.size:
                raise ProtocolError(f"NBD_INFO_EXPORT of {len(payload)} bytes, expected 12")
            _, size, flags = INFO_EXPORT.unpack(payload)
            return (size, flags), sizes
        if info_type == NBD_INFO_BLOCK_SIZE:
            if len(payload) != INFO_BLOCK_SIZE.size:
                raise ProtocolError(f"NBD_INFO_BLOCK_SIZE of {len(payload)} bytes, "
                                     "expected 14")
            _, minimum, preferred, maximum = INFO_BLOCK_SIZE.unpack(payload)
            return export_info, BlockSizes(minimum, preferred, maximum)
        return export_info, sizes           # information we did not ask for

    def _export_refused(self, export: str, reply_type: int, payload: bytes) -> ImgfsError:
        reason = REPLY_ERROR_NAMES.get(reply_type, f"error {reply_type & ~NBD_REP_FLAG_ERROR}")
        said = printable(payload)
        message = f"export '{export}' refused: {reason}" + (
            f" (server says: {said})" if said else "")
        if reply_type == NBD_REP_ERR_UNKNOWN:
            return NotFound(message)
        if reply_type == NBD_REP_ERR_POLICY:
            return PermissionDenied(message)
        if reply_type == NBD_REP_ERR_TLS_REQD:
            return Unsupported(message)
        return Unreachable(message)

    async def _export_name(self, export: str, no_zeroes: bool) -> None:
        await self._send_option(NBD_OPT_EXPORT_NAME, export.encode())
        try:
            reply = await self._recv(EXPORT_NAME_REPLY.size)
        except Lost:
            # The only way this option can fail is the server hanging up.
            raise NotFound(f"the server closed the connection (no export named "
                           f"'{export}'?)") from None
        if not no_zeroes:
            await self._recv(EXPORT_NAME_PADDING)
        size, flags = EXPORT_NAME_REPLY.unpack(reply)
        self._set_export(size, flags, BlockSizes())

    def _set_export(self, size: int, flags: int, sizes: BlockSizes) -> None:
        if size >= 1 << 63:
            raise ProtocolError(f"export size {size} is too large")
        sizes.check(size)
        # NBD_FLAG_HAS_FLAGS MUST be set; without it no other flag means anything.
        self.flags = flags if flags & NBD_FLAG_HAS_FLAGS else 0
        self.block_sizes = sizes
        # A trailing partial block cannot be addressed with aligned requests.
        self.size = size - size % sizes.minimum

    async def _abort(self) -> None:
        """Soft disconnect during the handshake; the socket closes anyway."""
        try:
            await self._send_option(NBD_OPT_ABORT)
        except Lost:
            pass

    # -- socket I/O -----------------------------------------------------------------

    async def transmit(self, *buffers: bytes | bytearray | memoryview) -> None:
        views = [memoryview(buffer).cast("B") for buffer in buffers if len(buffer)]
        try:
            while views:
                sent = await self.sock.sendmsg(views)
                while views and sent >= len(views[0]):
                    sent -= len(views[0])
                    views.pop(0)
                if sent:
                    views[0] = views[0][sent:]
        except (OSError, trio.ClosedResourceError) as exc:
            raise Lost(socket_reason(exc)) from None

    async def _recv_some(self, view: memoryview) -> int:
        try:
            count = await self.sock.recv_into(view)
        except (OSError, trio.ClosedResourceError) as exc:
            raise Lost(socket_reason(exc)) from None
        if count == 0:
            raise Lost("the server closed the connection")
        return count

    async def _recv_into(self, view: memoryview) -> None:
        while len(view):
            view = view[await self._recv_some(view):]

    async def _recv(self, size: int) -> bytearray:
        buffer = bytearray(size)
        await self._recv_into(memoryview(buffer))
        return buffer

    async def _skip(self, size: int) -> None:
        scratch = memoryview(bytearray(min(size, 64 * 1024)))
        while size:
            step = min(size, len(scratch))
            await self._recv_into(scratch[:step])
            size -= step

    # -- requests -------------------------------------------------------------------

    async def request(self, command: int, offset: int = 0, length: int = 0, *,
                      flags: int = 0, payload: bytes | None = None,
                      buffer: bytearray | None = None) -> _Request:
        """Send one request and wait for its whole reply; raise its error."""
        self.check_usable()
        request = _Request(command, offset, length, buffer)
        handle = self.new_id()
        header = REQUEST.pack(NBD_REQUEST_MAGIC, flags, command, handle, offset, length)
        await self.send(handle, request, header, payload or b"")
        error: ImgfsError | None = None
        try:
            await self.wait(request)
        except ImgfsError as exc:
            error = exc
        if self._shutting_down and not self.in_flight:
            await self.close()
        if error is not None:
            raise error
        return request

    def hang_up(self) -> None:
        self.sock.close()           # wakes a reader blocked in recv_into

    # -- replies --------------------------------------------------------------------

    async def receive(self) -> None:
        """Receive one simple reply or structured chunk and apply it."""
        header = memoryview(self._header)
        received = await self._recv_some(header[:SIMPLE_REPLY.size])
        with trio.CancelScope(shield=True):
            await self._recv_into(header[received:SIMPLE_REPLY.size])
            magic = U32.unpack_from(header)[0]
            if magic == NBD_SIMPLE_REPLY_MAGIC:
                await self._simple_reply()
            elif magic == NBD_STRUCTURED_REPLY_MAGIC and self.structured:
                await self._recv_into(header[SIMPLE_REPLY.size:])
                await self._structured_chunk()
            else:
                raise ProtocolError(f"reply magic {magic:#x}")

    def _request_for(self, handle: int) -> _Request:
        request = self.pending(handle)
        assert isinstance(request, _Request)
        return request

    async def _simple_reply(self) -> None:
        _, error, handle = SIMPLE_REPLY.unpack_from(self._header)
        request = self._request_for(handle)
        if error:
            request.fail(self._server_error(request, error))
        elif request.command == NBD_CMD_READ:
            assert request.buffer is not None
            await self._recv_into(memoryview(request.buffer))
            request.covered = request.length
        self._complete(handle, request)

    async def _structured_chunk(self) -> None:
        _, flags, chunk_type, handle, length = STRUCTURED_REPLY.unpack_from(self._header)
        request = self._request_for(handle)
        if chunk_type == NBD_REPLY_TYPE_NONE:
            if length or not flags & NBD_REPLY_FLAG_DONE:
                raise ProtocolError("malformed NBD_REPLY_TYPE_NONE chunk")
        elif chunk_type == NBD_REPLY_TYPE_OFFSET_DATA:
            await self._offset_data(request, length)
        elif chunk_type == NBD_REPLY_TYPE_OFFSET_HOLE:
            await self._offset_hole(request, length)
        elif chunk_type == NBD_REPLY_TYPE_BLOCK_STATUS:
            await self._block_status_chunk(request, length)
        elif chunk_type & NBD_REPLY_TYPE_ERROR_BIT:
            await self._error_chunk(request, chunk_type, length)
        else:
            raise ProtocolError(f"unknown reply chunk type {chunk_type}")
        if flags & NBD_REPLY_FLAG_DONE:
            self._complete(handle, request)

    def _content_range(self, request: _Request, offset: int, count: int) -> int:
        """Where a data or hole chunk lands in the request's buffer, checked."""
        if request.command != NBD_CMD_READ:
            raise ProtocolError("read data in the reply to a non-read request")
        start = offset - request.offset
        if start < 0 or start + count > request.length or request.covered + count > request.length:
            raise ProtocolError(f"read chunk {offset}+{count} outside the request "
                                 f"{request.offset}+{request.length}")
        request.covered += count
        return start

    async def _offset_data(self, request: _Request, length: int) -> None:
        if length <= U64.size:
            raise ProtocolError(f"NBD_REPLY_TYPE_OFFSET_DATA of {length} bytes")
        offset = U64.unpack(await self._recv(U64.size))[0]
        count = length - U64.size
        start = self._content_range(request, offset, count)
        assert request.buffer is not None
        await self._recv_into(memoryview(request.buffer)[start:start + count])

    async def _offset_hole(self, request: _Request, length: int) -> None:
        if length != OFFSET_HOLE.size:
            raise ProtocolError(f"NBD_REPLY_TYPE_OFFSET_HOLE of {length} bytes")
        offset, count = OFFSET_HOLE.unpack(await self._recv(OFFSET_HOLE.size))
        if count == 0:
            raise ProtocolError("empty NBD_REPLY_TYPE_OFFSET_HOLE")
        # The buffer starts zero-filled, so a hole needs only accounting.
        self._content_range(request, offset, count)

    async def _block_status_chunk(self, request: _Request, length: int) -> None:
        """Keep the first run of equal status; consume the rest in bounded pieces."""
        if (request.command != NBD_CMD_BLOCK_STATUS or length < U32.size + DESCRIPTOR.size
                or (length - U32.size) % DESCRIPTOR.size):
            raise ProtocolError(f"malformed block status chunk of {length} bytes")
        context_id = U32.unpack(await self._recv(U32.size))[0]
        remaining = length - U32.size
        if context_id != self.meta_context_id:
            await self._skip(remaining)         # a context we did not select
            return
        run_length, run_flags, merging = 0, 0, request.extent is None
        while remaining:
            piece = await self._recv(min(remaining, DESCRIPTOR.size * 4096))
            remaining -= len(piece)
            for extent_length, flags in DESCRIPTOR.iter_unpack(piece):
                if extent_length == 0:
                    raise ProtocolError("block status descriptor of length 0")
                flags &= NBD_STATE_HOLE | NBD_STATE_ZERO     # ignore unknown flags
                if merging and (run_length == 0 or flags == run_flags):
                    run_length, run_flags = run_length + extent_length, flags
                else:
                    merging = False
        if request.extent is None:
            request.extent = (run_length, run_flags)

    async def _error_chunk(self, request: _Request, chunk_type: int, length: int) -> None:
        tail = U64.size if chunk_type == NBD_REPLY_TYPE_ERROR_OFFSET else 0
        if length < ERROR_CHUNK.size + tail or length > ERROR_CHUNK.size + NBD_MAX_STRING + 8:
            raise ProtocolError(f"error chunk of {length} bytes")
        payload = await self._recv(length)
        error, message_length = ERROR_CHUNK.unpack_from(payload)
        if message_length > length - ERROR_CHUNK.size - tail:
            raise ProtocolError("error chunk message longer than the chunk")
        message = payload[ERROR_CHUNK.size:ERROR_CHUNK.size + message_length]
        request.fail(self._server_error(request, error or NBD_EINVAL, printable(message)))

    def _complete(self, handle: int, request: _Request) -> None:
        if request.error is None:
            if request.command == NBD_CMD_READ and request.covered != request.length:
                request.fail(ImgfsError(f"{self.name}: the server sent {request.covered} "
                                        f"of {request.length} bytes read at offset "
                                        f"{request.offset}"))
            elif request.command == NBD_CMD_BLOCK_STATUS and not request.extent:
                request.fail(ImgfsError(f"{self.name}: no block status for offset "
                                        f"{request.offset}"))
        self.complete(handle)

    def _server_error(self, request: _Request, code: int, said: str = "") -> ImgfsError:
        number = server_errno(code)
        if code == NBD_ESHUTDOWN:
            # The spec asks for a soft disconnect once nothing is in flight.
            self._shutting_down = True
            self.broken = self.broken or "the server is shutting down"
        what = COMMAND_NAMES.get(request.command, f"command {request.command}")
        message = (f"{self.name}: {what} of {request.length} bytes at offset "
                   f"{request.offset} failed: {os.strerror(number)}"
                   + (f" (server says: {said})" if said else ""))
        if number == errno.ENOSPC:
            return NoSpace(message)
        if number == errno.ENOTSUP:
            return Unsupported(message)
        return ImgfsError(message, errno_=number)

    # -- closing ----------------------------------------------------------------------

    async def close(self) -> None:
        """Soft disconnect (NBD_CMD_DISC) if the connection still works, then
        close the socket.  Never raises."""
        polite = self.broken is None or self._shutting_down
        self.broken = self.broken or "the connection is closed"
        self._shutting_down = False
        if polite:
            disc = REQUEST.pack(NBD_REQUEST_MAGIC, 0, NBD_CMD_DISC, 0, 0, 0)
            with trio.move_on_after(DISCONNECT_TIMEOUT):
                try:
                    await self.post(disc)
                except Lost:
                    pass
        self.fail(self.broken)


async def open_socket(address: Address) -> trio.socket.SocketType:
    """A connected stream socket (TCP with TCP_NODELAY, as proto.md advises)."""
    if address.transport == "unix":
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.connect(address.path)
        except BaseException:
            sock.close()
            raise
        return sock
    last: OSError | None = None
    for family, kind, proto, _, sockaddr in await trio.socket.getaddrinfo(
            address.host, address.port, type=socket.SOCK_STREAM):
        sock = trio.socket.socket(family, kind, proto)
        try:
            await sock.connect(sockaddr)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        except BaseException:
            sock.close()
            raise
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    raise last or OSError(errno.EHOSTUNREACH, os.strerror(errno.EHOSTUNREACH))


# -- the driver ---------------------------------------------------------------------


class NbdDriver(BlockDriver):
    name = "nbd"
    kind = Kind.PROTOCOL
    description = "Network Block Device exports (nbd://, nbd+unix://, nbd:HOST:PORT)"
    path_opts = frozenset({"server.path", "path"})      # unix sockets
    async_io = True
    busy_poll = True
    open_opts = Schema(
        Opt("server", parse_server,
            help="server address: type=inet with host and port, or type=unix with path"),
        Opt("export", Str, help="export name (default: the server's default export)"),
        Opt("host", Str, help="legacy: server host name"),
        Opt("port", Str, help=f"legacy: server TCP port (default {NBD_DEFAULT_PORT})"),
        Opt("path", Str, help="legacy: server unix socket path"),
        Opt("filename", Str, help="an nbd:// or nbd+unix:// URI"),
        Opt("tls-creds", Str, help="TLS credentials (TLS is not supported)"),
    )

    conn: NbdConnection | None = None
    #: False when the server exports read-only (the core then refuses rw opens)
    writable: bool = True
    fua: int = 0

    @classmethod
    def parse_filename(cls, filename: str) -> dict[str, Any]:
        return parse_nbd_filename(filename)

    @classmethod
    def source_path(cls, filename: str) -> str:
        """The export's name; for a unix socket without one, the socket's."""
        url_path, _, query = filename.partition(":")[2].partition("?")
        if not url_path.strip("/") and "socket=" in query:
            # nbd+unix:///?socket=PATH names no export: the socket does,
            # as in the nbd:unix:PATH form
            return query.split("socket=", 1)[1].split("&", 1)[0]
        if ":exportname=" in url_path:
            return url_path.split(":exportname=", 1)[1]
        return url_path

    async def open(self, options: dict[str, Any], ctx: OpenContext) -> None:
        if options.get("tls-creds"):
            raise Unsupported("nbd over TLS is not supported")
        address, export = resolve_target(options)
        self.conn = conn = await NbdConnection.connect(address, export)
        self.size = conn.size
        self.writable = not conn.flags & NBD_FLAG_READ_ONLY
        sizes = conn.block_sizes
        self.request_alignment = sizes.minimum
        self.max_transfer = min(sizes.maximum, NBD_MAX_PORTABLE_REQUEST)
        # Under writethrough/none a write is acknowledged once it is stable.
        if ctx.cache != "writeback" and conn.flags & NBD_FLAG_SEND_FUA:
            self.fua = NBD_CMD_FLAG_FUA

    async def aclose(self) -> None:
        if self.conn is not None:
            await self.conn.close()

    def _connection(self) -> NbdConnection:
        if self.conn is None:
            raise Unreachable("nbd: not connected")
        return self.conn

    def _zero_limit(self) -> int:
        """Largest WRITE_ZEROES / TRIM request: the maximum block size also
        bounds WRITE_ZEROES, and lengths are 32-bit."""
        align = self.request_alignment
        limit = min(self._connection().block_sizes.maximum, MAX_ZERO_REQUEST)
        return max(limit - limit % align, align)

    # -- I/O ----------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes:
        buffer = bytearray(length)
        await self._connection().request(NBD_CMD_READ, offset, length, buffer=buffer)
        # Received in place and never copied: a bytearray serves every caller
        # (slicing, joining, the FUSE reply) as well as bytes would.
        return cast(bytes, buffer)

    async def write(self, offset: int, data: bytes) -> None:
        if not self.writable:
            raise ReadOnly(f"{self._connection().name}: the export is read-only")
        await self._connection().request(NBD_CMD_WRITE, offset, len(data),
                                         flags=self.fua, payload=data)

    async def write_zeroes(self, offset: int, length: int, *, may_unmap: bool = False) -> None:
        conn = self._connection()
        if not conn.flags & NBD_FLAG_SEND_WRITE_ZEROES:
            await self._write_zero_bytes(offset, length)
            return
        flags = self.fua | (0 if may_unmap else NBD_CMD_FLAG_NO_HOLE)
        await self._in_pieces(NBD_CMD_WRITE_ZEROES, offset, length, flags)

    async def _write_zero_bytes(self, offset: int, length: int) -> None:
        chunk = min(self.max_transfer, MiB)
        zeros = bytes(chunk)
        end = offset + length
        while offset < end:
            step = min(chunk, end - offset)
            await self.write(offset, zeros if step == chunk else zeros[:step])
            offset += step

    async def _in_pieces(self, command: int, offset: int, length: int, flags: int) -> None:
        conn, limit = self._connection(), self._zero_limit()
        end = offset + length
        while offset < end:
            step = min(limit, end - offset)
            await conn.request(command, offset, step, flags=flags)
            offset += step

    async def discard(self, offset: int, length: int) -> None:
        if self._connection().flags & NBD_FLAG_SEND_TRIM:
            await self._in_pieces(NBD_CMD_TRIM, offset, length, self.fua)

    async def flush(self) -> None:
        conn = self._connection()
        if conn.flags & NBD_FLAG_SEND_FLUSH:
            await conn.request(NBD_CMD_FLUSH)

    async def block_status(self, offset: int, length: int) -> Extent:
        conn = self._connection()
        if conn.meta_context_id is None:
            return Extent(length, DATA)
        # Queries obey the minimum block size too: widen, then clip the answer.
        align = self.request_alignment
        start = offset - offset % align
        end = min(self.size, -(-(offset + length) // align) * align)
        query = min(end - start, NBD_NO_MAXIMUM - NBD_NO_MAXIMUM % align)
        request = await conn.request(NBD_CMD_BLOCK_STATUS, start, query)
        assert request.extent is not None
        run_length, flags = request.extent
        covered = min(start + run_length, offset + length) - offset
        if covered <= 0:
            raise ImgfsError(f"{conn.name}: block status at {start} covers {run_length} "
                             f"bytes, less than the {offset - start} to reach {offset}")
        return Extent(covered, status_of(flags))


DRIVERS = [NbdDriver]
