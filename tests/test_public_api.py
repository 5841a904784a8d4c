"""Each package's public API (``__all__``) is exactly what docs/api.md names, and every name in
it resolves."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs" / "api.md"


def documented(package: str) -> set[str]:
    text = DOCS.read_text()
    m = re.search(rf"^## `{package}`\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert m, f"docs/api.md has no section for {package}"
    return set(re.findall(r"^\| `([A-Za-z_][A-Za-z0-9_]*)` \|", m.group(1), re.M))


@pytest.mark.parametrize("package", ["cogbert_edge", "cogbert_cloud"])
def test_all_is_what_the_docs_name(package):
    mod = importlib.import_module(package)
    assert set(mod.__all__) == documented(package)
    assert len(mod.__all__) == len(set(mod.__all__)), "a name is listed twice in __all__"
    for name in mod.__all__:
        assert getattr(mod, name) is not None


def test_the_edge_package_imports_without_numpy_until_a_policy_is_used():
    # `./run demo --help` and the configuration loader rely on it.
    import subprocess
    import sys
    code = ("import sys; sys.modules['numpy'] = None\n"
            "import cogbert_edge, cogbert_edge.config, cogbert_edge.errors\n"
            "from cogbert_cloud.service.demo import help_text\n"
            "assert '--devices' in help_text()\n"
            "try:\n    cogbert_edge.Policy\nexcept ImportError:\n    print('lazy')\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "lazy", p.stderr
