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

from agent import platforms
from agent.containerd import Containerd
from agent.platforms import Platform
from agent.sandbox import PrivateContainerd

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def ctd() -> Iterator[PrivateContainerd]:
    """A private containerd with its own root, state and socket (short path for the socket)."""
    if os.geteuid() != 0:
        pytest.fail("these tests start containerd and must run as root")
    base = tempfile.mkdtemp(prefix="ia-ctd-", dir="/tmp")
    c = PrivateContainerd(base)
    c.start()
    try:
        yield c
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
        ["ctr", "-a", ctd.address, "-n", namespace, *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0:
        raise AssertionError(f"ctr {' '.join(args)} failed: {proc.stderr}")
    return proc.stdout
