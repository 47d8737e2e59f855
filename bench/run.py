#!/usr/bin/env python3
"""imgfs benchmark: imgfs against qemu-storage-daemon's FUSE export.

Method
------
For each case (an image format, see CASES) one image is built in a scratch
directory under /var/tmp (a real disk, not tmpfs, so the image file behaves
as a user's would).  Every metric is then measured through both exporters,
imgfs first and qemu-storage-daemon ("qsd") right after it, so that the two
numbers of a ratio are taken seconds apart on the same machine state:

* seq_read     MB/s, 1 MiB reads, one pass over the whole raw view per fio
               run, repeated until the runtime is used (see seq_read_job)
* rand_read    IOPS, 4 KiB random reads, time-based
* rand_read_16   the same by 16 readers at once, O_DIRECT (network cases,
               no target: what a guest or several programs reading at once
               see, where queue depth 1 shows one request's round trip)
* rand_write   IOPS, 4 KiB random writes, time-based, ends with an fsync
* seq_write    MB/s, 1 MiB writes, time-based, ends with an fsync
* seq_write_new  MB/s, 1 MiB writes filling a freshly created empty image
               once (what "copy a disk into a new image" costs)
* mount_latency  ms from starting the mount command until the raw file
               opens and its first 4 KiB has been read; median of N
* kdf_open     the same, for an encrypted case, on a copy of its image made
               with QEMU's default iter-time (2 s) instead of the short one
               the other metrics use; the target is the PBKDF's own time

All I/O jobs use fio with ioengine=psync, iodepth=1, direct=0: buffered I/O,
so the kernel's FUSE page cache and read-ahead act exactly as they do for a
user running dd or cp (both exporters pass writes by without caching them:
qsd sets direct_io on every open, imgfs on opens for writing).

Cache state is controlled deliberately, because with direct=0 a careless
benchmark measures memory copies instead of the exporter:

* Every job gets a fresh mount (a new daemon, an empty FUSE page cache, no
  dirty pages left over from the previous job), preceded by
  `sync; echo 3 > /proc/sys/vm/drop_caches`.
* The image file itself is then read once into the host page cache, for
  both exporters alike.  We benchmark the request path of the FUSE daemon,
  not the disk under /var/tmp; with a cold host cache both daemons would be
  capped by the disk and every ratio would tend to 1.  `--cold` skips this
  warm-up to show the disk-bound picture.
* Sequential reads never read a byte twice in one fio run: a time-based job
  wraps around at the end of the file and would read the second pass out of
  the page cache (8 GB/s here, for imgfs which keeps the cache across
  opens).  So each fio run reads the file exactly once, and fio's
  invalidate=1 (posix_fadvise DONTNEED at open) empties the FUSE page cache
  before each further pass.
* Random reads are safe as time-based jobs: fio's random map visits every
  block once before repeating any, and fio's fadvise(RANDOM) turns off
  read-ahead, so every 4 KiB read reaches the daemon unless the run covers
  the whole file (only with --quick's small image).  Each job reads its own
  random sequence of blocks, so that a server's own cache favours neither
  exporter (see rand_read_job).
* A server that keeps state of its own, which the first job would leave
  behind for the next, is settled before the first job (bench/servers.py:
  tgtd's allocator).
* Write jobs end with fsync (end_fsync=1), counted in fio's runtime: a
  write is "done" only once the layers below the daemon have made it
  durable.

Results go to a table on stdout (imgfs, qsd, ratio imgfs/qsd, target,
PASS/FAIL; for mount latency the ratio is qsd/imgfs and the target is on
imgfs's absolute ms; each daemon's CPU time per I/O or per MiB, which other
load on the machine distorts far less than the rates), a last line saying
how many targets hold, and bench/results/<timestamp>.json with the machine
description.  `--profile` additionally samples imgfs with py-spy during each
of its I/O jobs and prints the hottest functions (the numbers of a profiled
run are perturbed by the sampling and are marked so in the JSON);
`--profile=native` includes C frames, which shows how much of a request is
the read/writev on /dev/fuse, the pread/pwrite on the image, and epoll.
`--imgfs CMD` benchmarks another imgfs command (a wrapper that patches
something for an A/B experiment, or another checkout).  `--repeat N` measures
each metric N times, alternating the exporters, and reports medians: use it
on a machine with other load, where single 10 s runs vary by +-30%.
`--only METRIC,...` measures a subset.

Needs root (drop_caches, FUSE mounts), fio, qemu-img, qemu-storage-daemon.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime
import importlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
SCRATCH_PARENT = "/var/tmp"
SECRET_ID = "sec0"
PASSPHRASE = "imgfs-bench"
# A short PBKDF keeps LUKS mounts (several per metric) from dominating the
# run; both exporters pay the same PBKDF, so the comparison is unaffected.
LUKS_ITER_TIME_MS = 200
# "Opening takes no longer than the PBKDF itself" is a claim about the images
# people have: qemu-img's (and cryptsetup's LUKS1) default iter-time.  With
# the short one, the ~150 ms of CPU any mount spends loading trio and pyfuse3
# is as large as the PBKDF itself, on a machine with few cores.
DEFAULT_ITER_TIME_MS = 2000
CLUSTER_SIZE = 65536
MiB = 1024 * 1024
GiB = 1024 * MiB


# -- metrics and cases --------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    name: str
    label: str
    unit: str
    #: "latency" metrics compare qsd/imgfs (lower is better), others imgfs/qsd
    kind: str = "rate"


METRICS = {m.name: m for m in (
    Metric("seq_read", "sequential read 1M", "MB/s"),
    Metric("rand_read", "4k random read", "IOPS"),
    Metric("rand_read_16", "4k random read x16", "IOPS"),
    Metric("rand_write", "4k random write", "IOPS"),
    Metric("seq_write", "sequential write 1M", "MB/s"),
    Metric("seq_write_new", "seq write, new image", "MB/s"),
    Metric("mount_latency", "mount latency", "ms", kind="latency"),
    Metric("kdf_open", "mount latency 2s KDF", "ms", kind="latency"),
)}


@dataclass(frozen=True)
class Target:
    """min_ratio: imgfs/qsd must reach it; max_ms: imgfs's own latency cap;
    within_pbkdf: imgfs's latency is at most the image's PBKDF (measured in
    the run, see pbkdf_ms), which run_case turns into a max_ms."""
    min_ratio: float | None = None
    max_ms: float | None = None
    within_pbkdf: bool = False

    def describe(self) -> str:
        if self.max_ms is not None:
            return f"<= {self.max_ms:g} ms"
        if self.within_pbkdf:
            return "<= PBKDF"
        return f">= {self.min_ratio:g}x"

    def met(self, ratio: float, imgfs_value: float) -> bool:
        if self.max_ms is not None:
            return imgfs_value <= self.max_ms
        return self.min_ratio is not None and ratio >= self.min_ratio


@dataclass(frozen=True)
class Case:
    name: str
    #: the driver name, for imgfs `-o format=` and qsd `driver=`
    fmt: str
    #: formats `imgfs formats` must list for the case to run
    needs: tuple[str, ...]
    #: qemu-img convert arguments that turn random raw data into the image
    #: ({iter_time} in them: the LUKS iter-time, see build_image)
    convert_args: tuple[str, ...]
    #: qemu-img create arguments for an empty image (seq_write_new), if used
    create_args: tuple[str, ...] = ()
    #: metric name -> target (None: measured and reported, no target)
    metrics: dict[str, Target | None] = field(default_factory=dict)
    encrypted: bool = False
    #: how qsd's format node is given the secret (luks: key-secret=ID; qcow2 also
    #: needs encrypt.format=luks beside encrypt.key-secret=ID)
    qsd_secret_options: str = f"key-secret={SECRET_ID}"
    #: "" for a local file, else the server that serves the image on
    #: loopback for the case (bench/servers.py's serve_NAME); both exporters
    #: then reach it through their own driver for that protocol
    server: str = ""
    #: the raw data the image is converted from: "random", or "text" for a
    #: compressed case (see source_data: random data does not compress, and
    #: qemu-img convert -c then stores every cluster uncompressed)
    source: str = "random"
    #: the image is built by this function of (raw data, image path)
    #: instead of qemu-img convert (formats QEMU cannot write: dmg)
    builder: Callable[[Path, Path], None] | None = None
    #: the format can only be read: qsd's nodes and export are read-only too
    read_only: bool = False


@dataclass(frozen=True)
class Served:
    """How both exporters reach an image that a server serves."""

    #: the SOURCE `imgfs mount` is given
    imgfs_source: str
    #: qemu-storage-daemon's protocol node (QEMU's driver), without node-name
    qsd_file_node: str
    #: the raw file imgfs shows for that source
    raw_name: str
    #: the protocol is read-only (http): qsd's nodes and export are too
    read_only: bool = False
    #: QEMU 7.2's curl driver often deadlocks (a request never completes)
    #: on a sequential read unless the mount's read-ahead is off; qsd opens
    #: with direct_io, so read-ahead does not otherwise change what it is asked
    qsd_read_ahead_off: bool = False


def _luks_create_opts(prefix: str) -> str:
    return (f"{prefix}key-secret={SECRET_ID},{prefix}cipher-alg=aes-256,"
            f"{prefix}cipher-mode=xts,{prefix}ivgen-alg=plain64,"
            f"{prefix}iter-time={{iter_time}}")


QCOW2_OPTS = f"cluster_size={CLUSTER_SIZE}"
# (issue 20: the sector cipher in C puts LUKS ahead of qsd on every row)
LUKS_TARGETS: dict[str, Target | None] = {
    "seq_read": Target(3.0), "rand_read": Target(1.0), "rand_write": None,
    "seq_write": Target(3.0), "mount_latency": None,
    # "opening takes no longer than the PBKDF itself" (issue 4)
    "kdf_open": Target(within_pbkdf=True),
}

NETWORK_TARGETS: dict[str, Target | None] = {
    "seq_read": Target(1.5), "rand_read": Target(1.0), "seq_write": Target(1.0),
    "mount_latency": None, "rand_read_16": None,
}

def write_udif(source: Path, image: Path) -> None:
    """A zlib DMG (UDZO, 1 MiB chunks) by the tests' own UDIF writer."""
    sys.path.insert(0, str(BENCH_DIR.parent))
    from tests.dmg_images import write_zlib_image
    write_zlib_image(source, image)


CASES = {c.name: c for c in (
    Case("raw", "raw", ("raw",), ("-O", "raw"), metrics={
        "seq_read": Target(2.0), "rand_read": Target(0.9), "rand_write": Target(1.0),
        "seq_write": Target(1.2), "mount_latency": Target(max_ms=200),
    }),
    Case("qcow2", "qcow2", ("qcow2",), ("-O", "qcow2", "-o", QCOW2_OPTS),
         create_args=("-f", "qcow2", "-o", QCOW2_OPTS), metrics={
             "seq_read": Target(1.5), "rand_read": Target(0.8),
             # the image is converted from random data: every cluster is allocated
             "rand_write": Target(0.8), "seq_write": None,
             "seq_write_new": Target(1.0), "mount_latency": None,
         }),
    Case("qed", "qed", ("qed",), ("-O", "qed", "-o", QCOW2_OPTS),
         create_args=("-f", "qed", "-o", QCOW2_OPTS), metrics={
             "seq_read": Target(1.5), "rand_read": Target(0.8),
             # converted from random data: every cluster is allocated
             "rand_write": Target(0.8), "seq_write": None,
             "seq_write_new": Target(1.0), "mount_latency": None,
         }),
    # issue 16: a dynamic VDI (1 MiB blocks), converted from random data
    Case("vdi", "vdi", ("vdi",), ("-O", "vdi"), create_args=("-f", "vdi"), metrics={
        "seq_read": Target(1.5), "rand_read": Target(0.8), "rand_write": Target(0.8),
        "seq_write": None, "seq_write_new": None, "mount_latency": None,
    }),
    # issue 16: the one-level catalog on the mapped layer (no targets set yet)
    Case("parallels", "parallels", ("parallels",), ("-O", "parallels", "-o", QCOW2_OPTS),
         create_args=("-f", "parallels", "-o", QCOW2_OPTS), metrics={
             "seq_read": None, "rand_read": None, "rand_write": None, "seq_write": None,
             "seq_write_new": None, "mount_latency": None,
         }),
    # issue 15: a dynamic VHDX (qemu-img's default layout; new blocks are
    # mapped through the log)
    Case("vhdx", "vhdx", ("vhdx",), ("-O", "vhdx", "-o", "subformat=dynamic"),
         create_args=("-f", "vhdx"), metrics={
             "seq_read": Target(1.5), "rand_read": Target(0.8),
             # converted from random data: every block is allocated
             "rand_write": Target(0.8), "seq_write": None,
             "seq_write_new": Target(1.0), "mount_latency": None,
         }),
    # issue 14: VMDK's monolithicSparse (64 KiB grains)
    Case("vmdk", "vmdk", ("vmdk",), ("-O", "vmdk"),
         create_args=("-f", "vmdk"), metrics={
             "seq_read": Target(1.5), "rand_read": Target(0.8),
             # converted from random data: every grain is allocated
             "rand_write": Target(0.8), "seq_write": None,
             "seq_write_new": Target(1.0), "mount_latency": None,
         }),
    # issue 15: a dynamic VHD (2 MiB blocks, a one-level BAT); qemu-img
    # rounds the size up to a CHS geometry, so the raw view is a little larger
    Case("vpc", "vpc", ("vpc",), ("-O", "vpc"), create_args=("-f", "vpc"), metrics={
        "seq_read": Target(1.5), "rand_read": Target(0.8),
        # converted from random data: every block is allocated
        "rand_write": Target(0.8), "seq_write": None,
        "seq_write_new": Target(1.0), "mount_latency": None,
    }),
    # issue 17: an image on a web server, read with range requests
    Case("http", "raw", ("raw",), ("-O", "raw"), server="http", metrics={
        "seq_read": Target(1.5), "rand_read": Target(1.0), "mount_latency": None,
    }),
    Case("qcow2-compressed", "qcow2", ("qcow2",), ("-c", "-O", "qcow2", "-o", QCOW2_OPTS),
         metrics={"seq_read": Target(1.5), "rand_read": Target(1.0), "mount_latency": None},
         source="text"),
    Case("luks", "luks", ("luks",), ("-O", "luks", "-o", _luks_create_opts("")),
         metrics=LUKS_TARGETS, encrypted=True),
    Case("qcow2-luks", "qcow2", ("qcow2", "luks"),
         ("-O", "qcow2", "-o", f"{QCOW2_OPTS},encrypt.format=luks,"
          + _luks_create_opts("encrypt.")),
         metrics=LUKS_TARGETS, encrypted=True,
         qsd_secret_options=f"encrypt.format=luks,encrypt.key-secret={SECRET_ID}"),
    # issue 16: a DMG of zlib chunks, read-only; each chunk decoded once
    Case("dmg", "dmg", ("dmg",), (), builder=write_udif, read_only=True, source="text",
         metrics={"seq_read": Target(1.0), "rand_read": None, "mount_latency": None}),
    # a raw image behind a server on loopback, the same server for imgfs's
    # driver and QEMU's (issues 17 and 18)
    *(Case(protocol, "raw", ("raw", protocol), ("-O", "raw"), server=protocol,
           metrics=NETWORK_TARGETS) for protocol in ("ssh", "iscsi", "gluster", "rbd")),
)}


@dataclass
class Settings:
    runtime: float
    image_size: int
    latency_reps: int
    warm_host_cache: bool
    #: "", "python" or "native" (see --profile)
    profile: str
    workdir: Path
    #: measurements per metric and exporter; the median is reported
    repeat: int = 1
    #: metrics to measure (--only); empty: every metric of the case
    only: tuple[str, ...] = ()
    #: the imgfs command to benchmark (--imgfs, for A/B experiments)
    imgfs: str = ""
    #: the running case's server, when its image is served (Case.server)
    served: Served | None = None


# -- small system helpers ----------------------------------------------------


def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
    """Run a tool; its stderr goes into the exception if it fails."""
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kwargs)


def tool(name: str) -> str:
    """A tool next to this interpreter (the venv's imgfs, py-spy) or on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise SystemExit(f"bench: {name} not found")
    return found


def imgfs_command(imgfs: str) -> list[str]:
    """A Python file given to --imgfs runs under this interpreter (the
    venv's, where imgfs and pyfuse3 are installed)."""
    return [sys.executable, imgfs] if imgfs.endswith(".py") else [imgfs]


def drop_caches() -> None:
    # sync first: dirty pages are not dropped, and a FUSE file's dirty pages
    # must go through its daemon before the next job starts.
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def warm_file(path: Path) -> None:
    """Read the image file into the host page cache (see the docstring)."""
    with open(path, "rb", buffering=0) as image:
        while image.read(8 * MiB):
            pass


def prepare_caches(image: Path, settings: Settings) -> None:
    drop_caches()
    if settings.warm_host_cache:
        warm_file(image)


def _unescape_mount_field(text: str) -> str:
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        text = text.replace(code, char)
    return text


def mount_entry(path: Path) -> list[str] | None:
    """The /proc/self/mountinfo fields of the mount at `path`, if any."""
    with open("/proc/self/mountinfo") as table:
        for line in table:
            fields = line.split()
            if _unescape_mount_field(fields[4]) == str(path):
                return fields
    return None


def read_ahead_kb(mountpoint: Path) -> int | None:
    """The kernel read-ahead of a FUSE mount, which sets the size of the
    read requests a buffered sequential read sends to the daemon."""
    entry = mount_entry(mountpoint)
    if entry is None:
        return None
    try:
        return int(Path(f"/sys/class/bdi/{entry[2]}/read_ahead_kb").read_text())
    except OSError:
        return None


def set_read_ahead_kb(mountpoint: Path, value: int) -> None:
    entry = mount_entry(mountpoint)
    if entry is not None:
        Path(f"/sys/class/bdi/{entry[2]}/read_ahead_kb").write_text(f"{value}\n")


def mount_daemon_pids(mountpoint: str) -> list[int]:
    """Processes whose command line is "... mount ... MOUNTPOINT": how we
    find the daemon `imgfs mount` leaves behind (the mountpoint is unique to
    this run, and the command may be a wrapper such as bench/variant.py)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")[:-1]
        except OSError:
            continue
        if args and args[-1].decode(errors="replace") == mountpoint and b"mount" in args:
            found.append(int(entry.name))
    return found


def wait_gone(pid: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists():
            return True
        stat = Path(f"/proc/{pid}/stat").read_text(errors="replace") \
            if Path(f"/proc/{pid}/stat").exists() else ""
        if ") Z " in stat:                 # a zombie has released everything
            return True
        time.sleep(0.01)
    return False


def read_first_block(path: Path) -> None:
    with open(path, "rb", buffering=0) as raw:
        if len(raw.read(4096)) != 4096:
            raise RuntimeError(f"{path}: short first read")


# -- the two exporters ----------------------------------------------------------


class Exporter:
    """One way of presenting an image as a raw file; mounted one at a time."""

    name = "?"

    def __init__(self, case: Case, image: Path, settings: Settings) -> None:
        self.case, self.image, self.settings = case, image, settings
        self.workdir = settings.workdir
        self.pid: int | None = None

    @property
    def raw_path(self) -> Path:
        raise NotImplementedError

    @property
    def mountpoint(self) -> Path:
        raise NotImplementedError

    def mount(self) -> None:
        """Returns once the raw file can be opened."""
        raise NotImplementedError

    def unmount(self) -> None:
        """Returns once the daemon has exited (its image locks are free)."""
        raise NotImplementedError


class ImgfsExporter(Exporter):
    name = "imgfs"

    @property
    def mountpoint(self) -> Path:
        return self.workdir / "imgfs-mnt"

    @property
    def raw_path(self) -> Path:
        served = self.settings.served
        return self.mountpoint / (served.raw_name if served else f"{self.image.stem}.raw")

    def command(self) -> list[str]:
        cmd = [*imgfs_command(self.settings.imgfs), "mount", "-o", f"format={self.case.fmt}"]
        if self.case.encrypted:
            cmd += ["--object", f"secret,id={SECRET_ID},data={PASSPHRASE}",
                    "-o", f"key-secret={SECRET_ID}"]
        served = self.settings.served
        source = served.imgfs_source if served else str(self.image)
        return cmd + [source, str(self.mountpoint)]

    def mount(self) -> None:
        self.mountpoint.mkdir(exist_ok=True)
        # `imgfs mount` daemonizes once the FUSE session is up.
        run(self.command())
        pids = mount_daemon_pids(str(self.mountpoint))
        self.pid = pids[0] if pids else None

    def unmount(self) -> None:
        if mount_entry(self.mountpoint) is not None:
            result = subprocess.run(["umount", str(self.mountpoint)], capture_output=True)
            if result.returncode != 0:
                subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True)
        if self.pid is not None and not wait_gone(self.pid):
            os.kill(self.pid, signal.SIGKILL)
            wait_gone(self.pid)
        self.pid = None


class QsdExporter(Exporter):
    name = "qsd"

    def __init__(self, case: Case, image: Path, settings: Settings) -> None:
        super().__init__(case, image, settings)
        self.process: subprocess.Popen | None = None

    @property
    def mountpoint(self) -> Path:
        return self.workdir / "qsd-export.raw"

    @property
    def raw_path(self) -> Path:
        return self.mountpoint

    def command(self) -> list[str]:
        fmt_node = f"driver={self.case.fmt},node-name=fmt0,file=file0"
        cmd = ["qemu-storage-daemon"]
        if self.case.encrypted:
            cmd += ["--object", f"secret,id={SECRET_ID},data={PASSPHRASE}"]
            fmt_node += f",{self.case.qsd_secret_options}"
        served = self.settings.served
        file_node = f"{served.qsd_file_node},node-name=file0" if served else \
            f"driver=file,node-name=file0,filename={self.image}"
        writable = "on"
        if (served and served.read_only) or self.case.read_only:
            file_node += ",read-only=on"
            fmt_node += ",read-only=on"
            writable = "off"
        return cmd + [
            "--blockdev", file_node,
            "--blockdev", fmt_node,
            "--export", f"type=fuse,id=exp0,node-name=fmt0,"
                        f"mountpoint={self.mountpoint},writable={writable}",
        ]

    def mount(self) -> None:
        self.mountpoint.touch()
        self.process = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True)
        self.pid = self.process.pid
        deadline = time.monotonic() + 30
        # qsd stays in the foreground: the export is usable once the FUSE
        # mount exists (the kernel queues our open until qsd serves it).
        while mount_entry(self.mountpoint) is None:
            if self.process.poll() is not None:
                _, errors = self.process.communicate()
                raise RuntimeError(f"qemu-storage-daemon failed: {errors.strip()}")
            if time.monotonic() > deadline:
                raise RuntimeError("qemu-storage-daemon: export did not appear")
            time.sleep(0.001)

    def unmount(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if mount_entry(self.mountpoint) is not None:
            subprocess.run(["fusermount3", "-u", str(self.mountpoint)], capture_output=True)
        self.process = self.pid = None


EXPORTERS: tuple[type[Exporter], ...] = (ImgfsExporter, QsdExporter)

#: every exporter currently mounted, for the clean-up on errors and Ctrl-C
LIVE: list[Exporter] = []


@contextlib.contextmanager
def mounted(exporter: Exporter) -> Iterator[Exporter]:
    LIVE.append(exporter)
    try:
        exporter.mount()
        yield exporter
    finally:
        exporter.unmount()
        LIVE.remove(exporter)


# -- fio -----------------------------------------------------------------------------


def fio(path: Path, name: str, **options: Any) -> dict:
    """One fio job on `path`; returns the job's section of fio's JSON."""
    base = {"ioengine": "psync", "iodepth": 1, "direct": 0, "numjobs": 1,
            # the file must exist already (a typo must not benchmark a new file)
            "allow_file_create": 0, "fallocate": "none", "invalidate": 1}
    base.update(options)
    cmd = ["fio", f"--name={name}", f"--filename={path}", "--output-format=json"]
    cmd += [f"--{key}={value}" for key, value in base.items()]
    result = run(cmd)
    return json.loads(result.stdout[result.stdout.index("{"):])["jobs"][0]


def seq_read_job(path: Path, settings: Settings) -> tuple[float, dict]:
    """MB/s over whole-file passes, each from an empty FUSE page cache."""
    total_bytes = total_ms = 0
    passes = 0
    while passes == 0 or (total_ms < settings.runtime * 1000 and passes < 10):
        job = fio(path, "seq_read", rw="read", bs="1M", size=settings.image_size,
                  runtime=max(settings.runtime, 60))
        total_bytes += job["read"]["io_bytes"]
        total_ms += job["read"]["runtime"]
        passes += 1
    return total_bytes / (total_ms / 1000) / 1e6, {"passes": passes, "bytes": total_bytes}


def rand_read_job(path: Path, settings: Settings) -> tuple[float, dict]:
    # randrepeat=0: a new sequence of blocks for every job.  With fio's
    # default, every job read the blocks the first one did, which a server
    # with its own cache (Ceph's OSD) then answered from it: the first
    # job, imgfs's in every run, was the only one served cold.
    job = fio(path, "rand_read", rw="randread", bs="4k", randrepeat=0,
              time_based=1, runtime=settings.runtime)
    return job["read"]["iops"], {"ios": job["read"]["total_ios"]}


def rand_read_16_job(path: Path, settings: Settings) -> tuple[float, dict]:
    # O_DIRECT: sixteen random maps over one file would otherwise hit
    # pages another reader brought into the FUSE page cache.
    job = fio(path, "rand_read_16", rw="randread", bs="4k", numjobs=16, direct=1,
              randrepeat=0, group_reporting=1, time_based=1, runtime=settings.runtime)
    return job["read"]["iops"], {"ios": job["read"]["total_ios"]}


def rand_write_job(path: Path, settings: Settings) -> tuple[float, dict]:
    job = fio(path, "rand_write", rw="randwrite", bs="4k", end_fsync=1,
              time_based=1, runtime=settings.runtime)
    return job["write"]["iops"], {"ios": job["write"]["total_ios"],
                                  "runtime_ms": job["write"]["runtime"]}


def seq_write_job(path: Path, settings: Settings) -> tuple[float, dict]:
    job = fio(path, "seq_write", rw="write", bs="1M", end_fsync=1,
              time_based=1, runtime=settings.runtime)
    return job["write"]["bw_bytes"] / 1e6, {"bytes": job["write"]["io_bytes"],
                                           "runtime_ms": job["write"]["runtime"]}


def seq_write_new_job(path: Path, settings: Settings) -> tuple[float, dict]:
    # One pass: a second one would overwrite clusters allocated by the first.
    job = fio(path, "seq_write_new", rw="write", bs="1M", end_fsync=1,
              size=settings.image_size, runtime=max(settings.runtime, 120))
    return job["write"]["bw_bytes"] / 1e6, {"bytes": job["write"]["io_bytes"],
                                           "runtime_ms": job["write"]["runtime"]}


IO_JOBS: dict[str, Callable[[Path, Settings], tuple[float, dict]]] = {
    "seq_read": seq_read_job,
    "rand_read": rand_read_job,
    "rand_read_16": rand_read_16_job,
    "rand_write": rand_write_job,
    "seq_write": seq_write_job,
    "seq_write_new": seq_write_new_job,
}


# -- profiling ---------------------------------------------------------------------------


@contextlib.contextmanager
def profiled(exporter: Exporter, label: str, settings: Settings,
             into: dict) -> Iterator[None]:
    """Sample imgfs with py-spy while the body runs (only with --profile)."""
    if not settings.profile or exporter.name != "imgfs" or exporter.pid is None:
        yield
        return
    out = settings.workdir / f"profile-{label}.txt"
    # --nonblocking: do not stop the daemon to sample it (less distortion);
    # idle threads (trio waiting in epoll) are left out, so the samples
    # taken, against rate x time, also show how busy the daemon was.
    # Native unwinding needs the process stopped, so it samples less often.
    rate, mode = (100, ["--native"]) if settings.profile == "native" else (250, ["--nonblocking"])
    spy = subprocess.Popen([tool("py-spy"), "record", "--pid", str(exporter.pid),
                            "--rate", str(rate), *mode, "--format", "raw", "-o", str(out)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started = time.monotonic()
    try:
        yield
    finally:
        elapsed = time.monotonic() - started
        spy.send_signal(signal.SIGINT)
        spy.wait(timeout=60)
        if out.exists():
            into[label] = summarize_profile(out.read_text(), rate * elapsed)


def function_of(frame: str) -> str:
    """'name (path/file.py:123)' -> 'name (path/file.py)': one entry per
    function rather than per line."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rstrip(')').rsplit(':', 1)[0]})" if where else frame


def summarize_profile(collapsed: str, expected_samples: float, top: int = 12) -> dict:
    """Self and inclusive sample shares per function from py-spy's raw
    (collapsed-stack) output: "frame;frame;...;leaf count" per line."""
    self_counts: collections.Counter = collections.Counter()
    total_counts: collections.Counter = collections.Counter()
    samples = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        functions = [function_of(frame) for frame in stack.split(";")]
        samples += count
        self_counts[functions[-1]] += count
        for function in set(functions):
            total_counts[function] += count
    if not samples:
        return {"samples": 0, "busy_percent": 0, "self_percent": [], "inclusive_percent": []}
    # The frames every sample passes through (main, trio.run...) say nothing.
    for function in [f for f, n in total_counts.items() if n >= 0.95 * samples]:
        del total_counts[function]

    def share(counter: collections.Counter) -> list[list]:
        return [[function, round(100 * n / samples, 1)]
                for function, n in counter.most_common(top)]

    return {"samples": samples,
            "busy_percent": round(100 * samples / expected_samples, 1),
            "self_percent": share(self_counts),
            "inclusive_percent": share(total_counts)}


# -- measuring -------------------------------------------------------------------------


def process_cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU time of a process (all its threads) so far."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_cost(details: dict, cpu_seconds: float) -> dict:
    """The daemon's CPU time per unit of work: per I/O for the 4 KiB jobs,
    per MiB for the sequential ones.  Unlike a rate, it hardly moves with
    other load on the machine."""
    if "ios" in details and details["ios"]:
        return {"cpu_us_per_io": round(cpu_seconds / details["ios"] * 1e6, 1)}
    if details.get("bytes"):
        return {"cpu_us_per_mib": round(cpu_seconds / (details["bytes"] / MiB) * 1e6, 1)}
    return {}


def measure_io(metric: str, exporter: Exporter, settings: Settings,
               profiles: dict) -> tuple[float, dict]:
    """One I/O metric through one exporter, on a fresh mount."""
    prepare_caches(exporter.image, settings)
    with mounted(exporter):
        if settings.served and settings.served.qsd_read_ahead_off and exporter.name == "qsd":
            set_read_ahead_kb(exporter.mountpoint, 0)
        extra = {"read_ahead_kb": read_ahead_kb(exporter.mountpoint)}
        cpu_before = process_cpu_seconds(exporter.pid)
        with profiled(exporter, metric, settings, profiles), watchdog(exporter, settings):
            value, details = IO_JOBS[metric](exporter.raw_path, settings)
        cpu_after = process_cpu_seconds(exporter.pid)
    if cpu_before is not None and cpu_after is not None:
        extra.update(cpu_cost(details, cpu_after - cpu_before))
    return value, {**details, **extra}


@contextlib.contextmanager
def watchdog(exporter: Exporter, settings: Settings) -> Iterator[None]:
    """For a served image: kill the daemon if a job outlives any sane
    runtime, so that fio fails instead of waiting forever (QEMU 7.2's curl
    driver sometimes never completes a request when several are in flight)."""
    if not settings.served or exporter.pid is None:
        yield
        return
    limit = settings.runtime * 3 + 60
    fired = threading.Event()

    def kill(pid: int) -> None:
        fired.set()
        os.kill(pid, signal.SIGKILL)
    timer = threading.Timer(limit, kill, (exporter.pid,))
    timer.start()
    hung = Hung(f"{exporter.name} never completed a request (killed after {limit:g} s)")
    try:
        yield
    except subprocess.CalledProcessError as exc:      # fio, when its reads failed
        if fired.is_set():
            raise hung from exc
        raise
    finally:
        timer.cancel()
    if fired.is_set():
        raise hung


class Hung(RuntimeError):
    """An exporter stopped answering and was killed (see watchdog)."""


def measure_mount_latency(exporter: Exporter, settings: Settings) -> tuple[float, dict]:
    """Median ms from starting the mount until the first 4 KiB is read.

    The caches are left warm (as on a machine where the tools were just
    used); the first of the repetitions also pays for cold ones."""
    samples = []
    for _ in range(settings.latency_reps):
        LIVE.append(exporter)
        try:
            started = time.perf_counter()
            exporter.mount()
            read_first_block(exporter.raw_path)
            samples.append((time.perf_counter() - started) * 1000)
        finally:
            exporter.unmount()
            LIVE.remove(exporter)
    return statistics.median(samples), {"samples_ms": [round(s, 1) for s in samples]}


def new_image_exporter(cls: type[Exporter], case: Case, settings: Settings) -> Exporter:
    """An exporter on a freshly created empty image (seq_write_new)."""
    image = settings.workdir / f"new-{cls.name}.{case.fmt}"
    image.unlink(missing_ok=True)
    run(["qemu-img", "create", *case.create_args, str(image), str(settings.image_size)])
    return cls(case, image, settings)


def measure_kdf_open(case: Case, settings: Settings, profiles: dict) -> tuple[dict, float]:
    """kdf_open: mount latency on the case's image made with the default
    iter-time, and that image's PBKDF (the target)."""
    print(f"  (building a copy with iter-time {DEFAULT_ITER_TIME_MS} ms)", flush=True)
    image = build_image(case, settings, DEFAULT_ITER_TIME_MS)
    try:
        pbkdf = pbkdf_ms(image)
        print(f"  PBKDF of its key slot and digest: {pbkdf:.1f} ms", flush=True)
        return measure_metric(case, "kdf_open", image, settings, profiles), pbkdf
    finally:
        image.unlink(missing_ok=True)


def measure_once(cls: type[Exporter], case: Case, metric: str, image: Path,
                 settings: Settings, profiles: dict) -> tuple[float, dict]:
    """One metric through one exporter (`cls`, one of `EXPORTERS`)."""
    if metric in ("mount_latency", "kdf_open"):
        return measure_mount_latency(cls(case, image, settings), settings)
    if metric == "seq_write_new":
        exporter = new_image_exporter(cls, case, settings)
        try:
            return measure_io(metric, exporter, settings, profiles)
        finally:
            exporter.image.unlink(missing_ok=True)
    for attempt in range(3):
        try:
            return measure_io(metric, cls(case, image, settings), settings, profiles)
        except Hung as exc:
            print(f"  {metric:<14} {cls.name:<6} {exc}; again", flush=True)
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def measure_metric(case: Case, metric: str, image: Path, settings: Settings,
                   profiles: dict) -> dict:
    """Both exporters for one metric: {exporter: (value, details)}.

    imgfs and qsd alternate, so that with --repeat a burst of load from
    elsewhere on the machine hits both, and each repetition swaps which goes
    first: what a job leaves behind (the disk still busy with its writes,
    memory the VM just handed back to its host) then slows each exporter
    equally often.  The value is the median of the repetitions (all of them
    are kept in the details)."""
    runs: dict[str, list[tuple[float, dict]]] = {cls.name: [] for cls in EXPORTERS}
    for repetition in range(settings.repeat):
        for cls in EXPORTERS[::-1] if repetition % 2 else EXPORTERS:
            value, details = measure_once(cls, case, metric, image, settings, profiles)
            runs[cls.name].append((value, details))
            cost = "".join(f"  (CPU {details[key]:.1f} us/{key.rsplit('_', 1)[1]})"
                           for key in ("cpu_us_per_io", "cpu_us_per_mib") if key in details)
            print(f"  {metric:<14} {cls.name:<6} {value:10.1f} {METRICS[metric].unit}{cost}",
                  flush=True)
    outcome = {}
    for name, results in runs.items():
        values = [value for value, _ in results]
        details = results[0][1] if len(results) == 1 else \
            {"runs": [round(v, 2) for v in values], "first": results[0][1]}
        for key in ("cpu_us_per_io", "cpu_us_per_mib"):
            costs = [run_details[key] for _, run_details in results if key in run_details]
            if costs:
                details[key] = round(statistics.median(costs), 1)
        outcome[name] = (statistics.median(values), details)
    return outcome


def metric_entry(metric: str, target: Target | None, outcome: dict) -> dict:
    """A metric's line of the results, from measure_metric's outcome."""
    imgfs, qsd = outcome["imgfs"][0], outcome["qsd"][0]
    return {"unit": METRICS[metric].unit, "imgfs": round(imgfs, 2), "qsd": round(qsd, 2),
            **judge(metric, target, imgfs, qsd),
            "details": {"imgfs": outcome["imgfs"][1], "qsd": outcome["qsd"][1]}}


def judge(metric: str, target: Target | None, imgfs: float, qsd: float) -> dict:
    """The ratio that is printed for a metric, and whether the target is met."""
    if METRICS[metric].kind == "latency":
        ratio = qsd / imgfs if imgfs else float("inf")
    else:
        ratio = imgfs / qsd if qsd else float("inf")
    result: dict[str, Any] = {"ratio": round(ratio, 3)}
    if target is not None:
        result["target"] = target.describe()
        result["pass"] = target.met(ratio, imgfs)
    return result


# -- images --------------------------------------------------------------------------


#: "text" data: every random byte mapped to one of 16 letters, so that
#: deflate halves it (4 bits of entropy a byte), as it roughly does the
#: files of an installed system
TEXT_TABLE = bytes(b"etaoinshrdlucmf "[byte % 16] for byte in range(256))


def source_data(settings: Settings, kind: str = "random") -> Path:
    """The raw data a case's image is converted from (made once per kind)."""
    path = settings.workdir / f"{kind}.data"
    if not path.exists():
        with open(path, "wb") as out:
            remaining = settings.image_size
            while remaining:
                chunk = os.urandom(min(remaining, 16 * MiB))
                out.write(chunk.translate(TEXT_TABLE) if kind == "text" else chunk)
                remaining -= len(chunk)
    return path


def build_image(case: Case, settings: Settings, iter_time_ms: int = LUKS_ITER_TIME_MS) -> Path:
    name = case.name if iter_time_ms == LUKS_ITER_TIME_MS else f"{case.name}-{iter_time_ms}ms"
    image = settings.workdir / f"bench-{name}.{case.fmt}"
    secret = ["--object", f"secret,id={SECRET_ID},data={PASSPHRASE}"] if case.encrypted else []
    if case.builder is not None:
        case.builder(source_data(settings, case.source), image)
        return image
    convert_args = [arg.format(iter_time=iter_time_ms) for arg in case.convert_args]
    command = ["qemu-img", "convert", *secret, "-f", "raw", *convert_args,
               str(source_data(settings, case.source)), str(image)]
    for attempt in range(10):
        try:
            run(command)
            break
        except subprocess.CalledProcessError as exc:
            # QEMU 7.2 calibrates iter-time with getrusage and gives up
            # ("Unable to get accurate CPU usage") in up to half the tries here.
            if attempt == 9 or "accurate CPU usage" not in (exc.stderr or ""):
                raise
    return image


def pbkdf_ms(image: Path) -> float:
    """The PBKDF work any open of this LUKS image must do, in ms (median of
    3): its first active key slot's PBKDF2 and the master key digest's, run
    here with `cryptography` on the image's own parameters from qemu-img
    info, on one core as cryptsetup and QEMU derive (imgfs derives a key's
    PBKDF2 blocks on several cores at once where it can).  The yardstick for
    "opening takes no longer than the PBKDF itself"."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC
    info = json.loads(run(["qemu-img", "info", "--output=json", str(image)]).stdout)
    luks = info["format-specific"]["data"]
    luks = luks.get("encrypt", luks)                  # qcow2 nests it
    iterations = next(slot["iters"] for slot in luks["slots"] if slot["active"])
    key_bytes = int(luks["cipher-alg"].rsplit("-", 1)[1]) // 8
    if luks["cipher-mode"] == "xts":
        key_bytes *= 2
    algorithm = getattr(hashes, luks["hash-alg"].upper())
    samples = []
    for _ in range(3):
        started = time.perf_counter()
        key = PBKDF2HMAC(algorithm(), key_bytes, os.urandom(32), iterations).derive(b"x")
        PBKDF2HMAC(algorithm(), 20, os.urandom(32), luks["master-key-iters"]).derive(key)
        samples.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(samples), 1)


def available_formats(imgfs: str) -> set[str]:
    """Driver names from `imgfs formats` (its Formats and Protocols sections)."""
    text = run([*imgfs_command(imgfs), "formats"]).stdout
    formats, in_formats = set(), False
    for line in text.splitlines():
        if line.startswith(("Formats", "Protocols")):
            in_formats = True
        elif line and not line.startswith(" "):
            in_formats = False
        elif in_formats and line.strip():
            formats.add(line.split()[0])
    return formats


def run_case(case: Case, settings: Settings) -> dict:
    """Every metric of a case, on an image built for it (and served, for a
    network case, by a server started for the case)."""
    if not case.server:
        return measure_case(case, settings)
    serve = getattr(extra_module("servers"), f"serve_{case.server}")
    with serve(settings.workdir) as server:
        return measure_case(case, settings, server)


def measure_case(case: Case, settings: Settings, server: Any = None) -> dict:
    print(f"\n== {case.name}: building a {settings.image_size // MiB} MiB image", flush=True)
    image = build_image(case, settings)
    if server is not None:
        settings = dataclasses.replace(settings, served=server.serve(image))
    metrics: dict[str, dict] = {}
    profiles: dict[str, dict] = {}
    result: dict[str, Any] = {"status": "ran", "format": case.fmt, "metrics": metrics}
    try:
        for metric, target in case.metrics.items():
            if settings.only and metric not in settings.only:
                continue
            if metric == "kdf_open":
                outcome, result["pbkdf_ms"] = measure_kdf_open(case, settings, profiles)
                target = Target(max_ms=result["pbkdf_ms"])
            else:
                if metric == "mount_latency" and case.encrypted:
                    # for scale (the target is kdf_open's, on a 2 s PBKDF)
                    result["short_pbkdf_ms"] = pbkdf_ms(image)
                    print(f"  PBKDF of its key slot and digest: {result['short_pbkdf_ms']:.1f}"
                          " ms (for scale)", flush=True)
                outcome = measure_metric(case, metric, image, settings, profiles)
            metrics[metric] = metric_entry(metric, target, outcome)
    finally:
        image.unlink(missing_ok=True)
    if profiles:
        result["imgfs_profile"] = profiles
    return result


# -- reporting -------------------------------------------------------------------------


def format_row(case: str, metric: str, entry: dict) -> str:
    unit = entry["unit"]
    ratio_label = "qsd/imgfs" if METRICS[metric].kind == "latency" else "imgfs/qsd"
    verdict = f"{'(none)':>10}      "
    if "target" in entry:
        verdict = f"{entry['target']:>10}  {'PASS' if entry['pass'] else 'FAIL'}"
    return (f"{case:<17} {METRICS[metric].label:<21} {entry['imgfs']:>10.1f} "
            f"{entry['qsd']:>10.1f} {unit:<5} {entry['ratio']:>6.2f} {ratio_label:<9} {verdict}"
            f"{cpu_column(entry)}")


def cpu_column(entry: dict) -> str:
    """Daemon CPU per unit of work, imgfs/qsd, median of the repetitions
    (see cpu_cost): what other load on the machine distorts least."""
    details = entry.get("details", {})
    costs = [details.get(name, {}) for name in ("imgfs", "qsd")]
    for key, unit in (("cpu_us_per_io", "us/IO"), ("cpu_us_per_mib", "us/MiB")):
        if all(key in cost for cost in costs):
            return f"  {costs[0][key]:.0f}/{costs[1][key]:.0f} {unit}"
    return ""


def print_table(results: dict) -> None:
    print(f"\n{'case':<17} {'metric':<21} {'imgfs':>10} {'qsd':>10} {'unit':<5} "
          f"{'ratio':>6} {'':<9} {'target':>10}  result  CPU imgfs/qsd")
    for case, outcome in results.items():
        if outcome["status"] != "ran":
            print(f"{case:<17} {outcome['status']}")
            continue
        for metric, entry in outcome["metrics"].items():
            row = extra_module(case).format_row if case in EXTRA_CASES else format_row
            print(row(case, metric, entry))
    print(summary_line(results))
    for case, outcome in results.items():
        for label, profile in outcome.get("imgfs_profile", {}).items():
            print_profile(case, label, profile)


def summary_line(results: dict) -> str:
    """How many targets hold, and which do not (or were not measured)."""
    held, failed, not_run = 0, [], []
    for case, outcome in results.items():
        if outcome["status"] != "ran":
            not_run.append(case)
            continue
        for metric, entry in outcome["metrics"].items():
            if "target" not in entry:
                continue
            if entry["pass"]:
                held += 1
            else:
                failed.append(f"{case} {metric}")
    line = f"\ntargets held: {held} of {held + len(failed)}"
    if failed:
        line += f"; FAIL: {', '.join(failed)}"
    if not_run:
        line += f"; cases not run: {', '.join(not_run)}"
    return line


def print_profile(case: str, label: str, profile: dict) -> None:
    print(f"\nimgfs profile, {case} {label}: {profile['samples']} samples, "
          f"{profile['busy_percent']}% of rate x time (python mode: how busy the daemon was)")
    print("  self%  function (file:line)")
    for frame, share in profile["self_percent"]:
        print(f"  {share:5.1f}  {frame}")
    print("  incl%  function (file:line)")
    for frame, share in profile["inclusive_percent"]:
        print(f"  {share:5.1f}  {frame}")


def first_line(cmd: list[str]) -> str:
    try:
        return run(cmd).stdout.splitlines()[0].strip()
    except (OSError, subprocess.CalledProcessError, IndexError):
        return "unknown"


def machine_description(settings: Settings) -> dict:
    return {
        "hostname": platform.node(),
        "nproc": os.cpu_count(),
        "kernel": platform.release(),
        "cpu": next((line.split(":", 1)[1].strip()
                     for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name")), "unknown"),
        "memory_kib": int(Path("/proc/meminfo").read_text().split()[1]),
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
        "python": platform.python_version(),
        "fio": first_line(["fio", "--version"]),
        "qemu": first_line(["qemu-storage-daemon", "--version"]),
        "qemu_img": first_line(["qemu-img", "--version"]),
        "imgfs": first_line([*imgfs_command(settings.imgfs), "--version"]),
        "imgfs_commit": first_line(["git", "-C", str(BENCH_DIR.parent), "rev-parse", "HEAD"]),
    }


def write_results(document: dict) -> Path:
    RESULTS_DIR.mkdir(exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS_DIR / f"{stamp}.json"
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path


# -- main -----------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", default="all",
                        help=f"comma-separated cases, or 'all' "
                        f"({', '.join([*CASES, *EXTRA_CASES])})")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 64 MiB image, 2 s jobs, 3 mounts for latency")
    parser.add_argument("--runtime", type=float, help="seconds per fio job (default 10)")
    parser.add_argument("--size", help="image size, e.g. 1G or 256M (default 1G)")
    parser.add_argument("--latency-reps", type=int, help="mounts for the latency median (5)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="measure each metric N times, alternating imgfs and qsd, "
                        "and report medians (for a noisy machine)")
    parser.add_argument("--only", default="",
                        help=f"comma-separated metrics to measure ({', '.join(METRICS)})")
    parser.add_argument("--cold", action="store_true",
                        help="do not pre-read the image into the host page cache")
    parser.add_argument("--profile", nargs="?", const="python", default="",
                        choices=("python", "native"),
                        help="sample imgfs with py-spy during its I/O jobs; 'native' also "
                        "shows C frames (syscalls, libfuse) but pauses the daemon per sample")
    parser.add_argument("--imgfs", help="imgfs command to benchmark (default: the one "
                        "installed beside this Python), e.g. a wrapper for an experiment")
    args = parser.parse_args(argv)
    names = [*CASES, *EXTRA_CASES] if args.case == "all" else args.case.split(",")
    unknown = [name for name in names if name not in CASES and name not in EXTRA_CASES]
    if unknown:
        parser.error(f"unknown case {', '.join(unknown)} "
                     f"(known: {', '.join([*CASES, *EXTRA_CASES])})")
    args.cases = names
    args.only = tuple(filter(None, args.only.split(",")))
    if any(metric not in METRICS for metric in args.only):
        parser.error(f"unknown metric in --only (known: {', '.join(METRICS)})")
    return args


def parse_size(text: str) -> int:
    units = {"K": 1024, "M": MiB, "G": GiB}
    if text[-1].upper() in units:
        return int(float(text[:-1]) * units[text[-1].upper()])
    return int(text)


def make_settings(args: argparse.Namespace, workdir: Path) -> Settings:
    return Settings(
        runtime=args.runtime or (2.0 if args.quick else 10.0),
        image_size=parse_size(args.size) if args.size else (64 * MiB if args.quick else GiB),
        latency_reps=args.latency_reps or (3 if args.quick else 5),
        warm_host_cache=not args.cold,
        profile=args.profile,
        workdir=workdir,
        imgfs=args.imgfs or tool("imgfs"),
        repeat=max(1, args.repeat),
        only=args.only,
    )


def cleanup(workdir: Path) -> None:
    """Unmount whatever is still mounted, then delete the scratch files."""
    for exporter in list(LIVE):
        with contextlib.suppress(Exception):
            exporter.unmount()
    LIVE.clear()
    busy = [line for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if str(workdir) in line]
    if busy:
        print(f"bench: left {workdir} in place, still mounted: {busy}", file=sys.stderr)
        return
    shutil.rmtree(workdir, ignore_errors=True)


def run_all(args: argparse.Namespace, settings: Settings) -> dict:
    formats = available_formats(settings.imgfs)
    results = {}
    for name in args.cases:
        case = CASES.get(name) or Case(name, name, EXTRA_CASES[name], ())
        missing = [fmt for fmt in case.needs if fmt not in formats]
        if missing:
            print(f"\n== {name}: skipped (format not available: {', '.join(missing)})")
            results[name] = {"status": "skipped (format not available)"}
            continue
        try:
            results[name] = run_case(case, settings) if name in CASES \
                else getattr(extra_module(name), f"run_{name}_case")(settings)
        except (subprocess.CalledProcessError, RuntimeError, OSError) as exc:
            detail = getattr(exc, "stderr", "") or ""
            print(f"== {name}: FAILED: {exc} {detail.strip()}", file=sys.stderr)
            results[name] = {"status": f"failed: {exc} {detail.strip()}"}
    return results


#: cases with a module of their own (bench/NAME.py), and the formats they need
EXTRA_CASES: dict[str, tuple[str, ...]] = {
    "fat": (),                       # imgfs against a host directory
    "partitions": ("raw",),          # a partition file against its disk's file
}


def extra_module(name: str) -> Any:
    """bench/NAME.py, which imports this module by name: alias it, or that
    would load a second copy."""
    sys.modules.setdefault("run", sys.modules[__name__])
    return importlib.import_module(name)


def interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("bench: run as root (drop_caches, FUSE mounts)")
    # SIGTERM takes the same clean-up path as Ctrl-C; SIGINT is restored
    # explicitly because a shell starts background jobs with it ignored.
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    workdir = Path(tempfile.mkdtemp(prefix="imgfs-bench-", dir=SCRATCH_PARENT))
    settings = make_settings(args, workdir)
    started = time.monotonic()
    document: dict[str, Any] = {}
    try:
        document = {
            "started_utc": datetime.datetime.now(datetime.UTC).isoformat(),
            "machine": machine_description(settings),
            "settings": {"runtime_s": settings.runtime, "image_size": settings.image_size,
                         "latency_reps": settings.latency_reps,
                         "host_cache": "warm" if settings.warm_host_cache else "cold",
                         "profiled": settings.profile, "quick": args.quick,
                         "imgfs_command": settings.imgfs, "repeat": settings.repeat},
        }
        results = run_all(args, settings)
    except KeyboardInterrupt:
        print("\nbench: interrupted, cleaning up", file=sys.stderr)
        return 130
    finally:
        cleanup(workdir)
    document["cases"] = results
    document["duration_s"] = round(time.monotonic() - started, 1)
    print_table(results)
    print(f"\nresults: {write_results(document)}  ({document['duration_s']} s)")
    failed = any(outcome["status"].startswith("failed") for outcome in results.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
