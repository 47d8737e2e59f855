"""The http and https drivers through a real HTTP proxy (tinyproxy on
loopback, tests/tinyproxy.py) in front of a real nginx, with the proxy
taken from the environment as QEMU's curl driver takes it; QEMU's answer
(qemu-img convert with the same environment) is the oracle, and the
proxy's log shows that the requests went through it."""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port, imgfs, mounted
from tests.drivers.test_http import imgfs_convert, qemu_convert, refused, server  # noqa: F401
from tests.nginx import Nginx
from tests.tinyproxy import Tinyproxy

PROXY_PASSWORD = "proxy-pass-9000"


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tinyproxy]:
    tinyproxy = Tinyproxy(tmp_path_factory.mktemp("proxy"))
    tinyproxy.start()
    try:
        yield tinyproxy
    finally:
        tinyproxy.stop()


@pytest.fixture(scope="module")
def auth_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tinyproxy]:
    tinyproxy = Tinyproxy(tmp_path_factory.mktemp("authproxy"), password=PROXY_PASSWORD)
    tinyproxy.start()
    try:
        yield tinyproxy
    finally:
        tinyproxy.stop()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No proxy settings but the test's own (imgfs and qemu-img inherit them)."""
    for name in ("http_proxy", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY",
                 "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_http_through_the_proxy_matches_qemu(server: Nginx, proxy: Tinyproxy,  # noqa: F811
                                             clean_env: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    clean_env.setenv("http_proxy", proxy.url)
    url = server.url("disk.raw")
    ours = imgfs_convert(tmp_path / "ours.raw", url)
    assert ours == (server.www / "disk.raw").read_bytes()
    assert f"GET {url} " in proxy.requests()
    assert ours == qemu_convert(tmp_path / "qemu.raw", url)


def test_https_through_a_connect_tunnel_matches_qemu(server: Nginx,  # noqa: F811
                                                     proxy: Tinyproxy,
                                                     clean_env: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    clean_env.setenv("https_proxy", proxy.url.removeprefix("http://"))   # host:port, as curl
    url = server.url("disk.raw", https=True)
    tree = f'json:{{"driver":"https","url":"{url}","sslverify":false}}'
    ours = imgfs_convert(tmp_path / "ours.raw", tree)
    assert ours == (server.www / "disk.raw").read_bytes()
    assert f"CONNECT 127.0.0.1:{server.https_port} " in proxy.requests()
    assert ours == qemu_convert(tmp_path / "qemu.raw", "--image-opts",
                                f"driver=https,url={url},sslverify=off")


def test_qcow2_chain_through_the_proxy_and_all_proxy(server: Nginx,  # noqa: F811
                                                     proxy: Tinyproxy,
                                                     clean_env: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    """all_proxy serves when http_proxy is unset; the backing file, named
    relative to the image, is fetched through the proxy too."""
    clean_env.setenv("all_proxy", proxy.url)
    url = server.url("sub/top.qcow2")
    ours = imgfs_convert(tmp_path / "ours.raw", url)
    assert server.url("sub/base.qcow2") in proxy.requests()
    assert ours == qemu_convert(tmp_path / "qemu.raw", url)


def test_no_proxy_goes_direct(server: Nginx, clean_env: pytest.MonkeyPatch,  # noqa: F811
                              tmp_path: Path) -> None:
    clean_env.setenv("http_proxy", f"http://127.0.0.1:{free_port()}")   # nothing listens
    clean_env.setenv("no_proxy", "example.org, 127.0.0.1")
    ours = imgfs_convert(tmp_path / "ours.raw", server.url("disk.raw"))
    assert ours == (server.www / "disk.raw").read_bytes()


def test_unreachable_proxy_is_one_line(server: Nginx,  # noqa: F811
                                       clean_env: pytest.MonkeyPatch) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    clean_env.setenv("http_proxy", dead)
    url = server.url("disk.raw")
    message = refused("info", url)
    assert message.startswith(f"imgfs: cannot connect to {url} through the proxy {dead}: ")


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_proxy_authentication(server: Nginx, auth_proxy: Tinyproxy,  # noqa: F811
                              clean_env: pytest.MonkeyPatch, tmp_path: Path,
                              scheme: str) -> None:
    """No credentials: refused in one line (407); credentials from the
    driver's options (a secret) or the proxy URL's userinfo: the image is
    read; a wrong password never shows."""
    url = server.url("disk.raw", https=scheme == "https")
    clean_env.setenv(f"{scheme}_proxy", auth_proxy.url)
    verify = ',"sslverify":false' if scheme == "https" else ""
    plain = f'json:{{"driver":"{scheme}","url":"{url}"{verify}}}'
    message = refused("info", plain)
    assert "407" in message and "proxy authentication failed or needed" in message
    expected = (server.www / "disk.raw").read_bytes()
    secret = tmp_path / "proxy-pw"
    secret.write_text(PROXY_PASSWORD)
    tree = (f'json:{{"driver":"{scheme}","url":"{url}"{verify},'
            '"proxy-username":"imgfs","proxy-password-secret":"ppw"}')
    out = tmp_path / "out.raw"
    imgfs("convert", "--object", f"secret,id=ppw,file={secret}", "-O", "raw", tree, out)
    assert out.read_bytes() == expected
    clean_env.setenv(f"{scheme}_proxy",
                     auth_proxy.url.replace("://", f"://imgfs:{PROXY_PASSWORD}@"))
    assert imgfs_convert(tmp_path / "userinfo.raw", plain) == expected
    clean_env.setenv(f"{scheme}_proxy", auth_proxy.url.replace("://", "://imgfs:wrong-pw-3@"))
    message = refused("info", plain)    # (tinyproxy answers a wrong password with 401)
    assert ("407" in message or "401" in message) and "wrong-pw-3" not in message


def test_unsupported_proxy_scheme_is_refused(server: Nginx,  # noqa: F811
                                             clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("http_proxy", "socks5://127.0.0.1:1080")
    message = refused("info", server.url("disk.raw"))
    assert "only http:// proxies are supported (not socks5://)" in message


def test_mounted_through_the_proxy(server: Nginx, proxy: Tinyproxy,  # noqa: F811
                                   clean_env: pytest.MonkeyPatch, mnt: Path) -> None:
    clean_env.setenv("http_proxy", proxy.url)
    with mounted(server.url("disk.raw"), mountpoint=mnt):
        (shown,) = os.listdir(mnt)
        assert (mnt / shown).read_bytes() == (server.www / "disk.raw").read_bytes()
