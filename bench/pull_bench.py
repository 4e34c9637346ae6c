"""Pre-pull benchmark: 30 images from a local registry, concurrent vs one by one.

    .venv/bin/python -m bench.pull_bench [--images 30] [--size-mib 8]

The sequential run does what k3s does with a .txt list: for each image, CRI
ImageStatus, then PullImage, one at a time. The concurrent run is
`image-agent pull --pull-concurrency N` for all images. Each run gets a
fresh containerd; both pull the same images from the same registry.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from agent.containerd import Containerd
from agent.image import platforms
from agent.testing import samples
from agent.testing.processes import Registry
from agent.testing.proxy import Proxy
from agent.testing.sandbox import PrivateContainerd


def sequential(address: str, refs: list[str]) -> float:
    start = time.monotonic()
    with Containerd(address) as client:
        for ref in refs:
            if client.cri_image_status(ref) is None:
                client.cri_pull(ref, timeout=600)
    return time.monotonic() - start


def concurrent(address: str, refs: list[str], n: int) -> tuple[float, float]:
    env = dict(os.environ, CONTAINERD_ADDRESS=address)
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "pull", "--pull-concurrency", str(n), *refs],
        env=env,
        stdout=subprocess.DEVNULL,
    )
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError("image-agent pull failed")
    return time.monotonic() - start, usage.ru_maxrss / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=30)
    parser.add_argument("--size-mib", type=int, default=8, help="per image, in two layers")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[3, 6])
    parser.add_argument(
        "--latency-ms",
        type=float,
        nargs="+",
        default=[0, 50],
        help="round trip added to every registry request (0: plain loopback)",
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ia-pbench-", dir="/tmp"))
    reg = Registry(work / "registry")
    reg.start()
    try:
        refs = push_images(reg, work, args.images, args.size_mib)
        print(f"{args.images} images of {args.size_mib} MiB, registry on loopback")
        for latency in args.latency_ms:
            compare(reg, work, refs, latency, args.concurrency)
    finally:
        reg.stop()
        subprocess.run(["rm", "-rf", str(work)], check=False)
    return 0


def push_images(reg: Registry, work: Path, count: int, size_mib: int) -> list[str]:
    """Push ``count`` images of two random gzip layers each; their references."""
    node = platforms.node()
    refs = []
    half = (size_mib << 20) // 2
    for i in range(count):
        layers = (
            samples.Layer({"a": os.urandom(half)}, "gzip"),
            samples.Layer({"b": os.urandom(half)}, "gzip"),
        )
        image = samples.SampleImage(f"bench/img{i}:1", (samples.Variant(node, layers),))
        path = work / "img.tar"
        path.write_bytes(samples.oci_archive([image]))
        reg.push(path, f"bench/img{i}:1")
        refs.append(f"{reg.host}/bench/img{i}:1")
    return refs


def compare(
    reg: Registry, work: Path, refs: list[str], latency: float, concurrency: list[int]
) -> None:
    """Sequential k3s-style pulls against ``image-agent pull`` at each concurrency."""
    host = reg.host
    if latency:
        host = Proxy(reg.host, delay=latency / 1000).host
    wanted = [r.replace(reg.host, host, 1) for r in refs]

    def fresh(tag: str) -> PrivateContainerd:
        subprocess.run(["sync"], check=True)
        c = PrivateContainerd(work / f"ctd-{tag}-{latency}")
        c.registry_plain_http(host)
        c.start()
        return c

    c = fresh("seq")
    try:
        t_seq = sequential(c.address, wanted)
    finally:
        c.cleanup()
    print(
        f"[{latency:.0f} ms per request] sequential, k3s-style "
        f"(ImageStatus + PullImage): {t_seq:.2f} s"
    )
    for n in concurrency:
        c = fresh(f"c{n}")
        try:
            t, rss = concurrent(c.address, wanted, n)
        finally:
            c.cleanup()
        print(
            f"[{latency:.0f} ms per request] image-agent pull, concurrency {n}: "
            f"{t:.2f} s ({t_seq / t:.2f}x), peak RSS {rss:.1f} MiB"
        )


if __name__ == "__main__":
    sys.exit(main())
