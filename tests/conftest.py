"""Fixtures: a real containerd per test, archive tools, the CLI as a process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import structlog

from agent import platforms
from agent.containerd import Containerd
from agent.platforms import Platform
from agent.sandbox import PrivateContainerd, select_release

ROOT = Path(__file__).resolve().parent.parent
# The containerd release under test (IMAGE_AGENT_TEST_CONTAINERD: 1.6, 1.7 or 2).
RELEASE = select_release()


@pytest.fixture
def ctd() -> Iterator[PrivateContainerd]:
    """A private containerd with its own root, state and socket (short path for the socket)."""
    if os.geteuid() != 0:
        pytest.fail("these tests start containerd and must run as root")
    base = tempfile.mkdtemp(prefix="ia-ctd-", dir="/tmp")
    c = PrivateContainerd(base, release=RELEASE)
    c.start()
    try:
        yield c
        died = c.proc is not None and c.proc.poll() is not None
        log = c.log_path.read_text(errors="replace") if c.log_path.exists() else ""
        if died or "panic:" in log:
            # The agent must never be what takes the node's runtime down.
            start = log.find("panic:")
            tail = log[start : start + 4000] if start >= 0 else log[-4000:]
            pytest.fail(f"containerd {RELEASE.name} died during the test:\n{tail}")
    finally:
        c.cleanup()


@pytest.fixture
def client(ctd: PrivateContainerd) -> Iterator[Containerd]:
    with Containerd(ctd.address) as c:
        yield c


@pytest.fixture
def node() -> Platform:
    return platforms.node()


@pytest.fixture
def other_platform(node: Platform) -> Platform:
    return (
        Platform("linux", "arm64") if node.architecture != "arm64" else Platform("linux", "amd64")
    )


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(ctd: PrivateContainerd):  # type: ignore[no-untyped-def]
    """Run ``image-agent`` as a separate process against the test's containerd."""

    def run(*args: str, address: str | None = None, timeout: float = 300) -> CliResult:
        env = dict(os.environ, CONTAINERD_ADDRESS=address or ctd.address)
        proc = subprocess.run(
            [sys.executable, "-m", "agent", *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=timeout,
        )
        return CliResult(proc.returncode, proc.stdout, proc.stderr)

    return run


@dataclass
class Podman:
    """podman with its own vfs storage, no network needed (images are FROM scratch)."""

    root: Path

    def __call__(self, *args: str) -> str:
        cmd = [
            "podman",
            "--root",
            str(self.root / "storage"),
            "--runroot",
            str(self.root / "run"),
            "--storage-driver",
            "vfs",
            "--cgroup-manager",
            "cgroupfs",
            "--events-backend",
            "none",
            *args,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed: {proc.stderr}")
        return proc.stdout

    def build(self, tag: str, files: dict[str, bytes], *, platform: str = "") -> None:
        ctx = Path(tempfile.mkdtemp(dir=self.root))
        lines = ["FROM scratch"]
        for i, (name, data) in enumerate(sorted(files.items())):
            (ctx / f"f{i}").write_bytes(data)
            lines.append(f"COPY f{i} /{name}")
        (ctx / "Containerfile").write_text("\n".join(lines) + "\n")
        extra = ["--platform", platform] if platform else []
        self("build", "--quiet", *extra, "-t", tag, "-f", str(ctx / "Containerfile"), str(ctx))


@pytest.fixture(scope="session")
def podman() -> Iterator[Podman]:
    if shutil.which("podman") is None:
        pytest.fail("podman is not installed (scripts/bootstrap installs it)")
    base = Path(tempfile.mkdtemp(prefix="ia-podman-", dir="/tmp"))
    try:
        yield Podman(base)
    finally:
        subprocess.run(["rm", "-rf", str(base)], check=False)


def ctr(ctd: PrivateContainerd, namespace: str, *args: str) -> str:
    proc = subprocess.run(
        [ctd.release.ctr, "-a", ctd.address, "-n", namespace, *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0:
        raise AssertionError(f"ctr {' '.join(args)} failed: {proc.stderr}")
    return proc.stdout


def wait_for(cond, timeout: float = 30.0, what: str = "condition"):  # type: ignore[no-untyped-def]
    """Poll ``cond`` until it returns a truthy value or the deadline passes."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def free_port() -> int:
    import socket

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
        import time

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
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env
            )
        self.started = time.monotonic()
        wait_for(lambda: any(e["event"] == "watching" for e in self.events()), 120, "daemon start")

    def events(self, all_runs: bool = False) -> list[dict]:  # type: ignore[type-arg]
        import json

        if not self.log_path.exists():
            return []
        with open(self.log_path, "rb") as f:
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

    def named(self, event: str, all_runs: bool = False) -> list[dict]:  # type: ignore[type-arg]
        return [e for e in self.events(all_runs) if e.get("event") == event]

    def status(self) -> dict:  # type: ignore[type-arg]
        import json

        out = subprocess.run(
            [sys.executable, "-m", "agent", "status", "-o", "json", "--state-dir", str(self.state)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=True,
        ).stdout
        return json.loads(out)  # type: ignore[no-any-return]

    def record(self, path: Path) -> dict | None:  # type: ignore[type-arg]
        for a in self.status()["archives"]:
            if a["path"] == str(path):
                return a  # type: ignore[no-any-return]
        return None

    def wait_state(self, path: Path, state: str, timeout: float = 60) -> dict:  # type: ignore[type-arg]
        def check():  # type: ignore[no-untyped-def]
            rec = self.record(path)
            return rec if rec and rec["state"] == state else None

        return wait_for(check, timeout, f"{path.name} to be {state}")  # type: ignore[no-any-return]

    def stop(self, timeout: float = 10.0) -> int:
        import signal as _signal

        assert self.proc is not None
        self.proc.send_signal(_signal.SIGTERM)
        code = self.proc.wait(timeout)
        self.proc = None
        return code

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self.proc = None


@pytest.fixture
def daemon(ctd: PrivateContainerd, tmp_path: Path):  # type: ignore[no-untyped-def]
    procs: list[DaemonProcess] = []

    def make(*extra: str) -> DaemonProcess:
        d = DaemonProcess(ctd, tmp_path / f"d{len(procs)}", list(extra))
        procs.append(d)
        return d

    yield make
    for d in procs:
        if d.proc is not None:
            d.kill()


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
        import urllib.error
        import urllib.request

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
        with open(self.base / "registry.log", "ab") as log:
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


@pytest.fixture
def registry(ctd: PrivateContainerd, tmp_path: Path):  # type: ignore[no-untyped-def]
    """Start registries on demand; the test's containerd may pull from them over plain HTTP."""
    started: list[Registry] = []

    def make(user: str = "", password: str = "") -> Registry:
        r = Registry(tmp_path / f"registry{len(started)}", user, password)
        r.start()
        ctd.registry_plain_http(r.host)
        started.append(r)
        return r

    yield make
    for r in started:
        r.stop()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that starts a containerd (directly or through another fixture)."""
    for item in items:
        if "ctd" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.containerd)


@pytest.fixture(autouse=True)
def _structlog_defaults() -> Iterator[None]:
    """Each test starts with structlog's defaults.

    A test that runs the CLI in-process leaves its configuration behind (a
    level filter, a stream that may be closed), which would hide later
    tests' log lines from ``capture_logs``.
    """
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()
