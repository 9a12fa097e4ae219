"""docs/toolkit.md stays true to both toolkits: its examples parse (the plain logging one
runs and writes what it says), and its limits are the constants of the code."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

from superagent.debug import Origin, make_line
from superagent.participant.logfiles import MAX_LINE as PARTICIPANT_MAX_LINE
from superagent.toolkit import lines

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "toolkit.md").read_text()
NODE = (ROOT / "toolkit" / "node" / "superagent.js").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC, re.S)


def test_python_examples_parse_and_the_logging_one_runs() -> None:
    examples = blocks("python")
    assert len(examples) == 3
    for example in examples:
        ast.parse(example, feature_version=(3, 8))
    done = subprocess.run([sys.executable, "-c", examples[2]], capture_output=True,
                          text=True, timeout=60, check=True)
    doc = json.loads(done.stdout)
    # the output the example shows in its closing comment, but for the time
    comment = "".join(line.lstrip("# ") for line in examples[2].splitlines()
                      if line.startswith("# {") or line.startswith("#  "))
    expected = json.loads(comment.replace('"ts":...,', ""))
    assert {k: v for k, v in doc.items() if k != "ts"} == expected


def test_limits_are_the_codes() -> None:
    assert PARTICIPANT_MAX_LINE == 65_536 and "65,536 bytes" in DOC
    assert lines.MAX_LINE == 16_384 and "16,384 bytes" in DOC
    assert lines.MAX_STRING == 4096 and "4,096 characters" in DOC
    assert lines.MAX_ITEMS == 100 and "100\n  items" in DOC
    assert lines.MAX_DEPTH == 8 and "nesting to 8 levels" in DOC
    for name, value in (("MAX_LINE", "16 * 1024"), ("MAX_STRING", "4096"),
                        ("MAX_ITEMS", "100"), ("MAX_DEPTH", "8")):
        assert f"const {name} = {value};" in NODE


def test_the_shell_example_is_a_line_the_participant_files() -> None:
    (example,) = blocks("sh")
    done = subprocess.run(["sh", "-c", example], capture_output=True, text=True, timeout=30,
                          env={"REQUEST_ID": "sh-1", "PATH": "/usr/bin:/bin"}, check=True)
    line = make_line(done.stdout.rstrip("\n").encode(), cut=False, ts=0.0, seq=1,
                     stream="stdout", origin=Origin(app="a", release="r", instance="i"))
    assert line.request_id == "sh-1" and line.fields is not None
    assert line.fields["rows"] == 1200
