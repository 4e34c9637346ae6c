"""The archives duty: watch the images directory, decide (agent.node.plan), import one at a time.

It owns the archive records (:mod:`agent.node.ledger`): only its thread reads
or changes them. Others see what it publishes (pending count, imported
images, a snapshot) and talk to it through its event queue and the
``containerd_back`` event. Every decision is in :mod:`agent.node.plan`; an
import attempt and what follows it are in :mod:`agent.node.attempts`.
:meth:`ArchivesDuty.step` is one turn of the loop and runs in tests without
threads or sleeping.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import structlog

from agent.errors import ContainerdUnavailable
from agent.image.platforms import Platform
from agent.node import files, plan, reconcile
from agent.node.attempts import ArchiveImporter, Attempts
from agent.node.beat import Heartbeat
from agent.node.ledger import Ledger, RecordStore
from agent.node.metrics import Metrics
from agent.node.state import Record, State

IDLE_WAKE_S = 10.0
# The images directory is walked again this often: events lost to an inotify
# queue overflow (or a watcher that died) are found within this time.
RESCAN_S = 300.0


@dataclass(frozen=True)
class Settings:
    images_dir: Path
    settle_s: float
    containerd_root: Path
    delete_after_import: bool
    platforms: tuple[Platform, ...] | None
    unpack: bool
    pin: bool = True


class ImportedImages:
    """Images of imported archives, published by the duty for the puller (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._images: frozenset[str] = frozenset()

    def publish(self, images: frozenset[str]) -> None:
        with self._lock:
            self._images = images

    def __call__(self) -> set[str]:
        with self._lock:
            return set(self._images)


class ArchivesDuty:
    name = "archives"

    def __init__(
        self,
        settings: Settings,
        importer: ArchiveImporter,
        client: reconcile.Images,
        store: RecordStore,
        metrics: Metrics,
        log: structlog.typing.FilteringBoundLogger,
        *,
        imported: ImportedImages | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        heartbeat: Heartbeat | None = None,
    ) -> None:
        self.s = settings
        self.client = client
        self.store = store
        self.metrics = metrics
        self.log = log
        self.imported = imported or ImportedImages()
        self.monotonic = monotonic
        self.heartbeat = heartbeat or Heartbeat(monotonic)
        self.events: queue.SimpleQueue[str] = queue.SimpleQueue()
        # Set by the health duty when its probe sees containerd come back.
        self.containerd_back = threading.Event()
        self.ready = threading.Event()  # set once start-up (scan, reconcile) is done
        self.ledger = Ledger(store, log, monotonic, self.imported.publish)
        self.attempts = Attempts(
            settings,
            importer,
            client,
            self.ledger,
            metrics,
            log,
            observe=self._observe,
            heartbeat=self.heartbeat,
            monotonic=monotonic,
            wall=wall,
        )
        self._rescan_at = 0.0

    # -- what others read (published values), and the records for tests ------------------

    @property
    def pending(self) -> int:
        return self.ledger.pending

    @property
    def published(self) -> Mapping[str, Record]:
        return self.ledger.published

    @property
    def state_error(self) -> str:
        return self.ledger.state_error

    @property
    def records(self) -> dict[str, Record]:
        return self.ledger.records

    @property
    def not_before(self) -> dict[str, float]:
        return self.ledger.not_before

    @property
    def outage_attempts(self) -> int:
        return self.attempts.outage_attempts

    @outage_attempts.setter
    def outage_attempts(self, count: int) -> None:
        self.attempts.outage_attempts = count

    # -- the loop ---------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        self.heartbeat.beat(busy=True)  # the first scan and reconcile may take a while
        self.start_up()
        while not stop.is_set():
            self.heartbeat.beat()
            wait = self.step(stop)
            self.heartbeat.beat()
            if wait > 0:
                self._wait(stop, wait)
        self.ledger.flush(force=True)

    def _wait(self, stop: threading.Event, timeout: float) -> None:
        """Until an event arrives (it is put back for step), or the timeout.

        Stopping puts an empty event in the queue, so this returns at once then.
        """
        deadline = self.monotonic() + timeout
        while not stop.is_set():
            left = deadline - self.monotonic()
            if left <= 0:
                return
            try:
                event = self.events.get(timeout=left)
            except queue.Empty:
                continue
            self.events.put(event)
            return

    def start_up(self) -> None:
        self.s.images_dir.mkdir(parents=True, exist_ok=True)
        self.ledger.load()
        self._rescan()
        self.containerd_back.clear()
        self._reconcile()
        self.ledger.flush(force=True)
        self.ledger.publish()
        self.ready.set()

    def step(self, stop: threading.Event) -> float:
        """One turn: take events, maybe import one archive. Seconds until the next turn."""
        if self.containerd_back.is_set():
            self.containerd_back.clear()
            self._containerd_back()
        self._drain()
        for path in self.store.take_requests():
            self._retry(path)
        now = self.monotonic()
        if now >= self._rescan_at:
            self._rescan()
        led = self.ledger
        nxt = plan.next_import(led.records, led.changed_at, led.not_before, now, self.s.settle_s)
        if nxt.path is not None and not stop.is_set():
            self.attempts.import_one(nxt.path)
            led.flush()
            led.publish()
            return 0.0
        led.flush()
        led.publish()
        wakes = [IDLE_WAKE_S, self._rescan_at - now]
        if nxt.wake_at is not None:
            wakes.append(nxt.wake_at - now)
        flush_at = led.flush_due()
        if flush_at is not None:
            wakes.append(flush_at - now)
        return max(0.01, min(wakes))

    # -- events and files ---------------------------------------------------------------

    def _drain(self) -> None:
        seen: set[str] = set()
        while True:
            try:
                seen.add(self.events.get_nowait())
            except queue.Empty:
                break
        for path in sorted(seen):
            p = Path(path)
            if not p.is_relative_to(self.s.images_dir):
                continue  # a retry request: taken from the store
            if p.is_dir() and not p.is_symlink():
                self._scan(p)
            else:
                self._observe(p, event=True)

    def _rescan(self) -> None:
        """Look at every known path and walk the directory (start-up, then every RESCAN_S)."""
        for path in list(self.ledger.records):
            if files.stat(Path(path)) is None:
                self._observe(Path(path))
        self._scan(self.s.images_dir)
        self._rescan_at = self.monotonic() + RESCAN_S

    def _scan(self, root: Path) -> None:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                self._observe(Path(dirpath) / name)

    def _observe(self, path: Path, event: bool = False) -> None:
        key = str(path)
        kind = files.classify(path, self.s.images_dir)
        obs = plan.Observation(key, kind, files.stat(path), files.platform_in_name(path.name))
        before = self.ledger.records.get(key)
        after = plan.observe(before, obs, self.s.platforms)
        if (
            event
            and after is before
            and before is not None
            and before.state is State.IMPORTED
            and before.fingerprint
        ):
            # A write event on an imported archive whose size and mtime held
            # (``cat new > old; touch -r``): compare the content.
            try:
                after = plan.content_changed(before, files.fingerprint(path))
            except OSError:
                after = before
        if after is None:
            if before is not None:
                self.log.info("archive.forgotten", file=key, images=before.images)
                self.ledger.forget(key)
            return
        if after is not before:
            self._changed(key, before, after)

    def _changed(self, key: str, before: Record | None, after: Record) -> None:
        """Record what an observation found, logging (and counting) a change of state."""
        if after.state is State.PENDING and (
            before is None
            or before.state is not State.PENDING
            or (before.size, before.mtime_ns) != (after.size, after.mtime_ns)
        ):
            self.ledger.changed_at[key] = self.monotonic()
            self.ledger.not_before.pop(key, None)
            self.ledger.unreadable.pop(key, None)
            if before is None or before.state is not State.PENDING:
                self.log.info("archive.pending", file=key, reason=after.reason, bytes=after.size)
        elif after.state is State.SKIPPED and (before is None or before.state is not State.SKIPPED):
            self.log.info("archive.skipped", file=key, reason=after.reason)
        elif after.state is State.FAILED and (before is None or before.state is not State.FAILED):
            self.metrics.failed.inc()
            self.log.error("archive.set_aside", file=key, error=after.error)
        self.ledger.set(after)

    def _retry(self, path: str) -> None:
        rec = self.ledger.records.get(path)
        if rec is None:
            self._observe(Path(path))
            return
        self.ledger.set(
            replace(rec, state=State.PENDING, reason="retry requested", error="", interrupted=0)
        )
        self.ledger.changed_at[path] = 0.0
        self.ledger.not_before.pop(path, None)
        self.log.info("archive.retry", file=path)
        self.ledger.flush(force=True)

    # -- containerd ------------------------------------------------------------------------

    def _containerd_back(self) -> None:
        """containerd answers again: archives waiting for it are tried at once."""
        self.heartbeat.beat(busy=True)  # a reconcile asks containerd about every image
        self.ledger.not_before = plan.retry_now(self.ledger.records, self.ledger.not_before)
        self.attempts.containerd_back()
        self._reconcile()

    def _reconcile(self) -> None:
        try:
            changes = reconcile.check(self.ledger.records, self.client, self.s.pin, self.log)
        except ContainerdUnavailable:
            return  # done when the health duty sees containerd back
        for rec in changes:
            self.ledger.set(rec)
            self.ledger.changed_at[rec.path] = 0.0
            self.log.info("archive.pending", file=rec.path, reason=rec.reason)
