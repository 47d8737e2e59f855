"""qcow2 ``encrypt.format=luks`` through a real FUSE mount: the mount's
key-secret reaches the driver, writes come back through QEMU, a wrong
passphrase mounts nothing."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import (
    assert_legacy_aes_mounts_read_only_only,
    assert_wrong_passphrase_mounts_nothing,
    imgfs,
    is_mounted,
    mounted,
    need,
    pwrite_all,
    qemu_img_create_encrypted,
    random_bytes,
    run,
)
from tests.drivers.test_qcow2_luks import (
    QEMU_WRITES,
    SECRET,
    create_encrypted,
    expected_after_qemu_writes,
    qemu_check,
    qemu_contents,
    qemu_io,
)

MiB = 1 << 20


def fill(image: Path) -> None:
    qemu_io(image, *(f"write -P {pattern:#x} {offset} {length}"
                     for offset, length, pattern in QEMU_WRITES))


def test_read_write_through_the_mount(tmp_path: Path, mnt: Path) -> None:
    need("qemu-img", "qemu-io")
    image = tmp_path / "disk.qcow2"
    create_encrypted(image)
    fill(image)
    expected = bytearray(qemu_contents(image, tmp_path))
    assert expected[:MiB - 512] == b"\x5a" * (MiB - 512)
    with mounted(image, mountpoint=mnt, options="key-secret=sec0", extra=tuple(SECRET)):
        exposed = next(mnt.iterdir())
        assert exposed.stat().st_size == len(expected)
        assert exposed.read_bytes() == expected
        pwrite_all(exposed, [(3 * MiB + 100, b"through the mount" * 30),
                             (9 * MiB + 1, random_bytes(300_000, seed=7)),
                             (511, b"straddles a sector")], expected)
    qemu_check(image)
    assert qemu_contents(image, tmp_path) == expected


def test_wrong_passphrase_mounts_nothing(tmp_path: Path, mnt: Path) -> None:
    need("qemu-img")
    image = tmp_path / "disk.qcow2"
    create_encrypted(image, 2 * MiB)
    assert_wrong_passphrase_mounts_nothing(image, mnt)


def test_read_only_mount_of_qemu_image(tmp_path: Path, mnt: Path) -> None:
    need("qemu-img", "qemu-io")
    image = tmp_path / "disk.qcow2"
    create_encrypted(image)
    fill(image)
    before = image.read_bytes()
    with mounted(image, mountpoint=mnt, options="ro,key-secret=sec0", extra=tuple(SECRET)):
        assert next(mnt.iterdir()).read_bytes() == expected_after_qemu_writes()
    assert image.read_bytes() == before


def test_legacy_aes_mounts_read_only_only(tmp_path: Path, mnt: Path) -> None:
    """Legacy qcow2 AES: refused read-write (one line, nothing mounted);
    with -o ro it mounts, reads what QEMU reads, and warns."""
    from tests.drivers.test_qcow2_aes import WARNING, create_aes, expected

    need("qemu-img", "qemu-io")
    image = tmp_path / "aes.qcow2"
    create_aes(image)
    assert_legacy_aes_mounts_read_only_only(image, mnt, WARNING, expected())


# -- backing chains: each encrypted layer with its own secret, as QEMU -------------------

#: two secrets, one per layer (QEMU: encrypt.key-secret=s1,backing.encrypt.key-secret=s0)
CHAIN_SECRETS = ["--object", "secret,id=s0,data=base pass",
                 "--object", "secret,id=s1,data=top pass"]


def qemu_create_retrying(*args: str | Path) -> None:
    qemu_img_create_encrypted(*CHAIN_SECRETS, *args)


def chain_contents(image_opts: str, out: Path) -> bytes:
    run("qemu-img", "convert", *CHAIN_SECRETS, "--image-opts", image_opts, "-O", "raw", out)
    return out.read_bytes()


def qemu_io_opts(image_opts: str, *commands: str) -> None:
    run("qemu-io", *CHAIN_SECRETS, "--image-opts", image_opts,
        *(arg for command in commands for arg in ("-c", command)))


def assert_compare_equal(image_opts: str, raw: Path) -> None:
    result = run("qemu-img", "compare", *CHAIN_SECRETS, "--image-opts", image_opts,
                 f"driver=raw,file.filename={raw}", check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_encrypted_chain_each_layer_its_own_secret(tmp_path: Path, mnt: Path) -> None:
    need("qemu-img", "qemu-io")
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qemu_create_retrying("-f", "qcow2", "-o", "encrypt.format=luks,encrypt.key-secret=s0,"
                         "encrypt.iter-time=10", base, "4M")
    qemu_create_retrying("-f", "qcow2", "-o", "encrypt.format=luks,encrypt.key-secret=s1,"
                         "encrypt.iter-time=10", "-b", base.name, "-F", "qcow2", top)
    base_opts = f"driver=qcow2,file.filename={base},encrypt.key-secret=s0"
    top_opts = (f"driver=qcow2,file.filename={top},encrypt.key-secret=s1,"
                "backing.encrypt.key-secret=s0")
    qemu_io_opts(base_opts, "write -P 0x11 0 3M")
    qemu_io_opts(top_opts, "write -P 0x22 1M 1M")
    expected = bytearray(chain_contents(top_opts, tmp_path / "qemu.raw"))
    assert expected[:MiB] == b"\x11" * MiB and expected[MiB:2 * MiB] == b"\x22" * MiB
    # info describes both layers without any secret, as qemu-img does
    assert imgfs("info", "--backing-chain", top).stdout == \
        run("qemu-img", "info", "--backing-chain", top).stdout
    base_before = base.read_bytes()
    with mounted(top, mountpoint=mnt, extra=tuple(CHAIN_SECRETS),
                 options="encrypt.key-secret=s1,backing.encrypt.key-secret=s0"):
        exposed = mnt / "top.raw"
        assert exposed.read_bytes() == expected
        pwrite_all(exposed, [(2 * MiB + 300, b"into the top layer" * 100),
                             (512 * 1024 - 7, random_bytes(70_000, seed=3))], expected)
    (tmp_path / "expected.raw").write_bytes(expected)
    assert_compare_equal(top_opts, tmp_path / "expected.raw")
    assert base.read_bytes() == base_before                # the backing file is read-only
    # the same per-layer secrets in a json: source (nested and dotted)
    for backing in ({"backing": {"encrypt": {"key-secret": "s0"}}},
                    {"backing.encrypt.key-secret": "s0"}):
        source = "json:" + json.dumps({"driver": "qcow2", "encrypt.key-secret": "s1",
                                       "file": {"driver": "file", "filename": str(top)},
                                       **backing})
        imgfs("convert", *CHAIN_SECRETS, "-O", "raw", source, tmp_path / "ours.raw")
        assert (tmp_path / "ours.raw").read_bytes() == expected
    # the top's secret does not open the base: one line naming the base, nothing mounted
    result = imgfs("mount", *CHAIN_SECRETS, "-o", "key-secret=s1", top, mnt, check=False)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert "base.qcow2: no key slot matches this passphrase" in result.stderr
    assert not is_mounted(mnt)


def test_luks_image_as_backing_of_qcow2(tmp_path: Path, mnt: Path) -> None:
    need("qemu-img", "qemu-io")
    base, top = tmp_path / "base.luks", tmp_path / "top.qcow2"
    qemu_create_retrying("-f", "luks", "-o", "key-secret=s0,iter-time=10", base, "4M")
    # imgfs create opens the backing file for its size only: no secret needed
    imgfs("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "luks", top)
    top_opts = f"driver=qcow2,file.filename={top},backing.key-secret=s0"
    qemu_io_opts(f"driver=luks,file.filename={base},key-secret=s0", "write -P 0x33 0 3M")
    qemu_io_opts(top_opts, "write -P 0x44 2M 1M")
    expected = bytearray(chain_contents(top_opts, tmp_path / "qemu.raw"))
    # (backing.file.* too: options for the file the image names)
    with mounted(top, mountpoint=mnt, extra=tuple(CHAIN_SECRETS),
                 options="backing.key-secret=s0,backing.file.locking=off"):
        exposed = mnt / "top.raw"
        assert exposed.read_bytes() == expected
        pwrite_all(exposed, [(MiB - 100, random_bytes(5000, seed=8))], expected)
    (tmp_path / "expected.raw").write_bytes(expected)
    assert_compare_equal(top_opts, tmp_path / "expected.raw")


# -- an external data file: its clusters hold ciphertext, numbered by their offset there --


def test_data_file_made_by_qemu_through_the_mount(tmp_path: Path, mnt: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    need("qemu-img", "qemu-io")
    monkeypatch.chdir(tmp_path)       # qemu-img creates a relative data_file in the cwd
    image, data_file = tmp_path / "disk.qcow2", tmp_path / "disk.data"
    qemu_create_retrying("-f", "qcow2", "-o", "encrypt.format=luks,encrypt.key-secret=s0,"
                         f"encrypt.iter-time=10,data_file={data_file.name}", image, "4M")
    opts = f"driver=qcow2,file.filename={image},encrypt.key-secret=s0"
    qemu_io_opts(opts, "write -P 0x5a 512 1M", "write -P 0x77 3M 4k")
    expected = bytearray(chain_contents(opts, tmp_path / "qemu.raw"))
    with mounted(image, mountpoint=mnt, extra=tuple(CHAIN_SECRETS),
                 options="encrypt.key-secret=s0"):
        exposed = mnt / "disk.raw"
        assert exposed.read_bytes() == expected
        pwrite_all(exposed, [(2 * MiB + 3, b"plain text" * 500), (100, b"head")], expected)
    (tmp_path / "expected.raw").write_bytes(expected)
    assert_compare_equal(opts, tmp_path / "expected.raw")
    assert b"plain text" not in data_file.read_bytes()      # ciphertext only
    assert b"\x5a" * 512 not in data_file.read_bytes()


def test_data_file_made_by_imgfs_opens_in_qemu(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    need("qemu-img", "qemu-io")
    monkeypatch.chdir(tmp_path)       # qemu 7.2 opens a relative data_file from the cwd
    image = tmp_path / "new.qcow2"
    imgfs("create", "-f", "qcow2", *CHAIN_SECRETS, "-o", "encrypt.format=luks,"
          "encrypt.key-secret=s1,encrypt.iter-time=10,data_file=new.data", image, "4M")
    opts = f"driver=qcow2,file.filename={image},encrypt.key-secret=s1"
    qemu_io_opts(opts, "write -P 0x42 64k 200k", "read -P 0x42 64k 200k", "read -P 0 0 64k")
    source = "json:" + json.dumps({"driver": "qcow2", "encrypt.key-secret": "s1",
                                   "file": {"driver": "file", "filename": str(image)}})
    imgfs("convert", *CHAIN_SECRETS, "-O", "raw", source, tmp_path / "ours.raw")
    assert (tmp_path / "ours.raw").read_bytes() == chain_contents(opts, tmp_path / "qemu.raw")
    check = run("qemu-img", "check", *CHAIN_SECRETS, "--image-opts", opts)
    assert "No errors were found" in check.stdout
    # data_file_raw would promise a raw data file that holds ciphertext: refused
    result = imgfs("create", "-f", "qcow2", *CHAIN_SECRETS, "-o", "encrypt.format=luks,"
                   "encrypt.key-secret=s1,data_file=raw.data,data_file_raw=on",
                   tmp_path / "raw.qcow2", "4M", check=False)
    assert result.returncode == 1 and "data_file_raw cannot be used with encryption" in \
        result.stderr
    assert not (tmp_path / "raw.qcow2").exists()
