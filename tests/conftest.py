"""Suite-wide pytest hooks: failing tests show the tails of their processes' logs."""

from tests.support.logs import pytest_runtest_makereport  # noqa: F401
