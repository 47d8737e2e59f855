"""The floor of an iSCSI 4 KiB read from a Python FUSE daemon (see README.md).

A second libiscsi session to the driver's LUN, logged in synchronously at
the first small read; then each small read is one READ(16) queued, sent
and waited for with the fewest calls Python can make: no pipeline, no
request objects, no timeouts.  IMGFS_FLOOR_WAIT=poll waits with a
blocking poll(2) on the trio thread instead of trio's wait_readable (it
stalls every other request meanwhile: depth 1 only), =spin with poll(0)
in a loop (a core busy for the whole round trip).
"""
from __future__ import annotations

import ctypes
import os
import select
from typing import Any

import trio
from imgfs.drivers.iscsi import binding
from imgfs.drivers.iscsi.driver import IscsiDriver

SMALL = 64 << 10


class Floor:
    def __init__(self, driver: Any) -> None:
        target, lib = driver.session.target, binding.lib()
        self.lib, self.lun, self.block_size = lib, target.lun, driver.block_size
        self.ctx = lib.iscsi_create_context(f"{target.initiator_name}.floor".encode())
        lib.iscsi_set_targetname(self.ctx, target.target.encode())
        lib.iscsi_set_session_type(self.ctx, binding.ISCSI_SESSION_NORMAL)
        connect = lib.iscsi_full_connect_sync
        connect.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
        if connect(self.ctx, target.portal.encode(), target.lun) != 0:
            raise OSError(f"floor: login failed: {lib.iscsi_get_error(self.ctx)!r}")
        self.fd = lib.iscsi_get_fd(self.ctx)
        self.poller = select.poll()
        self.poller.register(self.fd, select.POLLIN)
        self.done = False
        self.callback = binding.COMMAND_CB(self.complete)
        self.wait = os.environ.get("IMGFS_FLOOR_WAIT", "trio")

    def complete(self, _ctx: Any, status: int, task: Any, _private: Any) -> None:
        self.done = True
        self.status = status
        self.lib.scsi_free_scsi_task(ctypes.cast(task, ctypes.POINTER(binding.ScsiTask)))

    async def read(self, offset: int, length: int) -> bytes:
        lib, ctx = self.lib, self.ctx
        buffer = bytearray(length)
        storage = (ctypes.c_char * length).from_buffer(buffer)
        vec = binding.ScsiIovec(ctypes.addressof(storage), length)
        self.done = False
        lib.iscsi_read16_iov_task(ctx, self.lun, offset // self.block_size, length,
                                  self.block_size, 0, 0, 0, 0, 0, self.callback, 1, vec, 1)
        lib.iscsi_service(ctx, select.POLLOUT)
        while not self.done:
            if self.wait == "poll":
                self.poller.poll()
            elif self.wait == "spin":
                while not self.poller.poll(0):
                    pass
            else:
                await trio.lowlevel.wait_readable(self.fd)
            lib.iscsi_service(ctx, select.POLLIN)
        del storage
        if self.status != binding.SCSI_STATUS_GOOD:
            raise OSError(f"floor: SCSI status {self.status:#x}")
        return buffer  # type: ignore[return-value]


def install() -> None:
    original = IscsiDriver.read
    floors: dict[int, Floor] = {}

    async def read(self: Any, offset: int, length: int) -> bytes:
        if length > SMALL:
            return await original(self, offset, length)
        floor = floors.get(id(self))
        if floor is None:
            floor = floors[id(self)] = Floor(self)
        return await floor.read(offset, length)
    IscsiDriver.read = read  # type: ignore[method-assign]
