"""Servers on loopback for the benchmark's network cases (run.py's
`Case.server`): ``serve_NAME(workdir)`` starts one server for a case and
yields an object whose ``serve(image)`` puts the case's image behind it and
says how each exporter reaches it (`run.Served`).  Both exporters then go
through the same server, so the ratios compare imgfs's driver and FUSE path
with QEMU's own driver for the protocol.  The servers are the tests'
(tests/sshd.py, tests/glusterd.py) or started here as the tests start them.
"""
from __future__ import annotations

import contextlib
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from run import BENCH_DIR, Served, run

sys.path.insert(0, str(BENCH_DIR.parent))

if TYPE_CHECKING:
    from tests.ceph import CephCluster
    from tests.glusterd import GlusterServer
    from tests.nginx import Nginx
    from tests.sshd import Sshd


# -- ssh: OpenSSH's sshd and an ssh-agent ------------------------------------------


class SshServer:
    def __init__(self, sshd: Sshd) -> None:
        self.sshd = sshd

    def serve(self, image: Path) -> Served:
        return Served(self.sshd.url(image),
                      f"driver=ssh,server.host=127.0.0.1,server.port={self.sshd.port},user=root,"
                      f"path={image},host-key-check.mode=none",
                      f"{image.stem}.raw")


@contextlib.contextmanager
def serve_ssh(workdir: Path) -> Iterator[SshServer]:
    from tests.sshd import running_sshd
    with running_sshd(workdir / "sshd", "internal-sftp") as sshd:
        saved = os.environ.get("SSH_AUTH_SOCK")
        os.environ["SSH_AUTH_SOCK"] = str(sshd.agent_sock)
        try:
            yield SshServer(sshd)
        finally:
            if saved is None:
                os.environ.pop("SSH_AUTH_SOCK", None)
            else:
                os.environ["SSH_AUTH_SOCK"] = saved


# -- iscsi: tgtd ---------------------------------------------------------------------

IQN = "iqn.2026-01.bench.imgfs:lun"
LUN = 1
#: where tgtd keeps its control sockets
TGTD_CONTROL_DIR = Path("/var/run/tgtd")


class IscsiServer:
    def __init__(self, control: str, port: int) -> None:
        self.adm = ["tgtadm", "-C", control, "--lld", "iscsi"]
        self.port = port

    def serve(self, image: Path) -> Served:
        """`image` as LUN 1 of a new target."""
        run([*self.adm, "--mode", "target", "--op", "new", "--tid", "1", "--targetname", IQN])
        run([*self.adm, "--mode", "logicalunit", "--op", "new", "--tid", "1", "--lun",
             str(LUN), "--backing-store", str(image)])
        run([*self.adm, "--mode", "target", "--op", "bind", "--tid", "1",
             "--initiator-address", "127.0.0.1"])
        portal = f"127.0.0.1:{self.port}"
        url = f"iscsi://{portal}/{IQN}/{LUN}"
        settle_tgtd(url, image.stat().st_size)
        return Served(url, f"driver=iscsi,transport=tcp,portal={portal},target={IQN},lun={LUN}",
                      f"{LUN}.raw")


#: a READ this large leaves tgtd's allocator settled (see settle_tgtd)
SETTLING_READ = 4 * 1024 * 1024


def settle_tgtd(url: str, size: int) -> None:
    """One large READ through QEMU before either exporter runs.  tgtd
    mallocs a buffer per command; glibc maps each large buffer afresh and
    trims its heap on free (the memory then faulted in again page by page)
    until it has freed a buffer larger than the commands in flight, its
    thresholds following the largest buffer freed so far.  A fresh tgtd is
    slow until then, and whichever exporter ran first left it settled or
    not for the other (qsd's sequential reads went from 512 to 670-800 MB/s
    after imgfs's 1 MiB READs).  A target that has served for a while has
    long seen such a READ."""
    run(["qemu-img", "bench", "-f", "raw", "-c", "1", "-s", str(min(SETTLING_READ, size)),
         url])


def _free_tgtd_control_port() -> str:
    """A tgtd control port (-C, below 32768) no other tgtd here uses."""
    port = random.SystemRandom().randrange(1000, 30000)
    while (TGTD_CONTROL_DIR / f"socket.{port}").exists():
        port += 1
    return str(port)


@contextlib.contextmanager
def serve_iscsi(workdir: Path) -> Iterator[IscsiServer]:
    """tgtd on 127.0.0.1 and a free port."""
    from tests.conftest import connectable, free_port, stop_process
    port = free_port()
    control = _free_tgtd_control_port()
    with open(workdir / "tgtd.log", "ab") as log:
        proc = subprocess.Popen(["tgtd", "-f", "-C", control, "--iscsi",
                                 f"portal=127.0.0.1:{port}"], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 10
        while not connectable(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("tgtd did not start")
            time.sleep(0.02)
        yield IscsiServer(control, port)
    finally:
        stop_process(proc)
        for leftover in (f"socket.{control}", f"socket.{control}.lock"):
            (TGTD_CONTROL_DIR / leftover).unlink(missing_ok=True)


# -- gluster: glusterd and a one-brick volume ------------------------------------------


class GlusterVolume:
    def __init__(self, server: GlusterServer) -> None:
        self.server = server

    def serve(self, image: Path) -> Served:
        """The image linked into the brick (on one brick, the brick's file is
        the volume's file), still at its own path for the cache warm-up."""
        os.link(image, self.server.brick / image.name)
        volume = self.server.volume
        from tests.glusterd import HOST, PORT
        return Served(f"gluster://{HOST}/{volume}/{image.name}",
                      f"driver=gluster,volume={volume},path=/{image.name},"
                      f"server.0.type=inet,server.0.host={HOST},server.0.port={PORT}",
                      f"{image.stem}.raw")


@contextlib.contextmanager
def serve_gluster(workdir: Path) -> Iterator[GlusterVolume]:
    from tests.glusterd import GlusterServer, port_free
    if not port_free():
        raise RuntimeError("the glusterd address is taken (another glusterd?)")
    (workdir / "gluster").mkdir()
    server = GlusterServer(workdir / "gluster")
    try:
        server.start()
        yield GlusterVolume(server)
    finally:
        server.stop()


# -- http: nginx ---------------------------------------------------------------------


class HttpServer:
    def __init__(self, nginx: Nginx) -> None:
        self.nginx = nginx

    def serve(self, image: Path) -> Served:
        """The image linked into nginx's root, still at its own path for the
        cache warm-up."""
        os.link(image, self.nginx.www / image.name)
        url = self.nginx.url(image.name)
        return Served(url, f"driver=http,url={url}", f"{image.stem}.raw",
                      read_only=True, qsd_read_ahead_off=True)


@contextlib.contextmanager
def serve_http(workdir: Path) -> Iterator[HttpServer]:
    """nginx from the tests (one process, loopback only)."""
    from tests.nginx import Nginx
    nginx = Nginx(workdir / "nginx")
    nginx.start()
    try:
        yield HttpServer(nginx)
    finally:
        nginx.stop()


# -- rbd: a one-node Ceph cluster ------------------------------------------------------


class RbdPool:
    def __init__(self, cluster: CephCluster) -> None:
        self.cluster = cluster

    def serve(self, image: Path) -> Served:
        """The image imported into the pool (RBD keeps its own objects)."""
        from tests.ceph import POOL
        self.cluster.rbd("import", str(image), f"{POOL}/{image.stem}")
        return Served(self.cluster.url(image.stem),
                      f"driver=rbd,pool={POOL},image={image.stem},conf={self.cluster.conf}",
                      f"{image.stem}.raw")


@contextlib.contextmanager
def serve_rbd(workdir: Path) -> Iterator[RbdPool]:
    from tests.ceph import CephCluster
    cluster = CephCluster(workdir / "ceph")
    try:
        cluster.start()
        yield RbdPool(cluster)
    finally:
        cluster.stop()
