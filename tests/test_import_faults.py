"""Faults during an import, against a real containerd: stop, failed records, outages."""

from __future__ import annotations

import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent._proto.containerd.types import mount_pb2
from agent.containerd import Containerd
from agent.containerd.images import Put
from agent.errors import AgentError, Cancelled, ContainerdError, OutOfSpace
from agent.image.platforms import Platform
from agent.importer import Importer, ImportOptions, Progress
from agent.testing import samples
from agent.testing.sandbox import PrivateContainerd
from tests.conftest import RELEASE
from tests.helpers import assert_no_leases, assert_pinned


class StopAfterApplies(Containerd):
    """The real client, which sets ``stop`` at the n-th layer apply after the stream ended."""

    def __init__(self, address: str, stop: threading.Event, after: int) -> None:
        super().__init__(address)
        self.stop = stop
        self.after = after
        self.streamed = threading.Event()
        self.applies = 0
        self.stopped_at = 0.0

    def apply(
        self,
        media_type: str,
        digest: str,
        size: int,
        mounts: list[mount_pb2.Mount],
        *,
        lease: str,
        stop: threading.Event | None = None,
    ) -> str:
        if self.streamed.is_set():
            self.applies += 1
            if self.applies == self.after:
                self.stopped_at = time.monotonic()
                self.stop.set()
        return super().apply(media_type, digest, size, mounts, lease=lease, stop=stop)


def test_stop_between_layer_applies(ctd: PrivateContainerd, node: Platform, tmp_path: Path) -> None:
    """SIGTERM while unpacking a many-layer image ends the import within a second or two.

    The archive stores its layers out of order, so the layers are applied
    after the stream ended, one by one; the stop comes at the 5th of 150.
    Nothing is left: no image, no lease.
    """
    layers = tuple(samples.Layer({f"l{i}": bytes([i % 256]) * 64}) for i in range(150))
    image = samples.SampleImage("many:1", (samples.Variant(node, layers),))
    path = tmp_path / "many.tar"
    path.write_bytes(samples.docker_archive([image], legacy_names=True))
    stop = threading.Event()
    with StopAfterApplies(ctd.address, stop, after=5) as client:

        def progress(p: Progress) -> None:
            if p.done >= p.total:
                client.streamed.set()

        importer = Importer(client, ImportOptions(platforms=(node,)), progress=progress, stop=stop)
        with pytest.raises(Cancelled):
            importer.import_file(str(path))
        took = time.monotonic() - client.stopped_at
        assert stop.is_set() and took < 2.0, f"stopped {took:.1f} s after SIGTERM"
        assert client.get_image("docker.io/library/many:1") is None
        assert_no_leases(client)


class FailingRecord(Containerd):
    """The real client, whose image record write fails for one name."""

    def __init__(self, address: str, fail: str) -> None:
        super().__init__(address)
        self.fail = fail

    def put_image(
        self, name: str, media_type: str, digest: str, size: int, labels: dict[str, str]
    ) -> Put:
        if name == self.fail:
            raise ContainerdError(f"create {name}: refused", code="UNKNOWN")
        return super().put_image(name, media_type, digest, size, labels)


def test_failed_record_write_moves_the_tag_back(
    ctd: PrivateContainerd, client: Containerd, node: Platform, tmp_path: Path
) -> None:
    """An import that fails after moving a tag moves it back: the node keeps running the old image."""
    old = tmp_path / "old.tar"
    old.write_bytes(samples.oci_archive([samples.simple_image("app:1", {"v": b"old"}, node)]))
    first = Importer(client, ImportOptions(platforms=(node,))).import_file(str(old))
    old_digest = first.images[0].digest
    new = tmp_path / "new.tar"
    new.write_bytes(
        samples.oci_archive(
            [
                samples.simple_image("app:1", {"v": b"new"}, node),
                samples.simple_image("zzz:1", {"z": b"z"}, node),
            ]
        )
    )
    with (
        FailingRecord(ctd.address, "docker.io/library/zzz:1") as failing,
        pytest.raises(ContainerdError, match="refused"),
    ):
        Importer(failing, ImportOptions(platforms=(node,))).import_file(str(new))
    record = client.get_image("docker.io/library/app:1")
    assert record is not None and record.target.digest == old_digest
    assert_pinned(client, "docker.io/library/app:1")
    assert sorted(r.name for r in client.list_images()) == sorted(
        ["docker.io/library/app:1", f"docker.io/library/app@{old_digest}"]
    )
    assert_no_leases(client)


def test_containerd_back_is_noticed_within_seconds(
    ctd: PrivateContainerd, client: Containerd
) -> None:
    """After a 30 s outage, a call succeeds within ~5 s of containerd's start, on the same client.

    gRPC's default reconnect backoff grows towards 120 s; measured with it,
    the first call succeeded about 10 s after a restart following a 60 s
    outage, against 1.5 s with the channel's tuned backoff.
    """
    client.version()
    ctd.stop()
    down_until = time.monotonic() + 30
    while time.monotonic() < down_until:  # calls fail fast while it is down
        with pytest.raises(AgentError):
            client.version()
        threading.Event().wait(1.0)  # one call a second, as a waiting daemon makes
    back = time.monotonic()
    ctd.start()  # returns once it answers (its readiness probe is a client like ours)
    while True:
        try:
            client.version()
            break
        except AgentError:
            assert time.monotonic() - back < 5.0, "containerd's return went unnoticed for 5 s"
            threading.Event().wait(0.1)
    assert time.monotonic() - back < 5.0


def test_stop_while_waiting_for_the_cri(client: Containerd) -> None:
    """SIGTERM while waiting for the CRI to list an image ends the wait at once."""
    stop = threading.Event()
    never = {"docker.io/library/seen:1": "sha256:" + "0" * 64}
    timer = threading.Timer(0.3, stop.set)
    timer.start()
    started = time.monotonic()
    with pytest.raises(Cancelled):
        client.cri_wait(never, 60, stop=stop)
    assert time.monotonic() - started < 10.0  # well before the 60 s wait would end


@pytest.fixture
def small_ctd(tmp_path: Path) -> Iterator[PrivateContainerd]:
    """A private containerd whose root is a 24 MiB tmpfs, to fill during an import."""
    base = Path(tempfile.mkdtemp(prefix="ia-full-", dir="/tmp"))
    root = base / "root"
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(root)], check=True)
    c = PrivateContainerd(base, release=RELEASE)
    try:
        c.start()
        yield c
    finally:
        c.stop()
        subprocess.run(["umount", "-l", str(root)], check=False)
        c.cleanup()


@pytest.mark.containerd  # its containerd comes from small_ctd, not ctd
def test_full_disk_is_retryable_and_leaves_nothing(
    small_ctd: PrivateContainerd, node: Platform, tmp_path: Path
) -> None:
    """A disk that fills mid-import gives OutOfSpace (retryable), no image and no lease."""
    big = samples.Layer({"noise": os.urandom(40 << 20)})
    path = tmp_path / "big.tar"
    path.write_bytes(
        samples.oci_archive([samples.SampleImage("big:1", (samples.Variant(node, (big,)),))])
    )
    with Containerd(small_ctd.address) as client:
        with pytest.raises(OutOfSpace) as caught:
            Importer(client, ImportOptions(platforms=(node,), cri_wait_s=0)).import_file(str(path))
        assert caught.value.retryable
        assert "\n" not in str(caught.value)
        assert client.get_image("docker.io/library/big:1") is None
        assert_no_leases(client)


class StopAtCriWait(Containerd):
    """The real client; SIGTERM arrives just as the import starts waiting for the CRI."""

    def __init__(self, address: str, stop: threading.Event) -> None:
        super().__init__(address)
        self.stop = stop

    def cri_wait(
        self, expect: dict[str, str], timeout: float, *, stop: threading.Event | None = None
    ) -> list[str]:
        self.stop.set()
        return super().cri_wait(expect, timeout, stop=stop)


def test_stop_while_the_import_waits_for_the_cri(
    ctd: PrivateContainerd, node: Platform, tmp_path: Path
) -> None:
    """A stop during the CRI wait ends it at once; the import itself is complete and kept."""
    path = tmp_path / "w.tar"
    path.write_bytes(samples.oci_archive([samples.simple_image("wait:1", {"w": b"w"}, node)]))
    stop = threading.Event()
    with StopAtCriWait(ctd.address, stop) as client:
        started = time.monotonic()
        result = Importer(
            client, ImportOptions(platforms=(node,), cri_wait_s=60), stop=stop
        ).import_file(str(path))
        assert time.monotonic() - started < 5.0
        assert result.not_in_cri == ["docker.io/library/wait:1"]
        assert_pinned(client, "docker.io/library/wait:1")
        assert_no_leases(client)
