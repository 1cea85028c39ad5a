"""The package design (docs/architecture.md), checked from the source: what may import what, no
import cycle (late imports inside functions count too: they only hide a cycle), no module over
400 lines, and a client that does not pull in the web framework."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from support import ROOT

PACKAGES = ("app", "models", "benchmarks")
WEB = ("fastapi", "starlette", "uvicorn")

# importer prefix -> module prefixes it must never import (docs/architecture.md, "layers")
FORBIDDEN = {
    "models": ("app", "benchmarks", *WEB),
    "app.protocol": ("app.http", "app.cli", "app.bulk", *WEB),
    "app.client": ("app.http", "app.cli", "app.bulk", *WEB),
    "app.http": ("app.cli", "app.bulk", "models.training"),
    "app.bulk": ("app.http", "app.cli"),
}


def modules() -> dict[str, Path]:
    found = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """Every project module `name` imports, at module level or inside functions."""
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for t in targets:
            while t and t not in known and "." in t:
                t = t.rpartition(".")[0]
            if t in known or t.split(".")[0] in WEB:
                out.add(t)
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(path, name, set(mods)) - {name} for name, path in mods.items()}


def test_layers(graph):
    bad = []
    for name, targets in graph.items():
        for importer, forbidden in FORBIDDEN.items():
            if name == importer or name.startswith(importer + "."):
                bad += [f"{name} -> {t}" for t in targets if any(t == f or t.startswith(f + ".") for f in forbidden)]
    assert not bad, bad


def test_no_import_cycle(graph):
    # Package __init__ modules are containers: an edge to a package is an edge to what it re-exports.
    edges = {n: {t for t in ts if not t.split(".")[0] in WEB} for n, ts in graph.items()}
    state, stack, cycles = {}, [], []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for t in edges.get(n, ()):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[n] = 2

    for n in sorted(edges):
        if n not in state:
            visit(n)
    # A package importing its own submodule (re-export) is not a cycle unless the submodule imports it back.
    real = [c for c in cycles if not all(a.startswith(b + ".") or b.startswith(a + ".") for a, b in zip(c, c[1:]))]
    assert not real, real


def test_no_module_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in modules().values() if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def test_the_client_does_not_import_the_web_framework():
    code = "import sys, app.client; print(sorted(m for m in sys.modules if m.split('.')[0] in ('fastapi', 'starlette', 'uvicorn')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_tests_do_not_import_test_files():
    offenders = []
    for path in (ROOT / "tests").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[-1].startswith(("test_", "conftest")):
                offenders.append(f"{path.relative_to(ROOT)}: from {node.module}")
    assert not offenders, offenders



def test_serving_code_imports_no_extra():
    """The lean install: what serving runs (app/, models/vae/, models/metrics.py) imports none of
    the extras (`train`: accelerate, matplotlib; the tests' scikit-image; scipy), anywhere, so the
    image that installs only the base dependencies serves everything (the container check in CI
    runs /roundtrip in it). diffusers itself imports accelerate and scipy when they are installed."""
    extras = ("accelerate", "matplotlib", "skimage", "scipy")
    bad = []
    for name, path in modules().items():
        if name.startswith(("app", "models.vae", "models.metrics")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                bad += [f"{name}: {n}" for n in names if n.split(".")[0] in extras]
    assert not bad, bad
