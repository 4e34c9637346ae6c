"""Behaviour that differs between containerd releases (1.6, 1.7, 2.x), tested on each.

The fixture starts the release named by ``IMAGE_AGENT_TEST_CONTAINERD`` and
fails any test after which containerd died, showing its panic.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from agent.archive import layout
from agent.containerd import Containerd
from agent.errors import NotFound
from agent.image.platforms import Platform
from agent.importer import PINNED_LABEL
from agent.testing import samples
from agent.testing.sandbox import PrivateContainerd
from tests.conftest import RELEASE, ROOT
from tests.helpers import assert_no_leases, assert_pinned, assert_unpacked, cri_by_tag


def _archive(path: Path, node: Platform, name: str, layers: int = 2) -> Path:
    image = samples.SampleImage(
        name,
        (
            samples.Variant(
                node,
                tuple(
                    samples.Layer({f"f{i}": f"layer {i} of {name}\n".encode() * 2000})
                    for i in range(layers)
                ),
            ),
        ),
    )
    path.write_bytes(samples.docker_archive([image]))
    return path


def _import(ctd: PrivateContainerd, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", "import", *args],
        capture_output=True,
        text=True,
        env={"CONTAINERD_ADDRESS": ctd.address, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        cwd=ROOT,
        timeout=300,
        check=False,
    )


def test_label_changes_keep_the_record_and_the_runtime(
    ctd: PrivateContainerd, client: Containerd, node: Platform, tmp_path: Path
) -> None:
    """Pinning and unpinning an image leaves its target and other labels alone, and containerd up.

    containerd 1.7 and 2.x crash on an ``Images.Update`` whose image has no
    target, whatever the field mask says; 1.6 accepted it.
    """
    result = _import(ctd, "--no-pin", str(_archive(tmp_path / "a.tar", node, "pin/me:1")))
    assert result.returncode == 0, result.stderr
    name = "docker.io/pin/me:1"
    before = client.get_image(name)
    assert before is not None
    assert PINNED_LABEL not in before.labels
    client.label_image(name, {"example.com/other": "kept"})

    client.label_image(name, {PINNED_LABEL: "pinned"})
    pinned = client.get_image(name)
    assert pinned is not None
    assert pinned.target.digest == before.target.digest
    assert pinned.labels[PINNED_LABEL] == "pinned"
    assert pinned.labels["example.com/other"] == "kept"

    client.unlabel_image(name, PINNED_LABEL)
    unpinned = client.get_image(name)
    assert unpinned is not None
    assert unpinned.target.digest == before.target.digest
    assert PINNED_LABEL not in unpinned.labels
    assert unpinned.labels["example.com/other"] == "kept"

    with pytest.raises(NotFound):
        client.label_image("docker.io/pin/absent:1", {PINNED_LABEL: "pinned"})
    client.unlabel_image("docker.io/pin/absent:1", PINNED_LABEL)  # absent: nothing to do
    assert client.version()  # still serving


def test_cri_reports_the_pin_where_the_release_does(
    ctd: PrivateContainerd, client: Containerd, node: Platform, tmp_path: Path
) -> None:
    """The CRI of 1.7 and later reports our pin itself; `image-agent images` shows it on every release."""
    result = _import(ctd, str(_archive(tmp_path / "a.tar", node, "pin/cri:1")))
    assert result.returncode == 0, result.stderr
    [cri] = [i for i in client.cri_images() if "docker.io/pin/cri:1" in i.repo_tags]
    assert cri.pinned is (RELEASE.major >= 2 or RELEASE.name == "1.7")
    listed = subprocess.run(
        [sys.executable, "-m", "agent", "images", "-o", "json"],
        capture_output=True,
        text=True,
        env={"CONTAINERD_ADDRESS": ctd.address},
        cwd=ROOT,
        timeout=60,
        check=True,
    )
    [row] = [r for r in json.loads(listed.stdout) if "docker.io/pin/cri:1" in r["tags"]]
    assert row["pinned"] is True


def test_side_by_side_with_ctr_import(
    ctd: PrivateContainerd, client: Containerd, node: Platform, tmp_path: Path
) -> None:
    """image-agent and ctr (as k3s's own importer does) importing one archive at once both succeed.

    Whichever writes the record last, the image ends complete, unpacked,
    pinned and listed by the CRI, and no lease of ours is left.
    """
    archive = _archive(tmp_path / "both.tar", node, "both/app:1", layers=4)
    ours: list[subprocess.CompletedProcess[str]] = []
    start = threading.Barrier(2)

    def run_ours() -> None:
        start.wait()
        ours.append(_import(ctd, str(archive)))

    thread = threading.Thread(target=run_ours)
    thread.start()
    start.wait()
    theirs = subprocess.run(
        [ctd.release.ctr, "-a", ctd.address, "-n", "k8s.io", "images", "import", str(archive)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    thread.join(300)
    assert theirs.returncode == 0, theirs.stderr
    assert ours and ours[0].returncode == 0, ours[0].stderr if ours else "did not finish"

    name = "docker.io/both/app:1"
    assert_pinned(client, name)
    record = client.get_image(name)
    assert record is not None
    manifest = layout.parse_manifest(client.read_blob(record.target.digest, 1 << 20), "manifest")
    assert_unpacked(client, manifest.config.digest)
    assert cri_by_tag(client)[name] == manifest.config.digest
    assert_no_leases(client)
