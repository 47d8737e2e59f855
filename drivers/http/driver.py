"""The `http` and `https` protocol drivers: an image on a web server, read
with range requests and never downloaded whole.

Options are QEMU's curl driver's: ``url``, ``readahead``, ``timeout``,
``sslverify``, ``cookie`` / ``cookie-secret``, ``username`` /
``password-secret`` (or ``user:password@`` in the URL), and, for a proxy
taken from the environment as libcurl takes it (``http_proxy``,
``https_proxy``, ``all_proxy``, ``no_proxy``: see `proxy`),
``proxy-username`` / ``proxy-password-secret``.
"""
from __future__ import annotations

from typing import Any, cast

from imgfs.block import BlockDriver, Kind
from imgfs.errors import UsageError
from imgfs.node import OpenContext
from imgfs.options import Bool, Int, KiB, MiB, Opt, Schema, Size, Str, in_range
from imgfs.secrets import secret_by_id
from imgfs.source import SOURCE_KEY

from .client import HttpFile, Settings, basic_auth
from .readahead import ReadAhead
from .url import CONTROL, Url, parse_url

#: QEMU's defaults (block/curl.c): READAHEAD_SIZE and CURL_TIMEOUT_DEFAULT
DEFAULT_READAHEAD = 256 * KiB
DEFAULT_TIMEOUT = 5
MAX_TIMEOUT = 10000
#: the largest read asked of the server in one request
MAX_TRANSFER = 8 * MiB
#: options a backing file named relative to this URL inherits (same server)
INHERITED = ("readahead", "timeout", "sslverify", "cookie", "cookie-secret",
             "proxy-username", "proxy-password-secret",
             "username", "password-secret")
CREDENTIALS = ("cookie", "cookie-secret", "username", "password-secret")


def readahead_check(value: int) -> None:
    if value % 512:
        raise UsageError(f"{value} is not a multiple of 512")


def header_safe(value: str, what: str) -> str:
    """`value`, unless it holds a control character (a line break in a
    header would end it and start another)."""
    if CONTROL.search(value):
        raise UsageError(f"{what} contains control characters")
    return value


class HttpDriver(BlockDriver):
    name = "http"
    kind = Kind.PROTOCOL
    prefixes = ("http:",)
    description = "files on a web server, read with HTTP range requests (read-only)"
    async_io = True
    busy_poll = True
    read_only_format = True
    writable = False
    read_only_by_default = True
    read_only_reason = "images on web servers are read-only"
    open_opts = Schema(
        Opt("url", Str, help="the image's URL"),
        Opt("readahead", Size, default=DEFAULT_READAHEAD, check=readahead_check,
            help="bytes read with each request beyond what was asked (a multiple of 512)"),
        Opt("timeout", Int, default=DEFAULT_TIMEOUT, check=in_range(1, MAX_TIMEOUT),
            help="seconds one request may take before it fails"),
        Opt("sslverify", Bool, default=True,
            help="verify the server's certificate (https)"),
        Opt("cookie", Str, help="Cookie header sent with every request"),
        Opt("cookie-secret", Str, help="id of a secret holding the cookie"),
        Opt("username", Str, help="user name for HTTP authentication"),
        Opt("password-secret", Str, help="id of a secret holding the password"),
        Opt("proxy-username", Str,
            help="user name for the proxy (from http_proxy, https_proxy, all_proxy)"),
        Opt("proxy-password-secret", Str, help="id of a secret holding the proxy password"),
    )

    file: HttpFile | None = None
    cache: ReadAhead | None = None
    #: the options as given, for backing files named relative to the URL
    given: dict[str, Any]

    @classmethod
    def parse_filename(cls, filename: str) -> dict[str, Any]:
        return {"url": filename}

    async def open(self, options: dict[str, Any], ctx: OpenContext) -> None:
        url = self._url(options)
        # Every message about this node names the URL without its password.
        self.node.filename = url.display
        self.given = {key: options[key] for key in INHERITED if options.get(key) is not None}
        settings = Settings(timeout=float(options["timeout"]), sslverify=options["sslverify"],
                            credentials=self._credentials(url, options, ctx),
                            proxy_username=options.get("proxy-username"),
                            proxy_password=self._proxy_password(options, ctx))
        self.file = HttpFile(url, settings)
        await self.file.open()
        self.size = self.file.size
        self.max_transfer = MAX_TRANSFER
        if options["readahead"] and self.size:
            self.cache = ReadAhead(self.file.read, self.size, options["readahead"], ctx.nursery)

    def _url(self, options: dict[str, Any]) -> Url:
        if not options.get("url"):
            raise UsageError(f"{self.name}: no url given")
        url = parse_url(options["url"])
        if url.scheme != self.name:
            raise UsageError(f"{url.display}: the {self.name} driver needs a "
                             f"{self.name}:// URL")
        return url

    @staticmethod
    def _credentials(url: Url, options: dict[str, Any],
                     ctx: OpenContext) -> list[tuple[str, str]]:
        """Authorization and Cookie headers; secrets are looked up by id."""
        headers = []
        username = options.get("username") or url.username
        if username is not None:
            password = (url.password or "").encode()
            if options.get("password-secret"):
                password = secret_by_id(ctx.secrets, options["password-secret"])
            headers.append(basic_auth(username, password))
        if options.get("cookie") and options.get("cookie-secret"):
            raise UsageError("give either cookie or cookie-secret, not both")
        cookie = options.get("cookie")
        if options.get("cookie-secret"):
            # (header values are bytes on the wire: any byte but controls goes)
            cookie = secret_by_id(ctx.secrets, options["cookie-secret"]).decode("latin-1")
        if cookie:
            headers.append(("Cookie", header_safe(cookie, "the cookie")))
        return headers

    @staticmethod
    def _proxy_password(options: dict[str, Any], ctx: OpenContext) -> bytes | None:
        if not options.get("proxy-password-secret"):
            return None
        return secret_by_id(ctx.secrets, options["proxy-password-secret"])

    def child_location(self, name: str) -> dict[str, Any]:
        """A backing file named relative to the image: on the same server
        (relative to the URL the redirects ended at, as a browser resolves
        links), with the same options; credentials only if that is still
        the server they were given for."""
        assert self.file is not None
        url = self.file.url.join(name)
        options = dict(self.given)
        if url.origin != self.file.credentials_origin:
            options = {key: value for key, value in options.items()
                       if key not in CREDENTIALS}
        return {"driver": url.scheme, "url": url.full, **options, SOURCE_KEY: url.display}

    async def aclose(self) -> None:
        if self.file is not None:
            await self.file.aclose()

    async def read(self, offset: int, length: int) -> bytes:
        assert self.file is not None
        self.file.check_unchanged()
        if self.cache is not None:
            return await self.cache.read(offset, length)
        # a bytearray serves every caller as well as bytes would
        return cast(bytes, await self.file.read(offset, length))


class HttpsDriver(HttpDriver):
    name = "https"
    prefixes = ("https:",)


DRIVERS = [HttpDriver, HttpsDriver]
