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
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from agent.containerd.client import Containerd
from agent.errors import AgentError, ContainerdUnavailable

# What every release's config has: its own root, state and sockets, no
# metrics, and NRI off so that private instances do not share its socket.
_COMMON = """\
version = {version}
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

[plugins."io.containerd.nri.v1.nri"]
  disable = true
"""

# The CRI plugin in version 2 configs, which 1.6 and 1.7 read.
_CRI_V2 = """
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

_CONFIG_V3_MAJOR = 2  # containerd releases from this major on take config version 3

# containerd 2.x's native version 3: the CRI plugin is split into images,
# runtime and the gRPC server.
_CRI_V3 = """
[plugins."io.containerd.cri.v1.images"]
  snapshotter = "{snapshotter}"
  [plugins."io.containerd.cri.v1.images".registry]
    config_path = "{base}/certs.d"

[plugins."io.containerd.cri.v1.runtime"]
  enable_selinux = false
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["{base}/cni/bin"]
    conf_dir = "{base}/cni/conf"

[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
"""

# The releases the test matrix runs on. "1.6" is the system's containerd
# (Debian 12); the others are unpacked by scripts/fetch-containerd.
RELEASES = ("1.6", "1.7", "2")
RELEASE_ENV = "IMAGE_AGENT_TEST_CONTAINERD"
CACHE_ENV = "IMAGE_AGENT_CONTAINERD_CACHE"


@dataclass(frozen=True)
class Release:
    """One containerd release: its binaries and the config version it reads natively."""

    name: str
    containerd: str
    ctr: str

    @property
    def major(self) -> int:
        return int(self.name.split(".")[0])


def select_release(name: str | None = None) -> Release:
    """The release named (default: ``$IMAGE_AGENT_TEST_CONTAINERD``, else the system's)."""
    name = name if name is not None else os.environ.get(RELEASE_ENV, "")
    if name in ("", "1.6", "system"):
        return Release("1.6", "containerd", "ctr")
    if name not in RELEASES:
        raise AgentError(f"{RELEASE_ENV}={name}: expected one of {', '.join(RELEASES)}")
    cache = Path(
        os.environ.get(CACHE_ENV, "") or Path.home() / ".cache" / "image-agent" / "containerd"
    )
    bin_dir = cache / name / "usr" / "bin"
    if not (bin_dir / "containerd").exists():
        raise AgentError(
            f"containerd {name} is not in {cache} (run scripts/fetch-containerd {name})"
        )
    return Release(name, str(bin_dir / "containerd"), str(bin_dir / "ctr"))


class PrivateContainerd:
    """Start containerd under ``base``; stop it and (optionally) clean up on exit."""

    def __init__(
        self,
        base: str | os.PathLike[str],
        *,
        snapshotter: str = "overlayfs",
        release: Release | None = None,
        log_level: str = "warn",
    ) -> None:
        self.base = Path(base).resolve()
        self.snapshotter = snapshotter
        self.release = release if release is not None else select_release()
        self.binary = self.release.containerd
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
        version, cri = (3, _CRI_V3) if self.release.major >= _CONFIG_V3_MAJOR else (2, _CRI_V2)
        config.write_text(
            (_COMMON + cri).format(
                version=version,
                base=self.base,
                snapshotter=self.snapshotter,
                log_level=self.log_level,
            )
        )
        sock = Path(self.address)
        if sock.exists():
            sock.unlink()
        log = self.log_path.open("ab")
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
                if Path(self.address).exists():
                    try:
                        client.version()
                        client.cri_images()
                    except ContainerdUnavailable as err:
                        last = err
                    else:
                        return
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
        with Path("/proc/self/mounts").open() as f:
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
