"""The `partitions` case of the imgfs benchmark: a partition file of
``-o partitions`` against the whole-disk file of the same mount.

`bench/run.py --case partitions` runs it (also part of `--case all`); the
results join run.py's table and JSON, with the whole-disk file in the
column where the other cases put qemu-storage-daemon ("part/disk" ratios).

Method
------
A raw image of --size bytes of random data gets a GPT (sfdisk) with one
partition from 1 MiB to 1 MiB before the end.  Each timed pass mounts it
afresh (``imgfs mount -o partitions,format=raw``), with the image file read
into the host page cache first (as run.py does), and reads the partition's
bytes once with 1 MiB read() calls: through ``NAME-p1.raw``, or through
``NAME.raw`` at the partition's offset.  Sides alternate, max(3, --repeat)
passes each, medians reported.

* part_seq_read   the partition file against the whole-disk file, both of
                  the same ``-o partitions`` mount; target >= 0.9x (issue
                  19).  Under ``-o partitions`` both bypass the kernel page
                  cache (they show the same bytes: see imgfs.fs.View), so
                  this compares the window arithmetic, not two caches.
* plain_seq_read  (no target) the partition file against the whole-disk file
                  of a mount *without* ``-o partitions``, which goes through
                  the page cache and its read-ahead: what exposing the
                  partitions costs a reader of the whole disk.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from run import (
    Case,
    ImgfsExporter,
    MiB,
    Settings,
    imgfs_command,
    mounted,
    prepare_caches,
    random_source,
)

CASE_NAME = "partitions"
MIN_PASSES = 3
METRICS: dict[str, tuple[str, str, float | None]] = {
    "part_seq_read": ("partition file read 1M", "MB/s", 0.9),
    "plain_seq_read": ("part vs plain disk 1M", "MB/s", None),
}


class PartitionExporter(ImgfsExporter):
    def __init__(self, image: Path, settings: Settings, options: str) -> None:
        super().__init__(Case(CASE_NAME, "raw", ("raw",), ()), image, settings)
        self.options = options

    def command(self) -> list[str]:
        return [*imgfs_command(self.settings.imgfs), "mount", "-o", self.options,
                str(self.image), str(self.mountpoint)]


def read_range(path: Path, offset: int, length: int) -> None:
    buffer = bytearray(MiB)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as source:
        source.seek(offset)
        remaining = length
        while remaining:
            count = source.readinto(view[:min(MiB, remaining)])
            if not count:
                raise RuntimeError(f"{path}: short read")
            remaining -= count


def build_disk(settings: Settings) -> tuple[Path, int, int]:
    """The image, and its partition's (offset, length)."""
    image = settings.workdir / "bench-partitions.img"
    subprocess.run(["cp", "--sparse=never", str(random_source(settings)), str(image)],
                   check=True)
    script = f"label: gpt\n1MiB,{(settings.image_size - 2 * MiB) // 512}\n"
    subprocess.run(["sfdisk", "-q", "--wipe", "never", str(image)], input=script, text=True,
                   check=True, capture_output=True)
    listing = json.loads(subprocess.run(["sfdisk", "-J", str(image)], check=True, text=True,
                                        capture_output=True).stdout)
    entry = listing["partitiontable"]["partitions"][0]
    return image, entry["start"] * 512, entry["size"] * 512


def timed_pass(image: Path, settings: Settings, options: str, name: str,
               offset: int, length: int) -> float:
    exporter = PartitionExporter(image, settings, options)
    prepare_caches(image, settings)
    with mounted(exporter):
        path = exporter.mountpoint / name
        started = time.perf_counter()
        read_range(path, offset, length)
        seconds = time.perf_counter() - started
    return length / seconds / 1e6


def run_partitions_case(settings: Settings) -> dict:
    """The case's result in run.py's form: {"status", "format", "metrics"}."""
    print(f"\n== {CASE_NAME}: a {settings.image_size // MiB} MiB raw disk with one GPT "
          "partition (in the table, the whole-disk file takes the qsd column)", flush=True)
    image, offset, length = build_disk(settings)
    stem = image.stem
    sides = {
        "part_seq_read": (("partitions,format=raw", f"{stem}-p1.raw", 0),
                          ("partitions,format=raw", f"{stem}.raw", offset)),
        "plain_seq_read": (("partitions,format=raw", f"{stem}-p1.raw", 0),
                           ("format=raw", f"{stem}.raw", offset)),
    }
    metrics: dict[str, Any] = {}
    try:
        for metric, (part, disk) in sides.items():
            samples: dict[str, list[float]] = {"part": [], "disk": []}
            for repetition in range(max(MIN_PASSES, settings.repeat)):
                order = (("part", part), ("disk", disk))
                for side, (options, name, start) in order[::-1] if repetition % 2 else order:
                    rate = timed_pass(image, settings, options, name, start, length)
                    samples[side].append(rate)
                    print(f"  {metric:<14} {side:<6} {rate:10.1f} MB/s", flush=True)
            metrics[metric] = entry(metric, samples)
    finally:
        image.unlink(missing_ok=True)
    return {"status": "ran", "format": "raw", "metrics": metrics,
            "partition": {"offset": offset, "length": length}}


def entry(metric: str, samples: dict[str, list[float]]) -> dict[str, Any]:
    _label, unit, target = METRICS[metric]
    part, disk = statistics.median(samples["part"]), statistics.median(samples["disk"])
    result: dict[str, Any] = {"unit": unit, "imgfs": round(part, 2), "disk": round(disk, 2),
                              "ratio": round(part / disk, 3) if disk else 0.0,
                              "details": {f"{side}_runs": [round(v, 1) for v in values]
                                          for side, values in samples.items()}}
    if target is not None:
        result["target"] = f">= {target:g}x"
        result["pass"] = result["ratio"] >= target
    return result


def format_row(case: str, metric: str, entry: dict) -> str:
    """A row of run.py's table: the whole-disk file in the qsd column."""
    label, unit, _ = METRICS[metric]
    verdict = ""
    if "target" in entry:
        verdict = f"{entry['target']:>10}  {'PASS' if entry['pass'] else 'FAIL'}"
    return (f"{case:<17} {label:<21} {entry['imgfs']:>10.1f} {entry['disk']:>10.1f} "
            f"{unit:<5} {entry['ratio']:>6.2f} {'part/disk':<9} {verdict}")
