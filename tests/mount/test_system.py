"""imgfs as the system sees it: mount(8), fstab, losetup, ext4, locks, signals."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pyfuse3
import pytest

from imgfs.mount import fuse_devices
from tests.conftest import (
    BIN,
    IMGFS,
    MOUNT_HELPER,
    daemon_pids,
    imgfs,
    is_mounted,
    mounted,
    need,
    need_root,
    qemu_raw,
    run,
    unmount,
    wait_gone,
)

MiB = 1 << 20


@pytest.fixture
def image(workdir: Path) -> Path:
    need("qemu-img", "qemu-io")
    path = workdir / "vm.img"
    run("qemu-img", "create", "-f", "raw", path, "64M")
    run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 1M 64k", path)
    return path


def _env_with_imgfs() -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}


@pytest.fixture
def system_install() -> Iterator[None]:
    """mount(8) runs /sbin/mount.imgfs, and mount.fuse3 runs `imgfs` from
    the standard PATH mount(8) sets: provide both if `make install` has not."""
    need_root()
    wrappers = {Path("/sbin/mount.imgfs"): MOUNT_HELPER, Path("/usr/local/bin/imgfs"): IMGFS}
    created = []
    for path, target in wrappers.items():
        if not path.exists():
            path.write_text(f"#!/bin/sh\nexec {target} \"$@\"\n")
            path.chmod(0o755)
            created.append(path)
    try:
        yield
    finally:
        for path in created:
            path.unlink()


def test_mount_t_fuse_imgfs(image: Path, mnt: Path, system_install: None) -> None:
    need("mount.fuse3")
    run("mount", "-t", "fuse.imgfs", "-o", "ro", image, mnt, env=_env_with_imgfs())
    try:
        assert (mnt / "vm.raw").read_bytes()[MiB:MiB + 65536] == b"\x5a" * 65536
        assert "fuse.imgfs" in run("findmnt", "-n", "-o", "FSTYPE", mnt).stdout
    finally:
        unmount(mnt)


def test_mount_t_imgfs_and_fstab(image: Path, mnt: Path, workdir: Path,
                                 system_install: None) -> None:
    run("mount", "-t", "imgfs", "-o", "ro", image, mnt, env=_env_with_imgfs())
    try:
        assert (mnt / "vm.raw").stat().st_size == 64 * MiB
    finally:
        unmount(mnt)
    fstab = workdir / "fstab"
    fstab.write_text(f"{image}  {mnt}  imgfs  ro,noatime,nofail  0 0\n"
                     f"{image}  {workdir}  fuse.imgfs  rw,allow_other,noauto  0 0\n")
    run("mount", "--fstab", fstab, str(mnt), env=_env_with_imgfs())
    try:
        assert (mnt / "vm.raw").read_bytes()[MiB:MiB + 4] == b"\x5a" * 4
        with pytest.raises(OSError):
            os.open(mnt / "vm.raw", os.O_WRONLY)
    finally:
        unmount(mnt)


def test_mount_helper_sloppy(image: Path, mnt: Path) -> None:
    """mount.imgfs -s (mount(8)'s "tolerate sloppy options"): an option no
    driver knows is ignored with a warning; without -s it is refused."""
    refused = run(MOUNT_HELPER, image, mnt, "-o", "ro,no-such-option=1", check=False)
    assert refused.returncode != 0 and "no-such-option" in refused.stderr
    assert not os.path.ismount(mnt)
    done = run(MOUNT_HELPER, "-s", image, mnt, "-o", "ro,no-such-option=1")
    try:
        assert "no-such-option" in done.stderr
        assert (mnt / "vm.raw").read_bytes()[MiB:MiB + 4] == b"\x5a" * 4
    finally:
        unmount(mnt)


def test_losetup_mkfs_ext4_on_the_raw_view(image: Path, mnt: Path, workdir: Path) -> None:
    need_root()
    need("losetup", "mkfs.ext4", "sfdisk", "e2fsck")
    fs_dir = workdir / "fs"
    fs_dir.mkdir()
    payload = os.urandom(3 * MiB + 17)
    with mounted(image, mountpoint=mnt):
        raw = mnt / "vm.raw"
        run("sfdisk", "-q", raw, input=b"label: dos\n2048,,L\n")
        assert "vm.raw1" in run("fdisk", "-l", raw).stdout
        loop = run("losetup", "--show", "-f", "-o", str(2048 * 512), raw).stdout.strip()
        try:
            run("mkfs.ext4", "-q", loop)
            run("mount", loop, fs_dir)
            try:
                (fs_dir / "payload.bin").write_bytes(payload)
            finally:
                run("umount", fs_dir)
        finally:
            run("losetup", "-d", loop)
    # The filesystem inside the image is clean and holds the file, seen
    # straight from the image file with the fuse mount gone.
    loop = run("losetup", "--show", "-r", "-f", "-o", str(2048 * 512), image).stdout.strip()
    try:
        run("e2fsck", "-fn", loop)
        run("mount", "-o", "ro", loop, fs_dir)
        try:
            assert (fs_dir / "payload.bin").read_bytes() == payload
        finally:
            run("umount", fs_dir)
    finally:
        run("losetup", "-d", loop)


def test_losetup_partscan(image: Path, mnt: Path) -> None:
    """losetup -P on the raw view; the kernel here may not scan partitions
    of loop devices, so partx adds them when it does not."""
    need_root()
    need("losetup", "partx", "sfdisk", "mkfs.ext4")
    with mounted(image, mountpoint=mnt):
        raw = mnt / "vm.raw"
        run("sfdisk", "-q", raw, input=b"label: dos\n2048,,L\n")
        loop = run("losetup", "-P", "--show", "-f", raw).stdout.strip()
        try:
            run("partx", "-a", loop, check=False)
            part = Path(f"{loop}p1")
            deadline = time.monotonic() + 5
            while not part.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            if not part.exists():
                pytest.skip("the kernel exposes no partitions of loop devices here")
            run("mkfs.ext4", "-q", part)
        finally:
            run("partx", "-d", loop, check=False)
            run("losetup", "-d", loop)
    assert run("blkid", "-p", "-O", str(2048 * 512), image, check=False).stdout.count("ext4")


# -- locking against QEMU, both directions ---------------------------------------------


def test_qemu_io_cannot_write_while_mounted(image: Path, mnt: Path) -> None:
    with mounted(image, mountpoint=mnt):
        result = run("qemu-io", "-f", "raw", "-c", "write 0 4k", image, check=False)
        assert result.returncode != 0
        assert "lock" in result.stderr
        assert run("qemu-img", "info", "-U", image).returncode == 0
    # released once the daemon is gone
    run("qemu-io", "-f", "raw", "-c", "write 0 4k", image)


def test_read_only_mount_blocks_writers_but_not_readers(image: Path, mnt: Path) -> None:
    with mounted(image, mountpoint=mnt, options="ro"):
        assert run("qemu-io", "-r", "-f", "raw", "-c", "read 0 4k", image).returncode == 0
        result = run("qemu-io", "-f", "raw", "-c", "write 0 4k", image, check=False)
        assert result.returncode != 0 and "lock" in result.stderr


@pytest.fixture
def qsd_writer(image: Path, workdir: Path) -> Iterator[None]:
    """qemu-storage-daemon holding the image read-write (an NBD export)."""
    need("qemu-storage-daemon")
    sock = workdir / "qsd.sock"
    proc = subprocess.Popen(
        ["qemu-storage-daemon",
         "--blockdev", f"driver=file,node-name=f0,filename={image}",
         "--blockdev", "driver=raw,node-name=r0,file=f0",
         "--nbd-server", f"addr.type=unix,addr.path={sock}",
         "--export", "type=nbd,id=e0,node-name=r0,writable=on"],
        stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while not sock.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_mount_refused_while_qemu_writes(image: Path, mnt: Path, qsd_writer: None) -> None:
    result = imgfs("mount", image, mnt, check=False)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "locked" in result.stderr
    assert "Traceback" not in result.stderr
    assert not is_mounted(mnt)
    result = imgfs("mount", "-o", "ro", image, mnt, check=False)
    assert result.returncode == 1 and "-U" in result.stderr
    assert not is_mounted(mnt)
    with mounted(image, mountpoint=mnt, options="ro,force-share"):
        assert (mnt / "vm.raw").stat().st_size == 64 * MiB
    # the tools: refused while QEMU writes, unless -U
    result = imgfs("info", image, check=False)
    assert result.returncode == 1 and "locked" in result.stderr
    assert imgfs("info", "-U", image).returncode == 0
    assert imgfs("convert", "-U", "-O", "raw", image, image.with_suffix(".copy")).returncode == 0


def test_locking_off(image: Path, mnt: Path, qsd_writer: None) -> None:
    with mounted(image, mountpoint=mnt, options="ro,locking=off"):
        assert (mnt / "vm.raw").stat().st_size == 64 * MiB


# -- life cycle -------------------------------------------------------------------------


def test_sigterm_flushes_and_unmounts(image: Path, mnt: Path, workdir: Path) -> None:
    imgfs("mount", image, mnt)
    fd = os.open(mnt / "vm.raw", os.O_WRONLY)
    os.pwrite(fd, b"\x77" * 8192, 4096)
    os.close(fd)
    pids = daemon_pids(mnt)
    assert len(pids) == 1
    os.kill(pids[0], signal.SIGTERM)
    wait_gone(mnt)
    assert image.read_bytes()[4096:4096 + 8192] == b"\x77" * 8192
    run("qemu-io", "-f", "raw", "-c", "write 0 4k", image)       # locks released


def test_foreground_mode(image: Path, mnt: Path) -> None:
    proc = subprocess.Popen([IMGFS, "mount", "-f", str(image), str(mnt)],
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not is_mounted(mnt) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert (mnt / "vm.raw").stat().st_size == 64 * MiB
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 0
    assert not is_mounted(mnt)


def need_nobody_can_run_imgfs() -> None:
    need_root()
    need("fusermount3", "runuser")
    if run("runuser", "-u", "nobody", "--", IMGFS, "--version", check=False).returncode:
        pytest.skip(f"user nobody cannot run {IMGFS} (its interpreter or directory is "
                    "private; `make test` builds the venv from /usr/bin/python3)")


@pytest.fixture
def user_fuse() -> Iterator[None]:
    """/dev/fuse as Debian's udev rule leaves it (0666): some containers make
    it root-only, and libfuse then cannot mount for ordinary users at all."""
    need_nobody_can_run_imgfs()
    mode = os.stat("/dev/fuse").st_mode & 0o777
    os.chmod("/dev/fuse", 0o666)
    try:
        yield
    finally:
        os.chmod("/dev/fuse", mode)


def test_ordinary_user_can_mount(workdir: Path, user_fuse: None) -> None:
    home = Path("/var/tmp") / f"imgfs-user-{os.getpid()}"
    home.mkdir(mode=0o777)
    try:
        image, mountpoint = home / "user.img", home / "mnt"
        image.write_bytes(b"u" * MiB)
        mountpoint.mkdir()
        os.chown(image, 65534, 65534)
        os.chown(mountpoint, 65534, 65534)
        result = run("runuser", "-u", "nobody", "--", IMGFS, "mount", image, mountpoint,
                     check=False)
        assert result.returncode == 0, result.stderr
        try:
            data = run("runuser", "-u", "nobody", "--", "head", "-c", "4",
                       mountpoint / "user.raw").stdout
            assert data == "uuuu"
            # without allow_other, nobody else (not even root) sees inside
            with pytest.raises(PermissionError):
                os.stat(mountpoint / "user.raw")
        finally:
            run("runuser", "-u", "nobody", "--", "fusermount3", "-u", mountpoint)
            wait_gone(mountpoint)
    finally:
        run("rm", "-rf", home)


# -- errors -----------------------------------------------------------------------------


@pytest.mark.parametrize("args, status, text", [
    (["mount", "/nonexistent/disk.img", "MNT"], 1, "No such file"),
    (["mount", "-o", "bogus=1", "IMG", "MNT"], 2, "unknown option 'bogus'"),
    (["mount", "-o", "cache=fast", "IMG", "MNT"], 2, "cache"),
    (["mount", "IMG", "/nonexistent/mnt"], 2, "mountpoint"),
    (["mount", "IMG", "IMG", "MNT"], 2, "both appear as"),
    (["mount", "-o", "name=x", "IMG", "IMG2", "MNT"], 2, "single SOURCE"),
    (["create", "-f", "nosuchformat", "X", "1M"], 2, "unknown format"),
    (["create", "-f", "raw", "X", "12Q"], 2, "invalid size"),
    (["info", "/nonexistent.img"], 1, "No such file"),
    (["frobnicate"], 2, ""),
])
def test_clean_errors(args: list[str], status: int, text: str, image: Path, mnt: Path,
                      workdir: Path) -> None:
    image2 = workdir / "other.img"
    image2.write_bytes(bytes(MiB))
    replace = {"MNT": str(mnt), "IMG": str(image), "IMG2": str(image2), "X": str(workdir / "x")}
    result = imgfs(*[replace.get(arg, arg) for arg in args], check=False)
    assert result.returncode == status, result.stderr
    assert result.stderr.startswith("imgfs") and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 or args == ["frobnicate"]
    assert text in result.stderr
    assert not is_mounted(mnt)


def test_unreadable_image(workdir: Path, mnt: Path) -> None:
    need_nobody_can_run_imgfs()
    image = workdir / "secret.img"
    image.write_bytes(bytes(MiB))
    image.chmod(0o600)
    os.chmod(workdir, 0o755)
    os.chmod(mnt, 0o777)
    result = run("runuser", "-u", "nobody", "--", IMGFS, "info", image, check=False)
    assert result.returncode == 1
    assert "Permission denied" in result.stderr and "Traceback" not in result.stderr


def test_write_protected_image_mounts_read_only(workdir: Path, mnt: Path,
                                                user_fuse: None) -> None:
    """As mount(8) does for a write-protected device: read-only, with a warning."""
    home = Path("/var/tmp") / f"imgfs-wp-{os.getpid()}"
    home.mkdir(mode=0o777)
    try:
        image, mountpoint = home / "wp.img", home / "mnt"
        image.write_bytes(b"w" * MiB)
        image.chmod(0o644)
        mountpoint.mkdir()
        os.chown(mountpoint, 65534, 65534)
        result = run("runuser", "-u", "nobody", "--", IMGFS, "mount", image, mountpoint,
                     check=False)
        assert result.returncode == 0, result.stderr
        assert "read-only" in result.stderr
        run("runuser", "-u", "nobody", "--", "fusermount3", "-u", mountpoint)
        wait_gone(mountpoint)
        result = run("runuser", "-u", "nobody", "--", IMGFS, "mount", "-o", "rw", image,
                     mountpoint, check=False)
        assert result.returncode == 1 and "Permission denied" in result.stderr
        assert not is_mounted(mountpoint)
    finally:
        run("rm", "-rf", home)


def test_info_json_keys_match_qemu(image: Path) -> None:
    ours = json.loads(imgfs("info", "--output=json", image).stdout)
    theirs = json.loads(run("qemu-img", "info", "--output=json", image).stdout)
    assert set(theirs) <= set(ours)


def test_create_raw_matches_qemu(workdir: Path) -> None:
    need("qemu-img")
    for prealloc in ("off", "falloc", "full"):
        path = workdir / f"new-{prealloc}.img"
        out = imgfs("create", "-f", "raw", "-o", f"preallocation={prealloc}", path, "3M").stdout
        assert out.startswith(f"Formatting '{path}', fmt=raw size=3145728")
        info = json.loads(run("qemu-img", "info", "--output=json", path).stdout)
        assert info["virtual-size"] == 3 * MiB and info["format"] == "raw"
        if prealloc != "off":
            assert os.stat(path).st_blocks * 512 >= 3 * MiB
    assert qemu_raw(workdir / "new-full.img", workdir / "out.raw") == bytes(3 * MiB)


def test_host_block_device_as_source(image: Path, mnt: Path) -> None:
    """A /dev path: size from the device (not st_size), reads and writes."""
    need_root()
    need("losetup")
    loop = run("losetup", "--show", "-f", image).stdout.strip()
    try:
        with mounted(loop, mountpoint=mnt):
            exposed = mnt / f"{Path(loop).name}.raw"
            assert exposed.stat().st_size == 64 * MiB
            assert exposed.read_bytes()[MiB:MiB + 65536] == b"\x5a" * 65536
            fd = os.open(exposed, os.O_WRONLY)
            try:
                os.pwrite(fd, b"\x42" * 4096, 8 * MiB)
                os.fsync(fd)
            finally:
                os.close(fd)
        info = json.loads(imgfs("info", "--output=json", loop).stdout)
        assert info["virtual-size"] == 64 * MiB and info["format"] == "raw"
    finally:
        run("losetup", "-d", loop)
    assert image.read_bytes()[8 * MiB:8 * MiB + 4096] == b"\x42" * 4096


def test_create_nocow_on_btrfs(workdir: Path) -> None:
    need_root()
    need("mkfs.btrfs", "lsattr")
    backing = workdir / "btrfs.img"
    with open(backing, "wb") as handle:
        handle.truncate(256 * MiB)
    run("mkfs.btrfs", "-q", backing)
    fs_dir = workdir / "btrfs"
    fs_dir.mkdir()
    result = run("mount", "-o", "loop", backing, fs_dir, check=False)
    if result.returncode:
        pytest.skip(f"cannot mount btrfs here: {result.stderr.strip()}")
    try:
        imgfs("create", "-f", "raw", "-o", "nocow=on", fs_dir / "nocow.img", "1M")
        imgfs("create", "-f", "raw", fs_dir / "cow.img", "1M")
        assert "C" in run("lsattr", fs_dir / "nocow.img").stdout.split()[0]
        assert "C" not in run("lsattr", fs_dir / "cow.img").stdout.split()[0]
    finally:
        run("umount", fs_dir)


def test_daemon_warnings_go_to_syslog(workdir: Path, mnt: Path) -> None:
    """Once detached, the daemon's warnings (here: EIO for a file of a fat:
    source that vanished on the host) reach syslog through /dev/log."""
    import socket
    need_root()
    if os.path.exists("/dev/log"):
        pytest.skip("a syslog daemon owns /dev/log on this machine")
    share = workdir / "share"
    share.mkdir()
    (share / "gone.bin").write_bytes(os.urandom(256 * 1024))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind("/dev/log")
    listener.settimeout(10)
    try:
        with mounted(f"fat:{share}", mountpoint=mnt):
            (share / "gone.bin").unlink()
            fd = os.open(mnt / "share.raw", os.O_RDONLY | os.O_DIRECT)
            try:
                with pytest.raises(OSError):
                    for offset in range(0, os.fstat(fd).st_size, 1 << 20):
                        os.pread(fd, 1 << 20, offset)
            finally:
                os.close(fd)
            message = listener.recv(4096).decode()
        assert "imgfs[" in message and "gone.bin" in message
    finally:
        listener.close()
        os.unlink("/dev/log")


def test_the_mount_knows_which_descriptor_its_fuse_session_reads(mnt: Path) -> None:
    """pyfuse3 does not say which descriptor its session reads: the mount
    takes the /dev/fuse descriptor that init opened (a reader spinning for
    its reply gives way to it: imgfs.spin)."""
    before = fuse_devices()
    pyfuse3.init(pyfuse3.Operations(), str(mnt), set())
    try:
        opened = fuse_devices() - before
        assert len(opened) == 1
        assert os.readlink(f"/proc/self/fd/{opened.pop()}") == "/dev/fuse"
    finally:
        pyfuse3.close(unmount=True)
