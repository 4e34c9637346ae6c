"""Archive metadata, compression detection and platforms (pure)."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import boundedjson
from agent.archive import layout, limits
from agent.archive.compression import Compression, detect
from agent.archive.tarstream import HeaderGuard, parse_pax, safe_name, walk
from agent.errors import ArchiveError
from agent.image import platforms
from agent.image.platforms import Platform
from agent.testing import samples
from tests.helpers import read_member


def test_chain_ids_follow_the_oci_definition() -> None:
    """ChainID(n) = sha256(ChainID(n-1) + ' ' + DiffID(n)): the snapshot names containerd uses."""
    d = ["sha256:" + c * 64 for c in "abc"]
    chain = layout.chain_ids(tuple(d))
    assert chain[0] == d[0]
    assert chain[1] == "sha256:" + hashlib.sha256(f"{d[0]} {d[1]}".encode()).hexdigest()
    assert chain[2] == "sha256:" + hashlib.sha256(f"{chain[1]} {d[2]}".encode()).hexdigest()


def test_synthesized_docker_manifest_is_what_ctr_writes() -> None:
    """Compact JSON in Go field order, docker media types, so digests agree with ctr import."""
    config = layout.Descriptor("", "sha256:" + "1" * 64, 10)
    layer = layout.Descriptor("", "sha256:" + "2" * 64, 20)
    media_type, body = layout.synthesize_manifest(config, [(layer, Compression.NONE)])
    assert media_type == layout.DOCKER_MANIFEST
    assert body == (
        b'{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json",'
        b'"config":{"mediaType":"application/vnd.docker.container.image.v1+json","digest":"sha256:'
        + b"1"
        * 64
        + b'","size":10},"layers":[{"mediaType":'
        b'"application/vnd.docker.image.rootfs.diff.tar","digest":"sha256:'
        + b"2" * 64
        + b'","size":20}]}'
    )
    media_type, _ = layout.synthesize_manifest(config, [(layer, Compression.ZSTD)])
    assert media_type == layout.OCI_MANIFEST


@pytest.mark.parametrize(
    ("head", "kind"),
    [
        (b"\x1f\x8b\x08", Compression.GZIP),
        (b"\x28\xb5\x2f\xfd", Compression.ZSTD),
        (b"BZh9", Compression.BZIP2),
        (b"\x04\x22\x4d\x18", Compression.LZ4),
        (b"blobs/", Compression.NONE),
    ],
)
def test_detect(head: bytes, kind: Compression) -> None:
    """Outer compression is recognised from the first bytes, not the file name."""
    assert detect(head) is kind


@pytest.mark.parametrize("name", ["/etc/passwd", "../x", "a/../../x", "blobs/../../x"])
def test_unsafe_names_refused(name: str) -> None:
    """Member names that escape the archive (absolute, ..) are refused."""
    with pytest.raises(ArchiveError):
        safe_name(name)


def test_safe_names_cleaned() -> None:
    """Harmless spellings of a member name (./, //) are cleaned to one canonical form."""
    assert safe_name("./blobs//sha256/ab") == "blobs/sha256/ab"


def test_walk_streams_members_of_compressed_tar() -> None:
    """The tar walk sees every member of a zstd-compressed archive in order."""
    data = samples.archive_bytes([("a", b"1"), ("b/c", b"22")])
    members = [
        (m.name, r.read() if r else None)
        for m, r in walk(io.BytesIO(samples.compress(data, "zstd")))
    ]
    assert members == [("a", b"1"), ("b/c", b"22")]


@pytest.mark.parametrize(
    ("doc", "why"),
    [
        (b"{", "not valid JSON"),
        (b'{"manifests": 3}', "no manifests list"),
        (b'{"manifests": [{"digest": "md5:x", "size": 1}]}', "invalid digest"),
        (b'{"manifests": [{"digest": "sha256:' + b"a" * 64 + b'", "size": -1}]}', "invalid size"),
    ],
)
def test_bad_index(doc: bytes, why: str) -> None:
    """A malformed index.json is an ArchiveError that says what is wrong."""
    with pytest.raises(ArchiveError, match=why):
        layout.parse_index(doc)


def test_image_name_rules() -> None:
    """io.containerd.image.name wins; a bare ref.name tag needs a base name."""
    d = "sha256:" + "a" * 64
    both = layout.Descriptor(
        "", d, 1, {layout.ANNOTATION_IMAGE_NAME: "a:1", layout.ANNOTATION_REF_NAME: "b:2"}
    )
    assert layout.image_name(both) == "docker.io/library/a:1"
    bare = layout.Descriptor("", d, 1, {layout.ANNOTATION_REF_NAME: "v1"})
    assert layout.image_name(bare) is None
    assert layout.image_name(bare, "quay.io/x/y") == "quay.io/x/y:v1"


def test_platforms() -> None:
    """Platform strings parse with defaults and aliases, and variants match as containerd matches them."""
    assert platforms.parse("arm64") == Platform("linux", "arm64")
    assert platforms.parse("linux/arm64/v8").matches(Platform("linux", "arm64"))
    assert platforms.parse("linux/x86_64") == Platform("linux", "amd64")
    assert not platforms.parse("linux/arm/v6").matches(Platform("linux", "arm", "v7"))
    with pytest.raises(ValueError, match="want os/arch"):
        platforms.parse("a/b/c/d")


# -- tar header guard and metadata bounds --------------------------------------------


_NAME = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="/\0", exclude_categories=["Cs"]),
    min_size=1,
    max_size=40,
).filter(lambda s: s not in (".", ".."))
_MEMBER = st.tuples(
    st.lists(_NAME, min_size=1, max_size=6).map("/".join),
    st.binary(max_size=1500),
    st.sampled_from(["file", "dir", "symlink"]),
)


def _written(members: list[tuple[str, bytes, str]], fmt: int) -> bytes:
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data, kind in members:
            info = tarfile.TarInfo(name)
            if kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, "target"
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@settings(
    max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    members=st.lists(_MEMBER, min_size=1, max_size=8, unique_by=lambda m: m[0]),
    fmt=st.sampled_from([0, 1, 2]),
)
def test_header_guard_passes_what_tarfile_writes(
    members: list[tuple[str, bytes, str]], fmt: int
) -> None:
    """Archives written by tarfile in every format (pax, GNU long names, ustar) pass the guard unchanged."""
    import tarfile

    formats = (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT)
    try:
        data = _written(members, formats[fmt])
    except ValueError:
        return  # ustar cannot hold the name: nothing written
    names = [safe_name(n) for n, _, _ in members]
    seen = [m.name for m, _ in walk(io.BytesIO(data))]
    assert seen == [n.rstrip("/") for n in names]
    guard = HeaderGuard(io.BytesIO(data), limits.current())
    while guard.read(777):
        pass
    assert guard.headers >= len(members)


def test_pax_records_parsed_whole_or_refused() -> None:
    """Pax records must tile the header exactly; long digit runs (the quadratic parser's food) are refused."""
    good = b"13 path=abcd\n"
    assert parse_pax(good, "h") == {b"path": b"abcd"}
    for bad in (b"99 path=x\n", b"2 a\n", b"12 pathabcd\n", b"x path=y\n", b"13 path=abcd\nX"):
        with pytest.raises(ArchiveError):
            parse_pax(bad, "h")
    digits = b"1" * (200)
    record = b"comment=" + digits + b"\n"
    record = str(len(record) + 4).encode() + b" " + record
    with pytest.raises(ArchiveError, match="run of more than"):
        parse_pax(record, "h")


def test_boundedjson_depth_is_linear_on_unterminated_strings() -> None:
    """Quotes and escapes that never close a string are scanned once, not once per quote."""
    import time

    start = time.monotonic()
    for doc in (b'"' + b'\\"' * 1_000_000, b'"' + b'\\"' * 1_000_000 + b"\\", b"[" * 2_000_000):
        boundedjson.depth(doc)
    assert time.monotonic() - start < 3
    assert boundedjson.depth(b'["]", {"a": [1]}]') == 3
    assert boundedjson.depth(b'"[[["') == 0


def test_zstd_window_from_budget() -> None:
    """The largest window is the power of two left after the reserve: 128 MiB under the default budget."""
    assert limits.Limits().zstd_window == 128 << 20
    assert limits.Limits(memory_budget=112 << 20).zstd_window == 16 << 20
    assert limits.Limits(memory_budget=1 << 30).zstd_window == 512 << 20


@pytest.mark.parametrize("size_field", [b"0o10000000\0", b"1_000_000\0", b" +4000000\0"])
def test_header_guard_reads_sizes_as_tarfile_does(size_field: bytes) -> None:
    """A pax header whose size is written in a form int() accepts (0o…, 1_0, +n) is still bounded."""
    import tarfile

    info = tarfile.TarInfo("p")
    info.type = tarfile.XHDTYPE
    header = bytearray(info.tobuf(format=tarfile.USTAR_FORMAT))
    header[124:136] = size_field.ljust(12, b"\0")
    header[148:156] = b"        "
    header[148:156] = f"{sum(header):06o}\0 ".encode()
    with pytest.raises(ArchiveError, match="extended header of"):
        list(walk(io.BytesIO(bytes(header) + b"1 " * 100_000)))


def _ustar_header(name: str, size: int, typ: bytes) -> bytes:
    import tarfile

    info = tarfile.TarInfo(name)
    info.size, info.type = size, typ
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def test_pax_padding_that_is_not_zero_is_refused() -> None:
    """A pax record hidden in the padding of an extended header (tarfile reads it, the guard
    would not) is refused, so the guard and tarfile never disagree on member sizes."""
    import tarfile

    record, hidden = b"10 path=a\n", b"9 size=0\n"
    raw = _ustar_header("PaxHeader", len(record), tarfile.XHDTYPE)
    raw += (record + hidden).ljust(512, b"\0")
    raw += _ustar_header("a", 512, tarfile.REGTYPE) + b"\0" * 512
    raw += _ustar_header("b", 0, tarfile.REGTYPE) + b"\0" * 1024
    with pytest.raises(ArchiveError, match="padding is not all zero"):
        list(walk(io.BytesIO(raw)))
    clean = _ustar_header("PaxHeader", len(record), tarfile.XHDTYPE) + record.ljust(512, b"\0")
    clean += _ustar_header("a", 0, tarfile.REGTYPE) + b"\0" * 1024
    assert [m.name for m, _ in walk(io.BytesIO(clean))] == ["a"]


@pytest.mark.parametrize("typ", [b"L", b"g", b"K"])
def test_long_chains_of_extended_headers_are_refused(typ: bytes) -> None:
    """Extended headers in a row past the limit give one clear error, not tarfile's RecursionError."""
    from agent.archive.tarstream import MAX_EXTENDED_CHAIN

    def archive(n: int) -> bytes:
        chain = b"".join(_ustar_header("x", 0, typ) for _ in range(n))
        return chain + _ustar_header("a", 0, b"0") + b"\0" * 1024

    with pytest.raises(ArchiveError, match=f"more than {MAX_EXTENDED_CHAIN} extended headers"):
        list(walk(io.BytesIO(archive(2000))))
    with pytest.raises(ArchiveError, match="extended headers in a row"):
        list(walk(io.BytesIO(archive(MAX_EXTENDED_CHAIN + 1))))
    assert len(list(walk(io.BytesIO(archive(MAX_EXTENDED_CHAIN))))) == 1


def test_appledouble_blob_files_are_skipped() -> None:
    """blobs/sha256/._<hex> (macOS bsdtar's resource forks) are skipped with a warning, not fatal."""
    from structlog.testing import capture_logs

    hexd = "a" * 64
    data = samples.archive_bytes(
        [(f"blobs/sha256/._{hexd}", b"\0\5\26\7junk"), (f"blobs/sha256/{hexd}", b"x")]
    )
    with capture_logs() as logged:
        assert [m.name for m, _ in walk(io.BytesIO(data))] == [f"blobs/sha256/{hexd}"]
    assert [e["event"] for e in logged] == ["archive.member_ignored"]
    assert logged[0]["member"] == f"blobs/sha256/._{hexd}"


# -- per-archive counts ------------------------------------------------------------------


def _index_doc(n: int) -> bytes:
    entry = {"mediaType": layout.OCI_MANIFEST, "digest": "sha256:" + "a" * 64, "size": 1}
    return layout.dump_json({"schemaVersion": 2, "manifests": [entry] * n})


def test_docker_archive_layers_count_once_against_the_total(node: Platform, tmp_path: Path) -> None:
    """A docker archive's layers count once against --max-layer-entries: 2 images of 3 layers
    pass a limit of 6 and fail one of 5 (not 12 counted, as when manifest.json counted too)."""
    from agent.airgap.verify import verify

    images = [
        samples.SampleImage(
            f"d{i}:1",
            (samples.Variant(node, tuple(samples.Layer({f"f{i}{j}": b"x"}) for j in range(3))),),
        )
        for i in range(2)
    ]
    path = tmp_path / "docker.tar"
    path.write_bytes(samples.docker_archive(images))
    previous = limits.configure(limits.Limits(max_layer_entries=6))
    try:
        assert len(verify(str(path)).result.images) == 2
        limits.configure(limits.Limits(max_layer_entries=5))
        with pytest.raises(ArchiveError, match="more than 5 layer entries in all"):
            verify(str(path))
    finally:
        limits.configure(previous)


def test_index_entry_limit_scales_with_max_manifests() -> None:
    """By default the index entry total follows --max-archive-images (33 per image); set, it is exact."""
    assert limits.Limits().index_entry_limit == 33_000
    assert limits.Limits(max_manifests=2000).index_entry_limit == 66_000
    assert limits.Limits(max_index_entries=300).index_entry_limit == 300
    with pytest.raises(Exception, match="max_index_entries must be positive"):
        limits.Limits(max_index_entries=-1).check()


def test_bundle_shaped_archive_of_1000_images_verifies(node: Platform, tmp_path: Path) -> None:
    """1,000 images (the --max-archive-images default), each with its registry index of 16
    platforms and attestations as bundles keep them, pass the default limits."""
    from agent.airgap.verify import verify

    image = samples.simple_image("x:1", {"f": b"x"}, node)
    entries = dict(_tar_entries(samples.oci_archive([image])))
    manifest = next(d for d in entries.values() if layout.OCI_MANIFEST.encode() in d[:80])
    m = {"mediaType": layout.OCI_MANIFEST, "digest": layout.sha256(manifest), "size": len(manifest)}
    other = [
        {
            **m,
            "digest": "sha256:" + f"{k:064x}",
            "platform": {"os": "linux", "architecture": f"a{k}"},
        }
        for k in range(15)
    ]
    top = []
    for i in range(1000):
        doc = layout.dump_json(
            {
                "schemaVersion": 2,
                "mediaType": layout.OCI_INDEX,
                "manifests": [
                    {**m, "platform": {"os": node.os, "architecture": node.architecture}},
                    *other,
                ],
                "annotations": {"n": str(i)},
            }
        )
        d = layout.sha256(doc)
        entries[f"blobs/sha256/{d[7:]}"] = doc
        top.append(
            {
                "mediaType": layout.OCI_INDEX,
                "digest": d,
                "size": len(doc),
                "annotations": {layout.ANNOTATION_IMAGE_NAME: f"img{i}:1"},
            }
        )
    entries["index.json"] = layout.dump_json({"schemaVersion": 2, "manifests": top})
    path = tmp_path / "bundle.tar"
    path.write_bytes(samples.archive_bytes(entries.items()))
    assert len(verify(str(path)).result.images) == 1000


def _tar_entries(archive: bytes) -> list[tuple[str, bytes]]:
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        return [(m.name, read_member(tar, m)) for m in tar.getmembers()]


def test_documents_outside_an_archive_are_counted_one_at_a_time() -> None:
    """Documents parsed with no archive begun are bounded each on its own: counts never pile up
    for the life of the thread (a long fuzz run went blind that way)."""
    import threading

    from tests.fuzz import targets

    errors: list[BaseException] = []

    def run() -> None:
        try:
            for _ in range(5):
                layout.parse_index(_index_doc(3))
            for _ in range(5):
                targets.layout_docs(_index_doc(3))
                assert limits.counted()["index"] == 3
                targets.bundle_manifest(_index_doc(3))
                assert limits.counted()["index"] == 3
        except BaseException as err:  # noqa: BLE001 - whatever the thread meets is checked below
            errors.append(err)

    previous = limits.configure(limits.Limits(max_index_entries=5))
    try:
        thread = threading.Thread(target=run)  # a thread of its own: no archive begun in it
        thread.start()
        thread.join(60)
    finally:
        limits.configure(previous)
    assert not thread.is_alive() and not errors, errors
