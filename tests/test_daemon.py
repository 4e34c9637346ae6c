"""`image-agent run` as a real process against a real containerd."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from agent.containerd import Containerd
from agent.image.platforms import Platform
from agent.testing import samples
from agent.testing.processes import DaemonProcess, wait_for
from agent.testing.sandbox import PrivateContainerd
from tests.conftest import StartDaemon, ctr
from tests.helpers import assert_no_leases, assert_pinned, assert_unpacked, cri_by_tag, record


def make_archive(
    path: Path, name: str, node: Platform, payload: bytes = b"", mtime: float | None = None
) -> Path:
    data = samples.oci_archive([samples.simple_image(name, {"f": payload or name.encode()}, node)])
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_bytes(data)
    if mtime is not None:
        os.utime(tmp, (mtime, mtime))
    tmp.rename(path)  # copy-to-temp-then-rename, as careful operators do
    return path


def test_file_dropped_while_running_is_imported(
    daemon: StartDaemon, client: Containerd, node: Platform
) -> None:
    """An archive copied into the watched directory shows up in crictl, unpacked and pinned."""
    d = daemon()
    d.start()
    path = make_archive(d.images / "site.tar", "dropped:1", node)
    rec = d.wait_state(path, "imported")
    assert rec["images"] == ["docker.io/library/dropped:1"]
    config = cri_by_tag(client)["docker.io/library/dropped:1"]
    assert_unpacked(client, config)
    assert_pinned(client, "docker.io/library/dropped:1")
    status = d.status()
    assert status["daemon"]["running"] and status["daemon"]["healthy"]
    assert d.stop() == 0


def test_slow_copy_is_never_imported_early(
    daemon: StartDaemon, client: Containerd, node: Platform
) -> None:
    """A copy that stalls longer than the settle time, file still open, is not imported until closed."""
    d = daemon()
    d.start()
    data = samples.oci_archive([samples.simple_image("slow:1", {"big": os.urandom(600_000)}, node)])
    path = d.images / "slow.tar"
    release = threading.Event()
    with path.open("wb") as f:
        for i in range(0, len(data), 100_000):
            f.write(data[i : i + 100_000])
            f.flush()
            if i == 300_000:
                # Stall (file open) well past the settle time; the daemon must wait.
                wait_for(lambda: d.record(path) is not None, 60, "the daemon to see the file")
                stalled_until = time.monotonic() + 2.0
                while time.monotonic() < stalled_until:
                    rec = d.record(path)
                    assert rec is not None and rec["state"] == "pending", rec
                    assert "docker.io/library/slow:1" not in cri_by_tag(client)
        release.set()
    rec = d.wait_state(path, "imported")
    assert rec["attempts"] == 1
    assert d.named("import.failed") == []


def test_imports_in_mtime_order(daemon: StartDaemon, node: Platform) -> None:
    """Pending archives are imported oldest first, whatever their names."""
    d = daemon()
    now = time.time()
    names = ["a.tar", "b.tar", "c.tar"]
    for i, name in enumerate(names):
        make_archive(d.images / name, f"order{i}:1", node, mtime=now - 100 * (i + 1))
    d.start()
    for name in names:
        d.wait_state(d.images / name, "imported")
    done = [Path(e["file"]).name for e in d.named("import.done")]
    assert done == ["c.tar", "b.tar", "a.tar"]


def test_restart_does_not_reimport(daemon: StartDaemon, node: Platform) -> None:
    """After a restart nothing is imported again when nothing changed."""
    d = daemon()
    path = make_archive(d.images / "keep.tar", "keep:1", node)
    d.start()
    d.wait_state(path, "imported")
    assert d.stop() == 0
    d.start()
    # Startup (scan + reconcile) is complete once "watching" is logged.
    assert d.named("import.started") == []
    assert record(d, path)["attempts"] == 1


def test_touch_and_same_size_replacement_reimport(
    daemon: StartDaemon, client: Containerd, node: Platform
) -> None:
    """A touched archive is imported again; so is a same-size, same-mtime replacement (k3s #14284)."""
    d = daemon()
    path = make_archive(d.images / "swap.tar", "swap:1", node, payload=b"A" * 1000)
    d.start()
    d.wait_state(path, "imported")
    os.utime(path)
    wait_for(lambda: len(d.named("import.done")) == 2, 90, "re-import after touch")
    assert d.stop() == 0

    st = path.stat()
    make_archive(path, "swap:2", node, payload=b"B" * 1000)
    assert path.stat().st_size == st.st_size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    d.start()
    d.wait_state(path, "imported")
    wait_for(lambda: "docker.io/library/swap:2" in cri_by_tag(client), 90, "swap:2")


def test_corrupt_archive_fails_once_without_retry_loop(
    daemon: StartDaemon, client: Containerd, node: Platform
) -> None:
    """A bad archive is marked failed with a reason and not retried until it changes or `retry` is asked."""
    d = daemon()
    d.start()
    bad = d.images / "bad.tar.zst"
    bad.write_bytes(b"\x28\xb5\x2f\xfd" + b"garbage" * 100)
    rec = d.wait_state(bad, "failed")
    assert "corrupt zstd data" in rec["error"] or "truncated" in rec["error"]
    # Other archives keep flowing while the bad one sits there.
    good = make_archive(d.images / "good.tar", "good:1", node)
    d.wait_state(good, "imported")
    # Several heartbeats of the loop later, still one attempt.
    wait_for(lambda: d.named("watching"), 5)
    time_limit = time.monotonic() + 1.5
    while time.monotonic() < time_limit:
        assert record(d, bad)["attempts"] == 1
    assert len(d.named("import.failed")) == 1
    subprocess.run(
        [sys.executable, "-m", "agent", "retry", "--state-dir", str(d.state), str(bad)],
        check=True,
        capture_output=True,
    )
    wait_for(
        lambda: (r := d.record(bad)) and r["attempts"] == 2 and r["state"] == "failed",
        60,
        "the requested retry to fail again",
    )


def test_other_platform_and_pull_lists_are_skipped(
    daemon: StartDaemon, node: Platform, other_platform: Platform
) -> None:
    """Archives named for another platform are skipped with a reason; .txt lists are recorded, not imported."""
    d = daemon()
    d.start()
    arch = f"{other_platform.os}-{other_platform.architecture}"
    other = make_archive(d.images / f"bundle-{arch}.tar", "other:1", node)
    lst = d.images / "workspace.txt"
    lst.write_text("docker.io/library/alpine:3.19\n")
    rec = d.wait_state(other, "skipped")
    assert str(other_platform) in rec["reason"]
    assert "pull list" in d.wait_state(lst, "skipped")["reason"]
    ignored = d.images / ".hidden.tar"
    ignored.write_bytes(b"x")
    mine = make_archive(d.images / f"bundle-{node.os}-{node.architecture}.tar", "mine:1", node)
    d.wait_state(mine, "imported")
    assert d.record(ignored) is None


def drop_big_archive(
    d: DaemonProcess, name: str, node: Platform, layers: int = 4, mib: int = 40
) -> Path:
    """Build a docker archive of ``layers`` incompressible layers beside the images dir, then move it in."""
    content = tuple(samples.Layer({f"blob{i}": os.urandom(mib << 20)}) for i in range(layers))
    staging = d.images.parent / "staging.tar"
    staging.write_bytes(
        samples.docker_archive([samples.SampleImage(name, (samples.Variant(node, content),))])
    )
    path = d.images / "big.tar"
    staging.rename(path)
    return path


def test_kill_9_mid_import_then_restart(
    daemon: StartDaemon, ctd: PrivateContainerd, client: Containerd, node: Platform
) -> None:
    """kill -9 during a large import: after restart the import completes, with no stale lease or duplicate."""
    d = daemon()
    d.start()
    drop_big_archive(d, "big:1", node)
    wait_for(lambda: d.named("import.started"), 90, "the import to start")
    wait_for(client.leases, 90, "the import's lease")
    d.kill()
    d.start()
    rec = d.wait_state(d.images / "big.tar", "imported", timeout=120)
    assert rec["attempts"] == 2
    assert_no_leases(client)
    assert list(cri_by_tag(client)) == ["docker.io/library/big:1"]
    assert_unpacked(client, cri_by_tag(client)["docker.io/library/big:1"])


def test_containerd_restart_mid_import_is_retried(
    daemon: StartDaemon, ctd: PrivateContainerd, client: Containerd, node: Platform
) -> None:
    """containerd going away mid-import defers the archive (not failed) and it completes once containerd is back."""
    d = daemon()
    d.start()
    drop_big_archive(d, "cr:1", node)
    wait_for(client.leases, 90, "the import's lease")
    ctd.kill()
    # Deferred, not failed: the record goes back to pending (between retries while it is down).
    wait_for(
        lambda: (
            d.named("import.deferred") and record(d, d.images / "big.tar")["state"] == "pending"
        ),
        60,
        "the import to be deferred",
    )
    ctd.start()
    d.wait_state(d.images / "big.tar", "imported", timeout=120)
    with Containerd(ctd.address) as fresh:
        assert "docker.io/library/cr:1" in cri_by_tag(fresh)
    assert d.named("import.failed") == []


def test_reconcile_after_images_removed_and_unpinned(
    daemon: StartDaemon, ctd: PrivateContainerd, client: Containerd, node: Platform
) -> None:
    """Images removed behind the daemon's back are imported again at start; lost pins are restored."""
    d = daemon()
    gone = make_archive(d.images / "gone.tar", "gone:1", node)
    unpinned = make_archive(d.images / "unpinned.tar", "unpinned:1", node)
    d.start()
    d.wait_state(gone, "imported")
    d.wait_state(unpinned, "imported")
    assert d.stop() == 0
    for rec in client.list_images():
        if rec.name.startswith("docker.io/library/gone"):
            ctr(ctd, "k8s.io", "images", "rm", rec.name)
    client.label_image("docker.io/library/unpinned:1", {"io.cri-containerd.pinned": ""})
    d.start()
    d.wait_state(gone, "imported")
    wait_for(lambda: "docker.io/library/gone:1" in cri_by_tag(client), 90, "gone:1 back")
    assert_pinned(client, "docker.io/library/unpinned:1")
    assert d.named("image.repinned")


def test_sigterm_exits_zero_quickly(daemon: StartDaemon, node: Platform) -> None:
    """SIGTERM during an import ends the daemon with exit 0 within 10 s and releases the lease."""
    d = daemon()
    d.start()
    big = drop_big_archive(d, "term:1", node, layers=3, mib=30)
    wait_for(lambda: d.named("import.started"), 90, "the import to start")
    start = time.monotonic()
    assert d.stop(timeout=10) == 0
    assert time.monotonic() - start < 10
    with Containerd(d.ctd.address) as c:
        assert_no_leases(c)
    assert record(d, big)["state"] == "pending"


def test_metrics_and_healthz(daemon: StartDaemon, node: Platform) -> None:
    """/healthz answers ok and /metrics counts imported archives and bytes."""
    d = daemon()
    d.start()
    path = make_archive(d.images / "m.tar", "metrics:1", node)
    d.wait_state(path, "imported")
    base = f"http://127.0.0.1:{d.port}"
    with urllib.request.urlopen(f"{base}/healthz", timeout=5) as r:
        assert r.status == 200 and r.read().strip() == b"ok"
    with urllib.request.urlopen(f"{base}/metrics", timeout=5) as r:
        text = r.read().decode()
    assert "image_agent_archives_imported_total 1.0" in text
    assert "image_agent_last_success_timestamp_seconds" in text


def test_insufficient_space_waits_then_imports(
    daemon: StartDaemon, tmp_path: Path, node: Platform
) -> None:
    """Not enough room where containerd stores content: pending with a reason, imported once space frees."""
    small = tmp_path / "small-root"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    try:
        d = daemon("--containerd-root", str(small))
        d.start()
        path = make_archive(d.images / "roomy.tar", "roomy:1", node, payload=os.urandom(3 << 20))
        wait_for(
            lambda: "insufficient space" in (d.record(path) or {}).get("reason", ""),
            90,
            "the space check",
        )
        assert record(d, path)["state"] == "pending"
        subprocess.run(["mount", "-o", "remount,size=64m", str(small)], check=True)
        d.wait_state(path, "imported", timeout=90)
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_delete_after_import(daemon: StartDaemon, client: Containerd, node: Platform) -> None:
    """--delete-after-import removes the archive once its images are in containerd."""
    d = daemon("--delete-after-import", "true")
    d.start()
    path = make_archive(d.images / "once.tar", "once:1", node)
    wait_for(lambda: d.named("archive.deleted"), 90, "the archive to be deleted")
    assert not path.exists()
    assert "docker.io/library/once:1" in cri_by_tag(client)


def test_removed_archive_loses_its_record_but_images_stay(
    daemon: StartDaemon, client: Containerd, node: Platform
) -> None:
    """Deleting an imported archive forgets it; its images stay in containerd, still pinned."""
    d = daemon()
    d.start()
    path = make_archive(d.images / "usb.tar", "usb:1", node)
    d.wait_state(path, "imported")
    path.unlink()
    wait_for(lambda: d.record(path) is None, 90, "the record to go")
    assert "docker.io/library/usb:1" in cri_by_tag(client)
    assert_pinned(client, "docker.io/library/usb:1")


def test_containerd_down_at_start_then_up(
    daemon: StartDaemon, ctd: PrivateContainerd, client: Containerd, node: Platform
) -> None:
    """Started before containerd, the daemon waits (no failures) and imports once containerd is up."""
    d = daemon()
    path = make_archive(d.images / "early.tar", "early:1", node)
    ctd.stop()
    d.start()
    wait_for(lambda: d.named("import.deferred"), 90, "the import to be deferred")
    assert d.status()["daemon"]["containerd"] == "unreachable"
    ctd.start()
    d.wait_state(path, "imported", timeout=90)
    assert d.named("import.failed") == []


def test_systemd_notify_ready_and_watchdog(ctd: PrivateContainerd, tmp_path: Path) -> None:
    """Under Type=notify the daemon reports READY=1 once watching, then WATCHDOG=1 keepalives."""
    import socket
    import sys

    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(30)
    env = dict(os.environ, NOTIFY_SOCKET=str(sock_path), CONTAINERD_ADDRESS=ctd.address)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agent",
            "run",
            "--images-dir",
            str(tmp_path / "img"),
            "--state-dir",
            str(tmp_path / "st"),
            "--listen",
            "127.0.0.1:0",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        messages: list[str] = []
        while not any("READY=1" in m for m in messages) or not any(
            "WATCHDOG=1" in m for m in messages
        ):
            messages.append(sock.recv(4096).decode())
        assert any("STATUS=watching" in m for m in messages)
        proc.terminate()
        assert proc.wait(10) == 0
        assert "STOPPING=1" in sock.recv(4096).decode()
    finally:
        if proc.poll() is None:
            proc.kill()
        sock.close()


def test_healthz_follows_containerd_while_idle(daemon: StartDaemon, ctd: PrivateContainerd) -> None:
    """An idle daemon notices containerd going away (503, status unhealthy) and coming back."""
    import urllib.error

    d = daemon()
    d.start()
    url = f"http://127.0.0.1:{d.port}/healthz"

    def code() -> int:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return int(r.status)
        except urllib.error.HTTPError as err:
            return int(err.code)

    assert code() == 200
    ctd.kill()
    wait_for(lambda: code() == 503, 90, "healthz to report containerd down")
    wait_for(lambda: not d.status()["daemon"]["healthy"], 90, "status to say unhealthy")
    ctd.start()
    wait_for(lambda: code() == 200, 90, "healthz to recover")


def test_file_watcher_that_dies_takes_health_and_watchdog_down(
    client: Containerd, tmp_path: Path
) -> None:
    """The inotify watcher's thread is watched like a duty: if it ends, /healthz and the pings say so."""
    from agent import logs
    from agent.importer import Importer, ImportOptions
    from agent.node.archives import ImportedImages, Settings
    from agent.node.health import ProgressSink
    from agent.node.metrics import Metrics
    from agent.node.notify import Notifier
    from agent.node.service import JOIN_S, Daemon
    from agent.node.state import Store

    stop = threading.Event()
    progress = ProgressSink()
    settings = Settings(
        images_dir=tmp_path / "images",
        settle_s=0.5,
        containerd_root=tmp_path,
        delete_after_import=False,
        platforms=None,
        unpack=False,
    )
    store = Store(tmp_path / "state")
    daemon = Daemon(
        settings,
        client,
        Importer(client, ImportOptions(unpack=False), progress=progress, stop=stop),
        store,
        Metrics(),
        Notifier(""),
        logs.get(),
        progress=progress,
        imported=ImportedImages(),
    )
    t = threading.Thread(target=daemon.run, args=(stop,))
    t.start()
    try:
        wait_for(lambda: daemon.archives.ready.is_set() and daemon.observer is not None, 30)
        wait_for(lambda: daemon.health() == (True, "ok"), 30, "healthy")
        assert daemon.alive()
        observer = daemon.observer
        assert observer is not None
        observer.stop()
        observer.join(10)
        assert daemon.dead() == ["file-watcher"] and not daemon.alive()
        ok, text = daemon.health()
        assert not ok and "file-watcher stopped" in text
    finally:
        stop.set()
        t.join(JOIN_S + 10)
        store.close()
    assert not t.is_alive()
