"""Assembling one list from all sources: normalize, rewrite, de-duplicate, sort, report.

Pure: contributions in, the list (with provenance and node selectors) and a
consistency report out. The report never blocks: it tells.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.image import refs
from agent.image.lists import Entry, Problem

UDI_REPOSITORIES = ("quay.io/devfile/universal-developer-image",)


@dataclass(frozen=True)
class Contribution:
    """What one source gives, and which nodes it is for (label selector, empty: all)."""

    source: str
    entries: tuple[Entry, ...]
    problems: tuple[Problem, ...] = ()
    node_selector: tuple[tuple[str, str], ...] = ()


@dataclass
class Item:
    image: str
    sources: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    selectors: list[tuple[tuple[str, str], ...]] = field(default_factory=list)

    def for_labels(self, labels: Mapping[str, str]) -> bool:
        """Wanted on a node with ``labels``: any contributing source selects it."""
        return any(all(labels.get(k) == v for k, v in sel) for sel in self.selectors)

    def to_json(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "sources": self.sources,
            "names": sorted(set(self.names)),
            "node_selectors": [dict(s) for s in self.selectors if s],
        }


@dataclass
class Assembled:
    items: list[Item]
    report: list[str]
    problems: list[str]

    def for_node(self, labels: Mapping[str, str]) -> list[str]:
        return [i.image for i in self.items if i.for_labels(labels)]


def parse_rewrite(text: str) -> tuple[str, str]:
    """``FROM=TO``; ValueError (one line) unless TO is a valid registry or repository prefix."""
    src, sep, dst = text.partition("=")
    src, dst = src.strip().rstrip("/"), dst.strip().rstrip("/")
    if not sep or not src or not dst:
        raise ValueError(
            f"--rewrite {text!r}: want FROM=TO, e.g. quay.io=registry.internal:5000/quay"
        )
    try:
        refs.parse(dst + "/x/y:1")
    except refs.InvalidReference as err:
        raise ValueError(f"--rewrite {text!r}: {dst!r} is not a valid mirror ({err})") from None
    return src, dst


def rewrite(image: str, rules: list[tuple[str, str]]) -> str:
    """Map a registry (or registry/path prefix) onto a mirror; the longest match wins."""
    for src, dst in sorted(rules, key=lambda r: -len(r[0])):
        if image == src or image.startswith(src + "/"):
            return refs.normalize(dst + image[len(src) :])
    return image


def assemble(contributions: list[Contribution], rules: list[tuple[str, str]]) -> Assembled:
    by_image: dict[str, Item] = {}
    problems = [str(p) for c in contributions for p in c.problems]
    for c in contributions:
        for e in c.entries:
            try:
                image = rewrite(e.ref, rules)
            except refs.InvalidReference as err:
                problems.append(f"{e.where}: rewritten {e.ref} is not valid ({err})")
                continue
            item = by_image.setdefault(image, Item(image))
            item.sources.append(e.where)
            if e.name:
                item.names.append(e.name)
            if c.node_selector not in item.selectors:
                item.selectors.append(c.node_selector)
    items = [by_image[k] for k in sorted(by_image)]
    return Assembled(items, consistency(items), problems)


def consistency(items: list[Item]) -> list[str]:
    """Warnings: editors on the generic UDI, one repository at several tags, :latest or untagged."""
    out: list[str] = []
    tags: dict[str, list[str]] = {}
    for item in items:
        ref = refs.parse(item.image)
        tags.setdefault(ref.repository, []).append(ref.tag or ref.digest or "")
        editors = [n for n in item.names if n.startswith("editor")]
        if editors and any(
            ref.repository.endswith(u.split("/", 1)[1]) or ref.repository == u
            for u in UDI_REPOSITORIES
        ):
            out.append(
                f"{item.image}: editor entry ({', '.join(sorted(set(editors)))}) points at "
                "the generic universal developer image"
            )
        if ref.tag == "latest" and not ref.digest:
            out.append(
                f"{item.image}: ':latest' (or no tag) moves; pin a tag or digest "
                f"({', '.join(item.sources)})"
            )
    for repo, found in sorted(tags.items()):
        if len(found) > 1:
            out.append(f"{repo}: listed with several tags ({', '.join(sorted(found))})")
    return out


def render(images: list[str]) -> bytes:
    return ("".join(f"{i}\n" for i in images)).encode()


def etag(images: list[str]) -> str:
    """A strong ETag: the digest of the exact list a node is served."""
    return '"' + hashlib.sha256(json.dumps(images).encode()).hexdigest()[:32] + '"'
