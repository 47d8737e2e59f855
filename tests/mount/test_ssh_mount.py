"""Images on a real sshd (tests/sshd.py), mounted for real: read against
QEMU's ssh driver over the same URL and the file on disk, written through
the mount, and the server killed under a mounted image."""
from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import (
    imgfs,
    is_mounted,
    mounted,
    need,
    pids_whose_argv,
    pwrite_all,
    qemu_raw,
    random_bytes,
    run,
    unmount,
)
from tests.sshd import Sshd, start_sshd

MiB = 1 << 20


@pytest.fixture
def sshd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Sshd]:
    yield from start_sshd(tmp_path, monkeypatch)


def qemu_over_ssh(url: str, out: Path, fmt: str) -> bytes:
    """What QEMU's own ssh driver reads at `url` (same agent, same server)."""
    need("qemu-img")
    run("qemu-img", "convert", "-f", fmt, "-O", "raw", url, out)
    return out.read_bytes()


def ssh_clients(port: int) -> list[int]:
    """ssh client processes connected to the test server's port."""
    return pids_whose_argv(lambda argv: argv[:1] == [b"ssh"] and str(port).encode() in argv)


def test_raw_over_ssh_read_and_written(sshd: Sshd, tmp_path: Path, mnt: Path) -> None:
    image = tmp_path / "disk.raw"
    data = random_bytes(8 * MiB, seed=3)
    image.write_bytes(data)
    url = sshd.url(image)
    expected = bytearray(qemu_over_ssh(url, tmp_path / "qemu.raw", "raw"))
    assert expected == data
    with mounted(url, mountpoint=mnt, options="file.timeout=30"):
        assert os.listdir(mnt) == ["disk.raw"]
        assert (mnt / "disk.raw").read_bytes() == expected
        pwrite_all(mnt / "disk.raw", [(7 * MiB + 5, b"tail" * 5000), (0, b"head" * 128),
                                      (3 * MiB - 100, os.urandom(2 * MiB))], expected)
        assert (mnt / "disk.raw").read_bytes() == expected
    assert image.read_bytes() == expected
    assert not ssh_clients(sshd.port)            # the daemon reaped its ssh before exiting


def test_qcow2_over_ssh_probed_read_and_written(sshd: Sshd, tmp_path: Path, mnt: Path) -> None:
    need("qemu-img", "qemu-io")
    image = tmp_path / "guest.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=65536", image, "32M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x55 3M 100k", "-c", "write -P 0xaa 4096 64k",
        "-c", "write -z 1M 64k", "-c", "write -P 0x11 20000000 5000", image)
    url = sshd.url(image)
    expected = bytearray(qemu_over_ssh(url, tmp_path / "qemu.raw", "qcow2"))
    assert expected == qemu_raw(image, tmp_path / "local.raw", "qcow2")
    with mounted(url, mountpoint=mnt):
        assert os.listdir(mnt) == ["guest.raw"]
        assert (mnt / "guest.raw").read_bytes() == expected
        pwrite_all(mnt / "guest.raw", [(9 * MiB + 3, b"x" * 300_000), (100, b"y" * 10)],
                   expected)
    run("qemu-img", "check", image)
    assert qemu_raw(image, tmp_path / "after.raw", "qcow2") == expected


def test_server_killed_mid_read_gives_eio_and_unmounts_cleanly(sshd: Sshd, tmp_path: Path,
                                                               mnt: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(random_bytes(4 * MiB, seed=5))
    local = tmp_path / "local.img"
    local.write_bytes(b"L" * MiB)
    imgfs("mount", sshd.url(image), local, mnt, timeout=60)
    try:
        fd = os.open(mnt / "disk.raw", os.O_RDONLY | os.O_DIRECT)
        errors: list[int | None] = []

        def read_on() -> None:
            """Read the whole image over and over until a read fails."""
            try:
                while True:
                    for offset in range(0, 4 * MiB, MiB):
                        os.pread(fd, MiB, offset)
            except OSError as exc:
                errors.append(exc.errno)
        reader = threading.Thread(target=read_on)
        try:
            assert len(os.pread(fd, 4096, 0)) == 4096
            reader.start()
            time.sleep(0.3)
            sshd.kill()                      # listener and session, mid-read
            reader.join(30)
            assert not reader.is_alive() and errors == [errno.EIO]
            with pytest.raises(OSError) as info:
                os.pread(fd, 4096, 2 * MiB)  # later requests too (no server to reconnect to)
            assert info.value.errno == errno.EIO
        finally:
            reader.join(30)
            os.close(fd)
        assert is_mounted(mnt)
        assert (mnt / "local.raw").read_bytes() == b"L" * MiB
    finally:
        unmount(mnt)
    deadline = time.monotonic() + 10
    while ssh_clients(sshd.port) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not ssh_clients(sshd.port)


def test_lost_session_gives_eio_then_the_mount_reconnects(sshd: Sshd, tmp_path: Path,
                                                         mnt: Path) -> None:
    image = tmp_path / "disk.raw"
    data = random_bytes(2 * MiB, seed=6)
    image.write_bytes(data)
    with mounted(sshd.url(image), mountpoint=mnt):
        fd = os.open(mnt / "disk.raw", os.O_RDONLY | os.O_DIRECT)
        try:
            assert os.pread(fd, 4096, 0) == data[:4096]
            sshd.kill_sessions()             # the listener stays: reconnecting works
            with pytest.raises(OSError) as info:
                for _ in range(50):
                    os.pread(fd, 4096, MiB)
                    time.sleep(0.05)
            assert info.value.errno == errno.EIO
            assert os.pread(fd, 4096, MiB) == data[MiB:MiB + 4096]
        finally:
            os.close(fd)


def test_unreachable_server_is_refused_before_mounting(tmp_path: Path, mnt: Path) -> None:
    started = time.monotonic()
    result = imgfs("mount", "ssh://root@127.0.0.1:1/disk.raw?host_key_check=no", mnt,
                   check=False, timeout=30)
    assert time.monotonic() - started < 10
    assert result.returncode == 1
    message = result.stderr.strip()
    assert "\n" not in message and "Connection refused" in message
    assert message.startswith("imgfs: ssh://root@127.0.0.1:1/disk.raw")
    assert not is_mounted(mnt)
