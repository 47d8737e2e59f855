"""What `pip install .` (and so `make install`) ships."""
from __future__ import annotations

import configparser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_driver_package_is_listed_in_setup_cfg() -> None:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    listed = set(config["options"]["packages"].split())
    on_disk = {"imgfs"} | {
        "imgfs." + ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "drivers").rglob("__init__.py")}
    assert on_disk <= listed, f"missing from setup.cfg packages: {sorted(on_disk - listed)}"


def test_every_driver_in_the_table_is_packaged_when_written() -> None:
    """A driver is its package (or module) plus one line of the table: a
    package on disk must be in setup.cfg (above), and every module the
    table names that exists must define the driver under its table name."""
    from imgfs.registry import DRIVER_TABLE, get_driver
    for entry in DRIVER_TABLE:
        written = (ROOT / "drivers" / entry.module).is_dir() or \
            (ROOT / "drivers" / f"{entry.module}.py").is_file()
        if written:
            cls = get_driver(entry.name)
            assert cls.name == entry.name and cls.kind is entry.kind, entry
