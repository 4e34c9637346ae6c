"""Unpacking layer chains in parallel.

A snapshot is named by its ChainID, so the layers of all images of an
archive form a forest: a layer can be applied once the snapshot below it
is committed and its blob is in the content store. :class:`ChainGraph`
decides which layers are ready (pure logic, no I/O); :class:`ParallelUnpack`
applies them on up to ``concurrency`` worker threads.

Layers shared by several images (a common base) are one node, applied
once; everything waiting on it waits on that one node. Among the ready
layers the one earliest in the archive's own order (image, then layer)
goes first, so a concurrency of 1 unpacks image after image, bottom layer
first, exactly as a sequential unpack would.
"""

from __future__ import annotations

import heapq
import threading
from collections import defaultdict
from dataclasses import dataclass, field

from agent.archive.layout import Descriptor, chain_id
from agent.errors import AgentError, Cancelled
from agent.importer.eager import LayerStore, apply_layer
from agent.importer.trace import QUIET, Timeline

PENDING, RUNNING, DONE, FAILED = "pending", "running", "done", "failed"

# How often finish() looks at the import's stop while workers run.
JOIN_POLL_S = 0.1


@dataclass
class Node:
    """One layer of one or more images: the snapshot ``chain_id`` on top of ``parent``."""

    chain_id: str
    parent: str  # the ChainID below ("" for a bottom layer)
    diff_id: str
    order: tuple[int, int]  # (image, layer): where it comes first in the archive
    key: str  # what names its blob until the blob is there (a digest or "path:<name>")
    blob: Descriptor | None = None
    state: str = PENDING
    children: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ChainLayer:
    """A layer as a chain lists it: its blob key, diff ID and, when known, its descriptor."""

    key: str
    diff_id: str
    blob: Descriptor | None = None


class ChainGraph:
    """Which layers may be applied now. Not thread-safe; :class:`ParallelUnpack` locks it."""

    def __init__(self, done: set[str] | None = None) -> None:
        self.nodes: dict[str, Node] = {}
        self._blobs: dict[str, Descriptor] = {}
        self._waiting: dict[str, list[str]] = defaultdict(list)  # blob key -> chain IDs
        self._ready: list[tuple[tuple[int, int], str]] = []  # heap by archive order
        self._done = set(done or ())  # committed before this graph (earlier passes)
        self.running = 0

    def add_chain(self, image: int, layers: list[ChainLayer]) -> list[str]:
        """Add one image's layers, bottom first; returns their ChainIDs."""
        parent = ""
        ids: list[str] = []
        for n, layer in enumerate(layers):
            cid = chain_id(parent, layer.diff_id)
            node = self.nodes.get(cid)
            if node is None:
                node = Node(cid, parent, layer.diff_id, (image, n), layer.key, layer.blob)
                self.nodes[cid] = node
                if cid in self._done:
                    node.state = DONE
                else:
                    if parent:
                        self.nodes[parent].children.append(cid)
                    if node.blob is None:
                        found = self._blobs.get(layer.key)
                        if found is not None:
                            node.blob = found
                        else:
                            self._waiting[layer.key].append(cid)
                    self._push_if_ready(node)
            elif node.blob is None and layer.blob is not None:
                node.blob = layer.blob
                self._push_if_ready(node)
            ids.append(cid)
            parent = cid
        return ids

    def provide(self, key: str, blob: Descriptor) -> None:
        """The blob named ``key`` is in the content store."""
        self._blobs[key] = blob
        for cid in self._waiting.pop(key, ()):
            node = self.nodes[cid]
            if node.blob is None:
                node.blob = blob
                self._push_if_ready(node)

    def take(self) -> Node | None:
        """The ready layer earliest in archive order, now running; None if none is ready."""
        while self._ready:
            _, cid = heapq.heappop(self._ready)
            node = self.nodes[cid]
            if node.state == PENDING:
                node.state = RUNNING
                self.running += 1
                return node
        return None

    def finished(self, node: Node, ok: bool) -> None:
        """``node`` was committed (``ok``) or failed; its children may now be ready."""
        self.running -= 1
        node.state = DONE if ok else FAILED
        if ok:
            for cid in node.children:
                self._push_if_ready(self.nodes[cid])

    def settled(self) -> bool:
        """Nothing runs and nothing is ready: what is left waits on a blob or a failure."""
        return self.running == 0 and not any(
            self.nodes[cid].state == PENDING for _, cid in self._ready
        )

    def is_done(self, chain_id: str) -> bool:
        node = self.nodes.get(chain_id)
        return chain_id in self._done or (node is not None and node.state == DONE)

    def done_ids(self) -> set[str]:
        return self._done | {cid for cid, n in self.nodes.items() if n.state == DONE}

    def _push_if_ready(self, node: Node) -> None:
        if node.state != PENDING or node.blob is None:
            return
        if node.parent and not self.is_done(node.parent):
            return
        heapq.heappush(self._ready, (node.order, node.chain_id))


class ParallelUnpack:
    """Apply a :class:`ChainGraph`'s ready layers on up to ``concurrency`` threads.

    ``strict``: the first failure stops the rest (running applies are
    cancelled) and :meth:`finish` raises it. Otherwise (speculative
    unpacking while the archive streams) a failed layer only keeps its
    descendants from being applied; the authoritative pass meets the
    problem again and reports it.
    """

    def __init__(
        self,
        client: LayerStore,
        snapshotter: str,
        lease: str,
        *,
        stop: threading.Event,
        concurrency: int,
        strict: bool,
        done: set[str] | None = None,
        timeline: Timeline = QUIET,
        name: str = "unpack",
    ) -> None:
        self.client = client
        self.snapshotter = snapshotter
        self.lease = lease
        self.strict = strict
        self.timeline = timeline
        self.graph = ChainGraph(done)
        self.applied = 0
        self.error: BaseException | None = None
        self._import_stop = stop
        self._abort = threading.Event()  # cancels running applies
        self._closing = False
        self._cond = threading.Condition()
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
            for i in range(max(1, concurrency))
        ]
        for t in self._threads:
            t.start()

    def add_chain(self, image: int, layers: list[ChainLayer]) -> list[str]:
        with self._cond:
            ids = self.graph.add_chain(image, layers)
            self._cond.notify_all()
            return ids

    def provide(self, key: str, blob: Descriptor) -> None:
        with self._cond:
            self.graph.provide(key, blob)
            self._cond.notify_all()

    def done_ids(self) -> set[str]:
        with self._cond:
            return self.graph.done_ids()

    def finish(self, *, cancel: bool = False) -> None:
        """Wait until nothing more can be applied, and end the workers.

        ``cancel`` (or the import's stop, looked at while waiting) abandons
        what is queued and cancels running applies. In strict mode the first
        failure is raised; a stop is raised as Cancelled.
        """
        with self._cond:
            self._closing = True
            if cancel:
                self._abort.set()
            self._cond.notify_all()
        while any(t.is_alive() for t in self._threads):
            for t in self._threads:
                t.join(JOIN_POLL_S)
            if self._import_stop.is_set():
                with self._cond:
                    self._abort.set()
                    self._cond.notify_all()
        if not self.strict:
            return
        if self._import_stop.is_set():
            raise Cancelled("import cancelled")
        if self.error is not None:
            raise self.error

    def _work(self) -> None:
        while True:
            with self._cond:
                node = None
                while not self._abort.is_set():
                    node = self.graph.take()
                    if node is not None or (self._closing and self.graph.settled()):
                        break
                    self._cond.wait(JOIN_POLL_S)
                if node is None:
                    self._cond.notify_all()
                    return
            ok = False
            try:
                ok = self._apply(node)
            except (AgentError, Cancelled) as err:
                with self._cond:
                    if self.strict and self.error is None and not isinstance(err, Cancelled):
                        self.error = err
                        self._abort.set()
            except BaseException as err:  # noqa: BLE001 - a bug must not leave finish() waiting for ever
                with self._cond:
                    if self.error is None:
                        self.error = err
                    self._abort.set()
            finally:
                with self._cond:
                    self.graph.finished(node, ok)
                    self._cond.notify_all()

    def _apply(self, node: Node) -> bool:
        if self._abort.is_set() or self._import_stop.is_set():
            return False
        if self.client.snapshot_exists(self.snapshotter, node.chain_id):
            return True
        blob = node.blob
        if blob is None:  # a defect: the graph hands out only layers whose blob is stored
            raise RuntimeError(f"layer {node.chain_id} was handed out without its blob")
        apply_layer(
            self.client,
            self.snapshotter,
            self.lease,
            node.parent,
            blob.media_type,
            blob.digest,
            blob.size,
            stop=self._abort,
            diff_id=node.diff_id,
            timeline=self.timeline,
        )
        self.applied += 1
        return True
