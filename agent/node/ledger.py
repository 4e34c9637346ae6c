"""The archive records the archives duty keeps, and what it publishes of them.

Only the archives duty's thread reads or changes a :class:`Ledger`. It holds
each archive's record with its timing (when it last changed, when it may be
tried again, how often it could not be read), writes the changed records to
the state store (at most every FLUSH_S) and publishes a snapshot for the
other threads.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

import structlog

from agent.node.state import Record, State, StateError

FLUSH_S = 1.0  # records that only track a copy in progress are written at most this often
STATE_RETRY_S = 2.0  # an unwritable state directory is tried again this often


class RecordStore(Protocol):
    """What the duty needs of :class:`agent.node.state.Store`."""

    @property
    def requests_dir(self) -> Path: ...

    def load(self) -> dict[str, Record]: ...

    def put(self, records: list[Record], deleted: list[str]) -> None: ...

    def take_requests(self) -> list[str]: ...


class Ledger:
    """Records by path, their timing, and the writing and publishing of them."""

    def __init__(
        self,
        store: RecordStore,
        log: structlog.typing.FilteringBoundLogger,
        monotonic: Callable[[], float],
        publish_images: Callable[[frozenset[str]], None],
    ) -> None:
        self.store = store
        self.log = log
        self.monotonic = monotonic
        self.publish_images = publish_images
        self.records: dict[str, Record] = {}
        self.changed_at: dict[str, float] = {}  # when the file last changed (settling)
        self.not_before: dict[str, float] = {}  # when a deferred import may be tried again
        self.unreadable: dict[str, int] = {}  # reads that failed in a row, by path
        # What other threads may read (each a single assignment, replaced whole).
        self.pending = 0
        self.state_error = ""
        self.published: Mapping[str, Record] = {}
        self._dirty: set[str] = set()
        self._deleted: set[str] = set()
        self._flush_at = 0.0
        self._changes = 0
        self._published_changes = -1

    def load(self) -> None:
        """Read the records of the last run; an unreadable state starts empty."""
        try:
            self.records = self.store.load()
        except StateError as err:
            # Imports are idempotent: forgetting costs re-imports, never a wrong image.
            # An expected condition, said in one line: no traceback.
            self.log.error("state.unreadable", error=str(err))  # noqa: TRY400 - see above
            self.state_failed(err)

    def set(self, rec: Record) -> None:
        self.records[rec.path] = rec
        self._dirty.add(rec.path)
        self._deleted.discard(rec.path)
        self._changes += 1

    def forget(self, path: str) -> None:
        self.records.pop(path, None)
        self.unreadable.pop(path, None)
        self.changed_at.pop(path, None)
        self.not_before.pop(path, None)
        self._dirty.discard(path)
        self._deleted.add(path)
        self._changes += 1

    def flush_due(self) -> float | None:
        """When unwritten records are due to be written; None if there are none."""
        return self._flush_at if self._dirty or self._deleted else None

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
            self.state_failed(err)
            return
        if self.state_error:
            self.log.info("state.writable", written=len(self._dirty) + len(self._deleted))
            self.state_error = ""
        self._dirty.clear()
        self._deleted.clear()
        self._flush_at = now + FLUSH_S

    def state_failed(self, err: StateError) -> None:
        if not self.state_error:
            self.log.error("state.unwritable", error=str(err), retry_every_s=STATE_RETRY_S)
        self.state_error = str(err)
        self._flush_at = self.monotonic() + STATE_RETRY_S

    def publish(self) -> None:
        """Replace the published snapshot, pending count and images, if anything changed."""
        if self._changes == self._published_changes:
            return
        self._published_changes = self._changes
        self.published = dict(self.records)
        self.pending = sum(1 for r in self.records.values() if r.state is State.PENDING)
        self.publish_images(
            frozenset(
                name
                for r in self.records.values()
                if r.state is State.IMPORTED
                for name in r.images
            )
        )
