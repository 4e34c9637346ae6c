"""A cheap phase timeline of one import, as debug-level log events.

Each event carries ``t_s``, seconds since the import started, and, for a
phase that has run, its ``duration_s``; layers also carry the worker that
applied them and the time spent in Prepare, Apply and Commit. Nothing is
formatted unless the log level is ``debug`` (``image-agent import
--log-level debug``); ``bench.import_bench --trace FILE`` collects them.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

from agent import logs


class Timeline:
    """Where one import's time goes: ``phase`` spans and single ``event`` marks."""

    def __init__(self, file: str = "") -> None:
        self.file = file
        self.started = time.monotonic()
        self._log = logs.get("image-agent.trace")

    def now(self) -> float:
        return time.monotonic() - self.started

    def event(self, event: str, **fields: Any) -> None:
        self._log.debug(
            event,
            file=self.file,
            t_s=round(self.now(), 4),
            thread=threading.current_thread().name,
            **fields,
        )

    @contextlib.contextmanager
    def phase(self, name: str, **fields: Any) -> Iterator[None]:
        """Log ``name`` once it ends, with its start and duration (also when it fails)."""
        start = self.now()
        try:
            yield
        finally:
            end = self.now()
            self._log.debug(
                f"phase {name}",
                file=self.file,
                t_s=round(start, 4),
                duration_s=round(end - start, 4),
                thread=threading.current_thread().name,
                **fields,
            )


# The timeline of code that is not handed one (verify's store, tests).
QUIET = Timeline()
