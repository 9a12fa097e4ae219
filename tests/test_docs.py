"""The documentation's examples stay true to the code."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from superagent.proxy.config import config_from_document

ROOT = Path(__file__).resolve().parent.parent


def test_proxy_config_example_validates() -> None:
    """The complete example in docs/proxy-config.md is a valid proxy config."""
    doc = (ROOT / "docs" / "proxy-config.md").read_text()
    block = re.search(r"```toml\n(.*?)```", doc, re.S)
    assert block is not None
    process, snapshot = config_from_document(tomllib.loads(block.group(1)),
                                             source="docs/proxy-config.md", version=1)
    assert process.parser == "httptools"
    assert {app.name for app in snapshot.apps} == {"hello", "billing"}
    assert [lst.port for lst in snapshot.listeners] == [8080, 8443, 9001]


def test_demo_config_validates() -> None:
    """examples/proxy.toml, used by scripts/proxy-demo, is a valid proxy config."""
    doc = tomllib.loads((ROOT / "examples" / "proxy.toml").read_text())
    _, snapshot = config_from_document(doc, source="examples/proxy.toml", version=1)
    assert snapshot.apps[0].prefix == "/hello"


def test_readme_opens_with_two_commands() -> None:
    """The README starts with exactly the run and the test command, and CI runs the latter."""
    readme = (ROOT / "README.md").read_text()
    first_block = re.search(r"```sh\n(.*?)```", readme, re.S)
    assert first_block is not None
    commands = [line.split("#")[0].strip() for line in first_block.group(1).splitlines()]
    assert commands == ["./scripts/up --demo", "./scripts/test"]
    assert "scripts/test" in (ROOT / ".ci" / "run").read_text()


def test_participant_manifest_example_validates() -> None:
    """The manifest example in docs/participant.md is a valid superagent.toml."""
    from superagent.manifest import parse_manifest

    doc = (ROOT / "docs" / "participant.md").read_text()
    block = re.search(r"```toml\n(.*?)```", doc, re.S)
    assert block is not None
    spec = parse_manifest(tomllib.loads(block.group(1)), source="docs/participant.md")
    assert spec.name == "hello" and spec.limits.memory == 256 * 1024 * 1024
