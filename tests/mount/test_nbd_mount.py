"""NBD sources through a real mount: a format over a protocol whose I/O
truly blocks, and a server that goes away while mounted."""
from __future__ import annotations

import errno
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import imgfs, is_mounted, mounted, need, qemu_raw, run
from tests.drivers.test_nbd import nbdkit, needs_nbdkit, serve

MiB = 1 << 20


def start_qemu_nbd(image: Path, sock: Path, fmt: str, *extra: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(["qemu-nbd", "-k", str(sock), "-f", fmt, "-x", "vm", "--persistent",
                             *extra, str(image)], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while not sock.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sock.exists(), "qemu-nbd did not start"
    return proc


@pytest.fixture
def qcow2_image(workdir: Path) -> Path:
    need("qemu-img", "qemu-io", "qemu-nbd")
    image = workdir / "guest.qcow2"
    run("qemu-img", "create", "-f", "qcow2", image, "32M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x61 0 64k", "-c", "write -P 0x62 7M 3M",
        "-c", "write -z 8M 64k", image)
    return image


@pytest.fixture
def server(qcow2_image: Path, workdir: Path) -> Iterator[Path]:
    """qemu-nbd serving the guest contents of the qcow2 image."""
    sock = workdir / "nbd.sock"
    proc = start_qemu_nbd(qcow2_image, sock, "qcow2")
    try:
        yield sock
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_qcow2_served_by_qemu_nbd_shows_guest_contents(qcow2_image: Path, server: Path,
                                                       mnt: Path, workdir: Path) -> None:
    expected = qemu_raw(qcow2_image, workdir / "expected.raw")
    with mounted(f"nbd+unix:///vm?socket={server}", mountpoint=mnt):
        assert os.listdir(mnt) == ["vm.raw"]
        assert (mnt / "vm.raw").read_bytes() == expected
        fd = os.open(mnt / "vm.raw", os.O_WRONLY)
        try:
            os.pwrite(fd, b"written through imgfs", 5 * MiB + 3)
            os.fsync(fd)
        finally:
            os.close(fd)
    run("qemu-io", "-r", "-U", "-f", "qcow2", "-c", "read -P 0x77 5242883 1", qcow2_image)


def test_format_probed_over_nbd(qcow2_image: Path, workdir: Path, mnt: Path) -> None:
    """qemu-nbd -f raw exports the qcow2 file itself: imgfs probes qcow2 on
    top of the protocol and shows the guest contents, as QEMU would."""
    try:
        from imgfs.registry import get_driver
        get_driver("qcow2")
    except Exception:
        pytest.skip("qcow2 driver not available")
    expected = qemu_raw(qcow2_image, workdir / "expected.raw")
    sock = workdir / "raw.sock"
    proc = start_qemu_nbd(qcow2_image, sock, "raw", "-r")
    try:
        with mounted(f"nbd:unix:{sock}:exportname=vm", mountpoint=mnt, options="ro"):
            assert (mnt / "vm.raw").read_bytes() == expected
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_server_going_away_gives_eio_and_the_mount_stays_up(qcow2_image: Path,
                                                            workdir: Path, mnt: Path) -> None:
    sock = workdir / "gone.sock"
    proc = start_qemu_nbd(qcow2_image, sock, "qcow2")
    second = workdir / "local.img"
    second.write_bytes(b"L" * MiB)
    try:
        imgfs("mount", "-o", "format=raw", f"nbd+unix:///vm?socket={sock}", second, mnt)
        fd = os.open(mnt / "vm.raw", os.O_RDONLY | os.O_DIRECT)
        try:
            proc.kill()
            proc.wait(timeout=10)
            with pytest.raises(OSError) as info:
                os.pread(fd, 4096, 20 * MiB)
            assert info.value.errno == errno.EIO
        finally:
            os.close(fd)
        # the mount and the other image carry on
        assert is_mounted(mnt)
        assert (mnt / "local.raw").read_bytes() == b"L" * MiB
    finally:
        if proc.poll() is None:
            proc.kill()
        run("umount", mnt, check=False)
        from tests.conftest import wait_gone
        wait_gone(mnt)


def test_unreachable_server_is_one_clean_line(mnt: Path) -> None:
    result = imgfs("mount", "nbd://127.0.0.1:1/vm", mnt, check=False)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert "Connection refused" in result.stderr
    assert not is_mounted(mnt)


@needs_nbdkit
def test_a_write_the_server_refuses_fails_in_write_itself(workdir: Path, mnt: Path) -> None:
    """Writes bypass the kernel's cache, so the server's error is the failing
    write(2)'s own, not a later fsync's; the next write works."""
    sock = workdir / "err.sock"
    refuse = workdir / "refuse-writes"
    argv = nbdkit(str(sock), "--filter=error", "memory", "1M",
                  "error-pwrite=ENOSPC", "error-pwrite-rate=100%", f"error-pwrite-file={refuse}")
    with serve(argv, str(sock), workdir / "nbdkit.log"), \
            mounted(f"nbd+unix:///?socket={sock}", mountpoint=mnt, options="format=raw,name=m"):
        fd = os.open(mnt / "m.raw", os.O_WRONLY)
        try:
            refuse.touch()
            with pytest.raises(OSError) as info:
                os.pwrite(fd, b"x" * 4096, 8192)
            assert info.value.errno == errno.ENOSPC
            refuse.unlink()
            assert os.pwrite(fd, b"y" * 4096, 8192) == 4096
            os.fsync(fd)
        finally:
            os.close(fd)
        assert (mnt / "m.raw").read_bytes()[8192:12288] == b"y" * 4096
