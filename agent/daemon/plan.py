"""Pure decisions of the daemon: what an observed file means, and what to import next."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from agent.daemon.files import Kind, Stat
from agent.daemon.state import Record, State
from agent.platforms import Platform

PULL_LIST_REASON = "pull list (pre-pull handles these; not imported as an archive)"


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
        # Interrupted (crash, kill -9): import again.
        return replace(record, state=State.PENDING, reason="interrupted")
    return record


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


def backoff(attempt: int, base: float = 1.0, cap: float = 60.0) -> float:
    """Capped exponential backoff: 1, 2, 4, ... seconds up to ``cap``."""
    return float(min(cap, base * 2.0 ** max(0, attempt - 1)))
