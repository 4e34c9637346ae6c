"""Keep wanted images present and pinned, pulling through the CRI.

A scheduler thread decides what is due (pure helpers in status.py); at most
``concurrency`` worker threads (daemon threads, so exit never waits for a
pull) check (CRI ImageStatus) and pull (CRI PullImage). Digest
references are done once present; tag references are pulled again every
refresh interval so a moved tag is followed. Failures back off: transient
ones (registry down, timeouts) briefly, permanent ones (not found,
unauthorized, invalid) for long, with the reason in the status.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import structlog

from agent.containerd.cri import CriImage
from agent.errors import AgentError
from agent.image.labels import PINNED_LABEL, PINNED_VALUE
from agent.image.lists import Entry, Problem
from agent.pull import auth
from agent.pull.status import (
    Failure,
    PullState,
    PullStatus,
    classify,
    is_digest_ref,
    retry_delay,
)

__all__ = [
    "Failure",
    "PullClient",
    "PullState",
    "PullStatus",
    "Puller",
    "classify",
    "is_digest_ref",
    "retry_delay",
]


class PullClient(Protocol):
    """What the puller needs of containerd: the CRI image service and image labels.

    :class:`agent.containerd.Containerd` is one; tests use doubles checked against it.
    """

    def cri_image_status(self, ref: str) -> CriImage | None: ...

    def cri_pull(
        self,
        ref: str,
        *,
        username: str = "",
        password: str = "",
        server: str = "",
        identity_token: str = "",
        timeout: float | None = None,
    ) -> str: ...

    def label_image(self, name: str, labels: dict[str, str]) -> None: ...

    def unlabel_image(self, name: str, *keys: str) -> None: ...


class Puller:
    """The wanted set (union of all sources) and the work of keeping it present."""

    def __init__(
        self,
        client: PullClient,
        *,
        credentials: dict[str, auth.Credentials],
        concurrency: int = 3,
        timeout_s: float = 1800.0,
        refresh_s: float = 3600.0,
        log: structlog.typing.FilteringBoundLogger,
        on_change: Callable[[], None] = lambda: None,
        protected: Callable[[], set[str]] = set,
        observe: Callable[[str, float | None], None] = lambda outcome, seconds: None,
    ) -> None:
        self.client = client
        self.credentials = credentials
        self.concurrency = max(1, concurrency)
        self.timeout_s = timeout_s
        self.refresh_s = refresh_s
        self.log = log
        self.on_change = on_change
        self.protected = protected
        self.observe = observe
        self.sources: dict[str, tuple[list[Entry], list[Problem]]] = {}
        self.status: dict[str, PullStatus] = {}
        # The one lock over all of the puller's state (sources, status). It is
        # never held across a call to containerd or to ``protected``: pins and
        # unpins look at the state again after each call instead (see _unpin).
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._schedule, name="pull-scheduler", daemon=True)
        self._rng = random.Random()  # noqa: S311 - retry jitter, not a secret

    # -- the wanted set ---------------------------------------------------------

    def set_source(self, source: str, entries: list[Entry], problems: list[Problem]) -> None:
        """Replace what ``source`` asks for (an empty list removes the source)."""
        for p in problems:
            self.log.warning("pull_list.invalid_line", file=p.source, line=p.line, error=p.reason)
        removed: list[str] = []
        with self._cond:
            if entries or problems:
                self.sources[source] = (entries, problems)
            else:
                self.sources.pop(source, None)
            wanted: dict[str, list[str]] = {}
            for ents, _ in self.sources.values():
                for e in ents:
                    wanted.setdefault(e.ref, []).append(e.where)
            for ref in list(self.status):
                if ref not in wanted:
                    removed.append(ref)
                    del self.status[ref]
            for ref, where in wanted.items():
                st = self.status.get(ref)
                if st is None:
                    self.status[ref] = PullStatus(ref, where)
                else:
                    st.sources = where
            self._cond.notify_all()
        for ref in removed:
            self._unpin(ref)
        self.on_change()

    def wanted(self) -> set[str]:
        with self._cond:
            return set(self.status)

    def problems(self) -> list[Problem]:
        with self._cond:
            return [p for _, probs in self.sources.values() for p in probs]

    def snapshot(self) -> list[dict[str, Any]]:
        """Every wanted image and every invalid line, for ``image-agent status``."""
        with self._cond:
            rows = [st.to_json() for st in sorted(self.status.values(), key=lambda s: s.image)]
            rows.extend(
                {
                    "image": p.text,
                    "state": str(PullState.INVALID),
                    "source": f"{p.source}:{p.line}",
                    "attempts": 0,
                    "last_error": p.reason,
                    "next_retry_at": None,
                    "duration_s": None,
                    "image_id": "",
                }
                for p in self.problems()
            )
        return rows

    # -- running ------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Hand out no more work. Pulls under way are not waited for.

        Each pull runs on a daemon thread of its own, so one that takes
        until its deadline (``timeout_s``) never holds up the process's exit,
        and that exit ends it (containerd sees the connection go).
        """
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _schedule(self) -> None:
        """Hand due images to the workers, at most ``concurrency`` at a time."""
        with self._cond:
            while not self._stop:
                now = time.monotonic()
                free = self.concurrency - sum(1 for st in self.status.values() if st.busy)
                due = sorted(
                    (st for st in self.status.values() if not st.busy and st.due <= now),
                    key=lambda st: (st.due, st.image),
                )
                for st in due[: max(0, free)]:
                    st.busy = True
                    # At most ``concurrency`` at a time (``busy``), daemon
                    # threads so that interpreter exit never joins a pull.
                    threading.Thread(
                        target=self._work, args=(st.image, st), name="pull", daemon=True
                    ).start()
                later = [
                    st.due for st in self.status.values() if not st.busy and now < st.due < math.inf
                ]
                # More due than free workers: wait for one to finish (it notifies).
                timeout = None if len(due) > free or not later else min(later) - now
                self._cond.wait(timeout)

    def _work(self, ref: str, st: PullStatus) -> None:
        """One check-and-pull of ``ref`` on a worker thread; never lets an exception escape.

        ``st`` is the status the scheduler handed out. If a list dropped the
        image meanwhile (or dropped and added it again, which makes a new
        status), the outcome is logged and counted but changes nothing.
        """
        started = time.monotonic()
        try:
            outcome, image_id = self._ensure(ref, st)
        except AgentError as err:
            self._failed(ref, st, classify(err))
        except Exception as err:  # a bug: must not vanish with the thread
            self.log.exception("pull.crashed", image=ref, error=f"{type(err).__name__}: {err}")
            self._failed(ref, st, Failure(False, f"internal error: {type(err).__name__}: {err}"))
        else:
            self._succeeded(ref, st, outcome, image_id, time.monotonic() - started)
        finally:
            with self._cond:
                st.busy = False
                self._cond.notify_all()
            self._changed()

    def _changed(self) -> None:
        try:
            self.on_change()
        except Exception as err:
            self.log.exception("pull.on_change_failed", error=f"{type(err).__name__}: {err}")

    def _failed(self, ref: str, st: PullStatus, failure: Failure) -> None:
        with self._cond:
            current = self.status.get(ref) is st
            if current:
                st.failures += 1
                st.attempts += 1
                st.last_error = failure.reason
                st.state = PullState.FAILED if failure.permanent else PullState.RETRYING
                delay = retry_delay(st.failures, failure.permanent, self._rng)
                st.due = time.monotonic() + delay
                st.next_retry_at = time.time() + delay
        self.observe("failed" if failure.permanent else "retrying", None)
        if current:
            self.log.warning(
                "pull.failed",
                image=ref,
                error=failure.reason,
                permanent=failure.permanent,
                retry_in_s=round(delay, 1),
            )
        else:
            self.log.warning(
                "pull.failed",
                image=ref,
                error=failure.reason,
                permanent=failure.permanent,
                dropped=True,
            )

    def _succeeded(
        self, ref: str, st: PullStatus, outcome: str, image_id: str, seconds: float
    ) -> None:
        with self._cond:
            if self.status.get(ref) is st:
                st.state = PullState(outcome)
                st.image_id = image_id
                st.failures = 0
                st.last_error = ""
                st.next_retry_at = None
                if outcome == PullState.PULLED:
                    st.attempts += 1
                    st.duration_s = round(seconds, 3)
                st.due = math.inf if is_digest_ref(ref) else time.monotonic() + self.refresh_s
        self.observe(outcome, seconds if outcome == PullState.PULLED else None)
        if outcome == PullState.PULLED:
            self.log.info("pull.done", image=ref, digest=image_id, duration_s=round(seconds, 3))

    # -- one image ------------------------------------------------------------------

    def ensure(self, ref: str) -> tuple[str, str]:
        """Make ``ref`` present and pinned; returns (``present``|``pulled``, image id).

        For ``image-agent pull``: pins whether or not a list wants ``ref``.
        """
        return self._ensure(ref, None)

    def _ensure(self, ref: str, st: PullStatus | None) -> tuple[str, str]:
        """Make ``ref`` present and pinned (with ``st``: only while a list still wants it).

        A present digest reference is done. A present tag is pulled again only
        when it was seen before (a refresh), to follow a moved tag.
        """
        with self._cond:
            refreshing = st is not None and st.state in (PullState.PRESENT, PullState.PULLED)
            if st is not None and not refreshing and self.status.get(ref) is st:
                st.state = PullState.PULLING
        current = self.client.cri_image_status(ref)
        if current is not None and (is_digest_ref(ref) or not refreshing):
            self._pin(ref, st)
            return str(PullState.PRESENT), current.id
        creds = auth.for_ref(self.credentials, ref)
        self.log.info(
            "pull.started", image=ref, refresh=refreshing, authenticated=creds is not None
        )
        image_id = self.client.cri_pull(
            ref,
            username=creds.username if creds else "",
            password=creds.password if creds else "",
            identity_token=creds.identity_token if creds else "",
            timeout=self.timeout_s,
        )
        self._pin(ref, st)
        if current is not None and current.id == image_id:
            return str(PullState.PRESENT), image_id
        return str(PullState.PULLED), image_id

    def _pin(self, ref: str, st: PullStatus | None) -> None:
        """Pin ``ref``; with ``st``, only while it is still the wanted status.

        No lock is held across the label call: a list may drop the image
        while it is in flight. Looking again after the call settles that: if
        the status was dropped meanwhile, the unpin that followed the drop may
        have landed first, so it is done again.
        """
        if st is not None and not self._current(ref, st):
            self.log.info("pull.dropped", image=ref)
            return
        self.client.label_image(ref, {PINNED_LABEL: PINNED_VALUE})
        if st is not None and not self._current(ref, st):
            self.log.info("pull.dropped", image=ref)
            self._unpin(ref)

    def _current(self, ref: str, st: PullStatus) -> bool:
        with self._cond:
            return self.status.get(ref) is st

    def _wanted(self, ref: str) -> bool:
        """A list wants ``ref``, or an archive holds it (``protected``, called unlocked)."""
        with self._cond:
            if ref in self.status:
                return True
        return ref in self.protected()

    def _unpin(self, ref: str) -> None:
        """No list wants ``ref`` any more: let kubelet GC have it (unless an archive holds it).

        Runs on the caller's thread (the daemon's loop for set_source) with no
        lock held across containerd calls. A pin for the image wanted again
        may race the unpin; looking again after each call settles it, each
        call answering a change of what is wanted, so the last word is right.
        """
        try:
            while not self._wanted(ref):
                self.client.unlabel_image(ref, PINNED_LABEL)
                if not self._wanted(ref):
                    self.log.info("image.unpinned", image=ref)
                    return
                # Wanted again meanwhile: a pin may have landed before the unpin.
                self.client.label_image(ref, {PINNED_LABEL: PINNED_VALUE})
        except AgentError as err:
            self.log.warning("image.unpin_failed", image=ref, error=str(err))
