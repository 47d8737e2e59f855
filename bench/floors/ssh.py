"""The floor of an ssh 4 KiB read from a Python FUSE daemon (see README.md).

The driver's own libssh session, channel and SFTP handle, already open;
each small read is one SSH_FXP_READ written to the channel and its reply
read back with the fewest libssh calls Python can make, sleeping on the
session's socket with trio in between (not after a full 4 KiB socket
read by libssh: the rest of the packet is there already, as the driver's
receive knows too): no pipeline, no request objects, no timeouts.
IMGFS_FLOOR_WAIT=poll sleeps with a blocking poll(2) on the trio thread
instead (it stalls every other request meanwhile: depth 1 only), =spin
with poll(0) in a loop (a core busy for the whole round trip).

The floor shares the channel with imgfs's SFTP session, so it runs only
while that session has nothing in flight (otherwise the read goes through
imgfs), and any other read waits while a floor read is on the channel.
It uses request id 0, which the session never gives out.
"""
from __future__ import annotations

import ctypes
import os
import select
import struct
from typing import Any

import trio
from imgfs.drivers.ssh.driver import SshDriver
from imgfs.drivers.ssh.libssh import SOCKET_READ_SIZE
from imgfs.drivers.ssh.sftp import SSH_FXP_DATA, SSH_FXP_READ

SMALL = 64 << 10
#: a DATA reply's head: length, type, request id, data length
REPLY_HEAD = struct.Struct(">IBII")
FLOOR_ID = 0


class Floor:
    def __init__(self) -> None:
        self.buffer = ctypes.create_string_buffer(REPLY_HEAD.size + SMALL)
        self.address = ctypes.addressof(self.buffer)
        self.wait = os.environ.get("IMGFS_FLOOR_WAIT", "trio")
        self.poller: Any = None
        self.polled_fd = -1
        #: set while a floor read owns the channel; others wait on `idle`
        self.busy = False
        self.idle: trio.Event | None = None
        self.handle = b""
        self.request = struct.Struct(">I")

    def sleep_blocking(self, fd: int) -> None:
        if fd != self.polled_fd:
            self.poller = select.poll()
            self.poller.register(fd, select.POLLIN)
            self.polled_fd = fd
        if self.wait == "poll":
            self.poller.poll()
        else:
            while not self.poller.poll(0):
                pass

    async def read(self, driver: Any, offset: int, length: int) -> bytes:
        channel = driver.conn.channel
        lib, chan, fd, address = channel.lib, channel.channel, channel.fd, self.address
        handle = driver.handle
        if handle is not self.handle:
            # the whole request in one pack: length, type, id, handle, offset, length
            self.request = struct.Struct(f">IBII{len(handle)}sQI")
            self.handle = handle
        message = self.request.pack(self.request.size - 4, SSH_FXP_READ, FLOOR_ID, len(handle),
                                    handle, offset, length)
        if lib.ssh_channel_write(chan, message, len(message)) != len(message):
            raise OSError("floor: the channel took less than the whole request")
        want = REPLY_HEAD.size + length
        got = 0
        read, counter = lib.ssh_channel_read_nonblocking, channel.socket_counter
        while got < want:
            before = counter.in_bytes
            count = read(chan, address + got, want - got, 0)
            if count > 0:
                got += count
            elif count < 0:
                raise OSError(f"floor: libssh read failed ({count})")
            elif counter.in_bytes - before == SOCKET_READ_SIZE:
                continue        # a full socket read of part of a packet: the rest is there
            elif self.wait == "trio":
                await trio.lowlevel.wait_readable(fd)
            else:
                self.sleep_blocking(fd)
        size, kind, request_id, data_length = REPLY_HEAD.unpack_from(self.buffer)
        if (size, kind, request_id, data_length) != (want - 4, SSH_FXP_DATA, FLOOR_ID, length):
            raise OSError(f"floor: unexpected reply (type {kind}, {data_length} bytes)")
        return ctypes.string_at(address + REPLY_HEAD.size, length)


def install() -> None:
    original = SshDriver.read
    floor = Floor()

    async def read(self: Any, offset: int, length: int) -> bytes:
        while floor.busy:
            if floor.idle is None:
                floor.idle = trio.Event()
            await floor.idle.wait()
        conn = self.conn
        if (length > SMALL or conn is None or conn.session.broken is not None
                or conn.session.in_flight):
            return await original(self, offset, length)
        floor.busy = True
        try:
            return await floor.read(self, offset, length)
        finally:
            floor.busy = False
            if floor.idle is not None:
                floor.idle.set()
                floor.idle = None
    SshDriver.read = read  # type: ignore[method-assign]
