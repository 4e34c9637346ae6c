"""The daemon: one thread per duty, started and watched here.

- archives (agent.node.archives): files in the images directory, imports, reconcile;
- pull lists (agent.node.pull_lists): ``.txt`` lists into the puller;
- health (agent.node.health): containerd probe, metrics, status record, progress;
- watchdog: WATCHDOG=1 to systemd while every duty is alive;
- the file watcher (watchdog's observer) only queues paths for the duties.

Nothing calls back into a duty: they share events and published values.
A duty that dies is logged once (with its traceback), takes /healthz down
and stops the watchdog pings, so systemd restarts the daemon.
agent/cli/ builds every part and passes it in (the one wiring point).
"""

from __future__ import annotations

import os
import queue
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path

import structlog
from watchdog.events import (
    EVENT_TYPE_CLOSED_NO_WRITE,
    EVENT_TYPE_OPENED,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

from agent.containerd.client import Containerd
from agent.importer import Importer
from agent.node import plan
from agent.node.archives import ArchivesDuty, ImportedImages, Settings
from agent.node.beat import Heartbeats
from agent.node.files import Kind
from agent.node.health import HEARTBEAT_S, HealthDuty, ProgressSink, Watchdog
from agent.node.metrics import Metrics
from agent.node.notify import Notifier
from agent.node.pull_lists import PullListsDuty
from agent.node.reconcile import OWNER, OWNER_LABEL
from agent.node.state import Record, Store
from agent.node.status import status_doc
from agent.pull.engine import Puller

JOIN_S = 5.0  # all duties together, at stop (TimeoutStopSec is 20 s)
# Reads of the archive (ours: fingerprints, imports) are not changes.
_NOT_CHANGES = (EVENT_TYPE_OPENED, EVENT_TYPE_CLOSED_NO_WRITE)


class _Handler(FileSystemEventHandler):
    """Routes each changed path to the duties that want it (runs on the observer's thread)."""

    def __init__(
        self,
        routes: list[tuple[Callable[[Path], bool], queue.SimpleQueue[str]]],
        log: structlog.typing.FilteringBoundLogger,
    ) -> None:
        self.routes = routes
        self.log = log
        self.failed = False

    def on_any_event(self, event: FileSystemEvent) -> None:
        """Never raises: an exception here would end the watcher's thread silently.

        A failed route (the path vanished under a check) is logged once; the
        duties' periodic rescans find what the event was about.
        """
        try:
            self._route(event)
        except Exception as err:  # noqa: BLE001 - any failure would end the watcher's thread
            if not self.failed:
                self.failed = True
                # The traceback goes in its own stable key, not structlog's "exception".
                self.log.error(  # noqa: TRY400 - see above
                    "watcher.event_failed",
                    error=plan.one_line(f"{type(err).__name__}: {err}"),
                    traceback="".join(traceback.format_exception(err)),
                )

    def _route(self, event: FileSystemEvent) -> None:
        if event.event_type in _NOT_CHANGES:
            return
        for raw in (event.src_path, getattr(event, "dest_path", "")):
            if not raw:
                continue
            path = os.fsdecode(raw)
            for wants, q in self.routes:
                if wants(Path(path)):
                    q.put(path)


class _Duty:
    """A duty's thread: runs ``run(stop)``; an escaping exception is logged once."""

    def __init__(
        self,
        name: str,
        run: Callable[[threading.Event], None],
        log: structlog.typing.FilteringBoundLogger,
    ) -> None:
        self.name = name
        self._run = run
        self.log = log
        self.died = False
        self.thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._stop = threading.Event()

    def start(self, stop: threading.Event) -> None:
        self._stop = stop
        self.thread.start()

    def _main(self) -> None:
        try:
            self._run(self._stop)
        except BaseException as err:  # noqa: BLE001 - the death of any duty must be known
            self.died = True
            self.log.critical(
                "duty.died",
                duty=self.name,
                error=plan.one_line(f"{type(err).__name__}: {err}"),
                traceback="".join(traceback.format_exception(err)),
            )


class Daemon:
    def __init__(
        self,
        settings: Settings,
        client: Containerd,
        importer: Importer,
        store: Store,
        metrics: Metrics,
        notifier: Notifier,
        log: structlog.typing.FilteringBoundLogger,
        *,
        progress: ProgressSink,
        imported: ImportedImages,
        puller: Puller | None = None,
        pulls_changed: threading.Event | None = None,
        pull_lists: tuple[Path, ...] = (),
    ) -> None:
        self.s = settings
        self.client = client
        self.store = store
        self.notifier = notifier
        self.log = log
        self.puller = puller
        self.observer: BaseObserver | None = None  # the file watcher, once started
        self.beats = Heartbeats(notifier.watchdog_s)
        self.archives = ArchivesDuty(
            settings,
            importer,
            client,
            store,
            metrics,
            log,
            imported=imported,
            heartbeat=self.beats.add("archives", progress_at=lambda: progress.last_at),
        )
        self.lists = self._pull_lists(settings, puller, pull_lists, log)
        self.health_duty = HealthDuty(
            client,
            store,
            metrics,
            log,
            self.archives,
            progress,
            settings.images_dir,
            dead=self.dead,
            stuck=self.stuck,
            heartbeat=self.beats.add("health"),
            pulls=puller,
            pulls_changed=pulls_changed,
        )
        self.watchdog = Watchdog(
            notifier, plan.watchdog_interval(notifier.watchdog_s, HEARTBEAT_S), self.alive
        )
        self.duties = [
            _Duty("archives", self.archives.run, log),
            _Duty("health", self.health_duty.run, log),
            _Duty("watchdog", self.watchdog.run, log),
        ]
        if self.lists is not None:
            self.duties.append(_Duty("pull-lists", self.lists.run, log))

    def _pull_lists(
        self,
        settings: Settings,
        puller: Puller | None,
        pull_lists: tuple[Path, ...],
        log: structlog.typing.FilteringBoundLogger,
    ) -> PullListsDuty | None:
        """The pull-lists duty, when there is a puller to feed."""
        if puller is None:
            return None
        return PullListsDuty(
            puller,
            settings.images_dir,
            pull_lists,
            settings.settle_s,
            log,
            heartbeat=self.beats.add("pull-lists"),
        )

    @property
    def records(self) -> Mapping[str, Record]:
        """The archive records as last published by the archives duty (a snapshot)."""
        return self.archives.published

    def dead(self) -> list[str]:
        """Duties whose thread ended, and the file watcher if its thread did."""
        dead = [d.name for d in self.duties if d.died]
        if self.observer is not None and not self.observer.is_alive():
            dead.append("file-watcher")
        return dead

    def stuck(self) -> list[str]:
        """Duties that stopped turning (agent.node.beat: STALE_S, BUSY_STALE_S)."""
        return self.beats.stuck()

    def alive(self) -> bool:
        """What the watchdog pings on: every duty runs and has turned recently."""
        return not self.dead() and not self.stuck()

    def health(self) -> tuple[bool, str]:
        return self.health_duty.verdict()

    def _wants_archive(self, path: Path) -> bool:
        return path.is_relative_to(self.s.images_dir) or path.is_relative_to(
            self.store.requests_dir
        )

    def run(self, stop: threading.Event) -> None:
        """Run every duty until ``stop`` is set."""
        observer = self._start_watcher()
        self.health_duty.probe()  # the first verdict before anything else runs
        if self.puller is not None:
            self.puller.start()
        started = False
        try:
            for duty in self.duties:
                duty.start(stop)
            started = True
            self._serve(stop)
        finally:
            self._shut_down(stop, observer, started)

    def _start_watcher(self) -> BaseObserver:
        """Create the watched directories and start the file watcher on them."""
        self.s.images_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.store.requests_dir.mkdir(parents=True, exist_ok=True)
            watch_requests = True
        except OSError as err:
            # A read-only or full state directory: retry requests are still
            # taken, at the archives duty's next turn rather than at once.
            self.log.warning("requests.unwatched", dir=str(self.store.requests_dir), error=str(err))
            watch_requests = False
        routes: list[tuple[Callable[[Path], bool], queue.SimpleQueue[str]]] = [
            (self._wants_archive, self.archives.events)
        ]
        if self.lists is not None:
            routes.append((self.lists.wants, self.lists.events))
        handler = _Handler(routes, self.log)
        observer = Observer()
        observer.schedule(handler, str(self.s.images_dir), recursive=True)
        # `image-agent retry` drops a request file here; its event wakes the archives duty.
        if watch_requests:
            observer.schedule(handler, str(self.store.requests_dir), recursive=False)
        if self.lists is not None:
            for parent in {p.parent for p in self.lists.extra if p.parent.is_dir()}:
                observer.schedule(handler, str(parent), recursive=False)
        observer.start()
        self.observer = observer
        return observer

    def _serve(self, stop: threading.Event) -> None:
        """Say READY once the archives duty has scanned and reconciled; report deaths."""
        while not self.archives.ready.wait(0.5):
            if stop.is_set() or self.dead():
                break
        self.notifier.send("READY=1", f"STATUS=watching {self.s.images_dir}")
        self.log.info("watching", dir=str(self.s.images_dir), archives=len(self.archives.published))
        reported: set[str] = set()
        while not stop.wait(1.0):
            for name in self.dead():
                if name not in reported:
                    reported.add(name)
                    self.notifier.send(f"STATUS=unhealthy: {name} stopped")

    def _shut_down(self, stop: threading.Event, observer: BaseObserver, started: bool) -> None:
        """Stop everything, waiting for the threads at most JOIN_S in all."""
        stop.set()
        self.archives.events.put("")  # wake the duties waiting for events
        if self.lists is not None:
            self.lists.events.put("")
        self.notifier.send("STOPPING=1")
        if self.puller is not None:
            self.puller.stop()
        self.observer = None  # stopped on purpose from here on
        observer.stop()
        # One deadline for all: joined one after another, each with its
        # own wait, they could outlast systemd's TimeoutStopSec.
        deadline = time.monotonic() + JOIN_S
        if started:
            for duty in self.duties:
                duty.thread.join(max(0.0, deadline - time.monotonic()))
                if duty.thread.is_alive():
                    self.log.error("duty.stuck", duty=duty.name, waited_s=JOIN_S)
        observer.join(max(0.0, deadline - time.monotonic()))


__all__ = [
    "OWNER",
    "OWNER_LABEL",
    "Daemon",
    "ImportedImages",
    "Kind",
    "ProgressSink",
    "Settings",
    "status_doc",
]
