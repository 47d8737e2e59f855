"""The rbd driver against a real one-node Ceph cluster on loopback (started
here, stopped by PID), checked against `rbd export` and QEMU's own rbd
driver.  Mounts are real FUSE mounts."""
from __future__ import annotations

import base64
import errno
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ceph import POOL, CephCluster
from tests.conftest import (
    daemon_pids,
    imgfs,
    is_mounted,
    mounted,
    need,
    need_root,
    pread_errno,
    pwrite_all,
    random_bytes,
    run,
)

MiB = 1 << 20


@pytest.fixture(scope="module")
def ceph(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CephCluster]:
    need("ceph-mon", "ceph-osd", "ceph-mgr", "rbd", "qemu-img")
    need_root()
    cluster = CephCluster(tmp_path_factory.mktemp("ceph"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def _import(ceph: CephCluster, tmp_path: Path, name: str, data: bytes) -> None:
    source = tmp_path / f"{name}.src"
    source.write_bytes(data)
    ceph.rbd("import", str(source), f"{POOL}/{name}")


def _export(ceph: CephCluster, tmp_path: Path, name: str) -> bytes:
    out = tmp_path / f"{name}.out"
    out.unlink(missing_ok=True)
    ceph.rbd("export", f"{POOL}/{name}", str(out))
    return out.read_bytes()


def test_raw_image_read_and_written_through_a_mount(ceph: CephCluster, mnt: Path,
                                                    tmp_path: Path) -> None:
    expected = bytearray(random_bytes(12 * MiB))
    _import(ceph, tmp_path, "disk", bytes(expected))
    with mounted(ceph.url("disk"), mountpoint=mnt):
        raw = mnt / "disk.raw"
        assert raw.stat().st_size == 12 * MiB
        assert raw.read_bytes() == expected
        pwrite_all(raw, [(7, b"abc"), (4 * MiB - 5, random_bytes(5 * MiB + 11, seed=2)),
                         (12 * MiB - 4096, b"\xee" * 4096)], expected)
    assert _export(ceph, tmp_path, "disk") == expected
    out = tmp_path / "qemu.raw"
    run("qemu-img", "convert", "-O", "raw", ceph.url("disk"), out)
    assert out.read_bytes() == expected


def test_fsynced_writes_reach_the_cluster_while_mounted(ceph: CephCluster, mnt: Path,
                                                       tmp_path: Path) -> None:
    """librbd's cache is write-back from the first write (imgfs passes every
    fsync on as a flush, so it does not wait for one): what was fsynced is in
    the cluster for another client at once, the mount still up."""
    expected = bytearray(4 * MiB)
    _import(ceph, tmp_path, "wb", bytes(expected))
    with mounted(ceph.url("wb"), mountpoint=mnt):
        fd = os.open(mnt / "wb.raw", os.O_WRONLY)
        try:
            for number, offset in enumerate((MiB, 3 * MiB - 7)):
                data = random_bytes(MiB // 2, seed=40 + number)
                os.pwrite(fd, data, offset)
                expected[offset:offset + len(data)] = data
                os.fsync(fd)
                assert _export(ceph, tmp_path, "wb") == expected
        finally:
            os.close(fd)


def test_qcow2_created_on_rbd_and_written_through_a_mount(ceph: CephCluster, mnt: Path,
                                                          tmp_path: Path) -> None:
    url = ceph.url("vm")
    imgfs("create", "-f", "qcow2", url, "16M")
    expected = bytearray(16 * MiB)
    with mounted(url, mountpoint=mnt):
        pwrite_all(mnt / "vm.raw", [(4095, b"\x01" * 9000), (9 * MiB, b"\x02" * 70000)],
                   expected)
    run("qemu-img", "check", "-q", url)
    out = tmp_path / "vm.raw"
    run("qemu-img", "convert", "-O", "raw", url, out)
    assert out.read_bytes() == expected
    info = json.loads(imgfs("info", "--output", "json", url).stdout)
    assert info["format"] == "qcow2" and info["virtual-size"] == 16 * MiB


def test_snapshot_opens_read_only_and_resize(ceph: CephCluster, mnt: Path,
                                            tmp_path: Path) -> None:
    before = random_bytes(4 * MiB, seed=3)
    _import(ceph, tmp_path, "snapped", before)
    ceph.rbd("snap", "create", f"{POOL}/snapped@s1")
    with mounted(ceph.url("snapped"), mountpoint=mnt):
        pwrite_all(mnt / "snapped.raw", [(0, b"\xff" * MiB)])
    with mounted(ceph.url("snapped", "s1"), mountpoint=mnt):
        assert (mnt / "snapped@s1.raw").read_bytes() == before
    with mounted(ceph.url("snapped"), mountpoint=mnt, options="snapshots"):
        assert sorted(os.listdir(mnt)) == ["snapped.raw", "snapped@s1.raw"]
        assert (mnt / "snapped@s1.raw").read_bytes() == before
        assert (mnt / "snapped.raw").read_bytes()[:MiB] == b"\xff" * MiB
        with pytest.raises(OSError) as refused_write:
            open(mnt / "snapped@s1.raw", "r+b").close()
        assert refused_write.value.errno in (errno.EROFS, errno.EACCES)
    refused = imgfs("mount", "-o", "rw", ceph.url("snapped", "s1"), mnt, check=False)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1
    assert not is_mounted(mnt)
    imgfs("resize", "-f", "raw", ceph.url("snapped"), "+4M")
    assert json.loads(ceph.rbd("info", "--format", "json", f"{POOL}/snapped").stdout)[
        "size"] == 8 * MiB


def test_snapshot_list_as_qemu_img(ceph: CephCluster, tmp_path: Path) -> None:
    """An RBD image's snapshots are its protocol's (raw on top): imgfs
    snapshot -l lists them as qemu-img does."""
    _import(ceph, tmp_path, "listed", random_bytes(MiB, seed=4))
    assert imgfs("snapshot", "-l", ceph.url("listed")).stdout == ""
    ceph.rbd("snap", "create", f"{POOL}/listed@first")
    theirs = run("qemu-img", "snapshot", "-l", ceph.url("listed")).stdout.splitlines()
    ours = imgfs("snapshot", "-l", ceph.url("listed")).stdout.splitlines()
    assert ours[:2] == theirs[:2] and len(ours) == len(theirs) == 3
    assert ours[2].split()[:2] == theirs[2].split()[:2]


@pytest.mark.parametrize("suffix, message", [
    ("rbd:rbd/nosuch:conf=CONF", "no image rbd:rbd/nosuch"),
    ("rbd:nopool/x:conf=CONF", "no pool 'nopool'"),
    ("rbd:rbd/x:conf=CONF:mon_host=127.0.0.1\\:9", "cannot reach the cluster"),
])
def test_refusals_are_one_line_and_quick(ceph: CephCluster, mnt: Path, suffix: str,
                                         message: str) -> None:
    source = suffix.replace("CONF", str(ceph.conf))
    started = time.monotonic()
    result = imgfs("mount", source, mnt, check=False)
    assert time.monotonic() - started < 10
    assert result.returncode == 1
    assert result.stderr.startswith(f"imgfs: {source}: ")
    assert message in result.stderr and result.stderr.count("\n") == 1
    assert not is_mounted(mnt)


def test_a_cluster_that_stops_answering_gives_eio_not_a_hang(ceph: CephCluster, mnt: Path,
                                                             tmp_path: Path) -> None:
    data = random_bytes(4 * MiB, seed=4)
    _import(ceph, tmp_path, "stall", data)
    osd = next(p for p in ceph.processes if p.args[0] == "ceph-osd")
    with mounted(ceph.url("stall"), mountpoint=mnt, options="file.timeout=3"):
        raw = mnt / "stall.raw"
        assert raw.read_bytes()[:4096] == data[:4096]
        os.kill(osd.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            assert pread_errno(raw, 2 * MiB, 4096, direct=True) == errno.EIO
            assert time.monotonic() - started < 10
        finally:
            os.kill(osd.pid, signal.SIGCONT)
        assert raw.read_bytes() == data


def test_a_killed_osd_gives_eio_and_the_restarted_one_serves(ceph: CephCluster, mnt: Path,
                                                             tmp_path: Path) -> None:
    """The OSD killed (SIGKILL) under a mount: reads fail with EIO within
    the timeout, the mount stays up; once the OSD is started again, the
    same mount reads and writes again, and unmounts cleanly."""
    data = bytearray(random_bytes(4 * MiB, seed=6))
    _import(ceph, tmp_path, "crash", bytes(data))
    with mounted(ceph.url("crash"), mountpoint=mnt, options="file.timeout=3"):
        raw = mnt / "crash.raw"
        assert raw.read_bytes()[:4096] == data[:4096]
        restart = ceph.kill_osd()
        try:
            started = time.monotonic()
            assert pread_errno(raw, 2 * MiB, 4096, direct=True) == errno.EIO
            assert time.monotonic() - started < 10
        finally:
            ceph.start_daemon(restart)
        deadline = time.monotonic() + 60
        while (error := pread_errno(raw, 3 * MiB, 4096, direct=True)):
            assert error == errno.EIO and time.monotonic() < deadline, error
            time.sleep(0.5)
        pwrite_all(raw, [(MiB + 3, b"after the restart")], data)
        assert raw.read_bytes() == bytes(data)
    assert not daemon_pids(mnt)
    assert bytes(data) == _export(ceph, tmp_path, "crash")


def test_a_user_key_from_a_secret_as_qemu(ceph: CephCluster, tmp_path: Path) -> None:
    """cephx with a user whose key is in no keyring: the key comes from a
    secret (key-secret) holding its bytes (format=base64 takes the key as
    Ceph prints it), as QEMU's; a wrong key is one line without it."""
    data = random_bytes(MiB + 512, seed=8)
    _import(ceph, tmp_path, "keyed", data)
    ceph.ceph("auth", "get-or-create", "client.keyuser", "mon", "profile rbd",
              "osd", f"profile rbd pool={POOL}")
    key = ceph.ceph("auth", "get-key", "client.keyuser").strip()
    tree = f"driver=rbd,pool={POOL},image=keyed,conf={ceph.conf},user=keyuser,key-secret=k"
    spec = "json:" + json.dumps(dict(item.split("=", 1) for item in tree.split(",")))
    ours, theirs = tmp_path / "ours.raw", tmp_path / "qemu.raw"
    secret = f"secret,id=k,data={key},format=base64"
    imgfs("convert", "--object", secret, spec, "-O", "raw", ours)
    run("qemu-img", "convert", "--object", secret, "--image-opts", tree, "-O", "raw", theirs)
    assert ours.read_bytes() == data == theirs.read_bytes()
    raw_key = bytearray(base64.b64decode(key))
    raw_key[-4:] = bytes(byte ^ 0xFF for byte in raw_key[-4:])     # the secret's last bytes
    wrong = base64.b64encode(raw_key).decode()
    started = time.monotonic()
    result = imgfs("info", "--object", f"secret,id=k,data={wrong},format=base64", spec, check=False)
    assert time.monotonic() - started < 10
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert wrong not in result.stderr and key not in result.stderr
