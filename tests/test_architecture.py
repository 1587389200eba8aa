"""The package's layering, read from the source: the library never imports the commands or the
trainer, the model and checkpoint code never import serving either, and no two modules
import each other at load time."""

from __future__ import annotations

import ast
from pathlib import Path

import albef

PKG = Path(albef.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(every albef module ``path`` imports, those imported at module level), as the longest
    importable albef module name each import statement names."""
    module = _module_name(path)
    is_pkg = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), str(path))
    top_level = {id(n) for n in tree.body} | {
        id(n) for stmt in tree.body if isinstance(stmt, (ast.If, ast.Try)) for n in ast.walk(stmt)
    }
    every, top = set(), set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                keep = len(base) - node.level + (1 if is_pkg else 0)
                prefix = ".".join(base[:keep])
                src = f"{prefix}.{node.module}" if node.module else prefix
            else:
                src = node.module or ""
            names = [src] + [f"{src}.{a.name}" for a in node.names]
        for name in names:
            if name == "albef" or name.startswith("albef."):
                target = _known(name)
                if target and target != module:
                    every.add(target)
                    if id(node) in top_level and not _type_checking_only(tree, node):
                        top.add(target)
    return every, top


def _type_checking_only(tree: ast.Module, node: ast.AST) -> bool:
    for stmt in tree.body:
        if isinstance(stmt, ast.If) and "TYPE_CHECKING" in ast.unparse(stmt.test):
            if any(n is node for n in ast.walk(stmt)):
                return True
    return False


MODULES = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _known(name: str) -> str | None:
    """The longest prefix of ``name`` that is an albef module."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in MODULES:
            return candidate
        parts.pop()
    return None


GRAPH = {m: _imports(p) for m, p in MODULES.items()}


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_walk_sees_the_package():
    assert "albef.cli" in MODULES and "albef.models.albef" in MODULES and "albef.checkpoints.pretrained" in MODULES
    assert "albef.models.albef" in GRAPH["albef.checkpoints.pretrained"][1]


def _imports_of(importers: tuple[str, ...], targets: tuple[str, ...], exempt: bool = False) -> list[str]:
    """Every import of a module under ``targets`` by a module under ``importers`` (with ``exempt``:
    by a module under none of them)."""
    within = lambda m, packages: any(_in(m, p) for p in packages)  # noqa: E731
    return [
        f"{m} imports {t}"
        for m, (every, _) in GRAPH.items()
        if within(m, importers) != exempt
        for t in sorted(every)
        if within(t, targets)
    ]


def test_models_and_checkpoints_import_no_training_serving_or_commands():
    bad = _imports_of(("albef.models", "albef.checkpoints"), ("albef.training", "albef.cli", "albef.serve"))
    assert not bad, "\n".join(bad)


def test_the_model_never_imports_checkpoint_code():
    bad = _imports_of(("albef.models",), ("albef.checkpoints",))
    assert not bad, "\n".join(bad)


def test_only_the_commands_import_the_trainer():
    # open_clip's split: the library (models, checkpoints, evaluation, API, serving) stands without
    # the training package; the training package and the commands build on it
    bad = _imports_of(("albef.training", "albef.cli"), ("albef.training",), exempt=True)
    assert not bad, "\n".join(bad)


def test_the_library_never_imports_the_commands():
    bad = _imports_of(("albef.cli",), ("albef.cli",), exempt=True)
    assert not bad, "\n".join(bad)


def test_no_import_cycle_at_module_level():
    # A package's own __init__ is imported before any of its submodules: an edge from a
    # submodule to its package (or a package to its submodule) is part of Python's import, not a cycle.
    edges = {m: {t for t in top if not (_in(m, t) or _in(t, m))} for m, (_, top) in GRAPH.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                return stack[stack.index(t) :] + [t]
            if t not in state:
                cycle = visit(t)
                if cycle:
                    return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state:
            cycle = visit(m)
            assert cycle is None, "import cycle: " + " -> ".join(cycle)
