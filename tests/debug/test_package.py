"""The debug package stays transport-neutral: it imports no role package."""

from __future__ import annotations

import ast
from pathlib import Path

import superagent.debug

ROLES = ("superagent.participant", "superagent.coordinator", "superagent.proxy")


def test_no_module_imports_a_role_package() -> None:
    """No module of superagent/debug imports the participant, the coordinator or the proxy."""
    package = Path(superagent.debug.__file__).parent
    modules = sorted(package.glob("*.py"))
    assert len(modules) >= 7
    for path in modules:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert not name.startswith(ROLES), f"{path.name} imports {name}"
