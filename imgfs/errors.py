"""Every error imgfs raises on purpose, each carrying the errno it means.

They are translated in exactly one place each: the CLI prints
``imgfs: WHAT: message`` and exits 1, the FUSE layer answers the request
with ``FUSEError(exc.errno)``.  Drivers raise these, never a bare OSError or
struct.error (the core wraps those at its boundary).
"""
from __future__ import annotations

import errno


class ImgfsError(Exception):
    """Base class: a one-sentence message and the errno it maps to."""

    errno: int = errno.EIO
    #: the CLI's exit status for this error (compare's "error" is 2)
    exit_status: int = 1

    def __init__(self, message: str, *, errno_: int | None = None,
                 path: str | None = None) -> None:
        super().__init__(message)
        if errno_ is not None:
            self.errno = errno_
        #: the file or source the message is about; the CLI prints it first
        self.path = path


class UsageError(ImgfsError):
    """Bad command line or option; the CLI exits 2."""

    errno = errno.EINVAL


class OptionRefused(ImgfsError):
    """An option value or combination the format refuses when creating, as
    qemu-img create refuses it (exit 1; a malformed command line is a
    UsageError, exit 2)."""

    errno = errno.EINVAL


class InvalidImage(ImgfsError):
    """Not this format, or a header field out of range."""

    errno = errno.EINVAL


class CorruptImage(ImgfsError):
    """The format is right but its metadata contradicts itself."""

    errno = errno.EIO


class Unsupported(ImgfsError):
    """Valid, but a feature imgfs does not implement."""

    errno = errno.ENOTSUP


class ReadOnly(ImgfsError):
    errno = errno.EROFS


class NoSpace(ImgfsError):
    errno = errno.ENOSPC


class Unreachable(ImgfsError):
    """A network source that cannot be reached or went away."""

    errno = errno.EIO


class Locked(ImgfsError):
    errno = errno.EAGAIN


class NotFound(ImgfsError):
    errno = errno.ENOENT


class PermissionDenied(ImgfsError):
    errno = errno.EACCES


class OutOfRange(ImgfsError):
    """A request that crosses the end of a node."""

    errno = errno.EINVAL


#: a lost or refused connection (a network library's errno): the file
#: behind it answers EIO, as a disk that stopped answering does
CONNECTION_ERRNOS = frozenset({
    errno.ENOTCONN, errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.EPIPE,
    errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ESHUTDOWN,
})


def from_oserror(exc: OSError, what: str = "") -> ImgfsError:
    """Turn an OSError into the matching ImgfsError, keeping its errno
    (but EIO for a lost connection)."""
    reason = exc.strerror or str(exc)
    message = f"{what}: {reason}" if what else reason
    if exc.errno in CONNECTION_ERRNOS:
        return Unreachable(message)
    cls: type[ImgfsError] = {
        errno.ENOENT: NotFound,
        errno.EACCES: PermissionDenied,
        errno.EPERM: PermissionDenied,
        errno.EROFS: ReadOnly,
        errno.ENOSPC: NoSpace,
    }.get(exc.errno or 0, ImgfsError)
    return cls(message, errno_=exc.errno or errno.EIO)
