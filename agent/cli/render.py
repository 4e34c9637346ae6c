"""Human-readable output: sizes, tables and the progress line."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import TextIO

from agent.importer import Progress


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [headers, *rows]
    ]
    return "\n".join(lines)


class ProgressLine:
    """Rewrites one stderr line with bytes read, percent and MB/s (terminals only)."""

    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self.stream = stream
        self.enabled = stream.isatty()
        self.shown = False

    def __call__(self, p: Progress) -> None:
        if not self.enabled:
            return
        rate = p.done / p.elapsed_s / 1e6 if p.elapsed_s > 0 else 0.0
        pct = f" ({100 * p.done / p.total:.0f}%)" if p.total else ""
        self.stream.write(f"\r{p.file}: {human_bytes(p.done)}{pct} {rate:.1f} MB/s   ")
        self.stream.flush()
        self.shown = True

    def done(self) -> None:
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()
            self.shown = False


def since(start: float) -> float:
    return round(time.monotonic() - start, 3)
