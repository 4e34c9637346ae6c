"""The archives duty: watch the images directory, decide (agent.node.plan), import one at a time.

It owns the archive records: only its thread reads or changes them. Others
see what it publishes (pending count, imported images, a snapshot) and talk
to it through its event queue and the ``containerd_back`` event. Every
decision is in :mod:`agent.node.plan`; :meth:`ArchivesDuty.step` is one
turn of the loop and runs in tests without threads or sleeping.
"""

from __future__ import annotations

import os
import queue
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import structlog

from agent.errors import AgentError, ArchiveError, Cancelled, ContainerdUnavailable
from agent.image.platforms import Platform
from agent.importer import ImportResult
from agent.node import files, plan, reconcile
from agent.node.beat import Heartbeat
from agent.node.metrics import Metrics
from agent.node.state import Record, State, StateError

IDLE_WAKE_S = 10.0
FLUSH_S = 1.0  # records that only track a copy in progress are written at most this often
STATE_RETRY_S = 2.0  # an unwritable state directory is tried again this often
# The images directory is walked again this often: events lost to an inotify
# queue overflow (or a watcher that died) are found within this time.
RESCAN_S = 300.0
UNREADABLE_RETRY_S = 5.0  # first retry of an archive that cannot be read; doubles up to the cap
UNREADABLE_RETRY_CAP_S = 600.0


@dataclass(frozen=True)
class Settings:
    images_dir: Path
    settle_s: float
    containerd_root: Path
    delete_after_import: bool
    platforms: tuple[Platform, ...] | None
    unpack: bool
    pin: bool = True


class ArchiveImporter(Protocol):
    """What the duty needs of :class:`agent.importer.Importer`."""

    def import_file(self, path: str) -> ImportResult: ...


class RecordStore(Protocol):
    """What the duty needs of :class:`agent.node.state.Store`."""

    @property
    def requests_dir(self) -> Path: ...

    def load(self) -> dict[str, Record]: ...

    def put(self, records: list[Record], deleted: list[str]) -> None: ...

    def take_requests(self) -> list[str]: ...


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
        self.importer = importer
        self.client = client
        self.store = store
        self.metrics = metrics
        self.log = log
        self.imported = imported or ImportedImages()
        self.monotonic = monotonic
        self.wall = wall
        self.heartbeat = heartbeat or Heartbeat(monotonic)
        self.events: queue.SimpleQueue[str] = queue.SimpleQueue()
        # Set by the health duty when its probe sees containerd come back.
        self.containerd_back = threading.Event()
        self.ready = threading.Event()  # set once start-up (scan, reconcile) is done
        # What others may read (each a single assignment, replaced whole).
        self.pending = 0
        self.state_error = ""
        self.published: Mapping[str, Record] = {}
        # Owned by this duty's thread.
        self.records: dict[str, Record] = {}
        self.changed_at: dict[str, float] = {}
        self.not_before: dict[str, float] = {}
        self.outage_attempts = 0
        self.unreadable: dict[str, int] = {}  # reads that failed in a row, by path
        self._rescan_at = 0.0
        self._dirty: set[str] = set()
        self._deleted: set[str] = set()
        self._flush_at = 0.0
        self._leases_checked = False
        self._changes = 0
        self._published_changes = -1

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
        self.flush(force=True)

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
                self.events.put(self.events.get(timeout=left))
                return
            except queue.Empty:
                continue

    def start_up(self) -> None:
        self.s.images_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.records = self.store.load()
        except StateError as err:
            # Imports are idempotent: forgetting costs re-imports, never a wrong image.
            self.log.error("state.unreadable", error=str(err))
            self._state_failed(err)
        self._rescan()
        self.containerd_back.clear()
        self._reconcile()
        self.flush(force=True)
        self._publish()
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
        nxt = plan.next_import(self.records, self.changed_at, self.not_before, now, self.s.settle_s)
        if nxt.path is not None and not stop.is_set():
            self._import(nxt.path)
            self.flush()
            self._publish()
            return 0.0
        self.flush()
        self._publish()
        wakes = [IDLE_WAKE_S, self._rescan_at - now]
        if nxt.wake_at is not None:
            wakes.append(nxt.wake_at - now)
        if self._dirty or self._deleted:
            wakes.append(self._flush_at - now)
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
        for path in list(self.records):
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
        before = self.records.get(key)
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
                self._forget(key)
            return
        if after is before:
            return
        if after.state is State.PENDING and (
            before is None
            or before.state is not State.PENDING
            or (before.size, before.mtime_ns) != (after.size, after.mtime_ns)
        ):
            self.changed_at[key] = self.monotonic()
            self.not_before.pop(key, None)
            self.unreadable.pop(key, None)
            if before is None or before.state is not State.PENDING:
                self.log.info("archive.pending", file=key, reason=after.reason, bytes=after.size)
        elif after.state is State.SKIPPED and (before is None or before.state is not State.SKIPPED):
            self.log.info("archive.skipped", file=key, reason=after.reason)
        elif after.state is State.FAILED and (before is None or before.state is not State.FAILED):
            self.metrics.failed.inc()
            self.log.error("archive.set_aside", file=key, error=after.error)
        self._set(after)

    def _retry(self, path: str) -> None:
        rec = self.records.get(path)
        if rec is None:
            self._observe(Path(path))
            return
        self._set(
            replace(rec, state=State.PENDING, reason="retry requested", error="", interrupted=0)
        )
        self.changed_at[path] = 0.0
        self.not_before.pop(path, None)
        self.log.info("archive.retry", file=path)
        self.flush(force=True)

    # -- records --------------------------------------------------------------------------

    def _set(self, rec: Record) -> None:
        self.records[rec.path] = rec
        self._dirty.add(rec.path)
        self._deleted.discard(rec.path)
        self._changes += 1

    def _forget(self, path: str) -> None:
        self.records.pop(path, None)
        self.unreadable.pop(path, None)
        self.changed_at.pop(path, None)
        self.not_before.pop(path, None)
        self._dirty.discard(path)
        self._deleted.add(path)
        self._changes += 1

    def flush(self, force: bool = False) -> None:
        """Write the records that changed; at most every FLUSH_S unless ``force``.

        A state directory that cannot be written is logged once and tried
        again every STATE_RETRY_S; imports go on meanwhile.
        """
        if not self._dirty and not self._deleted:
            return
        now = self.monotonic()
        if now < self._flush_at and (not force or self.state_error):
            return
        try:
            self.store.put(
                [self.records[p] for p in sorted(self._dirty) if p in self.records],
                sorted(self._deleted),
            )
        except StateError as err:
            self._state_failed(err)
            return
        if self.state_error:
            self.log.info("state.writable", written=len(self._dirty) + len(self._deleted))
            self.state_error = ""
        self._dirty.clear()
        self._deleted.clear()
        self._flush_at = now + FLUSH_S

    def _state_failed(self, err: StateError) -> None:
        if not self.state_error:
            self.log.error("state.unwritable", error=str(err), retry_every_s=STATE_RETRY_S)
        self.state_error = str(err)
        self._flush_at = self.monotonic() + STATE_RETRY_S

    def _publish(self) -> None:
        if self._changes == self._published_changes:
            return
        self._published_changes = self._changes
        self.published = dict(self.records)
        self.pending = sum(1 for r in self.records.values() if r.state is State.PENDING)
        self.imported.publish(
            frozenset(
                name
                for r in self.records.values()
                if r.state is State.IMPORTED
                for name in r.images
            )
        )

    # -- importing ----------------------------------------------------------------------

    def _import(self, path: str) -> None:
        rec = self.records[path]
        p = Path(path)
        current = files.stat(p)
        if current is None or (current.size, current.mtime_ns) != (rec.size, rec.mtime_ns):
            self._observe(p)  # changed (or gone) under us: settle again
            return
        if files.open_for_writing(p):
            self.changed_at[path] = self.monotonic()  # still being copied
            return
        # Our own leftover leases (kill -9 mid-import) hold content: they go
        # before the space check, or it would wait for space they take.
        self._cleanup_leases()
        short = self._space_short(rec)
        if short is not None:
            self._wait_for_space(rec, *short)
            return
        try:
            fingerprint = files.fingerprint(p)
        except OSError as err:
            self._unreadable(rec, err)
            return
        self.unreadable.pop(path, None)
        rec = replace(
            rec,
            state=State.IMPORTING,
            fingerprint=fingerprint,
            started_at=self.wall(),
            finished_at=None,
            attempts=rec.attempts + 1,
            reason="",
            error="",
        )
        self._set(rec)
        self.flush(force=True)  # found "importing" at the next start: interrupted
        self.log.info("import.started", file=path, bytes=rec.size, attempt=rec.attempts)
        failure: plan.Failure
        self.heartbeat.beat(busy=True)  # importer progress reports count as signs of life
        try:
            result = self.importer.import_file(path)
        except ArchiveError as err:
            failure, message = plan.Failure.ARCHIVE, err.reason
        except ContainerdUnavailable as err:
            failure, message = plan.Failure.UNAVAILABLE, str(err)
        except Cancelled as err:
            failure, message = plan.Failure.CANCELLED, str(err)
        except AgentError as err:
            failure, message = plan.Failure.CONTAINERD, str(err)
        except Exception as err:  # a defect: this archive fails, the daemon goes on
            failure = plan.Failure.UNEXPECTED
            message = f"unexpected error: {type(err).__name__}: {err}"
            self.log.error(
                "import.crashed",
                file=path,
                error=plan.one_line(message),
                traceback="".join(traceback.format_exception(err)),
            )
        else:
            self._imported(rec, result)
            return
        self._failed(rec, failure, message)

    def _imported(self, rec: Record, result: ImportResult) -> None:
        path = rec.path
        self.outage_attempts = 0
        names = [i.name for i in result.images]
        self._set(
            replace(
                rec,
                state=State.IMPORTED,
                images=names,
                finished_at=self.wall(),
                reason="",
                interrupted=0,
            )
        )
        self.metrics.imported.inc()
        self.metrics.bytes.inc(result.bytes_read)
        self.metrics.duration.observe(result.duration_s)
        self.metrics.last_success.set(self.wall())
        self.log.info(
            "import.done",
            file=path,
            images=names,
            bytes=result.bytes_read,
            duration_s=round(result.duration_s, 3),
        )
        if result.not_in_cri:
            self.log.warning("import.not_in_cri", file=path, images=result.not_in_cri)
        if self.s.delete_after_import:
            try:
                Path(path).unlink()
                self._forget(path)
                self.log.info("archive.deleted", file=path)
            except OSError as err:
                self.log.warning("archive.delete_failed", file=path, error=str(err))
        self.flush(force=True)

    def _failed(self, rec: Record, failure: plan.Failure, message: str) -> None:
        path = rec.path
        short = None
        if failure not in (plan.Failure.CANCELLED, plan.Failure.UNAVAILABLE):
            space = self._space_short(rec)
            short = None if space is None else space[0]
        out = plan.after_failure(rec, failure, message, short, self.outage_attempts, self.wall())
        self._set(replace(out.record, interrupted=0))
        if out.counts_as_outage:
            self.outage_attempts = min(self.outage_attempts + 1, plan.MAX_COUNT)
            self._leases_checked = False  # its lease may have outlived it
        if out.retry_in_s is not None:
            self.not_before[path] = self.monotonic() + out.retry_in_s
        if out.record.state is State.FAILED:
            self.metrics.failed.inc()
            self.log.error("import.failed", file=path, error=out.record.error)
        elif short is not None:
            self.log.warning("import.waiting_for_space", file=path, reason=short, error=message)
        else:
            self.log.warning("import.deferred", file=path, error=message, retry_in_s=out.retry_in_s)
        self.flush(force=True)

    def _space_short(self, rec: Record) -> tuple[str, int] | None:
        """Why containerd's disk cannot take this archive now, and the MiB free; None if it can.

        The reason names only what holds still (the need, the place), so a
        free figure that moves every few seconds rewrites nothing.
        """
        try:
            need, _exact = files.uncompressed_size(Path(rec.path))
            st = os.statvfs(self.s.containerd_root if self.s.containerd_root.exists() else "/")
        except OSError:
            return None
        need = need * (2 if self.s.unpack else 1)
        free = st.f_bavail * st.f_frsize
        if free >= need:
            return None
        reason = f"insufficient space: needs about {need >> 20} MiB in {self.s.containerd_root}"
        return reason, free >> 20

    def _wait_for_space(self, rec: Record, reason: str, free_mib: int) -> None:
        self.not_before[rec.path] = self.monotonic() + plan.SPACE_RETRY_S
        if rec.reason != reason:
            self.log.warning(
                "archive.waiting_for_space", file=rec.path, reason=reason, free_mib=free_mib
            )
            self._set(replace(rec, reason=reason))
            self.flush(force=True)  # so `status` says why it waits

    def _unreadable(self, rec: Record, err: OSError) -> None:
        """The archive can be stat'ed but not read (EIO, EACCES): retried later, ever more slowly.

        Its reason says why in ``status``; logged when the reason changes.
        """
        tries = min(self.unreadable.get(rec.path, 0) + 1, plan.MAX_COUNT)
        self.unreadable[rec.path] = tries
        delay = plan.backoff(tries, base=UNREADABLE_RETRY_S, cap=UNREADABLE_RETRY_CAP_S)
        self.not_before[rec.path] = self.monotonic() + delay
        reason = plan.one_line(f"unreadable: {err.strerror or err}")
        if rec.reason != reason:
            self.log.warning(
                "archive.unreadable", file=rec.path, error=plan.one_line(str(err)), retry_in_s=delay
            )
            self._set(replace(rec, reason=reason))
            self.flush(force=True)

    # -- containerd ------------------------------------------------------------------------

    def _containerd_back(self) -> None:
        """containerd answers again: archives waiting for it are tried at once."""
        self.heartbeat.beat(busy=True)  # a reconcile asks containerd about every image
        waiting = plan.retry_now(self.records, self.not_before)
        self.not_before = waiting
        self.outage_attempts = 0
        self._leases_checked = False
        self._reconcile()

    def _cleanup_leases(self) -> None:
        """Before the first import, release the leases our imports left behind.

        Those of an earlier daemon (kill -9), and those of an import of ours that
        containerd went away during (its lease could not be deleted then): the
        check is due again after every outage. It runs on this thread right
        before an import starts, so no import of ours is in flight; the health
        duty never touches leases.
        """
        if self._leases_checked:
            return
        try:
            released = reconcile.release_leases(self.client)
        except ContainerdUnavailable:
            return  # tried again before the next import
        except AgentError as err:
            self.log.warning("lease.cleanup_failed", error=str(err))
            released = []
        self._leases_checked = True
        for lease in released:
            self.log.info("lease.released", lease=lease)

    def _reconcile(self) -> None:
        try:
            changes = reconcile.check(self.records, self.client, self.s.pin, self.log)
        except ContainerdUnavailable:
            return  # done when the health duty sees containerd back
        for rec in changes:
            self._set(rec)
            self.changed_at[rec.path] = 0.0
            self.log.info("archive.pending", file=rec.path, reason=rec.reason)
