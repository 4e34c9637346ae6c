"""The health duty: containerd probe, metrics, progress lines, the daemon's status record.

It runs on its own thread and schedule, whatever an import is doing, and
only reads what the other duties publish. The systemd watchdog has its own
small thread (:class:`Watchdog`) that never blocks, so a slow probe cannot
starve it.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import structlog

from agent.errors import ContainerdError, ContainerdUnavailable
from agent.importer import Progress
from agent.node import plan
from agent.node.archives import ArchivesDuty
from agent.node.beat import Heartbeat
from agent.node.metrics import Metrics
from agent.node.notify import Notifier
from agent.node.state import StateError

HEARTBEAT_S = 10.0  # the status record is rewritten this often
TICK_S = 1.0
PROGRESS_LOG_S = 10.0


class ProgressSink:
    """Where the importer reports progress: it only keeps the latest report (thread-safe)."""

    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._latest: Progress | None = None
        self._count = 0
        self.monotonic = monotonic
        self.last_at = float("-inf")  # monotonic time of the last report (a sign of life)

    def __call__(self, progress: Progress) -> None:
        with self._lock:
            self._latest = progress
            self._count += 1
            self.last_at = self.monotonic()

    def latest(self) -> tuple[int, Progress | None]:
        """How many reports so far, and the last one."""
        with self._lock:
            return self._count, self._latest


class Probe(Protocol):
    @property
    def address(self) -> str: ...

    def version(self) -> str: ...


class StatusStore(Protocol):
    def save_daemon(self, info: dict[str, Any]) -> None: ...

    def save_pulls(self, rows: list[dict[str, Any]]) -> None: ...


class PullTable(Protocol):
    def snapshot(self) -> list[dict[str, Any]]: ...


class HealthDuty:
    name = "health"

    def __init__(
        self,
        client: Probe,
        store: StatusStore,
        metrics: Metrics,
        log: structlog.typing.FilteringBoundLogger,
        archives: ArchivesDuty,
        progress: ProgressSink,
        images_dir: Path,
        *,
        dead: Callable[[], list[str]] = list,
        stuck: Callable[[], list[str]] = list,
        heartbeat: Heartbeat | None = None,
        pulls: PullTable | None = None,
        pulls_changed: threading.Event | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.store = store
        self.metrics = metrics
        self.log = log
        self.archives = archives
        self.progress = progress
        self.images_dir = images_dir
        self.dead = dead
        self.stuck = stuck
        self.heartbeat = heartbeat or Heartbeat(monotonic)
        self.pulls = pulls
        self.pulls_changed = pulls_changed or threading.Event()
        self.monotonic = monotonic
        self.wall = wall
        self.started_at = wall()
        self.containerd_ok: bool | None = None  # None: not probed yet
        self.probe_error = ""  # why the last probe failed, logged when it changes
        self.state_error = ""
        self._probe_at = 0.0
        self._status_at = 0.0
        self._progress_seen = 0
        self._progress_log_at = 0.0

    def verdict(self) -> tuple[bool, str]:
        """What /healthz says."""
        state_error = self.archives.state_error or self.state_error
        return plan.health(bool(self.containerd_ok), self.dead(), state_error, self.stuck())

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.heartbeat.beat()
            wait = self.tick()
            self.heartbeat.beat()
            stop.wait(wait)
        self.write_status()

    def tick(self) -> float:
        """Probe, publish, write what is due. Seconds until the next tick."""
        now = self.monotonic()
        if now >= self._probe_at:
            self.probe()
            self._probe_at = now + plan.probe_interval(bool(self.containerd_ok))
        self._log_progress(now)
        self.metrics.pending.set(self.archives.pending)
        if self.pulls is not None and self.pulls_changed.is_set():
            self._write_pulls(self.pulls)
        if now >= self._status_at:
            self.write_status()
            self._status_at = now + (HEARTBEAT_S if not self.state_error else 2.0)
        return TICK_S

    def probe(self) -> None:
        """Ask containerd its version: any error of containerd's is "not ok", never an exception."""
        was = self.containerd_ok
        error = ""
        try:
            self.client.version()
            ok = True
        except ContainerdUnavailable:
            ok = False
        except ContainerdError as err:
            # Answered, but not as it should (a stream reset, UNIMPLEMENTED):
            # unusable as well. The reason is logged each time it changes.
            ok = False
            error = plan.one_line(str(err))
            if error != self.probe_error:
                self.log.warning(
                    "containerd.probe_failed", address=self.client.address, error=error
                )
        self.probe_error = error
        self.containerd_ok = ok
        self.metrics.containerd_up.set(1 if ok else 0)
        if ok and was is False:
            self.log.info("containerd.available", address=self.client.address)
            self.archives.containerd_back.set()
            self.archives.events.put("")  # wake the archives duty
        elif not ok and was is not False:
            self.log.warning("containerd.unavailable", address=self.client.address)

    def _log_progress(self, now: float) -> None:
        count, p = self.progress.latest()
        if p is None or count == self._progress_seen or now < self._progress_log_at:
            return
        self._progress_seen = count
        self._progress_log_at = now + PROGRESS_LOG_S
        pct = round(100 * p.done / p.total, 1) if p.total else None
        self.log.info(
            "import.progress",
            file=p.file,
            bytes=p.done,
            percent=pct,
            duration_s=round(p.elapsed_s, 1),
        )

    def _write_pulls(self, pulls: PullTable) -> None:
        self.pulls_changed.clear()
        rows = pulls.snapshot()
        wanted = [r for r in rows if r["state"] != "invalid"]
        self.metrics.images_wanted.set(len(wanted))
        self.metrics.images_present.set(
            sum(1 for r in wanted if r["state"] in ("present", "pulled"))
        )
        try:
            self.store.save_pulls(rows)
        except StateError as err:
            self.pulls_changed.set()  # written with the next tick that can
            self._failed(err)

    def write_status(self) -> None:
        _ok, text = self.verdict()
        info = {
            "pid": os.getpid(),
            "started_at": self.started_at,
            "heartbeat_at": self.wall(),
            "images_dir": str(self.images_dir),
            "containerd": "ok" if self.containerd_ok else "unreachable",
            "pending": self.archives.pending,
            "health": text,
        }
        try:
            self.store.save_daemon(info)
        except StateError as err:
            self._failed(err)
            return
        if self.state_error:
            self.log.info("status.writable")
            self.state_error = ""

    def _failed(self, err: StateError) -> None:
        if not self.state_error:
            self.log.error("status.unwritable", error=str(err))
        self.state_error = str(err)


class Watchdog:
    """Sends WATCHDOG=1 every half WATCHDOG_USEC while every duty is alive. Never blocks."""

    name = "watchdog"

    def __init__(self, notifier: Notifier, interval_s: float, alive: Callable[[], bool]) -> None:
        self.notifier = notifier
        self.interval_s = interval_s
        self.alive = alive

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            if self.alive():
                self.notifier.send("WATCHDOG=1")
            stop.wait(self.interval_s)
