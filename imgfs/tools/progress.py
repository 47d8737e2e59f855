"""qemu-img's ``-p`` progress line, shared by the tools that copy or compare."""
from __future__ import annotations

import sys


class Progress:
    """Print ``    (P/100%)`` as qemu-img does, when enabled; `done` ends the line."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled = enabled
        self.total = total

    def update(self, position: int) -> None:
        if self.enabled:
            share = 100.0 * position / self.total if self.total else 100.0
            print(f"    ({share:.2f}/100%)", end="\r", file=sys.stdout, flush=True)

    def done(self) -> None:
        if self.enabled:
            self.update(self.total)
            print(file=sys.stdout)
