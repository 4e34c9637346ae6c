"""The pull-lists duty: ``.txt`` lists (images directory, ``--pull-list``) into the puller.

A list is read whole once it has held still (:func:`agent.node.plan.list_settled`),
and again whenever its size or mtime changes. Its own thread and queue.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import structlog

from agent.image import lists
from agent.node import files, plan
from agent.node.beat import Heartbeat
from agent.node.files import Kind

IDLE_WAKE_S = 10.0
RESCAN_S = 300.0  # lists whose events were lost (inotify overflow) are found within this


class Sources(Protocol):
    """What the duty needs of :class:`agent.pull.engine.Puller`."""

    def set_source(
        self, source: str, entries: list[lists.Entry], problems: list[lists.Problem]
    ) -> None: ...


class PullListsDuty:
    name = "pull-lists"

    def __init__(
        self,
        puller: Sources,
        images_dir: Path,
        extra: tuple[Path, ...],
        settle_s: float,
        log: structlog.typing.FilteringBoundLogger,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        heartbeat: Heartbeat | None = None,
    ) -> None:
        self.puller = puller
        self.images_dir = images_dir
        self.extra = tuple(p.absolute() for p in extra)
        self.settle_s = settle_s
        self.log = log
        self.monotonic = monotonic
        self.wall = wall
        self.heartbeat = heartbeat or Heartbeat(monotonic)
        self._rescan_at = 0.0
        self.events: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._loaded: dict[str, files.Stat | None] = {}  # what was last read
        self._seen: dict[str, plan.Seen] = {}
        self._due: dict[str, float] = {}  # list path -> when to look at it again

    def wants(self, path: Path) -> bool:
        """Whether an event on ``path`` concerns this duty."""
        if path in self.extra:
            return True
        if not path.is_relative_to(self.images_dir):
            return False
        return path.is_dir() or files.classify(path, self.images_dir) is Kind.PULL_LIST

    def run(self, stop: threading.Event) -> None:
        self.start_up()
        while not stop.is_set():
            self.heartbeat.beat()
            timeout = self.step()
            self.heartbeat.beat()
            with contextlib.suppress(queue.Empty):
                self.events.put(self.events.get(timeout=timeout))

    def start_up(self) -> None:
        self._rescan_at = self.monotonic() + RESCAN_S
        for dirpath, dirnames, filenames in os.walk(self.images_dir):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                p = Path(dirpath) / name
                if files.classify(p, self.images_dir) is Kind.PULL_LIST:
                    self._look(p)
        for p in self.extra:
            self._look(p)

    def step(self) -> float:
        """Read the lists that changed and settled; seconds until something is due."""
        seen: set[str] = set()
        while True:
            try:
                seen.add(self.events.get_nowait())
            except queue.Empty:
                break
        for path in sorted(s for s in seen if s):
            p = Path(path)
            if p.is_dir() and p not in self.extra:
                for dirpath, _dirs, names in os.walk(p):
                    for name in names:
                        q = Path(dirpath) / name
                        if files.classify(q, self.images_dir) is Kind.PULL_LIST:
                            self._look(q)
            elif self.wants(p):
                self._look(p)
        now = self.monotonic()
        if now >= self._rescan_at:
            self.start_up()  # what an overflowed event queue lost; known lists are looked at again
            for key in list(self._loaded):
                self._look(Path(key))
        for key in [k for k, at in self._due.items() if at <= now]:
            self._look(Path(key))
        wake = min([IDLE_WAKE_S, self._rescan_at - now, *(at - now for at in self._due.values())])
        return max(0.01, wake)

    def _look(self, path: Path) -> None:
        key = str(path)
        st = files.stat(path)
        if key in self._loaded and self._loaded[key] == st:
            self._due.pop(key, None)
            self._seen.pop(key, None)
            return
        seen, due = plan.list_settled(
            self._seen.get(key), st, self.monotonic(), self.wall(), self.settle_s
        )
        if due is not None:
            self._seen[key] = seen
            self._due[key] = due
            return  # mid-write: keep what was read last, look again once settled
        self._seen.pop(key, None)
        self._due.pop(key, None)
        self._loaded[key] = st
        if st is None:
            if path in self.extra:
                self.log.warning("pull_list.missing", file=key)
            self.puller.set_source(key, [], [])
            return
        self.puller.set_source(key, *self._read(path))

    def _read(self, path: Path) -> tuple[list[lists.Entry], list[lists.Problem]]:
        try:
            with files.open_regular(path) as f:
                data = f.read(lists.MAX_LIST_BYTES + 1)
        except OSError as err:
            self.log.warning("pull_list.unreadable", file=str(path), error=str(err))
            return [], []
        if len(data) > lists.MAX_LIST_BYTES:
            reason = f"list is larger than {lists.MAX_LIST_BYTES >> 20} MiB (too large)"
            self.log.warning("pull_list.too_large", file=str(path), limit=lists.MAX_LIST_BYTES)
            return [], [lists.Problem(str(path), 0, "", reason)]
        text = data.decode(errors="replace")
        entries, problems = lists.parse(text, str(path))
        self.log.info(
            "pull_list.loaded", file=str(path), images=len(entries), invalid=len(problems)
        )
        return entries, problems
