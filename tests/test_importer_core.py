"""The importer's logic without containerd: ingest and resolve against the in-memory store.

No root, no containerd: these run in about a second, beside the
real-containerd tests in test_import.py, which stay.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from google.protobuf import empty_pb2

from agent._proto.containerd.services.leases.v1 import leases_pb2_grpc
from agent.archive import layout, limits
from agent.archive.compression import Compression
from agent.containerd.client import Containerd
from agent.containerd.content import Blob
from agent.containerd.images import ImageRecord, Put
from agent.containerd.memory import MemoryStore
from agent.containerd.rpc import channel_options, translate
from agent.errors import (
    ArchiveError,
    Cancelled,
    ContainerdError,
    ContainerdUnavailable,
    OutOfSpace,
)
from agent.image.labels import (
    DISTRIBUTION_SOURCE_PREFIX,
    LABEL_MAX,
    distribution_source,
    merge_sources,
)
from agent.image.platforms import Platform
from agent.importer import Importer, ImportOptions, ImportTarget
from agent.importer.resolve import BlobReader, resolve
from agent.testing import samples

NODE = Platform("linux", "amd64")
OPTIONS = ImportOptions(unpack=False, platforms=None, cri_wait_s=0)


class LabelledStore(MemoryStore):
    """The in-memory store, also keeping blob labels (for the label tests)."""

    def __init__(self) -> None:
        super().__init__()
        self.labels: dict[str, dict[str, str]] = {}

    def blob_info(self, digest: str) -> Blob | None:
        info = super().blob_info(digest)
        return None if info is None else Blob(digest, info.size, dict(self.labels.get(digest, {})))

    def label_blob(self, digest: str, labels: dict[str, str]) -> None:
        self.labels.setdefault(digest, {}).update(labels)


class FailingRecords(MemoryStore):
    """The in-memory store whose image record writes fail for one name."""

    def __init__(self, fail: str) -> None:
        super().__init__()
        self.fail = fail

    def put_image(
        self, name: str, media_type: str, digest: str, size: int, labels: dict[str, str]
    ) -> Put:
        if name == self.fail:
            raise ContainerdError(f"create {name}: refused", code="UNKNOWN")
        return super().put_image(name, media_type, digest, size, labels)


def _archive(tmp_path: Path, data: bytes, name: str = "a.tar") -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def _two_layer(name: str, payload: bytes = b"a") -> samples.SampleImage:
    layers = (samples.Layer({"a": payload * 100}, "gzip"), samples.Layer({"b": b"b"}))
    return samples.SampleImage(name, (samples.Variant(NODE, layers),))


@pytest.mark.parametrize("kind", ["oci", "docker"])
def test_import_into_memory_store(tmp_path: Path, kind: str) -> None:
    """Ingest and resolve run against the in-memory store: names, digest records, blob counts."""
    images = [
        _two_layer("app:1"),
        samples.simple_image("registry.example:5000/t/x:2", {"x": b"x"}, NODE),
    ]
    data = samples.oci_archive(images) if kind == "oci" else samples.docker_archive(images)
    store = MemoryStore()
    result = Importer(store, OPTIONS).import_file(_archive(tmp_path, data))
    names = sorted(i.name for i in result.images)
    assert names == ["docker.io/library/app:1", "registry.example:5000/t/x:2"]
    for image in result.images:
        record = store.get_image(image.name)
        assert record is not None and record.target.digest == image.digest
        repo = image.name.rpartition(":")[0]
        assert store.get_image(f"{repo}@{image.digest}") is not None
        assert image.platforms == (str(NODE),)
    # Docker archives carry no manifests: the commit step writes one per image.
    made = len(images) if kind == "docker" else 0
    assert result.blobs_written + made == len(store.sizes)
    assert result.bytes_read == len(data)


def test_fifo_is_refused_at_once(tmp_path: Path) -> None:
    """A FIFO named like an archive is an ArchiveError at once; opening it never blocks."""
    fifo = tmp_path / "a.tar.gz"
    os.mkfifo(fifo)
    outcome: list[BaseException] = []
    done = threading.Event()

    def run() -> None:
        try:
            Importer(MemoryStore(), OPTIONS).import_file(str(fifo))
        except BaseException as err:  # noqa: BLE001 - whatever the thread meets is checked below
            outcome.append(err)
        done.set()

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    finished = done.wait(5)
    if not finished:
        # Unblock the stuck open() so the thread ends, then fail.
        with fifo.open("wb"):
            pass
        pytest.fail("import_file blocked on a FIFO")
    assert len(outcome) == 1 and isinstance(outcome[0], ArchiveError)
    assert "not a regular file (a FIFO)" in str(outcome[0])
    assert str(fifo) in str(outcome[0]) and "\n" not in str(outcome[0])


def test_directory_is_refused(tmp_path: Path) -> None:
    """A directory in an archive's place is a one-line ArchiveError naming it."""
    d = tmp_path / "x.tar"
    d.mkdir()
    with pytest.raises(ArchiveError, match="not a regular file"):
        Importer(MemoryStore(), OPTIONS).import_file(str(d))


class _SlowBlobs:
    """A blob reader over a docker archive's files that sets ``stop`` after ``after`` reads."""

    def __init__(self, files: dict[str, bytes], stop: threading.Event, after: int) -> None:
        self.files = files
        self.by_digest = {layout.sha256(d): d for d in files.values()}
        self.stop = stop
        self.after = after
        self.reads = 0

    def known(self, digest: str) -> bool:
        return digest in self.by_digest

    def read(self, digest: str, what: str) -> bytes:
        self.reads += 1
        if self.reads >= self.after:
            self.stop.set()
        return self.by_digest[digest]

    def path(self, path: str, what: str) -> tuple[str, int]:
        data = self.files[path]
        return layout.sha256(data), len(data)

    def compression_of(self, digest: str) -> Compression:
        return Compression.NONE


def test_stop_while_resolving_a_huge_manifest() -> None:
    """SIGTERM while a 45,000-entry manifest.json resolves ends it within a few entries."""
    layer = samples.tar_bytes({"f": b"f"})
    config = samples.config_bytes(NODE, [layout.sha256(layer)])
    files = {"c.json": config, "l.tar": layer}
    entries = [
        {"Config": "c.json", "RepoTags": [f"img{i}:1"], "Layers": ["l.tar"]} for i in range(45_000)
    ]
    docs = {layout.DOCKER_MANIFEST_FILE: layout.dump_json(entries)}
    stop = threading.Event()
    blobs = _SlowBlobs(files, stop, after=100)
    reader: BlobReader = blobs
    # The default count limit refuses such a manifest outright; a site that
    # raised it (--max-archive-images) must still be able to stop.
    previous = limits.configure(dataclasses.replace(limits.current(), max_manifests=50_000))
    started = time.monotonic()
    try:
        with pytest.raises(Cancelled):
            resolve(docs, reader, OPTIONS, stop)
    finally:
        limits.configure(previous)
    assert blobs.reads <= 101
    assert time.monotonic() - started < 30  # "not minutes": the read count is the real bound


def test_failed_record_write_moves_tag_back(tmp_path: Path) -> None:
    """An import that fails at a later record write restores the tag it already moved."""
    store = MemoryStore()
    old = Importer(store, OPTIONS).import_file(
        _archive(tmp_path, samples.oci_archive([_two_layer("app:1", b"old")]), "old.tar")
    )
    old_digest = old.images[0].digest
    failing = FailingRecords("docker.io/library/zzz:1")
    failing.sizes, failing.small, failing.images = store.sizes, store.small, store.images
    new = samples.oci_archive([_two_layer("app:1", b"new"), _two_layer("zzz:1")])
    with pytest.raises(ContainerdError, match="refused"):
        Importer(failing, OPTIONS).import_file(_archive(tmp_path, new, "new.tar"))
    record = store.get_image("docker.io/library/app:1")
    assert record is not None and record.target.digest == old_digest
    # The digest record the failed import created is gone again.
    assert [n for n in store.images if "@" in n] == [f"docker.io/library/app@{old_digest}"]


def test_distribution_source_on_all_content(tmp_path: Path) -> None:
    """Every blob an image's record keeps carries the registry it is named after, merged."""
    store = LabelledStore()
    data = samples.oci_archive([_two_layer("registry.example:5000/team/app:1")])
    path = _archive(tmp_path, data)
    result = Importer(store, OPTIONS).import_file(path)
    (image,) = result.images
    key = DISTRIBUTION_SOURCE_PREFIX + "registry.example"  # no port, as containerd's pull
    manifest = layout.parse_manifest(store.read_blob(image.digest, 1 << 20), "m")
    contents = [image.digest, manifest.config.digest, *(layer.digest for layer in manifest.layers)]
    for digest in contents:
        assert store.labels[digest][key] == "team/app", digest
    # Another name for the same content adds to the list, once.
    other = samples.oci_archive([_two_layer("registry.example:5000/other/app:2")])
    Importer(store, OPTIONS).import_file(_archive(tmp_path, other, "b.tar"))
    Importer(store, OPTIONS).import_file(path)
    assert store.labels[manifest.config.digest][key] == "other/app,team/app"
    assert merge_sources("b,a", "a", "c") == "a,b,c"
    assert distribution_source("[::1]:5000/x/y:1") == (DISTRIBUTION_SOURCE_PREFIX + "::1", "x/y")
    assert distribution_source("alpine") == (
        DISTRIBUTION_SOURCE_PREFIX + "docker.io",
        "library/alpine",
    )


def _rpc_error(code: grpc.StatusCode, details: str) -> grpc.RpcError:
    """A gRPC error as the channel raises it, with a code and details."""
    err = grpc.RpcError()
    err.code = lambda: code
    err.details = lambda: details
    return err


@pytest.mark.parametrize("code", [grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL])
def test_enospc_is_retryable(code: grpc.StatusCode) -> None:
    """containerd's full disk (no code of its own) becomes OutOfSpace, which is retryable."""
    details = (
        "failed to copy: write /var/lib/containerd/io.containerd.content.v1.content/ingest/"
        "x/data: no space left on device"
    )
    err = translate(_rpc_error(code, details), "write content sha256:x", "/run/c.sock")
    assert isinstance(err, OutOfSpace) and err.retryable
    assert "out of disk space" in str(err)
    other = translate(_rpc_error(code, "failed to unpack: bad tar header"), "apply", "/run/c.sock")
    assert not isinstance(other, OutOfSpace) and not other.retryable


def test_reconnect_backoff_is_short() -> None:
    """The channel retries containerd's socket within seconds, not gRPC's default 120 s."""
    opts = dict(channel_options())
    assert opts["grpc.max_reconnect_backoff_ms"] <= 5000
    assert opts["grpc.initial_reconnect_backoff_ms"] <= 1000


def test_verify_store_is_an_import_target() -> None:
    """verify's in-memory store is checked (by mypy) against the protocols the importer uses."""
    store: ImportTarget = MemoryStore()
    store.put_image("a:1", layout.OCI_MANIFEST, "sha256:" + "a" * 64, 1, {})
    record = store.get_image("a:1")
    assert isinstance(record, ImageRecord) and record.target.size == 1


def test_name_with_another_digest_is_refused(tmp_path: Path) -> None:
    """A name pinned to a digest other than the image's is refused; no record is written."""
    store = MemoryStore()
    forged = "registry.example/team/app@sha256:" + "a" * 64
    data = samples.oci_archive([_two_layer("app:1"), _two_layer(forged, b"other")])
    with pytest.raises(ArchiveError, match="names a digest") as caught:
        Importer(store, OPTIONS).import_file(_archive(tmp_path, data))
    assert "\n" not in str(caught.value)
    assert store.images == {}


def test_message_too_large_is_not_out_of_space() -> None:
    """gRPC's RESOURCE_EXHAUSTED for an oversized message is a plain error, not a full disk."""
    too_large = "Received message larger than max (20000000 vs. 16777216)"
    err = translate(
        _rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, too_large), "list images", "/run/c.sock"
    )
    assert not isinstance(err, OutOfSpace) and not err.retryable
    assert err.code == "RESOURCE_EXHAUSTED"
    full = translate(
        _rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "write: no space left on device"),
        "write content sha256:x",
        "/run/c.sock",
    )
    assert isinstance(full, OutOfSpace)


class LeaseLog(MemoryStore):
    """The in-memory store, noting how each lease was released."""

    def __init__(self) -> None:
        super().__init__()
        self.released: list[bool] = []

    def delete_lease(self, lease_id: str, *, sync: bool = True) -> None:
        self.released.append(sync)


def test_only_a_complete_import_waits_for_collection(tmp_path: Path) -> None:
    """A failed import releases its lease without waiting for containerd's GC; a complete one waits."""
    store = LeaseLog()
    good = _archive(tmp_path, samples.oci_archive([_two_layer("app:1")]), "good.tar")
    Importer(store, OPTIONS).import_file(good)
    bad = _archive(tmp_path, b"not an archive at all" * 100, "bad.tar")
    with pytest.raises(ArchiveError):
        Importer(store, OPTIONS).import_file(bad)
    assert store.released == [True, False]


class _WedgedLeases(leases_pb2_grpc.LeasesServicer):
    """A Leases service whose Delete never answers until released (a wedged containerd)."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def Delete(self, request: object, context: object) -> empty_pb2.Empty:  # noqa: N802 - gRPC name
        self.release.wait(30)
        return empty_pb2.Empty()


def test_sync_lease_delete_has_a_deadline(tmp_path: Path) -> None:
    """Releasing a lease on a containerd that never answers ends at the client's deadline."""
    servicer = _WedgedLeases()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    # The generated gRPC stubs are untyped.
    leases_pb2_grpc.add_LeasesServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    socket = f"unix://{tmp_path}/c.sock"
    server.add_insecure_port(socket)
    server.start()
    try:
        with Containerd(socket, timeout=0.5) as client:
            started = time.monotonic()
            with pytest.raises(ContainerdUnavailable):
                client.delete_lease("x", sync=True)
            assert time.monotonic() - started < 5
    finally:
        servicer.release.set()
        server.stop(None)


def test_distribution_sources_are_cut_to_containerd_label_limit() -> None:
    """The merged source list keeps key and value within 4096 bytes, the new repository kept."""
    key = DISTRIBUTION_SOURCE_PREFIX + "registry.example"
    existing = ",".join(f"team/repository-{i:04d}" for i in range(300))
    merged = merge_sources(existing, "zz/newest", key=key)
    assert len(key) + len(merged) <= LABEL_MAX
    assert "zz/newest" in merged.split(",")
    assert merged.split(",") == sorted(merged.split(","))
    assert len(merged) > LABEL_MAX - len(key) - 40  # filled, not emptied
    # A repository that could never fit is left out rather than failing.
    assert merge_sources("a", "x" * 5000, key=key) == "a"


class RacingRecords(FailingRecords):
    """Fails the record write for ``fail``; ``before[name]`` runs just before ``name`` is put,
    as another tool writing the same record at that moment would."""

    def __init__(self, fail: str) -> None:
        super().__init__(fail)
        self.before: dict[str, Callable[[], object]] = {}

    def put_image(
        self, name: str, media_type: str, digest: str, size: int, labels: dict[str, str]
    ) -> Put:
        hook = self.before.pop(name, None)
        if hook is not None:
            hook()
        return super().put_image(name, media_type, digest, size, labels)


OTHER = "sha256:" + "9" * 64


def _other_tool(store: MemoryStore, name: str) -> Callable[[], object]:
    """Another tool pointing ``name`` at OTHER."""
    return lambda: MemoryStore.put_image(store, name, layout.OCI_MANIFEST, OTHER, 1, {"t": "x"})


def test_rollback_leaves_a_tag_another_tool_moved_since(tmp_path: Path) -> None:
    """A tag the failed import moved, then another tool moved again, is not moved back."""
    store = RacingRecords("docker.io/library/zzz:1")
    Importer(store, OPTIONS).import_file(
        _archive(tmp_path, samples.oci_archive([_two_layer("app:1", b"old")]), "old.tar")
    )
    tag = "docker.io/library/app:1"
    # Just after the import moved app:1 (while writing its digest record), another tool moves it.
    store.before["docker.io/library/zzz:1"] = _other_tool(store, tag)
    new = samples.oci_archive([_two_layer("app:1", b"new"), _two_layer("zzz:1")])
    with pytest.raises(ContainerdError, match="refused"):
        Importer(store, OPTIONS).import_file(_archive(tmp_path, new, "new.tar"))
    record = store.get_image(tag)
    assert record is not None and record.target.digest == OTHER


def test_rollback_keeps_a_record_another_tool_took_over(tmp_path: Path) -> None:
    """A record the failed import created, then another tool re-pointed, is not deleted."""
    store = RacingRecords("docker.io/library/zzz:1")
    tag = "docker.io/library/app:1"
    store.before["docker.io/library/zzz:1"] = _other_tool(store, tag)
    data = samples.oci_archive([_two_layer("app:1"), _two_layer("zzz:1")])
    with pytest.raises(ContainerdError, match="refused"):
        Importer(store, OPTIONS).import_file(_archive(tmp_path, data))
    record = store.get_image(tag)
    assert record is not None and record.target.digest == OTHER
    # What the import created and still pointed at its own image is gone.
    assert sorted(store.images) == [tag]


def test_rollback_restores_a_tag_another_tool_created_just_before(tmp_path: Path) -> None:
    """A tag another tool created just before the import's write is put back, not left moved."""
    store = RacingRecords("docker.io/library/zzz:1")
    tag = "docker.io/library/app:1"
    store.before[tag] = _other_tool(store, tag)  # after the import would have looked, before put
    data = samples.oci_archive([_two_layer("app:1"), _two_layer("zzz:1")])
    with pytest.raises(ContainerdError, match="refused"):
        Importer(store, OPTIONS).import_file(_archive(tmp_path, data))
    record = store.get_image(tag)
    assert record is not None and record.target.digest == OTHER
