"""Small commands that `ssh` runs for the ssh driver (stdlib only, run as a
script so that starting one imports nothing of imgfs).

``connect HOST PORT TIMEOUT``: ProxyCommand with ProxyUseFdpass: connects,
sets TCP_NODELAY (OpenSSH sets it only for interactive sessions, and SFTP's
small requests otherwise wait for delayed ACKs), and hands the socket to
ssh over its stdout.

``hostkey EXPECTED HOST TYPE KEY``: KnownHostsCommand: reports the server's
key fingerprint on stderr (for the refusal message) and, when EXPECTED is
``ALGO:HEX`` and matches the key, prints a known_hosts line accepting it.
EXPECTED ``-`` only reports (known_hosts files decide).
"""
from __future__ import annotations

import array
import base64
import hashlib
import socket
import sys

#: what a fingerprint line on stderr starts with (the driver looks for it)
FINGERPRINT_TAG = "imgfs-host-key:"


def fingerprint(algorithm: str, key_blob: bytes) -> str:
    """The key's digest in hex, colon-separated, as QEMU prints it."""
    digest = hashlib.new(algorithm, key_blob).hexdigest()
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


def openssh_fingerprint(key_blob: bytes) -> str:
    """``SHA256:base64``, as ssh-keygen -l and ssh print it."""
    digest = base64.b64encode(hashlib.sha256(key_blob).digest()).decode().rstrip("=")
    return f"SHA256:{digest}"


def hostkey(expected: str, host: str, key_type: str, key: str) -> int:
    if key_type == "NONE":
        return 0        # asked before the key exchange, to order algorithms
    try:
        blob = base64.b64decode(key, validate=True)
    except ValueError:
        return 1
    print(f"{FINGERPRINT_TAG} {host} {key_type} {openssh_fingerprint(blob)}", file=sys.stderr)
    if expected == "-":
        return 0
    algorithm, _, wanted = expected.partition(":")
    actual = fingerprint(algorithm, blob)
    if actual.replace(":", "") == wanted.replace(":", "").lower():
        print(f"{host} {key_type} {key}")
    else:
        print(f"{FINGERPRINT_TAG} mismatch {algorithm}:{actual.replace(':', '')}",
              file=sys.stderr)
    return 0


def connect(host: str, port: str, timeout: str) -> int:
    try:
        sock = socket.create_connection((host, int(port)), timeout=float(timeout))
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        print(f"ssh: connect to host {host} port {port}: {reason}", file=sys.stderr)
        return 255
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(None)
    # ProxyUseFdpass: one byte with the descriptor attached, on stdout.
    with socket.socket(fileno=sys.stdout.fileno()) as channel:
        channel.sendmsg([b"\0"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                   array.array("i", [sock.fileno()]))])
        channel.detach()
    return 0


def main(argv: list[str]) -> int:
    if len(argv) == 4 and argv[0] == "connect":
        return connect(*argv[1:])
    if len(argv) == 5 and argv[0] == "hostkey":
        return hostkey(*argv[1:])
    print(f"usage: {sys.argv[0]} connect HOST PORT TIMEOUT | hostkey EXPECTED HOST TYPE KEY",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
