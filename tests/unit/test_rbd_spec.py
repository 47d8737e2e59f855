"""rbd: filenames and the json: monitor list, as QEMU spells them."""
from __future__ import annotations

import pytest
from imgfs.drivers.rbd.spec import Monitor, parse_monitors, parse_rbd_filename

from imgfs.errors import UsageError
from imgfs.source import export_name


@pytest.mark.parametrize("filename, options", [
    ("rbd:pool/img", {"pool": "pool", "image": "img"}),
    ("rbd:pool/ns/img@snap", {"pool": "pool", "namespace": "ns", "image": "img",
                              "snapshot": "snap"}),
    ("rbd:p/i:conf=/etc/ceph/c.conf:id=alice", {"pool": "p", "image": "i",
                                                "conf": "/etc/ceph/c.conf", "user": "alice"}),
    ("rbd:p/i:mon_host=10.0.0.1\\:6789\\;10.0.0.2:rbd_cache=false",
     {"pool": "p", "image": "i",
      "ceph": {"mon_host": "10.0.0.1:6789;10.0.0.2", "rbd_cache": "false"}}),
    ("rbd:p/a\\@b", {"pool": "p", "image": "a@b"}),
])
def test_filenames(filename: str, options: dict[str, object]) -> None:
    assert parse_rbd_filename(filename) == options


@pytest.mark.parametrize("filename", [
    "rbd:pool", "rbd:/img", "rbd:p/a/b/c", "rbd:p/i@a@b", "rbd:p/i:novalue",
    "rbd:p/i:key=AQB...", "rbd:p/i\\",
])
def test_bad_filenames(filename: str) -> None:
    with pytest.raises(UsageError):
        parse_rbd_filename(filename)


def test_monitors_in_both_spellings() -> None:
    expected = (Monitor("a", 6789), Monitor("::1"))
    assert parse_monitors([{"host": "a", "port": "6789"}, {"host": "::1"}]) == expected
    assert parse_monitors({"1": {"host": "::1"}, "0": {"host": "a", "port": 6789}}) == expected
    assert [m.address() for m in expected] == ["a:6789", "[::1]"]
    for bad in ([], [{"port": 1}], [{"host": "a", "user": "x"}], "a"):
        with pytest.raises(UsageError):
            parse_monitors(bad)


def test_the_mount_names_the_file_after_the_image() -> None:
    assert export_name("rbd:pool/vm:conf=/etc/ceph/ceph.conf") == "vm"
    assert export_name("rbd:pool/ns/vm@before") == "vm@before"
