"""systemd notifications (sd_notify protocol): READY, WATCHDOG, STOPPING, STATUS."""

from __future__ import annotations

import os
import socket


class Notifier:
    """Sends to ``$NOTIFY_SOCKET`` when systemd set it; does nothing otherwise."""

    def __init__(self, address: str | None = None) -> None:
        self.address = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        usec = os.environ.get("WATCHDOG_USEC", "")
        self.watchdog_s = int(usec) / 1e6 if usec.isdigit() else 0.0

    def send(self, *fields: str) -> None:
        if not self.address:
            return
        addr = self.address
        if addr.startswith("@"):
            addr = "\0" + addr[1:]
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                s.connect(addr)
                s.sendall("\n".join(fields).encode())
        except OSError:
            pass  # systemd gone or not listening: nothing to tell
