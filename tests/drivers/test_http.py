"""The http and https drivers against a real nginx on loopback (tests/nginx.py),
with QEMU's curl driver (qemu-img convert of the same URL) as the oracle."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from imgfs.errors import ImgfsError
from imgfs.graph import open_image
from imgfs.node import Node, OpenContext
from tests.conftest import IMGFS, imgfs, need, random_bytes, run
from tests.nginx import COOKIE, PASSWORD, Nginx

MiB = 1 << 20
RO = OpenContext(read_only=True)


def need_nginx() -> None:
    if shutil.which("nginx") is None and not os.path.exists("/usr/sbin/nginx"):
        need("nginx")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    """nginx serving disk.raw (5 MiB + 1536 bytes of random data), odd.raw
    (a size QEMU would round up to 512), and top.qcow2 over base.qcow2 in
    sub/ (both on the server)."""
    need_nginx()
    need("qemu-img", "qemu-io")
    nginx = Nginx(tmp_path_factory.mktemp("nginx"))
    (nginx.www / "disk.raw").write_bytes(random_bytes(5 * MiB + 1536, seed=7))
    (nginx.www / "odd.raw").write_bytes(random_bytes(MiB + 123, seed=8))
    (nginx.www / "empty.raw").write_bytes(b"")
    make_chain(nginx.www / "sub")
    nginx.start()
    try:
        yield nginx
    finally:
        nginx.stop()


def make_chain(directory: Path) -> None:
    """base.qcow2 and top.qcow2 (backing named relative: base.qcow2)."""
    directory.mkdir()
    base, top = directory / "base.qcow2", directory / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", base, "8M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 3M", "-c", "write -P 0x12 7M 64k", base)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top, "8M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x22 1M 1M", "-c", "write -z 2M 64k",
        "-c", "write -P 0x23 5000000 3000", top)


def qemu_convert(out: Path, *source: str) -> bytes:
    """QEMU's curl driver's answer.  One coroutine (-m 1): with several,
    QEMU 7.2's curl driver sometimes never finishes a convert."""
    for _attempt in range(3):
        result = run("qemu-img", "convert", "-m", "1", "-O", "raw", *source, out,
                     check=False, timeout=30)
        if result.returncode == 0:
            return out.read_bytes()
    raise AssertionError(f"qemu-img convert failed: {result.stderr}")


def imgfs_convert(out: Path, source: str, *extra: str) -> bytes:
    imgfs("convert", *extra, "-O", "raw", source, out, timeout=60)
    return out.read_bytes()


def refused(*args: str, env: dict[str, str] | None = None) -> str:
    """Run imgfs expecting one line on stderr and exit 1, in under 10 s."""
    started = time.monotonic()
    result = subprocess.run([IMGFS, *args], capture_output=True, text=True, timeout=30,
                            env=env)
    assert time.monotonic() - started < 10
    assert result.returncode == 1, result
    assert result.stderr.count("\n") == 1, result.stderr
    return result.stderr


def run_trio(fn, *args, timeout: float = 30):  # type: ignore[no-untyped-def]
    async def main():  # type: ignore[no-untyped-def]
        with trio.fail_after(timeout):
            return await fn(*args)
    return trio.run(main)


def http_leaf(node: Node) -> Node:
    while node.file is not None:
        node = node.file
    return node


# -- contents against QEMU ---------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_raw_over_http_matches_qemu_and_the_file(server: Nginx, tmp_path: Path,
                                                 host: str) -> None:
    url = server.url("disk.raw", host=host)
    ours = imgfs_convert(tmp_path / "ours.raw", url)
    assert ours == (server.www / "disk.raw").read_bytes()
    assert ours == qemu_convert(tmp_path / "qemu.raw", url)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_raw_over_https_sslverify_off_matches_qemu(server: Nginx, tmp_path: Path,
                                                   host: str) -> None:
    url = server.url("disk.raw", https=True, host=host)
    ours = imgfs_convert(tmp_path / "ours.raw",
                         f'json:{{"driver":"https","url":"{url}","sslverify":false}}')
    assert ours == (server.www / "disk.raw").read_bytes()
    assert ours == qemu_convert(tmp_path / "qemu.raw", "--image-opts",
                                f"driver=https,url={url},sslverify=off")


def test_qcow2_with_backing_on_the_server(server: Nginx, tmp_path: Path) -> None:
    """The backing file name (base.qcow2) resolves relative to the URL, as
    QEMU resolves it; over https with sslverify=off the backing file inherits
    the option (QEMU cannot resolve it there: "cannot determine actual path")."""
    url = server.url("sub/top.qcow2")
    expected = qemu_convert(tmp_path / "qemu.raw", url)
    assert imgfs_convert(tmp_path / "ours.raw", url) == expected
    info = imgfs("info", "--output", "json", url).stdout
    assert f'"full-backing-filename": "{server.url("sub/base.qcow2")}"' in info
    secure = server.url("sub/top.qcow2", https=True)
    tree = ('json:{"driver":"qcow2","file":{"driver":"https",'
            f'"url":"{secure}","sslverify":false}}}}')
    assert imgfs_convert(tmp_path / "secure.raw", tree) == expected


def test_redirect_is_followed_and_backing_resolves_after_it(server: Nginx,
                                                            tmp_path: Path) -> None:
    expected = qemu_convert(tmp_path / "qemu.raw", server.url("sub/top.qcow2"))
    assert imgfs_convert(tmp_path / "ours.raw", server.url("redirect/sub/top.qcow2")) == expected
    raw = imgfs_convert(tmp_path / "raw.raw", server.url("redirect/disk.raw"))
    assert raw == (server.www / "disk.raw").read_bytes()


def test_redirect_loop_is_refused(server: Nginx) -> None:
    message = refused("info", server.url("loop"))
    assert message == f"imgfs: {server.url('loop')}: more than 10 redirects\n"


# -- refusals: one line naming the URL, exit 1, in under 10 s ---------------------


def test_server_without_range_support_is_refused(server: Nginx, tmp_path: Path) -> None:
    url = server.url("norange/disk.raw")
    assert refused("info", url) == (
        f"imgfs: {url}: the server does not support range requests (it answered a "
        "Range request with the whole file)\n")
    # QEMU refuses it too
    result = run("qemu-img", "info", url, check=False)
    assert result.returncode != 0 and "range" in result.stderr


def test_self_signed_certificate_is_refused_unless_trusted(server: Nginx,
                                                           tmp_path: Path) -> None:
    """sslverify=on (the default) checks against the system's CAs; a CA file
    given with SSL_CERT_FILE is trusted (QEMU's curl, built on GnuTLS,
    ignores SSL_CERT_FILE and has no CA option: only sslverify=off works)."""
    url = server.url("disk.raw", https=True)
    message = refused("info", url)
    assert message.startswith(f"imgfs: cannot connect to {url}: certificate verification "
                              "failed")
    assert "sslverify=off" in message
    env = {**os.environ, "SSL_CERT_FILE": str(server.cert)}
    out = tmp_path / "trusted.raw"
    run(IMGFS, "convert", "-O", "raw", url, out, env=env)
    assert out.read_bytes() == (server.www / "disk.raw").read_bytes()
    assert run("qemu-img", "info", url, check=False, env=env).returncode != 0


def test_not_found_unreachable_and_bad_urls(server: Nginx) -> None:
    missing = server.url("nope.raw")
    assert refused("info", missing) == f"imgfs: {missing}: HTTP 404 Not Found\n"
    with socket.socket() as sock:                       # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}/x.raw"
        assert refused("info", closed) == f"imgfs: cannot connect to {closed}: Connection refused\n"
    nowhere = "http://nonexistent.invalid/x.raw"
    assert refused("info", nowhere).startswith(f"imgfs: cannot connect to {nowhere}: ")
    mismatch = f'json:{{"driver":"http","url":"{server.url("disk.raw", https=True)}"}}'
    result = imgfs("info", mismatch, check=False)
    assert result.returncode == 2 and "needs a http:// URL" in result.stderr


def test_silent_server_times_out(tmp_path: Path) -> None:
    """A server that accepts but never answers: refused after `timeout`."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/x.raw"
        started = time.monotonic()
        message = refused("info", f'json:{{"driver":"http","url":"{url}","timeout":1}}')
        assert 1 <= time.monotonic() - started < 5
        assert message == f"imgfs: {url}: no answer within 1 s\n"


@pytest.mark.parametrize("option, message", [
    ("readahead=1000", "option 'readahead': 1000 is not a multiple of 512"),
    ("timeout=0", "option 'timeout': must be between 1 and 10000"),
])
def test_invalid_options_are_refused(server: Nginx, option: str, message: str) -> None:
    name, value = option.split("=")
    tree = f'json:{{"driver":"http","url":"{server.url("disk.raw")}","{name}":"{value}"}}'
    result = imgfs("info", tree, check=False)
    assert result.returncode in (1, 2) and message in result.stderr, result.stderr


# -- credentials ---------------------------------------------------------------


def test_basic_auth_with_a_secret_and_in_the_url(server: Nginx, tmp_path: Path) -> None:
    url = server.url("auth/disk.raw")
    expected = (server.www / "disk.raw").read_bytes()
    secret = tmp_path / "pw"
    secret.write_text(PASSWORD)
    tree = f'json:{{"driver":"http","url":"{url}","username":"imgfs","password-secret":"pw"}}'
    out = tmp_path / "out.raw"
    imgfs("convert", "--object", f"secret,id=pw,file={secret}", "-O", "raw", tree, out)
    assert out.read_bytes() == expected
    with_password = url.replace("://", f"://imgfs:{PASSWORD}@")
    assert imgfs_convert(tmp_path / "url.raw", with_password) == expected


def test_auth_failures_never_show_the_password(server: Nginx) -> None:
    url = server.url("auth/disk.raw")
    assert refused("info", url) == (f"imgfs: {url}: HTTP 401 Unauthorized (authentication "
                                    "failed or needed)\n")
    wrong = url.replace("://", "://imgfs:wrong-password-1@")
    message = refused("info", wrong)
    shown = url.replace("://", "://imgfs@")
    assert message == f"imgfs: {shown}: HTTP 401 Unauthorized (authentication failed or needed)\n"
    tree = f'json:{{"driver":"http","url":"{url}","username":"imgfs","password-secret":"pw"}}'
    message = refused("info", "--object", "secret,id=pw,data=wrong-password-2", tree)
    assert "wrong-password-2" not in message and "401" in message


def test_credentials_stay_with_their_server(server: Nginx) -> None:
    """A redirect to another origin ([::1] instead of 127.0.0.1) drops the
    Authorization header: the other server asks for credentials."""
    url = server.url("away/auth/disk.raw").replace("://", f"://imgfs:{PASSWORD}@")
    message = refused("info", url)
    assert "HTTP 401" in message and server.url("auth/disk.raw", host="::1") in message
    assert PASSWORD not in message


def test_cookie_and_cookie_secret(server: Nginx, tmp_path: Path) -> None:
    url = server.url("cookie/disk.raw")
    expected = (server.www / "disk.raw").read_bytes()
    assert "HTTP 403 Forbidden" in refused("info", url)
    plain = f'json:{{"driver":"http","url":"{url}","cookie":"{COOKIE}"}}'
    assert imgfs_convert(tmp_path / "a.raw", plain) == expected
    tree = f'json:{{"driver":"http","url":"{url}","cookie-secret":"c"}}'
    out = tmp_path / "b.raw"
    imgfs("convert", "--object", f"secret,id=c,data={COOKIE}", "-O", "raw", tree, out)
    assert out.read_bytes() == expected
    message = refused("info", "--object", "secret,id=c,data=session=stale-9", tree)
    assert "stale-9" not in message and "403" in message


# -- the driver through the API: pool, cache, a changing file ----------------------


def test_requests_run_in_parallel_on_several_connections(server: Nginx) -> None:
    data = (server.www / "disk.raw").read_bytes()

    async def body() -> int:
        node = await open_image(server.url("disk.raw"), RO,
                                options={"file.readahead": "0"})
        try:
            results: dict[int, bytes] = {}

            async def one(offset: int) -> None:
                results[offset] = await node.read(offset, 64 * 1024)
            async with trio.open_nursery() as nursery:
                for offset in range(0, 4 * MiB, 64 * 1024):
                    nursery.start_soon(one, offset)
            for offset, got in results.items():
                assert got == data[offset:offset + 64 * 1024]
            return http_leaf(node).driver.file.pool.peak_in_flight  # type: ignore[attr-defined]
        finally:
            await node.aclose()
    assert run_trio(body) > 1


async def logged(log: Path, count: int) -> int:
    """GETs of disk.raw in nginx's access log, once there are `count` (nginx
    writes a line just after its answer, which may be after we read it)."""
    for _ in range(100):
        found = log.read_text().count("GET /disk.raw")
        if found >= count:
            break
        await trio.sleep(0.01)
    return found


def test_readahead_serves_small_reads_from_one_request(server: Nginx) -> None:
    data = (server.www / "disk.raw").read_bytes()
    log = server.dir / "access.log"

    async def body() -> None:
        earlier = log.read_text().count("GET /disk.raw")
        node = await open_image(server.url("disk.raw"), RO)
        try:
            before = await logged(log, earlier + 1)          # the open's own request
            for offset in range(1 * MiB, 1 * MiB + 256 * 1024, 4096):
                assert await node.read(offset, 4096) == data[offset:offset + 4096]
            # the first read continues nothing: its own 4 KiB; the second
            # is sequential: the window, which serves all the others
            assert await logged(log, before + 2) == before + 2
            # a random read asks for its own bytes only
            assert await node.read(3 * MiB + 8192, 4096) == data[3 * MiB + 8192:3 * MiB + 12288]
            await logged(log, before + 3)
            assert log.read_text().splitlines()[-1].split()[9] == "4096"
        finally:
            await node.aclose()
        odd = (server.www / "odd.raw").read_bytes()
        node = await open_image(server.url("odd.raw"), RO)
        try:
            assert node.size == len(odd)
            assert await node.read(len(odd) - 200, 200) == odd[-200:]
            assert await node.read(0, len(odd)) == odd
        finally:
            await node.aclose()
    run_trio(body)


def test_empty_file_has_size_zero(server: Nginx) -> None:
    """nginx answers 416 with "bytes */0" to the first-byte probe."""
    async def body() -> int:
        node = await open_image(server.url("empty.raw"), RO, fmt="raw")
        try:
            return node.size
        finally:
            await node.aclose()
    assert run_trio(body) == 0


def test_changed_file_fails_reads_with_eio(tmp_path: Path) -> None:
    """The file replaced on the server (new ETag): a read that reaches the
    server fails, and so does every later read, even of cached data."""
    need_nginx()
    nginx = Nginx(tmp_path / "srv")
    first = random_bytes(2 * MiB, seed=1)
    (nginx.www / "img.raw").write_bytes(first)
    nginx.start()

    async def body() -> None:
        node = await open_image(nginx.url("img.raw"), RO)
        try:
            assert await node.read(0, 4096) == first[:4096]
            replacement = nginx.www / "img.new"
            replacement.write_bytes(random_bytes(2 * MiB, seed=2))
            os.utime(replacement, (1, 1))               # another Last-Modified, another ETag
            replacement.rename(nginx.www / "img.raw")
            with pytest.raises(ImgfsError) as raised:
                await node.read(MiB, 4096)
            assert raised.value.errno == 5
            assert "the file changed on the server (ETag" in str(raised.value)
            with pytest.raises(ImgfsError, match="changed on the server"):
                await node.read(0, 4096)
        finally:
            await node.aclose()
    try:
        run_trio(body)
    finally:
        nginx.stop()
