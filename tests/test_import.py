"""`image-agent import` against a real containerd, with archives from real tools and our own."""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from agent.archive import layout
from agent.containerd import Containerd
from agent.image.labels import DISTRIBUTION_SOURCE_PREFIX, LABEL_MAX
from agent.image.platforms import Platform
from agent.importer import Importer, ImportOptions
from agent.testing import samples
from agent.testing.sandbox import PrivateContainerd
from tests.conftest import Podman, RunCli, StartRegistry, ctr
from tests.helpers import (
    assert_no_leases,
    assert_pinned,
    assert_unpacked,
    cri_by_tag,
    read_member,
)


def _write(path: Path, data: bytes, compression: str = "none") -> Path:
    with path.open("wb") as f:
        samples.write(f, data, compression)
    return path


def _cli_compress(path: Path, tool: list[str], out: Path) -> Path:
    """Compress with the real command-line tool (``tool -c path > out``)."""
    with out.open("wb") as f:
        subprocess.run([*tool, "-c", str(path)], check=True, stdout=f)
    return out


@pytest.mark.parametrize(
    ("suffix", "compressor"),
    [
        (".tar", None),
        (".tar.gz", ["gzip"]),
        (".tar.zst", ["zstd", "-q", "--long=27"]),
        (".tar.bz2", ["bzip2"]),
        (".tar.lz4", ["lz4", "-q"]),
    ],
)
def test_oci_archive_any_compression_is_listed_unpacked_and_pinned(
    cli: RunCli,
    client: Containerd,
    node: Platform,
    tmp_path: Path,
    suffix: str,
    compressor: list[str] | None,
) -> None:
    """An operator's archive, whatever its outer compression, shows up in crictl, unpacked and pinned."""
    image = samples.simple_image("web:1.0", {"index.html": b"<h1>hi</h1>\n"}, node, "gzip")
    plain = _write(tmp_path / "site.tar", samples.oci_archive([image]))
    # The file name says nothing about the compression: detection is by magic bytes.
    path = tmp_path / f"disguised{suffix[::-1]}"
    if compressor:
        _cli_compress(plain, compressor, path)
    else:
        plain.rename(path)
    result = cli("import", str(path))
    assert result.code == 0, result.err
    assert "docker.io/library/web:1.0" in result.out

    tags = cri_by_tag(client)
    assert "docker.io/library/web:1.0" in tags
    record = client.get_image("docker.io/library/web:1.0")
    assert record is not None
    digest_record = client.get_image(f"docker.io/library/web@{record.target.digest}")
    assert digest_record is not None
    assert_unpacked(client, tags["docker.io/library/web:1.0"])
    assert_pinned(client, "docker.io/library/web:1.0")
    assert_no_leases(client)


def test_docker_archive_matches_ctr_import(
    ctd: PrivateContainerd, client: Containerd, cli: RunCli, node: Platform, tmp_path: Path
) -> None:
    """Same names, manifest and config digests as `ctr images import`, for podman- and docker-style archives."""
    images = [
        samples.SampleImage(
            "app:1",
            (
                samples.Variant(
                    node, (samples.Layer({"a": b"A" * 3000}), samples.Layer({"b": b"B"}))
                ),
            ),
        ),
        samples.simple_image("registry.example:5000/team/tool:v2", {"t": b"tool"}, node),
    ]
    for legacy in (False, True):
        path = _write(
            tmp_path / f"d{legacy}.tar", samples.docker_archive(images, legacy_names=legacy)
        )
        result = cli("import", str(path))
        assert result.code == 0, result.err
        ctr(ctd, f"ctr{legacy:d}", "images", "import", str(path))
    ours = {r.name: r.target.digest for r in client.list_images() if "@" not in r.name}
    with Containerd(ctd.address, namespace="ctr0") as theirs:
        ctr_images = {r.name: r.target.digest for r in theirs.list_images()}
    assert ours == ctr_images
    for config in cri_by_tag(client).values():
        assert_unpacked(client, config)


def test_podman_archives_match_ctr(
    ctd: PrivateContainerd, client: Containerd, cli: RunCli, podman: Podman, tmp_path: Path
) -> None:
    """podman save (docker-archive, multi-image, oci-archive) imports with the config digests ctr sees."""
    podman.build("localhost/pm/alpha:1", {"alpha": b"alpha\n" * 100})
    podman.build("localhost/pm/beta:2", {"beta": b"beta\n", "etc/conf": b"x=1\n"})
    multi = tmp_path / "multi.tar"
    podman(
        "save",
        "-q",
        "--multi-image-archive",
        "-o",
        str(multi),
        "localhost/pm/alpha:1",
        "localhost/pm/beta:2",
    )
    oci = tmp_path / "oci.tar"
    podman("save", "-q", "--format", "oci-archive", "-o", str(oci), "localhost/pm/beta:2")
    for path in (multi, oci):
        result = cli("import", str(path))
        assert result.code == 0, result.err
        ctr(ctd, "ctr", "images", "import", str(path))
    tags = cri_by_tag(client)
    assert set(tags) == {"localhost/pm/alpha:1", "localhost/pm/beta:2"}
    with Containerd(ctd.address, namespace="ctr") as theirs:
        ctr_configs = {}
        for rec in theirs.list_images():
            manifest = layout.parse_manifest(theirs.read_blob(rec.target.digest, 1 << 20), "m")
            ctr_configs[rec.name] = manifest.config.digest
    assert tags["localhost/pm/alpha:1"] == ctr_configs["localhost/pm/alpha:1"]
    for config in tags.values():
        assert_unpacked(client, config)
    assert_no_leases(client)


def test_skopeo_zstd_layers_and_umoci_layout(
    client: Containerd, cli: RunCli, podman: Podman, tmp_path: Path
) -> None:
    """Archives from skopeo (zstd-compressed layers) and umoci (bare tag + --base-name) import and unpack."""
    podman.build("localhost/sk/zed:1", {"z": b"zstd layer\n" * 1000})
    src = tmp_path / "src.tar"
    podman("save", "-q", "--format", "oci-archive", "-o", str(src), "localhost/sk/zed:1")
    zst = tmp_path / "zstd-layers.tar"
    subprocess.run(
        [
            "skopeo",
            "copy",
            "-q",
            "--dest-compress-format",
            "zstd",
            "--dest-compress",
            f"oci-archive:{src}",
            f"oci-archive:{zst}:localhost/sk/zed:1",
        ],
        check=True,
        capture_output=True,
    )
    result = cli("import", str(zst))
    assert result.code == 0, result.err

    layout_dir = tmp_path / "umoci"
    bundle = tmp_path / "bundle"
    for cmd in (
        ["umoci", "init", "--layout", str(layout_dir)],
        ["umoci", "new", "--image", f"{layout_dir}:v1"],
        ["umoci", "unpack", "--image", f"{layout_dir}:v1", str(bundle)],
    ):
        subprocess.run(cmd, check=True, capture_output=True)
    (bundle / "rootfs" / "hello").write_text("from umoci\n")
    subprocess.run(
        ["umoci", "repack", "--image", f"{layout_dir}:v1", str(bundle)],
        check=True,
        capture_output=True,
    )
    umoci_tar = tmp_path / "umoci.tar"
    with tarfile.open(umoci_tar, "w") as tar:
        tar.add(layout_dir, arcname=".")
    bare = cli("import", str(umoci_tar))
    assert bare.code == 1 and "no named image" in bare.err
    result = cli("import", "--base-name", "example.org/umoci/img", str(umoci_tar))
    assert result.code == 0, result.err

    tags = cri_by_tag(client)
    assert {"localhost/sk/zed:1", "example.org/umoci/img:v1"} <= set(tags)
    for config in tags.values():
        assert_unpacked(client, config)


def _multi_platform(node: Platform, other: Platform) -> samples.SampleImage:
    return samples.SampleImage(
        "multi:1",
        (
            samples.Variant(node, (samples.Layer({"arch": str(node).encode()}, "gzip"),)),
            samples.Variant(other, (samples.Layer({"arch": str(other).encode()}, "gzip"),)),
        ),
    )


def _config_platforms(client: Containerd) -> set[str]:
    found = set()
    for blob_digest in _all_digests(client):
        data = client.read_blob(blob_digest, 1 << 20)
        if b'"rootfs"' in data:
            found.add(str(layout.parse_config(data, "c").platform))
    return found


def _all_digests(client: Containerd) -> list[str]:
    rec = client.get_image("docker.io/library/multi:1")
    assert rec is not None
    index = layout.parse_index(client.read_blob(rec.target.digest, 1 << 20))
    out = []
    for m in index:
        if client.blob_info(m.digest):
            manifest = layout.parse_manifest(client.read_blob(m.digest, 1 << 20), "m")
            out.append(manifest.config.digest)
    return out


def test_multi_platform_imports_node_platform_by_default(
    cli: RunCli, client: Containerd, node: Platform, other_platform: Platform, tmp_path: Path
) -> None:
    """A multi-arch archive loads only this node's platform unless asked otherwise."""
    path = _write(
        tmp_path / "multi.tar", samples.oci_archive([_multi_platform(node, other_platform)])
    )
    assert cli("import", str(path)).code == 0
    assert _config_platforms(client) == {str(node)}
    assert "docker.io/library/multi:1" in cri_by_tag(client)


def test_platform_flag_and_all_platforms(
    cli: RunCli, client: Containerd, node: Platform, other_platform: Platform, tmp_path: Path
) -> None:
    """--platform picks another platform; --all-platforms imports every one present."""
    path = _write(
        tmp_path / "multi.tar", samples.oci_archive([_multi_platform(node, other_platform)])
    )
    assert cli("import", "--platform", str(other_platform), str(path)).code == 0
    assert _config_platforms(client) == {str(other_platform)}
    assert cli("import", "--all-platforms", str(path)).code == 0
    assert _config_platforms(client) == {str(node), str(other_platform)}


def test_archive_without_other_platforms_blobs(
    cli: RunCli, client: Containerd, node: Platform, other_platform: Platform, tmp_path: Path
) -> None:
    """Archives that omit other platforms' blobs (ctr export, k3s #10132) import the node's platform."""
    full = samples.oci_archive([_multi_platform(node, other_platform)])
    src = tarfile.open(fileobj=__import__("io").BytesIO(full))
    keep = []
    other_blobs = _blobs_of_platform(src, other_platform)
    for member in src.getmembers():
        if member.name.rsplit("/", 1)[-1] in other_blobs:
            continue
        keep.append((member.name, read_member(src, member)))
    path = _write(tmp_path / "partial.tar", samples.archive_bytes(keep))
    result = cli("import", str(path))
    assert result.code == 0, result.err
    assert "docker.io/library/multi:1" in cri_by_tag(client)
    other = cli("import", "--platform", str(other_platform), str(path))
    assert other.code == 1
    assert "missing" in other.err or "no image" in other.err


def _blobs_of_platform(tar: tarfile.TarFile, plat: Platform) -> set[str]:
    blobs = {
        m.name.rsplit("/", 1)[-1]: read_member(tar, m)
        for m in tar.getmembers()
        if m.name.startswith("blobs/")
    }
    out = set()
    for data in blobs.values():
        doc = json.loads(data) if data.startswith(b"{") else None
        if isinstance(doc, dict) and "manifests" in doc:
            for m in doc["manifests"]:
                if m.get("platform", {}).get("architecture") == plat.architecture:
                    hexd = m["digest"][7:]
                    manifest = json.loads(blobs[hexd])
                    out.add(hexd)
                    out.add(manifest["config"]["digest"][7:])
                    out.update(layer["digest"][7:] for layer in manifest["layers"])
    return out


def test_oci_wins_over_docker_manifest(
    cli: RunCli, client: Containerd, node: Platform, tmp_path: Path
) -> None:
    """Docker >= 25 archives carry both layouts; the OCI index decides the names."""
    oci = samples.oci_archive([samples.simple_image("both:oci", {"f": b"1"}, node)])
    src = tarfile.open(fileobj=__import__("io").BytesIO(oci))
    entries = [(m.name, read_member(src, m)) for m in src.getmembers()]
    docker_manifest = json.dumps(
        [{"Config": "missing.json", "RepoTags": ["both:docker"], "Layers": []}]
    ).encode()
    path = _write(
        tmp_path / "both.tar", samples.archive_bytes([*entries, ("manifest.json", docker_manifest)])
    )
    result = cli("import", str(path))
    assert result.code == 0, result.err
    assert set(cri_by_tag(client)) == {"docker.io/library/both:oci"}


def test_reimport_is_idempotent_and_moves_tags(
    cli: RunCli, client: Containerd, node: Platform, tmp_path: Path
) -> None:
    """Importing again changes nothing and writes no blob; a new archive with the same tag moves it."""
    v1 = _write(
        tmp_path / "v1.tar.zst",
        samples.oci_archive([samples.simple_image("app:stable", {"v": b"1"}, node)]),
        "zstd",
    )
    first = cli("import", str(v1))
    assert first.code == 0
    again = cli("import", str(v1))
    assert again.code == 0
    assert "unchanged docker.io/library/app:stable" in again.out
    assert "0 blob(s) written" in again.out
    before = cri_by_tag(client)["docker.io/library/app:stable"]

    v2 = _write(
        tmp_path / "v2.tar",
        samples.oci_archive([samples.simple_image("app:stable", {"v": b"2"}, node)]),
    )
    moved = cli("import", str(v2))
    assert moved.code == 0
    assert "updated docker.io/library/app:stable" in moved.out
    after = cri_by_tag(client)["docker.io/library/app:stable"]
    assert after != before
    assert_unpacked(client, after)


def test_no_unpack_leaves_snapshotter_alone(
    cli: RunCli, client: Containerd, node: Platform, tmp_path: Path
) -> None:
    """--no-unpack imports content and records only."""
    path = _write(
        tmp_path / "a.tar", samples.oci_archive([samples.simple_image("lazy:1", {"x": b"x"}, node)])
    )
    result = cli("import", "--no-unpack", str(path))
    assert result.code == 0
    config = cri_by_tag(client)["docker.io/library/lazy:1"]
    data = layout.parse_config(client.read_blob(config, 1 << 20), "c")
    assert not client.snapshot_exists("overlayfs", layout.chain_ids(data.diff_ids)[-1])


def test_images_command_lists_cri_view(
    cli: RunCli, client: Containerd, node: Platform, tmp_path: Path
) -> None:
    """`image-agent images -o json` shows tags, digests, id, size and pinning from the CRI."""
    path = _write(
        tmp_path / "a.tar",
        samples.oci_archive([samples.simple_image("listed:3", {"x": b"x"}, node)]),
    )
    assert cli("import", str(path)).code == 0
    result = cli("images", "-o", "json")
    assert result.code == 0, result.err
    (row,) = json.loads(result.out)
    assert row["tags"] == ["docker.io/library/listed:3"]
    assert row["digests"][0].startswith("docker.io/library/listed@sha256:")
    assert row["pinned"] is True
    assert row["size"] > 0
    table = cli("images")
    assert "docker.io/library/listed:3" in table.out and "yes" in table.out


def _snapshot_keys(ctd: PrivateContainerd) -> set[str]:
    lines = ctr(ctd, "k8s.io", "snapshots", "ls").splitlines()[1:]
    return {line.split()[0] for line in lines if line.strip()}


@pytest.mark.parametrize("legacy", [False, True], ids=["layers-in-order", "layers-shuffled"])
def test_unpack_while_streaming_leaves_only_the_image_chain(
    ctd: PrivateContainerd,
    client: Containerd,
    cli: RunCli,
    node: Platform,
    tmp_path: Path,
    legacy: bool,
) -> None:
    """Layers are unpacked as they stream in; whatever the archive's layer order, only the image's chain remains."""
    layers = tuple(samples.Layer({f"l{i}": bytes([i]) * (1000 + i)}) for i in range(4))
    image = samples.SampleImage("chain:1", (samples.Variant(node, layers),))
    path = _write(tmp_path / "c.tar", samples.docker_archive([image], legacy_names=legacy))
    result = cli("import", str(path))
    assert result.code == 0, result.err
    config = cri_by_tag(client)["docker.io/library/chain:1"]
    assert_unpacked(client, config)
    diff_ids = layout.parse_config(client.read_blob(config, 1 << 20), "c").diff_ids
    assert _snapshot_keys(ctd) == set(layout.chain_ids(diff_ids))
    assert_no_leases(client)


def test_import_returns_once_the_cri_lists_the_image(
    client: Containerd, node: Platform, tmp_path: Path
) -> None:
    """When import returns, the kubelet's view (CRI ImageStatus) already has the image at its digest.

    The CRI caches image records and catches up on events; an import that
    returned before that could send a pod to ErrImagePull on an air-gapped node.
    """
    image = samples.simple_image("seen:1", {"a": b"a"}, node)
    path = _write(tmp_path / "seen.tar", samples.oci_archive([image]))
    result = Importer(client, ImportOptions(platforms=(node,))).import_file(str(path))
    assert result.not_in_cri == []
    status = client.cri_image_status("docker.io/library/seen:1")
    assert status is not None
    assert f"docker.io/library/seen@{result.images[0].digest}" in status.repo_digests
    # The wait is real: a digest the CRI never saw is reported back after the timeout.
    never = {"docker.io/library/seen:1": "sha256:" + "0" * 64}
    assert client.cri_wait(never, 0.3) == ["docker.io/library/seen:1"]


def _sources(client: Containerd, digest: str) -> dict[str, str]:
    info = client.blob_info(digest)
    assert info is not None, f"{digest} missing"
    return {k: v for k, v in info.labels.items() if k.startswith(DISTRIBUTION_SOURCE_PREFIX)}


def _image_sources(client: Containerd, name: str) -> list[dict[str, str]]:
    """Distribution-source labels of the image's manifest, config and layers, in that order."""
    record = client.get_image(name)
    assert record is not None, f"no image record {name}"
    manifest = layout.parse_manifest(
        client.read_blob(record.target.digest, layout.MAX_JSON), "manifest"
    )
    digests = [record.target.digest, manifest.config.digest]
    digests += [layer.digest for layer in manifest.layers]
    return [_sources(client, d) for d in digests]


def test_distribution_source_labels_match_a_cri_pull(
    ctd: PrivateContainerd,
    client: Containerd,
    registry: StartRegistry,
    node: Platform,
    tmp_path: Path,
) -> None:
    """An imported image's content carries the same distribution-source labels as a CRI pull's.

    A node-local mirror (k3s's embedded registry) serves content by these
    labels; an archive's images must be as servable as pulled ones.
    """
    reg = registry()
    name = f"{reg.host}/team/parity:1"
    layers = (samples.Layer({"a": b"a" * 2000}, "gzip"), samples.Layer({"b": b"b"}, "gzip"))
    image = samples.SampleImage(name, (samples.Variant(node, layers),))
    path = _write(tmp_path / "parity.tar", samples.oci_archive([image]))
    reg.push(path, "team/parity:1")
    client.cri_pull(name)
    pulled = _image_sources(client, name)
    assert pulled and all(pulled), f"the CRI pull set no distribution-source labels: {pulled}"
    with Containerd(ctd.address, namespace="imported") as other:
        Importer(other, ImportOptions(platforms=(node,), cri_wait_s=0)).import_file(str(path))
        imported = _image_sources(other, name)
    assert imported == pulled


def test_distribution_source_label_stays_within_containerd_limit(
    client: Containerd, node: Platform, tmp_path: Path
) -> None:
    """Content shared by more repositories than one label can hold still imports.

    containerd refuses a label over 4096 bytes; the list is cut to fit, this
    import's repository kept, instead of every later import failing.
    """
    options = ImportOptions(platforms=(node,), cri_wait_s=0, unpack=False)
    layer = {"s": b"shared base"}
    first = _write(
        tmp_path / "a.tar",
        samples.oci_archive([samples.simple_image("registry.example/team/a:1", layer, node)]),
    )
    digest = Importer(client, options).import_file(str(first)).images[0].digest
    key = DISTRIBUTION_SOURCE_PREFIX + "registry.example"
    budget = LABEL_MAX - len(key)
    repos = ["team/a"]
    while len(",".join(repos)) < budget - 8:
        repos.append(f"team/r{len(repos):05d}"[: budget - len(",".join(repos)) - 1])
    full = ",".join(repos)
    client.label_blob(digest, {key: full})  # as ~300 imports would have left it
    assert len(full) <= budget and len(full) + len(",team/newcomer") > budget
    second = _write(
        tmp_path / "b.tar",
        samples.oci_archive(
            [samples.simple_image("registry.example/team/newcomer:1", layer, node)]
        ),
    )
    result = Importer(client, options).import_file(str(second))
    assert result.images[0].digest == digest
    info = client.blob_info(digest)
    assert info is not None
    value = info.labels[key]
    assert len(key) + len(value) <= LABEL_MAX
    assert "team/newcomer" in value.split(",")


def test_legacy_docker_archive_with_big_layer_imports_twice(
    client: Containerd, node: Platform, tmp_path: Path
) -> None:
    """A Docker < 25 archive (layers as ``<id>/layer.tar``, digests unknown) imports again.

    Its layers are written without an expected digest; for a layer over the
    small-blob threshold containerd answers the second write ALREADY_EXISTS,
    which is the blob being there, not a failure.
    """
    big = samples.Layer({"noise": os.urandom(layout.MAX_JSON + (1 << 20))})
    image = samples.SampleImage("legacy:1", (samples.Variant(node, (big,)),))
    path = _write(tmp_path / "legacy.tar", samples.docker_archive([image], legacy_names=True))
    with tarfile.open(path) as tar:
        assert any(n.endswith("/layer.tar") for n in tar.getnames())
    options = ImportOptions(platforms=(node,), cri_wait_s=0)
    first = Importer(client, options).import_file(str(path))
    again = Importer(client, options).import_file(str(path))
    assert again.images[0].digest == first.images[0].digest
    assert [i.action for i in again.images] == ["unchanged"] * len(again.images)
    assert_pinned(client, "docker.io/library/legacy:1")
    assert_no_leases(client)
