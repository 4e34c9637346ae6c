"""The daemon's duties run step by step: no threads, no sleeping, no containerd, no root.

The importer, containerd and the store are test doubles type-checked against
the Protocols the duties declare (agent.node.attempts, agent.node.ledger, agent.node.reconcile,
agent.node.health); the files are real files in a temporary directory.
"""

from __future__ import annotations

import errno
import json
import os
import queue
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from structlog.testing import capture_logs

from agent import logs
from agent.errors import (
    AgentError,
    ArchiveError,
    Cancelled,
    ContainerdError,
    ContainerdUnavailable,
)
from agent.image import lists
from agent.importer import ImportedImage, ImportResult, Progress
from agent.node import archives, beat, files, plan, pull_lists
from agent.node.archives import ArchivesDuty, ImportedImages, Settings
from agent.node.beat import Heartbeats
from agent.node.health import HealthDuty, ProgressSink, Watchdog
from agent.node.lock import StateLock, StateLocked
from agent.node.metrics import Metrics
from agent.node.notify import Notifier
from agent.node.pull_lists import PullListsDuty
from agent.node.state import Record, State, StateError, Store

# -- test doubles --------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass(frozen=True)
class FakeImage:
    labels: Mapping[str, str]


@dataclass
class FakeContainerd:
    """Images, leases and the version call of containerd, in memory."""

    up: bool = True
    images: dict[str, dict[str, str]] = field(default_factory=dict)
    leases: dict[str, dict[str, str]] = field(default_factory=dict)
    address: str = "fake.sock"

    def _check(self) -> None:
        if not self.up:
            raise ContainerdUnavailable("containerd is down")

    def version(self) -> str:
        self._check()
        return "fake"

    def get_image(self, name: str) -> FakeImage | None:
        self._check()
        labels = self.images.get(name)
        return None if labels is None else FakeImage(labels)

    def label_image(self, name: str, labels: dict[str, str]) -> None:
        self._check()
        self.images[name].update(labels)

    def lease_labels(self) -> dict[str, dict[str, str]]:
        self._check()
        return dict(self.leases)

    def delete_lease(self, lease_id: str) -> None:
        self._check()
        self.leases.pop(lease_id)


class FakeImporter:
    """Imports by name: ``behaviour[path]`` is an exception to raise, else the import succeeds."""

    def __init__(self, ctd: FakeContainerd) -> None:
        self.ctd = ctd
        self.behaviour: dict[str, BaseException] = {}
        self.calls: list[str] = []
        self.around: Callable[[str, Callable[[], ImportResult]], ImportResult] | None = None

    def import_file(self, path: str) -> ImportResult:
        if self.around is not None:
            return self.around(path, lambda: self._import(path))
        return self._import(path)

    def _import(self, path: str) -> ImportResult:
        self.calls.append(path)
        self.ctd._check()
        err = self.behaviour.get(path)
        if err is not None:
            raise err
        name = "docker.io/library/" + Path(path).name.split(".")[0] + ":1"
        self.ctd.images[name] = {"io.cri-containerd.pinned": "pinned"}
        image = ImportedImage(name, "sha256:0", "sha256:1", ("linux/amd64",), True, "new")
        return ImportResult(file=path, images=[image], bytes_read=10)


class MemoryStore:
    """Records in memory; ``broken`` makes every write fail like a full disk."""

    def __init__(self, root: Path) -> None:
        self.rows: dict[str, Record] = {}
        self.broken = False
        self.puts = 0
        self._requests = root / "requests"
        self.requests: list[str] = []

    @property
    def requests_dir(self) -> Path:
        return self._requests

    def load(self) -> dict[str, Record]:
        return dict(self.rows)

    def put(self, records: list[Record], deleted: list[str]) -> None:
        if self.broken:
            raise StateError("state directory: /st: No space left on device")
        self.puts += 1
        for r in records:
            self.rows[r.path] = r
        for p in deleted:
            self.rows.pop(p, None)

    def take_requests(self) -> list[str]:
        out, self.requests = self.requests, []
        return out


class Env:
    def __init__(self, tmp: Path) -> None:
        self.images = tmp / "images"
        self.images.mkdir()
        self.clock = Clock()
        self.ctd = FakeContainerd()
        self.importer = FakeImporter(self.ctd)
        self.store = MemoryStore(tmp)
        self.stop = threading.Event()
        settings = Settings(
            images_dir=self.images,
            settle_s=2.0,
            containerd_root=tmp,
            delete_after_import=False,
            platforms=None,
            unpack=False,
        )
        self.duty = ArchivesDuty(
            settings,
            self.importer,
            self.ctd,
            self.store,
            Metrics(),
            logs.get(),
            imported=ImportedImages(),
            monotonic=self.clock,
            wall=self.clock,
        )

    def archive(self, name: str, data: bytes = b"x" * 100, mtime: int = 0) -> Path:
        path = self.images / name
        path.write_bytes(data)
        if mtime:
            os.utime(path, ns=(mtime, mtime))
        return path

    def settle_and_step(self, turns: int = 1) -> None:
        for _ in range(turns):
            self.clock.now += 10
            self.duty.step(self.stop)

    def state(self, path: Path) -> Record:
        return self.duty.records[str(path)]


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


@pytest.fixture(autouse=True)
def _logs_captured() -> Iterator[None]:
    """Log lines go to a capture, never to a stream an earlier test's CLI run left closed."""
    with capture_logs():
        yield


def events(cap: Sequence[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [e for e in cap if e["event"] == name]


# -- archives duty -------------------------------------------------------------------------


def test_unexpected_exception_fails_that_archive_only(env: Env) -> None:
    """A defect in one import (RecursionError) marks it failed with one line, logged once; the queue goes on."""
    bad = env.archive("deep.tar", mtime=1_000_000_000)
    good = env.archive("good.tar", mtime=2_000_000_000)
    env.importer.behaviour[str(bad)] = RecursionError("maximum recursion depth exceeded")
    with capture_logs() as cap:
        env.duty.start_up()
        env.settle_and_step(3)
    rec = env.state(bad)
    assert rec.state is State.FAILED
    assert rec.error == "unexpected error: RecursionError: maximum recursion depth exceeded"
    assert "\n" not in rec.error
    crashed = events(cap, "import.crashed")
    assert len(crashed) == 1 and "RecursionError" in crashed[0]["traceback"]
    assert env.state(good).state is State.IMPORTED
    assert env.importer.calls.count(str(bad)) == 1  # not retried in a loop


def test_archive_that_keeps_killing_the_daemon_is_set_aside(env: Env) -> None:
    """Found 'importing' at three starts in a row: failed as the probable cause, queue moves on; retry clears it."""
    killer = env.archive("oom.tar.zst", mtime=1_000_000_000)
    st = killer.stat()
    env.store.rows[str(killer)] = Record(
        str(killer), st.st_size, st.st_mtime_ns, State.IMPORTING, attempts=3, interrupted=2
    )
    later = env.archive("later.tar", mtime=2_000_000_000)
    with capture_logs() as cap:
        env.duty.start_up()
        env.settle_and_step(2)
    rec = env.state(killer)
    assert rec.state is State.FAILED and "3 imports" in rec.error
    assert events(cap, "archive.set_aside")
    assert env.importer.calls == [str(later)]
    assert env.state(later).state is State.IMPORTED
    # `image-agent retry` clears it.
    env.store.requests.append(str(killer))
    env.settle_and_step(2)
    rec = env.state(killer)
    assert rec.state is State.IMPORTED and rec.interrupted == 0


def test_interrupted_counts_reset_by_a_finished_import() -> None:
    """Once or twice interrupted: imported again; a finished import starts the count over."""
    rec = Record("/d/a.tar", 1, 1, State.IMPORTING)
    once = plan.interrupted(rec)
    assert once.state is State.PENDING and once.interrupted == 1
    twice = plan.interrupted(once)
    assert twice.state is State.PENDING
    assert plan.interrupted(twice).state is State.FAILED


def test_fifo_named_like_an_archive_is_never_opened(env: Env) -> None:
    """A FIFO called a.tar.gz is ignored by the scan and the events; opening it never blocks."""
    fifo = env.images / "a.tar.gz"
    os.mkfifo(fifo)
    good = env.archive("b.tar")
    env.duty.start_up()
    env.duty.events.put(str(fifo))
    env.settle_and_step(2)
    assert str(fifo) not in env.duty.records
    assert env.state(good).state is State.IMPORTED
    with pytest.raises(files.NotRegular):
        files.open_regular(fifo)  # returns at once (O_NONBLOCK), does not wait for a writer
    assert files.stat(fifo) is None


def test_containerd_back_resets_retry_timers(env: Env) -> None:
    """Archives waiting out a containerd backoff are tried as soon as containerd is back."""
    path = env.archive("a.tar")
    env.duty.start_up()
    env.ctd.up = False
    for _ in range(6):  # backoff grows: 1, 2, 4, 8, 16, 32 s
        env.clock.now += 100
        env.duty.step(env.stop)
    assert env.duty.not_before[str(path)] - env.clock.now == 32.0
    assert env.state(path).state is State.PENDING
    env.ctd.up = True
    env.duty.containerd_back.set()
    env.duty.step(env.stop)  # same instant: no waiting out the 32 s
    assert env.state(path).state is State.IMPORTED


def test_full_disk_mid_import_waits_for_space(env: Env, tmp_path: Path) -> None:
    """A failure while containerd's disk is full is transient: pending with the reason, never failed."""
    rec = Record("/d/a.tar", 10, 1, State.IMPORTING, attempts=1)
    out = plan.after_failure(
        rec,
        plan.Failure.CONTAINERD,
        "write: no space left on device",
        "insufficient space: needs about 80 MiB in /c, 3 MiB free",
        0,
        5.0,
    )
    assert out.record.state is State.PENDING and out.record.reason.startswith("insufficient")
    assert out.retry_in_s == plan.SPACE_RETRY_S
    # containerd refusing a write while the disk has room again (its rollback
    # freed it): still not the archive's fault; retried, slower each time.
    out = plan.after_failure(rec, plan.Failure.CONTAINERD, "apply layer: ENOSPC", None, 0, 5.0)
    assert out.record.state is State.PENDING and out.retry_in_s == plan.CONTAINERD_RETRY_S
    later = replace(rec, attempts=20)
    out = plan.after_failure(later, plan.Failure.CONTAINERD, "x", None, 0, 5.0)
    assert out.retry_in_s == plan.CONTAINERD_RETRY_CAP_S
    # The archive's own fault is permanent.
    out = plan.after_failure(rec, plan.Failure.ARCHIVE, "corrupt", None, 0, 5.0)
    assert out.record.state is State.FAILED and out.retry_in_s is None
    # Stopping is never a failure, and does not count as an attempt.
    out = plan.after_failure(rec, plan.Failure.CANCELLED, "stopped", None, 0, 5.0)
    assert out.record.state is State.PENDING and out.record.attempts == 0


def test_unwritable_state_keeps_importing_then_writes(env: Env) -> None:
    """A full state directory: logged once, imports go on, unhealthy; everything written once it can."""
    a = env.archive("a.tar", mtime=1_000_000_000)
    b = env.archive("b.tar", mtime=2_000_000_000)
    env.store.broken = True
    with capture_logs() as cap:
        env.duty.start_up()
        env.settle_and_step(4)
    assert env.state(a).state is State.IMPORTED and env.state(b).state is State.IMPORTED
    assert env.duty.state_error
    assert len(events(cap, "state.unwritable")) == 1
    assert env.store.rows == {}
    health = HealthDuty(
        env.ctd, NullStatus(), Metrics(), logs.get(), env.duty, ProgressSink(), env.images
    )
    health.probe()
    ok, text = health.verdict()
    assert not ok and "state not writable" in text
    env.store.broken = False
    env.settle_and_step(1)
    assert env.store.rows[str(a)].state is State.IMPORTED
    assert env.store.rows[str(b)].state is State.IMPORTED
    assert env.duty.state_error == "" and health.verdict() == (True, "ok")


def test_events_of_a_copy_do_not_rewrite_state_each_batch(env: Env) -> None:
    """A file being copied produces many event batches; the records are written at most once a second."""
    env.duty.start_up()
    path = env.images / "big.tar"
    before = env.store.puts
    with path.open("wb") as f:
        for _ in range(50):
            f.write(b"x" * 1000)
            f.flush()
            env.duty.events.put(str(path))
            env.duty.step(env.stop)  # the clock does not move: one instant
    assert env.store.puts - before <= 1
    env.clock.now += 1.5
    env.duty.step(env.stop)
    assert env.store.rows[str(path)].size == 50_000  # written once the second passed


def test_same_size_same_mtime_rewrite_is_noticed_while_running(env: Env) -> None:
    """`cat new > old; touch -r` on an imported archive: its write event triggers the content check."""
    path = env.archive("swap.tar", b"A" * 5000)
    env.duty.start_up()
    env.settle_and_step(1)
    assert env.state(path).state is State.IMPORTED
    st = path.stat()
    path.write_bytes(b"B" * 5000)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    env.duty.events.put(str(path))
    env.duty.step(env.stop)
    assert env.state(path).state is State.PENDING
    assert env.state(path).reason == "content changed"
    env.settle_and_step(1)
    assert env.importer.calls == [str(path), str(path)]


def test_leases_released_only_between_imports(env: Env) -> None:
    """Leftover leases of ours go before the first import and after an outage, never during one."""
    env.ctd.leases["old"] = {"image-agent/owner": "daemon"}
    env.ctd.leases["someone-else"] = {}
    seen_during: list[bool] = []

    def import_with_lease(path: str, real_import: Callable[[], ImportResult]) -> ImportResult:
        env.ctd.leases["mine"] = {"image-agent/owner": "daemon"}
        env.clock.now += 60  # a long import: the health duty would have ticked
        result = real_import()
        seen_during.append("mine" in env.ctd.leases)
        del env.ctd.leases["mine"]
        return result

    env.importer.around = import_with_lease
    a = env.archive("a.tar")
    env.duty.start_up()
    env.settle_and_step(1)
    assert env.state(a).state is State.IMPORTED
    assert sorted(env.ctd.leases) == ["someone-else"]
    # containerd went away during an import: its lease outlived it.
    env.ctd.leases["left-by-outage"] = {"image-agent/owner": "daemon"}
    env.duty.containerd_back.set()
    env.archive("b.tar")
    env.duty.events.put(str(env.images / "b.tar"))
    env.settle_and_step(2)
    assert sorted(env.ctd.leases) == ["someone-else"]
    assert seen_during == [True, True]


def test_cancelled_import_goes_back_to_pending(env: Env) -> None:
    """SIGTERM during an import: pending, attempt not counted, not failed."""
    a = env.archive("a.tar")
    env.importer.behaviour[str(a)] = Cancelled("stopped")
    env.duty.start_up()
    env.settle_and_step(1)
    assert env.state(a).state is State.PENDING and env.state(a).attempts == 0


def test_archive_error_is_permanent_until_changed(env: Env) -> None:
    """A corrupt archive fails once and is not retried while unchanged."""
    a = env.archive("a.tar")
    env.importer.behaviour[str(a)] = ArchiveError("corrupt")
    env.duty.start_up()
    env.settle_and_step(5)
    assert env.state(a).state is State.FAILED and env.importer.calls == [str(a)]


# -- health --------------------------------------------------------------------------------


class NullStatus:
    def __init__(self) -> None:
        self.daemon: dict[str, Any] = {}
        self.broken = False

    def save_daemon(self, info: dict[str, Any]) -> None:
        if self.broken:
            raise StateError("state directory: /st: Read-only file system")
        self.daemon = info

    def save_pulls(self, rows: list[dict[str, Any]]) -> None:
        pass


def test_health_notices_containerd_back_and_wakes_archives(env: Env) -> None:
    """The probe's down->up transition sets the archives duty's containerd_back (and nothing else)."""
    status = NullStatus()
    health = HealthDuty(
        env.ctd, status, Metrics(), logs.get(), env.duty, ProgressSink(), env.images
    )
    env.ctd.up = False
    health.tick()
    assert health.verdict() == (False, "containerd unreachable")
    assert plan.probe_interval(False) <= 1.0  # looked at again within a second
    env.ctd.up = True
    health.probe()
    assert env.duty.containerd_back.is_set()
    assert health.verdict() == (True, "ok")


def test_health_reports_dead_duty_and_unwritable_status(env: Env) -> None:
    """A dead duty and a status record that cannot be written both take /healthz down."""
    status = NullStatus()
    health = HealthDuty(
        env.ctd,
        status,
        Metrics(),
        logs.get(),
        env.duty,
        ProgressSink(),
        env.images,
        dead=lambda: ["archives"],
    )
    health.probe()
    assert health.verdict() == (False, "archives stopped")
    status.broken = True
    health.write_status()
    ok, text = health.verdict()
    assert not ok and "Read-only" in text


def test_progress_sink_is_passive_and_logged_by_health(env: Env) -> None:
    """The importer's progress lands in the sink; the health duty logs it, throttled."""
    sink = ProgressSink()
    health = HealthDuty(env.ctd, NullStatus(), Metrics(), logs.get(), env.duty, sink, env.images)
    sink(Progress("/d/a.tar", 50, 100, 1.0))
    sink(Progress("/d/a.tar", 60, 100, 1.5))
    with capture_logs() as cap:
        health.tick()
        health.tick()
    lines = events(cap, "import.progress")
    assert len(lines) == 1 and lines[0]["percent"] == 60.0


def _receive_until_silent(sock: socket.socket, seconds: float) -> None:
    """Read datagrams until the socket's own timeout fires (TimeoutError); one that
    keeps receiving for ``seconds`` is an AssertionError (bounded: never drains for ever)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        sock.recv(100)
    raise AssertionError("pings went on after a duty died")


def test_watchdog_pings_only_while_all_duties_live(tmp_path: Path) -> None:
    """WATCHDOG=1 goes out at half of WATCHDOG_USEC; a dead duty stops the pings."""
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(5)
    alive = threading.Event()
    alive.set()
    dog = Watchdog(Notifier(str(sock_path)), 0.05, alive.is_set)
    stop = threading.Event()
    t = threading.Thread(target=dog.run, args=(stop,))
    t.start()
    try:
        assert sock.recv(100) == b"WATCHDOG=1"
        alive.clear()
        sock.settimeout(0.3)
        # Drain one that may have been on its way, then silence. Bounded: a
        # watchdog that kept pinging fails here instead of draining for ever.
        with pytest.raises(TimeoutError):
            _receive_until_silent(sock, 5)
    finally:
        stop.set()
        t.join(5)
        sock.close()
    assert plan.watchdog_interval(2.0, 10.0) == 1.0
    assert plan.watchdog_interval(0.0, 10.0) == 10.0


# -- state store and lock --------------------------------------------------------------------


def test_store_keeps_one_row_per_archive(tmp_path: Path) -> None:
    """Records round-trip through SQLite (WAL); put writes only the changed rows."""
    store = Store(tmp_path)
    a = Record("/d/a.tar", 5, 7, State.IMPORTED, images=["docker.io/library/a:1"], attempts=1)
    b = Record("/d/b.tar", 5, 8)
    store.put([a, b], [])
    assert store.load() == {a.path: a, b.path: b}
    store.put([], [b.path])
    assert store.load() == {a.path: a}
    with sqlite3.connect(tmp_path / "state.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.save_daemon({"pid": 1})
    assert Store(tmp_path, readonly=True).load_daemon() == {"pid": 1}
    store.close()


def test_archives_json_is_migrated(tmp_path: Path) -> None:
    """An archives.json of the JSON era is read into the database once and set aside."""
    rec = Record("/d/a.tar", 5, 7, State.IMPORTED, images=["docker.io/library/a:1"], attempts=1)
    (tmp_path / "archives.json").write_text(json.dumps({"version": 1, "archives": [rec.to_json()]}))
    assert Store(tmp_path, readonly=True).load() == {rec.path: rec}  # status before migrating
    seen: list[tuple[str, dict[str, Any]]] = []
    store = Store(tmp_path, log=lambda event, **kw: seen.append((event, kw)))
    assert store.load() == {rec.path: rec}
    assert not (tmp_path / "archives.json").exists()
    assert (tmp_path / "archives.json.migrated").exists()
    assert [e for e, _ in seen] == ["state.migrated"]


def test_corrupt_archives_json_is_logged_not_dropped_silently(tmp_path: Path) -> None:
    """A damaged archives.json is named in the log and kept aside, never silently dropped."""
    (tmp_path / "archives.json").write_text("{not json")
    seen: list[tuple[str, dict[str, Any]]] = []
    store = Store(tmp_path, log=lambda event, **kw: seen.append((event, kw)))
    assert store.load() == {}
    assert seen[0][0] == "state.legacy_unreadable"
    assert seen[0][1]["file"] == str(tmp_path / "archives.json")
    assert (tmp_path / "archives.json.corrupt").read_text() == "{not json"


def test_directory_in_place_of_the_database_is_named(tmp_path: Path) -> None:
    """A directory where the state database should be gives an error naming it."""
    (tmp_path / "state.db").mkdir()
    with pytest.raises(StateError) as err:
        Store(tmp_path).load()
    assert str(tmp_path / "state.db") in str(err.value) and "directory" in str(err.value)


def test_second_daemon_on_a_state_dir_is_refused(tmp_path: Path) -> None:
    """The state directory's lock is exclusive; the refusal names the holder's pid."""
    first = StateLock(tmp_path)
    first.acquire()
    try:
        with pytest.raises(StateLocked) as err:
            StateLock(tmp_path).acquire()
        assert f"pid {os.getpid()}" in str(err.value) and str(tmp_path) in str(err.value)
    finally:
        first.release()
    again = StateLock(tmp_path)
    again.acquire()  # free once released
    again.release()


def test_escape_keeps_table_rows_on_one_line() -> None:
    """A newline or escape in a file name is shown escaped, never raw."""
    assert plan.escape("a\nb.tar") == "a\\nb.tar"
    assert plan.escape("\x1b[2J.tar") == "\\x1b[2J.tar"
    assert plan.escape("plain.tar") == "plain.tar"
    assert plan.one_line("line one\nline two") == "line one line two"


def test_status_table_escapes_names_and_lists_in_mtime_order(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`status` prints one line per archive, oldest mtime first, whatever the names hold."""
    from agent import cli

    store = Store(tmp_path)
    newer = Record("/d/a\nfake-row imported.tar", 5, 2_000, State.PENDING, reason="new")
    older = Record("/d/z.tar", 5, 1_000, State.IMPORTED, images=["docker.io/library/z:1"])
    store.put([newer, older], [])
    store.close()
    assert cli.main(["status", "--state-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if line.startswith("/d/")]
    assert len(rows) == 2, lines
    assert rows[0].startswith("/d/z.tar") and rows[1].startswith("/d/a\\nfake-row")
    assert cli.main(["status", "-o", "json", "--state-dir", str(tmp_path)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) == {"daemon", "archives", "pulls"}
    assert [a["path"] for a in doc["archives"]] == [older.path, newer.path]


def test_a_duty_that_dies_is_logged_once_and_marked_dead() -> None:
    """An exception escaping a duty's loop is logged once with its traceback; the duty reads as dead."""
    from agent.node.service import _Duty

    def broken(stop: threading.Event) -> None:
        raise ValueError("bad day")

    duty = _Duty("archives", broken, logs.get())
    with capture_logs() as cap:
        duty.start(threading.Event())
        duty.thread.join(10)
    assert duty.died
    died = events(cap, "duty.died")
    assert len(died) == 1 and died[0]["duty"] == "archives"
    assert died[0]["error"] == "ValueError: bad day" and "Traceback" in died[0]["traceback"]


class FakeSources:
    def __init__(self) -> None:
        self.sources: dict[str, list[str]] = {}
        self.problems: dict[str, list[str]] = {}

    def set_source(
        self, source: str, entries: list[lists.Entry], problems: list[lists.Problem]
    ) -> None:
        self.sources[source] = [e.ref for e in entries]
        self.problems[source] = [p.reason for p in problems]


def test_pull_list_read_once_settled_and_dropped_when_gone(tmp_path: Path) -> None:
    """A list being written is read only once it holds still; a removed list empties its source."""
    clock = Clock()
    images = tmp_path / "images"
    images.mkdir()
    sources = FakeSources()
    duty = PullListsDuty(sources, images, (), 2.0, logs.get(), monotonic=clock, wall=lambda: 2e9)
    duty.start_up()
    path = images / "w.txt"
    path.write_text("docker.io/library/alpine:3.19\n")
    os.utime(path, (2e9, 2e9))  # written just now
    duty.events.put(str(path))
    assert duty.step() == 2.0
    assert sources.sources == {}
    clock.now += 2.0
    duty.step()
    assert sources.sources == {str(path): ["docker.io/library/alpine:3.19"]}
    path.unlink()
    duty.events.put(str(path))
    duty.step()
    clock.now += 2.0
    duty.step()
    assert sources.sources == {str(path): []}


# -- review findings: failures that must neither crash a duty nor spin ------------------------


def test_backoff_is_bounded_for_any_attempt_count(env: Env) -> None:
    """Days of outage or refusals (attempt counts in the thousands) keep the capped delay, no OverflowError."""
    assert plan.backoff(1025) == 60.0 and plan.backoff(10**9, base=5.0, cap=600.0) == 600.0
    a = env.archive("a.tar", mtime=1_000_000_000)
    env.duty.start_up()
    env.ctd.up = False
    env.duty.outage_attempts = 5000  # hours of outage with several archives
    env.settle_and_step(1)
    assert env.duty.not_before[str(a)] - env.clock.now == 60.0
    assert env.duty.outage_attempts <= plan.MAX_COUNT
    env.ctd.up = True
    # A permanent refusal whose attempts were persisted over a week of restarts.
    env.duty.records[str(a)] = replace(env.state(a), attempts=5000)
    env.importer.behaviour[str(a)] = AgentError("snapshotter: permission denied")
    env.duty.not_before.clear()
    env.duty.step(env.stop)
    assert env.state(a).state is State.PENDING
    assert env.duty.not_before[str(a)] - env.clock.now == plan.CONTAINERD_RETRY_CAP_S


def test_archive_that_cannot_be_read_waits_and_says_why(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """stat works but read fails (EIO): no hot loop; retried later, slower each time, reason in status, logged once."""
    a = env.archive("a.tar", mtime=1_000_000_000)
    real = files.fingerprint

    def broken(path: Path) -> str:
        raise OSError(errno.EIO, "Input/output error", str(path))

    monkeypatch.setattr(files, "fingerprint", broken)
    env.duty.start_up()
    env.clock.now += 10
    with capture_logs() as cap:
        waits = [env.duty.step(env.stop) for _ in range(20)]  # the clock holds still
    assert waits.count(0.0) <= 1 and min(waits[1:]) > 1.0  # the attempt's own turn, then a wait
    assert len(events(cap, "archive.unreadable")) == 1
    rec = env.state(a)
    assert rec.state is State.PENDING and rec.reason == "unreadable: Input/output error"
    assert env.store.rows[str(a)].reason == rec.reason  # written: `status` shows it
    first = env.duty.not_before[str(a)] - env.clock.now
    env.clock.now += first
    env.duty.step(env.stop)
    assert env.duty.not_before[str(a)] - env.clock.now == 2 * first
    monkeypatch.setattr(files, "fingerprint", real)
    env.clock.now += 3600
    env.duty.step(env.stop)
    assert env.state(a).state is State.IMPORTED


def test_settle_of_zero_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--settle 0 would look at a file still being written in a tight loop: a usage error, one line."""
    from agent import cli
    from agent.cli.common import EXIT_USAGE

    for value in ("0", "-1"):
        code = cli.main(["run", "--settle", value, "--state-dir", str(tmp_path / "st")])
        assert code == EXIT_USAGE
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--settle must be more than 0" in err
    assert not (tmp_path / "st").exists()  # refused before anything was touched


def test_a_part_that_fails_to_build_releases_the_state_lock(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad --listen is a one-line usage error, and the state directory is free again for the next run."""
    from agent import cli
    from agent.cli.common import EXIT_USAGE

    state = tmp_path / "st"
    args = ["run", "--state-dir", str(state), "--images-dir", str(tmp_path / "images")]
    code = cli.main([*args, "--listen", "127.0.0.1:not-a-port", "--address", "/nonexistent"])
    assert code == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--listen 127.0.0.1:not-a-port" in err
    lock = StateLock(state)
    lock.acquire()  # StateLocked here if the failed run still held it
    lock.release()


def test_leftover_leases_go_before_the_space_check(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After kill -9 mid-import our lease holds content: released first, not waited on for an hour."""
    env.ctd.leases["killed-import"] = {"image-agent/owner": "daemon"}
    env.archive("a.tar")
    monkeypatch.setattr(files, "uncompressed_size", lambda path: (1 << 60, True))
    env.duty.start_up()
    env.settle_and_step(1)
    assert "killed-import" not in env.ctd.leases
    assert env.state(env.images / "a.tar").reason.startswith("insufficient space")


def test_waiting_for_space_logs_and_writes_once(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """The free figure moves every few seconds; the reason (and so the log and the database) does not."""
    a = env.archive("a.tar")
    monkeypatch.setattr(files, "uncompressed_size", lambda path: (1 << 60, True))
    free = iter(range(1000, 0, -1))

    @dataclass
    class Vfs:
        f_bavail: int
        f_frsize: int = 1 << 20

    monkeypatch.setattr(os, "statvfs", lambda path: Vfs(next(free)))
    env.duty.start_up()
    env.settle_and_step(1)
    puts = env.store.puts
    with capture_logs() as cap:
        for _ in range(20):
            env.clock.now += plan.SPACE_RETRY_S
            env.duty.step(env.stop)
    assert events(cap, "archive.waiting_for_space") == []
    assert env.store.puts == puts
    assert "MiB free" not in env.state(a).reason


def test_unreadable_database_rows_are_skipped_and_counted(tmp_path: Path) -> None:
    """Rows of the wrong shape (a list, a string mtime, no path) are skipped, logged once with a count."""
    store = Store(tmp_path)
    good = Record("/d/good.tar", 5, 7, State.IMPORTED)
    store.put([good], [])
    bad = [
        ("/d/list", json.dumps(["a"])),
        ("/d/mtime", json.dumps({"path": "/d/mtime", "size": 1, "mtime_ns": "x"})),
        ("/d/nullpath", json.dumps({"path": None, "size": 1, "mtime_ns": 1})),
        ("/d/images", json.dumps({"path": "/d/images", "size": 1, "mtime_ns": 1, "images": 3})),
        ("/d/state", json.dumps({"path": "/d/state", "size": 1, "mtime_ns": 1, "state": "gone"})),
    ]
    with sqlite3.connect(tmp_path / "state.db") as db:
        db.executemany("INSERT INTO archives (path, doc) VALUES (?, ?)", bad)
    db.close()
    seen: list[tuple[str, dict[str, Any]]] = []
    store = Store(tmp_path, log=lambda event, **kw: seen.append((event, kw)))
    assert store.load() == {good.path: good}
    assert store.load() == {good.path: good}
    assert [e for e, _ in seen] == ["state.records_skipped"] and seen[0][1]["count"] == 5
    store.close()


def test_odd_archives_json_records_are_skipped_at_migration(tmp_path: Path) -> None:
    """A legacy file with nulls, lists and strings where numbers belong migrates its good records only."""
    good = Record("/d/good.tar", 5, 7, State.IMPORTED, images=["docker.io/library/a:1"])
    items: list[Any] = [
        good.to_json(),
        {"path": "/d/a.tar", "size": 1, "mtime_ns": "x"},
        {"path": "/d/b.tar", "size": 1, "mtime_ns": None},
        {"path": ["a"], "size": 1, "mtime_ns": 1},
        {"path": None, "size": 1, "mtime_ns": 1},
        ["not", "a", "record"],
    ]
    (tmp_path / "archives.json").write_text(json.dumps({"version": 1, "archives": items}))
    seen: list[tuple[str, dict[str, Any]]] = []
    store = Store(tmp_path, log=lambda event, **kw: seen.append((event, kw)))
    assert store.load() == {good.path: good}
    assert [e for e, _ in seen] == ["state.legacy_records_skipped", "state.migrated"]
    assert seen[0][1]["count"] == 5
    store.close()
    assert Store(tmp_path).load() == {good.path: good}  # the next start: same, no crash


class FlakyContainerd(FakeContainerd):
    """Answers the version call with an error that is not 'unavailable' (a stream reset)."""

    def version(self) -> str:
        raise ContainerdError("Stream removed", code="UNKNOWN")


def test_probe_error_other_than_unavailable_is_not_ok(env: Env) -> None:
    """UNKNOWN/UNIMPLEMENTED from the probe: containerd counts as not ok, logged once, the tick goes on."""
    flaky = FlakyContainerd()
    health = HealthDuty(
        flaky, NullStatus(), Metrics(), logs.get(), env.duty, ProgressSink(), env.images
    )
    with capture_logs() as cap:
        health.probe()
        for _ in range(3):
            health._probe_at = 0.0
            health.tick()
    assert health.verdict() == (False, "containerd unreachable")
    failed = events(cap, "containerd.probe_failed")
    assert len(failed) == 1 and "Stream removed" in failed[0]["error"]


def test_stale_heartbeat_stops_the_watchdog(tmp_path: Path) -> None:
    """A duty that stops turning is stuck after STALE_S; in an import, progress reports keep it alive."""
    clock = Clock()
    sink = ProgressSink(monotonic=clock)
    beats = Heartbeats(watchdog_s=0.0, monotonic=clock)
    archives = beats.add("archives", progress_at=lambda: sink.last_at)
    health_beat = beats.add("health")
    assert beats.stuck() == []
    clock.now += beat.STALE_S + 1
    health_beat.beat()
    assert beats.stuck() == ["archives"]  # wedged between imports
    archives.beat(busy=True)  # an import starts
    for _ in range(10):  # progress every minute: alive however long it takes
        clock.now += 60
        health_beat.beat()
        sink(Progress("/d/a.tar", 1, 2, 1.0))
        assert beats.stuck() == []
    clock.now += beat.BUSY_STALE_S + 1  # one layer applying, no report for a long while
    health_beat.beat()
    assert beats.stuck() == ["archives"]
    # A watchdog of its own longer than the windows widens them: no kill before systemd's.
    wide = Heartbeats(watchdog_s=900.0, monotonic=clock)
    wide.add("health")
    clock.now += 800
    assert wide.stuck() == []
    # The archives duty marks itself busy for the import only.
    env = Env(tmp_path)
    during: list[bool] = []

    def noting_busy(path: str, run: Callable[[], ImportResult]) -> ImportResult:
        during.append(env.duty.heartbeat.busy)
        return run()

    env.importer.around = noting_busy
    env.archive("a.tar")
    env.duty.start_up()
    env.settle_and_step(1)
    assert during == [True]


def test_stuck_duty_is_reported_by_health(env: Env) -> None:
    """/healthz names a duty that stopped turning."""
    health = HealthDuty(
        env.ctd,
        NullStatus(),
        Metrics(),
        logs.get(),
        env.duty,
        ProgressSink(),
        env.images,
        stuck=lambda: ["archives"],
    )
    health.probe()
    assert health.verdict() == (False, "archives not responding")


def test_open_for_writing_reads_link_text_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/proc/PID/fd links to other files are never stat'ed (a dead NFS mount would block for ever)."""
    path = tmp_path / "a.tar"
    path.write_bytes(b"x")
    proc = tmp_path / "proc"
    (proc / "7" / "fd").mkdir(parents=True)
    (proc / "7" / "fdinfo").mkdir()
    (proc / "7" / "fd" / "3").symlink_to("/nfs/dead/file")
    (proc / "7" / "fdinfo" / "3").write_text("pos:\t0\nflags:\t0100001\n")
    (proc / "7" / "fd" / "4").symlink_to(path)
    (proc / "7" / "fdinfo" / "4").write_text(
        f"pos:\t0\nflags:\t0100001\nino:\t{path.stat().st_ino}\n"
    )
    real_stat = os.stat
    statted: list[str] = []

    def spy(p: Any, *args: Any, **kw: Any) -> os.stat_result:
        statted.append(os.fspath(p))
        return real_stat(p, *args, **kw)

    monkeypatch.setattr(os, "stat", spy)
    assert files.open_for_writing(path, proc=proc)
    assert not any(s.startswith(str(proc)) for s in statted), statted
    (proc / "7" / "fd" / "4").unlink()
    assert not files.open_for_writing(path, proc=proc)
    # The link names our path but the inode differs: the name was reused.
    (proc / "7" / "fd" / "4").symlink_to(path)
    (proc / "7" / "fdinfo" / "4").write_text("pos:\t0\nflags:\t0100001\nino:\t1\n")
    assert not files.open_for_writing(path, proc=proc)


def test_watcher_event_that_fails_is_logged_once_and_swallowed(tmp_path: Path) -> None:
    """An exception in routing an event would end the watcher's thread silently: caught, logged once."""
    from watchdog.events import FileModifiedEvent

    from agent.node.service import _Handler

    def broken(path: Path) -> bool:
        raise PermissionError(13, "Permission denied", str(path))

    q: queue.SimpleQueue[str] = queue.SimpleQueue()
    handler = _Handler([(broken, q)], logs.get())
    with capture_logs() as cap:
        for _ in range(3):
            handler.on_any_event(FileModifiedEvent(str(tmp_path / "a.tar")))
    assert len(events(cap, "watcher.event_failed")) == 1
    ok: queue.SimpleQueue[str] = queue.SimpleQueue()
    _Handler([(lambda p: True, ok)], logs.get()).on_any_event(
        FileModifiedEvent(str(tmp_path / "a.tar"))
    )
    assert ok.get_nowait() == str(tmp_path / "a.tar")


def test_files_whose_events_were_lost_are_found_by_the_rescan(tmp_path: Path) -> None:
    """Archives and lists that arrive without an event (inotify overflow) are picked up within RESCAN_S."""
    env = Env(tmp_path)
    env.duty.start_up()
    a = env.archive("a.tar")  # no event
    env.settle_and_step(1)
    assert str(a) not in env.duty.records
    env.clock.now += archives.RESCAN_S
    env.duty.step(env.stop)
    env.settle_and_step(1)
    assert env.state(a).state is State.IMPORTED
    a.unlink()  # gone, no event either
    env.clock.now += archives.RESCAN_S
    env.duty.step(env.stop)
    assert str(a) not in env.duty.records
    clock = Clock()
    sources = FakeSources()
    duty = PullListsDuty(
        sources, env.images, (), 2.0, logs.get(), monotonic=clock, wall=lambda: 2e9
    )
    duty.start_up()
    lst = env.images / "l.txt"
    lst.write_text("docker.io/library/alpine:3.19\n")
    os.utime(lst, (1e9, 1e9))
    assert duty.step() <= pull_lists.RESCAN_S
    assert sources.sources == {}
    clock.now += pull_lists.RESCAN_S
    duty.step()
    assert sources.sources == {str(lst): ["docker.io/library/alpine:3.19"]}


def test_pull_list_read_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A huge .txt is never read whole: at most MAX_LIST_BYTES + 1, then 'too large', no entries."""
    images = tmp_path / "images"
    images.mkdir()
    big = images / "big.txt"
    with big.open("wb") as f:
        f.truncate(64 << 30)  # sparse: 64 GiB of nothing
    os.utime(big, (1e9, 1e9))
    asked: list[int] = []
    real_open = files.open_regular

    class Counting:
        def __init__(self, f: BinaryIO) -> None:
            self.f = f

        def __enter__(self) -> Counting:
            return self

        def __exit__(self, *exc: object) -> None:
            self.f.close()

        def read(self, n: int = -1) -> bytes:
            asked.append(n)
            assert 0 <= n <= lists.MAX_LIST_BYTES + 1, "unbounded read"
            return self.f.read(n)

    monkeypatch.setattr(files, "open_regular", lambda p: Counting(real_open(p)))
    sources = FakeSources()
    duty = PullListsDuty(sources, images, (), 2.0, logs.get(), wall=lambda: 2e9)
    with capture_logs() as cap:
        duty.start_up()
    assert asked == [lists.MAX_LIST_BYTES + 1]
    assert sources.sources == {str(big): []}
    assert "too large" in sources.problems[str(big)][0]
    assert len(events(cap, "pull_list.too_large")) == 1
