"""The shared core imports no role package.

The coordinator, ``superagent pack`` and the CLI read apps through the core modules
directly under ``superagent/``; importing one of them must not load the proxy or the
participant (nor the core load the coordinator). Each import runs in a fresh interpreter,
so modules other tests loaded do not hide a stray import.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

ROLES = ("superagent.coordinator", "superagent.participant", "superagent.proxy")
CORE = ("superagent.manifest", "superagent.names", "superagent.httprules", "superagent.config",
        "superagent.errors", "superagent.pack", "superagent.compiled", "superagent.codec",
        "superagent.rpc.client", "superagent.rpc.server")
COORDINATOR = ("superagent.coordinator.state", "superagent.coordinator.api",
               "superagent.coordinator.service")


def loaded(module: str, prefixes: tuple[str, ...]) -> list[str]:
    """Modules under ``prefixes`` that importing ``module`` loads, in a fresh interpreter."""
    code = (f"import sys, {module}; print(' '.join(sorted(m for m in sys.modules "
            f"if m.startswith({prefixes!r}))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=60)
    return done.stdout.split()


@pytest.mark.parametrize("module", CORE)
def test_core_modules_import_no_role(module: str) -> None:
    """A core module loads none of the coordinator, participant or proxy packages."""
    assert loaded(module, ROLES) == []


@pytest.mark.parametrize("module", COORDINATOR)
def test_the_coordinator_loads_neither_proxy_nor_participant(module: str) -> None:
    """The control plane reads the app model from the core, not from the other roles."""
    assert loaded(module, ("superagent.participant", "superagent.proxy")) == []
