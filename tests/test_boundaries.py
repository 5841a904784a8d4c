"""Package boundaries: what one Cogbert package takes from another is a name the other exports.

- ``cogbert_cloud``, the benchmarks and the examples import from ``cogbert_edge`` only names
  listed in the ``__all__`` of the module they import from, and never from a private module
  (a ``_`` path component) other than ``cogbert_edge._internal``;
- the examples (what users copy) do not use ``_internal`` at all;
- the device SDK never imports the cloud package.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TREES = {"cogbert_cloud": ROOT / "cogbert_cloud", "cogbert_bench": ROOT / "benchmarks", "examples": ROOT / "examples"}


def imports(tree: Path):
    for path in sorted(tree.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                yield path, node.lineno, node.module, [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                for a in node.names:
                    yield path, node.lineno, a.name, []


def crossings(tree: Path, package: str):
    for path, line, module, names in imports(tree):
        if module == package or module.startswith(package + "."):
            yield f"{path.relative_to(ROOT)}:{line}", module, names


@pytest.mark.parametrize("tree", sorted(TREES))
def test_only_exported_names_cross_into_the_edge_sdk(tree):
    bad = []
    for where, module, names in crossings(TREES[tree], "cogbert_edge"):
        parts = module.split(".")[1:]
        if parts[:1] == ["_internal"]:
            if tree == "examples":
                bad.append(f"{where}: examples must not use {module}")
            continue
        if any(p.startswith("_") for p in parts):
            bad.append(f"{where}: {module} is private")
            continue
        exported = set(getattr(importlib.import_module(module), "__all__", ()))
        for name in names:
            if name not in exported and not _is_submodule(module, name):
                bad.append(f"{where}: {module}.{name} is not in {module}.__all__")
    assert not bad, "\n".join(bad)


def _is_submodule(module: str, name: str) -> bool:
    try:
        importlib.import_module(f"{module}.{name}")
        return True
    except ModuleNotFoundError:
        return False


def test_the_device_sdk_never_imports_the_cloud():
    found = [f"{where}: {module}" for where, module, _ in crossings(ROOT / "cogbert_edge", "cogbert_cloud")]
    assert not found, "\n".join(found)


def test_the_check_sees_a_violation():
    # The scan must see what it is meant to catch: a name a module does not export, and a
    # private module.
    from cogbert_edge.inference import model
    exported = set(model.__all__)
    probe = ROOT / "tests" / "fixtures" / "boundary-probe"
    probe.mkdir(parents=True, exist_ok=True)
    (probe / "probe.py").write_text("from cogbert_edge.inference.model import _not_exported\n"
                                    "from cogbert_edge.inference._hidden import x\n")
    try:
        got = list(crossings(probe, "cogbert_edge"))
        assert [m for _, m, _ in got] == ["cogbert_edge.inference.model", "cogbert_edge.inference._hidden"]
        assert "_not_exported" not in exported
    finally:
        (probe / "probe.py").unlink()
        probe.rmdir()
