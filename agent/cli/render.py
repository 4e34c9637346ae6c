"""Human-readable output: sizes, tables, the progress line and every command's text.

Commands gather their data and hand it here; nothing else in the package
formats a table or a summary line. Output goes through ``print`` so that it
follows whatever ``sys.stdout`` and ``sys.stderr`` are at the time.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, TypedDict

from agent.importer import ImportResult, Progress

if TYPE_CHECKING:
    from agent.airgap.bundle import Plan
    from agent.airgap.verify import Report
    from agent.cluster import schema


class ImageRow(TypedDict):
    """One image as ``images`` lists it (also its JSON output)."""

    tags: list[str]
    digests: list[str]
    id: str
    size: int
    pinned: bool


_STEP = 1024  # each binary unit is this many of the one before


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < _STEP or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= _STEP
    raise AssertionError("unreachable")


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [headers, *rows]
    ]
    return "\n".join(lines)


class ProgressLine:
    """Rewrites one stderr line with bytes read, percent and MB/s (terminals only)."""

    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self.stream = stream
        self.enabled = stream.isatty()
        self.shown = False

    def __call__(self, p: Progress) -> None:
        if not self.enabled:
            return
        rate = p.done / p.elapsed_s / 1e6 if p.elapsed_s > 0 else 0.0
        pct = f" ({100 * p.done / p.total:.0f}%)" if p.total else ""
        self.stream.write(f"\r{p.file}: {human_bytes(p.done)}{pct} {rate:.1f} MB/s   ")
        self.stream.flush()
        self.shown = True

    def done(self) -> None:
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()
            self.shown = False


def since(start: float) -> float:
    return round(time.monotonic() - start, 3)


def error(message: object) -> None:
    """The one-line complaint on stderr: ``image-agent: ...``."""
    print(f"image-agent: {message}", file=sys.stderr)


def import_result(result: ImportResult) -> None:
    """Each image imported, the unnamed ones skipped, then the archive's summary line."""
    for image in result.images:
        state = "unpacked" if image.unpacked else "not unpacked"
        plats = ", ".join(image.platforms) or "any platform"
        print(f"{image.action} {image.name} {image.digest} ({plats}, {state})")
    for digest in result.unnamed:
        print(f"skipped unnamed image {digest}")
    for name in result.not_in_cri:
        error(f"warning: the CRI does not list {name} yet")
    print(
        f"{result.file}: {len(result.images)} image(s), {human_bytes(result.bytes_read)} "
        f"read, {result.blobs_written} blob(s) written, {result.blobs_present} already present, "
        f"{result.duration_s:.2f}s"
    )


def images_table(rows: Sequence[ImageRow]) -> str:
    """One line per tag: IMAGE DIGEST ID SIZE PINNED."""
    table_rows = []
    for row in rows:
        digest = (row["digests"] or [""])[0].rpartition("@")[2][:19]
        table_rows += [
            [
                tag,
                digest,
                row["id"][7:20],
                human_bytes(row["size"]),
                "yes" if row["pinned"] else "no",
            ]
            for tag in row["tags"] or ["<none>"]
        ]
    return table(["IMAGE", "DIGEST", "ID", "SIZE", "PINNED"], table_rows)


def demo_images(rows: Sequence[ImageRow]) -> None:
    for row in rows:
        print(f"  {', '.join(row['tags'])}  {row['id'][:19]}  pinned={row['pinned']}")


def node_status(doc: Mapping[str, Any]) -> None:
    """The daemon line, then the archives and the pulls as tables (``status``)."""
    from agent.node.plan import escape  # noqa: PLC0415 -- only `status` renders node records

    d = doc["daemon"]
    if d.get("running"):
        health = (
            "healthy"
            if d.get("healthy")
            else f"unhealthy ({d.get('health') or 'containerd ' + str(d.get('containerd'))})"
        )
        where = escape(str(d.get("images_dir")))
        print(f"daemon: running (pid {d['pid']}), {health}, watching {where}")
    else:
        print("daemon: not running")
    archives = [  # in mtime order: the order they are imported in
        [
            escape(a["path"]),
            a["state"],
            human_bytes(a["size"]),
            str(a["attempts"]),
            escape(a["error"] or a["reason"] or ", ".join(a["images"])),
        ]
        for a in doc["archives"]
    ]
    if archives:
        print(table(["ARCHIVE", "STATE", "SIZE", "ATTEMPTS", "DETAIL"], archives))
    pulls = [
        [
            escape(p["image"]),
            p["state"],
            escape(p["source"]),
            str(p["attempts"]),
            escape(p["last_error"] or p["image_id"]),
        ]
        for p in doc["pulls"]
    ]
    if pulls:
        print(table(["IMAGE", "STATE", "SOURCE", "ATTEMPTS", "DETAIL"], pulls))


def bundle_result(plan: Plan, out: Path, elapsed_s: float) -> None:
    """Each image bundled, then the archive's summary line."""
    for image in plan.images:
        print(f"{image.name} {image.digest} ({', '.join(image.platforms)})")
    print(
        f"{out}: {len(plan.images)} image(s), "
        f"{len(plan.docs) + len(plan.layers)} blob(s), "
        f"{human_bytes(plan.total_size)} uncompressed, "
        f"{human_bytes(out.stat().st_size)} written in {elapsed_s:.1f}s"
    )


def verify_report(path: str, rep: Report) -> None:
    """An archive that passed ``verify``: its summary, its images, the platforms it lacks."""
    print(
        f"{path}: ok, {len(rep.result.images)} image(s), {rep.blobs} blob(s), "
        f"{human_bytes(rep.total_size)}, platforms {', '.join(rep.platforms)}"
    )
    for i in rep.result.images:
        print(f"  {i.name} {i.digest} ({', '.join(i.platforms)})")
    absent = sorted(set(rep.result.absent_platforms))
    if absent:
        print(f"  not carried: {', '.join(absent)}")


def _cell(node: str, row: schema.ImageRow) -> str:
    if node in row.present:
        return "ok"
    if node in row.failed:
        return "failed"
    if node in row.pulling:
        return "pulling"
    if node in row.stale:
        return "stale"
    if node in row.missing:
        return "missing"
    return "-"


def cluster_matrix(view: schema.StatusView) -> str:
    """Node x image: ok, failed, pulling, stale, missing or - in each cell ('' when no image)."""
    nodes = sorted(view.nodes)
    rows = [[image, *(_cell(node, row) for node in nodes)] for image, row in view.images.items()]
    return table(["IMAGE", *nodes], rows) if rows else ""


def cluster_listing(listing: schema.Listing) -> None:
    """The assembled list with provenance, then warnings, invalid lines and failing sources."""
    for item in listing.images:
        where = ", ".join(item.sources)
        sel = " ".join(
            f"[{','.join(f'{k}={v}' for k, v in s.items())}]" for s in item.node_selectors
        )
        print(f"{item.image}  <- {where}{' ' + sel if sel else ''}")
    for line in listing.report:
        print(f"warning: {line}")
    for line in listing.invalid:
        print(f"invalid: {line}")
    for src, st in listing.sources.items():
        if not st.ok:
            print(f"source failing (last good list kept): {src}: {st.error}")
