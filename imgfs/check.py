"""What `imgfs check` reports, for every format that can be checked.

A driver's `check` returns a `CheckResult`; the command prints it in
qemu-img check's words (human or JSON) and exits with its codes.  Drivers
print nothing: the lines a repair writes as it goes are collected in
`messages`, in order, and printed on stderr by the command.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

#: qemu-img check's exit codes
CLEAN, CHECK_FAILED, CORRUPT, LEAKS_ONLY, NOT_SUPPORTED = 0, 1, 2, 3, 63


@dataclass
class CheckResult:
    """qemu-img check's numbers (ImageCheck in its JSON)."""

    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    image_end_offset: int = 0
    #: lines for stderr, in the order the check and repair produced them
    messages: list[str] = field(default_factory=list)
    #: the check could not complete (printed after `messages`, exit 1)
    failure: str | None = None

    @property
    def repaired(self) -> bool:
        """Something was fixed (qemu-img then says so and double-checks)."""
        return bool(self.leaks_fixed or self.corruptions_fixed)

    @property
    def exit_code(self) -> int:
        """0 clean, 1 check failed, 2 corruptions, 3 leaks only."""
        if self.check_errors:
            return CHECK_FAILED
        if self.corruptions:
            return CORRUPT
        return LEAKS_ONLY if self.leaks else CLEAN


def render_human(result: CheckResult) -> str:
    lines = []
    if result.repaired:
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
    allocated, total = result.allocated_clusters, result.total_clusters
    if total and allocated:     # as qemu-img, only then
        lines.append(f"{allocated}/{total} = {100.0 * allocated / total:.2f}% allocated, "
                     f"{100.0 * result.fragmented_clusters / allocated:.2f}% fragmented, "
                     f"{100.0 * result.compressed_clusters / allocated:.2f}% compressed "
                     "clusters")
    if result.image_end_offset:
        lines.append(f"Image end offset: {result.image_end_offset}")
    return "\n".join(lines)


def render_json(result: CheckResult, filename: str, fmt: str) -> str:
    """qemu-img check --output=json: as QEMU, the counts that are 0 are left out."""
    fields: list[tuple[str, int]] = [
        ("image-end-offset", result.image_end_offset),
        ("compressed-clusters", result.compressed_clusters),
        ("total-clusters", result.total_clusters),
        ("leaks", result.leaks), ("corruptions", result.corruptions),
        ("corruptions-fixed", result.corruptions_fixed)]
    data: dict[str, Any] = {key: value for key, value in fields if value}
    data["check-errors"] = result.check_errors
    if result.leaks_fixed:
        data["leaks-fixed"] = result.leaks_fixed
    if result.allocated_clusters:
        data["allocated-clusters"] = result.allocated_clusters
    data.update({"filename": filename, "format": fmt})
    if result.fragmented_clusters:
        data["fragmented-clusters"] = result.fragmented_clusters
    return json.dumps(data, indent=4)
