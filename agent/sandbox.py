"""A private containerd for the demo, the tests and the benchmarks.

It runs from its own config with root, state, socket and CNI directories
under one base directory, so it never touches a containerd the machine
already runs. Needs root (containerd mounts overlay filesystems).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType

from agent.containerd.client import Containerd
from agent.errors import AgentError, ContainerdUnavailable

_CONFIG = """\
version = 2
root = "{base}/root"
state = "{base}/state"
oom_score = 0

[grpc]
  address = "{base}/containerd.sock"

[ttrpc]
  address = "{base}/containerd.sock.ttrpc"

[debug]
  level = "{log_level}"

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{base}/opt"

[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "{snapshotter}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{base}/cni/bin"
    conf_dir = "{base}/cni/conf"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{base}/certs.d"
"""


class PrivateContainerd:
    """Start containerd under ``base``; stop it and (optionally) clean up on exit."""

    def __init__(
        self,
        base: str | os.PathLike[str],
        *,
        snapshotter: str = "overlayfs",
        binary: str = "containerd",
        log_level: str = "warn",
    ) -> None:
        self.base = Path(base).resolve()
        self.snapshotter = snapshotter
        self.binary = binary
        self.log_level = log_level
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return str(self.base / "containerd.sock")

    @property
    def root(self) -> str:
        return str(self.base / "root")

    @property
    def log_path(self) -> Path:
        return self.base / "containerd.log"

    def registry_plain_http(self, host: str) -> None:
        """Let the CRI plugin pull from ``host`` (e.g. 127.0.0.1:5000) over plain HTTP."""
        d = self.base / "certs.d" / host
        d.mkdir(parents=True, exist_ok=True)
        (d / "hosts.toml").write_text(
            f'server = "http://{host}"\n\n[host."http://{host}"]\n'
            '  capabilities = ["pull", "resolve"]\n  skip_verify = true\n'
        )

    def start(self, timeout: float = 30.0) -> None:
        if shutil.which(self.binary) is None:
            raise AgentError(f"{self.binary} is not installed (apt-get install containerd)")
        for sub in ("root", "state", "opt", "cni/bin", "cni/conf", "certs.d"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        config = self.base / "config.toml"
        config.write_text(
            _CONFIG.format(base=self.base, snapshotter=self.snapshotter, log_level=self.log_level)
        )
        sock = Path(self.address)
        if sock.exists():
            sock.unlink()
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [self.binary, "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        with Containerd(self.address) as client:
            while time.monotonic() < deadline:
                if self.proc is not None and self.proc.poll() is not None:
                    raise AgentError(
                        f"containerd exited with {self.proc.returncode}; see {self.log_path}"
                    )
                if os.path.exists(self.address):
                    try:
                        client.version()
                        client.cri_images()
                        return
                    except ContainerdUnavailable as err:
                        last = err
                time.sleep(0.05)
        raise AgentError(f"containerd did not become ready in {timeout:.0f}s ({last})")

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """Stop containerd abruptly (SIGKILL), as a crash would."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def cleanup(self) -> None:
        """Unmount anything left under the base directory and remove it."""
        self.stop()
        mounts = []
        with open("/proc/self/mounts") as f:
            for line in f:
                target = line.split()[1]
                if target.startswith(str(self.base) + "/"):
                    mounts.append(target)
        for target in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", target], check=False)
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> PrivateContainerd:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
