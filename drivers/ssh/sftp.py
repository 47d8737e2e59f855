"""SFTP version 3, the client side, over any pair of trio byte streams.

Spec: draft-ietf-secsh-filexfer-02 (version 3, what OpenSSH speaks) and
OpenSSH's PROTOCOL file for the extensions used here: ``fsync@openssh.com``
and ``limits@openssh.com``.  Only what a block device needs: open, fstat,
read, write, fsetstat (the size), fsync, close.  Requests are pipelined
(`imgfs.pipeline`): any number in flight, replies matched by id.
"""
from __future__ import annotations

import errno
import functools
import struct
from dataclasses import dataclass
from typing import Protocol, cast

import trio

from imgfs.errors import ImgfsError, NoSpace, NotFound, PermissionDenied, Unsupported
from imgfs.pipeline import Lost, Pipeline, ProtocolError, Request

# -- spec constants (filexfer-02 section 3, 7) ------------------------------------

SFTP_VERSION = 3

SSH_FXP_INIT = 1
SSH_FXP_VERSION = 2
SSH_FXP_OPEN = 3
SSH_FXP_CLOSE = 4
SSH_FXP_READ = 5
SSH_FXP_WRITE = 6
SSH_FXP_FSTAT = 8
SSH_FXP_FSETSTAT = 10
SSH_FXP_STATUS = 101
SSH_FXP_HANDLE = 102
SSH_FXP_DATA = 103
SSH_FXP_ATTRS = 105
SSH_FXP_EXTENDED = 200
SSH_FXP_EXTENDED_REPLY = 201

SSH_FXF_READ = 0x01
SSH_FXF_WRITE = 0x02
SSH_FXF_CREAT = 0x08
SSH_FXF_TRUNC = 0x10

SSH_FILEXFER_ATTR_SIZE = 0x01
SSH_FILEXFER_ATTR_UIDGID = 0x02
SSH_FILEXFER_ATTR_PERMISSIONS = 0x04
SSH_FILEXFER_ATTR_ACMODTIME = 0x08
SSH_FILEXFER_ATTR_EXTENDED = 0x80000000

SSH_FX_OK = 0
SSH_FX_EOF = 1
SSH_FX_NO_SUCH_FILE = 2
SSH_FX_PERMISSION_DENIED = 3
SSH_FX_FAILURE = 4
SSH_FX_BAD_MESSAGE = 5
SSH_FX_NO_CONNECTION = 6
SSH_FX_CONNECTION_LOST = 7
SSH_FX_OP_UNSUPPORTED = 8

FSYNC_EXTENSION = "fsync@openssh.com"
LIMITS_EXTENSION = "limits@openssh.com"

#: read and write sizes every server accepts (filexfer-02 leaves it open;
#: 32 KiB is what clients have always used) when it publishes no limits
DEFAULT_TRANSFER = 32 * 1024
#: largest request imgfs sends, whatever limits the server publishes
MAX_TRANSFER = 4 << 20
#: largest packet accepted from the server (a DATA reply plus headers)
MAX_PACKET = MAX_TRANSFER + 1024
#: the most the reader takes from the channel at once
RECEIVE_CHUNK = 1 << 20
#: the receive buffer's first size (it doubles while a packet outgrows it)
RECEIVE_BUFFER = RECEIVE_CHUNK
#: less room than this after the last packet received: move it to the front
MIN_ROOM = 64 * 1024

STATUS_NAMES = {
    SSH_FX_EOF: "end of file", SSH_FX_NO_SUCH_FILE: "no such file",
    SSH_FX_PERMISSION_DENIED: "permission denied", SSH_FX_FAILURE: "failure",
    SSH_FX_BAD_MESSAGE: "bad message", SSH_FX_NO_CONNECTION: "no connection",
    SSH_FX_CONNECTION_LOST: "connection lost", SSH_FX_OP_UNSUPPORTED: "operation unsupported",
}

# -- wire structs (all big-endian, section 3) -------------------------------------

U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
#: packet header: length (after itself), type, request id
HEADER = struct.Struct(">IBI")
#: STATUS payload head: error code
STATUS_CODE = U32
#: limits@openssh.com reply: max packet, max read, max write, max open handles
LIMITS = struct.Struct(">QQQQ")


def sftp_string(data: bytes) -> bytes:
    return U32.pack(len(data)) + data


def packet(kind: int, request_id: int, *fields: bytes) -> bytes:
    body = b"".join(fields)
    return HEADER.pack(len(body) + 5, kind, request_id) + body


@functools.cache
def read_packer(handle_length: int) -> struct.Struct:
    """SSH_FXP_READ whole: length, type, id, handle (length and bytes),
    offset, count."""
    return struct.Struct(f">IBII{handle_length}sQI")


def read_packet(request_id: int, handle: bytes, offset: int, count: int) -> bytes:
    packer = read_packer(len(handle))
    return packer.pack(packer.size - 4, SSH_FXP_READ, request_id, len(handle), handle, offset,
                       count)


def size_attrs(size: int | None = None, permissions: int | None = None) -> bytes:
    """An ATTRS block carrying only a size and/or permissions."""
    flags = (SSH_FILEXFER_ATTR_SIZE if size is not None else 0) | (
        SSH_FILEXFER_ATTR_PERMISSIONS if permissions is not None else 0)
    return (U32.pack(flags) + (U64.pack(size) if size is not None else b"")
            + (U32.pack(permissions) if permissions is not None else b""))


class Reader:
    """Pulls SFTP fields off a packet body, each checked against its end."""

    __slots__ = ("data", "at")

    def __init__(self, data: bytes | bytearray | memoryview, at: int = 0) -> None:
        self.data = data
        self.at = at

    def take(self, count: int) -> memoryview:
        if count < 0 or self.at + count > len(self.data):
            raise ProtocolError(f"field of {count} bytes runs past the end of the packet")
        piece = memoryview(self.data)[self.at:self.at + count]
        self.at += count
        return piece

    def u32(self) -> int:
        return cast(int, U32.unpack(self.take(4))[0])

    def u64(self) -> int:
        return cast(int, U64.unpack(self.take(8))[0])

    def take_string(self) -> memoryview:
        return self.take(self.u32())

    def string(self) -> bytes:
        return bytes(self.take_string())

    def remaining(self) -> int:
        return len(self.data) - self.at


def attrs_size(reader: Reader) -> int | None:
    """The size in an ATTRS block (section 5), skipping the other fields."""
    flags = reader.u32()
    size = reader.u64() if flags & SSH_FILEXFER_ATTR_SIZE else None
    if flags & SSH_FILEXFER_ATTR_UIDGID:
        reader.take(8)
    if flags & SSH_FILEXFER_ATTR_PERMISSIONS:
        reader.take(4)
    if flags & SSH_FILEXFER_ATTR_ACMODTIME:
        reader.take(8)
    if flags & SSH_FILEXFER_ATTR_EXTENDED:
        for _ in range(reader.u32()):
            reader.string()
            reader.string()
    return size


def parse_version(body: bytes) -> tuple[int, dict[str, bytes]]:
    """SSH_FXP_VERSION after its type byte: the version and the extensions."""
    reader = Reader(body)
    version = reader.u32()
    extensions: dict[str, bytes] = {}
    while reader.remaining():
        name = reader.string().decode("utf-8", "replace")
        extensions[name] = reader.string()
    return version, extensions


@dataclass(frozen=True)
class Limits:
    """Largest read and write the server takes (limits@openssh.com)."""

    read: int = DEFAULT_TRANSFER
    write: int = DEFAULT_TRANSFER

    @classmethod
    def from_reply(cls, payload: bytes) -> Limits:
        if len(payload) < LIMITS.size:
            raise ProtocolError(f"limits@openssh.com reply of {len(payload)} bytes")
        max_packet, max_read, max_write, _ = LIMITS.unpack_from(payload)
        # Zero means "no limit"; a write also needs room for its header.
        packet_room = max_packet - 1024 if max_packet > 2048 else MAX_TRANSFER
        read = min(max_read or MAX_TRANSFER, packet_room, MAX_TRANSFER)
        write = min(max_write or MAX_TRANSFER, packet_room, MAX_TRANSFER)
        return cls(max(read, 512), max(write, 512))


def status_error(code: int, message: str, what: str) -> ImgfsError:
    """An SFTP status other than OK as the matching ImgfsError."""
    reason = STATUS_NAMES.get(code, f"status {code}")
    text = f"{what}: {reason}" + (f" (server says: {message})" if message
                                  and message.lower() != reason else "")
    if code == SSH_FX_NO_SUCH_FILE:
        return NotFound(text)
    if code == SSH_FX_PERMISSION_DENIED:
        return PermissionDenied(text)
    if code == SSH_FX_OP_UNSUPPORTED:
        return Unsupported(text)
    if code == SSH_FX_FAILURE and "space" in message.lower():
        return NoSpace(text)
    return ImgfsError(text, errno_=errno.EIO)


# -- the session ------------------------------------------------------------------


class _Call(Request):
    """A request and its reply: the reply's type and body (after the id),
    a buffer of its own."""

    __slots__ = ("what", "kind", "body")

    def __init__(self, what: str) -> None:
        super().__init__()
        self.what = what
        self.kind = 0
        self.body = bytearray()


class ByteChannel(Protocol):
    """An ordered, reliable byte channel to the SFTP server (`libssh.Channel`)."""

    def send(self, data: bytes) -> None:
        """Queue all of `data`, in order, without waiting (or raise)."""

    async def receive_into(self, buffer: bytearray, start: int, stop: int) -> int:
        """Put what the channel has (at least a byte, at most up to `stop`)
        in `buffer` from `start` on: the count, 0 at the channel's end.
        The buffer is never resized: the channel may keep it exported."""

    def close(self) -> None: ...


class SftpSession(Pipeline):
    """An SFTP v3 client on a `ByteChannel` (an SSH channel running "sftp")."""

    # the channel queues what it cannot send yet: no send lock, no shield
    transmit_never_waits = True

    def __init__(self, channel: ByteChannel, name: str, *,
                 reply_timeout: float | None = None) -> None:
        super().__init__(name, reply_timeout=reply_timeout)
        self.channel = channel
        self.extensions: dict[str, bytes] = {}
        self.limits = Limits()
        #: received bytes not yet taken as packets: [_start, _end)
        self._buffer = bytearray(RECEIVE_BUFFER)
        self._start = self._end = 0
        #: the server's SSH_FXP_VERSION after its type, once received
        self.version_body: bytearray | None = None

    # -- the channel ----------------------------------------------------------------

    async def transmit(self, *buffers: bytes | bytearray | memoryview) -> None:
        # one message, one channel write (a write request's header and data
        # would otherwise go as two SSH packets)
        data = buffers[0] if len(buffers) == 1 and isinstance(buffers[0], bytes) else (
            b"".join(buffers))
        try:
            self.channel.send(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise Lost(str(exc) or "the connection closed") from None

    def _make_room(self) -> int:
        """Where the next bytes received go: after those not taken yet,
        moved to the front first when little room is left (into a buffer
        twice the size when a packet needs it)."""
        start, end = self._start, self._end
        if start == end:
            self._start = self._end = 0
            return 0
        if len(self._buffer) - end >= MIN_ROOM:
            return end
        kept = self._buffer[start:end]
        if len(self._buffer) - len(kept) < MIN_ROOM:
            # a new buffer: the channel may hold the old one exported
            self._buffer = bytearray(2 * len(self._buffer))
        self._buffer[:len(kept)] = kept
        self._start, self._end = 0, len(kept)
        return len(kept)

    async def receive(self) -> None:
        """Receive what the stream has, and complete every request answered
        (or keep the SSH_FXP_VERSION, which answers no request).  Cancelling
        between reads loses nothing: the buffer stays."""
        end = self._make_room()
        buffer = self._buffer
        try:
            count = await self.channel.receive_into(buffer, end,
                                                    min(end + RECEIVE_CHUNK, len(buffer)))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise Lost(str(exc) or "the connection closed") from None
        if not count:
            raise Lost("the server closed the SFTP channel")
        self._end = received = end + count
        start = self._start
        while received - start >= 9:
            length, kind, request_id = HEADER.unpack_from(buffer, start)
            end = start + 4 + length
            if not 5 <= length <= MAX_PACKET:
                raise ProtocolError(f"packet of {length} bytes")
            if end > received:
                break
            self._start = start = end
            if kind == SSH_FXP_VERSION:     # its body has no request id
                self.version_body = buffer[end - length + 1:end]
                continue
            call = self.pending(request_id)
            assert isinstance(call, _Call)
            call.kind, call.body = kind, buffer[end - length + 5:end]
            self.complete(request_id)
        if received - start >= 4:       # a partial packet's length, checked
            length = U32.unpack_from(buffer, start)[0]
            if not 5 <= length <= MAX_PACKET:
                raise ProtocolError(f"packet of {length} bytes")

    def hang_up(self) -> None:
        # The owner of the connection frees it; the channel just stops.
        self.channel.close()

    # -- handshake ----------------------------------------------------------------------

    async def initialise(self) -> None:
        """SSH_FXP_INIT / SSH_FXP_VERSION, then the server's limits."""
        await self.transmit(HEADER.pack(5, SSH_FXP_INIT, SFTP_VERSION))
        while self.version_body is None:
            await self.receive()
        version, self.extensions = parse_version(bytes(self.version_body))
        if version < SFTP_VERSION:
            raise ProtocolError(f"the server speaks SFTP version {version}, 3 is needed")
        if LIMITS_EXTENSION in self.extensions:
            reply = await self._call(SSH_FXP_EXTENDED, "limits",
                                     sftp_string(LIMITS_EXTENSION.encode()))
            self.limits = Limits.from_reply(bytes(self._expect(reply, SSH_FXP_EXTENDED_REPLY)))

    # -- requests -------------------------------------------------------------------

    async def _call(self, kind: int, what: str, *fields: bytes) -> _Call:
        request_id = self.new_id()
        call = _Call(what)
        await self.exchange(request_id, call, packet(kind, request_id, *fields))
        return call

    @staticmethod
    def _status(call: _Call) -> tuple[int, str]:
        reader = Reader(call.body)
        code = reader.u32()
        message = reader.string().decode("utf-8", "replace") if reader.remaining() else ""
        return code, "".join(char if char.isprintable() else " " for char in message).strip()

    def _expect(self, call: _Call, kind: int) -> bytearray:
        """The reply's body when it has the type asked for; raise its status."""
        if call.kind == kind:
            return call.body
        if call.kind == SSH_FXP_STATUS:
            code, message = self._status(call)
            raise status_error(code, message, call.what)
        raise ProtocolError(f"reply of type {call.kind} to {call.what}")

    def _check_ok(self, call: _Call) -> None:
        code, message = self._status(self._only_status(call))
        if code != SSH_FX_OK:
            raise status_error(code, message, call.what)

    def _only_status(self, call: _Call) -> _Call:
        if call.kind != SSH_FXP_STATUS:
            raise ProtocolError(f"reply of type {call.kind} to {call.what}")
        return call

    async def open(self, path: bytes, flags: int, permissions: int | None = None) -> bytes:
        """A handle for `path` opened with SSH_FXF_* `flags`."""
        call = await self._call(SSH_FXP_OPEN, "open", sftp_string(path), U32.pack(flags),
                                size_attrs(permissions=permissions))
        return Reader(self._expect(call, SSH_FXP_HANDLE)).string()

    async def close(self, handle: bytes) -> None:
        self._check_ok(await self._call(SSH_FXP_CLOSE, "close", sftp_string(handle)))

    async def fstat_size(self, handle: bytes) -> int:
        call = await self._call(SSH_FXP_FSTAT, "fstat", sftp_string(handle))
        size = attrs_size(Reader(self._expect(call, SSH_FXP_ATTRS)))
        if size is None:
            raise ImgfsError(f"{self.name}: the server does not tell the file's size")
        return size

    async def set_size(self, handle: bytes, size: int) -> None:
        self._check_ok(await self._call(SSH_FXP_FSETSTAT, "truncate", sftp_string(handle),
                                        size_attrs(size=size)))

    async def fsync(self, handle: bytes) -> None:
        self._check_ok(await self._call(SSH_FXP_EXTENDED, "fsync",
                                        sftp_string(FSYNC_EXTENSION.encode()),
                                        sftp_string(handle)))

    async def read(self, handle: bytes, offset: int, length: int) -> bytearray:
        """`length` bytes at `offset`, in pipelined pieces of the server's
        read limit; past the end of the file reads as zeros."""
        if length <= self.limits.read:
            # one piece, the common case: a whole answer is its own result
            request_id = self.new_id()
            call = _Call("read")
            await self.send(request_id, call, read_packet(request_id, handle, offset, length))
            await self.wait(call)
            body = call.body
            if (call.kind == SSH_FXP_DATA and len(body) == 4 + length
                    and U32.unpack_from(body)[0] == length):
                del body[:4]            # in place, no copy
                return body
            result = bytearray(length)
            await self._fill(handle, offset, result, 0, length, call)
            return result
        result = bytearray(length)
        calls = []
        step = self.limits.read
        for start in range(0, length, step):
            request_id = self.new_id()
            call = _Call("read")
            count = min(step, length - start)
            calls.append((start, count, call))
            await self.send(request_id, call, read_packet(request_id, handle, offset + start,
                                                          count))
        for start, count, call in calls:
            await self.wait(call)
            await self._fill(handle, offset, result, start, count, call)
        return result

    async def _fill(self, handle: bytes, offset: int, result: bytearray, start: int,
                    count: int, call: _Call) -> None:
        """Put a READ reply in place; a short one is followed up until EOF."""
        while count:
            body = call.body
            if (call.kind == SSH_FXP_DATA and len(body) == 4 + count
                    and U32.unpack_from(body)[0] == count):
                result[start:start + count] = body[4:]     # all that was asked for
                return
            if call.kind == SSH_FXP_STATUS:
                code, message = self._status(call)
                if code == SSH_FX_EOF:
                    return          # the buffer is zero-filled
                raise status_error(code, message, "read")
            data = Reader(self._expect(call, SSH_FXP_DATA)).take_string()
            if not 0 < len(data) <= count:
                raise ProtocolError(f"read of {count} bytes answered with {len(data)}")
            result[start:start + len(data)] = data
            start, count = start + len(data), count - len(data)
            if count:
                request_id = self.new_id()
                call = _Call("read")
                await self.exchange(request_id, call,
                                    read_packet(request_id, handle, offset + start, count))

    async def write(self, handle: bytes, offset: int, data: bytes) -> None:
        """Write `data` at `offset` in pipelined pieces of the write limit."""
        handle_field = sftp_string(handle)
        view = memoryview(data)
        step = self.limits.write
        calls = []
        for start in range(0, len(data), step):
            piece = view[start:start + step]
            request_id = self.new_id()
            call = _Call("write")
            calls.append(call)
            header = packet(SSH_FXP_WRITE, request_id, handle_field,
                            U64.pack(offset + start), U32.pack(len(piece)))
            # the length field in the header counts the data that follows it
            header = U32.pack(len(header) - 4 + len(piece)) + header[4:]
            await self.send(request_id, call, header, piece)
        for call in calls:
            await self.wait(call)
            self._check_ok(call)
