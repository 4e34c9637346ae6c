"""Import benchmark: image-agent import against `zstd -dc | ctr images import -`.

Same archive, same run, fresh containerd state for each first import, unpack
on for both. Prints wall times, ratios and peak RSS, then the re-import of an
archive whose content is already present.

    .venv/bin/python -m bench.import_bench [--archive PATH] [--small] [--bundle N]

``--bundle N`` measures a site bundle instead: one docker archive of N images
on a shared base (``bench.gen.make_bundle``). ``IMAGE_AGENT_TEST_CONTAINERD``
picks the containerd release, and ``ctr`` comes from the same release.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from agent.sandbox import PrivateContainerd, select_release
from bench import gen

ROOT = Path(__file__).resolve().parent.parent
CTR = select_release().ctr
OUT = ROOT / "bench" / "out"


@dataclass
class Run:
    seconds: float
    peak_rss_mib: float


def run_measured(
    cmd: list[str], *, stdin_cmd: list[str] | None = None, env: dict[str, str] | None = None
) -> Run:
    """Run ``cmd`` (optionally fed by ``stdin_cmd``); wall time and the command's own peak RSS."""
    start = time.monotonic()
    feeder = subprocess.Popen(stdin_cmd, stdout=subprocess.PIPE) if stdin_cmd else None
    proc = subprocess.Popen(
        cmd,
        stdin=feeder.stdout if feeder else subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        env=env,
    )
    if feeder and feeder.stdout:
        feeder.stdout.close()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.monotonic() - start
    if feeder:
        feeder.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}")
    return Run(elapsed, usage.ru_maxrss / 1024)


def ours(address: str, archive: Path) -> Run:
    env = dict(os.environ, CONTAINERD_ADDRESS=address)
    return run_measured([sys.executable, "-m", "agent", "import", str(archive)], env=env)


def theirs(address: str, archive: Path) -> Run:
    return run_measured(
        [CTR, "-a", address, "-n", "k8s.io", "images", "import", "-"],
        stdin_cmd=["zstd", "-dc", str(archive)],
    )


def fresh(tag: str) -> PrivateContainerd:
    c = PrivateContainerd(tempfile.mkdtemp(prefix=f"ia-bench-{tag}-", dir="/tmp"))
    c.start()
    return c


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--archive", type=Path, help="archive to import (default: generate ~1.1 GB)"
    )
    parser.add_argument("--small", action="store_true", help="a ~120 MB archive, for a quick look")
    parser.add_argument(
        "--bundle", type=int, metavar="N", help="a site bundle of N images on a shared base"
    )
    parser.add_argument("--rounds", type=int, default=2, help="rounds, alternating who goes first")
    args = parser.parse_args()
    if args.archive:
        archive = args.archive
    elif args.bundle:
        archive = gen.make_bundle(OUT / f"bundle-{args.bundle}.tar.zst", OUT / "work", args.bundle)
    elif args.small:
        small = tuple(
            gen.LayerSpec(s.small_files // 10, s.big_files, s.big_size // 10)
            for s in gen.DEFAULT_LAYERS
        )
        archive = gen.make_archive(OUT / "bench-small.tar.zst", OUT / "work", small)
    else:
        archive = gen.make_archive(OUT / "bench-1g.tar.zst", OUT / "work")
    print(f"archive {archive} ({archive.stat().st_size / 1e6:.0f} MB compressed)")
    subprocess.run(
        ["cat", str(archive)], stdout=subprocess.DEVNULL, check=True
    )  # warm the page cache

    runs: dict[str, list[Run]] = {}
    tools = [("ctr", theirs), ("image-agent", ours)]
    for round_ in range(args.rounds):
        # Alternate who goes first; settle the disk before every measured run so
        # neither pays for the other's writeback.
        for name, fn in tools if round_ % 2 == 0 else tools[::-1]:
            subprocess.run(["sync"], check=True)
            c = fresh(name)
            try:
                runs.setdefault(f"{name} first", []).append(fn(c.address, archive))
                subprocess.run(["sync"], check=True)
                runs.setdefault(f"{name} again", []).append(fn(c.address, archive))
            finally:
                c.cleanup()
            subprocess.run(["sync"], check=True)

    def best(key: str) -> Run:
        return min(runs[key], key=lambda r: r.seconds)

    title = f"run (best of {args.rounds})"
    print(f"{title:<24}{'seconds':>10}{'all runs':>24}{'peak RSS MiB':>15}")
    for key, rs in runs.items():
        all_s = " ".join(f"{r.seconds:.1f}" for r in rs)
        peak = max(r.peak_rss_mib for r in rs)
        print(f"{key:<24}{best(key).seconds:>10.2f}{all_s:>24}{peak:>15.1f}")
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
