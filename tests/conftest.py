"""Shared test helpers: the real tools as oracles, real mounts.

A test whose oracle tool is missing skips on a laptop; under `make test`
(IMGFS_REQUIRE_ORACLES=1) the same situation fails, so CI never passes
without the oracles.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REQUIRE_ORACLES = os.environ.get("IMGFS_REQUIRE_ORACLES") == "1"
BIN = Path(sys.executable).parent
IMGFS = str(BIN / "imgfs")
MOUNT_HELPER = str(BIN / "mount.imgfs")


def need(*tools: str) -> None:
    """Skip (or, under make test, fail) when an oracle tool is missing."""
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        message = f"oracle tool(s) not installed: {', '.join(missing)}"
        if REQUIRE_ORACLES:
            pytest.fail(message)
        pytest.skip(message)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def connectable(address: str | int) -> bool:
    """Something accepts connections on 127.0.0.1:PORT, or on a unix socket path."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    target = address if isinstance(address, str) else ("127.0.0.1", address)
    with socket.socket(family) as probe:
        try:
            probe.connect(target)
            return True
        except OSError:
            return False


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")


def run(*args: str | os.PathLike[str], check: bool = True, input: bytes | None = None,
        timeout: float = 120, env: dict[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(arg) for arg in args], capture_output=True, timeout=timeout,
                            input=input.decode() if input is not None else None, text=True,
                            env=env, cwd=cwd)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} exited {result.returncode}:\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


def qemu_img_create_encrypted(*args: str | os.PathLike[str]) -> None:
    """`qemu-img create -q ARGS` of an encrypted image, in milliseconds
    (see `fast_pbkdf_environment`)."""
    run("qemu-img", "create", "-q", *args, env=fast_pbkdf_environment())


@functools.cache
def fast_pbkdf_environment() -> dict[str, str]:
    """An environment for `run(..., env=)` in which qemu-img creates LUKS
    images (and encrypt.format=luks) in milliseconds, with QEMU's minimum
    PBKDF iterations (see tests/fake_rusage.c): qemu-img otherwise spends
    seconds per image calibrating against the CPU clock, whatever iter-time
    says, and on a busy machine often fails ("Unable to get accurate CPU
    usage")."""
    need("gcc")
    library = Path(tempfile.mkdtemp(prefix="imgfs-fake-rusage-")) / "fake_rusage.so"
    run("gcc", "-shared", "-fPIC", "-O2", "-o", library, Path(__file__).parent / "fake_rusage.c")
    return {**os.environ, "LD_PRELOAD": str(library)}


@pytest.fixture(scope="session")
def fast_qemu_pbkdf() -> dict[str, str]:
    return fast_pbkdf_environment()


def imgfs(*args: str | os.PathLike[str], check: bool = True, timeout: float = 120,
          cwd: str | os.PathLike[str] | None = None) -> subprocess.CompletedProcess[str]:
    return run(IMGFS, *args, check=check, timeout=timeout, cwd=cwd)


def qemu_raw(image: Path, out: Path, fmt: str | None = None) -> bytes:
    """What an image contains, according to QEMU (the reference answer)."""
    need("qemu-img")
    args = ["qemu-img", "convert", "-U", "-O", "raw"]
    if fmt:
        args += ["-f", fmt]
    run(*args, image, out)
    return out.read_bytes()


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def is_mounted(mountpoint: Path) -> bool:
    target = os.path.realpath(mountpoint)
    with open("/proc/self/mountinfo") as table:
        return any(line.split()[4] == target for line in table)


def pids_whose_argv(match: Callable[[list[bytes]], bool]) -> list[int]:
    """Processes other than this one whose command line `match`es."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                argv = handle.read().split(b"\0")
        except OSError:
            continue
        if match(argv):
            pids.append(int(entry))
    return pids


def daemon_pids(mountpoint: Path) -> list[int]:
    """imgfs processes serving `mountpoint` (found by their command line)."""
    target = os.fsencode(os.path.realpath(mountpoint))
    return pids_whose_argv(lambda argv: any(b"imgfs" in arg for arg in argv[:2])
                           and target in argv)


def stop_process(proc: subprocess.Popen[Any]) -> None:
    """Stop a server the test started, by its PID, and reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_gone(mountpoint: Path, timeout: float = 15) -> None:
    """Wait until the mount is gone and its daemon has flushed and exited."""
    deadline = time.monotonic() + timeout
    while (is_mounted(mountpoint) or daemon_pids(mountpoint)) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not is_mounted(mountpoint), f"{mountpoint} still mounted"
    assert not daemon_pids(mountpoint), f"imgfs for {mountpoint} still running"


def unmount(mountpoint: Path) -> None:
    if is_mounted(mountpoint):
        result = run("umount", mountpoint, check=False)
        if result.returncode != 0:
            time.sleep(0.2)
            run("umount", "-l", mountpoint, check=False)
    wait_gone(mountpoint)


@contextlib.contextmanager
def mounted(*sources: str | os.PathLike[str], mountpoint: Path,
            options: str | None = None, extra: tuple[str, ...] = (),
            cwd: str | os.PathLike[str] | None = None) -> Iterator[Path]:
    """`imgfs mount` for real; always unmounted (and waited for) afterwards."""
    args = ["mount", *extra]
    if options:
        args += ["-o", options]
    args += [str(source) for source in sources] + [str(mountpoint)]
    try:
        imgfs(*args, timeout=60, cwd=cwd)
        yield mountpoint
    finally:
        unmount(mountpoint)


def exposed(mnt: Path, image: Path) -> Path:
    """The raw view of `image` inside a directory mountpoint."""
    return mnt / (image.name.rsplit(".", 1)[0] + ".raw")


def assert_damage_is_eio_and_mount_stays_up(image: Path, mnt: Path, intact: int,
                                            expected: bytes) -> None:
    """`image` mounted with its first block damaged: a read and a write
    there fail with EIO, 4 KiB at `intact` still read `expected`, and the
    mount stays up."""
    with mounted(image, mountpoint=mnt):
        fd = os.open(exposed(mnt, image), os.O_RDWR)
        try:
            for action in (lambda: os.pread(fd, 4096, 0), lambda: os.pwrite(fd, b"x", 10)):
                with pytest.raises(OSError) as info:
                    action()
                assert info.value.errno == errno.EIO
            assert os.pread(fd, 4096, intact) == expected
        finally:
            os.close(fd)
        assert is_mounted(mnt)


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[Path]:
    need_root_or_fuse()
    path = tmp_path / "mnt"
    path.mkdir()
    yield path
    if is_mounted(path):
        unmount(path)


def need_root_or_fuse() -> None:
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


def pread_errno(path: Path, offset: int, length: int, *, direct: bool = False) -> int:
    """0 when a read (O_DIRECT: past the page cache) returns `length`
    bytes, -1 when it returns fewer, else the errno it fails with."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    try:
        return 0 if len(os.pread(fd, length, offset)) == length else -1
    except OSError as exc:
        return exc.errno or -1
    finally:
        os.close(fd)


def pwrite_all(path: Path, writes: list[tuple[int, bytes]],
               expected: bytearray | None = None) -> None:
    """Write every (offset, data) through one descriptor, then fsync; keep
    `expected` (the raw bytes the image should hold) in step."""
    fd = os.open(path, os.O_WRONLY)
    try:
        for offset, data in writes:
            assert os.pwrite(fd, data, offset) == len(data)
            if expected is not None:
                expected[offset:offset + len(data)] = data
        os.fsync(fd)
    finally:
        os.close(fd)


def assert_wrong_passphrase_mounts_nothing(image: Path, mountpoint: Path) -> None:
    """One line naming the image as given (relative, from its directory; then
    absolute), exit 1, the passphrase nowhere, nothing mounted; in the
    background and in the foreground."""
    for name, foreground in ((image.name, ()), (str(image), ()), (image.name, ("-f",))):
        result = subprocess.run(
            [str(IMGFS), "mount", *foreground, "--object", "secret,id=sec0,data=wrong-one",
             "-o", "key-secret=sec0", name, str(mountpoint)],
            cwd=image.parent, capture_output=True, text=True, timeout=60)
        assert result.returncode == 1
        assert result.stderr == f"imgfs: {name}: no key slot matches this passphrase\n"
        assert "wrong-one" not in result.stdout + result.stderr
        assert not is_mounted(mountpoint)


def assert_legacy_aes_mounts_read_only_only(image: Path, mountpoint: Path, warning: str,
                                            expected: bytes) -> None:
    """A legacy AES image (qcow or qcow2, secret sec0 = "pass"): a read-write
    mount is refused (one line naming -o ro, nothing mounted); with -o ro it
    mounts, warns naming the image as typed, and reads `expected`; the image
    is never changed."""
    secret = ["--object", "secret,id=sec0,data=pass"]
    before = image.read_bytes()
    result = imgfs("mount", *secret, "-o", "key-secret=sec0", image, mountpoint, check=False)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert warning in result.stderr and "-o ro" in result.stderr
    assert not is_mounted(mountpoint)
    result = imgfs("mount", *secret, "-o", "ro,key-secret=sec0", image.name, mountpoint,
                   timeout=60, cwd=image.parent)
    try:
        assert warning in result.stderr
        # the warning names the image as typed, not the daemon's absolute path
        assert f"imgfs: {image.name}: " in result.stderr
        assert str(image.parent) not in result.stderr
        assert (mountpoint / (image.stem + ".raw")).read_bytes() == expected
    finally:
        unmount(mountpoint)
    assert image.read_bytes() == before


def write_through_api(image: str | os.PathLike[str], writes: list[tuple[int, bytes]],
                      ctx: Any = None) -> None:
    """Open `image` read-write through imgfs's block graph (no mount), write
    each (offset, data), flush and close."""
    import trio

    from imgfs.graph import open_image
    from imgfs.node import OpenContext

    async def main() -> None:
        node = await open_image(str(image), ctx or OpenContext(read_only=False))
        try:
            for offset, data in writes:
                await node.write(offset, data)
            await node.flush()
        finally:
            await node.aclose()
    trio.run(main)


@pytest.fixture
def slot_openings(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The passphrase of every LUKS1 or LUKS2 key slot opening that runs
    the KDF (luks.early's head start included), in order."""
    from imgfs.drivers.luks import luks1, luks2
    opened: list[bytes] = []
    for module in (luks1, luks2):
        def counting(header: Any, slot: Any, material: bytes, passphrase: bytes, *,
                     real: Any = module.open_slot) -> bytes | None:
            opened.append(passphrase)
            return real(header, slot, material, passphrase)
        monkeypatch.setattr(module, "open_slot", counting)
    return opened


def kill_daemon_while_writing(mountpoint: Path, write: Callable[[threading.Event], None],
                              ready: Callable[[], bool]) -> None:
    """SIGKILL the daemon serving `mountpoint` once `ready()` says so, while a
    thread runs `write(stop)` (it returns once `stop` is set or its writes
    fail)."""
    stop = threading.Event()
    writer = threading.Thread(target=write, args=(stop,))
    writer.start()
    try:
        while not ready() and writer.is_alive():
            stop.wait(0.01)
        for pid in daemon_pids(mountpoint):
            os.kill(pid, signal.SIGKILL)
    finally:
        stop.set()
        writer.join()


def kill_daemon_mid_writes(mountpoint: Path, view: Path, start: int, length: int,
                           *, writes_first: int = 20) -> None:
    """SIGKILL the daemon serving `mountpoint` while a thread keeps writing
    50 kB pieces (unsynced) to `view` between `start` and `start + length`;
    at least `writes_first` of them are done before the kill."""
    written: list[int] = []

    def write_until_gone(stop: threading.Event) -> None:
        fd = os.open(view, os.O_WRONLY)
        try:
            while not stop.is_set():
                number = len(written) + 1
                os.pwrite(fd, random_bytes(50_000, seed=1000 + number),
                          start + (number * 123_457) % (length - 50_000))
                written.append(number)
        except OSError:
            pass                       # ENOTCONN once the daemon is killed
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)

    kill_daemon_while_writing(mountpoint, write_until_gone,
                              lambda: len(written) >= writes_first)
    assert len(written) >= writes_first


def random_bytes(size: int, seed: int = 1) -> bytes:
    import random
    return random.Random(seed).randbytes(size)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """Under `make test`, a skip because an oracle is "not installed" is a
    failure, whichever way the test spelled its skip."""
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_ORACLES and report.skipped and "not installed" in str(report.longrepr):
        report.outcome = "failed"
        report.longrepr = f"oracle missing under make test: {report.longrepr}"
