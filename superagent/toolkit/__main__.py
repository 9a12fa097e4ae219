"""``python -m superagent.toolkit APP_DIR``: copy the toolkit into an app's source.

An app's environment rarely has superagent installed (it needs only this package, which
is the standard library alone), so an app carries a copy: this writes the toolkit's
modules to ``APP_DIR/superagent_toolkit/`` (created, or its modules brought up to date),
from where the app imports ``superagent_toolkit``. Nothing but ``.py`` files is copied,
and nothing else in the directory is touched.

Standard library only, Python 3.8 syntax: this package runs inside apps.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

PACKAGE = "superagent_toolkit"


def vendor(app_dir: Path) -> Path:
    """Copy the toolkit's modules into ``app_dir/superagent_toolkit``; that directory.
    Raises ``NotADirectoryError`` when ``app_dir`` is no directory."""
    if not app_dir.is_dir():
        raise NotADirectoryError(f"{app_dir}: not a directory")
    dest = app_dir / PACKAGE
    dest.mkdir(exist_ok=True)
    for module in sorted(Path(__file__).parent.glob("*.py")):
        if module.name != "__main__.py":
            shutil.copyfile(module, dest / module.name)
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m superagent.toolkit",
        description=f"Copy the app toolkit into APP_DIR/{PACKAGE}/ (import {PACKAGE}).")
    parser.add_argument("app_dir", metavar="APP_DIR", type=Path,
                        help="the app's source directory")
    args = parser.parse_args(argv)
    try:
        dest = vendor(args.app_dir)
    except OSError as exc:
        print(f"python -m superagent.toolkit: {exc}", file=sys.stderr)
        return 1
    print(f"copied the toolkit to {dest}: import {PACKAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
