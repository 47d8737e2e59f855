"""The ssh driver's pure parts: URL and option parsing, the ssh command
line, the host key helper's fingerprints, SFTP field parsing."""
from __future__ import annotations

import base64
import hashlib
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from imgfs.drivers.ssh import helper, sftp, transport
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


# -- the ssh command line ------------------------------------------------------------------


def test_ssh_argv_never_prompts_and_ends_with_the_host() -> None:
    target = Target("vm1", "/d", 2200, "bob", HostKeyCheck("none"))
    argv = transport.ssh_argv(target, 10, tuning=[], home=None)
    assert argv[:2] == ["ssh", "-T"] and argv[-3:] == ["--", "vm1", "sftp"]
    assert "BatchMode=yes" in argv and "StrictHostKeyChecking=no" in argv
    assert "UserKnownHostsFile=/dev/null" in argv
    assert argv[argv.index("-p") + 1] == "2200" and argv[argv.index("-l") + 1] == "bob"


def test_host_key_options_per_mode(tmp_path: Path) -> None:
    known = transport.host_key_options(HostKeyCheck(), str(tmp_path))
    assert "StrictHostKeyChecking=yes" in known
    assert f'UserKnownHostsFile="{tmp_path}/.ssh/known_hosts" ' \
           f'"{tmp_path}/.ssh/known_hosts2"' in known
    assert not any(option.startswith("UserKnownHostsFile")
                   for option in transport.host_key_options(HostKeyCheck(), None))
    hashed = transport.host_key_options(HostKeyCheck("hash", "sha1", "ab" * 20), None)
    assert "UserKnownHostsFile=/dev/null" in hashed
    command = next(option for option in hashed if option.startswith("KnownHostsCommand="))
    assert command.endswith(f"hostkey sha1:{'ab' * 20} %H %t %K")


def test_tuning_respects_a_configured_proxy_and_the_allowed_ciphers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport, "cpu_has_aes", lambda: True)
    default = {"ciphers": "chacha20-poly1305@openssh.com,aes128-ctr,aes128-gcm@openssh.com"}
    tuned = transport.tuned_options(default, 5)
    assert "ProxyUseFdpass=yes" in tuned
    assert ("Ciphers=aes128-gcm@openssh.com,chacha20-poly1305@openssh.com,aes128-ctr"
            in tuned)
    proxied = transport.tuned_options({"proxyjump": "bastion", "ciphers": "aes128-ctr"}, 5)
    assert proxied == []


# -- the host key helper -----------------------------------------------------------------------


def test_fingerprints_as_qemu_and_ssh_keygen_print_them(tmp_path: Path) -> None:
    if shutil.which("ssh-keygen") is None:
        pytest.skip("ssh-keygen not installed")
    key = tmp_path / "key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    blob = base64.b64decode(key.with_suffix(".pub").read_text().split()[1])
    keygen = subprocess.run(["ssh-keygen", "-l", "-f", str(key.with_suffix(".pub"))],
                            check=True, capture_output=True, text=True).stdout.split()[1]
    assert helper.openssh_fingerprint(blob) == keygen
    md5 = subprocess.run(["ssh-keygen", "-l", "-E", "md5", "-f", str(key.with_suffix(".pub"))],
                         check=True, capture_output=True, text=True).stdout.split()[1]
    assert "MD5:" + helper.fingerprint("md5", blob) == md5


def test_hostkey_helper_accepts_only_the_matching_key(capsys: pytest.CaptureFixture) -> None:
    key = base64.b64encode(b"\0\0\0\x0bssh-ed25519" + b"k" * 36).decode()
    digest = hashlib.sha256(base64.b64decode(key)).hexdigest()
    assert helper.main(["hostkey", f"sha256:{digest}", "vm1", "ssh-ed25519", key]) == 0
    out, err = capsys.readouterr()
    assert out == f"vm1 ssh-ed25519 {key}\n" and helper.FINGERPRINT_TAG in err
    helper.main(["hostkey", f"sha256:{'0' * 64}", "vm1", "ssh-ed25519", key])
    out, err = capsys.readouterr()
    assert out == "" and f"mismatch sha256:{digest}" in err
    helper.main(["hostkey", "-", "vm1", "NONE", "x"])
    assert capsys.readouterr() == ("", "")


# -- SFTP fields -------------------------------------------------------------------------


def test_sftp_packets_and_fields() -> None:
    packet = sftp.packet(sftp.SSH_FXP_READ, 7, sftp.sftp_string(b"h"), struct.pack(">QI", 9, 4))
    assert packet == struct.pack(">IBI", 22, 5, 7) + b"\0\0\0\x01h" + struct.pack(">QI", 9, 4)
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
