"""Fixtures shared by the participant's tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def data_dir(world_dir: Path) -> Path:
    """An agent's data directory, which app users must traverse (``world_dir``)."""
    return world_dir
