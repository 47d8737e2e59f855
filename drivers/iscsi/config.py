"""Where an iSCSI LUN is and how to log in to it (pure: no I/O but reading
the configuration file).

Sources, as QEMU's iscsi driver reads them (qemu-block-drivers(7),
"iSCSI LUNs"):

* ``iscsi://[USER[%PASSWORD]@]HOST[:PORT]/TARGET-IQN/LUN``, with libiscsi's
  ``?target_user=U&target_password=P`` for mutual CHAP;
* the json:/-o options ``transport``, ``portal``, ``target``, ``lun``,
  ``user``, ``password-secret``, ``initiator-name``, ``header-digest``,
  ``timeout`` (and ``target-user``, ``target-password-secret`` for mutual
  CHAP);
* the configuration file of the manual (``-o iscsi-config=FILE``, else
  /etc/imgfs/iscsi.conf when it exists): ``[iscsi]`` for every target and
  ``[iscsi "IQN"]`` for one, with ``user``, ``password``,
  ``initiator-name``, ``header-digest``;
* the environment: ``LIBISCSI_CHAP_USERNAME`` / ``LIBISCSI_CHAP_PASSWORD``
  (and ``LIBISCSI_CHAP_TARGET_USERNAME`` / ``..._PASSWORD``), as libiscsi's
  own URL parser reads them.

Precedence: the source's own options, then the target's section, then
``[iscsi]``, then the environment.  Secrets live only in `Login`, whose
repr hides them; `Target.url` never shows one.
"""
from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from imgfs.errors import UsageError

ISCSI_DEFAULT_PORT = 3260
#: QEMU's initiator name prefix (block/iscsi.c); QEMU adds the VM's name
DEFAULT_INITIATOR_PREFIX = "iqn.2008-11.org.linux-kvm"
DEFAULT_INITIATOR = f"{DEFAULT_INITIATOR_PREFIX}:imgfs"
DEFAULT_CONFIG = "/etc/imgfs/iscsi.conf"
#: header digest names -> what the initiator offers, in order of preference
HEADER_DIGESTS = ("none-crc32c", "crc32c-none", "crc32c", "none")
#: QEMU's default: prefer no digest, accept CRC32C
DEFAULT_HEADER_DIGEST = "none-crc32c"
#: keys the configuration file knows (qemu-block-drivers(7))
CONFIG_KEYS = ("user", "password", "initiator-name", "header-digest")
#: SAM-5: single-level LUN addressing reaches 16383; libiscsi takes an int
MAX_LUN = 16383
#: RFC 7143 section 6.1: an iSCSI name is at most 223 bytes
MAX_NAME = 223


@dataclass(frozen=True)
class Login:
    """CHAP credentials (user, secret) for each direction; None: no CHAP."""

    user: str | None = None
    password: bytes | None = field(default=None, repr=False)
    target_user: str | None = None
    target_password: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Target:
    """One LUN behind one portal, and how to log in."""

    host: str
    port: int
    target: str
    lun: int
    login: Login = Login()
    initiator_name: str = DEFAULT_INITIATOR
    header_digest: str = DEFAULT_HEADER_DIGEST
    #: seconds a command may take (0: no limit), as QEMU's `timeout`
    timeout: int = 0

    @property
    def portal(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def url(self) -> str:
        """The URL naming this LUN, without any secret (for messages)."""
        user = f"{urllib.parse.quote(self.login.user, safe='')}@" if self.login.user else ""
        return f"iscsi://{user}{self.portal}/{self.target}/{self.lun}"


# -- URLs ---------------------------------------------------------------------------


def parse_iscsi_url(url: str) -> dict[str, Any]:
    """Options for ``iscsi://[USER[%PASSWORD]@]HOST[:PORT]/TARGET-IQN/LUN``."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() != "iscsi":
        raise UsageError(f"'{public_url(url)}' is not an iscsi:// URL")
    authority, _, path = rest.partition("/")
    path, _, query = path.partition("?")
    userinfo, at, hostport = authority.rpartition("@")
    options: dict[str, Any] = {"portal": _parse_portal(hostport, url)}
    if at:
        user, _, password = userinfo.partition("%")
        if not user:
            raise UsageError(f"invalid iscsi URL '{public_url(url)}': empty user name")
        options["user"] = user
        if password:
            options["password"] = password
    target, slash, lun = path.partition("/")
    if not target or not slash or not lun or "/" in lun:
        raise UsageError(f"invalid iscsi URL '{public_url(url)}': expected "
                         "iscsi://[USER[%PASSWORD]@]HOST[:PORT]/TARGET-IQN/LUN")
    options["target"] = urllib.parse.unquote(target)
    options["lun"] = lun
    for name, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        if name == "target_user":
            options["target-user"] = value
        elif name == "target_password":
            options["target-password"] = value
        else:
            raise UsageError(f"invalid iscsi URL '{public_url(url)}': unknown "
                             f"parameter '{name}'")
    return options


def _parse_portal(hostport: str, url: str) -> str:
    host, port = split_portal(hostport, what=public_url(url))
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split_portal(portal: str, *, what: str = "") -> tuple[str, int]:
    """``HOST[:PORT]`` or ``[IPV6][:PORT]`` -> (host, port)."""
    where = f" in '{what}'" if what else ""
    try:
        parts = urllib.parse.urlsplit(f"//{portal}")
        host, port = parts.hostname, parts.port
    except ValueError:
        raise UsageError(f"invalid iscsi portal '{portal}'{where}") from None
    if parts.path or parts.query or parts.fragment or "@" in parts.netloc:
        raise UsageError(f"invalid iscsi portal '{portal}'{where}")
    if not host:
        raise UsageError(f"no iscsi portal host{where}")
    if port == 0:
        raise UsageError(f"invalid iscsi port '0'{where} (expected 1 to 65535)")
    return host, port or ISCSI_DEFAULT_PORT


_URL_PASSWORD = re.compile(r"(?i)^(iscsi://[^/@%]*)%[^/@]*@")


def public_url(url: str) -> str:
    """`url` with any password in it replaced by ``***``."""
    url = _URL_PASSWORD.sub(r"\1%***@", url)
    return re.sub(r"(target_password=)[^&]*", r"\1***", url)


# -- the configuration file ----------------------------------------------------------

_SECTION = re.compile(r'^\[\s*iscsi\s*(?:"([^"]*)")?\s*\]$')
_ENTRY = re.compile(r'^([A-Za-z][\w-]*)\s*=\s*(?:"([^"]*)"|(\S*))$')


def parse_config(text: str, path: str) -> dict[str, dict[str, str]]:
    """The ``[iscsi]`` and ``[iscsi "IQN"]`` sections of a QEMU-style
    configuration file: section id ("" for ``[iscsi]``) -> key -> value.
    Other sections (QEMU's files hold [drive] and the like) are skipped."""
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            match = _SECTION.match(line)
            current = sections.setdefault(match.group(1) or "", {}) if match else None
            continue
        match = _ENTRY.match(line)
        if match is None:
            raise UsageError(f"{path}:{number}: expected KEY = \"VALUE\"")
        if current is None:
            continue
        key, value = match.group(1), match.group(2) if match.group(2) is not None \
            else match.group(3)
        if key not in CONFIG_KEYS:
            raise UsageError(f"{path}:{number}: unknown iscsi key '{key}' (known: "
                             f"{', '.join(CONFIG_KEYS)})")
        current[key] = value
    return sections


def read_config(path: str | None) -> dict[str, dict[str, str]]:
    """The given file (it must be readable), or the default one if it exists."""
    if path is None:
        if not os.path.exists(DEFAULT_CONFIG):
            return {}
        path = DEFAULT_CONFIG
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise UsageError(f"iscsi configuration {path}: {reason}") from None
    return parse_config(text, path)


# -- resolving a target ---------------------------------------------------------------


def parse_lun(value: Any) -> int:
    text = str(value)
    if not text.isdigit() or int(text) > MAX_LUN:
        raise UsageError(f"invalid iscsi LUN '{text}' (expected 0 to {MAX_LUN})")
    return int(text)


def parse_header_digest(value: Any) -> str:
    text = str(value).lower()
    if text not in HEADER_DIGESTS:
        raise UsageError(f"invalid header digest '{value}' (expected one of "
                         "CRC32C, CRC32C-NONE, NONE-CRC32C, NONE)")
    return text


def _check_name(name: str, what: str) -> str:
    if not name or len(name.encode()) > MAX_NAME or any(c.isspace() or not c.isprintable()
                                                        for c in name):
        raise UsageError(f"invalid iSCSI {what} '{name}' (1 to {MAX_NAME} printable "
                         "characters without spaces)")
    return name


def resolve_target(options: Mapping[str, Any], secrets: Mapping[str, bytes],
                   environ: Mapping[str, str]) -> Target:
    """A Target from parsed driver options (a ``filename`` URL is expanded
    first), the secrets of --object, the configuration file and `environ`."""
    given = {key: value for key, value in options.items() if value is not None}
    if given.get("filename") and "portal" not in given:
        for key, value in parse_iscsi_url(given.pop("filename")).items():
            given.setdefault(key, value)
    if given.get("transport", "tcp") != "tcp":
        raise UsageError(f"iscsi transport '{given['transport']}' is not supported "
                         "(only tcp)")
    for key in ("portal", "target", "lun"):
        if key not in given:
            raise UsageError(f"iscsi: no '{key}' given (use iscsi://HOST/TARGET-IQN/LUN)")
    host, port = split_portal(str(given["portal"]))
    target = _check_name(str(given["target"]), "target name")
    config = read_config(given.get("iscsi-config"))
    settings = {**config.get("", {}), **config.get(target, {})}
    digest = given.get("header-digest") or settings.get("header-digest") \
        or DEFAULT_HEADER_DIGEST
    return Target(
        host=host, port=port, target=target, lun=parse_lun(given["lun"]),
        login=_login(given, settings, secrets, environ),
        initiator_name=_check_name(str(given.get("initiator-name")
                                       or settings.get("initiator-name")
                                       or DEFAULT_INITIATOR), "initiator name"),
        header_digest=parse_header_digest(digest),
        timeout=int(given.get("timeout") or 0))


def _secret(secrets: Mapping[str, bytes], secret_id: str) -> bytes:
    try:
        return secrets[secret_id]
    except KeyError:
        raise UsageError(f"no secret with id '{secret_id}' (define it with "
                         f"--object secret,id={secret_id},file=PATH)") from None


def _login(given: Mapping[str, Any], settings: Mapping[str, str],
           secrets: Mapping[str, bytes], environ: Mapping[str, str]) -> Login:
    user, password = _initiator_credentials(given, settings, secrets, environ)
    target_user = given.get("target-user") or environ.get("LIBISCSI_CHAP_TARGET_USERNAME")
    target_password: bytes | None = None
    if given.get("target-password-secret"):
        target_password = _secret(secrets, given["target-password-secret"])
    elif given.get("target-password") is not None:
        target_password = str(given["target-password"]).encode()
    elif environ.get("LIBISCSI_CHAP_TARGET_PASSWORD") is not None:
        target_password = environ["LIBISCSI_CHAP_TARGET_PASSWORD"].encode()
    if target_user and (user is None or target_password is None):
        raise UsageError("iscsi: mutual CHAP (target-user) needs a user and password "
                         "for the initiator and a target password")
    return Login(user, password, target_user or None,
                 target_password if target_user else None)


def _initiator_credentials(given: Mapping[str, Any], settings: Mapping[str, str],
                           secrets: Mapping[str, bytes],
                           environ: Mapping[str, str]) -> tuple[str | None, bytes | None]:
    if given.get("user"):
        if given.get("password-secret"):
            return given["user"], _secret(secrets, given["password-secret"])
        if given.get("password") is not None:
            return given["user"], str(given["password"]).encode()
        raise UsageError("iscsi: a user needs a password: give password-secret=ID "
                         "with --object secret,id=ID,file=PATH")
    if given.get("password-secret"):
        raise UsageError("iscsi: password-secret needs a user")
    if settings.get("user"):
        return settings["user"], settings.get("password", "").encode()
    if environ.get("LIBISCSI_CHAP_USERNAME"):
        return (environ["LIBISCSI_CHAP_USERNAME"],
                environ.get("LIBISCSI_CHAP_PASSWORD", "").encode())
    return None, None
