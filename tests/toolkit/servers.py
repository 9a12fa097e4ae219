"""Real app servers for the toolkit's tests: started as processes, their output read back.

``Served`` runs one app process (``tests.support.procs.LoggedProcess``: stdout and stderr
appended to one log file, shown when a test fails) on a free loopback port given as
``PORT``, waits until ``probe_path`` answers, and reads back the JSON lines the app wrote
(``events()``: every line of the log that is a JSON object with an ``event``). ``together``
sends ``n`` requests at once, each with its own ``who`` and half of them with an
``X-Request-Id`` of their own, so the apps' ``/together`` handlers can hold every request
until all have arrived: their lines interleave by construction, not by timing.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from tests.support.ports import free_port
from tests.support.procs import LoggedProcess
from tests.support.wait import wait_until

START_DEADLINE = 60.0  # an interpreter or node starting on a busy 2-core machine
REQUEST_TIMEOUT = 30.0
TOGETHER = 8  # concurrent requests held until all have arrived


class Served:
    def __init__(self, base: str, log_path: Path) -> None:
        self.base = base
        self.log_path = log_path

    def get(self, path: str, request_id: str | None = None) -> httpx.Response:
        headers = {"X-Request-Id": request_id} if request_id else {}
        response = httpx.get(self.base + path, headers=headers, timeout=REQUEST_TIMEOUT)
        assert response.status_code == 200, (path, response.status_code, response.text[:500])
        return response

    def events(self) -> list[dict[str, Any]]:
        found = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                doc = json.loads(line)
                if isinstance(doc, dict) and "event" in doc:
                    found.append(doc)
        return found

    def wait_events(self, wanted: Any, what: str) -> list[dict[str, Any]]:
        """The events once ``wanted(events)`` holds (output is flushed, but read after)."""
        return wait_until(self.events, what, until=wanted)

    def together(self, n: int = TOGETHER) -> list[tuple[str, str | None, httpx.Response]]:
        """``n`` requests to ``/together`` at once: (who, id sent, response) each."""
        def one(i: int) -> tuple[str, str | None, httpx.Response]:
            sent = f"together-{i}" if i % 2 == 0 else None
            return (f"w{i}", sent, self.get(f"/together?who=w{i}", sent))

        with ThreadPoolExecutor(n) as pool:
            return list(pool.map(one, range(n)))


@contextlib.contextmanager
def served(label: str, log_path: Path, argv: Sequence[str], *,
           env: Mapping[str, str] | None = None, probe_path: str = "/healthz"
           ) -> Iterator[Served]:
    port = free_port()
    proc = LoggedProcess(label, log_path)
    proc.start(argv, env={**os.environ, **(env or {}), "PORT": str(port),
                          "TOGETHER": str(TOGETHER)})
    try:
        base = f"http://127.0.0.1:{port}"

        def up() -> bool:
            assert proc.alive(), f"{label} exited: {proc.tail()}"
            return httpx.get(base + probe_path, timeout=2.0).status_code == 200

        wait_until(up, f"{label} to answer", timeout=START_DEADLINE)
        yield Served(base, log_path)
    finally:
        if proc.alive():
            proc.stop()
        proc.close()


def check_together(served: Served, results: list[tuple[str, str | None, httpx.Response]]
                   ) -> None:
    """Every concurrent request's response, echoed header and lines name its own id:
    the sent one when it sent one, else one id shared by nothing else."""
    ids = {}
    for who, sent, response in results:
        echoed = response.headers["x-request-id"]
        assert response.json() == {"who": who, "request_id": echoed}, response.text
        if sent is not None:
            assert echoed == sent
        ids[who] = echoed
    assert len(set(ids.values())) == len(ids), ids

    def complete(events: list[dict[str, Any]]) -> bool:
        return all(sum(1 for e in events if e.get("who") == who) >= 2 for who in ids)

    events = served.wait_events(complete, "the arrived and leaving lines of every request")
    mine = [e for e in events if e["event"] in ("arrived", "leaving")]
    for event in mine:
        assert event["request_id"] == ids[event["who"]], event
    # held until all arrived: every arrival was written before any departure
    order = [e["event"] for e in mine]
    assert order == ["arrived"] * len(ids) + ["leaving"] * len(ids), order
