"""What ``image-agent status`` shows: the daemon's status record, every archive, every pull."""

from __future__ import annotations

import os
import time
from typing import Any

from agent.node.health import HEARTBEAT_S
from agent.node.state import StateError, Store


def status_doc(store: Store) -> dict[str, Any]:
    """Daemon health and the records, archives in mtime (import) order.

    The shape is stable (``status -o json``): {"daemon": {...}, "archives": [...],
    "pulls": [...]}. Raises StateError if the state cannot be read.
    """
    info = store.load_daemon()
    daemon: dict[str, Any] = {"running": False}
    if info:
        alive = pid_alive(int(info.get("pid", 0)))
        fresh = time.time() - float(info.get("heartbeat_at", 0)) < 3 * HEARTBEAT_S
        daemon = {
            **info,
            "running": alive,
            "healthy": alive
            and fresh
            and info.get("containerd") == "ok"
            and info.get("health", "ok") == "ok",
        }
    archives = sorted(store.load().values(), key=lambda r: (r.mtime_ns, r.path))
    return {
        "daemon": daemon,
        "archives": [r.to_json() for r in archives],
        "pulls": store.load_pulls(),
    }


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


__all__ = ["StateError", "pid_alive", "status_doc"]
