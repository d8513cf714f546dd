"""Every project module a DVC stage runs is among that stage's deps, so `dvc repro` re-runs it when its code changes.

For each stage of dvc.yaml the test takes its ``cmd`` (``pxpo <command> [subcommand] ...``),
finds the module(s) implementing that command (the mapping ``pxpo.cli`` exposes,
e.g. ``COMMANDS``; failing that, the imports of the ``cmd_*`` function that
handles it), and follows project imports with :mod:`ast` (module level and lazy
imports inside functions, relative imports resolved; importing ``a.b.c`` also runs
``a/__init__.py`` and ``a/b/__init__.py``). Edges out of ``pxpo/cli.py`` are not
followed (the CLI lazily imports every stage); cli.py itself counts as a dep of
every stage. Each module file reached must be a dep of the stage, or lie in a
folder that is.
"""

from __future__ import annotations

import ast
import importlib
import re
import shlex
import types
from pathlib import Path, PurePosixPath

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PKG = "pxpo"
CLI = f"{PKG}.cli"
_INTERP = re.compile(r"\$\{\s*([^}]+?)\s*\}")


# --- modules and their imports -------------------------------------------------------------------


def module_file(name: str, src: Path = SRC) -> Path | None:
    """The file that defines module ``name`` under ``src`` (a package's ``__init__.py``), or None."""
    p = src.joinpath(*name.split("."))
    if (p / "__init__.py").is_file():
        return p / "__init__.py"
    if p.with_suffix(".py").is_file():
        return p.with_suffix(".py")
    return None


def _is_package(name: str, src: Path) -> bool:
    return (src.joinpath(*name.split(".")) / "__init__.py").is_file()


def _with_parents(name: str) -> list[str]:
    """Importing ``a.b.c`` executes ``a``, ``a.b`` and ``a.b.c``."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _resolve_relative(module: str | None, level: int, current: str, src: Path) -> str | None:
    if level == 0:
        return module
    package = current if _is_package(current, src) else current.rpartition(".")[0]
    parts = package.split(".")
    if level - 1 > len(parts) - 1:
        return None
    base = ".".join(parts[: len(parts) - (level - 1)])
    return f"{base}.{module}" if module else base


def _import_targets(nodes, current: str, src: Path, pkg: str) -> set[str]:
    """Project modules the import statements (and constant ``import_module`` calls) among ``nodes`` name."""
    found: set[str] = set()

    def add(name: str | None) -> None:
        if name and name.split(".")[0] == pkg:
            found.update(_with_parents(name))

    for node in nodes:
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_relative(node.module, node.level, current, src)
            if base is None or base.split(".")[0] != pkg:
                continue
            add(base)
            for alias in node.names:  # `from pkg import submodule`
                if alias.name != "*" and module_file(f"{base}.{alias.name}", src) is not None:
                    add(f"{base}.{alias.name}")
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            f = node.func
            fname = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
            if fname == "import_module":
                target = node.args[0].value
                level = len(target) - len(target.lstrip("."))
                add(_resolve_relative(target[level:] or None, level, current, src) if level else target)
    return found


def imported_modules(name: str, src: Path = SRC, pkg: str = PKG) -> set[str]:
    """Project modules imported anywhere in module ``name`` (inside functions too)."""
    path = module_file(name, src)
    if path is None:
        return set()
    return _import_targets(ast.walk(ast.parse(path.read_text(), str(path))), name, src, pkg)


def import_closure(entries, src: Path = SRC, pkg: str = PKG, stop=(CLI,)) -> set[Path]:
    """Files of every project module reachable from ``entries``; modules in ``stop`` are included, not followed."""
    seen: set[str] = set()
    todo = [m for e in entries for m in _with_parents(e)]
    while todo:
        m = todo.pop()
        if m in seen or module_file(m, src) is None:  # a module being moved: nothing to cover
            continue
        seen.add(m)
        if m not in stop:
            todo.extend(imported_modules(m, src, pkg) - seen)
    return {module_file(m, src) for m in seen}


# --- which modules implement a `pxpo` command ------------------------------------------------------


def _existing_module(name: str, src: Path = SRC) -> str | None:
    """The longest prefix of dotted ``name`` that is a project module (``pxpo.x.main`` -> ``pxpo.x``)."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        cand = ".".join(parts[:i])
        if module_file(cand, src) is not None:
            return cand
    return None


def _cli_function_imports(fn_name: str, src: Path = SRC) -> set[str]:
    """Project modules a cli.py function imports, with the cli.py helpers it calls."""
    tree = ast.parse(module_file(CLI, src).read_text())
    funcs = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    module_level = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    found = _import_targets(module_level, CLI, src, PKG)
    seen, todo = set(), [fn_name]
    while todo:
        f = todo.pop()
        if f in seen or f not in funcs:
            continue
        seen.add(f)
        nodes = list(ast.walk(funcs[f]))
        found |= _import_targets(nodes, CLI, src, PKG)
        todo += [n.func.id for n in nodes if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in funcs]
    return found


def _modules_of(value, src: Path = SRC) -> set[str]:
    """Module names for one value of cli's command mapping (a module name, module, callable, or a collection of them)."""
    if isinstance(value, (list, tuple, set, frozenset)):
        return set().union(*(_modules_of(v, src) for v in value)) if value else set()
    if isinstance(value, str):
        name = value.split(":")[0]
        if name.startswith("."):
            level = len(name) - len(name.lstrip("."))
            name = _resolve_relative(name[level:] or None, level, CLI, src) or ""
        elif name.split(".")[0] != PKG:
            name = f"{PKG}.{name}"
        found = _existing_module(name, src)
        return {found} if found else set()
    if isinstance(value, types.ModuleType):
        return {value.__name__}
    module = getattr(value, "__module__", None) or getattr(value, "module", None)
    if isinstance(module, str):
        if module == CLI and callable(value):  # a cli.py function: what it imports
            return _cli_function_imports(value.__name__, src) | {CLI}
        return _modules_of(module, src)
    return set()


def command_table(cli, src: Path = SRC) -> dict[tuple[str, ...], set[str]]:
    """cli's command -> implementing-modules mapping (``COMMANDS`` or the like), keyed by command words.

    Keys: ``"train"``, ``"base build"`` or ``("base", "build")``; a dict value without a
    ``"module"`` key holds subcommands. Values: module names (absolute, relative to
    pxpo, or ``module:function``), modules, callables, or lists of them.
    """
    table: dict[tuple[str, ...], set[str]] = {}

    def walk(prefix: tuple[str, ...], mapping: dict) -> None:
        for key, value in mapping.items():
            words = prefix + (tuple(key) if isinstance(key, tuple) else tuple(str(key).split()))
            if isinstance(value, dict) and "module" not in value:
                walk(words, value)
            else:
                table[words] = _modules_of(value["module"] if isinstance(value, dict) else value, src)

    names = [n for n in vars(cli) if n.isupper() and "COMMAND" in n and isinstance(getattr(cli, n), dict)]
    for n in sorted(names, key=lambda n: (n != "COMMANDS", n)):
        walk((), getattr(cli, n))
        if table:
            break
    return table


def _command_words(argv: list[str]) -> list[str]:
    words = []
    for a in argv[1:]:
        if a.startswith("-") or "=" in a:
            break
        words.append(a)
    return words


def entry_modules(argv: list[str], src: Path = SRC) -> set[str]:
    """Project modules implementing the `pxpo ...` command line ``argv`` (cli.py included)."""
    cli = importlib.import_module(CLI)
    words = _command_words(argv)
    table = command_table(cli, src)
    for n in range(len(words), 0, -1):
        if tuple(words[:n]) in table:
            return table[tuple(words[:n])] | {CLI}
    # No mapping (yet): the cmd_* function argparse dispatches to, else the one named after the command.
    fn_name = None
    if hasattr(cli, "build_parser"):
        try:
            fn = getattr(cli.build_parser().parse_args(argv[1:]), "fn", None)
            fn_name = getattr(fn, "__name__", None)
        except SystemExit:
            pass
    if fn_name is None:
        fn_name = "cmd_" + "_".join(w.replace("-", "_") for w in words)
    return _cli_function_imports(fn_name, src) | {CLI}


# --- dvc.yaml --------------------------------------------------------------------------------------


def _lookup(params: dict, key: str):
    cur = params
    for part in key.split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise KeyError(f"${{{key}}} is not in params.yaml")
        cur = cur[part]
    return cur


def interpolate(text: str, params: dict) -> str:
    return _INTERP.sub(lambda m: str(_lookup(params, m.group(1))), text)


def load_pipeline(root: Path = ROOT) -> tuple[dict, dict]:
    dvc = yaml.safe_load((root / "dvc.yaml").read_text())
    params = yaml.safe_load((root / "params.yaml").read_text()) or {}
    for v in dvc.get("vars", []) or []:  # dvc.yaml `vars:` (files or inline dicts) on top of params.yaml
        if isinstance(v, dict):
            params = {**params, **v}
        elif isinstance(v, str) and (root / v.split(":")[0]).is_file():
            params = {**params, **(yaml.safe_load((root / v.split(":")[0]).read_text()) or {})}
    return dvc["stages"], params


def stage_deps(stage: dict, params: dict) -> list[PurePosixPath]:
    wdir = PurePosixPath(stage.get("wdir", "."))
    out = []
    for d in stage.get("deps", []) or []:
        d = next(iter(d)) if isinstance(d, dict) else d
        out.append(PurePosixPath(*(wdir / interpolate(str(d), params).rstrip("/")).parts))
    return out


def covered(file: PurePosixPath, deps: list[PurePosixPath]) -> bool:
    return any(file == d or d in file.parents for d in deps)


def missing_code_deps(root: Path = ROOT, src: Path = SRC) -> dict[str, list[str]]:
    """stage -> project module files it runs that no dep covers."""
    stages, params = load_pipeline(root)
    missing = {}
    for name, stage in stages.items():
        argv = shlex.split(interpolate(stage["cmd"], params))
        if not argv or argv[0] != "pxpo":
            continue
        files = import_closure(entry_modules(argv, src), src)
        deps = stage_deps(stage, params)
        rel = sorted(PurePosixPath(f.relative_to(root).as_posix()) for f in files)
        miss = [str(f) for f in rel if not covered(f, deps)]
        if miss:
            missing[name] = miss
    return missing


# --- tests -----------------------------------------------------------------------------------------


def test_every_stage_lists_the_project_modules_it_runs():
    missing = missing_code_deps()
    assert not missing, "dvc.yaml stages do not list code they run among their deps (stage -> missing files):\n" + "\n".join(
        f"  {stage} -> {', '.join(files)}" for stage, files in sorted(missing.items())
    )


def test_every_stage_resolves_to_implementing_code():
    """The check above is not vacuous: each stage's command maps to an existing module beyond cli.py."""
    stages, params = load_pipeline()
    assert stages
    cli_tree = ast.parse(module_file(CLI).read_text())
    cli_level = _import_targets([n for n in cli_tree.body if isinstance(n, (ast.Import, ast.ImportFrom))], CLI, SRC, PKG)
    for name, stage in stages.items():
        argv = shlex.split(interpolate(stage["cmd"], params))
        assert argv[0] == "pxpo", f"stage {name} does not run the pxpo CLI: {stage['cmd']}"
        entries = entry_modules(argv) - {CLI, PKG} - cli_level
        assert any(module_file(m) for m in entries), f"stage {name}: no existing module implements {' '.join(argv[:3])} (found {sorted(entries)})"
        assert module_file(CLI) in import_closure(entry_modules(argv))


def test_closure_follows_lazy_and_relative_imports_but_not_out_of_cli(tmp_path):
    src = tmp_path / "src"
    pkg = src / "pxpo"
    (pkg / "core").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "cli.py": "def cmd_x():\n    from .stage import run\n",
        "stage.py": "import json\nfrom . import helper\n\ndef run():\n    from .core import ddim\n",
        "helper.py": "def f():\n    import pxpo.core.losses\n",
        "core/__init__.py": "",
        "core/ddim.py": "from .. import errors\nfrom ..missing import gone\n",
        "core/losses.py": "",
        "errors.py": "",
        "unused.py": "",
    }
    for rel, text in files.items():
        (pkg / rel).write_text(text)
    got = {p.relative_to(pkg).as_posix() for p in import_closure(["pxpo.stage", "pxpo.cli"], src)}
    assert got == {"__init__.py", "cli.py", "stage.py", "helper.py", "core/__init__.py", "core/ddim.py", "core/losses.py", "errors.py"}
    # edges out of cli.py are not followed
    assert {p.relative_to(pkg).as_posix() for p in import_closure(["pxpo.cli"], src)} == {"__init__.py", "cli.py"}
    assert _cli_function_imports("cmd_x", src) == {"pxpo", "pxpo.stage"}


def test_coverage_by_file_or_folder_with_interpolation():
    deps = stage_deps({"deps": ["${model.path}", "src/pxpo/core", "src/pxpo/cli.py", {"src/pxpo/x.py": {}}]}, {"model": {"path": "models/base"}})
    assert deps[0] == PurePosixPath("models/base")
    assert covered(PurePosixPath("src/pxpo/core/ddim.py"), deps)
    assert covered(PurePosixPath("src/pxpo/cli.py"), deps) and covered(PurePosixPath("src/pxpo/x.py"), deps)
    assert not covered(PurePosixPath("src/pxpo/training/loop.py"), deps)
    assert not covered(PurePosixPath("src/pxpo/core_extra.py"), deps)
    with pytest.raises(KeyError):
        interpolate("${nope.x}", {})


def test_command_table_shapes(tmp_path):
    """The cli mapping may hold module names, relative names, callables, modules or nested subcommands."""
    import pxpo.errors

    src = tmp_path / "src"
    for rel in ("pxpo/__init__.py", "pxpo/prepare.py", "pxpo/trajectories.py", "pxpo/stages/__init__.py", "pxpo/stages/build.py", "pxpo/lcm.py", "pxpo/errors.py"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text("")
    cli = types.SimpleNamespace(
        COMMANDS={
            "prepare": "pxpo.prepare",
            "label": ".trajectories:main",
            "base": {"build": "pxpo.stages.build.main", "distill-lcm": ["lcm"]},
            "sample": {"module": "pxpo.stages"},
            "evaluate": pxpo.errors,
            "register": pxpo.errors.PxpoInputError,
        }
    )
    t = command_table(cli, src)
    assert t[("prepare",)] == {"pxpo.prepare"}
    assert t[("label",)] == {"pxpo.trajectories"}
    assert t[("base", "build")] == {"pxpo.stages.build"}
    assert t[("base", "distill-lcm")] == {"pxpo.lcm"}
    assert t[("sample",)] == {"pxpo.stages"}
    assert t[("evaluate",)] == {"pxpo.errors"}
    assert t[("register",)] == {"pxpo.errors"}
    assert command_table(types.SimpleNamespace(), src) == {}
