"""The project's shape, checked with ``ast`` (no imports executed).

The house reads core -> library -> adapters -> stages -> CLI -> Kubeflow
components / pipelines, with no arrow back:

* no import circle between project modules (lazy imports inside functions count);
* no ``sys.path`` manipulation;
* the core imports nothing of the project but the core and ``pxpo.errors``;
* library modules never import the stages, the CLI, Kubeflow or the embedded default;
* nothing under ``src/pxpo`` is over about 400 lines (one documented exception).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("src", "components", "pipelines")
MAX_LINES = 400
# core/rewards is a package (one module per family); nothing is over the limit.
OVER_LIMIT_ALLOWED: set[str] = set()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "src":
        parts = parts[1:]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for d in SOURCE_DIRS for p in (ROOT / d).rglob("*.py")}


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules that ``name`` imports anywhere in its file (relative imports resolved)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def resolve(target: str) -> str | None:
        while target:
            if target in modules:
                return target
            target = target.rpartition(".")[0]
        return None

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base]) if base else ".".join(up)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for t in targets:
            r = resolve(t)
            if r and r != name:
                found.add(r)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = project_modules()
    return {m: imports_of(m, p, mods) for m, p in mods.items()}


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; components of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    x = stack.pop()
                    on_stack.discard(x)
                    comp.append(x)
                    if x == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_cycle_finder_finds_a_planted_circle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert strongly_connected(g) == [["a", "b", "c"]]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def test_no_import_circle(graph):
    circles = strongly_connected(graph)
    assert not circles, "import circles between project modules: " + "; ".join(" <-> ".join(c) for c in circles)


def test_no_sys_path_manipulation():
    bad = []
    for p in project_modules().values():
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name) and node.value.id == "sys":
                bad.append(f"{p.relative_to(ROOT)}:{node.lineno}")
    assert not bad, f"sys.path used in {bad}: make the code importable as a package instead"


def _layer(m: str) -> str:
    if m.startswith("pxpo.core"):
        return "core"
    if m.startswith("pxpo.embedded"):
        return "embedded"
    if m.startswith("pxpo.stages"):
        return "stages"
    if m == "pxpo.cli" or m.startswith("pxpo.cli."):
        return "cli"
    if m.startswith("pxpo.kubeflow"):
        return "kubeflow"
    if m.split(".")[0] in ("components", "pipelines"):
        return "pipelines"
    return "library"  # config, models, rollout, train, trajectories, tracking, validation, mlflow, ...


# What each layer may import (besides itself). The embedded default is reached only
# through ``pxpo base`` (the stages), never by the library.
ALLOWED = {
    "core": {"core"},
    "library": {"core", "library"},
    "embedded": {"core", "library", "embedded"},
    "stages": {"core", "library", "embedded", "stages"},
    "kubeflow": {"library", "kubeflow"},  # the launcher, TrainJob and progress helpers: never the pipelines above them
    "pipelines": {"library", "kubeflow", "pipelines"},  # the KFP pipeline and its components (repository root)
    "cli": {"core", "library", "stages", "kubeflow", "pipelines", "cli"},
}


def test_imports_point_one_way(graph):
    bad = []
    for m, targets in graph.items():
        for t in targets:
            if t == "pxpo.errors" or t == "pxpo":  # the exception type and the version are everyone's
                continue
            if _layer(t) not in ALLOWED[_layer(m)]:
                bad.append(f"{m} ({_layer(m)}) imports {t} ({_layer(t)})")
    assert not bad, "imports against the direction core -> library -> stages / kubeflow -> pipelines -> cli:\n" + "\n".join(sorted(bad))


def test_modules_are_small():
    big = {}
    for m, p in project_modules().items():
        if m.startswith("pxpo") and m not in OVER_LIMIT_ALLOWED:
            n = len(p.read_text(encoding="utf-8").splitlines())
            if n > MAX_LINES:
                big[m] = n
    assert not big, f"modules over {MAX_LINES} lines (split by what they hold): {big}"
