"""Pure parts of the http driver: URLs, Content-Range, validators, windows."""
from __future__ import annotations

import base64

import pytest
from imgfs.drivers.http.client import Validators, basic_auth
from imgfs.drivers.http.readahead import contiguous_runs
from imgfs.drivers.http.url import content_range, parse_url, redact
from imgfs.drivers.http.wire import Response, parse_head

from imgfs.errors import ImgfsError, UsageError


def test_parse_url_parts_and_default_ports() -> None:
    url = parse_url("https://user:p%40ss@Example.org/dir/vm.qcow2?x=1#frag")
    assert (url.scheme, url.host, url.port) == ("https", "example.org", 443)
    assert url.target == "/dir/vm.qcow2?x=1"
    assert (url.username, url.password) == ("user", "p@ss")
    assert url.display == "https://user@example.org/dir/vm.qcow2?x=1"
    assert "p%40ss" in url.full
    assert parse_url("http://h").target == "/"
    assert parse_url("http://[::1]:8080/a").authority == "[::1]:8080"
    assert parse_url("http://h:80/a").authority == "h"


@pytest.mark.parametrize("text", ["ftp://h/x", "http:///x", "http://h:99999/x",
                                  "http://h/a b", "http://h/a\r\nX: y"])
def test_bad_urls_are_refused(text: str) -> None:
    with pytest.raises(UsageError):
        parse_url(text)


def test_no_password_in_messages_about_bad_urls() -> None:
    assert redact("http://me:hunter2@h:99999/x") == "http://me:***@h:99999/x"
    with pytest.raises(UsageError) as raised:
        parse_url("http://me:hunter2@h:99999/x")
    assert "hunter2" not in str(raised.value)


def test_join_relative_names_and_redirects() -> None:
    base = parse_url("http://u:pw@h:81/a/b/top.qcow2")
    assert base.join("base.qcow2").full == "http://u:pw@h:81/a/b/base.qcow2"
    assert base.join("../c.img").display == "http://u@h:81/a/c.img"
    moved = base.join("https://other/x")
    assert moved.origin == ("https", "other", 443) and moved.username is None


def test_content_range() -> None:
    assert content_range("bytes 0-0/1234") == (0, 0, 1234)
    assert content_range("bytes */99") == (None, None, 99)
    assert content_range("bytes 5-9/*") == (5, 9, None)
    with pytest.raises(ValueError):
        content_range("items 0-1/2")


def test_validators_notice_a_new_version() -> None:
    def response(*headers: tuple[str, str]) -> Response:
        lines = ["HTTP/1.1 206 Partial Content", "Content-Length: 1",
                 *(f"{name}: {value}" for name, value in headers)]
        return parse_head("\r\n".join(lines))
    first = Validators.of(response(("ETag", '"a"'), ("Last-Modified", "Mon")))
    assert first.moved(Validators.of(response(("ETag", '"a"'), ("Last-Modified", "Mon")))) is None
    assert first.moved(Validators.of(response(("ETag", '"b"')))) == 'ETag "a" became "b"'
    dated = Validators(None, "Mon")
    assert dated.moved(Validators(None, "Tue")) == "Last-Modified Mon became Tue"


def test_basic_auth_and_runs() -> None:
    assert basic_auth("Aladdin", b"open sesame") == (
        "Authorization", "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==")
    assert contiguous_runs([1, 2, 3, 7, 8, 10]) == [[1, 2, 3], [7, 8], [10]]


# -- proxies from the environment, as libcurl reads them ------------------------------

def test_proxy_setting_follows_libcurl() -> None:
    from imgfs.drivers.http.proxy import proxy_setting
    env = {"HTTP_PROXY": "upper:1", "all_proxy": "all:2"}
    assert proxy_setting("http", env) == "all:2"          # HTTP_PROXY is never read
    assert proxy_setting("http", {**env, "http_proxy": "lower:3"}) == "lower:3"
    assert proxy_setting("https", {**env, "HTTPS_PROXY": "s:4"}) == "s:4"
    assert proxy_setting("https", {"https_proxy": "a:5", "HTTPS_PROXY": "b:6"}) == "a:5"
    assert proxy_setting("https", {}) is None


@pytest.mark.parametrize("listing, host, direct", [
    ("*", "anything.example", True),
    ("example.org", "example.org", True),
    ("example.org", "www.example.org", True),
    (".example.org", "www.example.org", True),
    ("example.org", "badexample.org", False),
    (" 10.0.0.1 , [::1]", "::1", True),
    ("10.0.0.1", "10.0.0.10", False),
    ("", "example.org", False),
])
def test_no_proxy_matches_hosts_and_domains(listing: str, host: str, direct: bool) -> None:
    from imgfs.drivers.http.proxy import bypasses_proxy
    assert bypasses_proxy(host, {"no_proxy": listing}) is direct


def test_proxy_parsing() -> None:
    from imgfs.drivers.http.proxy import parse_proxy
    proxy = parse_proxy("proxy.example", None, None)
    assert (proxy.host, proxy.port, proxy.authorization) == ("proxy.example", 1080, None)
    proxy = parse_proxy("http://u%40x:p%3Aw@[::1]:3128/", None, None)
    assert (proxy.host, proxy.port, proxy.display) == ("::1", 3128, "http://[::1]:3128")
    assert proxy.authorization == "Basic " + base64.b64encode(b"u@x:p:w").decode()
    proxy = parse_proxy("http://u:p@h:1", "option-user", b"secret")
    assert proxy.authorization == "Basic " + base64.b64encode(b"option-user:secret").decode()
    with pytest.raises(ImgfsError, match=r"only http:// proxies are supported \(not socks5://\)"):
        parse_proxy("socks5://h:1", None, None)
