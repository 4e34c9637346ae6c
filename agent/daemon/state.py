"""What the daemon remembers about each archive, stored atomically in the state directory."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

ARCHIVES_FILE = "archives.json"
DAEMON_FILE = "daemon.json"
PULLS_FILE = "pulls.json"
REQUESTS_DIR = "requests"
FORMAT_VERSION = 1


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

    def to_json(self) -> dict[str, Any]:
        doc = dataclasses.asdict(self)
        doc["state"] = str(self.state)
        doc["mtime"] = self.mtime_ns / 1e9
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Record:
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in doc.items() if k in names}
        values["state"] = State(values.get("state", "pending"))
        return cls(**values)


def write_atomic(path: Path, data: bytes) -> None:
    """Write via a temp file in the same directory, fsync, rename: never a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dirfd = os.open(path.parent, os.O_DIRECTORY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class Store:
    """The records of every archive, keyed by path, in ``<state-dir>/archives.json``."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir
        self.path = state_dir / ARCHIVES_FILE
        self.requests_dir = state_dir / REQUESTS_DIR

    def load(self) -> dict[str, Record]:
        try:
            doc = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            # A damaged state file costs re-imports, never a crash: imports are idempotent.
            return {}
        records = {}
        for item in doc.get("archives", []) if isinstance(doc, dict) else []:
            try:
                record = Record.from_json(item)
            except (TypeError, ValueError):
                continue
            records[record.path] = record
        return records

    def save(self, records: dict[str, Record]) -> None:
        doc = {
            "version": FORMAT_VERSION,
            "archives": [r.to_json() for r in sorted(records.values(), key=lambda r: r.path)],
        }
        write_atomic(self.path, json.dumps(doc, indent=1).encode())

    def save_daemon(self, info: dict[str, Any]) -> None:
        write_atomic(self.dir / DAEMON_FILE, json.dumps(info, indent=1).encode())

    def load_daemon(self) -> dict[str, Any] | None:
        try:
            doc = json.loads((self.dir / DAEMON_FILE).read_bytes())
        except (OSError, ValueError):
            return None
        return doc if isinstance(doc, dict) else None

    def save_pulls(self, rows: list[dict[str, Any]]) -> None:
        write_atomic(self.dir / PULLS_FILE, json.dumps({"pulls": rows}, indent=1).encode())

    def load_pulls(self) -> list[dict[str, Any]]:
        try:
            doc = json.loads((self.dir / PULLS_FILE).read_bytes())
        except (OSError, ValueError):
            return []
        rows = doc.get("pulls") if isinstance(doc, dict) else None
        return rows if isinstance(rows, list) else []

    def request_retry(self, path: str) -> None:
        """Ask the running daemon to import ``path`` again (``image-agent retry``)."""
        name = hashlib.sha256(path.encode()).hexdigest()[:16]
        write_atomic(
            self.dir / REQUESTS_DIR / f"retry-{name}.json", json.dumps({"path": path}).encode()
        )

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
