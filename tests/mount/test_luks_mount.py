"""LUKS images through a real FUSE mount: secrets from --object and from a
passphrase file, wrong passphrases refused before anything is mounted,
writes that QEMU (LUKS1) and an independent decryption (LUKS2) read back."""
from __future__ import annotations

import subprocess
from pathlib import Path

from tests.conftest import (
    IMGFS,
    assert_wrong_passphrase_mounts_nothing,
    daemon_pids,
    mounted,
    need,
    pwrite_all,
    random_bytes,
    run,
    unmount,
)
from tests.drivers.test_luks import (
    PASS,
    SECRET,
    UNALIGNED_WRITES,
    cryptsetup_format,
    decrypt_xts,
    luks2_pbkdf,
    qemu_contents,
    qemu_fill,
    volume_key,
)

MiB = 1 << 20


def test_luks1_read_write_through_the_mount(tmp_path: Path, mnt: Path) -> None:
    need("qemu-img", "cryptsetup")
    image = cryptsetup_format(tmp_path / "disk.luks", 8 * MiB)
    qemu_fill(image, random_bytes(6 * MiB, seed=5), tmp_path)   # payload after 2 MiB
    expected = bytearray(qemu_contents(image, tmp_path))
    with mounted(image, mountpoint=mnt, options="key-secret=sec0", extra=tuple(SECRET)):
        exposed = mnt / "disk.raw"
        assert exposed.stat().st_size == len(expected)
        assert exposed.read_bytes() == expected
        pwrite_all(exposed, UNALIGNED_WRITES, expected)
    assert qemu_contents(image, tmp_path) == expected
    run("cryptsetup", "open", "--test-passphrase", f"--key-file={image.with_suffix('.key')}",
        image)


def test_passphrase_file(tmp_path: Path, mnt: Path) -> None:
    need("cryptsetup", "qemu-img")
    image = cryptsetup_format(tmp_path / "disk.luks", 4 * MiB)
    data = random_bytes(4 * MiB - 2 * MiB, seed=9)
    qemu_fill(image, data, tmp_path)
    pass_file = tmp_path / "pass.txt"
    pass_file.write_text(PASS + "\n")           # one trailing newline is ignored
    with mounted(image, mountpoint=mnt, options=f"ro,passphrase-file={pass_file}"):
        assert (mnt / "disk.raw").read_bytes() == data


def test_wrong_passphrase_mounts_nothing(tmp_path: Path, mnt: Path) -> None:
    need("cryptsetup")
    image = cryptsetup_format(tmp_path / "disk.luks", 3 * MiB)
    assert_wrong_passphrase_mounts_nothing(image, mnt)


def test_luks2_4k_sectors_through_the_mount(tmp_path: Path, mnt: Path) -> None:
    need("cryptsetup")
    image = cryptsetup_format(tmp_path / "disk.luks", 20 * MiB, *luks2_pbkdf("argon2id"),
                              "--sector-size", "4096", luks_type="luks2")
    with mounted(image, mountpoint=mnt, options="key-secret=sec0", extra=tuple(SECRET)):
        exposed = mnt / "disk.raw"
        expected = bytearray(exposed.read_bytes())
        assert len(expected) == 4 * MiB
        pwrite_all(exposed, UNALIGNED_WRITES, expected)
        assert exposed.read_bytes() == expected
    key = volume_key(image)
    with open(image, "rb") as handle:
        for sector in (0, 1, 3 * MiB // 4096, (MiB - 7) // 4096 + 5):
            handle.seek(16 * MiB + sector * 4096)
            assert decrypt_xts(key, handle.read(4096), sector) == \
                expected[sector * 4096:(sector + 1) * 4096]


def test_luks2_mount_opens_its_keyslot_early(tmp_path: Path, mnt: Path) -> None:
    """A LUKS2 mount starts its keyslot's Argon2 before imgfs has loaded
    (luks.early): a wrong passphrase still mounts nothing, and a damaged
    header copy is warned about once, not once per parse."""
    need("cryptsetup")
    image = cryptsetup_format(tmp_path / "disk.luks", 17 * MiB, *luks2_pbkdf("argon2id"),
                              luks_type="luks2")
    assert_wrong_passphrase_mounts_nothing(image, mnt)
    with open(image, "r+b") as handle:          # the primary copy's JSON damaged
        handle.seek(4096 + 10)
        handle.write(b"AAAA")
    try:
        result = subprocess.run([IMGFS, "mount", *SECRET, "-o", "key-secret=sec0", image.name,
                                 str(mnt)], cwd=tmp_path, capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0
        assert result.stderr.count("LUKS2 header copy damaged") == 1, result.stderr
        assert (mnt / "disk.raw").stat().st_size == MiB
    finally:
        unmount(mnt)


def test_inline_secret_is_not_in_the_process_list(tmp_path: Path, mnt: Path) -> None:
    """--object secret,data=... is blanked in the daemon's command line (ps)."""
    need("cryptsetup")
    image = cryptsetup_format(tmp_path / "disk.luks", 3 * MiB)
    with mounted(image, mountpoint=mnt, options="ro,key-secret=sec0", extra=tuple(SECRET)):
        assert (mnt / "disk.raw").stat().st_size == MiB
        pids = daemon_pids(mnt)
        assert pids
        for pid in pids:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            assert b"data=" in cmdline and PASS.encode() not in cmdline
