"""The folders of ``agent/`` are layers: each imports only the layers the README's map puts below it."""

from __future__ import annotations

import ast
from pathlib import Path

AGENT = Path(__file__).resolve().parent.parent / "agent"

# The shared basics every layer may use.
BASICS = {"errors", "logs", "config", "boundedjson", "__version__"}
# Which other folders each folder may import (besides BASICS and itself).
ALLOWED: dict[str, set[str]] = {
    "image": set(),
    "archive": {"image"},
    "containerd": {"image", "_proto"},
    "importer": {"image", "archive", "containerd"},
    "pull": {"image", "containerd"},
    "node": {"image", "archive", "containerd", "importer", "pull"},
    "cluster": {"image", "pull", "node"},
    "airgap": {"image", "archive", "containerd", "importer", "pull"},
    "testing": {"image", "archive", "containerd"},
    "cli": {
        "image",
        "archive",
        "containerd",
        "importer",
        "pull",
        "node",
        "cluster",
        "airgap",
        "testing",
    },
}


def imported_layers(path: Path) -> set[str]:
    """The top-level names under ``agent`` that a module imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "agent":
                names = [f"agent.{a.name}" for a in node.names]
            else:
                names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        found |= {n.split(".")[1] for n in names if n.startswith("agent.")}
    return found


def test_every_folder_imports_only_the_layers_below_it() -> None:
    """No import reaches up or sideways across the layers (e.g. the importer never imports the node daemon)."""
    wrong = []
    for folder, allowed in ALLOWED.items():
        for path in sorted((AGENT / folder).rglob("*.py")):
            extra = imported_layers(path) - allowed - BASICS - {folder}
            if extra:
                wrong.append(f"{path.relative_to(AGENT.parent)} imports {sorted(extra)}")
    assert wrong == []


def test_every_folder_is_in_the_map() -> None:
    """A new folder under agent/ gets a place in the layers (and the README's map) before it gets code."""
    packages = {p.name for p in AGENT.iterdir() if (p / "__init__.py").exists()}
    assert packages - {"_proto"} == set(ALLOWED) | {"config"}


def test_the_basics_import_no_layer() -> None:
    """errors, logs, config and boundedjson sit under every layer: they import none of them."""
    for name in BASICS - {"__version__"}:
        package = AGENT / name
        paths = sorted(package.rglob("*.py")) if package.is_dir() else [AGENT / f"{name}.py"]
        for path in paths:
            assert imported_layers(path) <= BASICS, path
