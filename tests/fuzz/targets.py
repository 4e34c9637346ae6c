"""Fuzz targets: each takes arbitrary bytes and may raise only the parser's own error type.

Anything else (an uncaught exception, a hang, memory growth) is a finding.
Used by ``scripts/fuzz`` (atheris, coverage-guided) and by the test suite,
which runs every target for a bounded time.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from agent.airgap.verify import verify
from agent.archive import layout, limits
from agent.cluster import schema
from agent.errors import ArchiveError
from agent.image import lists, refs

# Small bounds keep each execution fast; the checks are the same.
FUZZ_LIMITS = limits.Limits(
    memory_budget=limits.RESERVED + limits.MIN_WINDOW,
    max_members=2000,
)

_SCRATCH = (
    Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
) / f"image-agent-fuzz-{os.getpid()}.tar"


def archive(data: bytes) -> None:
    """An archive file through ``verify``: outer compression, tar, blob names, duplicates,
    manifest.json, index.json, nested indexes, manifests and configs (the importer's own
    code, with the in-memory store)."""
    _SCRATCH.write_bytes(data)
    try:
        verify(str(_SCRATCH))
    except ArchiveError as err:
        _one_line(str(err))
    finally:
        _SCRATCH.unlink()  # libFuzzer ends the process without running atexit


def layout_docs(data: bytes) -> None:
    """One metadata document through every layout parser, as index, manifest and config."""
    limits.begin_archive()  # each input is an archive of its own: counts do not carry over
    for parse in (
        layout.parse_index,
        lambda d: layout.parse_manifest(d, "manifest"),
        lambda d: layout.parse_config(d, "config"),
        layout.parse_docker_manifest,
        lambda d: layout.document_kind("", d, "doc"),
    ):
        try:
            parse(data)
        except ArchiveError as err:
            _one_line(str(err))


def bundle_manifest(data: bytes) -> None:
    """A registry's manifest answer as ``bundle`` reads it: kind, then index or manifest."""
    limits.begin_archive()  # as bundle does for each image
    try:
        kind = layout.document_kind("", data, "registry manifest")
        if kind == "index":
            for child in layout.parse_index(data, "registry index"):
                assert refs.is_digest(child.digest)
        else:
            manifest = layout.parse_manifest(data, "registry manifest")
            assert len(manifest.layers) <= limits.current().max_layers
    except ArchiveError as err:
        _one_line(str(err))


def pull_list(data: bytes) -> None:
    """A pull list (any of its formats): entries are normalized references, problems one line."""
    text = data.decode("utf-8", errors="replace")
    entries, problems = lists.parse(text, "fuzz.txt")
    for entry in entries:
        assert refs.normalize(entry.ref) == entry.ref, entry.ref
    for problem in problems:
        _one_line(str(problem))


def reference(data: bytes) -> None:
    """A reference: valid ones are ASCII, normalize to themselves, and keep their parts."""
    text = data.decode("utf-8", errors="replace")
    try:
        ref = refs.parse(text)
    except refs.InvalidReference as err:
        _one_line(str(err))
        return
    out = str(ref)
    assert out.isascii() and "\n" not in out, out
    assert refs.normalize(out) == out, (text, out)
    again = refs.parse(out)
    assert (again.domain, again.path, again.digest) == (ref.domain, ref.path, ref.digest)


def cluster_report(data: bytes) -> None:
    """A node's status report as the cluster server reads it: a model, or one SchemaError line."""
    try:
        schema.parse_report(data)
    except schema.SchemaError as err:
        _one_line(str(err))


def _one_line(message: str) -> None:
    assert message and "\n" not in message, repr(message)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "archive": archive,
    "layout": layout_docs,
    "bundle-manifest": bundle_manifest,
    "pull-list": pull_list,
    "reference": reference,
    "cluster-report": cluster_report,
}
