"""Heartbeats: each duty stamps one every turn; the watchdog pings only while all are fresh."""

from __future__ import annotations

import time
from collections.abc import Callable

from agent.node import plan

# A duty that has not turned for this long is taken as wedged (no watchdog
# pings, /healthz down). Every loop turns at least every 10 s when idle.
STALE_S = 60.0
# The same inside a long call (an import), where progress reports count too:
# one big layer can unpack for minutes without a report.
BUSY_STALE_S = 300.0


def _never() -> float:
    return float("-inf")


class Heartbeat:
    """When a duty last showed signs of life, and whether it is inside a long call.

    Written by the duty's own thread, read by the watchdog's: each field is
    replaced by a single assignment. ``progress_at`` is when the long call
    last reported progress (the importer's reports), also a sign of life.
    """

    def __init__(
        self,
        monotonic: Callable[[], float] = time.monotonic,
        progress_at: Callable[[], float] = _never,
    ) -> None:
        self.monotonic = monotonic
        self.progress_at = progress_at
        self.at = monotonic()
        self.busy = False

    def beat(self, busy: bool = False) -> None:
        """A turn went by; ``busy``: a call of unbounded length (an import) starts now."""
        self.at = self.monotonic()
        self.busy = busy

    def stamp(self) -> tuple[float, bool]:
        """(last sign of life, busy)."""
        busy = self.busy
        return (max(self.at, self.progress_at()) if busy else self.at), busy


class Heartbeats:
    """Every duty's heartbeat, and which are stale.

    A stamp may be as old as max(WATCHDOG_USEC, STALE_S), or max(WATCHDOG_USEC,
    BUSY_STALE_S) inside an import: a window shorter than the watchdog's
    would only make a slow turn fatal.
    """

    def __init__(
        self, watchdog_s: float = 0.0, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        self.watchdog_s = watchdog_s
        self.monotonic = monotonic
        self.beats: dict[str, Heartbeat] = {}

    def add(self, name: str, progress_at: Callable[[], float] = _never) -> Heartbeat:
        hb = Heartbeat(self.monotonic, progress_at)
        self.beats[name] = hb
        return hb

    def stuck(self) -> list[str]:
        """The duties that stopped turning."""
        return plan.stale(
            {name: hb.stamp() for name, hb in self.beats.items()},
            self.monotonic(),
            max(self.watchdog_s, STALE_S),
            max(self.watchdog_s, BUSY_STALE_S),
        )
