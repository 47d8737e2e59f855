"""The gluster driver against a real glusterd with a one-brick volume on
loopback (started here, stopped by PID), checked against the brick file
itself (on one brick it is the plain file) and against QEMU's gluster
driver.  Mounts are real FUSE mounts."""
from __future__ import annotations

import errno
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

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
from tests.glusterd import HOST, PORT, GlusterServer, port_free

MiB = 1 << 20


@pytest.fixture(scope="module")
def gluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GlusterServer]:
    need("glusterd", "gluster", "qemu-img")
    need_root()
    if not port_free():
        pytest.fail(f"{HOST}:{PORT} is taken (another glusterd?)")
    server = GlusterServer(tmp_path_factory.mktemp("gluster"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


def test_raw_image_read_and_written_through_a_mount(gluster: GlusterServer, mnt: Path) -> None:
    image = gluster.brick / "disk.img"
    expected = bytearray(random_bytes(8 * MiB))
    image.write_bytes(expected)
    with mounted(gluster.url("disk.img"), mountpoint=mnt):
        raw = mnt / "disk.raw"
        assert raw.stat().st_size == 8 * MiB
        assert raw.read_bytes() == expected
        writes = [(5, b"x" * 3), (MiB - 7, random_bytes(2 * MiB + 9, seed=2)),
                  (8 * MiB - 512, b"\xee" * 512)]
        pwrite_all(raw, writes, expected)
        # after fsync the brick holds the bytes
        assert image.read_bytes() == expected
        assert raw.read_bytes() == expected


def test_qcow2_written_by_qemu_io_reads_as_qemu_reads_it(gluster: GlusterServer, mnt: Path,
                                                         tmp_path: Path) -> None:
    need("qemu-io")
    image = gluster.brick / "vm.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", image, "16M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 7 100k 300k", "-c", "write -z 1M 64k",
        "-c", "write -P 9 5000k 3k", image)
    out = tmp_path / "out.raw"
    run("qemu-img", "convert", "-O", "raw", image, out)
    expected = bytearray(out.read_bytes())
    with mounted(gluster.url("vm.qcow2"), mountpoint=mnt):
        raw = mnt / "vm.raw"
        assert raw.read_bytes() == expected
        pwrite_all(raw, [(4095, b"\x01" * 9000), (12 * MiB, b"\x02" * 70000)], expected)
    run("qemu-img", "check", "-q", image)
    run("qemu-img", "convert", "-O", "raw", image, out)
    assert out.read_bytes() == expected
    # QEMU's own gluster driver reads the same through the volume
    run("qemu-img", "convert", "-O", "raw", gluster.url("vm.qcow2"), out, timeout=60)
    assert out.read_bytes() == expected


def test_create_convert_resize_and_info_over_the_volume(gluster: GlusterServer,
                                                       tmp_path: Path) -> None:
    url = gluster.url("made.qcow2")
    imgfs("create", "-f", "qcow2", url, "32M")
    run("qemu-img", "check", "-q", gluster.brick / "made.qcow2")
    info = json.loads(imgfs("info", "--output", "json", url).stdout)
    assert info["format"] == "qcow2" and info["virtual-size"] == 32 * MiB
    source = tmp_path / "src.raw"
    source.write_bytes(random_bytes(3 * MiB, seed=5))
    imgfs("convert", "-O", "qcow2", source, gluster.url("conv.qcow2"))
    run("qemu-img", "compare", "-q", source, gluster.brick / "conv.qcow2")
    imgfs("create", "-f", "raw", gluster.url("grow.raw"), "1M")
    imgfs("resize", "-f", "raw", gluster.url("grow.raw"), "+3M")
    assert (gluster.brick / "grow.raw").stat().st_size == 4 * MiB


def test_unix_socket_and_server_list_tried_in_order(gluster: GlusterServer) -> None:
    """(libgfapi moves on to the next server only within one transport.)"""
    (gluster.brick / "s.img").write_bytes(random_bytes(MiB, seed=3))
    unix = f"gluster+unix:///{gluster.volume}/s.img?socket={gluster.socket}"
    assert json.loads(imgfs("info", "--output", "json", unix).stdout)["virtual-size"] == MiB
    tree = {"driver": "raw", "file": {
        "driver": "gluster", "volume": gluster.volume, "path": "/s.img",
        "server": [{"type": "tcp", "host": HOST, "port": "24099"},
                   {"type": "tcp", "host": HOST, "port": str(PORT)}]}}
    info = json.loads(imgfs("info", "--output", "json", "json:" + json.dumps(tree)).stdout)
    assert info["virtual-size"] == MiB


@pytest.mark.parametrize("url, message", [
    ("gluster://127.0.0.2:24099/VOL/a.img", "cannot reach the volume's server"),
    ("gluster://127.0.0.2/nosuchvolume/a.img", "no volume 'nosuchvolume' on the server"),
    ("gluster://127.0.0.2/VOL/missing.img", "no file '/missing.img' on volume"),
])
def test_refusals_are_one_line_and_quick(gluster: GlusterServer, mnt: Path, url: str,
                                         message: str) -> None:
    url = url.replace("VOL", gluster.volume)
    started = time.monotonic()
    result = imgfs("mount", url, mnt, check=False)
    assert time.monotonic() - started < 10
    assert result.returncode == 1
    assert result.stderr.startswith(f"imgfs: {url}: ")
    assert message in result.stderr and result.stderr.count("\n") == 1
    assert not is_mounted(mnt)


def test_a_volume_that_stops_answering_gives_eio_not_a_hang(gluster: GlusterServer,
                                                            mnt: Path) -> None:
    image = gluster.brick / "stall.img"
    image.write_bytes(random_bytes(4 * MiB, seed=4))
    with mounted(gluster.url("stall.img"), mountpoint=mnt, options="file.timeout=2"):
        raw = mnt / "stall.raw"
        assert raw.read_bytes()[:4096] == image.read_bytes()[:4096]
        bricks = gluster.brick_pids()
        assert bricks
        for pid in bricks:
            os.kill(pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            assert pread_errno(raw, 2 * MiB, 4096, direct=True) == errno.EIO
            assert time.monotonic() - started < 10
        finally:
            for pid in bricks:
                os.kill(pid, signal.SIGCONT)
        # the mount stayed up and serves again
        assert raw.read_bytes() == image.read_bytes()
    assert not daemon_pids(mnt)


def test_a_killed_brick_gives_eio_and_the_restarted_one_serves(gluster: GlusterServer,
                                                              mnt: Path) -> None:
    """The brick daemon killed (SIGKILL) under a mount: reads fail with EIO
    within the timeout, the mount stays up; once glusterd restarts the
    brick, the same mount reads (and writes) again, and unmounts cleanly."""
    image = gluster.brick / "killed.img"
    image.write_bytes(random_bytes(4 * MiB, seed=5))
    with mounted(gluster.url("killed.img"), mountpoint=mnt, options="file.timeout=3"):
        raw = mnt / "killed.raw"
        assert raw.read_bytes()[:4096] == image.read_bytes()[:4096]
        bricks = gluster.brick_pids()
        assert bricks
        try:
            for pid in bricks:
                os.kill(pid, signal.SIGKILL)
            started = time.monotonic()
            assert pread_errno(raw, 3 * MiB, 4096, direct=True) == errno.EIO
            assert time.monotonic() - started < 10
        finally:
            # (the killed brick stays a zombie where PID 1 reaps nothing, and
            # glusterd takes it for running: stop the volume, then start it)
            gluster.cli("volume", "stop", gluster.volume, "force")
            gluster.cli("volume", "start", gluster.volume)
        assert gluster.brick_pids(), "glusterd did not restart the brick"
        deadline = time.monotonic() + 60
        while (error := pread_errno(raw, 3 * MiB, 4096, direct=True)):
            assert time.monotonic() < deadline, f"the mount never reconnected: {error}"
            time.sleep(0.5)
        pwrite_all(raw, [(MiB + 7, b"after the restart")])
        expected = bytearray(image.read_bytes())
        assert raw.read_bytes() == bytes(expected)
        assert expected[MiB + 7:MiB + 24] == b"after the restart"
    assert not daemon_pids(mnt)



def test_unmount_does_not_wait_for_the_library_shutdown(gluster: GlusterServer,
                                                        mnt: Path) -> None:
    (gluster.brick / "quick.img").write_bytes(bytes(MiB))
    imgfs("mount", gluster.url("quick.img"), mnt)
    started = time.monotonic()
    run("umount", mnt)
    while daemon_pids(mnt):
        time.sleep(0.05)
        assert time.monotonic() - started < 5, "the daemon waits for glfs_fini"

