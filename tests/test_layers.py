"""DESIGN.md's layering, enforced: a module imports only from layers below it (or its own), and
nothing imports the CLI. Reads the source with ast, so it also sees imports inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "habit"

LAYERS = [
    {"errors"},
    {"settings", "metrics", "rundir", "allocator", "archs", "losses"},
    {"data", "models", "memory"},
    {"render"},
    {"adapters", "fastpath", "sharding"},
    {"training", "preference", "generation", "constrain"},
    {"evaluate", "tasks", "pairs", "report", "export", "ollama", "engine", "serve", "serve_api", "bench",
     "bench_workers", "flags", "studio", "studio_runs"},
    {"cli"},
    {"__init__", "__main__"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def habit_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "habit":
            parts = node.module.split(".")
            if len(parts) > 1:
                found.add(parts[1])
            else:  # from habit import a, b
                found.update(alias.name for alias in node.names if alias.name in RANK)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "habit" and len(parts) > 1:
                    found.add(parts[1])
    return found


def sources() -> list[tuple[str, Path]]:
    """(module name, file) for every source file; a subpackage's files all carry its name."""
    found = [(p.stem, p) for p in PACKAGE.glob("*.py")]
    found += [(p.parent.name, p) for p in PACKAGE.glob("*/*.py") if (p.parent / "__init__.py").is_file()]
    return sorted(found)


def test_every_module_has_a_layer():
    modules = {name for name, _ in sources()}
    assert modules == set(RANK), modules ^ set(RANK)


def test_imports_point_down():
    wrong = []
    for name, path in sources():
        for target in habit_imports(path):
            if target not in RANK:
                continue  # e.g. `from habit import __version__`
            if RANK[target] > RANK[name] or (target == "cli" and name != "__main__"):
                wrong.append(f"{path.name} ({name}, layer {RANK[name]}) imports {target} (layer {RANK[target]})")
    assert not wrong, wrong
