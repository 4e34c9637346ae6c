"""Importing one archive for the archives duty, and what follows a failure.

An attempt first checks the archive still is what settled (same size and
time, nobody writing it), that our leftover leases are gone and that
containerd's disk can take it; then it imports and records the outcome.
Failures are retried, backed off or set aside as :mod:`agent.node.plan`
decides. Runs on the archives duty's thread only.
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import structlog

from agent.errors import AgentError, ArchiveError, Cancelled, ContainerdUnavailable
from agent.importer import ImportResult
from agent.node import files, plan, reconcile
from agent.node.beat import Heartbeat
from agent.node.ledger import Ledger
from agent.node.metrics import Metrics
from agent.node.state import Record, State

if TYPE_CHECKING:
    from agent.node.archives import Settings

UNREADABLE_RETRY_S = 5.0  # first retry of an archive that cannot be read; doubles up to the cap
UNREADABLE_RETRY_CAP_S = 600.0


class ArchiveImporter(Protocol):
    """What the duty needs of :class:`agent.importer.Importer`."""

    def import_file(self, path: str) -> ImportResult: ...


class Attempts:
    """Import attempts, one at a time, with their retry and back-off bookkeeping."""

    def __init__(
        self,
        settings: Settings,
        importer: ArchiveImporter,
        client: reconcile.Images,
        ledger: Ledger,
        metrics: Metrics,
        log: structlog.typing.FilteringBoundLogger,
        *,
        observe: Callable[[Path], None],
        heartbeat: Heartbeat,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.s = settings
        self.importer = importer
        self.client = client
        self.ledger = ledger
        self.metrics = metrics
        self.log = log
        self.observe = observe  # looks at a path again (it changed under us)
        self.heartbeat = heartbeat
        self.monotonic = monotonic
        self.wall = wall
        self.outage_attempts = 0  # attempts failed on containerd in a row
        self.leases_checked = False

    def containerd_back(self) -> None:
        """containerd answers again: no back-off for it, leases checked again."""
        self.outage_attempts = 0
        self.leases_checked = False

    def import_one(self, path: str) -> None:
        """Import the archive at ``path`` (a pending record), unless it is not ready."""
        rec = self._ready(self.ledger.records[path])
        if rec is None:
            return
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
        except Exception as err:  # noqa: BLE001 - a defect: this archive fails, the daemon goes on
            failure = plan.Failure.UNEXPECTED
            message = f"unexpected error: {type(err).__name__}: {err}"
            # The traceback goes in its own stable key, not structlog's "exception".
            self.log.error(  # noqa: TRY400 - see above
                "import.crashed",
                file=path,
                error=plan.one_line(message),
                traceback="".join(traceback.format_exception(err)),
            )
        else:
            self._imported(rec, result)
            return
        self._failed(rec, failure, message)

    def _ready(self, rec: Record) -> Record | None:
        """The record marked importing (and written), or None if the archive must wait."""
        path = rec.path
        p = Path(path)
        current = files.stat(p)
        if current is None or (current.size, current.mtime_ns) != (rec.size, rec.mtime_ns):
            self.observe(p)  # changed (or gone) under us: settle again
            return None
        if files.open_for_writing(p):
            self.ledger.changed_at[path] = self.monotonic()  # still being copied
            return None
        # Our own leftover leases (kill -9 mid-import) hold content: they go
        # before the space check, or it would wait for space they take.
        self.cleanup_leases()
        short = self._space_short(rec)
        if short is not None:
            self._wait_for_space(rec, *short)
            return None
        try:
            fingerprint = files.fingerprint(p)
        except OSError as err:
            self._unreadable(rec, err)
            return None
        self.ledger.unreadable.pop(path, None)
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
        self.ledger.set(rec)
        self.ledger.flush(force=True)  # found "importing" at the next start: interrupted
        self.log.info("import.started", file=path, bytes=rec.size, attempt=rec.attempts)
        return rec

    def _imported(self, rec: Record, result: ImportResult) -> None:
        path = rec.path
        self.outage_attempts = 0
        names = [i.name for i in result.images]
        self.ledger.set(
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
            except OSError as err:
                self.log.warning("archive.delete_failed", file=path, error=str(err))
            else:
                self.ledger.forget(path)
                self.log.info("archive.deleted", file=path)
        self.ledger.flush(force=True)

    def _failed(self, rec: Record, failure: plan.Failure, message: str) -> None:
        path = rec.path
        short = None
        if failure not in (plan.Failure.CANCELLED, plan.Failure.UNAVAILABLE):
            space = self._space_short(rec)
            short = None if space is None else space[0]
        out = plan.after_failure(rec, failure, message, short, self.outage_attempts, self.wall())
        self.ledger.set(replace(out.record, interrupted=0))
        if out.counts_as_outage:
            self.outage_attempts = min(self.outage_attempts + 1, plan.MAX_COUNT)
            self.leases_checked = False  # its lease may have outlived it
        if out.retry_in_s is not None:
            self.ledger.not_before[path] = self.monotonic() + out.retry_in_s
        if out.record.state is State.FAILED:
            self.metrics.failed.inc()
            self.log.error("import.failed", file=path, error=out.record.error)
        elif short is not None:
            self.log.warning("import.waiting_for_space", file=path, reason=short, error=message)
        else:
            self.log.warning("import.deferred", file=path, error=message, retry_in_s=out.retry_in_s)
        self.ledger.flush(force=True)

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
        self.ledger.not_before[rec.path] = self.monotonic() + plan.SPACE_RETRY_S
        if rec.reason != reason:
            self.log.warning(
                "archive.waiting_for_space", file=rec.path, reason=reason, free_mib=free_mib
            )
            self.ledger.set(replace(rec, reason=reason))
            self.ledger.flush(force=True)  # so `status` says why it waits

    def _unreadable(self, rec: Record, err: OSError) -> None:
        """The archive can be stat'ed but not read (EIO, EACCES): retried later, ever more slowly.

        Its reason says why in ``status``; logged when the reason changes.
        """
        tries = min(self.ledger.unreadable.get(rec.path, 0) + 1, plan.MAX_COUNT)
        self.ledger.unreadable[rec.path] = tries
        delay = plan.backoff(tries, base=UNREADABLE_RETRY_S, cap=UNREADABLE_RETRY_CAP_S)
        self.ledger.not_before[rec.path] = self.monotonic() + delay
        reason = plan.one_line(f"unreadable: {err.strerror or err}")
        if rec.reason != reason:
            self.log.warning(
                "archive.unreadable", file=rec.path, error=plan.one_line(str(err)), retry_in_s=delay
            )
            self.ledger.set(replace(rec, reason=reason))
            self.ledger.flush(force=True)

    def cleanup_leases(self) -> None:
        """Before the first import, release the leases our imports left behind.

        Those of an earlier daemon (kill -9), and those of an import of ours that
        containerd went away during (its lease could not be deleted then): the
        check is due again after every outage. It runs on the duty's thread right
        before an import starts, so no import of ours is in flight; the health
        duty never touches leases.
        """
        if self.leases_checked:
            return
        try:
            released = reconcile.release_leases(self.client)
        except ContainerdUnavailable:
            return  # tried again before the next import
        except AgentError as err:
            self.log.warning("lease.cleanup_failed", error=str(err))
            released = []
        self.leases_checked = True
        for lease in released:
            self.log.info("lease.released", lease=lease)
