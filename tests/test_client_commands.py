"""The operator's listing commands: each GETs its path (arguments filled in) and prints
the answer through its table, or as it is with ``--json``. In process, with the API
client's ``get`` replaced: what is checked is the command line to request mapping."""

from __future__ import annotations

import json
from typing import Any

import pytest

from superagent import cli
from superagent.client import Client

EMPTY: dict[str, Any] = {
    "leader": "c1", "term": 2, "commit_index": 9, "healthy": True, "members": [],
    "nodes": [], "apps": [], "audit": [], "app": "web", "releases": [], "tokens": [],
    "teams": [],
}


@pytest.mark.parametrize(("argv", "path", "shown"), [
    (["cluster"], "/api/v1/cluster", "leader c1  term 2"),
    (["cluster", "list"], "/api/v1/cluster", "leader c1  term 2"),
    (["nodes"], "/api/v1/nodes", "no participants registered"),
    (["apps"], "/api/v1/apps", "no apps"),
    (["audit", "--limit", "7"], "/api/v1/audit?limit=7", "no audit entries"),
    (["releases", "web"], "/api/v1/apps/web/releases", "web: no releases"),
    (["tokens"], "/api/v1/tokens", "NAME  ROLE  TEAMS"),
    (["tokens", "list"], "/api/v1/tokens", "NAME  ROLE  TEAMS"),
    (["teams"], "/api/v1/teams", "no teams"),
    (["teams", "list"], "/api/v1/teams", "no teams"),
])
def test_a_listing_command_gets_its_path(argv: list[str], path: str, shown: str,
                                         monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    asked: list[str] = []

    def get(self: Client, wanted: str, **_: Any) -> dict[str, Any]:
        asked.append(wanted)
        return EMPTY

    monkeypatch.setattr(Client, "get", get)
    assert cli.main([*argv, "--token", "t", "--server", "http://127.0.0.1:9"]) == 0
    assert asked == [path]
    assert shown in capsys.readouterr().out
    assert cli.main([*argv, "--token", "t", "--server", "http://127.0.0.1:9", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == EMPTY
