"""A thin ctypes binding of libiscsi (Debian ``libiscsi7``, soname 7).

API: sahlberg/libiscsi ``include/iscsi.h`` and ``include/scsi-lowlevel.h``.
Only what the driver uses is declared: the context and its event-loop
hooks (``iscsi_get_fd`` / ``iscsi_which_events`` / ``iscsi_service``), the
login settings, and the asynchronous ``*_task`` calls, each of which
queues one SCSI command and later calls back from inside
``iscsi_service``.

ctypes, not cffi: it is in the standard library, so the binding costs no
new dependency and no compiler at install time, and libiscsi's API is a
few dozen plain C functions whose ABI (soname 7) is stable.  The one
struct read from Python, ``struct scsi_task``, is declared up to the fields
used; tests/unit/test_iscsi_binding.py compares its offsets with the C
header's.

The library is loaded on first use, so that listing drivers on a machine
without libiscsi does not fail.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any

from imgfs.errors import Unsupported

SONAME = "libiscsi.so.7"

# enum iscsi_header_digest
ISCSI_HEADER_DIGEST_NONE = 0
ISCSI_HEADER_DIGEST_NONE_CRC32C = 1
ISCSI_HEADER_DIGEST_CRC32C_NONE = 2
ISCSI_HEADER_DIGEST_CRC32C = 3

# enum iscsi_session_type
ISCSI_SESSION_NORMAL = 2

# enum iscsi_transport_type
TCP_TRANSPORT = 0

# enum scsi_status
SCSI_STATUS_GOOD = 0
SCSI_STATUS_CHECK_CONDITION = 2
SCSI_STATUS_CANCELLED = 0x0F000000
SCSI_STATUS_ERROR = 0x0F000001
SCSI_STATUS_TIMEOUT = 0x0F000002
#: enum scsi_residual: the target moved less data than the command asked for
SCSI_RESIDUAL_UNDERFLOW = 1

#: SCSI_CDB_MAX_SIZE
CDB_MAX_SIZE = 16


class ScsiSense(ctypes.Structure):
    """struct scsi_sense; its three one-bit fields share the byte at 12."""

    _fields_ = [("error_type", ctypes.c_ubyte), ("key", ctypes.c_int),
                ("ascq", ctypes.c_int), ("bits", ctypes.c_ubyte),
                ("bit_pointer", ctypes.c_ubyte), ("field_pointer", ctypes.c_uint16)]


class ScsiData(ctypes.Structure):
    _fields_ = [("size", ctypes.c_int), ("data", ctypes.c_void_p)]


class ScsiIovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class ScsiTask(ctypes.Structure):
    """struct scsi_task, up to `datain` (the fields after it are not read)."""

    _fields_ = [("status", ctypes.c_int), ("cdb_size", ctypes.c_int),
                ("xfer_dir", ctypes.c_int), ("expxferlen", ctypes.c_int),
                ("cdb", ctypes.c_ubyte * CDB_MAX_SIZE), ("residual_status", ctypes.c_int),
                ("residual", ctypes.c_size_t), ("sense", ScsiSense), ("datain", ScsiData)]


class UnmapList(ctypes.Structure):
    _fields_ = [("lba", ctypes.c_uint64), ("num", ctypes.c_uint32)]


#: void (*iscsi_command_cb)(struct iscsi_context *, int status,
#:                          void *command_data, void *private_data)
COMMAND_CB = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                              ctypes.c_void_p)

_ctx, _task, _int, _uint, _u64, _u32, _str, _ptr = (
    ctypes.c_void_p, ctypes.POINTER(ScsiTask), ctypes.c_int, ctypes.c_uint,
    ctypes.c_uint64, ctypes.c_uint32, ctypes.c_char_p, ctypes.c_void_p)

#: name -> (return type, argument types)
PROTOTYPES: dict[str, tuple[Any, list[Any]]] = {
    "iscsi_create_context": (_ctx, [_str]),
    "iscsi_destroy_context": (_int, [_ctx]),
    "iscsi_get_error": (_str, [_ctx]),
    "iscsi_get_fd": (_int, [_ctx]),
    "iscsi_which_events": (_int, [_ctx]),
    "iscsi_service": (_int, [_ctx, _int]),
    "iscsi_queue_length": (_int, [_ctx]),
    "iscsi_set_targetname": (_int, [_ctx, _str]),
    "iscsi_set_session_type": (_int, [_ctx, _int]),
    "iscsi_set_header_digest": (_int, [_ctx, _int]),
    "iscsi_set_initiator_username_pwd": (_int, [_ctx, _str, _str]),
    "iscsi_set_target_username_pwd": (_int, [_ctx, _str, _str]),
    "iscsi_set_timeout": (_int, [_ctx, _int]),
    "iscsi_set_reconnect_max_retries": (None, [_ctx, _int]),
    "iscsi_set_noautoreconnect": (None, [_ctx, _int]),
    "iscsi_init_transport": (_int, [_ctx, _int]),
    "iscsi_is_logged_in": (_int, [_ctx]),
    "iscsi_full_connect_async": (_int, [_ctx, _str, _int, COMMAND_CB, _ptr]),
    "iscsi_logout_async": (_int, [_ctx, COMMAND_CB, _ptr]),
    "iscsi_scsi_cancel_all_tasks": (None, [_ctx]),
    "iscsi_inquiry_task": (_task, [_ctx, _int, _int, _int, _int, COMMAND_CB, _ptr]),
    "iscsi_readcapacity10_task": (_task, [_ctx, _int, _int, _int, COMMAND_CB, _ptr]),
    "iscsi_readcapacity16_task": (_task, [_ctx, _int, COMMAND_CB, _ptr]),
    "iscsi_modesense6_task": (_task, [_ctx, _int, _int, _int, _int, _int, ctypes.c_ubyte,
                                      COMMAND_CB, _ptr]),
    "iscsi_read10_iov_task": (_task, [_ctx, _int, _u32, _u32, _int, _int, _int, _int, _int,
                                      _int, COMMAND_CB, _ptr, ctypes.POINTER(ScsiIovec), _int]),
    "iscsi_read16_iov_task": (_task, [_ctx, _int, _u64, _u32, _int, _int, _int, _int, _int,
                                      _int, COMMAND_CB, _ptr, ctypes.POINTER(ScsiIovec), _int]),
    "iscsi_write16_iov_task": (_task, [_ctx, _int, _u64, _ptr, _u32, _int, _int, _int, _int,
                                       _int, _int, COMMAND_CB, _ptr,
                                       ctypes.POINTER(ScsiIovec), _int]),
    "iscsi_synchronizecache16_task": (_task, [_ctx, _int, _u64, _u32, _int, _int,
                                              COMMAND_CB, _ptr]),
    "iscsi_unmap_task": (_task, [_ctx, _int, _int, _int, ctypes.POINTER(UnmapList), _int,
                                 COMMAND_CB, _ptr]),
    "iscsi_writesame16_task": (_task, [_ctx, _int, _u64, _ptr, _u32, _u32, _int, _int, _int,
                                       _int, COMMAND_CB, _ptr]),
    "iscsi_get_lba_status_task": (_task, [_ctx, _int, _u64, _u32, COMMAND_CB, _ptr]),
    "scsi_free_scsi_task": (None, [_task]),
}


@functools.cache
def lib() -> Any:
    """The loaded library with every prototype declared; Unsupported when
    libiscsi is not installed."""
    try:
        handle = ctypes.CDLL(SONAME)
    except OSError:
        found = ctypes.util.find_library("iscsi")
        if found is None:
            raise Unsupported("iscsi: libiscsi is not installed (Debian package "
                              "libiscsi7)") from None
        handle = ctypes.CDLL(found)
    for name, (restype, argtypes) in PROTOTYPES.items():
        function = getattr(handle, name)
        function.restype = restype
        function.argtypes = argtypes
    return handle
