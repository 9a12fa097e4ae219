"""The proxy's hot path compiled with mypyc: same typed source, C extension modules.

``scripts/compile-proxy [build|clean|status]`` drives it. ``build`` compiles
``HOT_MODULES`` with mypyc (part of mypy) as one group, so calls and attribute accesses
between them stay native, in a scratch copy of the package (no build files land in the
tree), and puts the extensions beside their sources, where CPython imports them instead
of the ``.py``. The group is the proxy's per-request modules plus the core module they
call per request (``superagent.httprules``), so modules are named by their dotted names
and the group's runtime sits at the top of the package, ``superagent/_hot__mypyc``:
importing the compiled core module must not load the proxy package. ``STAMP`` records
the sha256 of every source compiled. ``clean`` removes the extensions; ``status`` says
which modules run compiled.

``setup.py`` calls ``build`` with a target of its own when the package is built for
``pip install`` (never for an editable install, which stays pure until
``scripts/compile-proxy``): the extensions and the stamp land in the wheel beside the
sources, and ``BUILD_INFO`` records whether it compiled and, when not, why (no compiler,
mypyc missing, ``SUPERAGENT_PURE=1``...). ``hot_path`` answers which path this
installation runs and why, from those files alone (no proxy module is imported), for
``superagent version`` and ``status``.

``drop_stale`` runs whenever ``superagent`` is imported (before any hot module can be,
the core one included): when any source changed since the group was built (or
extensions exist that no stamp accounts for), every extension is deleted with a
warning, so an edited source is never shadowed by stale compiled code. It costs a few
``stat`` calls when nothing is compiled. The pure-Python modules are the reference; the
tests run against both. This module imports no role package (it names the proxy's
modules, and imports them only in ``status``).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.machinery
import json
import sys
from pathlib import Path

HOT_MODULES = (
    "superagent.proxy.http1", "superagent.proxy.parsers", "superagent.proxy.routes",
    "superagent.proxy.netio", "superagent.proxy.upstream", "superagent.proxy.connection",
    "superagent.proxy.exchange", "superagent.proxy.upload", "superagent.proxy.tunnel",
    "superagent.proxy.snapshot", "superagent.proxy.state", "superagent.proxy.metrics",
    "superagent.proxy.errors", "superagent.httprules",
)
GROUP = "superagent._hot"  # mypyc's runtime for the group: superagent/_hot__mypyc
ROOT = Path(__file__).resolve().parent.parent  # the directory holding the superagent package
STAMP = ROOT / "superagent" / ".compiled.json"
# Written by the package build only (setup.py): {"compiled": bool, "reason": str}.
BUILD_INFO = ROOT / "superagent" / ".build.json"
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]  # e.g. .cpython-311-x86_64-linux-gnu.so
# What builds made before the group took in a core module left behind: their runtime and
# stamp lived in the proxy package. Removed like any extension no stamp accounts for.
_LEGACY = ("superagent/proxy/_hot__mypyc", "superagent/proxy/.compiled.json")
_SETUP = """
import sys
from setuptools import setup
from mypyc.build import mypycify
setup(name="superagent-hot", script_args=["build_ext", "--inplace"],
      ext_modules=mypycify(sys.argv[1:], group_name="{group}"))
"""


def _relative(module: str) -> str:
    """``superagent.proxy.http1`` -> ``superagent/proxy/http1`` (no suffix)."""
    return module.replace(".", "/")


def _digests() -> dict[str, str]:
    return {m: hashlib.sha256((ROOT / f"{_relative(m)}.py").read_bytes()).hexdigest()
            for m in HOT_MODULES}


def _extension_names() -> list[str]:
    """Paths relative to ``ROOT``: the group's runtime first, then each module's extension."""
    return [f"{_relative(GROUP)}__mypyc{SUFFIX}"] + [f"{_relative(m)}{SUFFIX}"
                                                     for m in HOT_MODULES]


def _extensions(root: Path | None = None) -> list[Path]:
    base = ROOT if root is None else root
    names = [*_extension_names(), f"{_LEGACY[0]}{SUFFIX}"]
    return [p for p in (base / name for name in names) if p.exists()]


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_stamp() -> dict[str, str]:
    try:
        doc = json.loads(STAMP.read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in doc.items()} if isinstance(doc, dict) else {}


def drop_stale() -> bool:
    """Delete the extensions when a source changed since they were built; True if so."""
    if not _extensions() or _read_stamp() == _digests():
        return False
    try:
        clean()
    except OSError as exc:
        print(f"superagent: the compiled proxy modules are older than their source but "
              f"cannot be removed ({exc}); run scripts/compile-proxy clean", file=sys.stderr)
        return False
    print("superagent: the compiled proxy modules were older than their source and were "
          "removed; run scripts/compile-proxy again", file=sys.stderr)
    return True


def status() -> dict[str, bool]:
    """Module -> whether the running interpreter imported its compiled extension."""
    return {m: str(getattr(importlib.import_module(m), "__file__", "")).endswith(SUFFIX)
            for m in HOT_MODULES}


def hot_path() -> tuple[bool, str]:
    """Whether the proxy's hot path runs compiled here, and why (or why not).

    Read from the files (extensions, stamp, ``BUILD_INFO``) after ``drop_stale`` ran at
    import, so it is what a proxy worker started now would load.
    """
    info = _read_json(BUILD_INFO)
    installed = info if isinstance(info, dict) else {}
    present = [(ROOT / name).exists() for name in _extension_names()]
    if all(present) and _read_stamp() == _digests():
        how = "built at install" if installed.get("compiled") else "built by compile-proxy"
        return True, f"mypyc, {how}"
    if any(present):
        return False, "an incomplete compiled build (run scripts/compile-proxy again)"
    if "reason" in installed:
        return False, str(installed["reason"])
    return False, "not compiled in this checkout; scripts/compile-proxy builds it"


def describe() -> str:
    """One line for humans: ``compiled (mypyc, built at install)`` or ``pure Python (why)``."""
    compiled, why = hot_path()
    return f"{'compiled' if compiled else 'pure Python'} ({why})"


def build(target: Path | None = None) -> None:
    """Compile the group in a scratch copy and install the extensions beside the sources,
    or into ``target`` (a package build's tree: the sources there are left alone)."""
    import shutil  # only a build needs these: drop_stale runs at every import of superagent
    import subprocess
    import tempfile

    clean(target)  # a build dir used before may hold another source's extensions
    dest = ROOT if target is None else target
    sources = _digests()
    scratch = Path(tempfile.mkdtemp(prefix="superagent-mypyc-"))
    try:
        shutil.copytree(ROOT / "superagent", scratch / "superagent",
                        ignore=shutil.ignore_patterns("__pycache__", "*.so", STAMP.name))
        done = subprocess.run(
            [sys.executable, "-c", _SETUP.format(group=GROUP),
             *(f"{_relative(m)}.py" for m in HOT_MODULES)],
            cwd=scratch, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"mypyc failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
        if sources != _digests():
            raise RuntimeError("the sources changed while they were compiled; build again")
        # The stamp first, so a proxy importing meanwhile keeps what is there; the group's
        # runtime before the modules that load it.
        stamp = dest / STAMP.relative_to(ROOT)
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(json.dumps(sources, indent=1, sort_keys=True) + "\n")
        for name in _extension_names():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(scratch / name, dest / name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def clean(root: Path | None = None) -> None:
    """Remove the compiled extensions and the stamp (from ``root``: a package build's tree,
    where an earlier build may have left them)."""
    base = ROOT if root is None else root
    for path in _extensions(base):
        path.unlink(missing_ok=True)
    (base / STAMP.relative_to(ROOT)).unlink(missing_ok=True)
    (base / _LEGACY[1]).unlink(missing_ok=True)


def main(argv: list[str]) -> int:
    command = argv[0] if len(argv) == 1 else ""
    if command == "build":
        try:
            build()
        except (RuntimeError, OSError) as exc:
            print(f"compile-proxy: {exc}", file=sys.stderr)
            return 1
        print("compiled: " + ", ".join(HOT_MODULES))
        return 0
    if command == "clean":
        clean()
        return 0
    if command == "status":
        for module, compiled in status().items():
            print(f"{module}: {'compiled' if compiled else 'pure Python'}")
        print(f"hot path: {describe()}")
        return 0
    print("usage: scripts/compile-proxy [build|clean|status]", file=sys.stderr)
    return 2
