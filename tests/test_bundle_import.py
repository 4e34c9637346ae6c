"""Site bundles: many images in one archive, their layer chains unpacked in parallel."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from agent.archive import layout
from agent.containerd import Containerd
from agent.image.platforms import Platform
from agent.importer import Importer, ImportOptions
from agent.testing import samples
from agent.testing.processes import wait_for
from agent.testing.sandbox import PrivateContainerd
from tests.conftest import RunCli, ctr
from tests.helpers import assert_no_leases, assert_pinned, assert_unpacked, read_member

pytestmark = pytest.mark.containerd


def _bundle_images(node: Platform) -> list[samples.SampleImage]:
    """Three images on one shared base (one with a gzip layer), two on another, one alone."""
    base = samples.Layer({f"etc/base{i}": bytes([i]) * 2000 for i in range(20)})
    other = samples.Layer({"usr/lib/other": b"other base\n" * 300})
    images = []
    for i in range(3):
        top = samples.Layer({f"app/{i}": f"app {i}\n".encode() * 500}, "gzip" if i == 1 else "none")
        images.append(
            samples.SampleImage(
                f"site/app{i}:1", (samples.Variant(node, (base, top, samples.Layer({"v": b"1"}))),)
            )
        )
    for i in range(2):
        top = samples.Layer({f"tool/{i}": f"tool {i}\n".encode() * 700})
        images.append(
            samples.SampleImage(f"site/tool{i}:2", (samples.Variant(node, (other, top)),))
        )
    images.append(samples.simple_image("site/alone:3", {"alone": b"alone\n" * 100}, node))
    return images


def _snapshots(ctd: PrivateContainerd, namespace: str) -> set[str]:
    lines = ctr(ctd, namespace, "snapshots", "ls").splitlines()[1:]
    return {line.split()[0] for line in lines if line.strip()}


def _expected_chains(path: Path) -> set[str]:
    """Every ChainID the archive's images stack up to, from its configs."""
    chains: set[str] = set()
    with tarfile.open(path) as tar:
        manifest = json.loads(read_member(tar, "manifest.json"))
        for entry in manifest:
            config = layout.parse_config(read_member(tar, entry["Config"]), "c")
            chains.update(layout.chain_ids(config.diff_ids))
    return chains


@pytest.mark.parametrize("legacy", [False, True], ids=["digest-names", "legacy-names"])
def test_bundle_imports_like_ctr_at_any_concurrency(
    ctd: PrivateContainerd,
    client: Containerd,
    cli: RunCli,
    node: Platform,
    tmp_path: Path,
    legacy: bool,
) -> None:
    """A many-image docker archive with shared and unshared bases gives ctr's names and digests,
    unpacked and pinned, whether layers are applied one at a time or several at once."""
    path = tmp_path / "site.tar"
    path.write_bytes(samples.docker_archive(_bundle_images(node), legacy_names=legacy))

    # Several at once, through the command (k8s.io, the pre-scan of a regular file).
    result = cli("import", "--unpack-concurrency", "4", str(path))
    assert result.code == 0, result.err
    # One at a time, in another namespace, through the library.
    with Containerd(ctd.address, namespace="one") as one:
        Importer(one, ImportOptions(platforms=(node,), unpack_concurrency=1)).import_file(str(path))
    ctr(ctd, "ctr", "images", "import", str(path))

    def tags(namespace: str) -> dict[str, str]:
        with Containerd(ctd.address, namespace=namespace) as c:
            return {r.name: r.target.digest for r in c.list_images() if "@" not in r.name}

    theirs = tags("ctr")
    assert len(theirs) == 6
    assert tags("k8s.io") == theirs
    assert tags("one") == theirs
    chains = _expected_chains(path)
    for namespace in ("k8s.io", "one"):
        with Containerd(ctd.address, namespace=namespace) as c:
            for name in theirs:
                record = c.get_image(name)
                assert record is not None
                manifest = layout.parse_manifest(c.read_blob(record.target.digest, 1 << 20), "m")
                assert_unpacked(c, manifest.config.digest)
                assert_pinned(c, name)
                assert_pinned(c, f"{name.rsplit(':', 1)[0]}@{record.target.digest}")
            assert_no_leases(c)
        # Each shared layer was applied once: exactly the images' chains, nothing else.
        assert _snapshots(ctd, namespace) == chains


def _archive_with_bad_chain(node: Platform) -> bytes:
    """A docker archive of five images; the fourth's config names a wrong diff ID for its top layer."""
    base = samples.Layer({"etc/os": b"base\n" * 1000})
    files: dict[str, bytes] = {}
    manifest = []
    for n in range(5):
        layers = [base, samples.Layer({f"app{n}": f"{n}\n".encode() * 4000})]
        paths, diff_ids = [], []
        for layer in layers:
            data = layer.blob()
            paths.append(f"{layout.sha256(data)[7:]}.tar")
            files[paths[-1]] = data
            diff_ids.append(layout.sha256(layer.tar()))
        if n == 3:
            diff_ids[-1] = layout.sha256(b"not this layer")
        config = samples.config_bytes(node, diff_ids)
        files[f"{layout.sha256(config)[7:]}.json"] = config
        manifest.append(
            {
                "Config": f"{layout.sha256(config)[7:]}.json",
                "RepoTags": [f"bad/app{n}:1"],
                "Layers": paths,
            }
        )
    entries = [*files.items(), ("manifest.json", json.dumps(manifest).encode())]
    return samples.archive_bytes(entries)


@pytest.mark.parametrize("concurrency", ["1", "3"])
def test_a_failing_chain_leaves_no_image_and_no_lease(
    ctd: PrivateContainerd,
    client: Containerd,
    cli: RunCli,
    node: Platform,
    tmp_path: Path,
    concurrency: str,
) -> None:
    """One image's layer failing to unpack, while the other chains unpack, fails the whole
    archive in one line: no image record, no lease, and containerd collects every snapshot."""
    path = tmp_path / "bad.tar"
    path.write_bytes(_archive_with_bad_chain(node))
    result = cli("import", "--unpack-concurrency", concurrency, str(path))
    assert result.code == 1
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert "unpacks to" in lines[0] and "bad.tar" in lines[0]
    assert client.list_images() == []
    assert client.cri_images() == []
    assert_no_leases(client)
    # A failed import does not wait for containerd's collection, which runs
    # when containerd's scheduler next decides to; a synchronous lease release
    # runs one now, and then nothing may hold the failed chains' snapshots.
    client.delete_lease(client.create_lease(), sync=True)
    wait_for(lambda: _snapshots(ctd, "k8s.io") == set(), 60, "the snapshots to be collected")
