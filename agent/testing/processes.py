"""Processes tests and benchmarks drive: the daemon, a docker-registry, and polling helpers.

They run the real programs (``python -m agent run``, ``docker-registry``),
each with its own directory, port and log, and stop them on request.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from agent.testing.sandbox import PrivateContainerd

#: The source checkout ``python -m agent`` runs from.
ROOT = Path(__file__).resolve().parent.parent.parent

T = TypeVar("T")
Record = dict[str, Any]


def wait_for(cond: Callable[[], T], timeout: float = 30.0, what: str = "condition") -> T:
    """Poll ``cond`` until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DaemonProcess:
    """``image-agent run`` as a real process against the test's containerd."""

    def __init__(self, ctd: PrivateContainerd, base: Path, extra: list[str]) -> None:
        self.ctd = ctd
        self.images = base / "images"
        self.state = base / "state"
        self.images.mkdir(parents=True, exist_ok=True)
        self.log_path = base / "daemon.log"
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    def _env(self) -> dict[str, str]:
        """The daemon's environment: not under systemd unless a subclass says so."""
        env = dict(os.environ, CONTAINERD_ADDRESS=self.ctd.address)
        env.pop("NOTIFY_SOCKET", None)
        return env

    def start(self, *more: str) -> None:
        env = self._env()
        cmd = [
            sys.executable,
            "-m",
            "agent",
            "run",
            "--images-dir",
            str(self.images),
            "--state-dir",
            str(self.state),
            "--settle",
            "0.5",
            "--listen",
            "127.0.0.1:0",  # the daemon binds a free port and logs it: no race for one
            "--containerd-root",
            self.ctd.root,
            *self.extra,
            *more,
        ]
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env
            )
        self.started = time.monotonic()
        wait_for(lambda: any(e["event"] == "watching" for e in self.events()), 120, "daemon start")

    def events(self, all_runs: bool = False) -> list[Record]:
        if not self.log_path.exists():
            return []
        with self.log_path.open("rb") as f:
            if not all_runs:
                f.seek(self._log_offset)
            out = []
            for line in f.read().decode(errors="replace").splitlines():
                try:
                    out.append(json.loads(line))
                except ValueError:
                    out.append({"event": "non-json", "line": line})
            return out

    @property
    def port(self) -> int:
        """The HTTP port of the running daemon, from its ``http.listening`` line."""
        listening = self.named("http.listening")
        assert listening, "the daemon has not logged its HTTP port"
        return int(listening[-1]["listen"].rpartition(":")[2])

    def named(self, event: str, all_runs: bool = False) -> list[Record]:
        return [e for e in self.events(all_runs) if e.get("event") == event]

    def status(self) -> Record:
        out = subprocess.run(
            [sys.executable, "-m", "agent", "status", "-o", "json", "--state-dir", str(self.state)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=True,
        ).stdout
        status: Record = json.loads(out)
        return status

    def record(self, path: Path) -> Record | None:
        archives: list[Record] = self.status()["archives"]
        for a in archives:
            if a["path"] == str(path):
                return a
        return None

    def wait_state(self, path: Path, state: str, timeout: float = 60) -> Record:
        def check() -> Record | None:
            rec = self.record(path)
            return rec if rec and rec["state"] == state else None

        found = wait_for(check, timeout, f"{path.name} to be {state}")
        assert found is not None
        return found

    def stop(self, timeout: float = 10.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self.proc = None
        return code

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self.proc = None


class NotifiedDaemon(DaemonProcess):
    """The daemon under a notify socket and WATCHDOG_USEC, as systemd runs it."""

    def __init__(self, ctd: PrivateContainerd, base: Path, watchdog_usec: int) -> None:
        super().__init__(ctd, base, [])
        self.sock_path = Path(tempfile.mkdtemp(prefix="ia-n-", dir="/tmp")) / "notify"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.sock_path))
        self.watchdog_usec = watchdog_usec

    def _env(self) -> dict[str, str]:
        return dict(
            super()._env(),
            NOTIFY_SOCKET=str(self.sock_path),
            WATCHDOG_USEC=str(self.watchdog_usec),
        )

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self.sock_path.parent, ignore_errors=True)


class Registry:
    """A real docker-registry (distribution) on 127.0.0.1, optionally behind htpasswd."""

    def __init__(self, base: Path, user: str = "", password: str = "") -> None:
        self.base = base
        self.port = free_port()
        self.user, self.password = user, password
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start on this registry's port; the first start moves to another if that one was taken."""
        first = not (self.base / "config.yml").exists()
        for _ in range(3):
            if self._start():
                return
            if not first:
                break
            self.port = free_port()
        log = (self.base / "registry.log").read_text(errors="replace")[-2000:]
        raise AssertionError(f"docker-registry did not start on {self.host}: {log}")

    def _start(self) -> bool:
        self.base.mkdir(parents=True, exist_ok=True)
        auth = ""
        if self.user:
            htpasswd = subprocess.run(
                ["htpasswd", "-Bbn", self.user, self.password],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            (self.base / "htpasswd").write_text(htpasswd)
            auth = f"auth:\n  htpasswd:\n    realm: test\n    path: {self.base / 'htpasswd'}\n"
        (self.base / "config.yml").write_text(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n"
            f"    rootdirectory: {self.base / 'data'}\n  delete:\n    enabled: true\n"
            f"http:\n  addr: {self.host}\n{auth}"
        )
        with (self.base / "registry.log").open("ab") as log:
            self.proc = subprocess.Popen(
                ["docker-registry", "serve", str(self.base / "config.yml")],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

        proc = self.proc

        def up() -> str:
            if proc.poll() is not None:
                return "exited"  # e.g. the port was taken meanwhile
            try:
                urllib.request.urlopen(f"http://{self.host}/v2/", timeout=1)
            except urllib.error.HTTPError:
                return "up"  # 401 with auth: it answers
            except OSError:
                return ""
            return "up"

        return wait_for(up, 120, "docker-registry to answer") == "up"

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def push(self, archive: Path, ref: str) -> None:
        """Push an OCI archive as ``<this registry>/<ref>`` with skopeo."""
        creds = ["--dest-creds", f"{self.user}:{self.password}"] if self.user else []
        subprocess.run(
            [
                "skopeo",
                "copy",
                "-q",
                "--dest-tls-verify=false",
                *creds,
                f"oci-archive:{archive}",
                f"docker://{self.host}/{ref}",
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
