"""A json: source's relative paths are resolved against the directory the
mount command was started in (its daemon runs in /), as every other path."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import imgfs, mounted, need, qemu_raw, run


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """sub/a.qcow2 over sub/base.qcow2, each with data of its own."""
    need("qemu-img", "qemu-io")
    sub = tmp_path / "sub"
    sub.mkdir()
    run("qemu-img", "create", "-q", "-f", "qcow2", sub / "base.qcow2", "4M")
    run("qemu-io", "-c", "write -P 1 0 1M", sub / "base.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
        sub / "a.qcow2")
    run("qemu-io", "-c", "write -P 2 512k 1M", sub / "a.qcow2")
    return sub / "a.qcow2"


@pytest.mark.parametrize("tree", [
    {"driver": "qcow2", "file": {"driver": "file", "filename": "sub/a.qcow2"}},
    {"driver": "qcow2", "file.filename": "sub/a.qcow2"},
    {"file": {"filename": "sub/a.qcow2"}},
    {"driver": "qcow2", "file": "sub/a.qcow2",
     "backing": {"driver": "qcow2", "file": {"driver": "file", "filename": "sub/base.qcow2"}}},
])
def test_relative_json_source_mounts(image: Path, tmp_path: Path, mnt: Path,
                                     tree: dict) -> None:
    expected = qemu_raw(image, tmp_path / "expected.raw")
    source = "json:" + json.dumps(tree)
    # the CLI tools read it from the same place
    assert imgfs("info", source, cwd=tmp_path).returncode == 0
    with mounted(source, mountpoint=mnt, options="ro", cwd=tmp_path):
        assert (mnt / "a.raw").read_bytes() == expected


def test_a_missing_relative_file_is_named_as_typed(image: Path, tmp_path: Path,
                                                   mnt: Path) -> None:
    source = 'json:{"driver":"qcow2","file":{"driver":"file","filename":"sub/none.qcow2"}}'
    result = imgfs("mount", source, mnt, check=False, cwd=tmp_path)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("imgfs: sub/none.qcow2: ")
