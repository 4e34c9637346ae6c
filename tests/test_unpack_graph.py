"""Which layers may be unpacked when: the scheduling of layer chains, without containerd."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from agent import config
from agent._proto.containerd.types import mount_pb2
from agent.archive.layout import Descriptor, chain_id
from agent.cli.images import import_options
from agent.cli.parser import build_parser
from agent.containerd.content import Blob
from agent.errors import ArchiveError, UsageError
from agent.importer import ImportOptions
from agent.importer.eager import LayerStore
from agent.importer.unpack import ChainGraph, ChainLayer, Node, ParallelUnpack


def _blob(name: str) -> Descriptor:
    return Descriptor("application/vnd.docker.image.rootfs.diff.tar", f"sha256:{name}", 1)


def _chain(*names: str, blobs: bool = True) -> list[ChainLayer]:
    return [ChainLayer(n, f"diff-{n}", _blob(n) if blobs else None) for n in names]


def _drain(graph: ChainGraph) -> list[str]:
    """Run the graph one layer at a time, as a single worker would; the layers' keys in order."""
    order = []
    while (node := graph.take()) is not None:
        order.append(node.key)
        graph.finished(node, True)
    return order


def test_one_at_a_time_is_image_after_image_bottom_first() -> None:
    """With one worker, layers go image by image, each bottom first, a shared base only once."""
    graph = ChainGraph()
    graph.add_chain(0, _chain("base", "a1", "a2"))
    graph.add_chain(1, _chain("base", "b1", "b2"))
    graph.add_chain(2, _chain("other", "c1"))
    assert _drain(graph) == ["base", "a1", "a2", "b1", "b2", "other", "c1"]
    assert graph.settled()


def test_independent_chains_are_ready_together_once_their_base_is_in() -> None:
    """Chains sharing a base wait for it once; then each chain's next layer is ready at once."""
    graph = ChainGraph()
    graph.add_chain(0, _chain("base", "a1"))
    graph.add_chain(1, _chain("base", "b1"))
    graph.add_chain(2, _chain("other", "c1"))
    first, second = graph.take(), graph.take()
    assert first is not None and second is not None
    assert {first.key, second.key} == {"base", "other"}
    assert graph.take() is None  # a1 and b1 wait for the base; c1 for "other"
    base = first if first.key == "base" else second
    graph.finished(base, True)
    ready = [graph.take(), graph.take()]
    assert {n.key for n in ready if n is not None} == {"a1", "b1"}
    assert graph.take() is None
    assert graph.running == 3


def test_a_layer_waits_for_its_blob() -> None:
    """A layer is not applied before its blob is in the content store, however early it is known."""
    graph = ChainGraph()
    graph.provide("base", _blob("base"))  # the blob may land before the chain is known
    graph.add_chain(0, _chain("base", "top", blobs=False))
    node = graph.take()
    assert node is not None and node.key == "base"
    graph.finished(node, True)
    assert graph.take() is None
    assert graph.settled()  # nothing runs, nothing ready: "top" waits on its blob
    graph.provide("top", _blob("top"))
    top = graph.take()
    assert top is not None and top.key == "top" and top.blob == _blob("top")


def test_a_failed_layer_holds_back_only_its_own_descendants() -> None:
    """A failure keeps the layers above it from being applied; other chains go on."""
    graph = ChainGraph()
    graph.add_chain(0, _chain("base", "a1", "a2"))
    graph.add_chain(1, _chain("other", "b1"))
    applied = []
    while (node := graph.take()) is not None:
        applied.append(node.key)
        graph.finished(node, node.key != "a1")
    assert applied == ["base", "a1", "other", "b1"]
    assert graph.settled()
    assert not graph.is_done(chain_id(chain_id("diff-base", "diff-a1"), "diff-a2"))


def test_layers_committed_before_are_not_applied_again() -> None:
    """ChainIDs an earlier pass committed count as done: only what is missing is applied."""
    done = {"diff-base", chain_id("diff-base", "diff-a1")}
    graph = ChainGraph(done)
    ids = graph.add_chain(0, _chain("base", "a1", "a2"))
    assert set(ids[:2]) == done
    assert _drain(graph) == ["a2"]
    assert graph.done_ids() == set(ids)


def test_node_records_where_a_layer_first_appears() -> None:
    """A layer shared by several images is one node, ordered where the archive first lists it."""
    graph = ChainGraph()
    graph.add_chain(3, _chain("base", "x"))
    graph.add_chain(1, _chain("base", "y"))
    base: Node = graph.nodes["diff-base"]
    assert base.order == (3, 0)
    assert len(base.children) == 2


class _Layers:
    """A snapshotter whose applies block until released: shows how many run at once."""

    def __init__(self, wrong: str = "") -> None:
        self.cond = threading.Condition()
        self.running = 0
        self.peak = 0
        self.open = False
        self.wrong = wrong
        self.committed: list[str] = []

    # ContentStore: not used by unpacking itself.
    def blob_info(self, digest: str) -> Blob | None:
        return None

    def write_blob(
        self,
        chunks: Iterable[bytes],
        *,
        lease: str,
        total: int,
        expected: str = "",
        labels: dict[str, str] | None = None,
    ) -> str:
        raise AssertionError("unpacking writes no content")

    def read_blob(self, digest: str, limit: int) -> bytes:
        raise AssertionError("unpacking reads no content")

    def label_blob(self, digest: str, labels: dict[str, str]) -> None:
        raise AssertionError("unpacking labels no content")

    # SnapshotStore
    def snapshot_exists(self, snapshotter: str, key: str) -> bool:
        with self.cond:
            return key in self.committed

    def prepare(
        self, snapshotter: str, key: str, parent: str, *, lease: str
    ) -> list[mount_pb2.Mount]:
        return []

    def commit(self, snapshotter: str, name: str, key: str, *, lease: str) -> None:
        with self.cond:
            self.committed.append(name)

    def remove_snapshot(self, snapshotter: str, key: str) -> None:
        pass

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
        with self.cond:
            self.running += 1
            self.peak = max(self.peak, self.running)
            self.cond.notify_all()
            self.cond.wait_for(lambda: self.open or (stop is not None and stop.is_set()), 10)
            self.running -= 1
        name = digest.removeprefix("sha256:")
        return "sha256:unexpected" if name == self.wrong else f"diff-{name}"

    def wait_running(self, n: int) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: self.running >= n, 10), f"{n} applies never ran"

    def release(self) -> None:
        with self.cond:
            self.open = True
            self.cond.notify_all()


def _unpack(layers: LayerStore, concurrency: int) -> ParallelUnpack:
    return ParallelUnpack(
        layers, "overlayfs", "lease", stop=threading.Event(), concurrency=concurrency, strict=True
    )


def test_at_most_the_limit_is_applied_at_once() -> None:
    """Four independent chains with a limit of two: two applies run together, never three."""
    layers = _Layers()
    run = _unpack(layers, 2)
    for i in range(4):
        run.add_chain(i, _chain(f"l{i}"))
    layers.wait_running(2)
    with layers.cond:
        assert layers.running == 2
    layers.release()
    run.finish()
    assert layers.peak == 2
    assert sorted(layers.committed) == [f"diff-l{i}" for i in range(4)]


def test_a_failure_stops_the_unpack_and_is_raised() -> None:
    """A layer that unpacks to the wrong digest fails the unpack; nothing above it is applied."""
    layers = _Layers(wrong="a1")
    run = _unpack(layers, 2)
    run.add_chain(0, _chain("base", "a1", "a2"))
    layers.release()
    with pytest.raises(ArchiveError, match="unpacks to"):
        run.finish()
    assert layers.committed == ["diff-base"]


def test_concurrency_setting_flag_environment_and_default(tmp_path: Path) -> None:
    """--unpack-concurrency wins over IMAGE_AGENT_UNPACK_CONCURRENCY, which wins over the cores;
    below 1 is a usage error before anything is imported."""

    def concurrency(argv: list[str], env: dict[str, str]) -> int:
        args = build_parser().parse_args(["import", *argv, str(tmp_path / "x.tar")])
        with mock_env(env):
            return import_options(args, config.ContainerdConfig()).unpack_concurrency

    assert concurrency([], {}) == len(os.sched_getaffinity(0))
    assert ImportOptions().unpack_concurrency == len(os.sched_getaffinity(0))
    assert concurrency([], {"IMAGE_AGENT_UNPACK_CONCURRENCY": "1"}) == 1
    assert concurrency(["--unpack-concurrency", "5"], {"IMAGE_AGENT_UNPACK_CONCURRENCY": "1"}) == 5
    with pytest.raises(UsageError, match="unpack-concurrency"):
        concurrency(["--unpack-concurrency", "0"], {})
    with pytest.raises(UsageError, match="not a valid int"):
        concurrency([], {"IMAGE_AGENT_UNPACK_CONCURRENCY": "many"})


@contextlib.contextmanager
def mock_env(env: dict[str, str]) -> Iterator[None]:
    """The process environment with only ``env``'s unpack setting, restored afterwards."""
    key = "IMAGE_AGENT_UNPACK_CONCURRENCY"
    before = os.environ.pop(key, None)
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.pop(key, None)
        if before is not None:
            os.environ[key] = before
