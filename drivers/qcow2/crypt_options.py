"""The light half of qcow2 encryption: the ``encrypt.*`` open and create
options and the legacy AES messages.

Every qcow2 open and create needs these, but only an encrypted image needs
`crypt` itself, which loads `cryptography` and the LUKS driver (a cost
every start would pay: bench/README.md).  qcow (version 1) shares them.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from imgfs.errors import Unsupported, UsageError

#: qcow2 LUKS sectors are always 512 bytes (QEMU's QCRYPTO_BLOCK_LUKS_SECTOR_SIZE)
SECTOR_SIZE = 512


def legacy_aes_read_only(fmt: str = "qcow2") -> str:
    """Why a legacy AES image (qcow2, or qcow version 1) is never opened
    read-write; shared by both drivers so the mount says the same thing."""
    target = "encrypt.format=luks" if fmt == "qcow2" else "qcow2 with encrypt.format=luks"
    return (f"legacy {fmt} AES encryption is broken by design; mount it with -o ro, "
            f"or convert it (e.g. to {target})")


def legacy_aes_warning(fmt: str, filename: str) -> str:
    """The warning a read-only open of a legacy AES image logs."""
    return (f"{filename}: legacy {fmt} AES encryption is broken by design (no key check, "
            "weak IVs): reading it read-only; convert it to "
            + ("encrypt.format=luks" if fmt == "qcow2" else "qcow2 with encrypt.format=luks"))


#: why a legacy qcow2 AES image is never opened read-write
LEGACY_AES_READ_ONLY = legacy_aes_read_only("qcow2")


def parse_encrypt_options(raw: Any) -> dict[str, str]:
    """The ``encrypt`` open option: a tree (``encrypt.key-secret=ID`` nests
    to ``{"key-secret": ID}``) with QEMU's open-time keys."""
    if not isinstance(raw, Mapping):
        raise UsageError("expected encrypt.key-secret=ID or encrypt.format=luks")
    options = {str(key): str(value) for key, value in raw.items()}
    for key in options:
        if key not in ("key-secret", "format"):
            raise UsageError(f"unknown option 'encrypt.{key}' (expected key-secret or format)")
    if options.get("format", "luks") not in ("luks", "aes"):
        raise UsageError(f"encrypt.format={options['format']} cannot be opened "
                         "(expected luks or aes)")
    return options


#: the encrypt.* create options QEMU's qcow2 takes, as the luks driver names them
ENCRYPT_CREATE_KEYS = ("key-secret", "cipher-alg", "cipher-mode", "ivgen-alg",
                       "ivgen-hash-alg", "hash-alg", "iter-time")


def encrypt_create_options(options: dict[str, Any]) -> dict[str, Any] | None:
    """The LUKS create options from qcow2's ``encrypt.*`` (None: no
    encryption).  Legacy AES is refused, as QEMU's qcow2 refuses it."""
    given = {key[len("encrypt."):]: value for key, value in options.items()
             if key.startswith("encrypt.") and value is not None}
    fmt = given.pop("format", None)
    if options.get("encryption") or fmt == "aes":
        raise Unsupported("legacy qcow2 AES encryption cannot be created (the scheme is "
                          "broken): use encrypt.format=luks")
    if fmt is None and not given:
        return None
    if fmt != "luks":
        raise UsageError("encrypt.* options need encrypt.format=luks")
    for key in given:
        if key not in ENCRYPT_CREATE_KEYS:
            raise UsageError(f"unknown option 'encrypt.{key}' (expected one of: "
                             + ", ".join(f"encrypt.{name}" for name in ENCRYPT_CREATE_KEYS)
                             + ")")
    if options.get("data_file_raw"):
        # QEMU accepts it, but the data file would hold ciphertext, not the
        # raw image the flag promises (and its implied preallocation reads
        # back as noise): refused, as encrypted preallocation is
        raise Unsupported("data_file_raw cannot be used with encryption (the data file "
                          "would hold ciphertext, not the raw image)")
    from ..luks.create import CREATE_OPTS as LUKS_CREATE_OPTS
    from ..luks.create import create_spec
    luks_options = LUKS_CREATE_OPTS.parse(given, "qcow2 encrypt")
    create_spec(luks_options)           # an unsupported cipher fails before the prompt
    return luks_options
