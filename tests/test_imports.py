"""The import graph has no cycles (which package may import which is import-linter's
contracts in pyproject.toml, and tests/test_layering.py)."""

from __future__ import annotations

import ast
from pathlib import Path

import superagent

ROOT = Path(superagent.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Each module's imports of superagent modules, at any depth (TYPE_CHECKING included)."""
    graph: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
        graph[module_name(path)] = {m for m in found if m.startswith("superagent")}
    modules = set(graph)
    return {name: {m for m in deps if m in modules and m != name}
            for name, deps in graph.items()}


def test_no_import_cycles() -> None:
    """No module reaches itself through imports (the coordinator's service, api and
    runner used to: service -> api -> service, runner -> service -> runner). The proxy's
    type-only cycles (master/admin, connection/state) are left to the proxy."""
    graph = imports()
    cycles = []
    for start in (name for name in graph if not name.startswith("superagent.proxy")):
        stack, seen = [(start, (start,))], set()
        while stack:
            name, path = stack.pop()
            for dep in graph.get(name, ()):
                if dep == start:
                    cycles.append(" -> ".join((*path, dep)))
                elif dep not in seen:
                    seen.add(dep)
                    stack.append((dep, (*path, dep)))
    assert cycles == []
