"""The daemon loop: watch, decide (agent.daemon.plan), import one archive at a time.

Everything it uses is passed in; agent/cli.py builds it. One thread runs the
loop and every import; watchdog's thread only queues paths.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import structlog
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from agent import lists
from agent.containerd.client import Containerd
from agent.daemon import files, plan
from agent.daemon.files import Kind
from agent.daemon.metrics import Metrics
from agent.daemon.notify import Notifier
from agent.daemon.state import Record, State, Store
from agent.errors import AgentError, ArchiveError, Cancelled, ContainerdUnavailable
from agent.importer import PINNED_LABEL, Importer, Progress
from agent.platforms import Platform
from agent.pull.engine import Puller

OWNER_LABEL = "image-agent/owner"
OWNER = "daemon"
HEARTBEAT_S = 10.0
SPACE_RETRY_S = 5.0
PROGRESS_LOG_S = 10.0


@dataclass(frozen=True)
class Settings:
    images_dir: Path
    settle_s: float
    containerd_root: Path
    delete_after_import: bool
    platforms: tuple[Platform, ...] | None
    unpack: bool


class _Handler(FileSystemEventHandler):
    def __init__(self, paths: queue.SimpleQueue[str]) -> None:
        self.paths = paths

    def on_any_event(self, event: FileSystemEvent) -> None:
        for p in (event.src_path, getattr(event, "dest_path", "")):
            if p:
                self.paths.put(os.fsdecode(p))


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
        puller: Puller | None = None,
        pull_lists: tuple[Path, ...] = (),
    ) -> None:
        self.s = settings
        self.client = client
        self.importer = importer
        self.store = store
        self.metrics = metrics
        self.notifier = notifier
        self.log = log
        self.records: dict[str, Record] = {}
        self.changed_at: dict[str, float] = {}
        self.not_before: dict[str, float] = {}
        self.paths: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.started_at = time.time()
        self.containerd_ok = False
        self.last_heartbeat = 0.0
        self.unavailable_attempts = 0
        importer.progress = self._progress
        self._last_progress_log = 0.0
        self.puller = puller
        self.pull_lists = tuple(p.absolute() for p in pull_lists)
        self._pull_list_stats: dict[Path, files.Stat | None] = {}
        self._list_seen: dict[str, plan.Seen] = {}
        self._list_due: dict[str, float] = {}  # list path -> when to look at it again
        self._pulls_lock = threading.Lock()
        if puller is not None:
            puller.on_change = self._pulls_changed
            puller.protected = self.archive_images

    # -- health ---------------------------------------------------------------

    def health(self) -> tuple[bool, str]:
        ok = self.containerd_ok
        return ok, "ok" if ok else "containerd unreachable"

    def _heartbeat(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_heartbeat < HEARTBEAT_S:
            return
        self.last_heartbeat = now
        self.notifier.send("WATCHDOG=1")
        was_ok = self.containerd_ok
        self._check_containerd()
        if self.containerd_ok and not was_ok:
            self._containerd_back()
        elif was_ok and not self.containerd_ok:
            self.log.warning("containerd.unavailable", address=self.client.address)
        pending = sum(1 for r in self.records.values() if r.state is State.PENDING)
        self.metrics.pending.set(pending)
        self.store.save_daemon(
            {
                "pid": os.getpid(),
                "started_at": self.started_at,
                "heartbeat_at": time.time(),
                "images_dir": str(self.s.images_dir),
                "containerd": "ok" if self.containerd_ok else "unreachable",
                "pending": pending,
            }
        )

    # -- the loop -------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        self.s.images_dir.mkdir(parents=True, exist_ok=True)
        self.records = self.store.load()
        observer = Observer()
        observer.schedule(_Handler(self.paths), str(self.s.images_dir), recursive=True)
        # `image-agent retry` drops a request file here; its event wakes the loop.
        self.store.requests_dir.mkdir(parents=True, exist_ok=True)
        observer.schedule(_Handler(self.paths), str(self.store.requests_dir), recursive=False)
        for parent in {p.parent for p in self.pull_lists if p.parent.is_dir()}:
            observer.schedule(_Handler(self.paths), str(parent), recursive=False)
        observer.start()
        if self.puller is not None:
            self.puller.start()
        try:
            self._startup()
            self.notifier.send("READY=1", f"STATUS=watching {self.s.images_dir}")
            self.log.info("watching", dir=str(self.s.images_dir), archives=len(self.records))
            while not stop.is_set():
                self._heartbeat()
                self._drain()
                self._recheck_lists()
                for path in self.store.take_requests():
                    self._retry(path)
                nxt = plan.next_import(
                    self.records,
                    self.changed_at,
                    self.not_before,
                    time.monotonic(),
                    self.s.settle_s,
                )
                if nxt.path is not None:
                    self._import(nxt.path, stop)
                    continue
                timeout = HEARTBEAT_S
                wakes = [w for w in (nxt.wake_at, *self._list_due.values()) if w is not None]
                if wakes:
                    timeout = min(timeout, max(0.01, min(wakes) - time.monotonic()))
                self._wait(stop, timeout)
        finally:
            self.notifier.send("STOPPING=1")
            if self.puller is not None:
                self.puller.stop()
            observer.stop()
            observer.join(timeout=5)
            self._save()
            self._heartbeat(force=True)

    def _wait(self, stop: threading.Event, timeout: float) -> None:
        """Sleep until a file event, stop, or the timeout (events are re-queued for _drain)."""
        deadline = time.monotonic() + timeout
        while not stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                self.paths.put(self.paths.get(timeout=min(left, 0.5)))
                return
            except queue.Empty:
                continue

    def _drain(self) -> None:
        seen: set[str] = set()
        while True:
            try:
                seen.add(self.paths.get_nowait())
            except queue.Empty:
                break
        for path in sorted(seen):
            p = Path(path)
            if p in self.pull_lists:
                self._load_extra_list(p)
                continue
            if not p.is_relative_to(self.s.images_dir):
                continue  # a retry request (taken by the loop) or a neighbour of a list
            if p.is_dir():
                self._scan(p)
            else:
                self._observe(p)
        if seen:
            self._save()

    # -- observing files -------------------------------------------------------

    def _startup(self) -> None:
        self._check_containerd()
        if not self.containerd_ok:
            self.log.warning("containerd.unavailable", address=self.client.address)
        self._cleanup_leases()
        for path in list(self.records):
            if not Path(path).exists():
                self._observe(Path(path))
        self._scan(self.s.images_dir)
        for p in self.pull_lists:
            self._load_extra_list(p)
        self._reconcile()
        self._save()

    def _scan(self, root: Path) -> None:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                self._observe(Path(dirpath) / name)

    def _observe(self, path: Path) -> None:
        key = str(path)
        kind = files.classify(path, self.s.images_dir)
        obs = plan.Observation(key, kind, files.stat(path), files.platform_in_name(path.name))
        before = self.records.get(key)
        after = plan.observe(before, obs, self.s.platforms)
        if kind is Kind.PULL_LIST or (before is not None and before.reason.startswith("pull list")):
            after = self._pull_list(key, before, after)
        if after is None:
            if before is not None:
                self.log.info("archive.forgotten", file=key, images=before.images)
                self.records.pop(key, None)
            return
        if after is not before:
            if after.state is State.PENDING and (
                before is None
                or before.state is not State.PENDING
                or (before.size, before.mtime_ns) != (after.size, after.mtime_ns)
            ):
                self.changed_at[key] = time.monotonic()
                self.not_before.pop(key, None)
                if before is None or before.state is not State.PENDING:
                    self.log.info(
                        "archive.pending", file=key, reason=after.reason, bytes=after.size
                    )
            elif after.state is State.SKIPPED and (
                before is None or before.state is not State.SKIPPED
            ):
                self.log.info("archive.skipped", file=key, reason=after.reason)
            self.records[key] = after

    # -- pull lists ----------------------------------------------------------------

    def _pull_list(self, key: str, before: Record | None, after: Record | None) -> Record | None:
        """A .txt list in the images directory: (re)load it into the puller when it changed."""
        if self.puller is None:
            return after
        if (
            after is not None
            and before is not None
            and (before.size, before.mtime_ns) == (after.size, after.mtime_ns)
        ):
            return before
        st = None if after is None else files.Stat(after.size, after.mtime_ns)
        if not self._list_complete(key, st):
            return before  # mid-write: keep what was read last, look again once settled
        if after is None:
            self.puller.set_source(key, [], [])
            return None
        entries, problems = self._read_list(Path(key))
        self.puller.set_source(key, entries, problems)
        reason = f"pull list: {len(entries)} image(s)"
        if problems:
            reason += f", {len(problems)} invalid line(s)"
        return replace(after, reason=reason)

    def _load_extra_list(self, path: Path) -> None:
        """A --pull-list file: (re)load it when its size or mtime changed."""
        if self.puller is None:
            return
        st = files.stat(path)
        if path in self._pull_list_stats and self._pull_list_stats[path] == st:
            return
        if not self._list_complete(str(path), st):
            return
        self._pull_list_stats[path] = st
        if st is None:
            self.log.warning("pull_list.missing", file=str(path))
            self.puller.set_source(str(path), [], [])
            return
        self.puller.set_source(str(path), *self._read_list(path))

    def _list_complete(self, key: str, st: files.Stat | None) -> bool:
        seen, due = plan.list_settled(
            self._list_seen.get(key), st, time.monotonic(), time.time(), self.s.settle_s
        )
        if due is None:
            self._list_seen.pop(key, None)
            self._list_due.pop(key, None)
            return True
        self._list_seen[key] = seen
        self._list_due[key] = due
        return False

    def _recheck_lists(self) -> None:
        """Read the lists whose settle time has passed."""
        now = time.monotonic()
        due = [key for key, at in self._list_due.items() if at <= now]
        for key in due:
            p = Path(key)
            if p in self.pull_lists:
                self._load_extra_list(p)
            else:
                self._observe(p)
        if due:
            self._save()

    def _read_list(self, path: Path) -> tuple[list[lists.Entry], list[lists.Problem]]:
        try:
            text = path.read_text(errors="replace")
        except OSError as err:
            self.log.warning("pull_list.unreadable", file=str(path), error=str(err))
            return [], []
        entries, problems = lists.parse(text, str(path))
        self.log.info(
            "pull_list.loaded", file=str(path), images=len(entries), invalid=len(problems)
        )
        return entries, problems

    def archive_images(self) -> set[str]:
        """Images of imported archives: they stay pinned while their archive is present."""
        out: set[str] = set()
        for rec in list(self.records.values()):
            if rec.state is State.IMPORTED:
                out.update(rec.images)
        return out

    def _pulls_changed(self) -> None:
        assert self.puller is not None
        with self._pulls_lock:
            rows = self.puller.snapshot()
            self.store.save_pulls(rows)
        wanted = [r for r in rows if r["state"] != "invalid"]
        self.metrics.images_wanted.set(len(wanted))
        self.metrics.images_present.set(
            sum(1 for r in wanted if r["state"] in ("present", "pulled"))
        )

    def _retry(self, path: str) -> None:
        rec = self.records.get(path)
        if rec is None:
            self._observe(Path(path))
            return
        self.records[path] = replace(rec, state=State.PENDING, reason="retry requested", error="")
        self.changed_at[path] = 0.0
        self.not_before.pop(path, None)
        self.log.info("archive.retry", file=path)
        self._save()

    # -- importing ---------------------------------------------------------------

    def _import(self, path: str, stop: threading.Event) -> None:
        rec = self.records[path]
        p = Path(path)
        current = files.stat(p)
        if current is None or (current.size, current.mtime_ns) != (rec.size, rec.mtime_ns):
            self._observe(p)  # changed under us: settle again
            return
        if files.open_for_writing(p):
            self.changed_at[path] = time.monotonic()  # still being copied
            return
        if not self._enough_space(rec):
            return
        try:
            fingerprint = files.fingerprint(p)
        except OSError as err:
            self._observe(p)
            self.log.warning("archive.unreadable", file=path, error=str(err))
            return
        rec = replace(
            rec,
            state=State.IMPORTING,
            fingerprint=fingerprint,
            started_at=time.time(),
            finished_at=None,
            attempts=rec.attempts + 1,
            reason="",
            error="",
        )
        self.records[path] = rec
        self._save()
        self.log.info("import.started", file=path, bytes=rec.size, attempt=rec.attempts)
        try:
            result = self.importer.import_file(path)
        except ArchiveError as err:
            self.records[path] = replace(
                rec, state=State.FAILED, error=err.reason, finished_at=time.time()
            )
            self.metrics.failed.inc()
            self.log.error("import.failed", file=path, error=err.reason)
        except (ContainerdUnavailable, Cancelled) as err:
            self.unavailable_attempts += 1
            delay = plan.backoff(self.unavailable_attempts)
            self.not_before[path] = time.monotonic() + delay
            self.records[path] = replace(
                rec, state=State.PENDING, reason=str(err), attempts=rec.attempts - 1
            )
            self.containerd_ok = not isinstance(err, ContainerdUnavailable)
            self.log.warning("import.deferred", file=path, error=str(err), retry_in_s=delay)
        except AgentError as err:
            self.records[path] = replace(
                rec, state=State.FAILED, error=str(err), finished_at=time.time()
            )
            self.metrics.failed.inc()
            self.log.error("import.failed", file=path, error=str(err))
        else:
            self.unavailable_attempts = 0
            if not self.containerd_ok:
                self.containerd_ok = True
                self._containerd_back()
            names = [i.name for i in result.images]
            self.records[path] = replace(
                rec, state=State.IMPORTED, images=names, finished_at=time.time(), reason=""
            )
            self.metrics.imported.inc()
            self.metrics.bytes.inc(result.bytes_read)
            self.metrics.duration.observe(result.duration_s)
            self.metrics.last_success.set(time.time())
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
                    p.unlink()
                    self.records.pop(path, None)
                    self.log.info("archive.deleted", file=path)
                except OSError as err:
                    self.log.warning("archive.delete_failed", file=path, error=str(err))
        self._save()

    def _progress(self, p: Progress) -> None:
        now = time.monotonic()
        if now - self._last_progress_log >= PROGRESS_LOG_S:
            self._last_progress_log = now
            pct = round(100 * p.done / p.total, 1) if p.total else None
            self.log.info(
                "import.progress",
                file=p.file,
                bytes=p.done,
                percent=pct,
                duration_s=round(p.elapsed_s, 1),
            )
        self._heartbeat()

    def _enough_space(self, rec: Record) -> bool:
        try:
            need, _exact = files.uncompressed_size(Path(rec.path))
            st = os.statvfs(self.s.containerd_root if self.s.containerd_root.exists() else "/")
        except OSError:
            return True
        need = need * (2 if self.s.unpack else 1)
        free = st.f_bavail * st.f_frsize
        if free >= need:
            return True
        reason = (
            f"insufficient space: needs about {need >> 20} MiB in "
            f"{self.s.containerd_root}, {free >> 20} MiB free"
        )
        self.not_before[rec.path] = time.monotonic() + SPACE_RETRY_S
        if rec.reason != reason:
            self.log.warning("archive.waiting_for_space", file=rec.path, reason=reason)
            self.records[rec.path] = replace(rec, reason=reason)
            self._save()  # so `status` says why it waits
        return False

    # -- containerd-side reconciliation ---------------------------------------------

    def _containerd_back(self) -> None:
        """containerd answers again: do the start-up work that needed it."""
        self.log.info("containerd.available", address=self.client.address)
        self._cleanup_leases()
        self._reconcile()
        self._save()

    def _check_containerd(self) -> None:
        try:
            self.client.version()
            self.containerd_ok = True
        except ContainerdUnavailable:
            self.containerd_ok = False
        self.metrics.containerd_up.set(1 if self.containerd_ok else 0)

    def _cleanup_leases(self) -> None:
        """Leases of an earlier daemon that died mid-import (kill -9): release them."""
        if not self.containerd_ok:
            return
        try:
            for lease_id, labels in self.client.lease_labels().items():
                if labels.get(OWNER_LABEL) == OWNER:
                    self.client.delete_lease(lease_id)
                    self.log.info("lease.released", lease=lease_id)
        except AgentError as err:
            self.log.warning("lease.cleanup_failed", error=str(err))

    def _reconcile(self) -> None:
        """Archives whose images went missing are imported again; lost pins are restored."""
        if not self.containerd_ok:
            return
        for path, rec in list(self.records.items()):
            if rec.state is not State.IMPORTED:
                continue
            try:
                rec = plan.content_changed(rec, files.fingerprint(Path(path)))
            except OSError:
                continue
            if rec.state is State.PENDING:
                self.records[path] = rec
                self.changed_at[path] = 0.0
                self.log.info("archive.pending", file=path, reason=rec.reason)
                continue
            missing = []
            try:
                for name in rec.images:
                    image = self.client.get_image(name)
                    if image is None:
                        missing.append(name)
                    elif image.labels.get(PINNED_LABEL) != "pinned" and self.importer.options.pin:
                        self.client.label_image(name, {PINNED_LABEL: "pinned"})
                        self.log.info("image.repinned", file=path, image=name)
            except AgentError as err:
                self.log.warning("reconcile.failed", file=path, error=str(err))
                continue
            if missing:
                self.records[path] = replace(rec, state=State.PENDING, reason="images missing")
                self.changed_at[path] = 0.0
                self.log.info("archive.pending", file=path, reason="images missing", image=missing)

    def _save(self) -> None:
        self.store.save(self.records)


def status_doc(store: Store) -> dict[str, Any]:
    """What ``image-agent status`` shows: daemon health and every archive record."""
    info = store.load_daemon()
    daemon: dict[str, Any] = {"running": False}
    if info:
        alive = _pid_alive(int(info.get("pid", 0)))
        fresh = time.time() - float(info.get("heartbeat_at", 0)) < 3 * HEARTBEAT_S
        daemon = {
            **info,
            "running": alive,
            "healthy": alive and fresh and info.get("containerd") == "ok",
        }
    archives = sorted(store.load().values(), key=lambda r: (r.mtime_ns, r.path))
    return {
        "daemon": daemon,
        "archives": [r.to_json() for r in archives],
        "pulls": store.load_pulls(),
    }


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


__all__ = ["OWNER", "OWNER_LABEL", "Daemon", "Kind", "Settings", "status_doc"]
