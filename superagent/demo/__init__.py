"""The demo app bundled with superagent: ``superagent deploy $(demo dir)`` gives a running "hello".

``app/`` is plain app source, not a Python package: a stdlib-only HTTP server (``app.py``),
its own test (``test_app.py``, the manifest's ``[test]`` command) and ``superagent.toml``.
It is shipped as package data so an installed superagent can deploy it without a checkout.
"""

from __future__ import annotations

from pathlib import Path


def demo_app_dir() -> Path:
    """The directory of the bundled demo app's source (read-only: copy it before changing it)."""
    return Path(__file__).resolve().parent / "app"
