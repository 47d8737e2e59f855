"""The `iscsi` case of the imgfs benchmark: a raw image served as a LUN by
tgtd on loopback, mounted by imgfs (``imgfs mount iscsi://...``) and by
qemu-storage-daemon (``--blockdev driver=iscsi,...``, QEMU's own libiscsi
driver, under a raw format node), one after the other over the same tgtd.

`bench/run.py --case iscsi` runs it (also part of `--case all`), with
run.py's method: a fresh mount per fio job, the image file (tgtd's backing
store) warm in the host page cache, the FUSE page cache empty.  Both
exporters pay the same tgtd and the same loopback TCP, so the ratios compare
the initiators and their FUSE paths.

Metrics and the targets of issue 18: sequential read 1 MiB >= 1.5x, 4 KiB
random read >= 1.0x, sequential write 1 MiB >= 1.0x; mount latency is
measured and reported.
"""
from __future__ import annotations

import contextlib
import random
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from run import (
    Case,
    ImgfsExporter,
    QsdExporter,
    Settings,
    Target,
    build_image,
    format_row,
    measure_metric,
    metric_entry,
    run,
)

CASE = Case("iscsi", "raw", (), ("-O", "raw"), metrics={
    "seq_read": Target(1.5), "rand_read": Target(1.0), "seq_write": Target(1.0),
    "mount_latency": None,
})
IQN = "iqn.2026-01.bench.imgfs:lun"
LUN = 1
#: run.py prints an extra case's rows with its module's format_row: the usual one
__all__ = ["format_row", "run_iscsi_case"]
#: where tgtd keeps its control sockets
CONTROL_DIR = Path("/var/run/tgtd")


def free_control_port() -> str:
    """A tgtd control port (-C, below 32768) no other tgtd here uses."""
    port = random.SystemRandom().randrange(1000, 30000)
    while (CONTROL_DIR / f"socket.{port}").exists():
        port += 1
    return str(port)


def listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def tgtd_serving(image: Path, workdir: Path) -> Iterator[str]:
    """tgtd on 127.0.0.1 with `image` as LUN 1 of one target; its URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    control = free_control_port()
    log = open(workdir / "tgtd.log", "ab")
    proc = subprocess.Popen(["tgtd", "-f", "-C", control, "--iscsi",
                             f"portal=127.0.0.1:{port}"], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 10
        while not listening(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("tgtd did not start")
            time.sleep(0.02)
        adm = ["tgtadm", "-C", control, "--lld", "iscsi"]
        run([*adm, "--mode", "target", "--op", "new", "--tid", "1", "--targetname", IQN])
        run([*adm, "--mode", "logicalunit", "--op", "new", "--tid", "1", "--lun", str(LUN),
             "--backing-store", str(image)])
        run([*adm, "--mode", "target", "--op", "bind", "--tid", "1",
             "--initiator-address", "127.0.0.1"])
        yield f"iscsi://127.0.0.1:{port}/{IQN}/{LUN}"
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        for leftover in (f"socket.{control}", f"socket.{control}.lock"):
            (CONTROL_DIR / leftover).unlink(missing_ok=True)


class IscsiImgfs(ImgfsExporter):
    url = ""

    @property
    def raw_path(self) -> Path:
        return self.mountpoint / f"{LUN}.raw"

    def command(self) -> list[str]:
        return [*super().command()[:-2], self.url, str(self.mountpoint)]


class IscsiQsd(QsdExporter):
    url = ""

    def command(self) -> list[str]:
        portal, _, rest = self.url.removeprefix("iscsi://").partition("/")
        target = rest.rsplit("/", 1)[0]
        return ["qemu-storage-daemon",
                "--blockdev", f"driver=iscsi,node-name=file0,transport=tcp,portal={portal},"
                              f"target={target},lun={LUN}",
                "--blockdev", "driver=raw,node-name=fmt0,file=file0",
                "--export", f"type=fuse,id=exp0,node-name=fmt0,"
                            f"mountpoint={self.mountpoint},writable=on"]


def run_iscsi_case(settings: Settings) -> dict[str, Any]:
    """The case's result in run.py's form: {"status", "format", "metrics"}."""
    print(f"\n== iscsi: building a {settings.image_size >> 20} MiB raw image, "
          "served by tgtd on loopback", flush=True)
    image = build_image(CASE, settings)
    metrics: dict[str, dict] = {}
    profiles: dict[str, dict] = {}
    try:
        with tgtd_serving(image, settings.workdir) as url:
            exporters = (type("IscsiImgfs", (IscsiImgfs,), {"url": url}),
                         type("IscsiQsd", (IscsiQsd,), {"url": url}))
            for metric, target in CASE.metrics.items():
                if settings.only and metric not in settings.only:
                    continue
                outcome = measure_metric(CASE, metric, image, settings, profiles, exporters)
                metrics[metric] = metric_entry(metric, target, outcome)
    finally:
        image.unlink(missing_ok=True)
    result: dict[str, Any] = {"status": "ran", "format": "iscsi", "metrics": metrics}
    if profiles:
        result["imgfs_profile"] = profiles
    return result
