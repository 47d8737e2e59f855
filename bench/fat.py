"""The `fat` case of the imgfs benchmark: a host directory shown as a
virtual FAT disk (``imgfs mount fat:DIR MNT``), against the directory itself.

`bench/run.py --case fat` runs it (also part of `--case all`); the results
join run.py's table and JSON, with the host directory in the column where
the other cases put qemu-storage-daemon ("imgfs/dir" ratios).

Method
------
A tree of files is built under the scratch directory (/var/tmp): --size
bytes (1 GiB; 64 MiB with --quick) in a few hundred files of sizes from
4 KiB to 64 MiB, small ones the more frequent (at most an eighth of the
tree each), spread over three levels of directories with long names,
filled from one buffer of random data.  Each timed pass reads every byte of every file with
1 MiB read() calls, the same reader on both sides.

Host page cache: the tree is read once right before every timed pass, on
both sides, because other processes on the machine may drop caches at any
time.  So the "dir" figure is reading warm files straight from the host
(memory speed), and imgfs always reads its host files out of memory too:
what is measured is the path through the FUSE daemon, never the disk.

* vfat_read     the target metric of the issue: read every file of the tree
                through a read-only loop mount (losetup -r -o 1 MiB, mount
                -t vfat -o ro) of the raw disk, on a fresh imgfs mount, so
                the FUSE page cache and vfat's are empty; target >= 0.5x
                of reading the files from the host directory.
* vfat_read_warm  the same files read a second time through the same vfat
                mount ("both page-cache warm, drop nothing"): the issue's
                literal wording; it mostly measures vfat's page cache.
  Both need the kernel's vfat; without it they are reported as "skipped:
  kernel has no vfat" (this development machine has none).  The proxies
  below always run, and are labelled "(proxy)" in the table:
* raw_read      (proxy) the raw disk read sequentially through imgfs with
                1 MiB reads, from sector 0 to the end of the last allocated
                cluster (found from the boot sector and the FAT), on a fresh
                mount per pass.  The figure is the tree's file bytes divided
                by the time taken (the disk also holds the FAT, directories
                and cluster slack, read in the same time), so it is the FUSE
                half of what the vfat loop mount does, without vfat and the
                loop device: roughly an upper bound of vfat_read.
* raw_image_read  for scale, not a proxy: the tree's bytes concatenated
                into one raw image, read the same way through imgfs's raw
                driver.  The FUSE path alone, without the FAT driver: how
                close raw_read comes to it is the FAT driver's share.
* mcopy_read    (proxy) `mcopy -s` of the whole volume out of the raw disk
                (mtools follows the directories and cluster chains as a
                guest would) into tmpfs, on a fresh mount, against `cp -r`
                of the host tree into tmpfs.  Both include the tmpfs writes,
                and cp's in-kernel copy_file_range is faster than mtools'
                read/write, so this ratio understates imgfs a little.
* mount_10k     ms from starting `imgfs mount fat:DIR MNT` until the raw file
                opens and its first 4 KiB is read, for a tree of 10,000
                small files in 100 directories; median of --latency-reps
                mounts (5); target < 2000 ms (run.py's mount-latency method).
* mount_tree    the same for the big tree (no target).

Throughput metrics take max(3, --repeat) passes per side, alternating host
and imgfs, and report medians: a pass of the 1 GiB tree takes about a
second, so single passes vary a lot on a loaded machine.  --profile samples
the imgfs daemon during its raw_read passes, as run.py does for its I/O jobs;
--cold drops the caches before each pass instead of warming the tree (both
sides then read the disk); --runtime and --only do not apply to this case.
"""
from __future__ import annotations

import contextlib
import os
import random
import shutil
import statistics
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

from run import (
    Case,
    ImgfsExporter,
    MiB,
    Settings,
    drop_caches,
    imgfs_command,
    measure_mount_latency,
    mounted,
    profiled,
    read_ahead_kb,
    run,
)

CASE_NAME = "fat"
#: the partition of the virtual disk starts at 1 MiB (drivers/fat/layout.py)
SECTOR = 512
MBR_PARTITION_LBA = 446 + 8
BIG_FILE = 64 * MiB
MANY_DIRS, MANY_PER_DIR = 100, 100
MIN_PASSES = 3
TMPFS = Path("/dev/shm")
MTOOLS_ENV = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
NO_VFAT = "skipped: kernel has no vfat"

#: metric -> (table label, unit, target); the target is min ratio or max ms
METRICS: dict[str, tuple[str, str, dict[str, float] | None]] = {
    "vfat_read": ("read files, vfat loop", "MB/s", {"min_ratio": 0.5}),
    "vfat_read_warm": ("vfat re-read, warm", "MB/s", {"min_ratio": 0.5}),
    "raw_read": ("raw disk read (proxy)", "MB/s", {"min_ratio": 0.5}),
    "raw_image_read": ("same bytes, raw image", "MB/s", None),
    "mcopy_read": ("mcopy -s (proxy)", "MB/s", None),
    "mount_10k": ("mount, 10,000 files", "ms", {"max_ms": 2000}),
    "mount_tree": ("mount, big tree", "ms", None),
}
PROXIES = ("raw_read", "mcopy_read")


# -- the trees ------------------------------------------------------------------------


def file_sizes(total: int, rng: random.Random) -> list[int]:
    """Sizes from 4 KiB up to 64 MiB (or an eighth of the tree), adding up to
    `total`: 2 ** (12 + span * u**2), so small files are the more frequent
    (a 1 GiB tree gets about 280 files, several of them near 64 MiB)."""
    biggest = max(8192, min(BIG_FILE, total // 8))
    span = biggest.bit_length() - 1 - 12
    sizes: list[int] = []
    left = total
    while left > 0:
        size = int(2 ** (12 + span * rng.random() ** 2))
        sizes.append(min(size, left))
        left -= sizes[-1]
    return sizes


def build_tree(root: Path, total: int) -> int:
    """The big tree: returns its number of files."""
    rng = random.Random(20261124)
    noise = os.urandom(min(total, BIG_FILE) + MiB)
    sizes = file_sizes(total, rng)
    for number, size in enumerate(sizes):
        folder = root / f"level one {number % 5}" / f"level two {number % 3}"
        if number % 2:
            folder = folder / f"deep {number % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        start = rng.randrange(len(noise) - size + 1)
        (folder / f"bench file {number:04d} with a long name.bin").write_bytes(
            noise[start:start + size])
    return len(sizes)


def build_many(root: Path) -> None:
    """10,000 small files in 100 directories."""
    for directory in range(MANY_DIRS):
        folder = root / f"folder {directory:03d}"
        folder.mkdir(parents=True)
        for number in range(MANY_PER_DIR):
            (folder / f"small file {number:03d}.txt").write_bytes(
                b"x" * (100 + 37 * number))


def tree_files(root: Path) -> list[Path]:
    found = []
    for folder, _, names in os.walk(root):
        found += [Path(folder, name) for name in sorted(names)]
    return sorted(found)


def read_files(files: list[Path]) -> int:
    """Read every file with 1 MiB read() calls; returns the bytes read."""
    buffer = bytearray(MiB)
    total = 0
    for path in files:
        with open(path, "rb", buffering=0) as source:
            while count := source.readinto(buffer):
                total += count
    return total


def timed(read: Callable[[], object], payload: int) -> tuple[float, float]:
    """(MB/s of `payload` bytes, seconds) of one call of `read`."""
    started = time.perf_counter()
    read()
    seconds = time.perf_counter() - started
    return payload / seconds / 1e6, seconds


# -- the virtual disk ---------------------------------------------------------------


class FatExporter(ImgfsExporter):
    """`imgfs mount fat:DIR MNT` (DIR's name has no dot: MNT/DIR.raw)."""

    def command(self) -> list[str]:
        return [*imgfs_command(self.settings.imgfs), "mount", f"fat:{self.image}",
                str(self.mountpoint)]


def partition_offset(raw: Path) -> int:
    with open(raw, "rb") as disk:
        mbr = disk.read(SECTOR)
    return struct.unpack_from("<I", mbr, MBR_PARTITION_LBA)[0] * SECTOR


def used_end(raw: Path) -> int:
    """Byte offset just past the last allocated cluster of the volume."""
    base = partition_offset(raw)
    with open(raw, "rb") as disk:
        disk.seek(base)
        boot = disk.read(SECTOR)
        sector, per_cluster, reserved, fats, root_entries, total16, _, fat16 = \
            struct.unpack_from("<HBHBHHBH", boot, 11)
        total32, fat32 = struct.unpack_from("<II", boot, 32)
        fat_sectors = fat16 or fat32
        root_sectors = -(-root_entries * 32 // sector)
        data = reserved + fats * fat_sectors + root_sectors
        clusters = ((total16 or total32) - data) // per_cluster
        if clusters < 4085:               # FAT-12: a small disk, read it all
            return raw.stat().st_size
        width = 2 if fat16 else 4
        disk.seek(base + reserved * sector)
        table = disk.read((clusters + 2) * width)
    entries = struct.unpack(f"<{len(table) // width}{'H' if width == 2 else 'I'}", table)
    mask = 0xFFFF if width == 2 else 0x0FFFFFFF
    last = max((number for number in range(2, len(entries)) if entries[number] & mask),
               default=1)
    return base + (data + (last - 1) * per_cluster) * sector


def read_range(path: Path, end: int) -> int:
    """Read `path` from 0 to `end` with 1 MiB reads, from an empty page cache."""
    buffer = bytearray(MiB)
    view = memoryview(buffer)
    done = 0
    with open(path, "rb", buffering=0) as disk:
        os.posix_fadvise(disk.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        while done < end:
            count = disk.readinto(view[:min(MiB, end - done)])
            if not count:
                raise RuntimeError(f"{path}: short read at {done}")
            done += count
    return done


def vfat_missing() -> str | None:
    """Why the kernel cannot mount vfat, or None."""
    def listed() -> bool:
        return any(line.split()[-1] == "vfat"
                   for line in Path("/proc/filesystems").read_text().splitlines())
    if not listed() and shutil.which("modprobe"):
        subprocess.run(["modprobe", "-q", "vfat"], capture_output=True, check=False)
    return None if listed() else NO_VFAT


@contextlib.contextmanager
def vfat_mounted(raw: Path, target: Path) -> Iterator[Path]:
    """The partition of `raw` on a read-only loop device, mounted as vfat."""
    target.mkdir(exist_ok=True)
    loop = run(["losetup", "-r", "-f", "--show", "-o", str(partition_offset(raw)),
                str(raw)]).stdout.strip()
    try:
        run(["mount", "-t", "vfat", "-o", "ro", loop, str(target)])
        try:
            yield target
        finally:
            subprocess.run(["umount", str(target)], capture_output=True, check=False)
    finally:
        subprocess.run(["losetup", "-d", loop], capture_output=True, check=False)


# -- measuring ---------------------------------------------------------------------


class Bench:
    """One run of the case: the trees, the settings, the samples."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.workdir = settings.workdir
        self.tree = self.workdir / "fattree"
        self.many = self.workdir / "fatmany"
        self.files: list[Path] = []
        self.payload = 0
        self.passes = max(MIN_PASSES, settings.repeat)
        self.samples: dict[str, dict[str, list[float]]] = {}
        self.details: dict[str, dict[str, Any]] = {}
        self.profiles: dict[str, dict] = {}

    def exporter(self, tree: Path) -> FatExporter:
        case = Case(CASE_NAME, CASE_NAME, (CASE_NAME,), ())
        return FatExporter(case, tree, self.settings)

    def warm(self) -> None:
        """Before each timed pass: the tree into the host page cache (or,
        with --cold, everything out of it)."""
        if self.settings.warm_host_cache:
            read_files(self.files)
        else:
            drop_caches()

    def record(self, metric: str, side: str, value: float) -> None:
        self.samples.setdefault(metric, {}).setdefault(side, []).append(value)
        unit = METRICS[metric][1]
        print(f"  {metric:<14} {side:<6} {value:10.1f} {unit}", flush=True)

    def host_pass(self, metric: str) -> None:
        self.warm()
        rate, _ = timed(lambda: read_files(self.files), self.payload)
        self.record(metric, "dir", rate)

    def raw_pass(self, end: int) -> None:
        exporter = self.exporter(self.tree)
        with mounted(exporter):
            self.warm()
            self.details.setdefault("raw_read", {"bytes_read": end, "file_bytes": self.payload,
                                                 "read_ahead_kb":
                                                 read_ahead_kb(exporter.mountpoint)})
            with profiled(exporter, "raw_read", self.settings, self.profiles):
                rate, _ = timed(lambda: read_range(exporter.raw_path, end), self.payload)
        self.record("raw_read", "imgfs", rate)

    def measure_raw_read(self) -> None:
        with mounted(self.exporter(self.tree)) as exporter:
            end = used_end(exporter.raw_path)
        for _ in range(self.passes):
            self.host_pass("raw_read")
            self.raw_pass(end)

    def measure_raw_image(self) -> None:
        """The tree's bytes as one raw image, read through imgfs's raw driver
        in the same way: the FUSE path without the FAT driver."""
        image = self.workdir / "fatbytes.raw"
        with open(image, "wb") as out:
            for path in self.files:
                out.write(path.read_bytes())
        case = Case("raw", "raw", ("raw",), ())
        try:
            for _ in range(self.passes):
                self.host_pass("raw_image_read")
                exporter = ImgfsExporter(case, image, self.settings)
                with mounted(exporter):
                    if self.settings.warm_host_cache:
                        read_files([image])
                    else:
                        drop_caches()
                    rate, _ = timed(partial(read_range, exporter.raw_path, self.payload),
                                    self.payload)
                self.record("raw_image_read", "imgfs", rate)
        finally:
            image.unlink(missing_ok=True)

    def measure_mcopy(self) -> None:
        if shutil.which("mcopy") is None:
            self.details["mcopy_read"] = {"status": "skipped: mcopy not installed"}
            return
        parent = TMPFS if TMPFS.is_dir() else self.workdir
        for _ in range(self.passes):
            with tempfile.TemporaryDirectory(dir=parent, prefix="imgfs-bench-") as out:
                self.warm()
                rate, _ = timed(partial(run, ["cp", "-r", str(self.tree), out]), self.payload)
                self.record("mcopy_read", "dir", rate)
            with tempfile.TemporaryDirectory(dir=parent, prefix="imgfs-bench-") as out, \
                    mounted(self.exporter(self.tree)) as exporter:
                self.warm()
                image = f"{exporter.raw_path}@@{partition_offset(exporter.raw_path)}"
                rate, _ = timed(partial(run, ["mcopy", "-s", "-i", image, "::/", out],
                                        env=MTOOLS_ENV), self.payload)
                self.record("mcopy_read", "imgfs", rate)
                copied = read_files(tree_files(Path(out)))
                if copied != self.payload:
                    raise RuntimeError(f"mcopy copied {copied} bytes, the tree has "
                                       f"{self.payload}")

    def measure_vfat(self) -> None:
        reason = vfat_missing()
        if reason is not None:
            for metric in ("vfat_read", "vfat_read_warm"):
                self.details[metric] = {"status": reason}
            return
        try:
            for _ in range(self.passes):
                self.host_pass_for("vfat_read")
                self.vfat_pass()
        except subprocess.CalledProcessError as exc:
            stderr = (exc.stderr or "").strip().splitlines()
            reason = f"skipped: vfat loop mount failed: {stderr[0] if stderr else exc}"
            for metric in ("vfat_read", "vfat_read_warm"):
                self.details[metric] = {"status": reason}
                self.samples.pop(metric, None)

    def host_pass_for(self, metric: str) -> None:
        self.warm()
        rate, _ = timed(lambda: read_files(self.files), self.payload)
        self.record(metric, "dir", rate)
        self.record(f"{metric}_warm", "dir", rate)

    def vfat_pass(self) -> None:
        exporter = self.exporter(self.tree)
        with mounted(exporter), vfat_mounted(exporter.raw_path,
                                             self.workdir / "vfat") as target:
            self.warm()
            files = tree_files(target)
            for metric in ("vfat_read", "vfat_read_warm"):
                started = time.perf_counter()
                got = read_files(files)
                seconds = time.perf_counter() - started
                if got != self.payload:
                    raise RuntimeError(f"vfat showed {got} bytes, the tree has "
                                       f"{self.payload}")
                self.record(metric, "imgfs", self.payload / seconds / 1e6)

    def measure_latency(self, metric: str, tree: Path) -> None:
        value, details = measure_mount_latency(self.exporter(tree), self.settings)
        self.samples[metric] = {"imgfs": [value]}
        self.details[metric] = details
        print(f"  {metric:<14} imgfs  {value:10.1f} ms", flush=True)

    # -- the outcome -------------------------------------------------------------------

    def entry(self, metric: str) -> dict[str, Any]:
        label, unit, target = METRICS[metric]
        details = self.details.get(metric, {})
        if "status" in details:
            return {"unit": unit, "status": details["status"]}
        sides = self.samples[metric]
        imgfs = statistics.median(sides["imgfs"])
        result: dict[str, Any] = {"unit": unit, "imgfs": round(imgfs, 2)}
        if "dir" in sides:
            host = statistics.median(sides["dir"])
            result["dir"] = round(host, 2)
            result["ratio"] = round(imgfs / host, 3) if host else 0.0
        if target is not None:
            if "max_ms" in target:
                result["target"] = f"< {target['max_ms']:g} ms"
                result["pass"] = imgfs < target["max_ms"]
            else:
                result["target"] = f">= {target['min_ratio']:g}x"
                result["pass"] = result["ratio"] >= target["min_ratio"]
        if metric in PROXIES:
            result["proxy"] = True
        result["details"] = {**details, **{f"{side}_runs": [round(v, 1) for v in values]
                                           for side, values in sides.items()
                                           if len(values) > 1}}
        return result


def run_fat_case(settings: Settings) -> dict:
    """The case's result in run.py's form: {"status", "format", "metrics"}."""
    bench = Bench(settings)
    print(f"\n== {CASE_NAME}: building a {settings.image_size // MiB} MiB tree and "
          f"a {MANY_DIRS * MANY_PER_DIR}-file tree (in the table, the host directory "
          "takes the qsd column)", flush=True)
    count = build_tree(bench.tree, settings.image_size)
    build_many(bench.many)
    bench.files = tree_files(bench.tree)
    bench.payload = sum(path.stat().st_size for path in bench.files)
    try:
        bench.measure_latency("mount_10k", bench.many)
        bench.measure_latency("mount_tree", bench.tree)
        bench.measure_vfat()
        bench.measure_raw_read()
        bench.measure_raw_image()
        bench.measure_mcopy()
    finally:
        shutil.rmtree(bench.tree, ignore_errors=True)
        shutil.rmtree(bench.many, ignore_errors=True)
    metrics = {metric: bench.entry(metric) for metric in METRICS
               if metric in bench.samples or metric in bench.details}
    result: dict[str, Any] = {"status": "ran", "format": CASE_NAME, "metrics": metrics,
                              "tree": {"files": count, "bytes": bench.payload,
                                       "many_files": MANY_DIRS * MANY_PER_DIR}}
    if bench.profiles:
        result["imgfs_profile"] = bench.profiles
    return result


def format_row(case: str, metric: str, entry: dict) -> str:
    """A row of run.py's table: the host directory in the qsd column."""
    label, unit, _ = METRICS[metric]
    if "status" in entry:
        return f"{case:<17} {label:<21} {entry['status']}"
    host = f"{entry['dir']:>10.1f}" if "dir" in entry else f"{'-':>10}"
    ratio = f"{entry['ratio']:>6.2f} {'imgfs/dir':<9}" if "ratio" in entry else f"{'':>16}"
    verdict = ""
    if "target" in entry:
        verdict = f"{entry['target']:>10}  {'PASS' if entry['pass'] else 'FAIL'}"
        if entry.get("proxy"):
            verdict += " (proxy)"
    return f"{case:<17} {label:<21} {entry['imgfs']:>10.1f} {host} {unit:<5} {ratio} {verdict}"

