"""The offline .deb: built, installed with no network, then used against a real containerd."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from agent import __version__
from agent.containerd import Containerd
from agent.image.platforms import Platform
from agent.testing import samples
from agent.testing.sandbox import PrivateContainerd
from tests.conftest import ROOT
from tests.helpers import cri_by_tag

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """packaging/build-deb's package for this machine (built once; needs PyPI)."""
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run(
        [str(ROOT / "packaging" / "build-deb"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return Path(result.stdout.strip().splitlines()[-1])


def test_deb_installs_offline_and_imports(
    deb: Path, ctd: PrivateContainerd, client: Containerd, node: Platform, tmp_path: Path
) -> None:
    """At a site with no network, the package installs from its own wheels and imports archives."""
    info = subprocess.run(
        ["dpkg-deb", "-f", str(deb), "Package", "Version", "Depends"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "Package: image-agent" in info and f"Version: {__version__}" in info
    listing = subprocess.run(
        ["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True
    ).stdout
    for path in (
        "./lib/systemd/system/image-agent.service",
        "./etc/default/image-agent",
        "./usr/lib/image-agent/install",
        "./usr/bin/image-agent",
    ):
        assert path in listing

    root = tmp_path / "root"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    prefix = root / "opt" / "image-agent"
    if shutil.which("unshare") is None:
        pytest.fail("unshare (util-linux) is needed to prove the install uses no network")
    # What postinst runs, in a network namespace with no interfaces up: offline for real.
    install = subprocess.run(
        ["unshare", "-n", "sh", str(root / "usr/lib/image-agent/install"), str(prefix)],
        capture_output=True,
        text=True,
        timeout=600,
        env={k: v for k, v in os.environ.items() if not k.startswith("PIP_")},
        check=False,
    )
    assert install.returncode == 0, install.stderr
    exe = prefix / "bin" / "image-agent"
    version = subprocess.run([str(exe), "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.strip() == f"image-agent {__version__}"

    archive = tmp_path / "site.tar.zst"
    with archive.open("wb") as f:
        samples.write(f, samples.oci_archive(samples.demo_images(node)), "zstd")
    result = subprocess.run(
        [str(exe), "import", "--address", ctd.address, str(archive)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "docker.io/image-agent/sample-app:1.0" in cri_by_tag(client)
