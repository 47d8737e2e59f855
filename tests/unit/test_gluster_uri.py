"""gluster:// URIs and the json: server list, as QEMU spells them."""
from __future__ import annotations

import pytest
from imgfs.drivers.gluster.uri import Server, parse_gluster_filename, parse_servers

from imgfs.errors import UsageError
from imgfs.source import export_name, parse_source


@pytest.mark.parametrize("uri, volume, path, server", [
    ("gluster://h/vol/dir/a.qcow2", "vol", "dir/a.qcow2",
     {"type": "tcp", "host": "h", "port": "24007"}),
    ("gluster+tcp://h:24010/vol/a.img", "vol", "a.img",
     {"type": "tcp", "host": "h", "port": "24010"}),
    ("gluster://[::1]/vol/a.img", "vol", "a.img", {"type": "tcp", "host": "::1", "port": "24007"}),
    ("gluster:///vol/a.img", "vol", "a.img", {"type": "tcp", "host": "localhost", "port": "24007"}),
    ("gluster+unix:///vol/a.img?socket=/run/g.sock", "vol", "a.img",
     {"type": "unix", "socket": "/run/g.sock"}),
    ("gluster+rdma://h/vol/a%20b.img", "vol", "a b.img",
     {"type": "tcp", "host": "h", "port": "24007"}),
])
def test_uris(uri: str, volume: str, path: str, server: dict[str, str]) -> None:
    assert parse_gluster_filename(uri) == {"volume": volume, "path": path, "server": [server]}


@pytest.mark.parametrize("uri", [
    "gluster://h/vol", "gluster://h/", "gluster://h/vol/a?socket=/x",
    "gluster+unix://h/vol/a?socket=/x", "gluster+unix:///vol/a", "gluster+unix:///vol/a?x=1",
    "gluster://h:99999/vol/a", "gluster://h:0/vol/a",
])
def test_bad_uris(uri: str) -> None:
    with pytest.raises(UsageError):
        parse_servers(parse_gluster_filename(uri)["server"])


def test_servers_in_order_in_both_spellings() -> None:
    as_list = [{"type": "tcp", "host": "a", "port": 24009}, {"type": "unix", "socket": "/s"}]
    flat = {"1": {"type": "unix", "socket": "/s"}, "0": {"type": "inet", "host": "a",
                                                        "port": "24009"}}
    expected = (Server("tcp", "a", 24009), Server("unix", "/s"))
    assert parse_servers(as_list) == parse_servers(flat) == expected
    for bad in ([], [{"type": "tcp"}], [{"type": "rdma", "host": "a"}],
                [{"type": "unix", "socket": "/s", "host": "a"}], "a", [3]):
        with pytest.raises(UsageError):
            parse_servers(bad)


def test_the_mount_names_the_file_after_the_image_path() -> None:
    assert export_name("gluster://h/vol/dir/vm.qcow2") == "vm"
    assert export_name("gluster+unix:///vol/vm.img?socket=/run/g.sock") == "vm"
    tree = parse_source("gluster://h/vol/vm.qcow2")
    assert tree["file"]["driver"] == "gluster" and tree["file"]["volume"] == "vol"
