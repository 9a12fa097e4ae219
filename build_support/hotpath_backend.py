"""The package's build backend: setuptools, plus mypyc's needs for a wheel only.

``setup.py`` compiles the proxy's hot path with mypyc when the package is built as a
wheel (``pip install .``), which needs mypy and the packages the hot path's types come
from in the build environment. An editable install (``pip install -e``) never compiles
(the checkout stays pure until scripts/compile-proxy), so it does not ask for them and
stays as quick as a plain setuptools build. Everything else is setuptools' own.
"""

from __future__ import annotations

from typing import Any

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403  (the PEP 517 hooks, re-exported)

# What mypyc needs to compile superagent/compiled.py's HOT_MODULES (their imports' types).
HOT_PATH_REQUIRES = ["mypy>=1.10", "trio>=0.25", "h11>=0.14", "httptools>=0.6"]


def get_requires_for_build_wheel(config_settings: dict[str, Any] | None = None) -> list[str]:
    return [*_setuptools.get_requires_for_build_wheel(config_settings), *HOT_PATH_REQUIRES]
