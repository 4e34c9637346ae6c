"""`image-agent bundle` and `verify`: registry -> one archive -> containerd, same images as ctr sees."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path

import pytest
import zstandard

from agent import samples
from agent.archive import layout
from agent.containerd import Containerd
from agent.platforms import Platform
from agent.sandbox import PrivateContainerd
from tests.conftest import ROOT, Registry
from tests.helpers import assert_unpacked, cri_by_tag

pytestmark = pytest.mark.containerd

BASE = samples.Layer({"etc/os-release": b"ID=base\n", "lib/libc": os.urandom(200_000)}, "gzip")


def push_images(reg: Registry, tmp: Path, node: Platform, other: Platform) -> list[str]:
    """Two single-platform images sharing a base layer, and one multi-platform image."""
    a = samples.SampleImage(
        "site/app:1", (samples.Variant(node, (BASE, samples.Layer({"app": b"A"}, "gzip"))),)
    )
    b = samples.SampleImage(
        "site/tool:2", (samples.Variant(node, (BASE, samples.Layer({"tool": b"T"}, "zstd"))),)
    )
    multi = samples.SampleImage(
        "site/multi:3",
        (
            samples.Variant(node, (samples.Layer({"arch": str(node).encode()}, "gzip"),)),
            samples.Variant(other, (samples.Layer({"arch": str(other).encode()}, "gzip"),)),
        ),
    )
    for image in (a, b, multi):
        path = tmp / "push.tar"
        path.write_bytes(samples.oci_archive([image]))
        subprocess.run(
            [
                "skopeo",
                "copy",
                "-q",
                "--all",
                "--dest-tls-verify=false",
                f"oci-archive:{path}",
                f"docker://{reg.host}/{image.name}",
            ],
            check=True,
            capture_output=True,
        )
    return [f"{reg.host}/site/app:1", f"{reg.host}/site/tool:2", f"{reg.host}/site/multi:3"]


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        timeout=300,
    )


def members(path: Path) -> list[str]:
    with (
        open(path, "rb") as f,
        zstandard.ZstdDecompressor().stream_reader(f) as z,
        tarfile.open(fileobj=z, mode="r|") as tar,
    ):
        return [m.name for m in tar]


def configs_by_name(client: Containerd) -> dict[str, str]:
    out = {}
    for rec in client.list_images():
        if "@" in rec.name:
            continue
        data = client.read_blob(rec.target.digest, 1 << 20)
        if layout.document_kind(rec.target.media_type, data, rec.name) == "index":
            continue  # compared through CRI below
        out[rec.name] = layout.parse_manifest(data, rec.name).config.digest
    return out


def test_bundle_round_trip_matches_ctr(
    registry,
    ctd: PrivateContainerd,
    client: Containerd,
    cli,
    node: Platform,
    other_platform: Platform,
    tmp_path: Path,
) -> None:
    """A bundle imports with image-agent and with ctr into empty stores and gives the same images."""
    reg = registry()
    refs_ = push_images(reg, tmp_path, node, other_platform)
    lst = tmp_path / "site.txt"
    lst.write_text("# the site\n" + "\n".join(refs_) + "\n")
    out = tmp_path / "site.tar.zst"
    made = run("bundle", "--list", str(lst), "-o", str(out))
    assert made.returncode == 0, made.stderr
    assert not out.with_name(out.name + ".partial").exists()

    names = members(out)
    assert names[:3] == ["oci-layout", "index.json", "image-agent-bundle.json"]
    blob_names = [n for n in names if n.startswith("blobs/")]
    assert len(blob_names) == len(set(blob_names))  # the shared base layer is stored once

    checked = run("verify", "-o", "json", str(out))
    assert checked.returncode == 0, checked.stderr
    (rep,) = json.loads(checked.stdout)
    assert rep["platforms"] == [str(node)]
    assert sorted(i["name"] for i in rep["images"]) == sorted(refs_)

    result = cli("import", str(out))
    assert result.code == 0, result.err
    # ctr 1.6 reads plain tar: decompress on the way, as operators do.
    subprocess.run(
        f"zstd -dc {out} | ctr -a {ctd.address} -n ctr images import -",
        shell=True,
        check=True,
        capture_output=True,
    )
    ours = cri_by_tag(client)
    assert set(refs_) <= set(ours)
    for config in ours.values():
        assert_unpacked(client, config)
    with Containerd(ctd.address, namespace="ctr") as theirs:
        assert {r.name for r in theirs.list_images()} >= set(refs_)
        assert configs_by_name(theirs) == {
            k: v for k, v in configs_by_name(client).items() if k in configs_by_name(theirs)
        }


def test_platform_selection_and_default_name(
    registry, node: Platform, other_platform: Platform, tmp_path: Path
) -> None:
    """--platform picks another platform's blobs only, and the default file name carries the platform."""
    reg = registry()
    refs_ = push_images(reg, tmp_path, node, other_platform)
    lst = tmp_path / "l.txt"
    lst.write_text(refs_[2] + "\n")
    made = run("bundle", "--list", str(lst), "--platform", str(other_platform), cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    out = tmp_path / f"bundle-{other_platform.os}-{other_platform.architecture}.tar.zst"
    assert out.exists()
    (rep,) = json.loads(run("verify", "-o", "json", str(out)).stdout)
    assert rep["platforms"] == [str(other_platform)]
    assert rep["absent_platforms"] == [str(node)]


def test_bundle_from_registry_with_auth(
    registry, node: Platform, other_platform: Platform, tmp_path: Path
) -> None:
    """--auth-file credentials reach a registry behind htpasswd; without them the bundle fails cleanly."""
    reg = registry("agent", "pw-123")
    image = samples.simple_image("priv/x:1", {"x": b"secret stuff"}, node, "gzip")
    src = tmp_path / "src.tar"
    src.write_bytes(samples.oci_archive([image]))
    reg.push(src, "priv/x:1")
    lst = tmp_path / "l.txt"
    lst.write_text(f"{reg.host}/priv/x:1\n")
    out = tmp_path / "p.tar.zst"
    denied = run("bundle", "--list", str(lst), "-o", str(out))
    assert denied.returncode == 1 and "unauthorized" in denied.stderr
    assert "Traceback" not in denied.stderr
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()
    creds = tmp_path / "auth.json"
    creds.write_text(json.dumps({"auths": {reg.host: {"username": "agent", "password": "pw-123"}}}))
    ok = run("bundle", "--list", str(lst), "-o", str(out), "--auth-file", str(creds))
    assert ok.returncode == 0, ok.stderr
    assert run("verify", str(out)).returncode == 0


def test_missing_blob_fails_cleanly(registry, node: Platform, tmp_path: Path) -> None:
    """A blob the registry cannot serve stops the bundle with a clear error and no partial file."""
    reg = registry()
    image = samples.simple_image("gone/x:1", {"x": os.urandom(100_000)}, node, "gzip")
    src = tmp_path / "src.tar"
    src.write_bytes(samples.oci_archive([image]))
    reg.push(src, "gone/x:1")
    layer = layout.sha256(image.variants[0].layers[0].blob())
    req = urllib.request.Request(f"http://{reg.host}/v2/gone/x/blobs/{layer}", method="DELETE")
    urllib.request.urlopen(req, timeout=10)
    lst = tmp_path / "l.txt"
    lst.write_text(f"{reg.host}/gone/x:1\n")
    out = tmp_path / "g.tar.zst"
    result = run("bundle", "--list", str(lst), "-o", str(out))
    assert result.returncode == 1
    assert "not found" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()


def test_verify_reports_corruption(node: Platform, tmp_path: Path) -> None:
    """verify names the file and the problem for a damaged archive, and exits 1."""
    data = bytearray(
        samples.oci_archive([samples.simple_image("v:1", {"f": os.urandom(50_000)}, node)])
    )
    data[len(data) // 2] ^= 0xFF
    path = tmp_path / "bad.tar"
    path.write_bytes(bytes(data))
    result = run("verify", str(path))
    assert result.returncode == 1
    assert str(path) in result.stderr and "does not match" in result.stderr


def test_broken_download_resumes(registry, node: Platform, tmp_path: Path) -> None:
    """A connection dropped mid-layer is resumed with an HTTP range; the bundle comes out whole."""
    from tests.proxy import Proxy

    reg = registry()
    image = samples.simple_image("big/x:1", {"x": os.urandom(3 << 20)}, node, "gzip")
    src = tmp_path / "src.tar"
    src.write_bytes(samples.oci_archive([image]))
    reg.push(src, "big/x:1")
    proxy = Proxy(reg.host, cut_after=1 << 20)
    lst = tmp_path / "l.txt"
    lst.write_text(f"{proxy.host}/big/x:1\n")
    out = tmp_path / "r.tar.zst"
    result = run("bundle", "--list", str(lst), "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert proxy.cuts == 1
    assert run("verify", str(out)).returncode == 0
