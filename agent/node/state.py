"""What the daemon remembers about each archive: an SQLite database in the state directory.

One row per archive, written in WAL mode, so recording a change costs the
change, not the whole table (the former ``archives.json`` was rewritten and
fsynced whole, about three times per import). An existing ``archives.json``
is migrated once at open. ``image-agent status`` reads the same database
while the daemon writes it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sqlite3
import tempfile
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from agent.errors import AgentError

DB_FILE = "state.db"
LEGACY_ARCHIVES_FILE = "archives.json"
REQUESTS_DIR = "requests"
BUSY_TIMEOUT_S = 5.0

# Log hook: (event, fields). The store has no logger of its own.
LogFn = Callable[..., None]


class StateError(AgentError):
    """The state directory cannot be read or written (read-only, full, not a directory)."""


class State(StrEnum):
    PENDING = "pending"
    IMPORTING = "importing"
    IMPORTED = "imported"
    FAILED = "failed"
    SKIPPED = "skipped"


@dataclass
class Record:
    path: str
    size: int
    mtime_ns: int
    state: State = State.PENDING
    fingerprint: str = ""
    images: list[str] = field(default_factory=list)
    reason: str = ""
    error: str = ""
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0
    interrupted: int = 0  # imports in a row that the daemon did not survive

    def to_json(self) -> dict[str, Any]:
        doc = dataclasses.asdict(self)
        doc["state"] = str(self.state)
        doc["mtime"] = self.mtime_ns / 1e9
        return doc

    @classmethod
    def from_json(cls, doc: object) -> Record:
        """The record of a stored document; ValueError if any field has the wrong type."""
        if not isinstance(doc, dict):
            # ValueError, as for every malformed record: it is what callers catch.
            raise ValueError(f"record is a {type(doc).__name__}, not an object")  # noqa: TRY004
        path = doc.get("path")
        if not isinstance(path, str) or not path:
            raise ValueError(f"record has no path (found {path!r:.80})")
        values: dict[str, Any] = {"path": path}
        for name in ("size", "mtime_ns", "attempts", "interrupted"):
            if name in doc:
                values[name] = _field(doc, name, int)
        for name in ("fingerprint", "reason", "error"):
            if name in doc:
                values[name] = _field(doc, name, str)
        for name in ("started_at", "finished_at"):
            if doc.get(name) is not None:
                values[name] = float(_field(doc, name, (int, float)))
        if "size" not in values or "mtime_ns" not in values:
            raise ValueError(f"record {path!r:.200}: no size or mtime_ns")
        images = doc.get("images", [])
        if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
            raise ValueError(f"record {path!r:.200}: images is not a list of names")
        values["images"] = list(images)
        values["state"] = State(_field(doc, "state", str) if "state" in doc else "pending")
        return cls(**values)


def _field(doc: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = doc[name]
    if isinstance(value, bool) or not isinstance(value, kind):
        # ValueError, as for every malformed record: it is what callers catch.
        raise ValueError(f"record {doc['path']!r:.200}: {name} is {value!r:.80}")  # noqa: TRY004
    return value


def write_atomic(path: Path, data: bytes) -> None:
    """Write via a temp file in the same directory, fsync, rename: never a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        Path(tmp).replace(path)
        dirfd = os.open(path.parent, os.O_DIRECTORY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)
    except BaseException:
        with contextlib.suppress(OSError):
            Path(tmp).unlink()
        raise


def _no_log(event: str, **fields: Any) -> None:
    pass


class Store:
    """Archive records keyed by path, the daemon's status record and the pull table.

    Thread-safe: one connection behind a lock. Every failure to read or
    write is a :class:`StateError` naming the state directory; the caller
    decides whether to keep going (the daemon does, and writes later).
    """

    def __init__(self, state_dir: Path, *, log: LogFn = _no_log, readonly: bool = False) -> None:
        self.dir = state_dir
        self.path = state_dir / DB_FILE
        self.legacy = state_dir / LEGACY_ARCHIVES_FILE
        self.requests_dir = state_dir / REQUESTS_DIR
        self.readonly = readonly
        self._log = log
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._skipped_logged = 0

    # -- connection --------------------------------------------------------------

    def _error(self, err: BaseException) -> StateError:
        if isinstance(err, OSError):
            where = err.filename or self.dir
            return StateError(f"state directory: {where}: {err.strerror or err}")
        return StateError(f"state database {self.path}: {err}")

    def _conn(self) -> sqlite3.Connection:
        if self._db is not None:
            return self._db
        if self.path.is_dir():
            raise StateError(f"{self.path} is a directory; it must be the state database file")
        if self.readonly:
            db = self._open_readonly()
        else:
            self.dir.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
            try:
                db.execute("PRAGMA journal_mode=WAL")
                # WAL + NORMAL: a crash of the process loses nothing; a power cut
                # may lose the last changes, which costs a re-import at most.
                db.execute("PRAGMA synchronous=NORMAL")
                db.execute(
                    "CREATE TABLE IF NOT EXISTS archives (path TEXT PRIMARY KEY, doc TEXT NOT NULL)"
                )
                db.execute(
                    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, doc TEXT NOT NULL)"
                )
                self._migrate(db)
            except BaseException:
                db.close()
                raise
        self._db = db
        return db

    def _open_readonly(self) -> sqlite3.Connection:
        """A reader's connection; on a read-only directory, an immutable one.

        A WAL database opened read-only still creates its ``-shm`` (and needs
        ``-wal``) beside it; where that is impossible (a read-only mount, a
        directory we may not write) it is opened as immutable: no daemon can
        be writing it there anyway.
        """
        for query in ("mode=ro", "mode=ro&immutable=1"):
            db = sqlite3.connect(
                f"file:{self.path}?{query}", uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None
            )
            try:
                db.execute("PRAGMA query_only=ON")
                db.execute("SELECT count(*) FROM sqlite_master").fetchone()
            except sqlite3.OperationalError as err:
                db.close()
                code = (getattr(err, "sqlite_errorcode", 0) or 0) & 0xFF
                if code not in (sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_READONLY):
                    raise
                last = err
            else:
                return db
        raise last

    def _migrate(self, db: sqlite3.Connection) -> None:
        """Move the records of an ``archives.json`` (format 1) into the database, once."""
        if not os.path.lexists(self.legacy):
            return
        if self.legacy.is_dir():
            self._log("state.legacy_unreadable", file=str(self.legacy), error="is a directory")
            return
        records = _read_legacy(self.legacy, self._log)
        if records is None:
            aside = self.legacy.with_name(self.legacy.name + ".corrupt")
            self.legacy.replace(aside)
            self._log("state.legacy_set_aside", file=str(self.legacy), moved_to=str(aside))
            return
        with db:
            db.execute("BEGIN IMMEDIATE")
            db.executemany(
                "INSERT OR IGNORE INTO archives (path, doc) VALUES (?, ?)",
                [(r.path, json.dumps(r.to_json())) for r in records],
            )
        aside = self.legacy.with_name(self.legacy.name + ".migrated")
        self.legacy.replace(aside)
        self._log("state.migrated", file=str(self.legacy), archives=len(records), to=str(self.path))

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def _run(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        with self._lock:
            try:
                return fn(self._conn())
            except (sqlite3.Error, OSError) as err:
                if self._db is not None:
                    with contextlib.suppress(sqlite3.Error):
                        self._db.close()
                    self._db = None  # open afresh next time (the disk may be back)
                raise self._error(err) from None

    def _initialized(self) -> bool:
        """Whether the database exists and has its tables (a reader's question)."""
        if not self.path.exists():
            return False
        found = self._run(
            lambda db: db.execute(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
            ).fetchone()
        )
        return bool(found and found[0])

    # -- archives ----------------------------------------------------------------

    def load(self) -> dict[str, Record]:
        """Every archive record. A missing database is empty (or the legacy file's, read-only)."""
        if self.readonly and not self._initialized():
            # No database yet (a daemon of the JSON era, or one that could not write).
            return {r.path: r for r in _read_legacy(self.legacy, self._log) or []}
        rows: list[tuple[str]] = self._run(
            lambda db: db.execute("SELECT doc FROM archives").fetchall()
        )
        records = {}
        skipped, first = 0, ""
        for (doc,) in rows:
            try:
                record = Record.from_json(json.loads(doc))
            except (TypeError, ValueError) as err:
                skipped, first = skipped + 1, first or str(err)
                continue
            records[record.path] = record
        if skipped and skipped != self._skipped_logged:
            # Forgotten, not fatal: a forgotten archive is imported again.
            self._skipped_logged = skipped
            self._log("state.records_skipped", database=str(self.path), count=skipped, first=first)
        return records

    def put(self, records: Iterable[Record], deleted: Iterable[str] = ()) -> None:
        """Write these records and drop those paths, in one transaction."""
        rows = [(r.path, json.dumps(r.to_json())) for r in records]
        gone = [(p,) for p in deleted]

        def write(db: sqlite3.Connection) -> None:
            with db:
                db.execute("BEGIN IMMEDIATE")
                db.executemany("INSERT OR REPLACE INTO archives (path, doc) VALUES (?, ?)", rows)
                db.executemany("DELETE FROM archives WHERE path = ?", gone)

        self._run(write)

    def save(self, records: dict[str, Record]) -> None:
        """Replace every record with ``records`` (tests and tools; the daemon uses put)."""
        existing = set(self.load())
        self.put(records.values(), existing - set(records))

    # -- daemon record and pulls ------------------------------------------------------

    def _put_meta(self, key: str, value: Any) -> None:
        doc = json.dumps(value)

        def write(db: sqlite3.Connection) -> None:
            with db:
                db.execute("BEGIN IMMEDIATE")
                db.execute("INSERT OR REPLACE INTO meta (key, doc) VALUES (?, ?)", (key, doc))

        self._run(write)

    def _get_meta(self, key: str) -> Any:
        if self.readonly and not self._initialized():
            return None
        try:
            row = self._run(
                lambda db: db.execute("SELECT doc FROM meta WHERE key = ?", (key,)).fetchone()
            )
            return None if row is None else json.loads(row[0])
        except (StateError, ValueError):
            return None

    def save_daemon(self, info: dict[str, Any]) -> None:
        self._put_meta("daemon", info)

    def load_daemon(self) -> dict[str, Any] | None:
        doc = self._get_meta("daemon")
        return doc if isinstance(doc, dict) else None

    def save_pulls(self, rows: list[dict[str, Any]]) -> None:
        self._put_meta("pulls", rows)

    def load_pulls(self) -> list[dict[str, Any]]:
        rows = self._get_meta("pulls")
        return rows if isinstance(rows, list) else []

    # -- retry requests (files: the daemon's watcher sees them arrive) -----------------

    def request_retry(self, path: str) -> None:
        """Ask the running daemon to import ``path`` again (``image-agent retry``)."""
        name = hashlib.sha256(path.encode()).hexdigest()[:16]
        try:
            write_atomic(
                self.dir / REQUESTS_DIR / f"retry-{name}.json", json.dumps({"path": path}).encode()
            )
        except OSError as err:
            raise self._error(err) from None

    def take_requests(self) -> list[str]:
        """Retry requests waiting for the daemon; each is returned once."""
        out: list[str] = []
        if not self.requests_dir.is_dir():
            return out
        for f in sorted(self.requests_dir.glob("retry-*.json")):
            try:
                doc = json.loads(f.read_bytes())
                f.unlink()
            except (OSError, ValueError):
                continue
            if isinstance(doc, dict) and isinstance(doc.get("path"), str):
                out.append(doc["path"])
        return out


def _read_legacy(path: Path, log: LogFn) -> list[Record] | None:
    """Records of an ``archives.json``; None (and a log line) if it is unreadable."""
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as err:
        log("state.legacy_unreadable", file=str(path), error=str(err))
        return None
    items = doc.get("archives") if isinstance(doc, dict) else None
    if not isinstance(items, list):
        log("state.legacy_unreadable", file=str(path), error="no 'archives' list")
        return None
    out = []
    skipped, first = 0, ""
    for item in items:
        try:
            out.append(Record.from_json(item))
        except (TypeError, ValueError) as err:
            skipped, first = skipped + 1, first or str(err)
    if skipped:
        log("state.legacy_records_skipped", file=str(path), count=skipped, first=first)
    return out
