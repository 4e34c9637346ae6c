"""One daemon per state directory: an exclusive ``flock`` held for the daemon's lifetime."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from agent.errors import AgentError
from agent.node.state import write_atomic

LOCK_FILE = "lock"


class StateLocked(AgentError):
    """Another daemon holds the state directory."""


class StateLock:
    """Holds an exclusive flock on the state directory; ``<state-dir>/lock`` names our pid.

    The kernel releases the lock when the process ends, however it ends, so
    a daemon killed with SIGKILL never leaves a stale lock behind.
    """

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_FILE
        self.fd = -1

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # The lock is on the directory itself: taking it needs no write, so a
        # read-only or full state directory is still held by one daemon only.
        fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StateLocked(
                f"state directory {self.path.parent} is in use by another image-agent "
                f"({self.holder()})"
            ) from None
        self.fd = fd
        with contextlib.suppress(OSError):  # who holds it, for the next one to say
            write_atomic(self.path, f"{os.getpid()}\n".encode())

    def holder(self) -> str:
        """Who holds the lock, as the holder wrote it: ``pid N``."""
        try:
            text = self.path.read_text().strip()
        except OSError:
            text = ""
        return f"pid {text}" if text.isdigit() else "pid unknown"

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
