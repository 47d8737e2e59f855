"""The iscsi driver against a real tgtd on loopback (Debian's tgt): LUNs
backed by files with 512 and 4096-byte blocks, a thin LUN, a CD-ROM LUN,
CHAP and mutual CHAP accounts, HeaderDigest=CRC32C.  The oracles are the
backing files and QEMU's own iscsi driver (qemu-img convert iscsi://...)."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from imgfs.drivers.iscsi import IscsiDriver

from imgfs.errors import ImgfsError
from imgfs.graph import open_image
from imgfs.node import OpenContext
from tests.conftest import (
    IMGFS,
    daemon_pids,
    free_port,
    imgfs,
    is_mounted,
    mounted,
    need,
    need_root,
    pwrite_all,
    qemu_raw,
    run,
    unmount,
)

MiB = 1 << 20
IQN = "iqn.2026-01.test.imgfs"
DISKS, CHAP, MUTUAL = f"{IQN}:disks", f"{IQN}:chap", f"{IQN}:mutual"
#: targets open only to one initiator name: QEMU's style default, and another
FOR_DEFAULT, FOR_NAMED = f"{IQN}:for-default", f"{IQN}:for-named"
DEFAULT_INITIATOR, NAMED_INITIATOR = "iqn.2008-11.org.linux-kvm:imgfs", f"{IQN}:initiator"
CHAP_USER, CHAP_SECRET = "imgfsuser", "imgfs-secret-1"
MUTUAL_USER, MUTUAL_SECRET = "imgfsuser2", "imgfs-secret-2"
TARGET_USER, TARGET_SECRET = "tgtout", "imgfs-target-3"
RW = OpenContext(read_only=False)
RO = OpenContext(read_only=True)




def random_file(path: Path, size: int, seed: int) -> bytes:
    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return data


class Tgt:
    """One tgtd on 127.0.0.1, with its own control port; stopped by PID."""

    def __init__(self, workdir: Path) -> None:
        need("tgtd", "tgtadm")
        need_root()
        self.workdir = workdir
        self.port = free_port()
        self.control = random.SystemRandom().randrange(1000, 30000)
        while os.path.exists(f"/var/run/tgtd/socket.{self.control}"):
            self.control += 1
        self.log = workdir / f"tgtd-{self.control}.log"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                ["tgtd", "-f", "-C", str(self.control), "--iscsi",
                 f"portal=127.0.0.1:{self.port}"], stdout=log, stderr=log)
        deadline = time.monotonic() + 10
        while not self._listening():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"tgtd did not start: {self.log.read_text()}")
            time.sleep(0.02)
        self.tids: dict[str, int] = {}

    def _listening(self) -> bool:
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", self.port)) == 0

    def adm(self, *args: str) -> None:
        run("tgtadm", "-C", str(self.control), "--lld", "iscsi", *args)

    def target(self, name: str, *, digest: str | None = None,
               initiator: str | None = None) -> int:
        """A new target, open to 127.0.0.1, or only to the `initiator` name."""
        tid = len(self.tids) + 1
        self.tids[name] = tid
        self.adm("--mode", "target", "--op", "new", "--tid", str(tid), "--targetname", name)
        allowed = ["--initiator-name", initiator] if initiator else \
            ["--initiator-address", "127.0.0.1"]
        self.adm("--mode", "target", "--op", "bind", "--tid", str(tid), *allowed)
        if digest:
            self.adm("--mode", "target", "--op", "update", "--tid", str(tid),
                     "--name", "HeaderDigest", "--value", digest)
        return tid

    def lun(self, name: str, lun: int, backing: Path, *extra: str) -> None:
        self.adm("--mode", "logicalunit", "--op", "new", "--tid", str(self.tids[name]),
                 "--lun", str(lun), "--backing-store", str(backing), *extra)

    def account(self, name: str, user: str, password: str, *, outgoing: bool = False) -> None:
        self.adm("--mode", "account", "--op", "new", "--user", user, "--password", password)
        self.adm("--mode", "account", "--op", "bind", "--tid", str(self.tids[name]),
                 "--user", user, *(["--outgoing"] if outgoing else []))

    def url(self, name: str, lun: int, auth: str = "") -> str:
        return f"iscsi://{auth}127.0.0.1:{self.port}/{name}/{lun}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(1)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # a tgtd that did not exit by itself leaves its control socket
        for leftover in (f"socket.{self.control}", f"socket.{self.control}.lock"):
            Path("/var/run/tgtd", leftover).unlink(missing_ok=True)


@contextlib.contextmanager
def tgtd(workdir: Path) -> Iterator[Tgt]:
    server = Tgt(workdir)
    try:
        yield server
    finally:
        server.stop()


class Lab:
    """The module's server and what its LUNs hold."""

    def __init__(self, server: Tgt, workdir: Path) -> None:
        self.server = server
        self.disk512 = random_file(workdir / "lun512.img", 4 * MiB, 1)
        self.disk4k = random_file(workdir / "lun4k.img", 4 * MiB, 2)
        self.cdrom = random_file(workdir / "cd.iso", 2 * MiB, 3)
        self.chap = random_file(workdir / "chap.img", MiB, 4)
        self.mutual = random_file(workdir / "mutual.img", MiB, 5)
        server.target(DISKS, digest="CRC32C")
        server.lun(DISKS, 1, workdir / "lun512.img")
        server.lun(DISKS, 2, workdir / "lun4k.img", "--blocksize", "4096")
        server.lun(DISKS, 3, workdir / "cd.iso", "--device-type", "cd")
        # a thin LUN over a sparse file: data at 192 KiB (128 KiB) and 5 MiB (1 MiB)
        thin = workdir / "thin.img"
        with open(thin, "wb") as handle:
            handle.truncate(8 * MiB)
            for offset, size in ((192 * 1024, 128 * 1024), (5 * MiB, MiB)):
                handle.seek(offset)
                handle.write(random.Random(offset).randbytes(size))
        self.thin = thin.read_bytes()
        server.lun(DISKS, 4, thin)
        server.adm("--mode", "logicalunit", "--op", "update", "--tid", "1", "--lun", "4",
                   "--params", "thin_provisioning=1")
        server.target(CHAP)
        server.lun(CHAP, 1, workdir / "chap.img")
        server.account(CHAP, CHAP_USER, CHAP_SECRET)
        server.target(MUTUAL)
        server.lun(MUTUAL, 1, workdir / "mutual.img")
        server.account(MUTUAL, MUTUAL_USER, MUTUAL_SECRET)
        server.account(MUTUAL, TARGET_USER, TARGET_SECRET, outgoing=True)
        server.target(FOR_DEFAULT, initiator=DEFAULT_INITIATOR)
        server.lun(FOR_DEFAULT, 1, workdir / "chap.img")
        server.target(FOR_NAMED, initiator=NAMED_INITIATOR)
        server.lun(FOR_NAMED, 1, workdir / "mutual.img")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    workdir = tmp_path_factory.mktemp("iscsi")
    with tgtd(workdir) as server:
        yield Lab(server, workdir)


def read_all(source: str, ctx: OpenContext = RO, fmt: str | None = "raw") -> bytes:
    async def main() -> bytes:
        with trio.fail_after(20):
            node = await open_image(source, ctx, fmt=fmt)
            try:
                return bytes(await node.read(0, node.size))
            finally:
                await node.aclose()
    return trio.run(main)


def qemu_reads(url: str, tmp_path: Path) -> bytes:
    need("qemu-img")
    out = tmp_path / "qemu.raw"
    out.unlink(missing_ok=True)
    return qemu_raw(url, out, "raw")   # type: ignore[arg-type]


# -- reading: every LUN kind, checked against the file and against QEMU -------------


@pytest.mark.parametrize("lun, attr, block", [(1, "disk512", 512), (2, "disk4k", 4096),
                                              (3, "cdrom", 2048)])
def test_luns_read_as_qemu_reads_them(lab: Lab, tmp_path: Path, lun: int, attr: str,
                                      block: int) -> None:
    url = lab.server.url(DISKS, lun)
    expected = getattr(lab, attr)
    assert read_all(url) == expected
    assert qemu_reads(url, tmp_path) == expected

    async def alignment() -> None:
        node = await open_image(url, RO, fmt="iscsi")
        try:
            assert isinstance(node.driver, IscsiDriver)
            assert node.driver.request_alignment == block
            # an unaligned read is widened by the core
            assert bytes(await node.read(block - 3, 10)) == expected[block - 3:block + 7]
            # a long read travels as several commands at once, the last one short
            length = MiB + 3 * block
            assert bytes(await node.read(block, length)) == expected[block:block + length]
        finally:
            await node.aclose()
    trio.run(alignment)


def test_info_agrees_with_qemu_img(lab: Lab) -> None:
    need("qemu-img")
    for lun in (1, 2, 3):
        url = lab.server.url(DISKS, lun)
        theirs = json.loads(run("qemu-img", "info", "--output=json", url).stdout)
        ours = json.loads(imgfs("info", "--output", "json", url).stdout)
        assert (ours["virtual-size"], ours["format"]) == (theirs["virtual-size"], "raw")


def test_thin_lun_block_status_agrees_with_qemu(lab: Lab, tmp_path: Path) -> None:
    """GET LBA STATUS: the holes of a thin LUN read as zeros and are reported
    as zero extents, as QEMU's iscsi driver reports them."""
    need("qemu-img")
    url = lab.server.url(DISKS, 4)
    assert read_all(url) == lab.thin
    assert qemu_reads(url, tmp_path) == lab.thin
    keys = ("start", "length", "zero", "data")
    theirs = json.loads(run("qemu-img", "map", "--output=json", "-f", "raw", url).stdout)
    ours = json.loads(imgfs("map", "--output", "json", "-f", "raw", url).stdout)
    assert [{k: e[k] for k in keys} for e in ours] == [{k: e[k] for k in keys} for e in theirs]
    assert any(e["zero"] for e in ours) and any(e["data"] for e in ours)


def test_requests_in_flight_at_once(lab: Lab) -> None:
    url = lab.server.url(DISKS, 1)
    offsets = [random.Random(7).randrange(0, 4 * MiB // 4096) * 4096 for _ in range(64)]

    async def main() -> None:
        node = await open_image(url, RO, fmt="iscsi")
        try:
            results: dict[int, bytes] = {}

            async def one(offset: int) -> None:
                results[offset] = bytes(await node.read(offset, 4096))
            async with trio.open_nursery() as nursery:
                for offset in offsets:
                    nursery.start_soon(one, offset)
            for offset, data in results.items():
                assert data == lab.disk512[offset:offset + 4096]
            assert isinstance(node.driver, IscsiDriver) and node.driver.session
            assert node.driver.session.peak_in_flight > 8
        finally:
            await node.aclose()
    trio.run(main)


def test_cancelled_requests_leave_the_session_sound(lab: Lab) -> None:
    """Requests abandoned in flight (a FUSE interrupt, a cancelled scope)
    still complete inside libiscsi into buffers kept alive for them; the
    session goes on serving the right data."""
    url = lab.server.url(DISKS, 1)

    async def main() -> None:
        node = await open_image(url, RO, fmt="iscsi")
        try:
            for delay in (0, 0.0005, 0.002):
                with trio.move_on_after(delay):
                    async with trio.open_nursery() as nursery:
                        for number in range(32):
                            nursery.start_soon(node.read, number * 65536, 65536)
            assert bytes(await node.read(0, node.size)) == lab.disk512
        finally:
            await node.aclose()
    trio.run(main)


@pytest.mark.parametrize("digest", ["CRC32C", "crc32c-none", "none-crc32c", "NONE"])
def test_header_digests(lab: Lab, digest: str) -> None:
    """tgt insists on CRC32C (HeaderDigest=CRC32C) whatever the initiator
    prefers: every setting either reads the LUN or is refused cleanly."""
    source = "json:" + json.dumps({"driver": "iscsi", "portal": f"127.0.0.1:{lab.server.port}",
                                   "target": DISKS, "lun": 1, "header-digest": digest})
    try:
        assert read_all(source, fmt=None) == lab.disk512
    except ImgfsError as exc:
        assert digest == "NONE", exc
        assert "\n" not in str(exc)


def test_json_and_option_forms(lab: Lab, tmp_path: Path) -> None:
    port = lab.server.port
    sources = [
        "json:" + json.dumps({"driver": "iscsi", "transport": "tcp",
                              "portal": f"127.0.0.1:{port}", "target": DISKS, "lun": "2"}),
        "json:" + json.dumps({"driver": "raw", "file": {
            "driver": "iscsi", "portal": f"127.0.0.1:{port}", "target": DISKS, "lun": 2,
            "initiator-name": "iqn.2026-01.test.imgfs:initiator", "timeout": 30}}),
        "json:" + json.dumps({"file.driver": "iscsi",
                              "file.filename": lab.server.url(DISKS, 2)}),
    ]
    for source in sources:
        assert read_all(source, fmt=None) == lab.disk4k, source


def test_initiator_names(lab: Lab, tmp_path: Path) -> None:
    """tgt admits only the initiator name bound to each target: the default
    (QEMU's prefix), one given as an option, one from the config file."""
    server = lab.server
    assert read_all(server.url(FOR_DEFAULT, 1)) == lab.chap
    with pytest.raises(ImgfsError):
        read_all(server.url(FOR_NAMED, 1))
    named = "json:" + json.dumps({"driver": "iscsi", "filename": server.url(FOR_NAMED, 1),
                                  "initiator-name": NAMED_INITIATOR})
    assert read_all(named, fmt=None) == lab.mutual
    config = tmp_path / "iscsi.conf"
    config.write_text(f'[iscsi "{FOR_NAMED}"]\n  initiator-name = "{NAMED_INITIATOR}"\n')
    from_config = "json:" + json.dumps({"driver": "iscsi", "filename": server.url(FOR_NAMED, 1),
                                        "iscsi-config": str(config)})
    assert read_all(from_config, fmt=None) == lab.mutual


# -- authentication -----------------------------------------------------------------



def test_chap_every_way_of_giving_the_secret(lab: Lab, tmp_path: Path) -> None:
    server = lab.server
    url = server.url(CHAP, 1)
    # in the URL, as QEMU takes it (QEMU is the oracle too)
    with_password = server.url(CHAP, 1, f"{CHAP_USER}%{CHAP_SECRET}@")
    assert read_all(with_password) == lab.chap
    assert qemu_reads(with_password, tmp_path) == lab.chap
    # user= and password-secret= (an --object secret), given at the top of
    # the source (-o) and reaching the iscsi leaf under the probed format
    async def with_secret() -> bytes:
        ctx = OpenContext(read_only=True, secrets={"sec0": CHAP_SECRET.encode()})
        node = await open_image(url, ctx, options={"user": CHAP_USER,
                                                   "password-secret": "sec0"})
        try:
            return bytes(await node.read(0, node.size))
        finally:
            await node.aclose()
    assert trio.run(with_secret) == lab.chap
    # the configuration file, per target and for every target
    for section in (f'[iscsi "{CHAP}"]', "[iscsi]"):
        config = tmp_path / "iscsi.conf"
        config.write_text(f'# test\n[drive]\n  file = "x"\n{section}\n'
                          f'  user = "{CHAP_USER}"\n  password = "{CHAP_SECRET}"\n'
                          '  header-digest = "NONE-CRC32C"\n')
        source = "json:" + json.dumps({"driver": "iscsi", "filename": url,
                                       "iscsi-config": str(config)})
        assert read_all(source, fmt=None) == lab.chap
    # the environment, as libiscsi reads it
    result = subprocess.run([IMGFS, "info", "--output", "json", url], capture_output=True,
                            text=True, timeout=30,
                            env={**os.environ, "LIBISCSI_CHAP_USERNAME": CHAP_USER,
                                 "LIBISCSI_CHAP_PASSWORD": CHAP_SECRET})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["virtual-size"] == MiB


def test_mutual_chap(lab: Lab, tmp_path: Path) -> None:
    server = lab.server
    query = f"?target_user={TARGET_USER}&target_password={TARGET_SECRET}"
    url = server.url(MUTUAL, 1, f"{MUTUAL_USER}%{MUTUAL_SECRET}@") + query
    assert read_all(url) == lab.mutual

    async def with_secrets() -> bytes:
        ctx = OpenContext(read_only=True, secrets={"ini": MUTUAL_SECRET.encode(),
                                                   "tgt": TARGET_SECRET.encode()})
        node = await open_image(server.url(MUTUAL, 1), ctx, options={
            "user": MUTUAL_USER, "password-secret": "ini", "target-user": TARGET_USER,
            "target-password-secret": "tgt"})
        try:
            return bytes(await node.read(0, node.size))
        finally:
            await node.aclose()
    assert trio.run(with_secrets) == lab.mutual
    # the target proving a wrong secret is refused
    wrong = server.url(MUTUAL, 1, f"{MUTUAL_USER}%{MUTUAL_SECRET}@") + \
        f"?target_user={TARGET_USER}&target_password=not-the-target"
    with pytest.raises(ImgfsError):
        read_all(wrong)


def assert_refused(args: list[str], url_shown: str, secrets: tuple[str, ...] = ()) -> str:
    started = time.monotonic()
    result = subprocess.run([IMGFS, *args], capture_output=True, text=True, timeout=30)
    elapsed = time.monotonic() - started
    assert result.returncode == 1, result
    assert elapsed < 10
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"imgfs: {url_shown}: "), result.stderr
    for secret in secrets:
        assert secret not in result.stderr + result.stdout
    return result.stderr


def test_refused_before_mounting(lab: Lab, tmp_path: Path, mnt: Path) -> None:
    server = lab.server
    wrong_secret = server.url(CHAP, 1, f"{CHAP_USER}%wrong-secret-x@")
    shown = server.url(CHAP, 1, f"{CHAP_USER}@")      # the URL without its secret
    message = assert_refused(["mount", wrong_secret, str(mnt)], shown, ("wrong-secret-x",))
    assert "Authentication" in message
    assert not is_mounted(mnt)
    assert_refused(["info", server.url(CHAP, 1)], server.url(CHAP, 1))
    assert_refused(["mount", "-o", "ro", server.url(f"{IQN}:nope", 1), str(mnt)],
                   server.url(f"{IQN}:nope", 1))
    assert_refused(["mount", "-o", "ro", server.url(DISKS, 9), str(mnt)],
                   server.url(DISKS, 9))
    closed = f"iscsi://127.0.0.1:{free_port()}/{DISKS}/1"
    assert "Connection refused" in assert_refused(["mount", "-o", "ro", closed, str(mnt)],
                                                  closed)
    assert not is_mounted(mnt)


def test_silent_portal_refused_in_time(mnt: Path) -> None:
    """A portal that accepts connections and never answers: the mount is
    refused in one line within 10 seconds, nothing mounted."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        url = f"iscsi://127.0.0.1:{silent.getsockname()[1]}/{DISKS}/1"
        message = assert_refused(["mount", "-o", "ro", url, str(mnt)], url)
    assert "timed out" in message
    assert not is_mounted(mnt)


def test_mount_options_reach_the_lun(lab: Lab, tmp_path: Path, mnt: Path) -> None:
    """mount -o file.user=,password-secret= (a --object secret) and -o
    iscsi-config= reach the iscsi node under the probed format (a plain
    user= is mount(8)'s own option)."""
    secret = tmp_path / "chap.pass"
    secret.write_text(CHAP_SECRET)
    url = lab.server.url(CHAP, 1)
    with mounted(url, mountpoint=mnt, options=f"ro,file.user={CHAP_USER},password-secret=s0",
                 extra=("--object", f"secret,id=s0,file={secret}")):
        assert (mnt / "1.raw").read_bytes() == lab.chap
    config = tmp_path / "iscsi.conf"
    config.write_text(f'[iscsi]\n  user = "{CHAP_USER}"\n  password = "{CHAP_SECRET}"\n')
    with mounted(url, mountpoint=mnt, options=f"ro,iscsi-config={config}"):
        assert (mnt / "1.raw").read_bytes() == lab.chap


def test_secrets_stay_out_of_ps_and_the_mount_table(lab: Lab, mnt: Path) -> None:
    url = lab.server.url(CHAP, 1, f"{CHAP_USER}%{CHAP_SECRET}@")
    with mounted(url, mountpoint=mnt, options="ro"):
        pids = daemon_pids(mnt)
        assert pids
        for pid in pids:
            assert CHAP_SECRET.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
        assert CHAP_SECRET not in Path("/proc/self/mountinfo").read_text()
        assert (mnt / "1.raw").read_bytes() == lab.chap


# -- the CD-ROM is read-only ------------------------------------------------------------


def test_cdrom_is_read_only(lab: Lab, mnt: Path) -> None:
    url = lab.server.url(DISKS, 3)
    result = imgfs("mount", "-o", "rw", url, mnt, check=False)
    assert result.returncode == 1 and "CD-ROM" in result.stderr
    assert not is_mounted(mnt)
    with mounted(url, mountpoint=mnt):
        assert (mnt / "3.raw").read_bytes() == lab.cdrom
        with pytest.raises(OSError) as info:
            os.open(mnt / "3.raw", os.O_WRONLY)
        assert info.value.errno in (errno.EROFS, errno.EACCES)


# -- writing through a mount ----------------------------------------------------------


WRITES = [(1, b"a" * 5), (511, b"b" * 2), (4095, b"c" * 70000), (1000000, b"d" * 131079),
          (3 * MiB - 7, b"e" * 9),
          # several commands in flight, the last one short
          (2 * MiB + 512, bytes(range(256)) * 2403)]


@pytest.mark.parametrize("block", [512, 4096])
def test_raw_lun_written_through_the_mount(tmp_path: Path, mnt: Path, block: int) -> None:
    backing = tmp_path / "disk.img"
    expected = bytearray(random_file(backing, 4 * MiB, 11))
    with tgtd(tmp_path) as server:
        server.target(DISKS, digest="CRC32C")
        server.lun(DISKS, 1, backing, "--blocksize", str(block))
        (tmp_path / "thin.img").write_bytes(b"\x01" * 4 * MiB)
        server.lun(DISKS, 2, tmp_path / "thin.img")
        server.adm("--mode", "logicalunit", "--op", "update", "--tid", "1", "--lun", "2",
                   "--params", "thin_provisioning=1")
        with mounted(server.url(DISKS, 1), mountpoint=mnt):
            pwrite_all(mnt / "1.raw", WRITES, expected)
            assert (mnt / "1.raw").read_bytes() == bytes(expected)
        assert backing.read_bytes() == bytes(expected)
        assert qemu_reads(server.url(DISKS, 1), tmp_path) == bytes(expected)

        async def zeroes_and_discard() -> None:
            node = await open_image(server.url(DISKS, 2), RW, fmt="iscsi")
            try:
                await node.write_zeroes(MiB, MiB, may_unmap=True)
                await node.write_zeroes(3 * MiB + 512, 4096)
                await node.discard(2 * MiB, MiB)
                await node.flush()
                data = bytes(await node.read(0, node.size))
                assert data[MiB:2 * MiB] == bytes(MiB)
                assert data[3 * MiB + 512:3 * MiB + 4608] == bytes(4096)
                assert data[:MiB] == b"\x01" * MiB
            finally:
                await node.aclose()
        trio.run(zeroes_and_discard)


def test_qcow2_on_a_lun_written_through_the_mount(tmp_path: Path, mnt: Path) -> None:
    need("qemu-img", "qemu-io")
    backing = tmp_path / "vm.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", backing, "8M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 300k", "-c",
        "write -P 0x11 5M 64k", backing)
    expected = bytearray(qemu_raw(backing, tmp_path / "before.raw", "qcow2"))
    # A LUN does not grow: room for new clusters, as on a block device
    os.truncate(backing, 32 * MiB)
    with tgtd(tmp_path) as server:
        server.target(DISKS)
        server.lun(DISKS, 1, backing)
        url = server.url(DISKS, 1)
        with mounted(url, mountpoint=mnt):
            assert (mnt / "1.raw").read_bytes() == bytes(expected)
            pwrite_all(mnt / "1.raw", WRITES + [(7 * MiB, b"f" * 65536)], expected)
        # QEMU reads the qcow2 through the same LUN
        out = tmp_path / "after.raw"
        run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", url, out)
        assert out.read_bytes() == bytes(expected)
    run("qemu-img", "check", "-f", "qcow2", backing)
    assert qemu_raw(backing, tmp_path / "file.raw", "qcow2") == bytes(expected)


# -- the target going away ------------------------------------------------------------


def test_tgtd_killed_mid_mount(tmp_path: Path, mnt: Path) -> None:
    backing = tmp_path / "disk.img"
    data = random_file(backing, 4 * MiB, 12)
    with tgtd(tmp_path) as server:
        server.target(DISKS)
        server.lun(DISKS, 1, backing)
        with mounted(server.url(DISKS, 1), mountpoint=mnt, options="ro"):
            image = mnt / "1.raw"
            fd = os.open(image, os.O_RDONLY | os.O_DIRECT)
            try:
                assert os.pread(fd, 4096, 0) == data[:4096]
                server.proc.send_signal(signal.SIGKILL)
                server.proc.wait()
                started = time.monotonic()
                with pytest.raises(OSError) as info:
                    os.pread(fd, 4096, 2 * MiB)
                assert info.value.errno == errno.EIO
                assert time.monotonic() - started < 15
                with pytest.raises(OSError) as info:
                    os.pread(fd, 4096, 3 * MiB)
                assert info.value.errno == errno.EIO
            finally:
                os.close(fd)
            assert is_mounted(mnt)
            assert os.stat(image).st_size == 4 * MiB
        # mounted() unmounted and waited for the daemon to exit
        assert not is_mounted(mnt) and not daemon_pids(mnt)
    unmount(mnt)


def test_timeout_turns_a_silent_target_into_eio(tmp_path: Path) -> None:
    """timeout=N: a target that stops answering (SIGSTOP) fails the request
    with EIO after N seconds; once it answers again, so do requests."""
    backing = tmp_path / "disk.img"
    data = random_file(backing, MiB, 13)
    with tgtd(tmp_path) as server:
        server.target(DISKS)
        server.lun(DISKS, 1, backing)
        source = "json:" + json.dumps({"driver": "iscsi", "filename": server.url(DISKS, 1),
                                       "timeout": 2})

        async def main() -> None:
            node = await open_image(source, RO)
            try:
                assert bytes(await node.read(0, 4096)) == data[:4096]
                server.proc.send_signal(signal.SIGSTOP)
                try:
                    started = time.monotonic()
                    with pytest.raises(ImgfsError) as info:
                        await node.read(65536, 4096)
                    assert info.value.errno == errno.EIO
                    assert "timed out" in str(info.value)
                    assert time.monotonic() - started < 6
                finally:
                    server.proc.send_signal(signal.SIGCONT)
                assert bytes(await node.read(131072, 4096)) == data[131072:135168]
            finally:
                await node.aclose()
        trio.run(main)
