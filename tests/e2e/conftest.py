"""Skip reasons survive pytest-trio.

pytest-trio runs a test inside nurseries, so a ``pytest.skip(reason)`` reaches it wrapped in
an exception group; it then skips with a fresh, empty ``pytest.skip()`` (pytest-trio 0.8),
and the report says only "Skipped". This hook puts the reason of the original skip (the
group's one leaf, found in the new skip's ``__context__``) back into the report.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest
from _pytest.outcomes import Skipped


def _original_reason(exc: BaseException | None) -> str | None:
    while exc is not None:
        if isinstance(exc, BaseExceptionGroup):
            skips = exc.subgroup(lambda e: isinstance(e, Skipped))
            leaves: list[BaseException] = []
            queue: list[BaseException] = [skips] if skips is not None else []
            while queue:
                ex = queue.pop()
                if isinstance(ex, BaseExceptionGroup):
                    queue.extend(ex.exceptions)
                else:
                    leaves.append(ex)
            if len(leaves) == 1 and isinstance(leaves[0], Skipped) and leaves[0].msg:
                return leaves[0].msg
        exc = exc.__context__
    return None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]
                              ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.skipped and call.excinfo is not None and isinstance(report.longrepr, tuple):
        reason = _original_reason(call.excinfo.value.__context__)
        if reason is not None:
            path, line, _ = item.location  # the test's, not pytest-trio's skip()
            report.longrepr = (path, (line or 0) + 1, f"Skipped: {reason}")
    return report
