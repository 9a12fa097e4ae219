"""Package build: the proxy's hot path compiled with mypyc when it can be, else pure Python.

Everything about the package is in pyproject.toml; this file only adds a ``build_ext``
step. When ``pip install .`` (or ``pip wheel``) builds the package, that step calls
``superagent/compiled.py``'s ``build`` (the code behind ``scripts/compile-proxy``) with
the wheel's build tree as its target, so the extensions and their stamp are installed
beside the sources. Any failure (mypyc not importable, no C compiler or Python headers,
mypyc refusing the code) is caught: the package is then pure Python, and
``superagent/.build.json`` in the wheel says why, which ``superagent version`` shows.

An editable install (``pip install -e``) never compiles: a checkout stays pure until
``scripts/compile-proxy build`` (scripts/test relies on its first pass being pure).
``SUPERAGENT_PURE=1`` in the environment skips the compile for a normal install too.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import sysconfig
from pathlib import Path
from types import ModuleType

from setuptools import Distribution, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent


def _compiled() -> ModuleType:
    """superagent/compiled.py loaded by path: importing the package would run its __init__."""
    spec = importlib.util.spec_from_file_location("_superagent_compiled",
                                                  HERE / "superagent" / "compiled.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _why_not() -> str | None:
    """Why the compile cannot even be tried; None when it can."""
    if os.environ.get("SUPERAGENT_PURE", "") not in ("", "0"):
        return "SUPERAGENT_PURE was set when the package was built"
    try:
        import mypyc.build  # noqa: F401
    except ImportError:
        return "mypyc was not importable when the package was built"
    include = sysconfig.get_paths()["include"]
    if not os.path.exists(os.path.join(include, "Python.h")):
        return f"no Python headers ({include}/Python.h) when the package was built"
    return None


class BuildHotPath(build_ext):
    """Compile the proxy's hot path into the build tree; fall back to pure Python."""

    def run(self) -> None:
        super().run()  # the package declares no other extension
        if self.inplace or getattr(self, "editable_mode", False):
            return  # an editable install: the checkout stays pure (scripts/compile-proxy)
        target = Path(self.build_lib)
        compiled = _compiled()
        compiled.clean(target)  # what an earlier build left in this build dir goes first
        reason = _why_not()
        if reason is None:
            try:
                compiled.build(target)
            except Exception as exc:  # never fail the install for the faster path
                lines = str(exc).strip().splitlines()
                last = lines[-1] if lines else type(exc).__name__
                # one short line for `superagent version`; pip -v shows the whole output
                reason = "the compile failed: " + (last[:117] + "..." if len(last) > 120
                                                   else last)
                print(f"superagent: the proxy's hot path stays pure Python: {exc}",
                      file=sys.stderr)
        info = {"compiled": reason is None, "reason": reason or "compiled at install"}
        out = target / "superagent" / ".build.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(info) + "\n")
        if reason is not None:
            print(f"superagent: the proxy's hot path is pure Python: {reason}", file=sys.stderr)


class PlatformDistribution(Distribution):
    """Always runs build_ext (the wheel may carry extensions, so it is platform-tagged)."""

    def has_ext_modules(self) -> bool:
        return True


setup(distclass=PlatformDistribution, cmdclass={"build_ext": BuildHotPath})
