"""Pre-pull benchmark: 30 images from a local registry, concurrent vs one by one.

    .venv/bin/python -m bench.pull_bench [--images 30] [--size-mib 8]

The sequential run does what k3s does with a .txt list: for each image, CRI
ImageStatus, then PullImage, one at a time. The concurrent run is
`image-agent pull --pull-concurrency N` for all images. Each run gets a
fresh containerd; both pull the same images from the same registry.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from agent import platforms, samples
from agent.containerd import Containerd
from agent.sandbox import PrivateContainerd
from tests.conftest import Registry


class DelayProxy:
    """A TCP proxy on loopback that holds each client request for ``delay`` seconds.

    Models a registry a WAN round trip away: every HTTP request (manifest,
    config, layer) pays the delay before the registry sees it.
    """

    def __init__(self, target: str, delay: float) -> None:
        self.target_host, port = target.rsplit(":", 1)
        self.target_port = int(port)
        self.delay = delay
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.port = 0
        threading.Thread(target=self._run, daemon=True).start()
        self.ready.wait(10)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self.ready.set()
        self.loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection(self.target_host, self.target_port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, delay: bool) -> None:
            try:
                while data := await src.read(1 << 16):
                    if delay:
                        await asyncio.sleep(self.delay)  # the round trip of this request
                    dst.write(data)
                    await dst.drain()
            finally:
                dst.close()

        await asyncio.gather(
            pipe(reader, up_w, True), pipe(up_r, writer, False), return_exceptions=True
        )


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
    node = platforms.node()
    work = Path(tempfile.mkdtemp(prefix="ia-pbench-", dir="/tmp"))
    reg = Registry(work / "registry")
    reg.start()
    try:
        refs = []
        half = (args.size_mib << 20) // 2
        for i in range(args.images):
            layers = (
                samples.Layer({"a": os.urandom(half)}, "gzip"),
                samples.Layer({"b": os.urandom(half)}, "gzip"),
            )
            image = samples.SampleImage(f"bench/img{i}:1", (samples.Variant(node, layers),))
            path = work / "img.tar"
            path.write_bytes(samples.oci_archive([image]))
            reg.push(path, f"bench/img{i}:1")
            refs.append(f"{reg.host}/bench/img{i}:1")
        print(f"{args.images} images of {args.size_mib} MiB, registry on loopback")
        for latency in args.latency_ms:
            host = reg.host
            if latency:
                host = DelayProxy(reg.host, latency / 1000).host
            wanted = [r.replace(reg.host, host, 1) for r in refs]

            def fresh(tag: str, host: str = host, latency: float = latency) -> PrivateContainerd:
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
            for n in args.concurrency:
                c = fresh(f"c{n}")
                try:
                    t, rss = concurrent(c.address, wanted, n)
                finally:
                    c.cleanup()
                print(
                    f"[{latency:.0f} ms per request] image-agent pull, concurrency {n}: "
                    f"{t:.2f} s ({t_seq / t:.2f}x), peak RSS {rss:.1f} MiB"
                )
    finally:
        reg.stop()
        subprocess.run(["rm", "-rf", str(work)], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
