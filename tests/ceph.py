"""A one-node Ceph cluster for tests and benchmarks: a monitor on
127.0.0.1 (free ports), one OSD on bluestore over a sparse file, a manager,
and a pool ``rbd`` of size 1, everything (configuration, keyrings, data,
sockets, logs) in one directory; the daemons are stopped by PID.
Recipe: shared/TEST-SERVERS.md."""
from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

from tests.conftest import free_port, run

#: the pool the tests create images in
POOL = "rbd"




class CephCluster:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.conf = base / "ceph.conf"
        self.processes: list[subprocess.Popen[bytes]] = []

    def ceph(self, *args: str, timeout: float = 60) -> str:
        return run("ceph", "-c", self.conf, *args, timeout=timeout).stdout.strip()

    def rbd(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run("rbd", "-c", self.conf, *args, check=check, timeout=60)

    def url(self, image: str, snapshot: str | None = None) -> str:
        at = f"@{snapshot}" if snapshot else ""
        return f"rbd:{POOL}/{image}{at}:conf={self.conf}"

    def _write_config(self, fsid: str, monitor: str) -> None:
        base = self.base
        self.conf.write_text(
            "[global]\n"
            f"fsid = {fsid}\n"
            f"mon_host = {monitor}\n"
            "public_addr = 127.0.0.1\n"
            "cluster_addr = 127.0.0.1\n"
            f"keyring = {base}/$name.keyring\n"
            f"run_dir = {base}/run\n"
            f"admin_socket = {base}/run/$name.asok\n"
            f"log_file = {base}/log/$name.log\n"
            f"mon_data = {base}/$name\n"
            f"osd_data = {base}/$name\n"
            f"mgr_data = {base}/$name\n"
            "osd_pool_default_size = 1\n"
            "osd_pool_default_min_size = 1\n"
            "osd_crush_chooseleaf_type = 0\n"
            "mon_allow_pool_size_one = true\n"
            "osd_objectstore = bluestore\n"
            f"bluestore_block_path = {base}/$name/block.file\n"
            "bluestore_block_size = 2147483648\n"
            "bluestore_block_create = true\n"
            "auth_allow_insecure_global_id_reclaim = false\n")

    def _daemon(self, *args: str) -> None:
        log = open(self.base / "log" / f"{args[0]}.out", "ab")
        # setsid: a timeout around the set-up must not take the daemons down
        self.processes.append(subprocess.Popen(
            [*args, "-c", str(self.conf), "-f"], stdout=log, stderr=log,
            start_new_session=True))
        log.close()

    def kill_osd(self) -> list[str]:
        """SIGKILL the OSD (as a crash) and wait for it; returns how to start it again."""
        osd = next(proc for proc in self.processes if proc.args[0] == "ceph-osd")
        osd.kill()
        osd.wait()
        self.processes.remove(osd)
        return [str(arg) for arg in osd.args[:osd.args.index("-c")]]

    def start_daemon(self, args: list[str]) -> None:
        self._daemon(*args)

    def start(self) -> None:
        base = self.base
        (base / "run").mkdir(parents=True)
        (base / "log").mkdir()
        fsid = str(uuid.uuid4())
        monitor = f"[v2:127.0.0.1:{free_port()},v1:127.0.0.1:{free_port()}]"
        self._write_config(fsid, monitor)
        mon_keyring, admin = base / "mon.a.keyring", base / "client.admin.keyring"
        run("ceph-authtool", "--create-keyring", mon_keyring, "--gen-key", "-n", "mon.",
            "--cap", "mon", "allow *")
        run("ceph-authtool", "--create-keyring", admin, "--gen-key", "-n", "client.admin",
            "--cap", "mon", "allow *", "--cap", "osd", "allow *", "--cap", "mgr", "allow *")
        run("ceph-authtool", mon_keyring, "--import-keyring", admin)
        run("monmaptool", "--create", "--fsid", fsid, "--addv", "a", monitor, base / "monmap")
        (base / "mon.a").mkdir()
        run("ceph-mon", "-c", self.conf, "--mkfs", "-i", "a", "--monmap", base / "monmap",
            "--keyring", mon_keyring)
        self._daemon("ceph-mon", "-i", "a")
        osd_uuid = str(uuid.uuid4())
        osd = self.ceph("osd", "new", osd_uuid)
        (base / f"osd.{osd}").mkdir()
        self.ceph("auth", "get-or-create", f"osd.{osd}", "mon", "allow profile osd",
                  "mgr", "allow profile osd", "osd", "allow *",
                  "-o", str(base / f"osd.{osd}.keyring"))
        run("ceph-osd", "-c", self.conf, "-i", osd, "--mkfs", "--osd-uuid", osd_uuid,
            timeout=120)
        self._daemon("ceph-osd", "-i", osd)
        (base / "mgr.x").mkdir()
        self.ceph("auth", "get-or-create", "mgr.x", "mon", "allow profile mgr",
                  "osd", "allow *", "-o", str(base / "mgr.x.keyring"))
        self._daemon("ceph-mgr", "-i", "x")
        self.ceph("osd", "pool", "create", POOL, "8", "8")
        self.ceph("osd", "pool", "application", "enable", POOL, "rbd")
        # the cluster serves I/O once an image can be created (commands that
        # go through the manager may hang until it is up: do not poll those)
        deadline = time.monotonic() + 120
        while self.rbd("create", "--size", "1", f"{POOL}/probe", check=False).returncode:
            assert time.monotonic() < deadline, "the Ceph cluster did not come up"
            time.sleep(0.2)
        self.rbd("rm", f"{POOL}/probe")

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGCONT)
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
