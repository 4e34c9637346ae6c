"""Heartbeats: each duty stamps one every turn; the watchdog pings only while all are fresh."""

from __future__ import annotations

import time
from collections.abc import Callable


class Heartbeat:
    """When a duty last showed signs of life, and whether it is inside a long call.

    Written by the duty's own thread, read by the watchdog's: each field is
    replaced by a single assignment.
    """

    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.monotonic = monotonic
        self.at = monotonic()
        self.busy = False

    def beat(self, busy: bool = False) -> None:
        """A turn went by; ``busy``: a call of unbounded length (an import) starts now."""
        self.at = self.monotonic()
        self.busy = busy

    def stamp(self) -> tuple[float, bool]:
        return self.at, self.busy
