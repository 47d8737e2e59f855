"""Pure parts of the core: options, filename forms, names, lock bytes."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imgfs.errors import UsageError
from imgfs.info import human_size
from imgfs.locking import Perm, wanted_perms
from imgfs.mount import export_names, parse_mount_options
from imgfs.options import (
    Opt,
    Schema,
    Size,
    merge_trees,
    nest_dotted,
    parse_size,
    power_of_two,
    split_opt_string,
)
from imgfs.source import export_name, parse_source, protocol_tree


@pytest.mark.parametrize("text, value", [
    ("0", 0), ("512", 512), ("1k", 1024), ("1K", 1024), ("64M", 64 << 20), ("1G", 1 << 30),
    ("2T", 2 << 40), ("1.5G", 3 << 29), ("10b", 10), ("4KiB", 4096),
])
def test_sizes_as_qemu_img_reads_them(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "-1", "1Q", "abc", "1.3k", "99999999999999999999T"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(UsageError):
        parse_size(text)


@given(st.integers(min_value=0, max_value=2 ** 50))
def test_size_round_trip(value: int) -> None:
    assert parse_size(str(value)) == value


@pytest.mark.parametrize("value, text", [
    (0, "0 B"), (512, "512 B"), (999, "999 B"), (1000, "0.977 KiB"), (1024, "1 KiB"),
    (1032192, "0.984 MiB"), (1024000, "0.977 MiB"), (1048576, "1 MiB"),
    (5000000000, "4.66 GiB"),
])
def test_human_sizes_as_qemu_img_prints_them(value: int, text: str) -> None:
    """(qemu-img info's "virtual size", e.g. of a 0.984 MiB Bochs image)"""
    assert human_size(value) == text


def test_rw_from_mount8_is_a_default_not_a_demand() -> None:
    """mount.imgfs: mount(8) passes rw unless ro was asked for."""
    assert parse_mount_options(["rw"]).read_only is False
    assert parse_mount_options(["rw,allow_other"], rw_is_default=True).read_only is None
    assert parse_mount_options(["ro"], rw_is_default=True).read_only is True


def test_option_strings_as_qemu() -> None:
    assert split_opt_string("a=1,b=x,,y,flag") == {"a": "1", "b": "x,y", "flag": "on"}
    assert split_opt_string("a=1,a=2") == {"a": "2"}


def test_schema_checks_and_defaults() -> None:
    schema = Schema(Opt("cluster_size", Size, default=65536, check=power_of_two(512, 2 << 20)),
                    Opt("name"))
    assert schema.parse({}) == {"cluster_size": 65536, "name": None}
    assert schema.parse({"cluster_size": "4k"})["cluster_size"] == 4096
    with pytest.raises(UsageError, match="power of two"):
        schema.parse({"cluster_size": "3k"})
    with pytest.raises(UsageError, match="unknown option 'nme'"):
        schema.parse({"nme": "x"})
    assert "cluster_size=<size>" in schema.help_text("qcow2")


def test_dotted_options_nest() -> None:
    assert nest_dotted({"file.locking": "off", "offset": "1"}) == \
        {"file": {"locking": "off"}, "offset": "1"}
    tree = merge_trees({"file": "disk.img"}, nest_dotted({"file.locking": "off"}))
    assert tree == {"file": {"filename": "disk.img", "locking": "off"}}


def test_filename_forms() -> None:
    assert parse_source("/a/b.img") == {"file": {"filename": "/a/b.img"}}
    assert parse_source("file:/a/b:c.img") == {"file": {"driver": "file",
                                                        "filename": "/a/b:c.img"}}
    tree = parse_source('json:{"driver": "raw", "file.filename": "/x", "offset": 512}')
    assert tree == {"driver": "raw", "file": {"filename": "/x"}, "offset": 512}
    assert protocol_tree("nbd://localhost/vm")["driver"] == "nbd"
    with pytest.raises(UsageError):
        parse_source("json:[1]")


@pytest.mark.parametrize("source, name", [
    ("/var/lib/img/vm.qcow2", "vm"), ("disk.img", "disk"), ("noext", "noext"),
    ("nbd://host:10809/export1", "export1"), ("fat:rw:/srv/share", "share"),
    ("fat:floppy:12:/srv/share/", "share"),
    # no export name: the server (host_port) or the socket names the file
    ("nbd://host:10809", "host_10809"), ("nbd:host:10809", "host_10809"),
    ("nbd+unix:///?socket=/run/nbd.sock", "nbd"), ("nbd:unix:/run/nbd.sock", "nbd"),
    ("nbd+unix:///exp?socket=/run/nbd.sock", "exp"),
    ("nbd:unix:/run/nbd.sock:exportname=exp", "exp"),
    ('json:{"driver":"qcow2","file":{"driver":"file","filename":"/x/y.qcow2"}}', "y"),
])
def test_export_names(source: str, name: str) -> None:
    assert export_name(source) == name


@pytest.mark.parametrize("source, absolute", [
    ("vm.qcow2", "{cwd}/vm.qcow2"),
    ("file:sub/vm.qcow2", "file:{cwd}/sub/vm.qcow2"),
    ("fat:rw:16:share", "fat:rw:16:{cwd}/share"),
    ("fat:/srv/a:b", "fat:/srv/a:b"),
    ("nbd://host/export", "nbd://host/export"),
    ('json:{"driver":"raw"}', 'json:{"driver":"raw"}'),
])
def test_sources_made_absolute_by_their_drivers(source: str, absolute: str,
                                                 tmp_path, monkeypatch) -> None:
    from imgfs.source import absolute_source
    monkeypatch.chdir(tmp_path)
    assert absolute_source(source) == absolute.replace("{cwd}", str(tmp_path))


def test_duplicate_and_custom_names() -> None:
    opts = parse_mount_options([])
    with pytest.raises(UsageError, match="both appear"):
        export_names(["/a/vm.qcow2", "/b/vm.img"], opts)
    assert export_names(["/a/x.img"], parse_mount_options(["name=disk"])) == ["disk.raw"]
    with pytest.raises(UsageError):
        export_names(["/a", "/b"], parse_mount_options(["name=disk"]))


def test_mount_options() -> None:
    opts = parse_mount_options(["ro,format=qcow2", "locking=off,noatime,offset=1M"])
    assert opts.read_only and opts.fmt == "qcow2" and opts.locking == "off"
    assert opts.kernel_flags == ["noatime"] and opts.driver_options == {"offset": "1M"}
    with pytest.raises(UsageError):
        parse_mount_options(["cache=fast"])
    with pytest.raises(UsageError):
        parse_mount_options(["rw,force-share"])


def test_lock_bytes_follow_qemu() -> None:
    held, shared = wanted_perms(read_only=False, force_share=False)
    assert held == Perm.CONSISTENT_READ | Perm.WRITE | Perm.RESIZE
    assert not shared & Perm.WRITE and not shared & Perm.RESIZE
    held, shared = wanted_perms(read_only=True, force_share=True)
    assert held == Perm.CONSISTENT_READ and shared & Perm.WRITE
