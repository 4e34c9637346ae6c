"""Daemon benchmark: file-to-visible latency, start-up and idle cost with 50 processed archives.

    .venv/bin/python -m bench.daemon_bench [--skip-big]

- latency: an archive renamed into the watched directory until the CRI lists
  its image (ImageStatus), for a small archive and the 1.1 GB one of
  import_bench; the settle time (default 2 s) is part of it, as for users;
- start-up: daemon start until it is watching (READY) with 50 processed
  archives, against importing the 50 again, which is what k3s does at every
  start without .cache.json;
- idle: CPU seconds and RSS of the daemon over 20 s with nothing to do.

    .venv/bin/python -m bench.daemon_bench --many 5000

- many: N small archives (one tiny image each, distinct names) renamed into
  the watched directory at once: seconds until the last is imported, CPU
  seconds and peak RSS of the daemon over that time.

    .venv/bin/python -m bench.daemon_bench --watchdog 2

- watchdog: the 1.1 GB archive imported under WATCHDOG_USEC (2 s) and a real
  notify socket: the longest gap between two WATCHDOG=1 during the import.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from agent.containerd import Containerd
from agent.image import platforms
from agent.testing import samples
from agent.testing.processes import DaemonProcess, NotifiedDaemon
from agent.testing.sandbox import PrivateContainerd
from bench import gen

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
TICK = os.sysconf("SC_CLK_TCK")


def wait_until(cond, timeout: float = 600.0, step: float = 0.01) -> float:  # type: ignore[no-untyped-def]
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            raise TimeoutError("condition not met")
        time.sleep(step)
    return time.monotonic() - start


class Daemon(DaemonProcess):
    """The tests' daemon process, timed and measured."""

    def start_timed(self) -> float:
        """Start the daemon; seconds until it is watching."""
        started = time.monotonic()
        self.start()
        return time.monotonic() - started

    def cpu_rss(self) -> tuple[float, float]:
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / TICK
        rss = next(
            int(line.split()[1])
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines()
            if line.startswith("VmRSS:")
        )
        return cpu, rss / 1024


def visible(client: Containerd, name: str) -> bool:
    return client.cri_image_status(name) is not None


def drop(src: Path, d: Daemon, name: str) -> None:
    tmp = d.images / f".{name}.tmp"
    subprocess.run(["cp", str(src), str(tmp)], check=True)
    tmp.rename(d.images / name)


def many(count: int, settle: float) -> int:
    """Drop ``count`` small archives at once; time, CPU and peak RSS until all are imported."""
    node = platforms.node()
    work = Path(tempfile.mkdtemp(prefix="ia-dmany-", dir="/tmp"))
    ctd = PrivateContainerd(work / "ctd")
    ctd.start()
    try:
        d = Daemon(ctd, work / "d", ["--settle", str(settle), "--listen", ""])
        staging = work / "staging"
        staging.mkdir()
        payload = {"f": b"x" * 1024}
        for i in range(count):
            name = f"many/img{i}:1"
            (staging / f"a{i:05}.tar").write_bytes(
                samples.oci_archive([samples.simple_image(name, payload, node)])
            )
        d.start()
        cpu0, rss_peak = d.cpu_rss()
        start = time.monotonic()
        for path in sorted(staging.iterdir()):
            path.rename(d.images / path.name)
        done = 0
        while done < count:
            if time.monotonic() - start > 7200:
                raise TimeoutError(f"{done} of {count} imported after 2 h")
            time.sleep(1.0)  # sampling interval of the measurement
            _, rss = d.cpu_rss()
            rss_peak = max(rss_peak, rss)
            done = d.log_path.read_bytes().count(b'"event": "import.done"')
        elapsed = time.monotonic() - start
        cpu1, rss = d.cpu_rss()
        rss_peak = max(rss_peak, rss)
        print(
            f"{count} small archives dropped at once: all imported after {elapsed:.1f} s "
            f"({count / elapsed:.1f}/s), daemon CPU {cpu1 - cpu0:.1f} s "
            f"({100 * (cpu1 - cpu0) / elapsed:.0f}% of one core), peak RSS {rss_peak:.1f} MiB"
        )
        d.stop(timeout=60)
    finally:
        ctd.cleanup()
        subprocess.run(["rm", "-rf", str(work)], check=False)
    return 0


def watchdog(settle: float, usec: int) -> int:
    """Import the 1.1 GB archive under WATCHDOG_USEC over a real notify socket; longest ping gap."""
    big = gen.make_archive(OUT / "bench-1g.tar.zst", OUT / "work")
    work = Path(tempfile.mkdtemp(prefix="ia-dwd-", dir="/tmp"))
    ctd = PrivateContainerd(work / "ctd")
    ctd.start()
    d = NotifiedDaemon(ctd, work / "d", usec)
    try:
        d.start()
        d.sock.settimeout(0.1)
        tmp = d.images / ".big.tmp"
        subprocess.run(["cp", str(big), str(tmp)], check=True)
        pings: list[float] = []
        started = done = 0.0
        tmp.rename(d.images / "big.tar.zst")
        deadline = time.monotonic() + 1800
        next_look = 0.0
        while not done and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                if "WATCHDOG=1" in d.sock.recv(4096).decode():
                    pings.append(time.monotonic())
            if time.monotonic() >= next_look:
                next_look = time.monotonic() + 0.5
                if not started and d.named("import.started"):
                    started = time.monotonic()
                if d.named("import.done") or d.named("import.failed"):
                    done = time.monotonic()
        during = [p for p in pings if started - usec / 1e6 <= p <= done + usec / 1e6]
        gaps = [b - a for a, b in itertools.pairwise(during)]
        print(
            f"1.1 GB import under WATCHDOG_USEC={usec / 1e6:.1f} s: import {done - started:.1f} s, "
            f"{len(during)} pings, longest gap {max(gaps):.2f} s "
            f"({'imported' if d.named('import.done') else 'FAILED'})"
        )
        d.stop(timeout=30)
    finally:
        if d.proc is not None:
            d.kill()
        d.close()
        ctd.cleanup()
        subprocess.run(["rm", "-rf", str(work)], check=False)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--skip-big", action="store_true", help="leave out the 1.1 GB archive")
    parser.add_argument("--settle", type=float, default=2.0)
    parser.add_argument("--many", type=int, default=0, help="only the N-small-archives run")
    parser.add_argument(
        "--watchdog", type=float, default=0, help="only the watchdog run, WATCHDOG_USEC in seconds"
    )
    args = parser.parse_args()
    if args.many:
        return many(args.many, args.settle)
    if args.watchdog:
        return watchdog(args.settle, int(args.watchdog * 1e6))
    work = Path(tempfile.mkdtemp(prefix="ia-dbench-", dir="/tmp"))
    ctd = PrivateContainerd(work / "ctd")
    ctd.start()
    try:
        client = Containerd(ctd.address)
        d = Daemon(ctd, work / "d", ["--settle", str(args.settle), "--listen", ""])
        d.start()
        latency(d, client, work, args.settle, args.skip_big)
        archives = fifty(d, work, args.skip_big)
        d.stop()
        startup_and_idle(d, ctd, archives)
    finally:
        ctd.cleanup()
        subprocess.run(["rm", "-rf", str(work)], check=False)
    return 0


def latency(d: Daemon, client: Containerd, work: Path, settle: float, skip_big: bool) -> None:
    """Seconds from an archive appearing until the CRI lists its image: small, then 1.1 GB."""
    small = work / "small.tar"
    small.write_bytes(
        samples.oci_archive(
            [samples.simple_image("lat:small", {"f": b"x" * 4096}, platforms.node())]
        )
    )
    drop(small, d, "small.tar")
    t_small = wait_until(lambda: visible(client, "docker.io/library/lat:small"))
    print(
        f"small archive: visible to CRI {t_small:.2f} s after it appeared (settle {settle:.1f} s)"
    )
    if not skip_big:
        big = gen.make_archive(OUT / "bench-1g.tar.zst", OUT / "work")
        tmp = d.images / ".big.tmp"
        subprocess.run(["cp", str(big), str(tmp)], check=True)
        tmp.rename(d.images / "big.tar.zst")
        t_big = wait_until(lambda: visible(client, "docker.io/library/bench:big"), 900, 0.1)
        print(
            f"1.1 GB archive: visible to CRI {t_big:.2f} s after it appeared "
            f"(settle {settle:.1f} s, unpacked)"
        )


def fifty(d: Daemon, work: Path, skip_big: bool) -> list[Path]:
    """Drop 50 archives of one small image each and wait until all are imported."""
    node = platforms.node()
    archives = []
    for i in range(50):
        path = work / f"a{i:02}.tar"
        path.write_bytes(
            samples.oci_archive(
                [samples.simple_image(f"fifty/img{i}:1", {"f": os.urandom(64 << 10)}, node)]
            )
        )
        archives.append(path)
    for path in archives:
        drop(path, d, path.name)
    wait_until(lambda: len(d.named("import.done")) >= 50 + 1 + (0 if skip_big else 1), 600, 0.1)
    return archives


def startup_and_idle(d: Daemon, ctd: PrivateContainerd, archives: list[Path]) -> None:
    """Start-up with the archives processed, idle cost, and importing them all again."""
    startup = d.start_timed()
    cpu0, _ = d.cpu_rss()
    time.sleep(20)  # measuring idle cost: nothing to wait for
    cpu1, rss = d.cpu_rss()
    reimports = len(d.named("import.started"))
    d.stop()
    env = dict(os.environ, CONTAINERD_ADDRESS=ctd.address)
    start = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "agent", "import", *map(str, archives)],
        check=True,
        stdout=subprocess.DEVNULL,
        env=env,
    )
    t_all = time.monotonic() - start
    print(
        f"start-up with 50 processed archives: watching after {startup:.2f} s "
        f"({reimports} re-imports); importing the 50 again "
        f"(k3s without .cache.json) takes {t_all:.2f} s"
    )
    print(f"idle: {100 * (cpu1 - cpu0) / 20:.2f}% of one core, RSS {rss:.1f} MiB")


if __name__ == "__main__":
    sys.exit(main())
