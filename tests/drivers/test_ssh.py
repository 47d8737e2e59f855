"""The ssh driver against a real OpenSSH sshd (tests/sshd.py) with an
ssh-agent; QEMU's own ssh driver (qemu-img over the same URL and agent) and
the file on the server's disk are the oracles."""
from __future__ import annotations

import errno
import json
import logging
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from imgfs.drivers.ssh.driver import SshDriver

from imgfs.errors import ImgfsError, Unreachable
from imgfs.graph import open_image
from imgfs.node import Node, OpenContext
from tests.conftest import imgfs, need, run
from tests.sshd import Sshd, start_sshd

MiB = 1 << 20


@pytest.fixture
def sshd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Sshd]:
    yield from start_sshd(tmp_path, monkeypatch)


@pytest.fixture
def sshd_without_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Sshd]:
    """internal-sftp refusing fsync@openssh.com requests."""
    yield from start_sshd(tmp_path, monkeypatch, sftp="internal-sftp -P fsync")


def run_trio(fn: Any, *args: Any, timeout: float = 60) -> Any:
    async def main() -> Any:
        with trio.fail_after(timeout):
            return await fn(*args)
    return trio.run(main)


def random_file(path: Path, size: int, seed: int = 1) -> bytes:
    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return data


def qemu_convert(url: str, out: Path, fmt: str = "raw") -> bytes:
    """What QEMU's ssh driver reads at `url` (same agent, same server)."""
    need("qemu-img")
    run("qemu-img", "convert", "-f", fmt, "-O", "raw", url, out)
    return out.read_bytes()


def driver_of(node: Node) -> SshDriver:
    while node.file is not None:
        node = node.file
    assert isinstance(node.driver, SshDriver)
    return node.driver


def one_line_refusal(args: list[str], *needles: str) -> str:
    """`imgfs ARGS` fails with exit 1, one line naming the URL, in < 10 s."""
    started = time.monotonic()
    result = imgfs(*args, check=False, timeout=30)
    assert time.monotonic() - started < 10
    assert result.returncode == 1, result
    message = result.stderr.strip()
    assert "\n" not in message and "Traceback" not in message, message
    assert message.startswith("imgfs: ssh://"), message
    for needle in needles:
        assert needle in message, message
    return message


# -- reading and writing --------------------------------------------------------------


def test_raw_read_matches_the_file_and_qemu(sshd: Sshd, tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    data = random_file(image, 9 * MiB + 512)
    url = sshd.url(image)

    async def body() -> tuple[bytes, int]:
        node = await open_image(url, OpenContext(read_only=True))
        try:
            # several requests at once, across the server's read limit
            pieces: dict[int, bytes] = {}

            async def read(offset: int) -> None:
                pieces[offset] = await node.read(offset, min(MiB, node.size - offset))
            async with trio.open_nursery() as nursery:
                for offset in range(0, node.size, MiB):
                    nursery.start_soon(read, offset)
            return b"".join(pieces[key] for key in sorted(pieces)), \
                driver_of(node).conn.session.peak_in_flight  # type: ignore[union-attr]
        finally:
            await node.aclose()
    contents, peak = run_trio(body)
    assert contents == data
    assert contents == qemu_convert(url, tmp_path / "qemu.raw")
    assert peak > 1


def test_writes_reach_the_file_and_fsync_is_sent(sshd: Sshd, tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    expected = bytearray(random_file(image, 4 * MiB))
    writes = [(3 * MiB + 17, b"A" * 700_000), (5, b"B" * 4096), (MiB, os.urandom(300_000))]

    async def body() -> None:
        node = await open_image(sshd.url(image), OpenContext(read_only=False), fmt="raw")
        try:
            for offset, data in writes:
                await node.write(offset, data)
            await node.flush()
            sshd.kill_sessions()        # the server side gone right after the fsync
        finally:
            await node.aclose()
    run_trio(body)
    for offset, data in writes:
        expected[offset:offset + len(data)] = data
    assert image.read_bytes() == expected
    assert "fsync" in sshd.sftp_log()


def test_many_writes_and_reads_in_flight_past_the_channel_window(sshd: Sshd,
                                                                   tmp_path: Path) -> None:
    """More data in flight than the server's channel window (OpenSSH: 2 MiB)
    with reads mixed in: libssh's channel stops writes short and one task
    at a time sleeps on the socket, so nothing may stall or interleave."""
    image = tmp_path / "disk.raw"
    expected = bytearray(random_file(image, 32 * MiB))
    writes = {offset: os.urandom(MiB) for offset in range(0, 16 * MiB, MiB)}
    read_back: dict[int, bytes] = {}

    async def body() -> None:
        node = await open_image(sshd.url(image), OpenContext(read_only=False), fmt="raw")
        try:
            async def write(offset: int) -> None:
                await node.write(offset, writes[offset])

            async def read(offset: int) -> None:
                read_back[offset] = await node.read(offset, 2 * MiB)
            async with trio.open_nursery() as nursery:
                for offset in writes:
                    nursery.start_soon(write, offset)
                for offset in range(16 * MiB, 32 * MiB, 2 * MiB):
                    nursery.start_soon(read, offset)
            await node.flush()
        finally:
            await node.aclose()
    run_trio(body, timeout=30)
    for offset, data in writes.items():
        expected[offset:offset + MiB] = data
    assert all(data == expected[offset:offset + 2 * MiB] for offset, data in read_back.items())
    assert image.read_bytes() == expected


def test_no_fsync_on_the_server_warns_once(sshd_without_fsync: Sshd, tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    image = tmp_path / "disk.raw"
    random_file(image, MiB)

    async def body() -> None:
        node = await open_image(sshd_without_fsync.url(image), OpenContext(read_only=False),
                                fmt="raw")
        try:
            await node.write(0, b"x" * 512)
            await node.flush()
            await node.flush()
        finally:
            await node.aclose()
    with caplog.at_level(logging.WARNING):
        run_trio(body)
    warnings = [record.getMessage() for record in caplog.records
                if "fsync" in record.getMessage()]
    assert warnings == [f'ssh server "127.0.0.1:{sshd_without_fsync.port}" does not support '
                        f'fsync']
    assert image.read_bytes()[:512] == b"x" * 512


def test_json_and_options_forms(sshd: Sshd, tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    data = random_file(image, MiB)
    spec = "json:" + json.dumps({"driver": "raw", "file": {
        "driver": "ssh", "server": {"host": "127.0.0.1", "port": str(sshd.port)},
        "user": "root", "path": str(image), "host_key_check": "no"}})
    legacy = "json:" + json.dumps({
        "driver": "ssh", "host": "127.0.0.1", "port": sshd.port, "path": str(image),
        "host-key-check": {"mode": "hash", "type": "sha256",
                           "hash": sshd.fingerprint("sha256")}})
    for source in (spec, legacy):
        out = tmp_path / "out.raw"
        imgfs("convert", "-O", "raw", source, out)
        assert out.read_bytes() == data


# -- host keys ----------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["md5", "sha1", "sha256"])
def test_right_fingerprint_opens_and_wrong_is_refused(sshd: Sshd, tmp_path: Path,
                                                      algorithm: str) -> None:
    image = tmp_path / "disk.raw"
    random_file(image, MiB)
    right = sshd.fingerprint(algorithm)
    info = imgfs("info", sshd.url(image, f"{algorithm}:{right}"))
    assert "1 MiB" in info.stdout
    wrong = ("0" if right[0] != "0" else "1") + right[1:]
    one_line_refusal(["info", sshd.url(image, f"{algorithm}:{wrong}")],
                     "does not match", f"{algorithm}:{right}", f"127.0.0.1:{sshd.port}")


def test_known_hosts(sshd: Sshd, tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    random_file(image, MiB)
    known_hosts = Path(os.environ["HOME"]) / ".ssh" / "known_hosts"
    # unknown key: refused, naming the host and the key's fingerprint
    fingerprint = run("ssh-keygen", "-l", "-f", sshd.dir / "hostkey.pub").stdout.split()[1]
    for url in (sshd.url(image, "yes"), sshd.url(image, None)):
        one_line_refusal(["info", url], f"127.0.0.1:{sshd.port}", fingerprint,
                         "known_hosts")
    # a changed key: refused as such
    other = tmp_path / "otherkey"
    run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", other)
    key_type, key = other.with_suffix(".pub").read_text().split()[:2]
    known_hosts.write_text(f"[127.0.0.1]:{sshd.port} {key_type} {key}\n")
    one_line_refusal(["info", sshd.url(image, "yes")], "CHANGED", fingerprint)
    # the right key: accepted, and known_hosts is left as it was
    known_hosts.write_text(sshd.known_hosts_entry())
    assert "1 MiB" in imgfs("info", sshd.url(image, "yes")).stdout
    assert known_hosts.read_text() == sshd.known_hosts_entry()
    # no: any key, and nothing recorded
    known_hosts.unlink()
    assert "1 MiB" in imgfs("info", sshd.url(image, "no")).stdout
    assert not known_hosts.exists()


# -- logging in without the agent ------------------------------------------------------------


def test_default_identity_and_config_alias(sshd: Sshd, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Beyond the agent: ~/.ssh/id_ed25519, and a ~/.ssh/config host alias
    carrying the address, port and user (~ being $HOME)."""
    image = tmp_path / "disk.raw"
    random_file(image, MiB)
    monkeypatch.delenv("SSH_AUTH_SOCK")
    ssh_dir = Path(os.environ["HOME"]) / ".ssh"
    identity = ssh_dir / "id_ed25519"
    identity.write_bytes((sshd.dir / "userkey").read_bytes())
    identity.chmod(0o600)
    assert "1 MiB" in imgfs("info", sshd.url(image)).stdout
    identity.unlink()
    (ssh_dir / "config").write_text(f"Host imgfs-test-alias\n  HostName 127.0.0.1\n"
                                   f"  Port {sshd.port}\n  User root\n"
                                   f"  IdentityFile {sshd.dir / 'userkey'}\n")
    assert "1 MiB" in imgfs("info", f"ssh://imgfs-test-alias{image}?host_key_check=no").stdout


# -- refusals -------------------------------------------------------------------------


def test_wrong_path_unreachable_and_auth_failure_are_one_line(sshd: Sshd, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    one_line_refusal(["info", sshd.url(tmp_path / "missing.raw")], "no such file")
    port = sshd.port
    sshd.port = 1
    try:
        one_line_refusal(["info", sshd.url(tmp_path / "x.raw")], "Connection refused")
    finally:
        sshd.port = port
    empty_agent = tmp_path / "empty.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(empty_agent)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not empty_agent.exists():
            time.sleep(0.02)
        monkeypatch.setenv("SSH_AUTH_SOCK", str(empty_agent))
        one_line_refusal(["info", sshd.url(tmp_path / "x.raw")], "authentication failed")
    finally:
        agent.terminate()
        agent.wait()


def test_a_password_in_the_url_is_refused_without_echo(tmp_path: Path) -> None:
    result = imgfs("info", "ssh://root:hunter2@127.0.0.1/x.raw", check=False)
    assert result.returncode == 2         # a usage error
    assert "hunter2" not in result.stderr and "password" in result.stderr


# -- create, convert, resize ------------------------------------------------------------


def test_create_convert_and_resize_over_ssh(sshd: Sshd, tmp_path: Path) -> None:
    need("qemu-img")
    created = tmp_path / "created.qcow2"
    imgfs("create", "-f", "qcow2", sshd.url(created), "64M")
    assert run("qemu-img", "check", created).returncode == 0
    assert '"virtual-size": 67108864' in run("qemu-img", "info", "--output=json",
                                            created).stdout
    source = tmp_path / "source.raw"
    random_file(source, 3 * MiB)
    target = tmp_path / "converted.qcow2"
    imgfs("convert", "-O", "qcow2", source, sshd.url(target))
    run("qemu-img", "check", target)
    run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", source, target)
    raw = tmp_path / "grow.raw"
    random_file(raw, MiB)
    imgfs("resize", "-f", "raw", sshd.url(raw), "3M")
    assert raw.stat().st_size == 3 * MiB


# -- losing the connection --------------------------------------------------------------


def test_lost_connection_fails_requests_then_reconnects(sshd: Sshd, tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    data = random_file(image, 2 * MiB)

    async def body() -> None:
        node = await open_image(sshd.url(image), OpenContext(read_only=True), fmt="raw")
        try:
            assert await node.read(0, 4096) == data[:4096]
            sshd.kill_sessions()
            with pytest.raises(Unreachable) as info:
                for _ in range(50):          # until the loss is seen
                    await node.read(MiB, 4096)
                    await trio.sleep(0.05)
            assert info.value.errno == errno.EIO
            # the next request reconnects
            assert await node.read(MiB, 4096) == data[MiB:MiB + 4096]
        finally:
            await node.aclose()
    run_trio(body)


def test_server_gone_gives_eio_for_good_within_bounds(sshd: Sshd, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from imgfs.drivers.ssh import driver
    monkeypatch.setattr(driver, "RECONNECT_DELAYS", (0.05, 0.05))
    image = tmp_path / "disk.raw"
    random_file(image, MiB)

    async def body() -> None:
        node = await open_image(sshd.url(image), OpenContext(read_only=True), fmt="raw")
        try:
            sshd.kill()
            messages = []
            for _ in range(40):
                with pytest.raises(ImgfsError) as info:
                    await node.read(0, 4096)
                messages.append(str(info.value))
                if "gave up" in messages[-1]:
                    break
                await trio.sleep(0.06)
            assert "gave up after 2 reconnection attempts" in messages[-1], messages
        finally:
            await node.aclose()
    run_trio(body)


# -- timeouts -------------------------------------------------------------------------------


def test_a_silent_server_times_out(sshd: Sshd, tmp_path: Path) -> None:
    """timeout=2: a server that stops answering fails the request after
    3 x 2 s, also after the connection sat idle longer than that (the
    deadlines' watchdog slept through); one that never speaks SSH is
    refused within the timeout."""
    image = tmp_path / "disk.raw"
    random_file(image, MiB)
    tree = {"driver": "ssh", "server": {"host": "127.0.0.1", "port": str(sshd.port)},
            "path": str(image), "host_key_check": "no", "timeout": "2"}

    async def body() -> float:
        node = await open_image(tree, OpenContext(read_only=True))
        sessions = sshd.sessions()
        try:
            await node.read(0, 4096)
            await trio.sleep(6.5)
            for pid in sessions:
                os.kill(pid, signal.SIGSTOP)
            started = trio.current_time()
            with pytest.raises(Unreachable, match="no reply from the server in 6 s"):
                await node.read(0, 4096)
            return trio.current_time() - started
        finally:
            for pid in sessions:
                os.kill(pid, signal.SIGCONT)
            await node.aclose()
    assert 5.9 < run_trio(body) < 10

    with socket.socket() as mute:                # accepts, never says a word
        mute.bind(("127.0.0.1", 0))
        mute.listen()
        port = mute.getsockname()[1]
        started = time.monotonic()
        mute_tree = {**tree, "server": {"host": "127.0.0.1", "port": str(port)}, "timeout": "1"}
        message = one_line_refusal(["info", f"json:{json.dumps(mute_tree)}"], "within 1 s")
        assert time.monotonic() - started < 5, message
