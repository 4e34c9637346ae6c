"""Write the seed corpus of every fuzz target from the project's own sample archives.

``python -m tests.fuzz.make_seeds`` rewrites ``tests/fuzz/corpus``. Seeds are
kept small (a few KiB each) so the fuzzers mutate structure, not payload.
"""

from __future__ import annotations

import bz2
import io
import json
import shutil
import tarfile

import lz4.frame

from agent.archive import layout
from agent.image.platforms import Platform
from agent.importer import BUNDLE_CONTENTS
from agent.testing import samples
from tests.fuzz.run import CORPUS
from tests.helpers import read_member

AMD64 = Platform("linux", "amd64")
ARM64 = Platform("linux", "arm64", "v8")


def _members(archive: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        return {m.name: read_member(tar, m) for m in tar.getmembers() if m.isfile()}


def _long_name_archive() -> bytes:
    """A member whose 150-character name needs a pax header (as Go and Python write them)."""
    return samples.archive_bytes([("d/" + "n" * 150, b"x"), ("oci-layout", b"{}")])


def seeds() -> dict[str, dict[str, bytes]]:
    one = samples.simple_image("seed/one:1", {"f": b"one\n"}, AMD64)
    multi = samples.SampleImage(
        "seed/multi:2",
        (
            samples.Variant(AMD64, (samples.Layer({"a": b"amd64\n"}, "gzip"),)),
            samples.Variant(ARM64, (samples.Layer({"a": b"arm64\n"}, "zstd"),)),
        ),
    )
    oci = samples.oci_archive([one])
    oci_multi = samples.oci_archive([multi], metadata_first=True)
    docker = samples.docker_archive([one])
    bundle_like = samples.archive_bytes(
        [*_members(oci_multi).items(), (BUNDLE_CONTENTS, json.dumps({"images": []}).encode())]
    )
    archive = {
        "oci.tar": oci,
        "oci-multi.tar": oci_multi,
        "docker.tar": docker,
        "docker-legacy.tar": samples.docker_archive([one], legacy_names=True),
        "bundle.tar": bundle_like,
        "long-name.tar": _long_name_archive(),
        "oci.tar.gz": samples.compress(oci, "gzip"),
        "oci.tar.zst": samples.compress(oci, "zstd"),
        "oci.tar.bz2": bz2.compress(oci),
        "oci.tar.lz4": lz4.frame.compress(oci),
    }
    docs: dict[str, bytes] = {}
    for name, data in {**_members(oci_multi), **_members(docker)}.items():
        if data.startswith((b"{", b"[")):
            docs[name.replace("/", "_")] = data
    docs["nested-index"] = layout.dump_json(
        {
            "schemaVersion": 2,
            "mediaType": layout.OCI_INDEX,
            "manifests": [
                {"mediaType": layout.OCI_INDEX, "digest": "sha256:" + "a" * 64, "size": 100}
            ],
        }
    )
    lists = {
        "plain.txt": b"# images\nalpine:3.19\nquay.io/che/udi:latest  # the UDI\n",
        "puller.txt": b"IMAGES=java=quay.io/eclipse/che-java11-maven:next;theia=quay.io/x/y:1;\n",
        "related.env": b'export RELATED_IMAGE_editor="quay.io/che/editor@sha256:'
        + b"b" * 64
        + b"\"\nRELATED_IMAGE_x='localhost:5000/a/b:c'\n",
    }
    references = {
        f"ref{i}": text.encode()
        for i, text in enumerate(
            [
                "alpine",
                "docker.io/library/alpine:3.19",
                "localhost:5000/a/b_c/d-e:v1.2",
                "[::1]:5000/x@sha256:" + "c" * 64,
                "quay.io/x/y:t@sha512:" + "d" * 128,
                "test_com",
                "192.168.1.1:5000/repo:5050",
            ]
        )
    }
    report = {
        "node": "n1",
        "labels": {"zone": "a"},
        "pulls": [{"image": "docker.io/library/alpine:latest", "state": "present"}],
        "archives": [{"path": "/images/a.tar", "state": "imported"}],
        "sent_at": 1.5,
    }
    return {
        "archive": archive,
        "layout": docs,
        "bundle-manifest": {k: v for k, v in docs.items() if k.startswith("blobs")},
        "pull-list": lists,
        "reference": references,
        "cluster-report": {"report.json": json.dumps(report).encode()},
    }


def main() -> None:
    for target, files in seeds().items():
        folder = CORPUS / target
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for name, data in files.items():
            (folder / name).write_bytes(data)


if __name__ == "__main__":
    main()
