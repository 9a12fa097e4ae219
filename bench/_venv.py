"""Run a benchmark under superagent's Python when it was started with another one.

The benchmarks are scripts with ``#!/usr/bin/env python3``, so ``./bench/x`` starts the
system's Python, which usually lacks superagent's dependencies. Each script calls
``use_project_python(...)`` with the packages it needs before importing any of them; when
one is missing and the project's venv (``.venv``, made by ``scripts/up`` or ``scripts/test``)
is not the running Python, the script is executed again under it, with the same arguments.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def use_project_python(*modules: str) -> None:
    """Return when ``modules`` import here; else re-execute under ``.venv`` or exit."""
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if not missing:
        return
    venv = REPO / ".venv"
    python = venv / "bin" / "python"
    script = os.path.abspath(sys.argv[0])
    # By prefix, not by the interpreter's path: a venv made from the very interpreter
    # `python3` names resolves to the same file.
    if python.exists() and Path(sys.prefix).resolve() != venv.resolve():
        os.execv(str(python), [str(python), script, *sys.argv[1:]])
    raise SystemExit(f"{Path(script).name} needs {', '.join(missing)}: run it with "
                     f"superagent's Python ({python}, made by scripts/up or scripts/test)")
