"""The layout stays true: dependencies point one way, no import cycles, `import evalkit` stays light,
modules and functions stay short. Imports are read with ast (nothing is executed) except in the
import-cost test, which starts a fresh interpreter.

Parts and their rank (a module may import its own part and parts of lower rank only):
  0 base (errors, _imports, _io, _threads, the root package) <- 1 data, metrics <- 2 embed <- 3 search
  <- 4 evaluation <- 5 train <- 6 jobs <- 7 cli (<- evalkit.__main__).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "evalkit"
RANK = {
    "base": 0,
    "data": 1,
    "metrics": 1,
    "embed": 2,
    "search": 3,
    "evaluation": 4,
    "train": 5,
    "jobs": 6,
    "cli": 7,
    "main": 8,
}
BASE_MODULES = {"evalkit", "evalkit.errors", "evalkit._imports", "evalkit._io", "evalkit._threads"}
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80
HEAVY = ("torch", "sentence_transformers", "transformers", "faiss", "matplotlib", "ray")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def part_of(module: str) -> str:
    if module in BASE_MODULES:
        return "base"
    if module == "evalkit.__main__":
        return "main"
    name = module.split(".")[1]
    if name not in RANK:
        raise AssertionError(f"{module} belongs to no part; add it to a part or to BASE_MODULES")
    return name


def _lazy_names() -> dict[str, str]:
    """The root package's lazy public names -> defining module (read from its _LAZY dict)."""
    tree = ast.parse(MODULES["evalkit"].read_text())
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "_LAZY":
            return ast.literal_eval(node.value)
    raise AssertionError("evalkit/__init__.py has no _LAZY table")


def imports_of(module: str, *, top_level_only: bool = False) -> set[str]:
    """evalkit modules `module` imports, in functions too (lazy imports are dependencies)."""
    tree = ast.parse(MODULES[module].read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    lazy = _lazy_names()
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "evalkit"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] != "evalkit":
                continue
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                if sub in MODULES:
                    found.add(sub)
                elif node.module == "evalkit" and alias.name in lazy:
                    found.add(lazy[alias.name])  # `from evalkit import fit` depends on train
                else:
                    found.add(node.module)
    unknown = found - set(MODULES)
    assert not unknown, f"{module} imports modules that do not exist: {sorted(unknown)}"
    return found - {module}


def violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for src, targets in graph.items():
        p = part_of(src)
        for dst in sorted(targets):
            q = part_of(dst)
            if q == p:
                continue
            if RANK[q] >= RANK[p]:
                bad.append(f"{src} ({p}) imports {dst} ({q})")
    return bad


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def dependency_graph() -> dict[str, set[str]]:
    return {m: imports_of(m) for m in MODULES}


def test_every_module_belongs_to_a_part():
    for module in MODULES:
        part_of(module)


def test_dependencies_point_one_way():
    bad = violations(dependency_graph())
    assert not bad, "dependencies pointing the wrong way:\n" + "\n".join(bad)


def test_no_import_cycles():
    found = cycles(dependency_graph())
    assert not found, f"import cycles: {found}"


def test_metrics_and_base_stay_pure():
    """metrics imports nothing of evalkit but errors; errors and _io nothing of evalkit at all."""
    for module in MODULES:
        deps = imports_of(module)
        if part_of(module) == "metrics":
            extra = {d for d in deps if part_of(d) != "metrics"} - {"evalkit.errors"}
            assert not extra, f"{module} (metrics) imports {sorted(extra)}"
    assert not imports_of("evalkit.errors") and not imports_of("evalkit._io")
    assert imports_of("evalkit", top_level_only=True) == set(), (
        "the root package must import lazily"
    )


def test_the_checker_catches_a_wrong_way_import_and_a_cycle():
    graph = dependency_graph()
    graph["evalkit.data.readers"] = graph["evalkit.data.readers"] | {"evalkit.embed.store"}
    assert violations(graph) == ["evalkit.data.readers (data) imports evalkit.embed.store (embed)"]
    graph["evalkit.data.readers"] |= {"evalkit.data.dataset"}
    graph["evalkit.data.dataset"] = graph["evalkit.data.dataset"] | {"evalkit.data.readers"}
    assert ["evalkit.data.dataset", "evalkit.data.readers"] in cycles(graph)


def _top_level_names(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.ImportFrom):
            names |= {a.asname or a.name for a in node.names}
    return names


def test_lazy_public_names_resolve_to_their_modules():
    for name, module in _lazy_names().items():
        assert module in MODULES, f"evalkit.{name} points at missing module {module}"
        defined = _top_level_names(ast.parse(MODULES[module].read_text()))
        lazy_classes = "_IMPLS" in defined  # evaluator classes are built on first access
        assert name in defined or lazy_classes, f"evalkit.{name} is not defined in {module}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_and_functions_stay_short(module):
    text = MODULES[module].read_text()
    lines = text.count("\n")
    assert lines <= MAX_MODULE_LINES, f"{module} has {lines} lines (limit {MAX_MODULE_LINES})"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = node.end_lineno - node.lineno + 1
            assert length <= MAX_FUNCTION_LINES, (
                f"{module}.{node.name} has {length} lines (limit {MAX_FUNCTION_LINES})"
            )


@pytest.mark.parametrize("module", [m for m in sorted(MODULES) if MODULES[m].name != "__main__.py"])
def test_every_module_opens_with_a_docstring(module):
    tree = ast.parse(MODULES[module].read_text())
    assert ast.get_docstring(tree), f"{module} has no module docstring"


def test_import_evalkit_and_the_cli_load_nothing_heavy():
    parts = [m for m in MODULES if m.count(".") == 1 and MODULES[m].name == "__init__.py"]
    code = (
        "import sys, evalkit, evalkit.cli, " + ", ".join(sorted(parts)) + "\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "[]", f"importing evalkit pulled in: {out.stdout.strip()}"
