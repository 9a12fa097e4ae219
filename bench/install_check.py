#!/usr/bin/env python3
"""Check that ``pip install`` of the package gets the compiled proxy hot path.

    bench/install_check.py                 # one fresh venv, ``pip install <copy>``: compiled
    bench/install_check.py --with-fallback # also a build whose C compiler fails: pure, and says why
    bench/install_check.py --keep-tmp      # keep the temp dir (venvs, logs)

Theory of operation: the working tree's tracked and untracked-but-not-ignored files are
copied to a temp dir (so the build's ``build/`` and ``*.egg-info`` never land in the
checkout, and extensions compiled there by scripts/compile-proxy are not picked up),
a fresh venv is made with the ``python3`` running this script, and the copy is
installed non-editable with pip's default build isolation, exactly as a user would
(``pip install .``). Then, from that venv: ``superagent version`` must say
``compiled (mypyc, built at install)``, and importing the hot modules must load their
extensions (``superagent.compiled.status``). With ``--with-fallback`` a second venv is
built with ``CC=false``: the install must still succeed, pure Python, and ``version``
must say the compile failed. It takes minutes (mypyc compiles the hot path, about a
minute on 2 cores), so it is a bench, not a test. Prints the figures as JSON on stdout;
exit status 1 when a check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def copy_tree(dest: Path) -> None:
    """The files git would see (tracked plus untracked, minus ignored) copied to ``dest``."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], cwd=REPO, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def install(tmp: Path, name: str, source: Path, env: dict[str, str]) -> tuple[Path, float]:
    """A fresh venv with ``source`` installed by pip; returns its bin dir and the seconds
    the ``pip install`` took. Raises CalledProcessError (pip's output in the log file)."""
    venv = tmp / name
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    log = tmp / f"{name}-pip.log"
    start = time.monotonic()
    with open(log, "wb") as out:
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--no-cache-dir",
                        "--disable-pip-version-check", str(source)],
                       check=True, stdout=out, stderr=subprocess.STDOUT,
                       env={**os.environ, **env}, cwd=tmp)
    return venv / "bin", time.monotonic() - start


def version(bin_dir: Path) -> dict[str, str]:
    done = subprocess.run([str(bin_dir / "superagent"), "--json", "version"], check=True,
                          capture_output=True, text=True, cwd="/")
    return dict(json.loads(done.stdout))


def modules_compiled(bin_dir: Path) -> bool:
    """Whether every hot module imports as an extension in that venv."""
    done = subprocess.run([str(bin_dir / "python"), "-c",
                           "import sys; from superagent.compiled import status; "
                           "sys.exit(0 if all(status().values()) else 1)"], cwd="/")
    return done.returncode == 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--with-fallback", action="store_true",
                        help="also check that a failing C compiler gives a pure install")
    parser.add_argument("--keep-tmp", action="store_true")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="superagent-install-"))
    results: dict[str, object] = {}
    failures: list[str] = []
    try:
        source = tmp / "src"  # one copy per install: an in-tree build leaves build/ behind
        copy_tree(source)
        bin_dir, seconds = install(tmp, "compiled", source, {})
        got = version(bin_dir)
        results["compiled_install_seconds"] = round(seconds, 1)
        results["compiled_version"] = got
        if got.get("proxy_hot_path") != "compiled" or "install" not in got.get("reason", ""):
            failures.append(f"pip install: expected the compiled hot path, got {got}")
        if not modules_compiled(bin_dir):
            failures.append("pip install: the hot modules did not import as extensions")
        if args.with_fallback:
            source = tmp / "src-fallback"
            copy_tree(source)
            bin_dir, seconds = install(tmp, "fallback", source, {"CC": "false"})
            got = version(bin_dir)
            results["fallback_install_seconds"] = round(seconds, 1)
            results["fallback_version"] = got
            if got.get("proxy_hot_path") != "pure" or "compile failed" not in got.get(
                    "reason", ""):
                failures.append(f"CC=false: expected pure Python saying why, got {got}")
    except subprocess.CalledProcessError as exc:
        failures.append(f"{exc.cmd[:4]} failed (exit {exc.returncode}); logs in {tmp}")
        args.keep_tmp = True
    finally:
        if failures:
            args.keep_tmp = True
        if args.keep_tmp:
            print(f"install_check: temp dir kept: {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    results["failures"] = failures
    print(json.dumps(results, indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
