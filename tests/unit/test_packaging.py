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
