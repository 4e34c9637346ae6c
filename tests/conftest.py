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
from typing import Protocol

import pytest
import structlog

from agent.containerd import Containerd
from agent.image import platforms
from agent.image.platforms import Platform
from agent.testing.processes import DaemonProcess, Registry
from agent.testing.sandbox import PrivateContainerd, select_release
from tests.cluster_servers import ClusterProcess, FixtureServer

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
    """The agent's own client, connected to the test's containerd."""
    with Containerd(ctd.address) as c:
        yield c


@pytest.fixture
def node() -> Platform:
    """This machine's platform (what the importer picks by default)."""
    return platforms.node()


@pytest.fixture
def other_platform(node: Platform) -> Platform:
    """A platform that is not this machine's."""
    return (
        Platform("linux", "arm64") if node.architecture != "arm64" else Platform("linux", "amd64")
    )


@dataclass
class CliResult:
    code: int
    out: str
    err: str


class RunCli(Protocol):
    """The ``cli`` fixture: ``image-agent ARGS`` as a process; its exit code and output."""

    def __call__(
        self, *args: str, address: str | None = None, timeout: float = 300
    ) -> CliResult: ...


class StartDaemon(Protocol):
    """The ``daemon`` fixture: a daemon process (not started) with extra arguments."""

    def __call__(self, *extra: str) -> DaemonProcess: ...


class StartRegistry(Protocol):
    """The ``registry`` fixture: a started registry, with basic auth if a user is given."""

    def __call__(self, user: str = "", password: str = "") -> Registry: ...


class StartCluster(Protocol):
    """The ``cluster`` fixture: a cluster server process, up, with these arguments."""

    def __call__(self, *args: str, scheme: str = "http", cafile: str = "") -> ClusterProcess: ...


class ServeFiles(Protocol):
    """The ``fixtures`` fixture: an HTTP server on loopback answering with these bodies
    (asking for this ``user:password`` first if given)."""

    def __call__(self, files: dict[str, bytes], basic_auth: str = "") -> FixtureServer: ...


@pytest.fixture
def cli(ctd: PrivateContainerd) -> RunCli:
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
            check=False,
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
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
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
    """podman with storage of its own for the session, removed at the end."""
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
        check=False,
    )
    if proc.returncode != 0:
        raise AssertionError(f"ctr {' '.join(args)} failed: {proc.stderr}")
    return proc.stdout


@pytest.fixture
def daemon(ctd: PrivateContainerd, tmp_path: Path) -> Iterator[StartDaemon]:
    """Daemon processes against the test's containerd, killed at the end if still running."""
    procs: list[DaemonProcess] = []

    def make(*extra: str) -> DaemonProcess:
        d = DaemonProcess(ctd, tmp_path / f"d{len(procs)}", list(extra))
        procs.append(d)
        return d

    yield make
    for d in procs:
        if d.proc is not None:
            d.kill()


@pytest.fixture
def registry(ctd: PrivateContainerd, tmp_path: Path) -> Iterator[StartRegistry]:
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


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[StartCluster]:
    """Cluster server processes on demand, stopped at the end of the test."""
    started: list[ClusterProcess] = []

    def make(*args: str, scheme: str = "http", cafile: str = "") -> ClusterProcess:
        c = ClusterProcess(tmp_path, *args, scheme=scheme, cafile=cafile)
        started.append(c)
        return c

    yield make
    for c in started:
        c.close()


@pytest.fixture
def fixtures() -> Iterator[ServeFiles]:
    """Source servers on demand (Che dashboards, list URLs), shut down at the end."""
    servers: list[FixtureServer] = []

    def make(files: dict[str, bytes], basic_auth: str = "") -> FixtureServer:
        s = FixtureServer(files, basic_auth)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


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
