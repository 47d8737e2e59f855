"""The nbd driver against real servers: qemu-nbd and nbdkit on loopback TCP
and unix sockets in tmp dirs.  qemu-img / qemu-io are the oracle for what an
image contains after imgfs wrote to it through the server."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from imgfs.drivers import nbd

from imgfs.block import Status
from imgfs.errors import ImgfsError, NoSpace, NotFound, PermissionDenied, ReadOnly, Unreachable
from imgfs.graph import open_image
from imgfs.node import Node, OpenContext, describe_status
from imgfs.registry import get_driver
from tests.conftest import connectable, free_port, stop_process

QEMU_TOOLS = all(shutil.which(tool) for tool in ("qemu-nbd", "qemu-img", "qemu-io"))
needs_qemu = pytest.mark.skipif(not QEMU_TOOLS, reason="qemu-nbd/qemu-img/qemu-io not installed")
needs_nbdkit = pytest.mark.skipif(not shutil.which("nbdkit"), reason="nbdkit not installed")

MiB = 1 << 20
RO = OpenContext(read_only=True)


# -- helpers ----------------------------------------------------------------------


def run(fn: Any, *args: Any, timeout: float = 20) -> Any:
    """Run an async test body under trio, failing instead of hanging."""
    async def main() -> Any:
        with trio.fail_after(timeout):
            return await fn(*args)
    return trio.run(main)






@contextlib.contextmanager
def serve(argv: list[str], address: str | int, log: Path) -> Iterator[subprocess.Popen]:
    """Run a server until the block ends; `address` is a socket path or TCP port."""
    with open(log, "ab") as log_file:
        proc = subprocess.Popen(argv, stdout=log_file, stderr=log_file)
    try:
        deadline = time.monotonic() + 10
        while not connectable(address):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{argv[0]} did not start: {log.read_text()}")
            time.sleep(0.02)
        yield proc
    finally:
        stop_process(proc)


def qemu_nbd(image: Path, address: str | int, *, fmt: str = "raw", export: str | None = "exp",
             read_only: bool = False) -> list[str]:
    argv = ["qemu-nbd", "-t", "-e", "16", "-f", fmt]
    if export is not None:
        argv += ["-x", export]
    if isinstance(address, str):
        argv += ["-k", address]
    else:
        argv += ["-b", "127.0.0.1", "-p", str(address)]
    if read_only:
        argv.append("-r")
    return argv + [str(image)]


def nbdkit(address: str | int, *args: str) -> list[str]:
    where = ["-U", address] if isinstance(address, str) else ["-i", "127.0.0.1", "-p", str(address)]
    return ["nbdkit", "-f", *where, *args]


def random_image(path: Path, size: int, seed: int = 1) -> bytes:
    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return data


def qemu(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def raw_contents(image: Path, fmt: str, tmp_path: Path) -> bytes:
    """What qemu-img says the image contains."""
    out = tmp_path / f"{image.name}.expected.raw"
    qemu("qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", str(image), str(out))
    return out.read_bytes()


def make_qcow2(path: Path) -> None:
    """A qcow2 with data written out of order, a zero cluster and holes."""
    qemu("qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=65536", str(path), "4M")
    qemu("qemu-io", "-f", "qcow2",
         "-c", "write -P 0x55 3M 100k", "-c", "write -P 0xaa 4096 64k",
         "-c", "write -z 1M 64k", "-c", "write -P 0x11 2000000 5000", str(path))


def leaf(node: Node) -> Node:
    while node.file is not None:
        node = node.file
    return node


def nbd_driver(node: Node) -> nbd.NbdDriver:
    driver = leaf(node).driver
    assert isinstance(driver, nbd.NbdDriver)
    return driver


def conn_of(node: Node) -> nbd.NbdConnection:
    conn = nbd_driver(node).conn
    assert conn is not None
    return conn


def json_source(tree: dict) -> str:
    return "json:" + json.dumps(tree)


async def read_all(source: str, ctx: OpenContext = RO, fmt: str | None = None) -> bytes:
    node = await open_image(source, ctx, fmt=fmt)
    try:
        return bytes(await node.read(0, node.size))
    finally:
        await node.aclose()


async def check_map(node: Node, entries: list[dict]) -> None:
    """Our block status agrees with qemu-img map on every range it lists."""
    for entry in entries:
        offset, end = entry["start"], entry["start"] + entry["length"]
        while offset < end:
            extent = await node.block_status(offset, end - offset)
            got = describe_status(extent.status)
            assert got == {"data": entry["data"], "zero": entry["zero"]}, (offset, entry)
            offset += extent.length


# -- every filename form, with a real connection ----------------------------------


@needs_qemu
def test_every_source_form(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    data = random_image(image, MiB)
    port, default_port = free_port(), free_port()
    sock, default_sock = str(tmp_path / "exp.sock"), str(tmp_path / "default.sock")
    log = tmp_path / "server.log"
    named = [
        f"nbd://127.0.0.1:{port}/exp",
        f"nbd+tcp://127.0.0.1:{port}/exp",
        f"nbd:127.0.0.1:{port}:exportname=exp",
        f"nbd+unix:///exp?socket={sock}",
        f"nbd:unix:{sock}:exportname=exp",
        json_source({"driver": "nbd", "export": "exp",
                     "server": {"type": "inet", "host": "127.0.0.1", "port": str(port)}}),
        json_source({"driver": "nbd", "export": "exp",
                     "server": {"type": "unix", "path": sock}}),
        json_source({"driver": "nbd", "host": "127.0.0.1", "port": port, "export": "exp"}),
        json_source({"driver": "nbd", "path": sock, "export": "exp"}),
        json_source({"driver": "raw", "file": {"driver": "nbd", "server.type": "unix",
                                               "server.path": sock, "export": "exp"}}),
        json_source({"driver": "nbd", "filename": f"nbd://127.0.0.1:{port}/exp"}),
        json_source({"file": {"driver": "nbd", "filename": f"nbd+unix:///exp?socket={sock}"}}),
    ]
    default = [                       # the server's default (empty-named) export
        f"nbd://127.0.0.1:{default_port}",
        f"nbd://127.0.0.1:{default_port}/",
        f"nbd:127.0.0.1:{default_port}",
        f"nbd+unix:///?socket={default_sock}",
        f"nbd:unix:{default_sock}",
        json_source({"driver": "nbd", "server": {"type": "unix", "path": default_sock}}),
    ]
    with contextlib.ExitStack() as servers:
        servers.enter_context(serve(qemu_nbd(image, port, read_only=True), port, log))
        servers.enter_context(serve(qemu_nbd(image, sock, read_only=True), sock, log))
        servers.enter_context(serve(qemu_nbd(image, default_port, export=None, read_only=True),
                                    default_port, log))
        servers.enter_context(serve(qemu_nbd(image, default_sock, export=None, read_only=True),
                                    default_sock, log))
        for source in named + default:
            assert run(read_all, source) == data, source
        # format=nbd: the protocol node itself is the image
        assert run(read_all, f"nbd+unix:///exp?socket={sock}", RO, "nbd") == data


@needs_qemu
def test_export_names(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    data = random_image(image, 256 * 1024)
    sock = str(tmp_path / "s.sock")

    async def unknown_export() -> None:
        with pytest.raises(NotFound) as info:
            await open_image(f"nbd+unix:///nope?socket={sock}", RO)
        # The CLI prints the source before the message: no need to repeat it.
        assert str(info.value).startswith("export 'nope' refused: no such export")
        assert info.value.path == f"nbd+unix:///nope?socket={sock}"
        assert "\n" not in str(info.value)

    with serve(qemu_nbd(image, sock, export="hello world", read_only=True), sock,
               tmp_path / "log"):
        assert run(read_all, f"nbd+unix:///hello%20world?socket={sock}") == data
        assert run(read_all, f"nbd:unix:{sock}:exportname=hello world") == data
        assert run(read_all, json_source({"driver": "nbd", "export": "hello world",
                                          "path": sock})) == data
        run(unknown_export)


# -- images behind the server ---------------------------------------------------


@needs_qemu
def test_qcow2_served_by_qemu_nbd(tmp_path: Path) -> None:
    """qemu-nbd -f qcow2 exports the guest contents; block status agrees with
    qemu-img map, both of the export and of the qcow2 file itself."""
    image = tmp_path / "vm.qcow2"
    make_qcow2(image)
    expected = raw_contents(image, "qcow2", tmp_path)
    sock = str(tmp_path / "s.sock")
    url = f"nbd+unix:///exp?socket={sock}"

    async def check(map_of_export: list[dict], map_of_file: list[dict]) -> None:
        node = await open_image(url, RO, fmt="nbd")
        try:
            assert node.size == len(expected)
            assert bytes(await node.read(0, node.size)) == expected
            assert bytes(await node.read(4000, 100)) == expected[4000:4100]
            await check_map(node, map_of_export)
            await check_map(node, map_of_file)
            extent = await node.block_status(2 * MiB, 4096)
            assert extent.status == Status.ALLOCATED | Status.ZERO   # a hole in the qcow2
        finally:
            await node.aclose()

    with serve(qemu_nbd(image, sock, fmt="qcow2", read_only=True), sock, tmp_path / "log"):
        map_of_export = json.loads(qemu("qemu-img", "map", "--output=json", "-f", "raw", url))
        map_of_file = json.loads(qemu("qemu-img", "map", "--output=json", "-U", "-f", "qcow2",
                                      str(image)))
        run(check, map_of_export, map_of_file)


@needs_qemu
def test_qcow2_probed_through_nbd(tmp_path: Path) -> None:
    """qemu-nbd -f raw of a qcow2 file: imgfs probes qcow2 on top of nbd."""
    try:
        get_driver("qcow2")
    except ImgfsError:
        pytest.skip("the qcow2 driver is not written yet")
    image = tmp_path / "vm.qcow2"
    make_qcow2(image)
    expected = raw_contents(image, "qcow2", tmp_path)
    sock = str(tmp_path / "s.sock")

    async def check() -> None:
        node = await open_image(f"nbd+unix:///exp?socket={sock}", RO)
        try:
            assert node.format_name == "qcow2"
            assert bytes(await node.read(0, node.size)) == expected
        finally:
            await node.aclose()

    with serve(qemu_nbd(image, sock, fmt="raw", read_only=True), sock, tmp_path / "log"):
        run(check)


# -- writes ---------------------------------------------------------------------

#: (offset, length) of writes that start and end off any sector boundary
UNALIGNED_WRITES = [(1, 5), (511, 2), (4095, 70000), (65535, 1), (300001, 131072 + 7)]


async def write_pattern(url: str, expected: bytearray, fmt: str) -> None:
    node = await open_image(url, OpenContext(read_only=False), fmt=fmt)
    try:
        for number, (offset, length) in enumerate(UNALIGNED_WRITES):
            chunk = bytes([0x20 + number]) * length
            await node.write(offset, chunk)
            expected[offset:offset + length] = chunk
        await node.write(len(expected) - 3, b"end")
        expected[-3:] = b"end"
        await node.write_zeroes(700001, 9000)
        expected[700001:709001] = bytes(9000)
        await node.write_zeroes(768 * 1024, 128 * 1024, may_unmap=True)
        expected[768 * 1024:896 * 1024] = bytes(128 * 1024)
        # Trimmed contents are unspecified until written again.
        await node.discard(512 * 1024, 64 * 1024)
        await node.write(512 * 1024, b"\x77" * 65536)
        expected[512 * 1024:576 * 1024] = b"\x77" * 65536
        await node.flush()
        assert bytes(await node.read(0, node.size)) == bytes(expected)
    finally:
        await node.aclose()


@needs_qemu
def test_unaligned_writes_raw(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    expected = bytearray(random_image(image, MiB))
    sock = str(tmp_path / "s.sock")
    with serve(qemu_nbd(image, sock), sock, tmp_path / "log"):
        run(write_pattern, f"nbd+unix:///exp?socket={sock}", expected, "raw")
    assert image.read_bytes() == bytes(expected)
    (tmp_path / "expected.raw").write_bytes(expected)
    qemu("qemu-img", "compare", "-f", "raw", "-F", "raw", str(image),
         str(tmp_path / "expected.raw"))


@needs_qemu
def test_unaligned_writes_qcow2(tmp_path: Path) -> None:
    """Writes through qemu-nbd -f qcow2 land in the qcow2 as qemu-img sees it."""
    image = tmp_path / "vm.qcow2"
    qemu("qemu-img", "create", "-f", "qcow2", str(image), "1M")
    qemu("qemu-io", "-f", "qcow2", "-c", "write -P 0x66 0 1M", str(image))
    expected = bytearray(b"\x66" * MiB)
    port = free_port()
    with serve(qemu_nbd(image, port, fmt="qcow2"), port, tmp_path / "log"):
        run(write_pattern, f"nbd://127.0.0.1:{port}/exp", expected, "nbd")
    qemu("qemu-img", "check", "-f", "qcow2", str(image))
    (tmp_path / "expected.raw").write_bytes(expected)
    qemu("qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(image),
         str(tmp_path / "expected.raw"))
    offset, length = UNALIGNED_WRITES[4]
    out = qemu("qemu-io", "-f", "qcow2", "-c", f"read -P 0x24 {offset} {length}", str(image))
    assert "Pattern verification failed" not in out


@needs_nbdkit
def test_block_size_constraints(tmp_path: Path) -> None:
    """A server enforcing 4 KiB minimum / 64 KiB maximum blocks: the core's
    widening, splitting and read-modify-write keep every request legal."""
    sock = str(tmp_path / "s.sock")
    argv = nbdkit(sock, "--filter=blocksize-policy", "memory", "1M",
                  "blocksize-minimum=4096", "blocksize-preferred=65536",
                  "blocksize-maximum=65536", "blocksize-error-policy=error")

    async def check() -> None:
        node = await open_image(f"nbd+unix:///?socket={sock}", OpenContext(read_only=False),
                                fmt="nbd")
        try:
            driver = nbd_driver(node)
            assert (driver.request_alignment, driver.max_transfer) == (4096, 65536)
            expected = bytearray(MiB)
            chunk = random.Random(2).randbytes(300000)
            await node.write(100, chunk)              # unaligned and > maximum
            expected[100:300100] = chunk
            await node.write(MiB - 10, b"0123456789")
            expected[-10:] = b"0123456789"
            await node.write_zeroes(5000, 70000)
            expected[5000:75000] = bytes(70000)
            await node.discard(400000, 300000)        # aligned inward by the core
            assert bytes(await node.read(0, MiB)) == bytes(expected[:400000]) + bytes(
                await node.read(400000, 300000)) + bytes(expected[700000:])
            assert bytes(await node.read(12345, 67891)) == expected[12345:80236]
            extent = await node.block_status(4097, 10)
            assert 0 < extent.length <= 10
        finally:
            await node.aclose()

    with serve(argv, sock, tmp_path / "log"):
        run(check)


# -- many requests in flight ------------------------------------------------------


def concurrent_servers(image: Path, sock: str) -> dict[str, list[str]]:
    servers = {}
    if QEMU_TOOLS:
        servers["qemu-nbd"] = qemu_nbd(image, sock)
    if shutil.which("nbdkit"):
        # simple replies only, and replies in whatever order threads finish
        servers["nbdkit-simple-replies"] = nbdkit(sock, "--no-sr", "file", str(image))
    return servers


@pytest.mark.parametrize("server", ["qemu-nbd", "nbdkit-simple-replies"])
def test_concurrent_requests(tmp_path: Path, server: str) -> None:
    image = tmp_path / "disk.img"
    size = 8 * MiB
    data = bytearray(random_image(image, size, seed=3))
    sock = str(tmp_path / "s.sock")
    argv = concurrent_servers(image, sock).get(server)
    if argv is None:
        pytest.skip(f"{server} not installed")
    rng = random.Random(4)
    reads = [(rng.randrange(size - 300000), rng.randrange(1, 300000)) for _ in range(64)]
    # Writes go to the last MiB, reads to the rest, so results are known.
    writes = [(7 * MiB + n * 16384 + n, bytes([n]) * (5000 + n)) for n in range(32)]
    reads = [(offset % (7 * MiB - 300000), length) for offset, length in reads]

    async def check() -> None:
        node = await open_image(f"nbd+unix:///exp?socket={sock}", OpenContext(read_only=False),
                                fmt="nbd")
        failures: list[Any] = []

        async def reader(offset: int, length: int) -> None:
            if bytes(await node.read(offset, length)) != data[offset:offset + length]:
                failures.append((offset, length))

        async def writer(offset: int, chunk: bytes) -> None:
            await node.write(offset, chunk)
            if bytes(await node.read(offset, len(chunk))) != chunk:
                failures.append((offset, "write"))

        try:
            async with trio.open_nursery() as nursery:
                for offset, length in reads:
                    nursery.start_soon(reader, offset, length)
                for offset, chunk in writes:
                    nursery.start_soon(writer, offset, chunk)
                    nursery.start_soon(node.block_status, offset, 4096)
            assert not failures
            assert conn_of(node).peak_in_flight > 8
        finally:
            await node.aclose()

    with serve(argv, sock, tmp_path / "log"):
        run(check)
    for offset, chunk in writes:
        data[offset:offset + len(chunk)] = chunk
    assert image.read_bytes() == bytes(data)


@needs_qemu
def test_cancelled_requests_keep_the_stream_in_sync(tmp_path: Path) -> None:
    """Requests cancelled at any point (even the task reading replies for
    everyone) leave their replies to be consumed by others, not desync."""
    image = tmp_path / "disk.img"
    size = 8 * MiB
    data = random_image(image, size, seed=6)
    sock = str(tmp_path / "s.sock")
    rng = random.Random(7)

    async def check() -> None:
        node = await open_image(f"nbd+unix:///exp?socket={sock}", RO, fmt="nbd")

        async def read_some(timeout: float | None) -> None:
            offset, length = rng.randrange(size - MiB), rng.randrange(1, MiB)
            with trio.move_on_after(timeout if timeout is not None else 60):
                assert bytes(await node.read(offset, length)) == data[offset:offset + length]

        try:
            for _ in range(10):
                async with trio.open_nursery() as nursery:
                    for number in range(16):
                        timeout = None if number % 4 == 0 else rng.random() * 0.004
                        nursery.start_soon(read_some, timeout)
            for _ in range(8):
                await read_some(None)
            assert conn_of(node).in_flight == 0
        finally:
            await node.aclose()

    with serve(qemu_nbd(image, sock, read_only=True), sock, tmp_path / "log"):
        run(check)


# -- old servers ------------------------------------------------------------------


@needs_nbdkit
@pytest.mark.parametrize("flags", [["--no-sr"], ["--mask-handshake=0"]])
def test_older_protocol_paths(tmp_path: Path, flags: list[str]) -> None:
    """Without structured replies (so no block status), and a plain newstyle
    server that only knows NBD_OPT_EXPORT_NAME."""
    image = tmp_path / "disk.img"
    data = random_image(image, 3 * MiB + 512, seed=5)
    sock = str(tmp_path / "s.sock")

    async def check() -> None:
        node = await open_image(f"nbd+unix:///anything?socket={sock}", RO, fmt="nbd")
        try:
            conn = conn_of(node)
            assert not conn.structured and conn.meta_context_id is None
            assert node.size == len(data)
            assert bytes(await node.read(0, node.size)) == data
            extent = await node.block_status(0, node.size)
            assert extent.length == node.size and extent.status & Status.DATA
        finally:
            await node.aclose()

    with serve(nbdkit(sock, *flags, "file", str(image)), sock, tmp_path / "log"):
        run(check)


# -- errors ---------------------------------------------------------------------


@needs_qemu
def test_read_only_export(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    data = random_image(image, 64 * 1024)
    sock = str(tmp_path / "s.sock")
    url = f"nbd+unix:///exp?socket={sock}"

    async def check() -> None:
        with pytest.raises(PermissionDenied) as info:
            await open_image(url, OpenContext(read_only=False))
        assert "\n" not in str(info.value)
        node = await open_image(url, RO, fmt="nbd")
        try:
            assert nbd_driver(node).writable is False
            assert bytes(await node.read(0, node.size)) == data
            with pytest.raises(ReadOnly):
                await node.write(0, b"x")
            with pytest.raises(ReadOnly):
                await nbd_driver(node).write(0, b"x")
        finally:
            await node.aclose()

    with serve(qemu_nbd(image, sock, read_only=True), sock, tmp_path / "log"):
        run(check)
    assert image.read_bytes() == data


@needs_nbdkit
@pytest.mark.parametrize("replies", ["structured", "simple"])
def test_server_error_replies(tmp_path: Path, replies: str) -> None:
    """Server errors become ImgfsErrors with the errno they mean, for that
    request only; ESHUTDOWN ends the session."""
    sock = str(tmp_path / "s.sock")
    trigger = tmp_path / "fail-reads"
    argv = nbdkit(sock, *(["--no-sr"] if replies == "simple" else []), "--filter=error",
                  "memory", "1M",
                  "error-pwrite=ENOSPC", "error-pwrite-rate=100%",
                  "error-trim=EPERM", "error-trim-rate=100%",
                  "error-pread=EIO", "error-pread-rate=100%", f"error-pread-file={trigger}",
                  "error-zero=ESHUTDOWN", "error-zero-rate=100%")

    async def check() -> None:
        node = await open_image(f"nbd+unix:///?socket={sock}", OpenContext(read_only=False),
                                fmt="nbd")
        try:
            with pytest.raises(NoSpace) as no_space:
                await node.write(4096, b"x" * 4096)
            assert no_space.value.errno == errno.ENOSPC
            assert "write of 4096 bytes" in str(no_space.value)
            with pytest.raises(ImgfsError) as info:
                await node.discard(0, 65536)
            assert info.value.errno == errno.EPERM
            trigger.touch()
            with pytest.raises(ImgfsError) as info:
                await node.read(0, 8192)
            assert info.value.errno == errno.EIO
            trigger.unlink()
            assert bytes(await node.read(0, 8192)) == bytes(8192)   # still connected
            with pytest.raises(ImgfsError) as info:
                await node.write_zeroes(0, 4096)
            assert info.value.errno == errno.ESHUTDOWN
            with pytest.raises(Unreachable) as gone:
                await node.read(0, 512)
            assert "shutting down" in str(gone.value)
        finally:
            await node.aclose()

    with serve(argv, sock, tmp_path / "log"):
        run(check)


@needs_nbdkit
def test_server_killed_mid_session(tmp_path: Path) -> None:
    """Requests in flight and later ones fail with EIO; nothing hangs."""
    sock = str(tmp_path / "s.sock")
    argv = nbdkit(sock, "--filter=delay", "memory", "1M", "rdelay=3")

    async def check(proc: subprocess.Popen) -> None:
        node = await open_image(f"nbd+unix:///?socket={sock}", OpenContext(read_only=False),
                                fmt="nbd")
        errors: list[ImgfsError] = []

        async def slow_read() -> None:
            try:
                await node.read(0, 4096)
            except ImgfsError as exc:
                errors.append(exc)

        try:
            await node.write(0, b"data")
            with trio.fail_after(2.5):          # well before the read's delay ends
                async with trio.open_nursery() as nursery:
                    for _ in range(4):
                        nursery.start_soon(slow_read)
                    await trio.sleep(0.3)
                    proc.kill()
            assert len(errors) == 4
            assert all(exc.errno == errno.EIO and "\n" not in str(exc) for exc in errors)
            with trio.fail_after(2), pytest.raises(ImgfsError) as info:
                await node.write(0, b"more")
            assert info.value.errno == errno.EIO
        finally:
            with trio.fail_after(3):
                await node.aclose()                 # must not raise either

    with serve(argv, sock, tmp_path / "log") as proc:
        run(check, proc)


@needs_qemu
def test_server_killed_between_requests(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    random_image(image, 64 * 1024)
    port = free_port()

    async def check(proc: subprocess.Popen) -> None:
        node = await open_image(f"nbd://127.0.0.1:{port}/exp", RO, fmt="nbd")
        try:
            await node.read(0, 512)
            proc.kill()
            proc.wait()
            for _ in range(2):
                with trio.fail_after(2), pytest.raises(ImgfsError) as info:
                    await node.read(0, 512)
                assert info.value.errno == errno.EIO
        finally:
            await node.aclose()

    with serve(qemu_nbd(image, port, read_only=True), port, tmp_path / "log") as proc:
        run(check, proc)


def test_unreachable_server(tmp_path: Path) -> None:
    port = free_port()                  # nothing listens there

    async def check() -> None:
        with pytest.raises(Unreachable) as info:
            await open_image(f"nbd://127.0.0.1:{port}/disk", RO)
        message = str(info.value)
        assert message == f"cannot connect to nbd://127.0.0.1:{port}/disk: Connection refused"
        sock = tmp_path / "missing.sock"
        with pytest.raises(Unreachable) as info:
            await open_image(f"nbd+unix:///?socket={sock}", RO)
        assert str(info.value) == (f"cannot connect to nbd+unix:///?socket={sock}: "
                                   "No such file or directory")

    run(check)


@contextlib.asynccontextmanager
async def peers(*handlers: Any) -> AsyncIterator[list[int]]:
    """In-process TCP peers on loopback, one per handler; yields their ports."""
    async with trio.open_nursery() as nursery:
        ports = []
        for handler in handlers:
            listeners = await nursery.start(partial(trio.serve_tcp, handler, 0,
                                                    host="127.0.0.1"))
            ports.append(listeners[0].socket.getsockname()[1])
        yield ports
        nursery.cancel_scope.cancel()


def test_not_an_nbd_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A peer that speaks something else, or nothing at all."""
    monkeypatch.setattr(nbd, "HANDSHAKE_TIMEOUT", 0.5)

    async def http_like(stream: trio.SocketStream) -> None:
        await stream.send_all(b"HTTP/1.0 400 Bad Request\r\n\r\n")
        await stream.aclose()

    async def silent(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    async def check() -> None:
        async with peers(http_like, silent) as ports:
            with pytest.raises(Unreachable) as info:
                await open_image(f"nbd://127.0.0.1:{ports[0]}/", RO)
            assert "not a usable NBD server" in str(info.value)
            with pytest.raises(Unreachable) as info:
                await open_image(f"nbd://127.0.0.1:{ports[1]}/", RO)
            assert "timed out" in str(info.value)

    run(check)


# -- a misbehaving server: every field the server sends is checked ------------------


async def recv_exactly(stream: trio.SocketStream, size: int) -> bytes:
    data = b""
    while len(data) < size:
        more = await stream.receive_some(size - len(data))
        if not more:
            raise EOFError
        data += more
    return data


def option_reply(option: int, reply_type: int, payload: bytes = b"") -> bytes:
    return nbd.OPTION_REPLY.pack(nbd.NBD_OPTION_REPLY_MAGIC, option, reply_type,
                                 len(payload)) + payload


async def fake_handshake(stream: trio.SocketStream, *, go_replies: list[bytes] | None = None,
                         structured_reply: bytes | None = None) -> None:
    """Play a fixed newstyle server up to the end of NBD_OPT_GO."""
    await stream.send_all(nbd.HELLO.pack(nbd.NBDMAGIC, nbd.IHAVEOPT,
                                         nbd.NBD_FLAG_FIXED_NEWSTYLE))
    await recv_exactly(stream, 4)
    while True:
        _, option, length = nbd.OPTION.unpack(await recv_exactly(stream, nbd.OPTION.size))
        await recv_exactly(stream, length)
        if option == nbd.NBD_OPT_STRUCTURED_REPLY:
            await stream.send_all(structured_reply or option_reply(option, nbd.NBD_REP_ACK))
        elif option == nbd.NBD_OPT_GO:
            info = nbd.INFO_EXPORT.pack(nbd.NBD_INFO_EXPORT, MiB, nbd.NBD_FLAG_HAS_FLAGS)
            for reply in go_replies or [option_reply(option, nbd.NBD_REP_INFO, info),
                                        option_reply(option, nbd.NBD_REP_ACK)]:
                await stream.send_all(reply)
            return
        else:
            await stream.send_all(option_reply(option, nbd.NBD_REP_ERR_UNSUP))


async def handshake_only(stream: trio.SocketStream, **script: Any) -> None:
    with contextlib.suppress(EOFError, trio.BrokenResourceError):
        await fake_handshake(stream, **script)
        await trio.sleep_forever()


async def answer_first_read(stream: trio.SocketStream, reply: Any) -> None:
    """Answer the first request with `reply(handle, offset, length)`."""
    _, _, _, handle, offset, length = nbd.REQUEST.unpack(
        await recv_exactly(stream, nbd.REQUEST.size))
    await stream.send_all(reply(handle, offset, length))
    await trio.sleep_forever()


def chunk(handle: int, chunk_type: int, payload: bytes, flags: int = nbd.NBD_REPLY_FLAG_DONE
          ) -> bytes:
    return nbd.STRUCTURED_REPLY.pack(nbd.NBD_STRUCTURED_REPLY_MAGIC, flags, chunk_type,
                                     handle, len(payload)) + payload


GO = nbd.NBD_OPT_GO
HOSTILE_HANDSHAKES = {
    "huge option reply": (
        {"structured_reply": nbd.OPTION_REPLY.pack(
            nbd.NBD_OPTION_REPLY_MAGIC, nbd.NBD_OPT_STRUCTURED_REPLY, nbd.NBD_REP_ACK,
            0xFFFFFFFF)},
        Unreachable, "option reply of 4294967295 bytes"),
    "bad minimum block size": (
        {"go_replies": [
            option_reply(GO, nbd.NBD_REP_INFO, nbd.INFO_EXPORT.pack(0, MiB, 1)),
            option_reply(GO, nbd.NBD_REP_INFO, nbd.INFO_BLOCK_SIZE.pack(3, 3, 4096, 65536)),
            option_reply(GO, nbd.NBD_REP_ACK)]},
        Unreachable, "minimum block size 3"),
    "short NBD_INFO_EXPORT": (
        {"go_replies": [option_reply(GO, nbd.NBD_REP_INFO, b"\0\0\0\0"),
                        option_reply(GO, nbd.NBD_REP_ACK)]},
        Unreachable, "NBD_INFO_EXPORT of 4 bytes"),
    "no NBD_INFO_EXPORT": (
        {"go_replies": [option_reply(GO, nbd.NBD_REP_ACK)]},
        Unreachable, "without NBD_INFO_EXPORT"),
    "unknown export": (
        {"go_replies": [option_reply(GO, nbd.NBD_REP_ERR_UNKNOWN, b"no export 'x'\x1b[2J")]},
        NotFound, "export '' refused: no such export (server says: no export 'x' [2J)"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_HANDSHAKES))
def test_hostile_handshake(case: str) -> None:
    script, error, text = HOSTILE_HANDSHAKES[case]

    handler = partial(handshake_only, **script)

    async def check() -> None:
        async with peers(handler) as (port,):
            with pytest.raises(error) as info:
                await open_image(f"nbd://127.0.0.1:{port}", RO)
            assert text in str(info.value) and "\n" not in str(info.value)

    run(check)


HOSTILE_REPLIES = {
    "unknown handle": lambda handle, offset, length: nbd.SIMPLE_REPLY.pack(
        nbd.NBD_SIMPLE_REPLY_MAGIC, 0, handle + 1),
    "bad magic": lambda handle, offset, length: b"\xff" * 16,
    "data outside the request": lambda handle, offset, length: chunk(
        handle, nbd.NBD_REPLY_TYPE_OFFSET_DATA, nbd.U64.pack(offset + length) + b"x"),
    "hole too long": lambda handle, offset, length: chunk(
        handle, nbd.NBD_REPLY_TYPE_OFFSET_HOLE, nbd.OFFSET_HOLE.pack(offset, length + 1)),
    "unknown chunk type": lambda handle, offset, length: chunk(handle, 77, b""),
    "error message longer than chunk": lambda handle, offset, length: chunk(
        handle, nbd.NBD_REPLY_TYPE_ERROR, nbd.ERROR_CHUNK.pack(nbd.NBD_EIO, 500) + b"short"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_REPLIES) + ["short read"])
def test_hostile_replies(case: str) -> None:
    """A malformed reply fails its request with EIO and drops the connection;
    a well-formed reply that leaves data out fails only that request."""
    def short(handle: int, offset: int, length: int) -> bytes:
        return chunk(handle, nbd.NBD_REPLY_TYPE_OFFSET_DATA, nbd.U64.pack(offset) + b"x",
                     flags=0) + chunk(handle, nbd.NBD_REPLY_TYPE_NONE, b"")

    reply = HOSTILE_REPLIES.get(case, short)

    async def handler(stream: trio.SocketStream) -> None:
        with contextlib.suppress(EOFError, trio.BrokenResourceError):
            await fake_handshake(stream)
            await answer_first_read(stream, reply)

    async def check() -> None:
        async with peers(handler) as (port,):
            node = await open_image(f"nbd://127.0.0.1:{port}", RO, fmt="nbd")
            try:
                with pytest.raises(ImgfsError) as info:
                    await node.read(0, 4096)
                assert info.value.errno == errno.EIO and "\n" not in str(info.value)
                if case == "short read":
                    assert "sent 1 of 4096 bytes" in str(info.value)
                else:
                    assert "protocol error" in str(info.value)
                    with pytest.raises(Unreachable):
                        await node.read(0, 512)
            finally:
                await node.aclose()

    run(check)


def test_size_rounded_down_to_minimum_block() -> None:
    """Bytes past the last whole minimum block cannot be addressed: hide them."""
    go_replies = [
        option_reply(GO, nbd.NBD_REP_INFO, nbd.INFO_EXPORT.pack(0, MiB + 100, 1)),
        option_reply(GO, nbd.NBD_REP_INFO, nbd.INFO_BLOCK_SIZE.pack(3, 512, 4096, 65536)),
        option_reply(GO, nbd.NBD_REP_ACK)]

    handler = partial(handshake_only, go_replies=go_replies)

    async def check() -> None:
        async with peers(handler) as (port,):
            node = await open_image(f"nbd://127.0.0.1:{port}", RO, fmt="nbd")
            try:
                driver = nbd_driver(node)
                assert (node.size, driver.request_alignment, driver.max_transfer) == (
                    MiB, 512, 65536)
            finally:
                await node.aclose()

    run(check)


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@needs_qemu
@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
def test_ipv6_literal(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    data = random_image(image, 64 * 1024)
    port = free_port()
    argv = ["qemu-nbd", "-t", "-r", "-f", "raw", "-x", "exp", "-b", "::1", "-p", str(port),
            str(image)]
    with subprocess.Popen(argv, stderr=subprocess.DEVNULL) as proc:
        try:
            deadline = time.monotonic() + 10
            while True:
                with socket.socket(socket.AF_INET6) as probe:
                    if probe.connect_ex(("::1", port)) == 0:
                        break
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.02)
            assert run(read_all, f"nbd://[::1]:{port}/exp") == data
            assert run(read_all, f"nbd:[::1]:{port}:exportname=exp") == data
        finally:
            stop_process(proc)


def test_format_nbd_is_listed() -> None:
    cls = get_driver("nbd")
    assert cls is nbd.NbdDriver and cls.kind.value == "protocol"
    assert os.path.basename(nbd.__file__) == "nbd.py"
