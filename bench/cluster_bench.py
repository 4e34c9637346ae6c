"""Cluster component under 10,000 simulated nodes, on loopback.

    .venv/bin/python -m bench.cluster_bench [--nodes 10000] [--seconds 20] [--concurrency 64]

The server runs as its own process (`image-agent cluster serve`, 40 images,
a bearer token). The load generator (this process, aiohttp) first has every
node report its status once (so the server holds 10,000 reports), then runs
a mixed phase: 90% conditional GETs of a node's list (If-None-Match, 304)
and 10% status reports. Prints requests/s, latency p50/p99 and the server's
RSS with all reports held.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from tests.conftest import free_port

TOKEN = "bench-token"


def report(node: int, images: list[str]) -> bytes:
    return json.dumps(
        {
            "node": f"node-{node}",
            "labels": {"zone": f"z{node % 4}"},
            "archives": [],
            "pulls": [{"image": i, "state": "present", "last_error": ""} for i in images],
        }
    ).encode()


async def run(url: str, nodes: int, seconds: float, concurrency: int, images: list[str]) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn) as session:
        sem = asyncio.Semaphore(concurrency)

        async def put(n: int) -> None:
            async with (
                sem,
                session.put(
                    f"{url}/v1/nodes/node-{n}/status", data=report(n, images), headers=headers
                ) as r,
            ):
                assert r.status == 204, r.status

        start = time.monotonic()
        await asyncio.gather(*(put(n) for n in range(nodes)))
        t = time.monotonic() - start
        print(f"initial reports: {nodes} in {t:.1f} s ({nodes / t:.0f}/s)")

        etags: dict[str, str] = {}
        for z in range(4):
            async with session.get(f"{url}/v1/images?labels=zone=z{z}") as r:
                etags[f"z{z}"] = r.headers["ETag"]
        latencies: list[float] = []
        codes: dict[int, int] = {}
        deadline = time.monotonic() + seconds
        rng = random.Random(7)

        async def worker() -> None:
            while time.monotonic() < deadline:
                n = rng.randrange(nodes)
                t0 = time.monotonic()
                if rng.random() < 0.9:
                    z = f"z{n % 4}"
                    async with session.get(
                        f"{url}/v1/images?node=node-{n}&labels=zone={z}",
                        headers={"If-None-Match": etags[z]},
                    ) as r:
                        await r.read()
                        code = r.status
                else:
                    async with session.put(
                        f"{url}/v1/nodes/node-{n}/status", data=report(n, images), headers=headers
                    ) as r:
                        code = r.status
                latencies.append(time.monotonic() - t0)
                codes[code] = codes.get(code, 0) + 1

        start = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.monotonic() - start
        latencies.sort()
        p50 = latencies[len(latencies) // 2] * 1000
        p99 = latencies[int(len(latencies) * 0.99)] * 1000
        print(
            f"mixed phase: {len(latencies)} requests in {elapsed:.1f} s = "
            f"{len(latencies) / elapsed:.0f} requests/s, p50 {p50:.1f} ms, p99 {p99:.1f} ms, "
            f"status codes {dict(sorted(codes.items()))}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ia-cbench-"))
    images = [f"registry.internal:5000/team{i % 5}/image{i}:1.{i}" for i in range(40)]
    (work / "list.txt").write_text("\n".join(images) + "\n")
    (work / "token").write_text(TOKEN)
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agent",
            "cluster",
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--source-list",
            str(work / "list.txt"),
            "--token-file",
            str(work / "token"),
            "--log-level",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                import urllib.request

                urllib.request.urlopen(url + "/healthz", timeout=1)
                break
            except OSError:
                time.sleep(0.1)  # waiting for the server process to listen
        asyncio.run(
            run(
                url,
                args.nodes,
                args.seconds,
                args.concurrency,
                [f"docker.io/{i}" if "/" not in i.split("/")[0] else i for i in images],
            )
        )
        status = Path(f"/proc/{server.pid}/status").read_text()
        rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS"))
        print(f"server RSS with {args.nodes} reports held: {rss / 1024:.0f} MiB")
    finally:
        server.terminate()
        server.wait(10)
        subprocess.run(["rm", "-rf", str(work)], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
