"""Faults a node really meets, injected against `image-agent run` and a real containerd.

Each test asserts what the user sees: the archive ends imported with its
image complete and unpacked, no lease is left, nothing is marked failed that
is not the archive's fault, and nothing loops hot. Recovery times are printed
(run with -s to read them).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.containerd import Containerd
from agent.image.platforms import Platform
from agent.testing import samples
from agent.testing.processes import DaemonProcess, NotifiedDaemon, wait_for
from agent.testing.sandbox import PrivateContainerd
from tests.conftest import ROOT, StartDaemon, ctr
from tests.helpers import assert_no_leases, assert_unpacked, cri_by_tag, record
from tests.test_daemon import drop_big_archive, make_archive


def healthz(d: DaemonProcess) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{d.port}/healthz", timeout=5) as r:
            return int(r.status), r.read().decode()
    except urllib.error.HTTPError as err:
        return int(err.code), err.read().decode()


def snapshots(ctd: PrivateContainerd) -> int:
    """Snapshots containerd holds in k8s.io (an unpack under way makes them appear)."""
    return len(ctr(ctd, "k8s.io", "snapshots", "ls").strip().splitlines()[1:])


def no_leases_soon(ctd: PrivateContainerd) -> None:
    with Containerd(ctd.address) as c:
        wait_for(lambda: not c.leases(), 30, "no lease left")
        assert_no_leases(c)


def recovered(what: str, seconds: float) -> None:
    print(f"\nrecovery[{what}]: {seconds:.1f} s")


# -- files that are not archives, archives that break things ---------------------------


def test_fifo_named_like_an_archive_never_hangs(
    daemon: StartDaemon, client: Containerd, node: Platform
) -> None:
    """A FIFO called a.tar.gz (there at start and made while running) is skipped; later archives import; SIGTERM works."""
    d = daemon()
    os.mkfifo(d.images / "a.tar.gz")
    d.start()
    os.mkfifo(d.images / "b.tar.zst")
    path = make_archive(d.images / "after.tar", "after-fifo:1", node)
    d.wait_state(path, "imported")
    assert d.record(d.images / "a.tar.gz") is None
    assert d.record(d.images / "b.tar.zst") is None
    assert healthz(d)[0] == 200
    started = time.monotonic()
    assert d.stop(timeout=10) == 0
    assert time.monotonic() - started < 5


def test_archive_nested_100000_deep_fails_alone(
    daemon: StartDaemon, client: Containerd, node: Platform
) -> None:
    """An index.json nested 100,000 deep fails that archive with one line; the daemon and the queue go on."""
    d = daemon()
    d.start()
    deep = "[" * 100_000 + "]" * 100_000
    bad = d.images / "deep.tar"
    tmp = d.images / ".deep.tmp"
    tmp.write_bytes(
        samples.archive_bytes(
            [("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'), ("index.json", deep.encode())]
        )
    )
    tmp.rename(bad)
    rec = d.wait_state(bad, "failed")
    assert "\n" not in rec["error"] and rec["error"]
    good = make_archive(d.images / "good.tar", "after-deep:1", node)
    d.wait_state(good, "imported")
    assert d.proc is not None and d.proc.poll() is None
    assert len(d.named("import.failed")) == 1
    assert d.stop() == 0


def test_archive_interrupted_three_times_is_set_aside(
    daemon: StartDaemon, client: Containerd, node: Platform
) -> None:
    """The daemon killed during the same import three times in a row: failed as the cause, the queue moves on, retry clears it."""
    d = daemon()
    d.start()
    big = drop_big_archive(d, "killer:1", node, layers=3, mib=30)
    # "import.started" is logged after the record says "importing" on disk, so
    # a kill once it is logged is an interrupted import, however fast it runs.
    for _ in range(2):
        wait_for(lambda: d.named("import.started"), 90, "the import")
        d.kill()
        d.start()
    wait_for(lambda: d.named("import.started"), 90, "the import")
    d.kill()
    later = make_archive(d.images / "later.tar", "later:1", node)
    d.start()
    rec = d.wait_state(big, "failed")
    assert "3 imports" in rec["error"]
    d.wait_state(later, "imported")
    no_leases_soon(d.ctd)
    subprocess.run(
        [sys.executable, "-m", "agent", "retry", "--state-dir", str(d.state), str(big)],
        check=True,
        capture_output=True,
        cwd=ROOT,
    )
    d.wait_state(big, "imported", timeout=180)
    assert_unpacked(client, cri_by_tag(client)["docker.io/library/killer:1"])


def test_second_daemon_on_the_same_state_dir_exits(daemon: StartDaemon, node: Platform) -> None:
    """A second `run` on a held state directory says who holds it and exits non-zero."""
    d = daemon()
    d.start()
    assert d.proc is not None
    second = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent",
            "run",
            "--images-dir",
            str(d.images),
            "--state-dir",
            str(d.state),
            "--listen",
            "127.0.0.1:0",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, CONTAINERD_ADDRESS=d.ctd.address),
        timeout=60,
        check=False,
    )
    assert second.returncode != 0
    assert f"pid {d.proc.pid}" in second.stderr and "Traceback" not in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    assert d.stop() == 0


def test_same_size_same_mtime_rewrite_while_running(
    daemon: StartDaemon, client: Containerd, node: Platform
) -> None:
    """`cat new > old; touch -r` while the daemon runs (busy elsewhere): noticed and imported again, no restart."""
    d = daemon()
    path = make_archive(d.images / "swap.tar", "swapr:1", node, payload=b"A" * 1000)
    d.start()
    d.wait_state(path, "imported")
    other = make_archive(d.images.parent / "other.tar", "swapr:2", node, payload=b"B" * 1000)
    st = path.stat()
    assert other.stat().st_size == st.st_size
    # Rewritten while a big import keeps the daemon busy: by the time it looks,
    # size and mtime are back to what it recorded; only the content differs.
    big = drop_big_archive(d, "busy:1", node, layers=3, mib=30)
    wait_for(
        lambda: any(e["file"] == str(big) for e in d.named("import.started")),
        90,
        "the big import to start",
    )
    with path.open("wb") as rewritten:  # same inode, truncated and written again
        subprocess.run(["cat", str(other)], stdout=rewritten, check=True)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    wait_for(lambda: "docker.io/library/swapr:2" in cri_by_tag(client), 120, "swapr:2")
    d.wait_state(path, "imported")
    assert [e["file"] for e in d.named("import.done")].count(str(path)) == 2
    assert d.stop() == 0


# -- containerd going away ----------------------------------------------------------------


def test_containerd_stopped_while_an_archive_arrives(
    daemon: StartDaemon, ctd: PrivateContainerd, client: Containerd, node: Platform
) -> None:
    """containerd down while an archive arrives and long after: imported within seconds of its return."""
    d = daemon()
    d.start()
    ctd.stop()
    path = make_archive(d.images / "late.tar", "late:1", node)
    # Long enough for the backoff to reach 16 s: the waiting must not add to the recovery.
    wait_for(lambda: len(d.named("import.deferred")) >= 5, 120, "five deferrals")
    deferrals = len(d.named("import.deferred"))
    ctd.start()
    back = time.monotonic()
    d.wait_state(path, "imported", timeout=60)
    took = time.monotonic() - back
    recovered("containerd stopped, archive waiting", took)
    assert took < 10
    assert len(d.named("import.deferred")) <= deferrals + 1  # no hot loop while down
    assert d.named("import.failed") == []
    with Containerd(ctd.address) as fresh:
        assert_unpacked(fresh, cri_by_tag(fresh)["docker.io/library/late:1"])
    no_leases_soon(ctd)


def test_containerd_sigkilled_mid_import(
    daemon: StartDaemon, ctd: PrivateContainerd, client: Containerd, node: Platform
) -> None:
    """containerd SIGKILLed mid-import, restarted: the archive is imported, complete, no lease left."""
    d = daemon()
    d.start()
    big = drop_big_archive(d, "ckill:1", node, layers=4, mib=30)
    wait_for(client.leases, 90, "the import's lease")
    ctd.kill()
    wait_for(lambda: d.named("import.deferred"), 60, "the import to be deferred")
    ctd.start()
    back = time.monotonic()
    rec = d.wait_state(big, "imported", timeout=180)
    recovered("containerd SIGKILLed mid-import", time.monotonic() - back)
    assert rec["error"] == ""
    assert d.named("import.failed") == []
    with Containerd(ctd.address) as fresh:
        assert_unpacked(fresh, cri_by_tag(fresh)["docker.io/library/ckill:1"])
    no_leases_soon(ctd)


def test_daemon_sigkilled_mid_unpack(
    daemon: StartDaemon, ctd: PrivateContainerd, client: Containerd, node: Platform
) -> None:
    """The daemon SIGKILLed while layers unpack, restarted: imported once more, complete, no lease left."""
    d = daemon()
    d.start()
    big = drop_big_archive(d, "dkill:1", node, layers=5, mib=20)
    wait_for(lambda: snapshots(ctd) > 0, 120, "unpacking to start")
    d.kill()
    restarted = time.monotonic()
    d.start()
    rec = d.wait_state(big, "imported", timeout=180)
    recovered("daemon SIGKILLed mid-unpack", time.monotonic() - restarted)
    assert rec["attempts"] == 2
    assert_unpacked(client, cri_by_tag(client)["docker.io/library/dkill:1"])
    assert d.named("lease.released")
    no_leases_soon(ctd)


def test_sigterm_during_unpack_ends_within_seconds(
    daemon: StartDaemon, ctd: PrivateContainerd, node: Platform
) -> None:
    """SIGTERM while a multi-layer image unpacks: exit 0 within 15 s, lease released, archive pending.

    systemd's TimeoutStopSec is 20 s; 15 s leaves room for a loaded CI machine.
    """
    d = daemon()
    d.start()
    big = drop_big_archive(d, "tunpack:1", node, layers=8, mib=12)
    wait_for(lambda: snapshots(ctd) > 0, 120, "unpacking to start")
    started = time.monotonic()
    assert d.stop(timeout=20) == 0
    took = time.monotonic() - started
    print(f"\nsigterm during unpack: exited after {took:.1f} s")
    assert took < 15
    no_leases_soon(ctd)
    assert record(d, big)["state"] == "pending"


# -- systemd watchdog -------------------------------------------------------------------


def test_watchdog_pings_through_a_long_import(
    ctd: PrivateContainerd, client: Containerd, tmp_path: Path, node: Platform
) -> None:
    """WATCHDOG_USEC=4 s over a real notify socket: no gap systemd would kill for through a 240 MB import.

    Pings go out every 2 s; a gap up to WATCHDOG_USEC is what systemd
    tolerates, so that is the bound (a loaded CI machine delays some pings).
    """
    usec = 4_000_000
    d = NotifiedDaemon(ctd, tmp_path / "d", usec)
    pings: list[float] = []
    try:
        d.start()
        d.sock.settimeout(0.1)
        big = drop_big_archive(d, "wd:1", node, layers=6, mib=40)
        done_at = 0.0
        next_look = 0.0
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and (
            not done_at or time.monotonic() - done_at < usec / 1e6
        ):
            with contextlib.suppress(TimeoutError):
                if "WATCHDOG=1" in d.sock.recv(4096).decode():
                    pings.append(time.monotonic())
            if not done_at and time.monotonic() >= next_look:
                next_look = time.monotonic() + 1.0
                if d.named("import.done"):
                    done_at = time.monotonic()
        assert done_at, "the import did not finish"
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        print(f"\nwatchdog: {len(pings)} pings, longest gap {max(gaps):.2f} s (WATCHDOG_USEC 4 s)")
        assert len(pings) >= 2 and max(gaps) < usec / 1e6
        rec = d.record(big)
        assert rec is not None and rec["state"] == "imported"
        d.stop(timeout=10)
    finally:
        if d.proc is not None:
            d.kill()
        d.close()


# -- disks ------------------------------------------------------------------------------


@contextlib.contextmanager
def loop_fs(path: Path, mib: int) -> Iterator[Path]:
    """A fresh ext4 filesystem of ``mib`` MiB mounted at ``path`` (a loop device)."""
    image = path.with_name(path.name + ".img")
    with image.open("wb") as f:
        f.truncate(mib << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
        image.unlink(missing_ok=True)


def fill(fs: Path, leave: int = 0) -> Path:
    """Take all free space of ``fs`` but ``leave`` bytes, in one file."""
    st = os.statvfs(fs)
    filler = fs / "filler"
    size = st.f_bavail * st.f_frsize - leave
    subprocess.run(["fallocate", "-l", str(max(size, 4096)), str(filler)], check=True)
    return filler


def test_containerd_disk_fills_during_import(
    daemon: StartDaemon, tmp_path: Path, node: Platform
) -> None:
    """containerd's root fills mid-import: pending with a clear reason, nothing half-imported; imported once space is freed."""
    base = Path(tempfile.mkdtemp(prefix="ia-full-", dir="/tmp"))
    ctd = PrivateContainerd(base)
    try:
        with loop_fs(base / "root", 1024):
            ctd.start()
            d = DaemonProcess(ctd, tmp_path / "d", [])
            try:
                d.start()
                big = drop_big_archive(d, "full:1", node, layers=6, mib=30)
                wait_for(lambda: d.named("import.started"), 120, "the import to start")
                filler = fill(base / "root")
                rec = wait_for(
                    lambda: (
                        (r := d.record(big))
                        and r["state"] == "pending"
                        and "space" in r["reason"]
                        and r
                    ),
                    180,
                    "the import to wait for space",
                )
                assert rec
                assert "insufficient space" in rec["reason"] and str(base / "root") in rec["reason"]
                assert d.named("import.failed") == []
                with Containerd(ctd.address) as c:
                    assert not any(
                        i.name.startswith("docker.io/library/full") for i in c.list_images()
                    )
                    wait_for(lambda: not c.leases(), 60, "the failed import's lease to go")
                filler.unlink()
                freed = time.monotonic()
                d.wait_state(big, "imported", timeout=300)
                assert d.named("import.failed") == []
                recovered("containerd disk full, space freed", time.monotonic() - freed)
                with Containerd(ctd.address) as c:
                    assert_unpacked(c, cri_by_tag(c)["docker.io/library/full:1"])
                    assert_no_leases(c)
                assert d.stop() == 0
            finally:
                if d.proc is not None:
                    d.kill()
                ctd.stop()
    finally:
        ctd.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_state_dir_unwritable(
    fault: str, daemon: StartDaemon, client: Containerd, tmp_path: Path, node: Platform
) -> None:
    """State directory full or read-only: logged, imports go on, /healthz 503; records written once it can."""
    d = daemon()
    d.state.mkdir(parents=True)
    opts = "size=1m" + (",ro" if fault == "read-only" else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(d.state)], check=True)
    try:
        filler = fill(d.state) if fault == "full" else None
        d.start()
        path = make_archive(d.images / "nostate.tar", "nostate:1", node)
        wait_for(lambda: "docker.io/library/nostate:1" in cri_by_tag(client), 90, "the import")
        wait_for(lambda: d.named("import.done"), 30, "import.done")
        code, text = healthz(d)
        assert code == 503 and "state not writable" in text
        assert len(d.named("state.unwritable")) == 1
        if filler is not None:
            filler.unlink()
        else:
            subprocess.run(["mount", "-o", "remount,rw", str(d.state)], check=True)
        freed = time.monotonic()
        rec = d.wait_state(path, "imported", timeout=30)
        recovered(f"state dir {fault}, then writable", time.monotonic() - freed)
        assert rec["attempts"] == 1
        wait_for(lambda: healthz(d)[0] == 200, 30, "healthz to recover")
        assert d.stop() == 0
    finally:
        if d.proc is not None:
            d.kill()
        subprocess.run(["umount", "-l", str(d.state)], check=False)
