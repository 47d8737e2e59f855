"""What `imgfs check` reports, as qemu-img check reports it.

A driver's consistency check returns a `CheckResult` and prints nothing;
`render_human`, `render_json` and `exit_code` turn it into qemu-img's text,
JSON and exit status (0 clean, 1 check failed, 2 corruptions, 3 leaks only).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class CheckResult:
    """qemu-img check's numbers (its ImageCheck), after any repair."""

    total_clusters: int = 0
    allocated: int = 0
    fragmented: int = 0
    compressed: int = 0
    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    #: what a repair fixed (the counts above are those found after it)
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    #: lines qemu-img prints on stderr (ERROR ..., Leaked cluster ...)
    messages: list[str] = field(default_factory=list)

    @property
    def repaired(self) -> bool:
        return bool(self.corruptions_fixed or self.leaks_fixed)


def exit_code(result: CheckResult) -> int:
    if result.check_errors:
        return 1
    if result.corruptions:
        return 2
    return 3 if result.leaks else 0


def render_human(result: CheckResult) -> str:
    lines = []
    if result.repaired:
        # qemu-img says this only when something was repaired
        lines += ["The following inconsistencies were found and repaired:", "",
                  f"    {result.leaks_fixed} leaked clusters",
                  f"    {result.corruptions_fixed} corruptions", "",
                  "Double checking the fixed image now..."]
    if not (result.corruptions or result.leaks or result.check_errors):
        lines.append("No errors were found on the image.")
    if result.corruptions:
        lines += ["", f"{result.corruptions} errors were found on the image.",
                  "Data may be corrupted, or further writes to the image may corrupt it."]
    if result.leaks:
        lines += ["", f"{result.leaks} leaked clusters were found on the image.",
                  "This means waste of disk space, but no harm to data."]
    if result.total_clusters and result.allocated:     # as qemu-img, only then
        lines.append(f"{result.allocated}/{result.total_clusters} = "
                     f"{100.0 * result.allocated / result.total_clusters:.2f}% allocated, "
                     f"{100.0 * result.fragmented / result.allocated:.2f}% fragmented, "
                     f"{100.0 * result.compressed / result.allocated:.2f}% compressed "
                     "clusters")
    if result.image_end_offset:
        lines.append(f"Image end offset: {result.image_end_offset}")
    return "\n".join(lines)


def render_json(result: CheckResult, filename: str, fmt: str) -> str:
    """qemu-img check --output=json: counts that are 0 are left out."""
    fields: list[tuple[str, Any]] = [
        ("image-end-offset", result.image_end_offset),
        ("compressed-clusters", result.compressed),
        ("total-clusters", result.total_clusters),
        ("corruptions", result.corruptions),
        ("corruptions-fixed", result.corruptions_fixed)]
    data: dict[str, Any] = {key: value for key, value in fields if value}
    data["check-errors"] = result.check_errors
    for key, value in (("leaks", result.leaks), ("leaks-fixed", result.leaks_fixed),
                       ("allocated-clusters", result.allocated)):
        if value:
            data[key] = value
    data.update({"filename": filename, "format": fmt})
    if result.fragmented:
        data["fragmented-clusters"] = result.fragmented
    return json.dumps(data, indent=4)


def report(result: CheckResult, filename: str, fmt: str, *, output: str = "human",
           quiet: bool = False) -> tuple[str, str]:
    """(stdout, stderr) of `imgfs check` for `result`."""
    stderr = "\n".join(result.messages)
    if output == "json":
        return render_json(result, filename, fmt), stderr
    return ("" if quiet else render_human(result)), stderr
