"""Bad archives: one clear line naming the file and the reason, exit 1, nothing left behind."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard

from agent import samples
from agent.containerd import Containerd
from agent.platforms import Platform
from tests.helpers import assert_nothing_imported, cri_by_tag

pytestmark = pytest.mark.containerd


def _good(node: Platform, size: int = 0) -> bytes:
    files = {"data": os.urandom(size) if size else b"payload\n"}
    return samples.oci_archive([samples.simple_image("good:1", files, node)])


def _entries(archive: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]


def _tamper_largest_blob(archive: bytes) -> bytes:
    entries = _entries(archive)
    i = max(range(len(entries)), key=lambda n: len(entries[n][1]))
    name, data = entries[i]
    entries[i] = (name, data[:-1] + bytes([data[-1] ^ 0xFF]))
    return samples.archive_bytes(entries)


def _drop_largest_blob(archive: bytes) -> bytes:
    entries = _entries(archive)
    i = max(range(len(entries)), key=lambda n: len(entries[n][1]))
    return samples.archive_bytes(entries[:i] + entries[i + 1 :])


def _raw_tar_member(name: str, data: bytes, typ: bytes = tarfile.REGTYPE) -> bytes:
    """A tar whose member name is written verbatim (tarfile would not write unsafe names for us)."""
    info = tarfile.TarInfo("placeholder")
    info.size = len(data)
    info.type = typ
    header = bytearray(info.tobuf(format=tarfile.USTAR_FORMAT))
    header[0:100] = name.encode().ljust(100, b"\0")
    header[148:156] = b"        "
    checksum = sum(header[:512])
    header[148:156] = f"{checksum:06o}\0 ".encode()
    body = data + b"\0" * (-len(data) % 512)
    return bytes(header) + body + b"\0" * 1024


CASES: dict[str, tuple[Callable[[Platform], bytes], str]] = {
    "truncated-zstd": (
        lambda n: zstandard.ZstdCompressor().compress(_good(n, 200_000))[:-5000],
        "truncated",
    ),
    "corrupt-gzip": (
        lambda n: (lambda d: d[:200] + bytes(b ^ 0x5A for b in d[200:400]) + d[400:])(
            samples.compress(_good(n, 50_000), "gzip")
        ),
        "corrupt gzip data",
    ),
    "not-a-tar": (lambda n: b"this is a text file, not an archive\n" * 40, "not a tar archive"),
    "empty": (lambda n: b"", "file is empty"),
    "unknown-layout": (
        lambda n: samples.archive_bytes([("hello.txt", b"hi"), ("docs/readme", b"x")]),
        "unknown archive layout",
    ),
    "small-blob-digest-mismatch": (
        lambda n: _tamper_largest_blob(_good(n)),
        "does not match its digest",
    ),
    "large-blob-digest-mismatch": (
        lambda n: _tamper_largest_blob(_good(n, 6 << 20)),
        "does not match its digest",
    ),
    "missing-layer": (lambda n: _drop_largest_blob(_good(n)), "missing from the archive"),
    "oversized-json": (
        lambda n: samples.archive_bytes([("manifest.json", b"[" + b" " * (5 << 20) + b"]")]),
        "larger than 4 MiB",
    ),
    "dotdot-path": (lambda n: _raw_tar_member("../../etc/evil", b"x"), "leaves the archive"),
    "absolute-path": (lambda n: _raw_tar_member("/etc/evil", b"x"), "absolute path"),
    "dotdot-in-manifest-json": (
        lambda n: samples.archive_bytes(
            [
                (
                    "manifest.json",
                    json.dumps(
                        [{"Config": "c.json", "RepoTags": ["x:1"], "Layers": ["../../l.tar"]}]
                    ).encode(),
                )
            ]
        ),
        "leaves the archive",
    ),
    "diff-id-mismatch": (
        lambda n: _lying_config(n),
        "unpacks to",
    ),
}


def _lying_config(node: Platform) -> bytes:
    """A well-formed archive whose config names the wrong uncompressed layer digest."""
    entries = _entries(_good(node))
    out = []
    for name, data in entries:
        if data.startswith(b"{") and b'"rootfs"' in data:
            continue
        out.append((name, data))
    # Rebuild with a config pointing at a bogus diff_id.
    image = samples.simple_image("good:1", {"data": b"payload\n"}, node)
    layer = image.variants[0].layers[0]
    config = samples.config_bytes(node, ["sha256:" + "ab" * 32])
    from agent.archive import layout

    c = layout.sha256(config)
    layer_blob = layer.blob()
    ld = layout.sha256(layer_blob)
    manifest = layout.dump_json(
        {
            "schemaVersion": 2,
            "mediaType": layout.OCI_MANIFEST,
            "config": {"mediaType": layout.OCI_CONFIG, "digest": c, "size": len(config)},
            "layers": [{"mediaType": layout.OCI_LAYER, "digest": ld, "size": len(layer_blob)}],
        }
    )
    m = layout.sha256(manifest)
    index = layout.dump_json(
        {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": layout.OCI_MANIFEST,
                    "digest": m,
                    "size": len(manifest),
                    "annotations": {layout.ANNOTATION_IMAGE_NAME: "liar:1"},
                }
            ],
        }
    )
    return samples.archive_bytes(
        [
            (f"blobs/sha256/{c[7:]}", config),
            (f"blobs/sha256/{ld[7:]}", layer_blob),
            (f"blobs/sha256/{m[7:]}", manifest),
            ("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'),
            ("index.json", index),
        ]
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_archive_gives_one_clear_line_and_leaves_nothing(
    case: str, cli, client: Containerd, node: Platform, tmp_path: Path
) -> None:
    """Each kind of bad archive: exit 1, one line naming file and reason, no traceback, nothing imported."""
    make, reason = CASES[case]
    path = tmp_path / f"{case}.tar"
    path.write_bytes(make(node))
    result = cli("import", str(path))
    assert result.code == 1, result
    assert "Traceback" not in result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert str(path) in lines[0]
    import re

    assert re.search(reason, lines[0]), lines[0]
    assert result.out == ""
    assert_nothing_imported(client)


def test_one_bad_file_does_not_stop_the_others(
    cli, client: Containerd, node: Platform, tmp_path: Path
) -> None:
    """import with several files imports the good ones and exits 1 for the bad one."""
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"garbage" * 100)
    good = tmp_path / "good.tar"
    good.write_bytes(_good(node))
    result = cli("import", str(bad), str(good))
    assert result.code == 1
    assert str(bad) in result.err
    assert "docker.io/library/good:1" in cri_by_tag(client)


def test_missing_file(cli, tmp_path: Path) -> None:
    """A path that does not exist is reported by name."""
    result = cli("import", str(tmp_path / "nope.tar"))
    assert result.code == 1
    assert "nope.tar" in result.err and "No such file" in result.err


def test_containerd_unreachable(cli, tmp_path: Path) -> None:
    """No containerd at the address: a clear message and exit 3, not a traceback."""
    archive = tmp_path / "a.tar"
    archive.write_bytes(b"x")
    result = cli("import", str(archive), address=str(tmp_path / "none.sock"))
    assert result.code == 3
    assert "not reachable" in result.err
    assert "Traceback" not in result.err
