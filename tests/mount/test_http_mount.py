"""http(s) sources through a real mount, against a real nginx: contents as
QEMU's curl driver reads them, a file replaced on the server, a server
that dies mid-read and comes back, and one that stalls mid-answer."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import (
    IMGFS,
    daemon_pids,
    is_mounted,
    mounted,
    pread_errno,
    random_bytes,
    unmount,
)
from tests.drivers.test_http import make_chain, need_nginx, qemu_convert
from tests.drivers.test_http_hostile import Answer, partial, scripted
from tests.nginx import PASSWORD, Nginx

MiB = 1 << 20
#: where the stalling server stops in the middle of an answer
STALLED = 40960


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[Nginx]:
    need_nginx()
    server = Nginx(tmp_path / "srv")
    server.start()
    try:
        yield server
    finally:
        server.stop()



def test_raw_and_qcow2_chain_mounted_match_qemu(nginx: Nginx, mnt: Path,
                                                tmp_path: Path) -> None:
    data = random_bytes(3 * MiB, seed=3)
    (nginx.www / "disk.raw").write_bytes(data)
    make_chain(nginx.www / "sub")
    with mounted(nginx.url("disk.raw"), mountpoint=mnt):
        assert os.listdir(mnt) == ["disk.raw"]
        assert (mnt / "disk.raw").read_bytes() == data
    expected = qemu_convert(tmp_path / "qemu.raw", nginx.url("sub/top.qcow2"))
    with mounted(nginx.url("sub/top.qcow2"), mountpoint=mnt):
        assert (mnt / "top.raw").read_bytes() == expected
    # https on [::1] with the -o form of sslverify=off (on the file node)
    secure = nginx.url("sub/top.qcow2", https=True, host="::1")
    with mounted(secure, mountpoint=mnt, options="file.sslverify=off"):
        assert (mnt / "top.raw").read_bytes() == expected
        # read-only: writes are refused
        with pytest.raises(OSError) as raised:
            os.open(mnt / "top.raw", os.O_WRONLY)
        assert raised.value.errno in (errno.EROFS, errno.EACCES)


def test_file_replaced_while_mounted_gives_eio(nginx: Nginx, mnt: Path) -> None:
    first = random_bytes(4 * MiB, seed=4)
    (nginx.www / "img.raw").write_bytes(first)
    with mounted(nginx.url("img.raw"), mountpoint=mnt, options="file.readahead=64k"):
        view = mnt / "img.raw"
        assert pread_errno(view, 0, 4096) == 0
        replacement = nginx.www / "img.new"
        replacement.write_bytes(random_bytes(4 * MiB, seed=5))
        os.utime(replacement, (1, 1))
        replacement.rename(nginx.www / "img.raw")
        assert pread_errno(view, 3 * MiB, 4096) == errno.EIO
        assert pread_errno(view, 2 * MiB, 4096) == errno.EIO
        assert os.stat(view).st_size == len(first)       # the mount stays up


def test_server_killed_mid_read(nginx: Nginx, mnt: Path) -> None:
    """EIO for the reads the server no longer answers, the mount stays up,
    reads work again once the server is back, and unmount leaves nothing."""
    data = random_bytes(48 * MiB, seed=6)
    (nginx.www / "big.raw").write_bytes(data)
    with mounted(nginx.url("big.raw"), mountpoint=mnt):
        view = mnt / "big.raw"
        fd = os.open(view, os.O_RDONLY)
        try:
            assert os.pread(fd, MiB, 0) == data[:MiB]
            nginx.stop(kill=True)
            errors = [pread_errno(view, offset, MiB) for offset in range(8 * MiB, 40 * MiB, MiB)]
            assert errno.EIO in errors
            assert set(errors) <= {0, errno.EIO}
            assert is_mounted(mnt) and os.stat(view).st_size == len(data)
            nginx.start()
            deadline = time.monotonic() + 15
            while pread_errno(view, 44 * MiB, 4096) != 0:
                assert time.monotonic() < deadline, "no reconnect after the server came back"
                time.sleep(0.2)
            assert os.pread(fd, 4096, 45 * MiB) == data[45 * MiB:45 * MiB + 4096]
        finally:
            os.close(fd)
    assert not daemon_pids(mnt)


def test_password_secret_never_in_ps_or_messages(nginx: Nginx, mnt: Path) -> None:
    data = random_bytes(MiB, seed=9)
    (nginx.www / "disk.raw").write_bytes(data)
    url = nginx.url("auth/disk.raw")
    args = [IMGFS, "mount", "--object", f"secret,id=pw,data={PASSWORD}",
            "-o", "file.username=imgfs,file.password-secret=pw", url, str(mnt)]
    result = subprocess.run(args, capture_output=True, text=True, timeout=60)
    try:
        assert result.returncode == 0, result.stderr
        assert PASSWORD not in result.stdout + result.stderr
        assert (mnt / "disk.raw").read_bytes() == data
        for pid in daemon_pids(mnt):
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                assert PASSWORD.encode() not in handle.read()
    finally:
        unmount(mnt)
    wrong = [*args[:3], "secret,id=pw,data=not-the-password", *args[4:]]
    result = subprocess.run(wrong, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr == (f"imgfs: {url}: HTTP 401 Unauthorized (authentication failed "
                             "or needed)\n")
    assert not is_mounted(mnt)


def test_a_read_the_server_stalls_is_eio_after_the_timeout(mnt: Path) -> None:
    """A server that stops in the middle of an answer: that read fails
    (EIO) after `timeout`, the mount stays up, the next read works."""
    stall = threading.Event()

    def script(first: int, last: int, number: int) -> Answer:
        if stall.is_set() and first <= STALLED <= last:
            stall.clear()
            return partial(first, last)[:-100], False
        return partial(first, last), False
    with scripted(script) as url:
        source = json.dumps({"driver": "http", "url": url, "timeout": 1, "readahead": 0})
        with mounted(f"json:{source}", mountpoint=mnt):
            view = next(mnt.iterdir())
            stall.set()
            started = time.monotonic()
            assert pread_errno(view, STALLED, 4096, direct=True) == errno.EIO
            assert 1 <= time.monotonic() - started < 5
            assert pread_errno(view, STALLED, 4096, direct=True) == 0
            assert is_mounted(mnt)
    assert not daemon_pids(mnt)
