"""What the cluster server knows, and the views it serves (pure: no I/O, no clock of its own).

Sources' contributions go in, the assembled list comes out; nodes' reports go
in, the node x image view comes out. The HTTP layer owns the one instance,
changes it on its event loop and builds the view from a :meth:`State.snapshot`
in a worker thread.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.cluster import assemble, schema
from agent.cluster.assemble import Assembled, Contribution

Labels = tuple[tuple[str, str], ...]

# Label sets whose lists are cached; beyond this, lists are computed per request.
MAX_CACHED_LISTS = 10_000


def parse_selector(text: str) -> Labels:
    """``k=v,k2=v2`` as sorted pairs; ValueError names the bad text."""
    pairs = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        k, sep, v = item.partition("=")
        if not sep or not k.strip():
            raise ValueError(f"node selector {text!r}: want key=value[,key=value]")
        pairs.append((k.strip(), v.strip()))
    return tuple(sorted(pairs))


def weak_match(header: str, etag: str) -> bool:
    """``If-None-Match`` by weak comparison (RFC 9110 13.1.2): ``W/"x"`` matches ``"x"``."""
    if not header or not etag:
        return False
    want = etag.removeprefix("W/")
    for item in header.split(","):
        candidate = item.strip()
        if candidate == "*" or candidate.removeprefix("W/") == want:
            return True
    return False


@dataclass(frozen=True)
class NodeRecord:
    """What the server keeps of a node's report: compact, strings shared across nodes."""

    name: str
    labels: Labels
    pulls: Mapping[str, tuple[str, str]]  # image -> (state, last error)
    archives: Mapping[str, int]  # state -> count
    received_at: float

    @classmethod
    def from_report(cls, name: str, report: schema.NodeReport, now: float) -> NodeRecord:
        intern = sys.intern
        labels = tuple(sorted((intern(k), intern(v)) for k, v in report.labels.items()))
        pulls = {intern(p.image): (intern(p.state), p.last_error) for p in report.pulls}
        archives: dict[str, int] = {}
        for a in report.archives:
            state = intern(a.state)
            archives[state] = archives.get(state, 0) + 1
        return cls(intern(name), labels, pulls, archives, now)


@dataclass(frozen=True)
class Snapshot:
    """An immutable copy of what the status view needs (cheap: shares the records)."""

    assembled: Assembled
    nodes: tuple[NodeRecord, ...]
    version: int


@dataclass
class State:
    """Contributions, the assembled list and node records. Changed on one thread only."""

    order: list[str] = field(default_factory=list)  # source ids, in configuration order
    rules: list[tuple[str, str]] = field(default_factory=list)
    contributions: dict[str, Contribution] = field(default_factory=dict)
    assembled: Assembled = field(default_factory=lambda: Assembled([], [], []))
    version: int = 0
    nodes: dict[str, NodeRecord] = field(default_factory=dict)
    _lists: dict[Labels, tuple[list[str], str]] = field(default_factory=dict)

    def contribute(self, contribution: Contribution) -> None:
        self.contributions[contribution.source] = contribution

    def rebuild(self) -> bool:
        """Assemble again; True (and a new version) when the list changed."""
        ordered = [self.contributions[s] for s in self.order if s in self.contributions]
        new = assemble.assemble(ordered, self.rules)
        changed = [i.to_json() for i in new.items] != [i.to_json() for i in self.assembled.items]
        self.assembled = new
        if changed:
            self.version += 1
            self._lists.clear()
        return changed

    def for_labels(self, labels: Labels) -> tuple[list[str], str]:
        """The list for a node with ``labels``, and its strong ETag (cached per label set)."""
        hit = self._lists.get(labels)
        if hit is None:
            images = self.assembled.for_node(dict(labels))
            hit = (images, assemble.etag(images))
            if len(self._lists) < MAX_CACHED_LISTS:
                self._lists[labels] = hit
        return hit

    def record(self, name: str, report: schema.NodeReport, now: float) -> None:
        self.nodes[name] = NodeRecord.from_report(name, report, now)

    def forget_older_than(self, cutoff: float) -> list[str]:
        """Drop nodes whose last report is older than ``cutoff``; their names."""
        gone = [n for n, r in self.nodes.items() if r.received_at < cutoff]
        for name in gone:
            del self.nodes[name]
        return gone

    def snapshot(self) -> Snapshot:
        return Snapshot(self.assembled, tuple(self.nodes.values()), self.version)

    def listing(self, sources: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
        a = self.assembled
        return {
            "version": self.version,
            "images": [i.to_json() for i in a.items],
            "report": a.report,
            "invalid": a.problems,
            "sources": dict(sources),
        }


def cluster_view(snap: Snapshot, now: float, stale_after: float) -> dict[str, Any]:
    """For each image: nodes that have it, are pulling it, failed (with reasons), or are stale.

    Nodes are grouped by label set, so each distinct set is matched against
    the list once.
    """
    images: dict[str, dict[str, Any]] = {
        item.image: {"present": [], "pulling": [], "failed": {}, "missing": [], "stale": []}
        for item in snap.assembled.items
    }
    wanted_by_labels: dict[Labels, list[str]] = {}
    complete = 0
    for node in sorted(snap.nodes, key=lambda n: n.name):
        wanted = wanted_by_labels.get(node.labels)
        if wanted is None:
            wanted = snap.assembled.for_node(dict(node.labels))
            wanted_by_labels[node.labels] = wanted
        stale = now - node.received_at > stale_after
        pulls = node.pulls
        ok = not stale
        for image in wanted:
            row = images[image]
            p = pulls.get(image)
            if stale:
                row["stale"].append(node.name)
            elif p is None:
                row["missing"].append(node.name)
                ok = False
            elif p[0] in ("present", "pulled"):
                row["present"].append(node.name)
            elif p[0] in ("pulling", "retrying") and not p[1]:
                row["pulling"].append(node.name)
                ok = False
            else:
                row["failed"][node.name] = p[1] or p[0]
                ok = False
        complete += ok
    return {
        "summary": {
            "nodes": len(snap.nodes),
            "complete": complete,
            "images": len(images),
            "version": snap.version,
            "built_at": now,
        },
        "images": images,
        "nodes": {
            n.name: {
                "labels": dict(n.labels),
                "received_at": n.received_at,
                "archives": dict(n.archives),
            }
            for n in snap.nodes
        },
    }


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def render_view(snap: Snapshot, now: float, stale_after: float) -> bytes:
    """The view as JSON bytes (run in a worker thread).

    Serialized piece by piece: one ``json.dumps`` of the whole view would
    hold the interpreter lock for the whole document (megabytes with 10,000
    nodes) and stall the event loop meanwhile.
    """
    view = cluster_view(snap, now, stale_after)
    parts = ['{"summary":', _dumps(view["summary"]), ',"images":{']
    parts.append(",".join(f"{_dumps(k)}:{_dumps(v)}" for k, v in view["images"].items()))
    parts.append('},"nodes":{')
    nodes = list(view["nodes"].items())
    for start in range(0, len(nodes), 200):
        if start:
            parts.append(",")
        chunk = nodes[start : start + 200]
        parts.append(",".join(f"{_dumps(k)}:{_dumps(v)}" for k, v in chunk))
    parts.append("}}")
    return "".join(parts).encode()


def summary_line(view: Mapping[str, Any]) -> str:
    """``37/40 nodes complete; 3 missing che-code:1.2 (unauthorized)``."""
    s = view["summary"]
    text = f"{s['complete']}/{s['nodes']} nodes complete"
    problems = []
    for image, row in view["images"].items():
        short = image.rsplit("/", 1)[-1]
        failed = row["failed"]
        missing = len(failed) + len(row["missing"]) + len(row["pulling"])
        if missing:
            reasons = sorted({str(r).split(":")[0] for r in failed.values()})
            why = f" ({', '.join(reasons)})" if reasons else ""
            problems.append(f"{missing} missing {short}{why}")
    return text + ("; " + "; ".join(problems) if problems else "")
