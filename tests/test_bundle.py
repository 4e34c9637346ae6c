"""`image-agent bundle` and `verify`: registry -> one archive -> containerd, same images as ctr sees."""

from __future__ import annotations

import base64
import http.server
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import pytest
import zstandard

from agent.airgap import bundle
from agent.airgap.registry import RegistryClient, RegistryError, is_loopback, web_request
from agent.archive import layout
from agent.containerd import Containerd
from agent.image import refs
from agent.image.platforms import Platform
from agent.pull import auth
from agent.testing import samples
from agent.testing.processes import Registry, free_port, wait_for
from agent.testing.sandbox import PrivateContainerd
from tests.conftest import ROOT, RunCli, StartRegistry
from tests.helpers import assert_unpacked, cri_by_tag, read_member

BASE = samples.Layer({"etc/os-release": b"ID=base\n", "lib/libc": os.urandom(200_000)}, "gzip")


def push_images(reg: Registry, tmp: Path, node: Platform, other: Platform) -> list[str]:
    """Two single-platform images sharing a base layer, and one multi-platform image."""
    a = samples.SampleImage(
        "site/app:1", (samples.Variant(node, (BASE, samples.Layer({"app": b"A"}, "gzip"))),)
    )
    b = samples.SampleImage(
        "site/tool:2", (samples.Variant(node, (BASE, samples.Layer({"tool": b"T"}, "zstd"))),)
    )
    multi = samples.SampleImage(
        "site/multi:3",
        (
            samples.Variant(node, (samples.Layer({"arch": str(node).encode()}, "gzip"),)),
            samples.Variant(other, (samples.Layer({"arch": str(other).encode()}, "gzip"),)),
        ),
    )
    for image in (a, b, multi):
        path = tmp / "push.tar"
        path.write_bytes(samples.oci_archive([image]))
        subprocess.run(
            [
                "skopeo",
                "copy",
                "-q",
                "--all",
                "--dest-tls-verify=false",
                f"oci-archive:{path}",
                f"docker://{reg.host}/{image.name}",
            ],
            check=True,
            capture_output=True,
        )
    return [f"{reg.host}/site/app:1", f"{reg.host}/site/tool:2", f"{reg.host}/site/multi:3"]


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        timeout=300,
        check=False,
    )


def members(path: Path) -> list[str]:
    with (
        path.open("rb") as f,
        zstandard.ZstdDecompressor().stream_reader(f) as z,
        tarfile.open(fileobj=z, mode="r|") as tar,
    ):
        return [m.name for m in tar]


def configs_by_name(client: Containerd) -> dict[str, str]:
    out = {}
    for rec in client.list_images():
        if "@" in rec.name:
            continue
        data = client.read_blob(rec.target.digest, 1 << 20)
        if layout.document_kind(rec.target.media_type, data, rec.name) == "index":
            continue  # compared through CRI below
        out[rec.name] = layout.parse_manifest(data, rec.name).config.digest
    return out


def test_bundle_round_trip_matches_ctr(
    registry: StartRegistry,
    ctd: PrivateContainerd,
    client: Containerd,
    cli: RunCli,
    node: Platform,
    other_platform: Platform,
    tmp_path: Path,
) -> None:
    """A bundle imports with image-agent and with ctr into empty stores and gives the same images."""
    reg = registry()
    refs_ = push_images(reg, tmp_path, node, other_platform)
    lst = tmp_path / "site.txt"
    lst.write_text("# the site\n" + "\n".join(refs_) + "\n")
    out = tmp_path / "site.tar.zst"
    made = run("bundle", "--list", str(lst), "-o", str(out))
    assert made.returncode == 0, made.stderr
    assert not out.with_name(out.name + ".partial").exists()

    names = members(out)
    assert names[:3] == ["oci-layout", "index.json", "image-agent-bundle.json"]
    blob_names = [n for n in names if n.startswith("blobs/")]
    assert len(blob_names) == len(set(blob_names))  # the shared base layer is stored once

    checked = run("verify", "-o", "json", str(out))
    assert checked.returncode == 0, checked.stderr
    (rep,) = json.loads(checked.stdout)
    assert rep["platforms"] == [str(node)]
    assert sorted(i["name"] for i in rep["images"]) == sorted(refs_)

    result = cli("import", str(out))
    assert result.code == 0, result.err
    # ctr 1.6 reads plain tar: decompress on the way, as operators do.
    with out.open("rb") as packed:
        plain = subprocess.run(
            ["zstd", "-dc"], stdin=packed, check=True, capture_output=True
        ).stdout
    subprocess.run(
        ["ctr", "-a", ctd.address, "-n", "ctr", "images", "import", "-"],
        input=plain,
        check=True,
        capture_output=True,
    )
    ours = cri_by_tag(client)
    assert set(refs_) <= set(ours)
    for config in ours.values():
        assert_unpacked(client, config)
    with Containerd(ctd.address, namespace="ctr") as theirs:
        assert {r.name for r in theirs.list_images()} >= set(refs_)
        assert configs_by_name(theirs) == {
            k: v for k, v in configs_by_name(client).items() if k in configs_by_name(theirs)
        }


def test_platform_selection_and_default_name(
    registry: StartRegistry, node: Platform, other_platform: Platform, tmp_path: Path
) -> None:
    """--platform picks another platform's blobs only, and the default file name carries the platform."""
    reg = registry()
    refs_ = push_images(reg, tmp_path, node, other_platform)
    lst = tmp_path / "l.txt"
    lst.write_text(refs_[2] + "\n")
    made = run("bundle", "--list", str(lst), "--platform", str(other_platform), cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    out = tmp_path / f"bundle-{other_platform.os}-{other_platform.architecture}.tar.zst"
    assert out.exists()
    (rep,) = json.loads(run("verify", "-o", "json", str(out)).stdout)
    assert rep["platforms"] == [str(other_platform)]
    assert rep["absent_platforms"] == [str(node)]


def test_bundle_from_registry_with_auth(
    registry: StartRegistry, node: Platform, other_platform: Platform, tmp_path: Path
) -> None:
    """--auth-file credentials reach a registry behind htpasswd; without them the bundle fails cleanly."""
    reg = registry("agent", "pw-123")
    image = samples.simple_image("priv/x:1", {"x": b"secret stuff"}, node, "gzip")
    src = tmp_path / "src.tar"
    src.write_bytes(samples.oci_archive([image]))
    reg.push(src, "priv/x:1")
    lst = tmp_path / "l.txt"
    lst.write_text(f"{reg.host}/priv/x:1\n")
    out = tmp_path / "p.tar.zst"
    denied = run("bundle", "--list", str(lst), "-o", str(out))
    assert denied.returncode == 1 and "unauthorized" in denied.stderr
    assert "Traceback" not in denied.stderr
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()
    creds = tmp_path / "auth.json"
    creds.write_text(json.dumps({"auths": {reg.host: {"username": "agent", "password": "pw-123"}}}))
    ok = run("bundle", "--list", str(lst), "-o", str(out), "--auth-file", str(creds))
    assert ok.returncode == 0, ok.stderr
    assert run("verify", str(out)).returncode == 0


def test_missing_blob_fails_cleanly(
    registry: StartRegistry, node: Platform, tmp_path: Path
) -> None:
    """A blob the registry cannot serve stops the bundle with a clear error and no partial file."""
    reg = registry()
    image = samples.simple_image("gone/x:1", {"x": os.urandom(100_000)}, node, "gzip")
    src = tmp_path / "src.tar"
    src.write_bytes(samples.oci_archive([image]))
    reg.push(src, "gone/x:1")
    layer = layout.sha256(image.variants[0].layers[0].blob())
    req = urllib.request.Request(f"http://{reg.host}/v2/gone/x/blobs/{layer}", method="DELETE")
    urllib.request.urlopen(req, timeout=10)
    lst = tmp_path / "l.txt"
    lst.write_text(f"{reg.host}/gone/x:1\n")
    out = tmp_path / "g.tar.zst"
    result = run("bundle", "--list", str(lst), "-o", str(out))
    assert result.returncode == 1
    assert "not found" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()


def test_verify_reports_corruption(node: Platform, tmp_path: Path) -> None:
    """verify names the file and the problem for a damaged archive, and exits 1."""
    data = bytearray(
        samples.oci_archive([samples.simple_image("v:1", {"f": os.urandom(50_000)}, node)])
    )
    data[len(data) // 2] ^= 0xFF
    path = tmp_path / "bad.tar"
    path.write_bytes(bytes(data))
    result = run("verify", str(path))
    assert result.returncode == 1
    assert str(path) in result.stderr and "does not match" in result.stderr


def test_broken_download_resumes(registry: StartRegistry, node: Platform, tmp_path: Path) -> None:
    """A connection dropped mid-layer is resumed with an HTTP range; the bundle comes out whole."""
    from agent.testing.proxy import Proxy

    reg = registry()
    image = samples.simple_image("big/x:1", {"x": os.urandom(3 << 20)}, node, "gzip")
    src = tmp_path / "src.tar"
    src.write_bytes(samples.oci_archive([image]))
    reg.push(src, "big/x:1")
    proxy = Proxy(reg.host, cut_after=1 << 20)
    lst = tmp_path / "l.txt"
    lst.write_text(f"{proxy.host}/big/x:1\n")
    out = tmp_path / "r.tar.zst"
    result = run("bundle", "--list", str(lst), "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert proxy.cuts == 1
    assert run("verify", str(out)).returncode == 0


# -- registry client: tokens, plain HTTP, extra bytes -------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """A distribution token server written for these tests: RS256 JWTs signed with openssl.

    docker-registry is configured with ``auth: token`` and this server's
    certificate as its root bundle, so the registry itself checks every
    token's signature, audience and expiry. ``expire_next`` makes the next
    token already expired (while the answer claims ``expires_in``), as a
    token that expired in flight or was revoked would be.
    """

    def __init__(self, base: Path) -> None:
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        self.key, self.cert = base / "key.pem", base / "cert.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", "/CN=image-agent-test-tokens", "-keyout", str(self.key), "-out", str(self.cert)],
            check=True, capture_output=True,
        )  # fmt: skip
        der = subprocess.run(
            ["openssl", "x509", "-in", str(self.cert), "-outform", "DER"],
            check=True,
            capture_output=True,
        ).stdout
        self.x5c = base64.b64encode(der).decode()
        self.expire_next = False
        self.expires_in = 300
        self.issued = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                body = json.dumps(
                    {"token": server.sign(query.get("scope", [])), "expires_in": server.expires_in}
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def sign(self, scopes: list[str]) -> str:
        now = int(time.time())
        expired, self.expire_next = self.expire_next, False
        self.issued += 1
        access = []
        for scope in scopes:
            kind, name, actions = scope.split(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        claims = {
            "iss": "image-agent-test-issuer",
            "sub": "tester",
            "aud": "image-agent-test",
            "exp": now - 3600 if expired else now + 3600,
            "nbf": now - 7200,
            "iat": now - 7200 if expired else now,
            "jti": f"t{self.issued}",
            "access": access,
        }
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self.x5c]}
        signing_input = (
            f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        )
        signature = subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", str(self.key)],
            input=signing_input.encode(),
            check=True,
            capture_output=True,
        ).stdout
        return f"{signing_input}.{_b64url(signature)}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def token_registry(tmp_path: Path) -> Iterator[Callable[[], tuple[str, TokenServer]]]:
    """docker-registry with token auth (auth: token) in front of our token server; an image pushed."""
    servers: list[TokenServer] = []
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[BinaryIO] = []

    def start() -> tuple[str, TokenServer]:
        tokens = TokenServer(tmp_path / "tokens")
        servers.append(tokens)
        port = free_port()
        host = f"127.0.0.1:{port}"
        base = tmp_path / "treg"
        (base / "data").mkdir(parents=True)
        (base / "config.yml").write_text(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n"
            f"    rootdirectory: {base / 'data'}\nhttp:\n  addr: {host}\n"
            f"auth:\n  token:\n    realm: {tokens.realm}\n    service: image-agent-test\n"
            f"    issuer: image-agent-test-issuer\n    rootcertbundle: {tokens.cert}\n"
        )
        log = (base / "registry.log").open("ab")
        logs.append(log)
        procs.append(
            subprocess.Popen(
                ["docker-registry", "serve", str(base / "config.yml")], stdout=log, stderr=log
            )
        )

        def up() -> bool:
            try:
                with urllib.request.urlopen(f"http://{host}/v2/", timeout=1):
                    return True
            except urllib.error.HTTPError as err:
                err.close()
                return True
            except OSError:
                return False

        wait_for(up, 60, "token registry")
        return host, tokens

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(10)
    for log in logs:
        log.close()
    for tokens in servers:
        tokens.stop()


def _push_with_token(host: str, node: Platform, tmp_path: Path) -> None:
    src = tmp_path / "tok.tar"
    src.write_bytes(samples.oci_archive([samples.simple_image("tok/x:1", {"x": b"x"}, node)]))
    result = subprocess.run(
        ["skopeo", "copy", "-q", "--dest-tls-verify=false", "--dest-creds", "u:p",
         f"oci-archive:{src}", f"docker://{host}/tok/x:1"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_expired_token_is_renewed_on_401(
    token_registry: Callable[[], tuple[str, TokenServer]], node: Platform, tmp_path: Path
) -> None:
    """A token the registry refuses as expired (401) is fetched again once, and the request succeeds."""
    host, tokens = token_registry()
    _push_with_token(host, node, tmp_path)
    tokens.issued = 0  # skopeo's tokens do not count
    tokens.expire_next = True
    client = RegistryClient({host: auth.Credentials(host, "u", "p")})
    ref = refs.parse(f"{host}/tok/x:1")
    manifest = client.manifest(ref)
    assert manifest.digest.startswith("sha256:")
    assert tokens.issued == 2  # the expired one, then its renewal
    client.manifest(ref)
    assert tokens.issued == 2  # the renewed token is kept while it is valid


def test_token_renewed_when_its_lifetime_ends(
    token_registry: Callable[[], tuple[str, TokenServer]], node: Platform, tmp_path: Path
) -> None:
    """A token is fetched again once the expires_in its server stated has passed, before any 401."""
    host, tokens = token_registry()
    _push_with_token(host, node, tmp_path)
    tokens.issued = 0
    now = [1000.0]
    client = RegistryClient({host: auth.Credentials(host, "u", "p")}, clock=lambda: now[0])
    ref = refs.parse(f"{host}/tok/x:1")
    client.manifest(ref)
    client.manifest(ref)
    assert tokens.issued == 1
    now[0] += 301  # the JWT itself stays valid for an hour: only the stated lifetime ended
    client.manifest(ref)
    assert tokens.issued == 2


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True),
        ("localhost:5000", True),
        ("127.0.0.1:5000", True),
        ("127.8.9.10", True),
        ("[::1]:5000", True),
        ("LOCALHOST:5000", True),
        ("localhost.corp.com", False),
        ("localhost.corp.com:5000", False),
        ("localhostx:5000", False),
        ("127.example.com", False),
        ("127.0.0.1.nip.io:5000", False),
        ("[::2]:5000", False),
        ("128.0.0.1", False),
        ("registry.local", False),
    ],
)
def test_plain_http_only_for_loopback(host: str, loopback: bool) -> None:
    """Look-alike names (localhost.corp.com, 127.example.com) are not loopback and get HTTPS."""
    client = RegistryClient()
    assert is_loopback(host) is loopback
    assert client._base(host).startswith("http://" if loopback else "https://")
    assert RegistryClient(plain_http=frozenset({host}))._base(host).startswith("http://")


def _non_loopback_address() -> str:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.254", 9))
            return str(s.getsockname()[0])
        except OSError:
            return ""


@pytest.mark.parametrize("challenge", ["basic", "bearer"])
def test_no_credentials_over_plain_http_to_other_hosts(challenge: str) -> None:
    """A --plain-http registry that is not loopback never receives credentials, basic or for a token."""
    address = _non_loopback_address()
    if not address or address.startswith("127."):
        pytest.skip("no non-loopback address on this machine")
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("Authorization", ""))
            port = self.server.server_address[1]  # type: ignore[index]  # an AF_INET server: (host, port)
            value = (
                'Basic realm="x"'
                if challenge == "basic"
                else f'Bearer realm="http://{address}:{port}/token",service="s"'
            )
            self.send_response(401)
            self.send_header("WWW-Authenticate", value)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer((address, 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        host = f"{address}:{httpd.server_address[1]}"
        client = RegistryClient(
            {host: auth.Credentials(host, "u", "secret")}, plain_http=frozenset({host}), timeout=5
        )
        with pytest.raises(RegistryError, match="refusing to send credentials over plain HTTP"):
            client.manifest(refs.parse(f"{host}/x/y:1"))
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert seen and all(h == "" for h in seen)


class _PaddingProxy:
    """An HTTP relay to a registry that appends bytes to one blob, as a broken or hostile registry might."""

    def __init__(self, target: str, digest: str, extra: bytes) -> None:
        relay = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                req = urllib.request.Request(
                    f"http://{target}{self.path}",
                    headers={k: v for k, v in self.headers.items() if k.lower() != "host"},
                )
                try:
                    resp = urllib.request.urlopen(req, timeout=30)
                    status, headers, body = resp.status, resp.headers, resp.read()
                except urllib.error.HTTPError as err:
                    status, headers, body = err.code, err.headers, err.read()
                if self.path.endswith(f"/blobs/{digest}") and status == 200:
                    body += extra
                    relay.padded += 1
                self.send_response(status)
                for k, v in headers.items():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.padded = 0
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_registry_extra_bytes_fail_the_bundle(
    registry: StartRegistry, node: Platform, tmp_path: Path
) -> None:
    """A registry that sends bytes past a layer's declared size fails the bundle; no archive is left."""
    reg = registry()
    image = samples.simple_image("pad/x:1", {"x": os.urandom(100_000)}, node, "gzip")
    src = tmp_path / "src.tar"
    src.write_bytes(samples.oci_archive([image]))
    reg.push(src, "pad/x:1")
    layer = layout.sha256(image.variants[0].layers[0].blob())
    proxy = _PaddingProxy(reg.host, layer, b"EXTRA")
    try:
        lst = tmp_path / "l.txt"
        lst.write_text(f"{proxy.host}/pad/x:1\n")
        out = tmp_path / "p.tar.zst"
        result = run("bundle", "--list", str(lst), "-o", str(out))
    finally:
        proxy.stop()
    assert proxy.padded >= 1
    assert result.returncode == 1, result.stderr
    (line,) = result.stderr.strip().splitlines()[-1:]
    assert "registry sent more" in line and "Traceback" not in result.stderr
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()


# -- verify: every member checked ------------------------------------------------------


def _with_duplicate(archive: bytes, *, same: bool) -> tuple[bytes, str]:
    """The archive with its largest blob appended again: the same bytes, or different ones of the same size."""
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        entries = [(m.name, read_member(tar, m)) for m in tar.getmembers()]
    name, data = max(entries, key=lambda e: len(e[1]))
    copy = data if same else data[:-1] + bytes([data[-1] ^ 0xFF])
    return samples.archive_bytes([*entries, (name, copy)]), name


def test_verify_refuses_a_corrupt_duplicate_blob(node: Platform, tmp_path: Path) -> None:
    """A blob carried twice with different bytes of the same size fails verify (tar -x keeps the bad copy)."""
    good = samples.oci_archive([samples.simple_image("dup:1", {"f": os.urandom(50_000)}, node)])
    bad, name = _with_duplicate(good, same=False)
    path = tmp_path / "dup.tar"
    path.write_bytes(bad)
    start = time.monotonic()
    result = run("verify", str(path))
    assert result.returncode == 1, result.stdout
    (line,) = result.stderr.strip().splitlines()
    assert str(path) in line and name in line and "different contents" in line
    assert time.monotonic() - start < 120  # seconds, not hours: generous for a loaded machine
    same, _ = _with_duplicate(good, same=True)
    path.write_bytes(same)
    result = run("verify", str(path))
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name", ["blobs/sha256/not-a-digest", "blobs/md5/abc", "blobs/sha256/a/b"])
def test_verify_refuses_blob_names_that_are_not_digests(
    name: str, node: Platform, tmp_path: Path
) -> None:
    """Every file under blobs/ must be named <algorithm>/<hex> of a supported digest."""
    good = samples.oci_archive([samples.simple_image("n:1", {"f": b"x"}, node)])
    with tarfile.open(fileobj=io.BytesIO(good)) as tar:
        entries = [(m.name, read_member(tar, m)) for m in tar.getmembers()]
    path = tmp_path / "names.tar"
    path.write_bytes(samples.archive_bytes([*entries, (name, b"whatever")]))
    result = run("verify", str(path))
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert name in line and "Traceback" not in result.stderr


class _AuthServers:
    """Two loopback HTTP servers written for these tests: a registry that asks for a bearer
    token, and another host. The registry's token realm answers with ``realm_answer``: a
    redirect to the other host, or a token with the given ``expires_in`` (raw JSON text)."""

    def __init__(self) -> None:
        self.auth_seen: dict[str, list[str]] = {"realm": [], "other": []}
        self.issued = 0
        self.expires_in = "300"
        self.redirect = False
        servers = self

        def handler(role: str) -> type[http.server.BaseHTTPRequestHandler]:
            class Handler(http.server.BaseHTTPRequestHandler):
                def do_GET(self) -> None:
                    auth_header = self.headers.get("Authorization", "")
                    if self.path.startswith("/token"):
                        servers.auth_seen[role].append(auth_header)
                        if role == "realm" and servers.redirect:
                            self.send_response(302)
                            self.send_header("Location", f"http://{servers.other}/token")
                            self.send_header("Content-Length", "0")
                            self.end_headers()
                            return
                        servers.issued += 1
                        body = (
                            f'{{"token": "t{servers.issued}", "expires_in": {servers.expires_in}}}'
                        ).encode()
                        self._send(200, body)
                    elif auth_header.startswith("Bearer "):
                        self._send(200, b"{}")
                    else:
                        self.send_response(401)
                        realm = f"http://{servers.realm}/token"
                        self.send_header("WWW-Authenticate", f'Bearer realm="{realm}",service="s"')
                        self.send_header("Content-Length", "0")
                        self.end_headers()

                def _send(self, code: int, body: bytes) -> None:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

                def log_message(self, *args: object) -> None:
                    pass

            return Handler

        self._httpds = []
        for role in ("realm", "other"):
            httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler(role))
            threading.Thread(target=httpd.serve_forever, daemon=True).start()
            self._httpds.append(httpd)
        self.realm = f"127.0.0.1:{self._httpds[0].server_address[1]}"
        self.other = f"127.0.0.1:{self._httpds[1].server_address[1]}"

    def stop(self) -> None:
        for httpd in self._httpds:
            httpd.shutdown()
            httpd.server_close()


@pytest.fixture
def auth_servers() -> Iterator[_AuthServers]:
    servers = _AuthServers()
    yield servers
    servers.stop()


def test_token_redirect_to_another_host_gets_no_credentials(auth_servers: _AuthServers) -> None:
    """A token server that redirects to another host: the credentials go to the realm only,
    the other host is asked without them (plain HTTP to a stranger would leak them)."""
    auth_servers.redirect = True
    host = auth_servers.realm
    client = RegistryClient({host: auth.Credentials(host, "u", "secret")}, timeout=10)
    client.manifest(refs.parse(f"{host}/x/y:1"))
    assert auth_servers.auth_seen["realm"] and all(
        h.startswith("Basic ") for h in auth_servers.auth_seen["realm"]
    )
    assert auth_servers.auth_seen["other"] == [""]


@pytest.mark.parametrize("expires_in", ["NaN", "Infinity", "-Infinity", '"soon"', "0"])
def test_token_lifetime_that_is_not_a_finite_number_gets_the_default(
    auth_servers: _AuthServers, expires_in: str
) -> None:
    """expires_in NaN, infinite, a string or zero: the token is renewed after the default
    60 s, not kept for ever."""
    auth_servers.expires_in = expires_in
    host = auth_servers.realm
    now = [1000.0]
    client = RegistryClient(timeout=10, clock=lambda: now[0])
    ref = refs.parse(f"{host}/x/y:1")
    client.manifest(ref)
    client.manifest(ref)
    assert auth_servers.issued == 1
    now[0] += 61
    client.manifest(ref)
    assert auth_servers.issued == 2


# -- bundle plans within the import limits ---------------------------------------------


def _plan(images: int, index_entries: int, layer_entries: int, layers: int) -> bundle.Plan:
    ref = refs.parse("registry.example/x:1")
    return bundle.Plan(
        images=[
            bundle.BundledImage(f"registry.example/i{n}:1", "sha256:" + "a" * 64, "", 1)
            for n in range(images)
        ],
        layers={"sha256:" + f"{n:064x}": (ref, 1) for n in range(layers)},
        index_entries=index_entries,
        layer_entries=layer_entries,
    )


@pytest.mark.parametrize(
    ("over", "flag"),
    [
        ((4, 0, 0, 0), "--max-archive-images"),
        ((3, 3 * 33 - 2, 0, 0), "--max-index-entries"),
        ((3, 0, 101, 0), "--max-layer-entries"),
        ((3, 0, 0, 48), "--max-archive-members"),
    ],
)
def test_bundle_plan_over_the_import_limits_is_refused(
    over: tuple[int, int, int, int], flag: str
) -> None:
    """A plan whose archive import would refuse (images, index entries counted as import
    counts them, layer entries, tar headers) is refused in one line naming the flag; the
    same plan one short of each limit passes."""
    from agent.archive import limits
    from agent.errors import AgentError

    previous = limits.configure(
        limits.Limits(max_manifests=3, max_layer_entries=100, max_members=50)
    )
    try:
        bundle.check_limits(_plan(3, 3 * 32, 100, 47))  # 3 + 3 files + 47 layers = 50 headers
        with pytest.raises(AgentError, match=f"more than the .* that import allows \\({flag}\\)"):
            bundle.check_limits(_plan(*over))
    finally:
        limits.configure(previous)


def test_bundle_over_the_import_limits_writes_nothing(
    registry: StartRegistry, node: Platform, tmp_path: Path
) -> None:
    """bundle of two images under --max-archive-images 1 stops before writing, in one line;
    the same flag on bundle and import lets a site raise its limits on both."""
    reg = registry()
    names = []
    for n in range(2):
        src = tmp_path / f"src{n}.tar"
        src.write_bytes(
            samples.oci_archive([samples.simple_image(f"lim/x{n}:1", {"x": b"x"}, node)])
        )
        reg.push(src, f"lim/x{n}:1")
        names.append(f"{reg.host}/lim/x{n}:1")
    lst = tmp_path / "l.txt"
    lst.write_text("\n".join(names) + "\n")
    out = tmp_path / "lim.tar.zst"
    result = run("bundle", "--list", str(lst), "-o", str(out), "--max-archive-images", "1")
    assert result.returncode == 1, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert "the bundle would hold 2 images, more than the 1" in line, result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/x", "/relative/path"])
def test_registry_requests_are_http_only(url: str) -> None:
    """A URL a registry hands over (token realm, redirect) that is not http(s) is refused in one line, never opened."""
    with pytest.raises(RegistryError, match="not an http or https URL"):
        web_request(url)


def test_blob_storage_redirects_stay_on_http() -> None:
    """A blob whose storage redirects on to ftp: is refused in one line at that hop, whatever hop it is."""
    hops: list[str] = []

    class Storage(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hops.append(self.path)
            target = "/cdn/blob" if self.path.startswith("/v2/") else "ftp://127.0.0.1/blob"
            self.send_response(302 if self.path.startswith("/cdn") else 307)
            self.send_header("Location", target)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Storage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        host = f"127.0.0.1:{server.server_address[1]}"
        client = RegistryClient(timeout=10)
        digest = "sha256:" + "a" * 64
        with pytest.raises(
            RegistryError, match=r"^ftp://127\.0\.0\.1/blob: not an http or https URL$"
        ):
            b"".join(client.blob(refs.parse(f"{host}/x/y:1"), digest))
        assert hops == [f"/v2/x/y/blobs/{digest}", "/cdn/blob"]
    finally:
        server.shutdown()
        server.server_close()
