"""nbd filename and option parsing (doc/uri.md and QEMU's legacy forms), and
the sizes of the wire structs (doc/proto.md)."""
from __future__ import annotations

import pytest
from imgfs.drivers import nbd
from imgfs.drivers.nbd import Address, parse_nbd_filename, resolve_target

from imgfs.block import DATA, ZERO, Status
from imgfs.errors import ImgfsError, Unsupported, UsageError
from imgfs.pipeline import ProtocolError
from imgfs.source import protocol_tree


def inet(host: str, port: str = "10809") -> dict:
    return {"type": "inet", "host": host, "port": port}


@pytest.mark.parametrize("filename, expected", [
    ("nbd://example.com:10810/disk", {"server": inet("example.com", "10810"), "export": "disk"}),
    ("nbd://example.com/disk", {"server": inet("example.com"), "export": "disk"}),
    ("nbd+tcp://10.0.0.1:99/disk", {"server": inet("10.0.0.1", "99"), "export": "disk"}),
    # uri.md's table of export names
    ("nbd://example.com/", {"server": inet("example.com")}),
    ("nbd://example.com", {"server": inet("example.com")}),
    ("nbd://example.com//disk", {"server": inet("example.com"), "export": "/disk"}),
    ("nbd://example.com/hello%20world", {"server": inet("example.com"), "export": "hello world"}),
    ("nbd://[::1]:10811/x", {"server": inet("::1", "10811"), "export": "x"}),
    ("nbd://user@host/x", {"server": inet("host"), "export": "x"}),
    ("nbd+unix:///disk?socket=/run/nbd.sock",
     {"server": {"type": "unix", "path": "/run/nbd.sock"}, "export": "disk"}),
    ("nbd+unix:///?socket=sock", {"server": {"type": "unix", "path": "sock"}}),
    ("nbd+unix:///e?socket=/tmp/a+b%20c.sock",
     {"server": {"type": "unix", "path": "/tmp/a+b c.sock"}, "export": "e"}),
    ("nbd+unix:///?socket=%00/abstract", {"server": {"type": "unix", "path": "\0/abstract"}}),
    # QEMU's legacy forms
    ("nbd:localhost:10809", {"server": inet("localhost")}),
    ("nbd:localhost", {"server": inet("localhost")}),
    ("nbd:192.168.1.2:1234:exportname=vm disk",
     {"server": inet("192.168.1.2", "1234"), "export": "vm disk"}),
    ("nbd:[::1]:1234:exportname=e", {"server": inet("::1", "1234"), "export": "e"}),
    ("nbd:unix:/tmp/nbd.sock", {"server": {"type": "unix", "path": "/tmp/nbd.sock"}}),
    ("nbd:unix:/tmp/nbd.sock:exportname=e",
     {"server": {"type": "unix", "path": "/tmp/nbd.sock"}, "export": "e"}),
])
def test_parse_filename(filename: str, expected: dict) -> None:
    assert parse_nbd_filename(filename) == expected
    tree = protocol_tree(filename)          # what the core makes of it
    assert tree["driver"] == "nbd"
    assert {k: v for k, v in tree.items() if not k.startswith("_") and k != "driver"} == expected


@pytest.mark.parametrize("filename, error", [
    ("nbd://host:99999/x", UsageError),
    ("nbd://host:port/x", UsageError),
    ("nbd:///x", UsageError),                       # no host
    ("nbd://host/x?socket=/s", UsageError),         # socket only for nbd+unix
    ("nbd+unix:///x", UsageError),                  # no socket
    ("nbd+unix://host/x?socket=/s", UsageError),    # a host with a unix socket
    ("nbd+unix:///x?socket=/s&foo=1", UsageError),
    ("nbd+unix:///x?socket=/s&socket=/t", UsageError),
    ("nbd://host/x?tls-type=x509", Unsupported),
    ("nbds://host/x", Unsupported),
    ("nbd:unix:", UsageError),
    ("nbd::10809", UsageError),
    ("nbd:host:0", UsageError),
    ("nbd:[::1", UsageError),
])
def test_parse_filename_errors(filename: str, error: type) -> None:
    with pytest.raises(error) as info:
        parse_nbd_filename(filename)
    assert "\n" not in str(info.value)


def options(**given: object) -> dict:
    """Open options as the schema would produce them."""
    return nbd.NbdDriver.open_opts.parse(given)


@pytest.mark.parametrize("given, address, export", [
    ({"server": {"type": "inet", "host": "h", "port": "1"}, "export": "x"},
     Address("inet", host="h", port=1), "x"),
    ({"server": {"type": "inet", "host": "h", "port": 2}}, Address("inet", host="h", port=2), ""),
    ({"server": {"host": "h"}}, Address("inet", host="h"), ""),
    ({"server": {"type": "unix", "path": "/s"}, "export": "e"}, Address("unix", path="/s"), "e"),
    ({"host": "h", "port": "3"}, Address("inet", host="h", port=3), ""),
    ({"host": "h", "port": 4, "export": "e"}, Address("inet", host="h", port=4), "e"),
    ({"path": "/s"}, Address("unix", path="/s"), ""),
    ({"filename": "nbd://h:5/e"}, Address("inet", host="h", port=5), "e"),
    ({"filename": "nbd://h:5/e", "export": "other"}, Address("inet", host="h", port=5), "other"),
])
def test_resolve_target(given: dict, address: Address, export: str) -> None:
    assert resolve_target(options(**given)) == (address, export)


@pytest.mark.parametrize("given", [
    {},
    {"server": {"type": "inet", "host": "h"}, "host": "h"},
    {"path": "/s", "host": "h"},
    {"server": {"type": "vsock", "cid": "3"}},
    {"server": {"type": "inet"}},
    {"server": {"type": "unix"}},
    {"server": {"type": "inet", "host": "h", "path": "/s"}},
    {"server": "nbd://h/x"},
    {"host": "h", "port": "x"},
    {"path": "/s", "export": "a\0b"},
    {"path": "/s", "export": "e" * 4097},
])
def test_resolve_target_errors(given: dict) -> None:
    with pytest.raises(ImgfsError):
        resolve_target(options(**given))


def test_unknown_option_is_an_error() -> None:
    with pytest.raises(UsageError):
        options(hots="h")


def test_address_uri() -> None:
    assert Address("inet", host="::1", port=7).uri("a b") == "nbd://[::1]:7/a%20b"
    assert Address("unix", path="/s").uri("e") == "nbd+unix:///e?socket=/s"


def test_status_of() -> None:
    assert nbd.status_of(0) == DATA
    assert nbd.status_of(nbd.NBD_STATE_HOLE) == DATA          # contents unknown: read them
    assert nbd.status_of(nbd.NBD_STATE_HOLE | nbd.NBD_STATE_ZERO) == ZERO
    assert nbd.status_of(nbd.NBD_STATE_ZERO) == DATA | Status.ZERO
    assert nbd.status_of(0xFFFFFFF0) == DATA                   # unknown flags ignored


def test_struct_sizes() -> None:
    assert nbd.HELLO.size == 18
    assert nbd.OPTION.size == 16
    assert nbd.OPTION_REPLY.size == 20
    assert nbd.INFO_EXPORT.size == 12
    assert nbd.INFO_BLOCK_SIZE.size == 14
    assert nbd.EXPORT_NAME_REPLY.size == 10
    assert nbd.REQUEST.size == 28
    assert nbd.SIMPLE_REPLY.size == 16
    assert nbd.STRUCTURED_REPLY.size == 20
    assert nbd.OFFSET_HOLE.size == 12
    assert nbd.ERROR_CHUNK.size == 6
    assert nbd.DESCRIPTOR.size == 8


@pytest.mark.parametrize("sizes, size, ok", [
    ((1, 4096, 0xFFFFFFFF), 1 << 20, True),
    ((512, 4096, 32 << 20), 1 << 20, True),
    ((4096, 4096, 65536), 1 << 20, True),
    ((4096, 4096, 4096), 1024, True),         # maximum >= min(preferred, size)
    ((3, 4096, 0xFFFFFFFF), 1 << 20, False),  # minimum not a power of two
    ((1 << 17, 1 << 17, 0xFFFFFFFF), 1 << 20, False),
    ((1, 256, 0xFFFFFFFF), 1 << 20, False),   # preferred below 512
    ((4096, 1024, 0xFFFFFFFF), 1 << 20, False),
    ((4096, 4096, 6000), 1 << 20, False),     # maximum not a multiple of minimum
    ((512, 65536, 4096), 1 << 20, False),     # maximum below preferred
])
def test_block_size_checks(sizes: tuple[int, int, int], size: int, ok: bool) -> None:
    block_sizes = nbd.BlockSizes(*sizes)
    if ok:
        block_sizes.check(size)
    else:
        with pytest.raises(ProtocolError):
            block_sizes.check(size)
