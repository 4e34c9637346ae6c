"""Content write benchmark: one blob into containerd's content store, ours against ``ctr``.

Both write the same file through containerd's content Write API: ``ctr
content ingest`` (containerd's own Go client) and image-agent's client with
the importer's chunk size and window. Each run gets a fresh containerd on a
new filesystem (bench/disk.py); rounds alternate who goes first. This is
the floor under every import: no importer gets content into containerd
faster than containerd accepts it.

    .venv/bin/python -m bench.write_bench [--mib N] [--rounds N] [--streams K]

``--streams K`` also writes K blobs at once (ours only), to show how far
containerd's acceptance grows with parallel writes.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from agent.containerd.client import Containerd
from agent.importer.ingest import CHUNK
from bench.import_bench import CTR, OUT, Run, cpu_seconds, fresh, server_pid

SEED = b"image-agent write bench"


def make_blob(path: Path, mib: int) -> str:
    """A deterministic, incompressible file of ``mib`` MiB; returns its digest."""
    digest = hashlib.sha256()
    if not path.exists() or path.stat().st_size != mib << 20:
        block = hashlib.shake_256(SEED).digest(1 << 20)
        with path.open("wb") as f:
            for i in range(mib):
                f.write(hashlib.sha256(block + i.to_bytes(4, "big")).digest() + block[32:])
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def file_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


def ctr_ingest(address: str, blob: Path, digest: str, pid: int) -> Run:
    """``ctr content ingest`` of ``blob``: wall time, and ctr's CPU plus containerd's."""
    with blob.open("rb") as stdin:
        before = cpu_seconds(pid)
        start = time.monotonic()
        proc = subprocess.Popen(
            [CTR, "-a", address, "-n", "k8s.io", "content", "ingest",
             "--expected-size", str(blob.stat().st_size), "--expected-digest", digest,
             "bench-ingest"],
            stdin=stdin,
        )  # fmt: skip
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.monotonic() - start
    if proc.returncode != 0:
        raise RuntimeError(f"ctr content ingest exited {proc.returncode}")
    return Run(
        seconds, usage.ru_maxrss / 1024, cpu_seconds(pid) - before + usage.ru_utime + usage.ru_stime
    )


def ours_write(address: str, blobs: list[tuple[Path, str]], pid: int) -> Run:
    """Write every blob at once, one thread each, as the importer writes one."""
    with Containerd(address) as client:
        lease = client.create_lease(600)
        before = cpu_seconds(pid) + _own_cpu()
        start = time.monotonic()
        threads = [
            threading.Thread(
                target=client.write_blob,
                args=(file_chunks(path),),
                kwargs={"lease": lease, "total": path.stat().st_size, "expected": digest},
            )
            for path, digest in blobs
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.monotonic() - start
        cpu = cpu_seconds(pid) + _own_cpu() - before
        present = all(client.blob_info(digest) is not None for _, digest in blobs)
    if not present:
        raise RuntimeError("a blob is missing after the write")
    return Run(seconds, 0.0, cpu)


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=400, help="blob size [MiB]")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--streams", type=int, default=2, help="parallel writes, ours (0: skip)")
    args = parser.parse_args()
    blobs = [
        (path, make_blob(path, args.mib))
        for path in (OUT / f"blob-{args.mib}-{i}.bin" for i in range(max(1, args.streams)))
    ]
    mb = (args.mib << 20) / 1e6
    runs: dict[str, list[Run]] = {"ctr": [], "ours": [], f"ours x{args.streams}": []}
    for round_ in range(args.rounds):
        order = ["ctr", "ours"] if round_ % 2 == 0 else ["ours", "ctr"]
        for name in order:
            subprocess.run(["sync"], check=True)
            with fresh(name, own_disk=True) as c:
                pid = server_pid(c)
                if name == "ctr":
                    runs[name].append(ctr_ingest(c.address, *blobs[0], pid))
                else:
                    runs[name].append(ours_write(c.address, blobs[:1], pid))
        if args.streams > 1:
            with fresh("parallel", own_disk=True) as c:
                runs[f"ours x{args.streams}"].append(ours_write(c.address, blobs, server_pid(c)))
    for name, rs in runs.items():
        if rs:
            n = args.streams if "x" in name else 1
            rates = " ".join(f"{n * mb / r.seconds:.0f}" for r in rs)
            cpu = statistics.median(r.cpu_s for r in rs)
            print(f"{name:<10} MB/s per round: {rates}  (median CPU {cpu:.1f} s incl. containerd)")
    ratios = [c.seconds / o.seconds for c, o in zip(runs["ctr"], runs["ours"], strict=True)]
    each = " ".join(f"{r:.2f}" for r in ratios)
    print(f"one blob: image-agent is {statistics.median(ratios):.2f}x ctr (rounds {each})")
    print(f"peak RSS of this process: {_peak_rss_mib():.1f} MiB")
    return 0


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


if __name__ == "__main__":
    sys.exit(main())
