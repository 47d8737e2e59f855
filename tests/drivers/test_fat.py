"""Virtual FAT through the Python API, checked with fsck.fat, mtools, 7-Zip
and QEMU's own vvfat (`qemu-img convert -f vvfat`)."""
from __future__ import annotations

import errno
import logging
import os
import subprocess
from pathlib import Path

import pytest
import trio

from imgfs.block import Status
from imgfs.errors import ImgfsError, NoSpace, UsageError
from imgfs.graph import open_image
from imgfs.node import Node, OpenContext
from tests.conftest import need, random_bytes, run

MiB = 1 << 20
#: where imgfs puts the partition of a hard disk
PARTITION = MiB
MTOOLS_ENV = {**os.environ, "MTOOLS_SKIP_CHECK": "0", "MTOOLS_NO_VFAT": "0"}


def make_tree(root: Path, *, many: int = 300, big: int = 3 * MiB) -> Path:
    """Deep directories, long and non-ASCII names, empty, hidden, read-only,
    sparse and cluster-sized files, a crowded directory."""
    root.mkdir()
    (root / "README.TXT").write_bytes(b"plain 8.3 name\n")
    (root / "A long file name with spaces.text").write_bytes(random_bytes(5000, 1))
    (root / "Ünïcødé ☃ 名前.txt").write_bytes("snowman ☃\n".encode())
    (root / "empty").touch()
    (root / ".hidden").write_bytes(b"dot file\n")
    readonly = root / "readonly.txt"
    readonly.write_bytes(b"no write bits\n")
    readonly.chmod(0o444)
    (root / "cluster.bin").write_bytes(random_bytes(64 * 1024, 2))
    with open(root / "sparse.img", "wb") as handle:
        handle.truncate(big)
        handle.seek(big // 2)
        handle.write(b"middle")
        handle.seek(big - 3)
        handle.write(b"END")
    deep = root
    for level in range(12):
        deep = deep / f"level {level} directory"
    deep.mkdir(parents=True)
    (deep / "bottom.txt").write_bytes(b"deep down\n")
    (root / "level 0 directory" / "empty dir").mkdir()
    crowd = root / "crowd"
    crowd.mkdir()
    for number in range(many):
        (crowd / f"photo {number:04d}.jpeg").write_bytes(random_bytes(number * 7, number))
    return root


def host_listing(root: Path) -> dict[str, bytes | None]:
    """Relative path -> contents (None for directories)."""
    found: dict[str, bytes | None] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        found[rel] = None if path.is_dir() else path.read_bytes()
    return found


async def _open(source: str | dict) -> Node:
    return await open_image(source, OpenContext(read_only=True))


def dump(source: str | dict, out: Path) -> Node:
    """Write the whole virtual disk to `out` (sparsely), return the node
    (closed) for its layout."""
    async def main() -> Node:
        node = await _open(source)
        try:
            with open(out, "wb") as handle:
                handle.truncate(node.size)
                offset = 0
                while offset < node.size:
                    chunk = await node.read(offset, min(4 * MiB, node.size - offset))
                    if chunk.count(0) != len(chunk):
                        handle.seek(offset)
                        handle.write(chunk)
                    offset += len(chunk)
        finally:
            await node.aclose()
        return node
    return trio.run(main)


def fat_driver(node: Node):  # noqa: ANN201
    """The FatDriver under a probed raw node (or the node itself)."""
    return node.children["file"].driver if node.children else node.driver


def extract_partition(disk: Path, out: Path) -> Path:
    with open(disk, "rb") as source, open(out, "wb") as target:
        source.seek(PARTITION)
        while chunk := source.read(4 * MiB):
            if chunk.count(0) == len(chunk):
                target.seek(len(chunk), os.SEEK_CUR)
            else:
                target.write(chunk)
        target.truncate()
    return out


def fsck_clean(volume: Path) -> str:
    """fsck.fat -n finds nothing to say; returns its verbose report."""
    need("fsck.fat")
    result = run("fsck.fat", "-n", "-V", volume, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    # on a clean volume it prints its version, the two passes and a summary
    expected = ("fsck.fat ", "Starting check/repair pass.", "Starting verification pass.",
                f"{volume}: ")
    noise = [line for line in result.stdout.splitlines() if not line.startswith(expected)]
    assert not noise and not result.stderr, result.stdout + result.stderr
    return run("fsck.fat", "-n", "-v", volume).stdout


def mcopy_tree(image: str, out: Path) -> dict[str, bytes | None]:
    need("mcopy")
    out.mkdir()
    run("mcopy", "-s", "-p", "-m", "-i", image, "::/", str(out) + "/", env=MTOOLS_ENV)
    return host_listing(out)


def mdir_paths(image: str) -> set[str]:
    need("mdir")
    listing = run("mdir", "-/", "-b", "-a", "-i", image, "::", env=MTOOLS_ENV).stdout
    return {line.removeprefix("::/").rstrip("/") for line in listing.splitlines() if line}


@pytest.mark.parametrize("forced, bits", [("", 12), ("16:", 16), ("32:", 32)])
def test_fsck_clean_for_each_fat_type(tmp_path: Path, forced: str, bits: int) -> None:
    tree = make_tree(tmp_path / "tree")
    node = dump(f"fat:{forced}{tree}", tmp_path / "disk.raw")
    assert node.format_name == "raw"               # an MBR is raw to the prober
    assert fat_driver(node).image.fat_type == bits
    report = fsck_clean(extract_partition(tmp_path / "disk.raw", tmp_path / "part.raw"))
    assert f"{bits} bit entries" in report
    need("fdisk")
    table = run("fdisk", "-l", tmp_path / "disk.raw").stdout
    assert f"FAT{bits}" in table and " 2048 " in table


def test_floppy_is_a_bare_fat12_volume(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", many=20, big=100_000)
    node = dump(f"fat:floppy:{tree}", tmp_path / "floppy.img")
    assert node.size == 1474560
    report = fsck_clean(tmp_path / "floppy.img")
    assert "12 bit entries" in report and "18 sectors/track, 2 heads" in report
    assert mcopy_tree(str(tmp_path / "floppy.img"), tmp_path / "out") == host_listing(tree)
    # a tree over 1.44 MB gets the 2.88 MB geometry
    (tree / "more.bin").write_bytes(random_bytes(1_400_000, 5))
    node = dump(f"fat:floppy:{tree}", tmp_path / "floppy288.img")
    assert node.size == 2949120
    fsck_clean(tmp_path / "floppy288.img")


def test_mtools_and_7zip_see_the_same_tree(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    dump(f"fat:{tree}", tmp_path / "disk.raw")
    expected = host_listing(tree)
    assert mcopy_tree(f"{tmp_path / 'disk.raw'}@@{PARTITION}", tmp_path / "mtools") == expected
    need("7zz")
    run("7zz", "x", "-y", f"-o{tmp_path / 'seven'}", tmp_path / "disk.raw")
    assert host_listing(tmp_path / "seven") == expected


def test_names_outside_the_bmp_round_trip_through_7zip(tmp_path: Path) -> None:
    # UTF-16 surrogate pairs in long names (mtools shows them as "__")
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "clef 𝄞 and 🙂.txt").write_bytes(b"astral")
    dump(f"fat:{tree}", tmp_path / "disk.raw")
    need("7zz")
    run("7zz", "x", "-y", f"-o{tmp_path / 'seven'}", tmp_path / "disk.raw")
    assert host_listing(tmp_path / "seven") == host_listing(tree)


def test_attributes_times_and_short_names(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", many=40)
    stamp = 1_600_000_000               # 2020-09-13, even seconds
    os.utime(tree / "README.TXT", (stamp, stamp))
    dump(f"fat:{tree}", tmp_path / "disk.raw")
    image = f"{tmp_path / 'disk.raw'}@@{PARTITION}"
    need("mattrib", "mdir")
    attributes = run("mattrib", "-i", image, "::/readonly.txt", "::/.hidden",
                     "::/README.TXT", env=MTOOLS_ENV).stdout
    assert "R" in attributes.splitlines()[0][:10] and "H" in attributes.splitlines()[1][:10]
    listing = run("mdir", "-a", "-i", image, "::/crowd", env=MTOOLS_ENV).stdout
    shorts = [line.split()[0] for line in listing.splitlines() if "photo" in line]
    assert len(shorts) == len(set(shorts)) == 40
    assert "PHOTO0~1" in shorts
    top = run("mdir", "-i", image, "::/README.TXT", env=MTOOLS_ENV).stdout
    local = __import__("time").localtime(stamp)
    assert f"{local.tm_hour:02d}:{local.tm_min:02d}" in top


def test_same_files_as_qemu_vvfat(tmp_path: Path) -> None:
    need("qemu-img")
    tree = make_tree(tmp_path / "tree", many=50)
    run("qemu-img", "convert", "-f", "vvfat", "-O", "raw", f"fat:16:{tree}",
        tmp_path / "qemu.raw")
    ours = dump(f"fat:16:{tree}", tmp_path / "ours.raw")
    assert fat_driver(ours).image.fat_type == 16
    # QEMU's vvfat puts its partition at sector 63
    theirs = mdir_paths(f"{tmp_path / 'qemu.raw'}@@{63 * 512}")
    assert mdir_paths(f"{tmp_path / 'ours.raw'}@@{PARTITION}") == theirs
    assert theirs >= {"README.TXT", "crowd/photo 0049.jpeg"}
    assert mcopy_tree(f"{tmp_path / 'ours.raw'}@@{PARTITION}", tmp_path / "ours") == \
        mcopy_tree(f"{tmp_path / 'qemu.raw'}@@{63 * 512}", tmp_path / "theirs")


def test_host_changes_read_as_eio(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", many=3)
    (tree / "shrinks.bin").write_bytes(random_bytes(20000, 7))
    (tree / "vanishes.bin").write_bytes(random_bytes(20000, 8))
    (tree / "stays.bin").write_bytes(random_bytes(20000, 9))

    async def main() -> None:
        node = await _open(f"fat:{tree}")
        try:
            image = fat_driver(node).image
            base = image.partition_start * 512

            def where(name: str) -> int:
                found = next(n for n in image.nodes if n.name == name)
                return base + image.volume.cluster_sector(found.first_cluster) * 512

            offsets = {name: where(name) for name in ("shrinks.bin", "vanishes.bin",
                                                        "stays.bin")}
            assert await node.read(offsets["shrinks.bin"], 20000) == random_bytes(20000, 7)
            os.truncate(tree / "shrinks.bin", 100)
            (tree / "vanishes.bin").unlink()
            for name in ("shrinks.bin", "vanishes.bin"):
                with pytest.raises(ImgfsError) as caught:
                    await node.read(offsets[name], 4096)
                assert caught.value.errno == errno.EIO
                assert name in str(caught.value)
            assert await node.read(offsets["stays.bin"], 20000) == random_bytes(20000, 9)
            # metadata still reads: the FAT and the directories are the snapshot's
            metadata = base + image.volume.data_sector * 512
            assert len(await node.read(0, metadata)) == metadata
        finally:
            await node.aclose()
    trio.run(main)


def test_what_fat_cannot_show_is_skipped_with_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tree = make_tree(tmp_path / "tree", many=2)
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"secret")
    (tree / "leaves").symlink_to(outside)
    (tree / "inside").symlink_to(tree / "README.TXT")
    (tree / "loop").symlink_to(tree)
    (tree / "crowd" / "up").symlink_to("..")
    os.mkfifo(tree / "fifo")
    (tree / "a:colon").write_bytes(b"x")
    (tree / "readme.TXT").write_bytes(b"case twin")
    with open(tree / "huge.img", "wb") as handle:
        handle.truncate(4 << 30)                      # one byte over FAT's limit
    caplog.set_level(logging.WARNING, logger="imgfs")
    dump(f"fat:32:{tree}", tmp_path / "disk.raw")
    for name in ("leaves", "loop", "up", "fifo", "a:colon", "readme.TXT", "huge.img"):
        assert any(name in record.getMessage() for record in caplog.records), name
    paths = mdir_paths(f"{tmp_path / 'disk.raw'}@@{PARTITION}")
    assert "inside" in paths and "README.TXT" in paths
    assert not {"leaves", "loop", "crowd/up", "fifo", "a:colon", "readme.TXT",
                "huge.img"} & paths
    fsck_clean(extract_partition(tmp_path / "disk.raw", tmp_path / "part.raw"))


def test_largest_file_maps_to_the_right_clusters(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    size = (4 << 30) - 1
    with open(tree / "max.img", "wb") as handle:
        handle.truncate(size)
        handle.seek(size - 3)
        handle.write(b"END")

    async def main() -> None:
        node = await _open(f"fat:{tree}")
        try:
            image = fat_driver(node).image
            assert image.fat_type == 32
            found = image.nodes[1]
            start = (image.partition_start + image.volume.cluster_sector(found.first_cluster))
            end = start * 512 + size
            assert await node.read(end - 3, 3) == b"END"
            tail = await node.read(end - 3, 4096)
            assert tail[:3] == b"END" and tail.count(0) == 4093
        finally:
            await node.aclose()
    trio.run(main)


def test_free_space_is_reported_as_zero(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", many=5)

    async def main() -> None:
        node = await _open(f"fat:16:{tree}")
        try:
            driver = fat_driver(node)
            image = driver.image
            offset, extents = 0, []
            while offset < node.size:
                extent = await driver.block_status(offset, node.size - offset)
                extents.append((offset, extent.length, bool(extent.status & Status.ZERO)))
                offset += extent.length
            # the gap after the MBR, and the free clusters at the end, are zero
            assert extents[1][0] == 512 and extents[1][2]
            free = image.free_clusters * image.cluster_size
            assert extents[-1][2] and extents[-1][1] >= free
            for start, length, zero in extents:
                if zero:
                    assert await node.read(start, min(length, 4 * MiB)) == \
                        bytes(min(length, 4 * MiB))
        finally:
            await node.aclose()
    trio.run(main)


def test_json_form_options_and_label(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", many=5)
    source = f'json:{{"driver": "fat", "dir": "{tree}", "fat-type": 32, "label": "Hello"}}'
    node = dump(source, tmp_path / "disk.raw")
    assert fat_driver(node).image.fat_type == 32
    need("mlabel")
    label = run("mlabel", "-s", "-i", f"{tmp_path / 'disk.raw'}@@{PARTITION}", "::",
                env=MTOOLS_ENV).stdout
    assert "HELLO" in label
    sized = dump({"driver": "raw", "file": {"driver": "fat", "dir": str(tree),
                                             "size": 64 * MiB}}, tmp_path / "sized.raw")
    assert sized.size == 64 * MiB
    fsck_clean(extract_partition(tmp_path / "sized.raw", tmp_path / "part.raw"))


@pytest.mark.parametrize("source, error, message", [
    ("fat:12:{tree}", NoSpace, "does not fit in FAT12"),
    ("fat:floppy:{tree}", NoSpace, "does not fit on a floppy"),
    ("fat:floppy:32:{tree}", UsageError, "FAT32"),
    ("fat:{tree}/missing", ImgfsError, "missing"),
    ('json:{{"driver": "fat", "dir": "{tree}", "size": "3M"}}', NoSpace, "does not fit"),
    ('json:{{"driver": "fat", "dir": "{tree}", "fat-type": 14}}', UsageError, "fat-type"),
    ('json:{{"driver": "fat", "dir": "{tree}", "label": "far too long label"}}',
     UsageError, "label"),
])
def test_refusals(tmp_path: Path, source: str, error: type, message: str) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "big.bin").write_bytes(random_bytes(20 * MiB, 3))
    with pytest.raises(error, match=message):
        trio.run(_open, source.format(tree=tree))


def test_cli_refuses_with_one_line(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "big.bin").write_bytes(random_bytes(3 * MiB, 3))
    from tests.conftest import imgfs
    result = imgfs("info", f"fat:floppy:{tree}", check=False)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "does not fit on a floppy" in result.stderr
    assert isinstance(result, subprocess.CompletedProcess)


def test_rw_through_the_api_and_a_refused_sync(tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    tree = make_tree(tmp_path / "tree", many=3)
    before = host_listing(tree)
    caplog.set_level(logging.INFO, logger="imgfs")

    async def main() -> None:
        node = await open_image(f"fat:rw:{tree}", OpenContext())
        try:
            assert not node.read_only
            driver = fat_driver(node)
            image = driver.image
            fat = (image.partition_start + image.volume.first_fat_sector) * 512
            # Rewrite README.TXT's data in place (same size): applied on flush.
            readme = next(n for n in image.nodes if n.name == "README.TXT")
            where = (image.partition_start + image.volume.cluster_sector(
                readme.first_cluster)) * 512
            await node.write(where, b"PLAIN")
            await node.flush()
            assert (tree / "README.TXT").read_bytes() == b"PLAIN 8.3 name\n"
            # Break every chain in both FATs: the next flush is refused.
            await node.write(fat + 6, bytes(100))
            await node.write(fat + image.volume.fat_sectors * 512 + 6, bytes(100))
            await node.flush()
            assert any("not consistent" in r.getMessage() for r in caplog.records)
            assert await node.read(fat + 6, 100) == bytes(100)
        finally:
            await node.aclose()
    trio.run(main)
    before["README.TXT"] = b"PLAIN 8.3 name\n"
    assert host_listing(tree) == before
