"""`imgfs info`: qemu-img's report of an image, with its key names."""
from __future__ import annotations

import json
import os
import time
from typing import Any

from .graph import child_location_name
from .node import Node

#: keys a driver's info() may set at the top level of the report; any other
#: key it returns goes under "format-specific"
TOP_LEVEL_KEYS = frozenset({"cluster-size", "dirty-flag", "encrypted", "snapshots",
                            "format-specific", "backing-filename",
                            "backing-filename-format", "full-backing-filename"})


def image_info(node: Node, filename: str) -> dict[str, Any]:
    report: dict[str, Any] = {"virtual-size": node.size, "filename": filename,
                              "format": node.format_name}
    used = node.allocated_bytes()
    if used is not None:
        report["actual-size"] = used
    extra = dict(node.driver.info())
    top = {key: extra.pop(key) for key in list(extra) if key in TOP_LEVEL_KEYS}
    if extra:
        top.setdefault("format-specific", {"type": node.format_name, "data": extra})
    report.update(top)
    refs = node.driver.child_refs()
    backing = refs.get("backing")
    if backing is not None:
        report["backing-filename"] = backing.filename
        if backing.fmt:
            report["backing-filename-format"] = backing.fmt
        full = child_location_name(node, "backing")
        if full is not None:
            report["full-backing-filename"] = full
    if node.driver.reports_dirty_flag:
        report.setdefault("dirty-flag", False)
    if report.get("snapshots"):
        report["snapshots"] = [in_order(snapshot, QEMU_SNAPSHOT_ORDER)
                               for snapshot in report["snapshots"]]
    return qemu_order(report)


#: the order qemu-img info --output=json prints the top-level keys in (it
#: follows from QEMU's dictionary, not from meaning), so that the two
#: reports of an image compare as text; other keys go before dirty-flag
QEMU_TOP_ORDER = ("backing-filename-format", "snapshots", "virtual-size", "filename",
                  "cluster-size", "format", "actual-size", "format-specific",
                  "full-backing-filename", "encrypted", "backing-filename")


#: the order of a snapshot's keys in qemu-img info --output=json
QEMU_SNAPSHOT_ORDER = ("icount", "vm-clock-nsec", "name", "date-sec", "date-nsec",
                       "vm-clock-sec", "id", "vm-state-size")


def in_order(entry: dict[str, Any], order: tuple[str, ...]) -> dict[str, Any]:
    """`entry` with the keys of `order` first, in that order."""
    rank = {key: index for index, key in enumerate(order)}
    return dict(sorted(entry.items(), key=lambda item: rank.get(item[0], len(rank))))


def qemu_order(report: dict[str, Any]) -> dict[str, Any]:
    rank = {key: index for index, key in enumerate(QEMU_TOP_ORDER)}
    last = len(rank) + 1 if "dirty-flag" in report else len(rank)
    return dict(sorted(report.items(), key=lambda item: rank.get(
        item[0], last if item[0] == "dirty-flag" else len(rank))))


def chain_info(node: Node, filename: str) -> list[dict[str, Any]]:
    reports = []
    current: Node | None = node
    name = filename
    while current is not None:
        reports.append(image_info(current, name))
        current = current.backing
        if current is not None:
            name = current.filename
    return reports


def human_size(value: int) -> str:
    """``1.5 GiB``: three significant digits, as qemu-img prints sizes (its
    next unit from 1000 of the smaller one: ``0.984 MiB``, not ``1.01e+03 KiB``)."""
    units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
    amount = float(value)
    unit = 0
    while amount >= 1000 and unit < len(units) - 1:
        amount /= 1024
        unit += 1
    if unit == 0:
        return f"{value} B"
    return f"{amount:.3g} {units[unit]}"


def render_human(report: dict[str, Any]) -> str:
    lines = [f"image: {report['filename']}",
             f"file format: {report['format']}",
             f"virtual size: {human_size(report['virtual-size'])} "
             f"({report['virtual-size']} bytes)"]
    if "actual-size" in report:
        lines.append(f"disk size: {human_size(report['actual-size'])}")
    if report.get("encrypted"):
        lines.append("encrypted: yes")
    if "cluster-size" in report:
        lines.append(f"cluster_size: {report['cluster-size']}")
    if "backing-filename" in report:
        backing = report["backing-filename"]
        full = report.get("full-backing-filename")
        shown = f"{backing} (actual path: {full})" if full and full != backing else backing
        lines.append(f"backing file: {shown}")
        if "backing-filename-format" in report:
            lines.append(f"backing file format: {report['backing-filename-format']}")
    if report.get("snapshots"):
        lines.append(render_snapshot_table(report["snapshots"]))
    specific = report.get("format-specific")
    if specific and specific.get("data"):
        lines.append("Format specific information:")
        lines.extend(_render_fields(specific["data"], indent=4))
    return "\n".join(lines)


def render_snapshot_table(snapshots: list[dict[str, Any]]) -> str:
    """qemu-img's snapshot table (``info`` and ``snapshot -l``), from the
    snapshots' JSON entries."""
    lines = ["Snapshot list:",
             f"{'ID':<9} {'TAG':<17} {'VM SIZE':>7}{'DATE':>20}{'VM CLOCK':>13}{'ICOUNT':>11}"]
    for snap in snapshots:
        date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(snap.get("date-sec", 0)))
        seconds = snap.get("vm-clock-sec", 0)
        clock = f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}." \
            f"{snap.get('vm-clock-nsec', 0) // 10**6:03d}"
        icount = str(snap["icount"]) if "icount" in snap else ""
        lines.append(f"{snap.get('id', ''):<9} {snap.get('name', ''):<17} "
                     f"{human_size(snap.get('vm-state-size', 0)):>7}"
                     f"{date:>20}{clock:>13}{icount:>11}")
    return "\n".join(lines)


def _render_fields(data: dict[str, Any], indent: int) -> list[str]:
    lines = []
    pad = " " * indent
    for key, value in data.items():
        label = key.replace("-", " ")
        if isinstance(value, dict):
            lines.append(f"{pad}{label}:")
            lines.extend(_render_fields(value, indent + 4))
        elif isinstance(value, list) and all(isinstance(item, dict) for item in value):
            # qemu-img's lists of structs (LUKS key slots): "[0]:" then the fields
            lines.append(f"{pad}{label}:")
            for index, item in enumerate(value):
                lines.append(f"{pad}    [{index}]:")
                lines.extend(_render_fields(item, indent + 8))
        elif isinstance(value, list):
            # lists of plain values (qcow2 bitmap flags): "[0]: auto"
            lines.append(f"{pad}{label}:")
            lines.extend(f"{pad}    [{index}]: {item}" for index, item in enumerate(value))
        elif isinstance(value, bool):
            lines.append(f"{pad}{label}: {'true' if value else 'false'}")
        else:
            lines.append(f"{pad}{label}: {value}")
    return lines


def render_json(report: Any) -> str:
    return json.dumps(report, indent=4)


def display_path(path: str) -> str:
    return path if not path.startswith(os.getcwd() + "/") else os.path.relpath(path)
