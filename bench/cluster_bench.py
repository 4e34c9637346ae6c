"""Cluster component under 10,000 simulated nodes, on loopback.

    .venv/bin/python -m bench.cluster_bench [--nodes 10000] [--seconds 20] [--concurrency 64]

The server runs as its own process (`image-agent cluster serve`, 40 images,
a node secret: every node writes with its own token). The load generator
(this process, aiohttp) first has every node report its status once (so the
server holds 10,000 reports), then runs a mixed phase: 90% conditional GETs
of a node's list (If-None-Match, 304) and 10% status reports. Then
``/v1/status`` is requested in a loop (the full node x image view) while
``/healthz`` is probed every 20 ms. Prints requests/s, latency p50/p99, the
server's RSS with all reports held, and /healthz latency under the status
loop. The machine the numbers come from matters: say how loaded it was.
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
import urllib.request
from pathlib import Path

import aiohttp

from agent.cluster.tokens import node_token
from agent.testing.processes import free_port, wait_for

SECRET = b"bench-node-secret-0123456789"


def report(node: int, images: list[str]) -> bytes:
    return json.dumps(
        {
            "node": f"node-{node}",
            "labels": {"zone": f"z{node % 4}"},
            "archives": [],
            "pulls": [{"image": i, "state": "present", "last_error": ""} for i in images],
        }
    ).encode()


class Nodes:
    """The simulated nodes: their tokens and what each reports."""

    def __init__(self, count: int, images: list[str]) -> None:
        self.count = count
        self.images = images
        self.tokens = [node_token(SECRET, f"node-{n}") for n in range(count)]

    def headers(self, n: int) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[n]}", "Content-Type": "application/json"}

    def report(self, n: int) -> bytes:
        return report(n, self.images)


async def run(url: str, nodes: int, seconds: float, concurrency: int, images: list[str]) -> None:
    fleet = Nodes(nodes, images)
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn) as session:
        await initial_reports(session, url, fleet, concurrency)
        await mixed_phase(session, url, fleet, seconds, concurrency)
        await status_loop(session, url, seconds)


async def initial_reports(
    session: aiohttp.ClientSession, url: str, fleet: Nodes, concurrency: int
) -> None:
    """Every node reports its status once, ``concurrency`` at a time."""
    sem = asyncio.Semaphore(concurrency)

    async def put(n: int) -> None:
        async with (
            sem,
            session.put(
                f"{url}/v1/nodes/node-{n}/status", data=fleet.report(n), headers=fleet.headers(n)
            ) as r,
        ):
            assert r.status == 204, r.status

    start = time.monotonic()
    await asyncio.gather(*(put(n) for n in range(fleet.count)))
    t = time.monotonic() - start
    print(f"initial reports: {fleet.count} in {t:.1f} s ({fleet.count / t:.0f}/s)")


async def mixed_phase(
    session: aiohttp.ClientSession, url: str, fleet: Nodes, seconds: float, concurrency: int
) -> None:
    """90% conditional GETs of a node's list, 10% status reports, for ``seconds``."""
    etags: dict[str, str] = {}
    for z in range(4):
        async with session.get(f"{url}/v1/images?labels=zone=z{z}") as r:
            etags[f"z{z}"] = r.headers["ETag"]
    latencies: list[float] = []
    codes: dict[int, int] = {}
    deadline = time.monotonic() + seconds
    rng = random.Random(7)  # noqa: S311 - a repeatable load mix, not a secret

    async def worker() -> None:
        while time.monotonic() < deadline:
            n = rng.randrange(fleet.count)
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
                    f"{url}/v1/nodes/node-{n}/status",
                    data=fleet.report(n),
                    headers=fleet.headers(n),
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


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))] * 1000


async def status_loop(session: aiohttp.ClientSession, url: str, seconds: float) -> None:
    """/v1/status fetched back to back by 4 clients; /healthz probed every 20 ms meanwhile."""
    deadline = time.monotonic() + seconds
    status_times: list[float] = []
    health_times: list[float] = []
    sizes: list[int] = []

    async def fetch_status() -> None:
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            async with session.get(f"{url}/v1/status") as r:
                sizes.append(len(await r.read()))
                assert r.status == 200, r.status
            status_times.append(time.monotonic() - t0)

    async def probe() -> None:
        async with aiohttp.ClientSession() as own:  # its own connection, as a kubelet probe
            while time.monotonic() < deadline:
                t0 = time.monotonic()
                async with own.get(f"{url}/healthz") as r:
                    await r.read()
                    assert r.status == 200, r.status
                health_times.append(time.monotonic() - t0)
                await asyncio.sleep(0.02)  # the probe's pace, not a synchronization

    await asyncio.gather(probe(), *(fetch_status() for _ in range(4)))
    print(
        f"/v1/status loop: {len(status_times)} views of {sizes[-1] / 1e6:.1f} MB "
        f"in {seconds:.0f} s, "
        f"p50 {pct(status_times, 0.5):.0f} ms, p99 {pct(status_times, 0.99):.0f} ms; "
        f"/healthz meanwhile: {len(health_times)} probes, p50 {pct(health_times, 0.5):.1f} ms, "
        f"p99 {pct(health_times, 0.99):.1f} ms, max {max(health_times) * 1000:.1f} ms"
    )


def healthy(url: str) -> bool:
    """True once the server at ``url`` answers /healthz."""
    try:
        # The URL is built here: http on loopback.
        with urllib.request.urlopen(url + "/healthz", timeout=1):  # noqa: S310 - see above
            return True
    except OSError:
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ia-cbench-"))
    images = [f"registry.internal:5000/team{i % 5}/image{i}:1.{i}" for i in range(40)]
    (work / "list.txt").write_text("\n".join(images) + "\n")
    (work / "secret").write_bytes(SECRET)
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
            "--node-secret-file",
            str(work / "secret"),
            "--log-level",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: healthy(url), 30, "the cluster server to listen")
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
