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

from agent.archive import layout
from agent.containerd import Containerd
from agent.image.platforms import Platform
from agent.testing import samples
from tests.conftest import RunCli, StartDaemon
from tests.helpers import assert_nothing_imported, cri_by_tag, read_member


def _good(node: Platform, size: int = 0) -> bytes:
    files = {"data": os.urandom(size) if size else b"payload\n"}
    return samples.oci_archive([samples.simple_image("good:1", files, node)])


def _entries(archive: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        return [(m.name, read_member(tar, m)) for m in tar.getmembers()]


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


def _header(name: str, size: int, typ: bytes) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type = size, typ
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def _pax_bomb(node: Platform) -> bytes:
    """4 KiB of gzip holding a 4 MB pax header of the records that make old tarfile quadratic."""
    payload = b"2 " * 2_000_000
    raw = _header("././@PaxHeader", len(payload), tarfile.XHDTYPE) + payload
    raw += b"\0" * (-len(payload) % 512) + _header("a", 0, tarfile.REGTYPE) + b"\0" * 1024
    return samples.compress(raw, "gzip")


def _gnu_long_name_bomb(node: Platform) -> bytes:
    """A GNU long-name header claiming 64 MiB (tarfile would read it whole into memory)."""
    size = 64 << 20
    raw = _header("././@LongLink", size, tarfile.GNUTYPE_LONGNAME) + b"a" * 4096
    return samples.compress(raw, "zstd")


def _malformed_pax_records(node: Platform) -> bytes:
    """Pax records whose lengths do not tile the header (the quadratic regex's food)."""
    payload = b"9 " + b"a" * 3000 + b"\n"
    raw = _header("p", len(payload), tarfile.XHDTYPE) + payload + b"\0" * (-len(payload) % 512)
    return raw + _header("a", 0, tarfile.REGTYPE) + b"\0" * 1024


DEEP = b"[" * 100_000 + b"]" * 100_000


def _one_image_layout(name: str, manifest: bytes, blobs: list[bytes]) -> bytes:
    """An OCI layout archive: ``blobs`` in order, then ``manifest``, indexed as ``name``."""
    m = layout.sha256(manifest)
    index = layout.dump_json(
        {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": layout.OCI_MANIFEST,
                    "digest": m,
                    "size": len(manifest),
                    "annotations": {layout.ANNOTATION_IMAGE_NAME: name},
                }
            ],
        }
    )
    return samples.archive_bytes(
        [
            *((f"blobs/sha256/{layout.sha256(b)[7:]}", b) for b in blobs),
            (f"blobs/sha256/{m[7:]}", manifest),
            ("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'),
            ("index.json", index),
        ]
    )


def _oci_with(node: Platform, replace: Callable[[str, bytes], bytes]) -> bytes:
    """The good OCI archive with each member's bytes passed through ``replace``."""
    return samples.archive_bytes([(n, replace(n, d)) for n, d in _entries(_good(node))])


def _deep_config(node: Platform) -> bytes:
    """A manifest pointing at a config nested 100,000 deep (digest and size correct)."""
    from agent.archive import layout

    entries = dict(_entries(_good(node)))
    config = b'{"rootfs":' + DEEP + b"}"
    c = layout.sha256(config)
    out = []
    for name, data in entries.items():
        if data.startswith(b"{") and isinstance(json.loads(data).get("layers"), list):
            doc = json.loads(data)
            doc["config"] = {"mediaType": layout.OCI_CONFIG, "digest": c, "size": len(config)}
            manifest = layout.dump_json(doc)
            m = layout.sha256(manifest)
            index = {
                "schemaVersion": 2,
                "manifests": [
                    {
                        "mediaType": layout.OCI_MANIFEST,
                        "digest": m,
                        "size": len(manifest),
                        "annotations": {layout.ANNOTATION_IMAGE_NAME: "deep:1"},
                    }
                ],
            }
            out.append(("index.json", layout.dump_json(index)))
            out.append((f"blobs/sha256/{m[7:]}", manifest))
        elif name != "index.json":
            out.append((name, data))
    out.append((f"blobs/sha256/{c[7:]}", config))
    return samples.archive_bytes(out)


def _flip_bytes(data: bytes, start: int, end: int) -> bytes:
    """``data`` with every byte in [start, end) XOR-ed: damage inside a compressed stream."""
    return data[:start] + bytes(b ^ 0x5A for b in data[start:end]) + data[end:]


def _many_entries_manifest(node: Platform) -> bytes:
    """A docker-archive manifest.json of 45,000 images (under the 4 MiB size limit)."""
    entry = {"Config": "c.json", "RepoTags": ["x:1"], "Layers": ["l.tar"]}
    doc = json.dumps([entry] * 45_000).encode()
    assert len(doc) < 4 << 20
    return samples.archive_bytes([("manifest.json", doc)])


def _repeated_layer(node: Platform) -> bytes:
    """An image that uses the same (real, present) layer 10,000 times."""
    from agent.archive import layout

    layer = samples.tar_bytes({"f": b"x"})
    ld = layout.sha256(layer)
    config = samples.config_bytes(node, [ld] * 10_000)
    c = layout.sha256(config)
    manifest = layout.dump_json(
        {
            "schemaVersion": 2,
            "mediaType": layout.OCI_MANIFEST,
            "config": {"mediaType": layout.OCI_CONFIG, "digest": c, "size": len(config)},
            "layers": [{"mediaType": layout.OCI_LAYER, "digest": ld, "size": len(layer)}] * 10_000,
        }
    )
    return _one_image_layout("repeat:1", manifest, [layer, config])


def _zstd_long(data: bytes, window_log: int) -> bytes:
    """``data`` compressed by the zstd tool with ``--long``, streamed so the window is kept."""
    import subprocess

    return subprocess.run(
        ["zstd", "-q", "-c", f"--long={window_log}", "-"],
        input=data,
        capture_output=True,
        check=True,
    ).stdout


CASES: dict[str, tuple[Callable[[Platform], bytes], str]] = {
    "pax-bomb": (_pax_bomb, r"extended header of 4000000 bytes exceeds the 64 KiB limit"),
    "gnu-long-name-bomb": (_gnu_long_name_bomb, r"extended header of 67108864 bytes exceeds"),
    "malformed-pax-records": (_malformed_pax_records, r"pax record at byte 0 has a wrong length"),
    "deep-index-json": (
        lambda n: _oci_with(n, lambda name, d: DEEP if name == "index.json" else d),
        "index.json nests deeper than 64 levels",
    ),
    "deep-manifest-json": (
        lambda n: samples.archive_bytes([("manifest.json", DEEP)]),
        "manifest.json nests deeper than 64 levels",
    ),
    "deep-config": (_deep_config, "config nests deeper than 64 levels"),
    "zstd-long31": (
        lambda n: _zstd_long(_good(n), 31),
        r"zstd window of 2 GiB \(--long=31\) exceeds the 128 MiB allowed by --memory-budget",
    ),
    "manifest-json-45000-entries": (
        _many_entries_manifest,
        "manifest.json has 45000 images, more than the limit of 1000",
    ),
    "repeated-layer": (_repeated_layer, "10000 layers, more than the limit of 500"),
    "blob-name-not-a-digest": (
        lambda n: samples.archive_bytes([("blobs/sha256/not-a-digest", b"x")]),
        "blob name is not a sha256 digest",
    ),
    "blob-name-md5": (
        lambda n: samples.archive_bytes([("blobs/md5/abc", b"x")]),
        "unsupported digest algorithm 'md5'",
    ),
    "truncated-zstd": (
        lambda n: zstandard.ZstdCompressor().compress(_good(n, 200_000))[:-5000],
        "truncated",
    ),
    "corrupt-gzip": (
        lambda n: _flip_bytes(samples.compress(_good(n, 50_000), "gzip"), 200, 400),
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
        lambda n: _lying_config(n),  # noqa: PLW0108 - defined further down
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
    return _one_image_layout("liar:1", manifest, [config, layer_blob])


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_archive_gives_one_clear_line_and_leaves_nothing(
    case: str, cli: RunCli, client: Containerd, node: Platform, tmp_path: Path
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
    cli: RunCli, client: Containerd, node: Platform, tmp_path: Path
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


def test_missing_file(cli: RunCli, tmp_path: Path) -> None:
    """A path that does not exist is reported by name."""
    result = cli("import", str(tmp_path / "nope.tar"))
    assert result.code == 1
    assert "nope.tar" in result.err and "No such file" in result.err


def test_containerd_unreachable(cli: RunCli, tmp_path: Path) -> None:
    """No containerd at the address: a clear message and exit 3, not a traceback."""
    archive = tmp_path / "a.tar"
    archive.write_bytes(b"x")
    result = cli("import", str(archive), address=str(tmp_path / "none.sock"))
    assert result.code == 3
    assert "not reachable" in result.err
    assert "Traceback" not in result.err


def test_memory_budget_decides_the_zstd_window(
    cli: RunCli, client: Containerd, node: Platform, tmp_path: Path
) -> None:
    """A --long=27 archive fails with the window and the setting named under a 112Mi budget, and imports under the default."""
    path = tmp_path / "long27.tar.zst"
    path.write_bytes(_zstd_long(_good(node), 27))
    small = cli("import", "--memory-budget", "112Mi", str(path))
    assert small.code == 1, small
    (line,) = small.err.strip().splitlines()
    assert (
        "zstd window of 128 MiB (--long=27) exceeds the 16 MiB allowed by --memory-budget 112 MiB"
        in line
    )
    assert "IMAGE_AGENT_MEMORY_BUDGET" in line
    assert_nothing_imported(client)
    ok = cli("import", str(path))
    assert ok.code == 0, ok
    assert "docker.io/library/good:1" in cri_by_tag(client)


def test_member_count_bound(cli: RunCli, client: Containerd, tmp_path: Path) -> None:
    """An archive with more tar headers than --max-archive-members is refused at the first one over."""
    path = tmp_path / "many.tar"
    path.write_bytes(samples.archive_bytes([(f"f{i}", b"") for i in range(50)]))
    result = cli("import", "--max-archive-members", "20", str(path))
    assert result.code == 1, result
    assert "more than 20 tar headers" in result.err
    assert_nothing_imported(client)


def test_memory_budget_too_small_is_a_usage_error(cli: RunCli, tmp_path: Path) -> None:
    """A budget that leaves no room for any window is refused as usage, before any archive is read."""
    result = cli("import", "--memory-budget", "64Mi", str(tmp_path / "x.tar"))
    assert result.code == 2, result
    assert "--memory-budget 64 MiB is below" in result.err


def test_daemon_marks_a_long31_archive_failed_once(
    daemon: StartDaemon, client: Containerd, node: Platform
) -> None:
    """The daemon fails a --long=31 archive with the window named, tries it once, and goes on with the next archive."""
    d = daemon()
    d.start()
    bad = d.images / "a-long31.tar.zst"
    bad.write_bytes(_zstd_long(_good(node), 31))
    record = d.wait_state(bad, "failed")
    assert "zstd window of 2 GiB" in str(record), record
    good = d.images / "b-good.tar"
    good.write_bytes(_good(node))
    d.wait_state(good, "imported")
    started = [e for e in d.named("import.started") if e.get("file") == str(bad)]
    assert len(started) == 1, started
    (failed,) = [e for e in d.named("import.failed") if e.get("file") == str(bad)]
    assert "--memory-budget" in failed["error"]


@pytest.mark.parametrize(
    "case", ["pax-bomb", "deep-index-json", "deep-config", "zstd-long31", "repeated-layer"]
)
def test_verify_refuses_hostile_archives_in_one_line(
    case: str, cli: RunCli, node: Platform, tmp_path: Path
) -> None:
    """verify gives the same one-line reason as import for the hostile archives, in seconds
    rather than hours (the generous deadline only catches a hang on a busy machine), no traceback."""
    make, reason = CASES[case]
    path = tmp_path / f"{case}.tar"
    path.write_bytes(make(node))
    result = cli("verify", str(path), timeout=120)
    assert result.code == 1, result
    assert "Traceback" not in result.err
    (line,) = result.err.strip().splitlines()
    import re

    assert str(path) in line and re.search(reason, line), line


def _index_fan_out(node: Platform, n: int = 200) -> bytes:
    """index.json -> an index of n entries all naming one index of n entries: n*n manifests from two blobs."""
    from agent.archive import layout

    entries = dict(_entries(_good(node)))
    top = json.loads(entries.pop("index.json"))["manifests"][0]
    top.pop("annotations", None)
    leaf = layout.dump_json(
        {"schemaVersion": 2, "mediaType": layout.OCI_INDEX, "manifests": [top] * n}
    )
    ld = layout.sha256(leaf)
    child = {"mediaType": layout.OCI_INDEX, "digest": ld, "size": len(leaf)}
    mid = layout.dump_json(
        {"schemaVersion": 2, "mediaType": layout.OCI_INDEX, "manifests": [child] * n}
    )
    md = layout.sha256(mid)
    index = layout.dump_json(
        {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": layout.OCI_INDEX,
                    "digest": md,
                    "size": len(mid),
                    "annotations": {layout.ANNOTATION_IMAGE_NAME: "fan:1"},
                }
            ],
        }
    )
    return samples.archive_bytes(
        [
            *entries.items(),
            (f"blobs/sha256/{ld[7:]}", leaf),
            (f"blobs/sha256/{md[7:]}", mid),
            ("index.json", index),
        ]
    )


def test_index_fan_out_is_bounded(node: Platform, tmp_path: Path) -> None:
    """Indexes that all name the same next index (n*n entries from 2 blobs) stop at the entry limit, not after n*n visits."""
    from agent.airgap.verify import verify
    from agent.archive import limits
    from agent.errors import ArchiveError

    path = tmp_path / "fan.tar"
    path.write_bytes(_index_fan_out(node, 300))  # 90,000 manifests reached without the limit
    previous = limits.configure(limits.Limits(max_index_entries=2000))
    try:
        with pytest.raises(ArchiveError, match="more than 2000 index entries in all"):
            verify(str(path))
        # The work done, counted rather than timed: the entries read stop within one index
        # of the limit.
        assert limits.counted()["index"] <= 2000 + 300
    finally:
        limits.configure(previous)


def test_docker_archive_layer_total_is_bounded(
    cli: RunCli, client: Containerd, node: Platform, tmp_path: Path
) -> None:
    """A docker archive over --max-layer-entries in all is refused in one line naming the flag;
    at the limit it imports (each layer counted once)."""
    images = [
        samples.SampleImage(
            f"many{i}:1",
            (samples.Variant(node, tuple(samples.Layer({f"f{i}{j}": b"x"}) for j in range(2))),),
        )
        for i in range(3)
    ]
    path = tmp_path / "many-layers.tar"
    path.write_bytes(samples.docker_archive(images))
    result = cli("import", "--max-layer-entries", "5", str(path))
    assert result.code == 1, result
    (line,) = result.err.strip().splitlines()
    assert "more than 5 layer entries in all" in line and "--max-layer-entries" in line, line
    assert_nothing_imported(client)
    result = cli("import", str(path), timeout=120)
    assert result.code == 0, result
    assert "docker.io/library/many2:1" in cri_by_tag(client)
