"""The ssh driver's parts that need no server: URL and option parsing, the
libssh session's configuration, fingerprints, SFTP field parsing."""
from __future__ import annotations

import base64
import ctypes
import hashlib
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from imgfs.drivers.ssh import libssh, sftp, transport
from imgfs.drivers.ssh.target import (
    HostKeyCheck,
    Target,
    parse_host_key_check,
    parse_ssh_filename,
    resolve_target,
)

from imgfs.errors import NotFound, PermissionDenied, Unsupported, UsageError
from imgfs.pipeline import ProtocolError

SHA256_HEX = hashlib.sha256(b"key").hexdigest()


# -- URLs and options -------------------------------------------------------------------


def test_url_forms() -> None:
    assert parse_ssh_filename("ssh://vm1/images/disk.qcow2") == {
        "server": {"host": "vm1"}, "path": "/images/disk.qcow2"}
    assert parse_ssh_filename("ssh://alice@[::1]:2222/a%20b.raw?host_key_check=no") == {
        "server": {"host": "::1", "port": "2222"}, "user": "alice", "path": "/a b.raw",
        "host_key_check": "no"}


@pytest.mark.parametrize("url, message", [
    ("ssh://vm1", "no path"),
    ("ssh://vm1/", "no path"),
    ("ssh:///disk.raw", "no host"),
    ("ssh://vm1/disk.raw?timeout=3", "unexpected query parameter 'timeout'"),
    ("ssh://vm1/d?host_key_check=no&host_key_check=yes", "unexpected query parameter"),
    ("ssh://vm1:99999/disk.raw", "invalid ssh URL"),
])
def test_bad_urls(url: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_ssh_filename(url)


def test_a_password_is_refused_and_never_echoed() -> None:
    with pytest.raises(UsageError) as info:
        parse_ssh_filename("ssh://alice:s3cret@vm1/disk.raw")
    assert "s3cret" not in str(info.value)


def test_option_forms_resolve_alike() -> None:
    from_url = resolve_target({"filename": "ssh://bob@vm1:2200/d.raw?host_key_check=no"})
    from_server = resolve_target({"server": {"host": "vm1", "port": "2200"}, "user": "bob",
                                  "path": "/d.raw", "host_key_check": "no"})
    from_legacy = resolve_target({"host": "vm1", "port": 2200, "user": "bob", "path": "/d.raw",
                                  "host-key-check": {"mode": "none"}})
    assert from_url == from_server == from_legacy == Target(
        "vm1", "/d.raw", 2200, "bob", HostKeyCheck("none"))
    assert from_url.url() == "ssh://bob@vm1:2200/d.raw"
    assert from_url.host_port() == "vm1:2200"
    assert resolve_target({"filename": "ssh://[::1]/d"}).host_port() == "::1:22"


@pytest.mark.parametrize("options, message", [
    ({"path": "/d"}, "no server"),
    ({"server": {"host": "vm1"}}, "no path"),
    ({"server": {"host": "vm1"}, "host": "vm2", "path": "/d"}, "not both"),
    ({"server": {"host": "-oProxyCommand=x"}, "path": "/d"}, "invalid host"),
    ({"server": {"host": "vm1"}, "path": "/d", "user": "-l"}, "invalid user"),
    ({"server": {"host": "vm1", "port": "0"}, "path": "/d"}, "invalid ssh port"),
    ({"server": {"host": "vm1"}, "path": "/d", "host_key_check": "no",
      "host-key-check": {"mode": "none"}}, "not both"),
    ({"server": {"host": "vm1"}, "path": "/d", "host-key-check": {"mode": "hash"}},
     "type"),
])
def test_bad_options(options: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        resolve_target(options)


def test_host_key_checks() -> None:
    assert parse_host_key_check("yes") == HostKeyCheck("known_hosts")
    assert parse_host_key_check("no") == HostKeyCheck("none")
    colons = ":".join(SHA256_HEX[i:i + 2] for i in range(0, 64, 2)).upper()
    assert parse_host_key_check(f"sha256:{colons}") == HostKeyCheck("hash", "sha256", SHA256_HEX)
    assert parse_host_key_check("md5:" + "ab" * 16).expected() == "md5:" + "ab" * 16
    for bad in ("maybe", "sha256:abcd", "md5:" + "zz" * 16, "sha512:" + "00" * 64):
        with pytest.raises(UsageError):
            parse_host_key_check(bad)


# -- the libssh session's configuration ------------------------------------------------------


def configured(target: Target, home: Path) -> dict[str, object]:
    """What libssh will use for `target` (no connection is made)."""
    ssh = libssh.Session()
    try:
        transport.configure(ssh, target, 5, str(home))
        return {"host": ssh.get_string(libssh.SSH_OPTIONS_HOST), "port": ssh.get_port(),
                "user": ssh.get_string(libssh.SSH_OPTIONS_USER),
                "known_hosts": ssh.get_string(libssh.SSH_OPTIONS_KNOWNHOSTS)}
    finally:
        ssh.free()


def test_config_aliases_apply_and_the_url_wins(tmp_path: Path) -> None:
    ssh_dir = tmp_path / ".ssh"
    ssh_dir.mkdir()
    (ssh_dir / "config").write_text("Host vm-alias\n  HostName 192.0.2.7\n  Port 2022\n"
                                    "  User bob\n")
    assert configured(Target("vm-alias", "/d"), tmp_path) == {
        "host": "192.0.2.7", "port": 2022, "user": "bob",
        "known_hosts": f"{ssh_dir}/known_hosts"}
    # a port or user given in the URL or options beats the configuration's
    given = configured(Target("vm-alias", "/d", 2200, "carol"), tmp_path)
    assert (given["host"], given["port"], given["user"]) == ("192.0.2.7", 2200, "carol")
    other = configured(Target("vm2", "/d"), tmp_path)
    assert (other["host"], other["port"]) == ("vm2", 22)


def test_counter_struct_matches_libssh_h() -> None:
    # struct ssh_counter_struct: four uint64_t
    assert ctypes.sizeof(libssh.Counter) == 32


def test_fingerprints_as_ssh_keygen_prints_them(tmp_path: Path) -> None:
    if shutil.which("ssh-keygen") is None:
        pytest.skip("ssh-keygen not installed")
    key = tmp_path / "key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    blob = base64.b64decode(key.with_suffix(".pub").read_text().split()[1])
    keygen = subprocess.run(["ssh-keygen", "-l", "-f", str(key.with_suffix(".pub"))],
                            check=True, capture_output=True, text=True).stdout.split()[1]
    host_key = libssh.HostKey("ssh-ed25519", *(hashlib.new(name, blob).digest()
                                               for name in ("sha256", "sha1", "md5")))
    assert host_key.openssh_fingerprint() == keygen
    assert host_key.digest("md5") == hashlib.md5(blob).digest()


# -- SFTP fields -------------------------------------------------------------------------


def test_sftp_packets_and_fields() -> None:
    packet = sftp.packet(sftp.SSH_FXP_READ, 7, sftp.sftp_string(b"h"), struct.pack(">QI", 9, 4))
    assert packet == struct.pack(">IBI", 22, 5, 7) + b"\0\0\0\x01h" + struct.pack(">QI", 9, 4)
    assert sftp.read_packet(7, b"h", 9, 4) == packet
    attrs = (struct.pack(">IQ", sftp.SSH_FILEXFER_ATTR_SIZE | sftp.SSH_FILEXFER_ATTR_EXTENDED
                         | sftp.SSH_FILEXFER_ATTR_PERMISSIONS, 12345) + struct.pack(">I", 0o644)
             + struct.pack(">I", 1) + sftp.sftp_string(b"a") + sftp.sftp_string(b"b"))
    assert sftp.attrs_size(sftp.Reader(attrs)) == 12345
    with pytest.raises(ProtocolError):
        sftp.attrs_size(sftp.Reader(attrs[:-1]))
    version = struct.pack(">I", 3) + sftp.sftp_string(b"fsync@openssh.com") + sftp.sftp_string(b"1")
    assert sftp.parse_version(version) == (3, {"fsync@openssh.com": b"1"})


def test_limits_are_bounded() -> None:
    limits = sftp.Limits.from_reply(struct.pack(">QQQQ", 262144, 261120, 261120, 0))
    assert limits == sftp.Limits(261120, 261120)
    unlimited = sftp.Limits.from_reply(struct.pack(">QQQQ", 0, 0, 0, 0))
    assert unlimited.read == unlimited.write == sftp.MAX_TRANSFER
    tiny = sftp.Limits.from_reply(struct.pack(">QQQQ", 100, 1, 1, 0))
    assert tiny.read >= 512
    with pytest.raises(ProtocolError):
        sftp.Limits.from_reply(b"\0" * 8)


def test_status_errors_carry_their_errno() -> None:
    assert isinstance(sftp.status_error(sftp.SSH_FX_NO_SUCH_FILE, "", "open"), NotFound)
    assert isinstance(sftp.status_error(sftp.SSH_FX_PERMISSION_DENIED, "", "open"),
                      PermissionDenied)
    assert isinstance(sftp.status_error(sftp.SSH_FX_OP_UNSUPPORTED, "", "fsync"), Unsupported)
    error = sftp.status_error(sftp.SSH_FX_FAILURE, "disk on fire", "write")
    assert error.errno == 5 and "disk on fire" in str(error)


# -- SFTP framing: replies cut anywhere, packets larger than the buffer --------------


class ScriptedChannel:
    """A byte channel whose server answers each READ with the bytes of a
    file, handed over in receives of the sizes `cuts` cycles through."""

    def __init__(self, content: bytes, cuts: list[int]) -> None:
        self.content = content
        self.cuts = cuts
        self.turn = 0
        self.replies = bytearray()

    def send(self, data: bytes) -> None:
        length, kind, request_id = sftp.HEADER.unpack_from(data)
        assert kind == sftp.SSH_FXP_READ and len(data) == 4 + length
        handle_length = struct.unpack_from(">I", data, 9)[0]
        offset, count = struct.unpack_from(">QI", data, 13 + handle_length)
        piece = self.content[offset:offset + count]
        self.replies += sftp.packet(sftp.SSH_FXP_DATA, request_id, sftp.sftp_string(piece))

    async def receive_into(self, buffer: bytearray, start: int, stop: int) -> int:
        cut = self.cuts[self.turn % len(self.cuts)]
        self.turn += 1
        count = min(cut, stop - start, len(self.replies))
        assert count > 0, "a receive with no reply to wait for"
        buffer[start:start + count] = self.replies[:count]
        del self.replies[:count]
        return count

    def close(self) -> None:
        pass


#: reads in turn: small ones, then pieces larger than the first receive buffer
LARGE_READS = [(0, 4096), (5, 1), (4096 * 7 + 3, 70000), (1 << 20, 3 << 20),
               (100, (12 << 20) - 100)]


@pytest.mark.parametrize("cuts, reads", [([1], [(0, 4096), (3, 70000)]),
                                         ([3, 5000, 7], LARGE_READS),
                                         ([1 << 20], LARGE_READS),
                                         ([9, 4109, 13], LARGE_READS)])
def test_sftp_replies_cut_anywhere_are_framed(cuts: list[int],
                                              reads: list[tuple[int, int]]) -> None:
    import trio
    content = bytes(range(256)) * (12 << 12)          # 12 MiB
    session = sftp.SftpSession(ScriptedChannel(content, cuts), "scripted")
    session.limits = sftp.Limits(read=sftp.MAX_TRANSFER)

    async def check(offset: int, length: int) -> None:
        assert await session.read(b"h", offset, length) == content[offset:offset + length]

    async def main() -> None:
        for offset, length in reads:
            await check(offset, length)
        async with trio.open_nursery() as nursery:      # several in flight
            for offset in range(0, 64 << 10, 4096):
                nursery.start_soon(check, offset, 4096)

    trio.run(main)
    assert session.in_flight == 0
