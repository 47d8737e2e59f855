"""QEMU-compatible image locking with OFD byte-range locks.

QEMU's file-posix driver expresses each permission of its block layer as a
shared (read) OFD lock on one byte of the image file: byte 100 + bit for a
permission it *holds*, byte 200 + bit for a permission it *refuses to share*.
Another process wanting a permission tests the matching "unshare" byte, and
one refusing to share tests the matching "holds" byte.  Taking the very same
bytes makes imgfs and qemu-img / qemu-io / QEMU / qemu-storage-daemon see
each other's locks in both directions.  (Bits observed with qemu-io 7.2 on
qcow2 read-write: 100, 101, 103 held, 201 and 203 unshared.)
"""
from __future__ import annotations

import enum
import fcntl
import os
import struct

from .errors import Locked

PERM_BASE = 100
SHARED_BASE = 200
# fcntl commands for open-file-description locks (linux/fcntl.h)
F_OFD_GETLK = 36
F_OFD_SETLK = 37
# struct flock on Linux 64-bit: short type, short whence, off_t start, off_t len, pid_t pid
_FLOCK = struct.Struct("hhxxxxqqixxxx")


class Perm(enum.IntFlag):
    """QEMU's BLK_PERM_* bits (their numbers fix the lock byte offsets)."""

    CONSISTENT_READ = 0x01
    WRITE = 0x02
    WRITE_UNCHANGED = 0x04
    RESIZE = 0x08


PERM_ALL = Perm.CONSISTENT_READ | Perm.WRITE | Perm.WRITE_UNCHANGED | Perm.RESIZE
PERM_NAMES = {Perm.CONSISTENT_READ: "consistent read", Perm.WRITE: "write",
              Perm.WRITE_UNCHANGED: "write unchanged", Perm.RESIZE: "resize"}


def wanted_perms(read_only: bool, force_share: bool) -> tuple[Perm, Perm]:
    """(held, shared) permissions for an image opened this way.

    A writer holds read, write and resize and shares neither write nor
    resize (a second writer would corrupt format metadata); a reader holds
    consistent read and refuses writers; ``force_share`` shares everything.
    """
    if read_only:
        held = Perm.CONSISTENT_READ
        shared = PERM_ALL if force_share else PERM_ALL & ~(Perm.WRITE | Perm.RESIZE)
    else:
        held = Perm.CONSISTENT_READ | Perm.WRITE | Perm.RESIZE
        shared = Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED
    return held, shared


def _lock_byte(fd: int, offset: int, lock_type: int) -> None:
    fcntl.fcntl(fd, F_OFD_SETLK, _FLOCK.pack(lock_type, os.SEEK_SET, offset, 1, 0))


def _byte_locked_by_other(fd: int, offset: int) -> bool:
    """True when another open file description holds a lock on the byte."""
    answer = fcntl.fcntl(fd, F_OFD_GETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0))
    return _FLOCK.unpack(answer)[0] != fcntl.F_UNLCK


def apply_locks(fd: int, held: Perm, shared: Perm) -> None:
    """Take QEMU's lock bytes for (held, shared) and check for conflicts.

    Raises `Locked` naming the first conflicting permission; the caller
    closes the descriptor, which drops whatever was taken.
    """
    unshared = PERM_ALL & ~shared
    for perm in Perm:
        bit = perm.bit_length() - 1
        _lock_byte(fd, PERM_BASE + bit, fcntl.F_RDLCK if perm & held else fcntl.F_UNLCK)
        _lock_byte(fd, SHARED_BASE + bit, fcntl.F_RDLCK if perm & unshared else fcntl.F_UNLCK)
    for perm in Perm:
        bit = perm.bit_length() - 1
        if perm & held and _byte_locked_by_other(fd, SHARED_BASE + bit):
            raise Locked(f"image is locked by another process (failed to get "
                         f"\"{PERM_NAMES[perm]}\" lock)")
        if perm & unshared and _byte_locked_by_other(fd, PERM_BASE + bit):
            hint = "use -U to read anyway" if not held & Perm.WRITE else \
                f"another process holds the \"{PERM_NAMES[perm]}\" permission"
            raise Locked(f"image is locked by another process ({hint})")


def release_locks(fd: int) -> None:
    for perm in Perm:
        bit = perm.bit_length() - 1
        _lock_byte(fd, PERM_BASE + bit, fcntl.F_UNLCK)
        _lock_byte(fd, SHARED_BASE + bit, fcntl.F_UNLCK)
