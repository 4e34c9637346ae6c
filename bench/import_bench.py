"""Import benchmark: image-agent import against `zstd -dc | ctr images import -`.

Same archive, same run, fresh containerd state for each first import, unpack
on for both. Each containerd gets a new ext4 filesystem of its own
(``--disk fresh``, the default; bench/disk.py says why). Prints wall times,
ratios and peak RSS, then the re-import of an archive whose content is
already present.

    .venv/bin/python -m bench.import_bench [--archive PATH] [--small] [--bundle N]

``--bundle N`` measures a site bundle instead: one docker archive of N images
on a shared base (``bench.gen.make_bundle``). ``IMAGE_AGENT_TEST_CONTAINERD``
picks the containerd release, and ``ctr`` comes from the same release.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from agent.testing.sandbox import PrivateContainerd, select_release
from bench import disk, gen

ROOT = Path(__file__).resolve().parent.parent
CTR = select_release().ctr
OUT = ROOT / "bench" / "out"


@dataclass
class Run:
    seconds: float
    peak_rss_mib: float
    #: CPU seconds of the client (and its feeder) plus containerd's during the run.
    cpu_s: float = 0.0


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds a running process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_measured(
    cmd: list[str],
    *,
    stdin_cmd: list[str] | None = None,
    env: dict[str, str] | None = None,
    stderr: IO[bytes] | None = None,
    server_pid: int | None = None,
) -> Run:
    """Run ``cmd`` (optionally fed by ``stdin_cmd``): wall time, its own peak RSS, and CPU.

    The CPU figure adds the command's, its feeder's and (``server_pid``) containerd's.
    """
    server_before = cpu_seconds(server_pid) if server_pid else 0.0
    start = time.monotonic()
    feeder = subprocess.Popen(stdin_cmd, stdout=subprocess.PIPE) if stdin_cmd else None
    proc = subprocess.Popen(
        cmd,
        stdin=feeder.stdout if feeder else subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        env=env,
    )
    if feeder and feeder.stdout:
        feeder.stdout.close()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.monotonic() - start
    cpu = usage.ru_utime + usage.ru_stime
    if feeder:
        _, _, feeder_usage = os.wait4(feeder.pid, 0)
        feeder.returncode = 0
        cpu += feeder_usage.ru_utime + feeder_usage.ru_stime
    if server_pid:
        cpu += cpu_seconds(server_pid) - server_before
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}")
    return Run(elapsed, usage.ru_maxrss / 1024, cpu)


def server_pid(c: PrivateContainerd) -> int:
    assert c.proc is not None, "containerd is not running"
    return c.proc.pid


def ours(c: PrivateContainerd, archive: Path, extra: tuple[str, ...] = ()) -> Run:
    env = dict(os.environ, CONTAINERD_ADDRESS=c.address)
    return run_measured(
        [sys.executable, "-m", "agent", "import", *extra, str(archive)],
        env=env,
        server_pid=server_pid(c),
    )


def traced(
    archive: Path, out: Path, extra: tuple[str, ...] = (), *, prescan: bool, own_disk: bool
) -> None:
    """One more import, into a fresh containerd, with its timeline (debug events) in ``out``.

    Without ``prescan`` the archive is read as from a pipe (bench.stream_import).
    """
    subprocess.run(["sync"], check=True)
    command = ["agent", "import", *extra] if prescan else ["bench.stream_import"]
    with fresh("trace", own_disk=own_disk) as c:
        env = dict(os.environ, CONTAINERD_ADDRESS=c.address, IMAGE_AGENT_LOG_LEVEL="debug")
        with out.open("wb") as f:
            run = run_measured([sys.executable, "-m", *command, str(archive)], env=env, stderr=f)
    print(f"traced import: {run.seconds:.2f}s, peak RSS {run.peak_rss_mib:.1f} MiB -> {out}")
    print(summarize(out))


def summarize(path: Path) -> str:
    """The timeline in ``path`` as a table: phases, then layers (count, span, busy, overlap)."""
    events = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            events.append(json.loads(line))
    lines = [f"{'phase':<22}{'start s':>9}{'end s':>9}{'seconds':>9}"]
    for e in events:
        if str(e.get("event", "")).startswith("phase "):
            start, took = float(e["t_s"]), float(e["duration_s"])
            name = e["event"][6:]
            lines.append(f"{name:<22}{start:>9.2f}{start + took:>9.2f}{took:>9.2f}")
        elif e.get("event") in ("prescan outcome", "import done"):
            lines.append(f"{e['event']}: {e.get('outcome', e.get('duration_s'))}")
    layers = [e for e in events if e.get("event") == "layer unpacked"]
    if layers:
        spans = [
            (
                float(e["start_s"]),
                float(e["start_s"]) + e["prepare_s"] + e["apply_s"] + e["commit_s"],
            )
            for e in layers
        ]
        busy = sum(e["prepare_s"] + e["apply_s"] + e["commit_s"] for e in layers)
        first, last = min(s for s, _ in spans), max(e for _, e in spans)
        # Most applies running at one time.
        marks = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
        level = peak = 0
        for _, step in marks:
            level += step
            peak = max(peak, level)
        lines.append(
            f"layers applied: {len(layers)}, from {first:.2f}s to {last:.2f}s, "
            f"busy {busy:.2f}s (prepare {sum(e['prepare_s'] for e in layers):.2f}, "
            f"apply {sum(e['apply_s'] for e in layers):.2f}, "
            f"commit {sum(e['commit_s'] for e in layers):.2f}), at most {peak} at once"
        )
    return "\n".join(lines)


def theirs(c: PrivateContainerd, archive: Path) -> Run:
    return run_measured(
        [CTR, "-a", c.address, "-n", "k8s.io", "images", "import", "-"],
        stdin_cmd=["zstd", "-dc", str(archive)],
        server_pid=server_pid(c),
    )


@contextlib.contextmanager
def fresh(tag: str, *, own_disk: bool) -> Iterator[PrivateContainerd]:
    """A started containerd with empty state, on a new filesystem if ``own_disk``."""
    with contextlib.ExitStack() as stack:
        parent = stack.enter_context(disk.fresh_disk()) if own_disk else Path("/tmp")
        c = PrivateContainerd(tempfile.mkdtemp(prefix=f"ia-bench-{tag}-", dir=parent))
        stack.callback(c.cleanup)
        c.start()
        yield c


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--archive", type=Path, help="archive to import (default: generate ~1.1 GB)"
    )
    parser.add_argument("--small", action="store_true", help="a ~120 MB archive, for a quick look")
    parser.add_argument(
        "--bundle", type=int, metavar="N", help="a site bundle of N images on a shared base"
    )
    parser.add_argument(
        "--light",
        action="store_true",
        help="with --bundle: a tenth of the data per image (for many images)",
    )
    parser.add_argument("--rounds", type=int, default=2, help="rounds, alternating who goes first")
    parser.add_argument(
        "--trace", type=Path, metavar="FILE", help="also trace one import's phases into FILE"
    )
    parser.add_argument(
        "--only-trace", action="store_true", help="with --trace: the traced import only"
    )
    parser.add_argument(
        "--no-prescan",
        action="store_true",
        help="with --trace: import as from a pipe, without the metadata pre-scan",
    )
    parser.add_argument(
        "--disk",
        choices=("fresh", "shared"),
        default="fresh" if disk.available() else "shared",
        help="fresh: a new ext4 filesystem per run (bench/disk.py says why); "
        "shared: containerd state under /tmp",
    )
    parser.add_argument(
        "--agent-args", default="", help="extra options for image-agent import (space-separated)"
    )
    return parser.parse_args()


def the_archive(args: argparse.Namespace) -> Path:
    """The archive the arguments name, generated (deterministically) unless given."""
    if args.archive:
        return Path(args.archive)
    if args.bundle:
        app = gen.BUNDLE_APP_SMALL if args.light else gen.BUNDLE_APP
        light = "-light" if args.light else ""
        return gen.make_bundle(
            OUT / f"bundle-{args.bundle}{light}.tar.zst", OUT / "work", args.bundle, app
        )
    if args.small:
        small = tuple(
            gen.LayerSpec(s.small_files // 10, s.big_files, s.big_size // 10)
            for s in gen.DEFAULT_LAYERS
        )
        return gen.make_archive(OUT / "bench-small.tar.zst", OUT / "work", small)
    return gen.make_archive(OUT / "bench-1g.tar.zst", OUT / "work")


Tool = Callable[[PrivateContainerd, Path], Run]


def paired_rounds(
    tools: list[tuple[str, Tool]], archive: Path, rounds: int, *, own_disk: bool
) -> dict[str, list[Run]]:
    """Each round: every tool imports into a fresh containerd, then again; order alternates."""
    runs: dict[str, list[Run]] = {}
    for round_ in range(rounds):
        # Settle the disk before every measured run so neither pays for the
        # other's writeback.
        for name, fn in tools if round_ % 2 == 0 else tools[::-1]:
            subprocess.run(["sync"], check=True)
            with fresh(name, own_disk=own_disk) as c:
                runs.setdefault(f"{name} first", []).append(fn(c, archive))
                subprocess.run(["sync"], check=True)
                runs.setdefault(f"{name} again", []).append(fn(c, archive))
            subprocess.run(["sync"], check=True)
    return runs


def report(runs: dict[str, list[Run]]) -> None:
    """Per run: best time, median CPU, peak RSS; then each round's ratio and their median."""

    def best(key: str) -> Run:
        return min(runs[key], key=lambda r: r.seconds)

    print(f"{'run':<20}{'best s':>8}{'median CPU s':>14}{'peak RSS MiB':>14}  all runs (s)")
    for key, rs in runs.items():
        all_s = " ".join(f"{r.seconds:.1f}" for r in rs)
        peak = max(r.peak_rss_mib for r in rs)
        cpu = statistics.median(r.cpu_s for r in rs)
        print(f"{key:<20}{best(key).seconds:>8.2f}{cpu:>14.1f}{peak:>14.1f}  {all_s}")
    # This machine's speed drifts between runs (shared host, disk discards);
    # each round's pair ran back to back, so its ratio is the fairer figure.
    labels = {"first": "first import, with unpack", "again": "re-import (content present)"}
    for kind, label in labels.items():
        pairs = [
            c.seconds / o.seconds
            for c, o in zip(runs[f"ctr {kind}"], runs[f"image-agent {kind}"], strict=True)
        ]
        best_ratio = best(f"ctr {kind}").seconds / best(f"image-agent {kind}").seconds
        each = " ".join(f"{p:.2f}" for p in pairs)
        print(
            f"{label}: image-agent is {statistics.median(pairs):.2f}x ctr "
            f"(median of rounds {each}; best vs best {best_ratio:.2f}x)"
        )


def main() -> int:
    args = parse_args()
    archive = the_archive(args)
    print(f"disk: {args.disk}")
    print(f"archive {archive} ({archive.stat().st_size / 1e6:.0f} MB compressed)")
    subprocess.run(
        ["cat", str(archive)], stdout=subprocess.DEVNULL, check=True
    )  # warm the page cache
    extra = tuple(args.agent_args.split())
    own_disk = args.disk == "fresh"
    if args.trace:
        traced(archive, args.trace, extra, prescan=not args.no_prescan, own_disk=own_disk)
        if args.only_trace:
            return 0
    tools: list[tuple[str, Tool]] = [
        ("ctr", theirs),
        ("image-agent", lambda c, path: ours(c, path, extra)),
    ]
    report(paired_rounds(tools, archive, args.rounds, own_disk=own_disk))
    return 0


if __name__ == "__main__":
    sys.exit(main())
