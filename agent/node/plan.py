"""Pure decisions of the daemon: what an observed file means, and what to import next."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import StrEnum

from agent.image.platforms import Platform
from agent.node.files import Kind, Stat
from agent.node.state import Record, State

PULL_LIST_REASON = "pull list (pre-pull handles these; not imported as an archive)"
# Imports in a row that the daemon did not survive (crash, OOM kill) before the
# archive is taken for the cause and set aside, so the queue moves on.
MAX_INTERRUPTED = 3


@dataclass(frozen=True)
class Observation:
    path: str
    kind: Kind
    stat: Stat | None  # None: the file is gone
    named_platform: Platform | None = None


def observe(
    record: Record | None, obs: Observation, node: tuple[Platform, ...] | None
) -> Record | None:
    """The record after seeing ``obs``; None means forget the file.

    A new or changed file (size or mtime) becomes pending; an unchanged one
    keeps its state, so a failed archive is not retried until it changes.
    """
    if obs.stat is None or obs.kind is Kind.IGNORED:
        return None
    size, mtime = obs.stat.size, obs.stat.mtime_ns
    changed = record is None or (record.size, record.mtime_ns) != (size, mtime)
    if obs.kind is Kind.PULL_LIST:
        return Record(obs.path, size, mtime, State.SKIPPED, reason=PULL_LIST_REASON)
    if (
        obs.named_platform is not None
        and node is not None
        and not any(n.matches(obs.named_platform) for n in node)
    ):
        wanted = ", ".join(str(n) for n in node)
        return Record(
            obs.path,
            size,
            mtime,
            State.SKIPPED,
            reason=f"archive is named for {obs.named_platform}; this node imports {wanted}",
        )
    if record is None or changed:
        return Record(
            obs.path, size, mtime, State.PENDING, reason="new" if record is None else "changed"
        )
    if record.state is State.IMPORTING:
        return interrupted(record)
    return record


def interrupted(record: Record) -> Record:
    """A record found ``importing`` at start: the daemon died during that import.

    Imported again, unless this keeps happening: after MAX_INTERRUPTED in a
    row the archive is the probable cause (it drives the daemon out of memory,
    say) and is marked failed until it changes or ``retry`` is asked.
    """
    count = record.interrupted + 1
    if count >= MAX_INTERRUPTED:
        return replace(
            record,
            state=State.FAILED,
            interrupted=count,
            reason="",
            error=(
                f"the daemon stopped during {count} imports of this archive in a row "
                "(killed, out of memory?); set aside as the probable cause"
            ),
        )
    return replace(record, state=State.PENDING, interrupted=count, reason="interrupted")


def content_changed(record: Record, fingerprint: str) -> Record:
    """A same-size, same-mtime file whose content differs is a new archive."""
    if record.fingerprint and record.fingerprint != fingerprint:
        return replace(
            record,
            state=State.PENDING,
            fingerprint=fingerprint,
            reason="content changed",
            attempts=0,
            error="",
        )
    return record


@dataclass(frozen=True)
class Next:
    path: str | None  # import this now
    wake_at: float | None  # else: when something may become ready


def next_import(
    records: Mapping[str, Record],
    changed_at: Mapping[str, float],
    not_before: Mapping[str, float],
    now: float,
    settle: float,
) -> Next:
    """The oldest (mtime, then name) pending archive, once settled; else when to look again.

    An older archive still settling holds back newer ones, so images appear in
    mtime order. One that waits for space or for containerd does not.
    """
    pending = sorted(
        (rec.mtime_ns, path) for path, rec in records.items() if rec.state is State.PENDING
    )
    wake: float | None = None
    for _, path in pending:
        settled_at = changed_at.get(path, 0.0) + settle
        if settled_at > now:
            return Next(None, settled_at if wake is None else min(wake, settled_at))
        retry_at = not_before.get(path, 0.0)
        if retry_at > now:
            wake = retry_at if wake is None else min(wake, retry_at)
            continue
        return Next(path, None)
    return Next(None, wake)


@dataclass(frozen=True)
class Seen:
    """A pull list's stat as first seen, and when (monotonic seconds)."""

    stat: Stat | None
    since: float


def list_settled(
    seen: Seen | None, stat: Stat | None, now: float, wall: float, settle: float
) -> tuple[Seen, float | None]:
    """Whether a pull list may be read now: (what to remember, None or when to look again).

    A list is read whole, and an editor or ``echo >`` truncates it before
    writing, so a list read mid-write would drop images (and unpin them).
    It is read once its size and mtime have held for ``settle`` seconds, or
    at once when it was last modified at least that long ago (a list already
    in place at start). A vanished list must stay gone for ``settle`` too.
    """
    if seen is None or seen.stat != stat:
        seen = Seen(stat, now)
    if now - seen.since >= settle:
        return seen, None
    if stat is not None and wall - stat.mtime_ns / 1e9 >= settle:
        return seen, None
    return seen, seen.since + settle


def retry_now(records: Mapping[str, Record], not_before: Mapping[str, float]) -> dict[str, float]:
    """Retry timers once containerd is back: those waiting for it are cleared.

    Archives waiting for disk space keep their timer; the others were waiting
    out a containerd backoff that no longer has a reason.
    """
    return {
        path: at
        for path, at in not_before.items()
        if path in records and records[path].reason.startswith("insufficient space")
    }


class Failure(StrEnum):
    """How an import ended, as far as deciding what to do next goes."""

    ARCHIVE = "archive"  # the archive is unusable: permanent until it changes
    UNAVAILABLE = "unavailable"  # containerd cannot be reached
    CANCELLED = "cancelled"  # the daemon is stopping
    CONTAINERD = "containerd"  # containerd refused a request
    UNEXPECTED = "unexpected"  # a defect: any other exception


@dataclass(frozen=True)
class Outcome:
    record: Record
    retry_in_s: float | None  # None: not retried until the file changes or `retry`
    counts_as_outage: bool  # an attempt that makes the containerd backoff grow


def after_failure(
    record: Record,
    failure: Failure,
    error: str,
    space_short: str | None,
    outage_attempts: int,
    now_wall: float,
) -> Outcome:
    """The record after a failed import, and when to try again.

    Only the archive's own faults (and defects) are permanent. ``space_short``
    is why containerd's disk is too full now (None if it is not): then the
    archive waits for space whatever the import said. Stopping, containerd
    being away, and containerd refusing a write (ENOSPC that has been freed
    again by the time we look) are retried.
    """
    if failure is Failure.CANCELLED:
        return Outcome(
            replace(record, state=State.PENDING, reason=error, attempts=record.attempts - 1),
            0.0,
            False,
        )
    if space_short is not None:
        return Outcome(
            replace(record, state=State.PENDING, reason=space_short, error=""),
            SPACE_RETRY_S,
            False,
        )
    if failure is Failure.UNAVAILABLE:
        delay = backoff(outage_attempts + 1)
        return Outcome(
            replace(record, state=State.PENDING, reason=error, attempts=record.attempts - 1),
            delay,
            True,
        )
    if failure is Failure.CONTAINERD:
        # containerd refused (its disk filled, a snapshotter error): not the
        # archive's fault. Retried, ever more slowly, with the reason shown.
        delay = backoff(record.attempts, base=CONTAINERD_RETRY_S, cap=CONTAINERD_RETRY_CAP_S)
        return Outcome(
            replace(record, state=State.PENDING, reason=one_line(error), error=""),
            delay,
            False,
        )
    return Outcome(
        replace(record, state=State.FAILED, error=one_line(error), finished_at=now_wall),
        None,
        False,
    )


SPACE_RETRY_S = 5.0
CONTAINERD_RETRY_S = 5.0
CONTAINERD_RETRY_CAP_S = 600.0


def one_line(text: str, limit: int = 400) -> str:
    """``text`` on one line (control characters escaped), cut to ``limit`` characters."""
    out = escape(" ".join(text.split()))
    return out if len(out) <= limit else out[: limit - 1] + "…"


def escape(text: str) -> str:
    """Control characters (a newline in a file name) shown as escapes, never raw."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def health(
    containerd_ok: bool, dead: list[str], state_error: str, stuck: list[str] | None = None
) -> tuple[bool, str]:
    """/healthz: ok only if containerd answers, every duty runs and turns, state is writable."""
    problems = [f"{name} stopped" for name in dead]
    problems += [f"{name} not responding" for name in stuck or []]
    if not containerd_ok:
        problems.append("containerd unreachable")
    if state_error:
        problems.append(f"state not writable: {state_error}")
    return (not problems, "; ".join(problems) or "ok")


def watchdog_interval(watchdog_s: float, default: float) -> float:
    """How often to send WATCHDOG=1: half of systemd's WATCHDOG_USEC (or ``default``)."""
    return watchdog_s / 2 if watchdog_s > 0 else default


def probe_interval(containerd_ok: bool, up_s: float = 10.0, down_s: float = 1.0) -> float:
    """containerd is probed often while it is away, so its return is noticed at once."""
    return up_s if containerd_ok else down_s


# Backoff exponents stop growing here: 2**32 s is far beyond any cap, and a
# count that kept growing (days of outage) would overflow a float.
MAX_BACKOFF_EXPONENT = 32
# Counters that only feed a backoff stop here.
MAX_COUNT = 1_000_000


def backoff(attempt: int, base: float = 1.0, cap: float = 60.0) -> float:
    """Capped exponential backoff: 1, 2, 4, ... seconds up to ``cap``, for any attempt count."""
    exponent = min(max(0, attempt - 1), MAX_BACKOFF_EXPONENT)
    return float(min(cap, base * 2.0**exponent))


def stale(
    beats: Mapping[str, tuple[float, bool]], now: float, window_s: float, busy_window_s: float
) -> list[str]:
    """The duties whose last sign of life is too old: (last beat, busy in a long call) by name.

    A duty inside a long call (an import: a big layer can unpack for minutes
    without a progress report) gets ``busy_window_s``; otherwise ``window_s``.
    """
    return sorted(
        name
        for name, (at, busy) in beats.items()
        if now - at > (busy_window_s if busy else window_s)
    )
