"""The toolkit's JSON lines: shape, values JSON cannot say, bounds, whole lines under
threads, the logging handler, and the toolkit as a stdlib-only, copyable leaf."""

from __future__ import annotations

import ast
import io
import json
import logging
import logging.handlers
import queue
import shutil
import subprocess
import sys
import threading
import tomllib
from pathlib import Path
from typing import Any

import pytest

import superagent
from superagent import toolkit
from superagent.debug import Origin, make_line
from superagent.toolkit import lines

TOOLKIT = Path(toolkit.__file__).parent
ROOT = Path(superagent.__file__).parent


def parse(line: str) -> dict[str, Any]:
    doc = json.loads(line)
    assert isinstance(doc, dict)
    return doc


def test_shape_and_order() -> None:
    line = lines.encode("cache.miss", {"key": "k1", "n": 3}, level="DEBUG", request_id="r-1",
                        ts=1733480000.1234567)
    assert "\n" not in line
    assert list(parse(line).items()) == [("ts", 1733480000.123457), ("level", "debug"),
                                         ("event", "cache.miss"), ("request_id", "r-1"),
                                         ("key", "k1"), ("n", 3)]


def test_the_participant_files_a_line_under_its_request_id() -> None:
    """What ``emit`` writes is what superagent.debug parses: fields, level, request id."""
    line = lines.encode("order.lookup", {"order": 42}, level="warning", request_id="abc.1")
    parsed = make_line(line.encode(), cut=False, ts=1.0, seq=1, stream="stdout",
                       origin=Origin(app="a", release="r1", instance="a-1"))
    assert (parsed.request_id, parsed.level) == ("abc.1", "warning")
    assert parsed.fields is not None and parsed.fields["order"] == 42


def test_envelope_names_in_fields_do_not_override_it() -> None:
    doc = parse(lines.encode("e", {"ts": 1, "event": "x", "truncated": 2}, request_id=None))
    assert doc["event"] == "e" and doc["ts"] != 1
    assert (doc["ts_"], doc["event_"], doc["truncated_"]) == (1, "x", 2)
    assert doc["request_id"] is None


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no")


def test_values_json_cannot_say_become_text() -> None:
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    doc = parse(lines.encode("e", {
        "obj": Path("/x"), "nan": float("nan"), "inf": float("-inf"), "bytes": b"ab",
        "set": {1}, "tuple": (1, "a"), "keys": {1: "one", None: 2}, "bad": Unprintable(),
        "cycle": cyclic, "ok": [True, None, 1.5]}))
    assert doc["obj"] == "/x"
    assert (doc["nan"], doc["inf"]) == ("nan", "-inf")
    assert doc["bytes"] == "b'ab'"
    assert (doc["set"], doc["tuple"]) == ([1], [1, "a"])
    assert doc["keys"] == {"1": "one", "None": 2}
    assert doc["bad"] == "<Unprintable>"
    depth, value = 0, doc["cycle"]
    while isinstance(value, list):
        depth, value = depth + 1, value[0]
    assert (depth, value) == (lines.MAX_DEPTH, lines.ELLIPSIS)
    assert doc["ok"] == [True, None, 1.5]


def test_strings_and_containers_are_bounded() -> None:
    doc = parse(lines.encode("e", {"s": "x" * 10_000, "l": list(range(250)),
                                   "d": {str(i): i for i in range(150)}}))
    assert doc["s"] == "x" * lines.MAX_STRING + lines.ELLIPSIS
    assert doc["l"][-1] == "+150 more" and len(doc["l"]) == lines.MAX_ITEMS + 1
    assert doc["d"][lines.ELLIPSIS] == "+50 more" and len(doc["d"]) == lines.MAX_ITEMS + 1


def test_a_line_too_long_keeps_the_fields_that_fit() -> None:
    fields = {f"f{i}": "é" * 3000 for i in range(10)}  # 2 bytes a character in UTF-8
    line = lines.encode("big", fields, request_id="r")
    assert len(line.encode()) <= lines.MAX_LINE
    doc = parse(line)
    assert doc["truncated"] is True and doc["event"] == "big" and doc["request_id"] == "r"
    kept = [key for key in doc if key.startswith("f")]
    assert kept == [f"f{i}" for i in range(len(kept))] and 1 <= len(kept) < 10
    assert all(doc[key] == fields[key] for key in kept)


def test_emit_binds_the_current_request_id(capsys: pytest.CaptureFixture[str]) -> None:
    toolkit.emit("outside")
    with toolkit.bound("req-7"):
        toolkit.emit("inside", level="error", n=1)
        toolkit.emit("chosen", request_id="other")
    toolkit.emit("after")
    docs = [parse(line) for line in capsys.readouterr().out.splitlines()]
    assert [(d["event"], d["request_id"], d["level"]) for d in docs] == [
        ("outside", None, "info"), ("inside", "req-7", "error"), ("chosen", "other", "info"),
        ("after", None, "info")]


def test_write_line_to_text_only_and_broken_streams() -> None:
    text = io.StringIO()
    lines.write_line('{"a":1}', text)
    assert text.getvalue() == '{"a":1}\n'
    closed = io.TextIOWrapper(io.BytesIO())
    closed.close()
    lines.write_line('{"a":1}', closed)  # ignored: a debug line never fails its request


def test_lines_from_many_threads_stay_whole(tmp_path: Path) -> None:
    """Threads emitting at once, each in its own request: every line is whole and
    carries its own thread's id; text written before a line comes before it."""
    path = tmp_path / "out.log"
    with open(path, "w") as stream:
        barrier = threading.Barrier(8)

        def work(i: int) -> None:
            barrier.wait(timeout=10)
            with toolkit.bound(f"t{i}"):
                for n in range(200):
                    lines.write_line(lines.encode("tick", {"i": i, "n": n, "pad": "x" * 3000},
                                                  request_id=toolkit.current_request_id()),
                                     stream)

        stream.write("plain text first\n")
        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    text_lines = path.read_text().splitlines()
    assert text_lines[0] == "plain text first"
    docs = [parse(line) for line in text_lines[1:]]
    assert len(docs) == 8 * 200
    assert all(d["request_id"] == f"t{d['i']}" for d in docs)
    for i in range(8):
        assert [d["n"] for d in docs if d["i"] == i] == list(range(200))


def test_logging_handler_writes_lines_with_the_request_id() -> None:
    out = io.StringIO()
    logger = logging.getLogger("tests.toolkit.handler")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    handler = toolkit.JsonHandler(out)
    logger.addHandler(handler)
    try:
        with toolkit.bound("req-9"):
            logger.info("hello %s", "world", extra={"user": 7, "thing": object})
            try:
                raise ValueError("bad")
            except ValueError:
                logger.exception("failed")
        logger.warning("later", extra={"request_id": "given"})
        logger.debug("no request")
    finally:
        logger.removeHandler(handler)
    docs = [parse(line) for line in out.getvalue().splitlines()]
    assert [(d["event"], d["level"], d["request_id"]) for d in docs] == [
        ("hello world", "info", "req-9"), ("failed", "error", "req-9"),
        ("later", "warning", "given"), ("no request", "debug", None)]
    assert docs[0]["logger"] == "tests.toolkit.handler"
    assert (docs[0]["user"], docs[0]["thing"]) == (7, "<class 'object'>")
    assert "ValueError: bad" in docs[1]["exc"]


def test_a_queue_handler_keeps_the_id_of_the_thread_that_logged() -> None:
    """The listener formats in its own thread: the filter stamped the id beforehand."""
    out = io.StringIO()
    records: queue.Queue[logging.LogRecord] = queue.Queue()
    producer = logging.handlers.QueueHandler(records)
    producer.addFilter(toolkit.RequestIdFilter())
    listener = logging.handlers.QueueListener(records, toolkit.JsonHandler(out))
    logger = logging.getLogger("tests.toolkit.queue")
    logger.propagate = False
    logger.addHandler(producer)
    listener.start()
    try:
        with toolkit.bound("req-q"):
            logger.warning("queued")
    finally:
        listener.stop()
        logger.removeHandler(producer)
    assert parse(out.getvalue())["request_id"] == "req-q"


def test_request_ids_from_headers() -> None:
    from superagent.toolkit.context import request_id_from

    assert request_id_from("abc-1.2:3@x/y+z=") == "abc-1.2:3@x/y+z="
    assert request_id_from(b" kept ") == "kept"
    for bad in (None, "", "two words", "x" * 201, 'quote"', "é"):
        fresh = request_id_from(bad)
        assert fresh != bad and toolkit.well_formed(fresh) and len(fresh) == 20


# --- the toolkit as a leaf -------------------------------------------------------------------


def test_python_3_8_syntax() -> None:
    for path in TOOLKIT.glob("*.py"):
        ast.parse(path.read_text(), filename=str(path), feature_version=(3, 8))


def test_imports_only_the_standard_library() -> None:
    """In a fresh interpreter: nothing outside the stdlib, and of superagent only the
    package's own ``__init__`` (and what it loads)."""
    code = ("import sys; before = set(sys.modules); import superagent.toolkit; "
            "print(' '.join(sorted({m.split('.')[0] for m in set(sys.modules) - before}))); "
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('superagent'))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=60)
    tops, ours = done.stdout.splitlines()
    assert set(tops.split()) - set(sys.stdlib_module_names) - {"superagent"} == set()
    assert {m for m in ours.split() if not m.startswith("superagent.toolkit")} == {
        "superagent", "superagent.compiled"}


def test_a_copy_works_as_a_package_of_its_own(tmp_path: Path) -> None:
    """An app without superagent installed copies the directory in and imports it."""
    shutil.copytree(TOOLKIT, tmp_path / "superagent_toolkit",
                    ignore=shutil.ignore_patterns("__pycache__"))
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import superagent_toolkit as t; "
            "t.emit('copied', n=1); assert 'superagent' not in sys.modules")
    done = subprocess.run([sys.executable, "-I", "-c", code, str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert parse(done.stdout)["event"] == "copied"


def test_the_import_contract_forbids_every_other_module() -> None:
    """The leaf contract in pyproject.toml names every sibling of the toolkit, so a new
    module of superagent cannot be imported by it unnoticed."""
    doc = tomllib.loads((ROOT.parent / "pyproject.toml").read_text())
    contract = next(c for c in doc["tool"]["importlinter"]["contracts"]
                    if c["source_modules"] == ["superagent.toolkit"])
    siblings = {f"superagent.{p.stem if p.suffix == '.py' else p.name}" for p in ROOT.iterdir()
                if (p.suffix == ".py" and p.stem != "__init__" and p.stem != "__main__")
                or (p.is_dir() and (p / "__init__.py").exists())}
    assert set(contract["forbidden_modules"]) == siblings - {"superagent.toolkit"}


def test_vendor_copies_the_modules_into_an_app(tmp_path: Path) -> None:
    app = tmp_path / "app"
    app.mkdir()
    (app / "superagent_toolkit").mkdir()
    (app / "superagent_toolkit" / "lines.py").write_text("stale")
    done = subprocess.run([sys.executable, "-m", "superagent.toolkit", str(app)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    copied = {p.name for p in (app / "superagent_toolkit").iterdir()}
    assert copied == {p.name for p in TOOLKIT.glob("*.py")} - {"__main__.py"}
    assert (app / "superagent_toolkit" / "lines.py").read_text() == (
        TOOLKIT / "lines.py").read_text()
    code = "import sys; sys.path.insert(0, sys.argv[1]); import superagent_toolkit"
    subprocess.run([sys.executable, "-I", "-c", code, str(app)], check=True, timeout=60)


def test_vendor_refuses_a_missing_directory(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "superagent.toolkit", str(tmp_path / "no")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    message = f"python -m superagent.toolkit: {tmp_path / 'no'}: not a directory"
    assert done.stderr.strip() == message
    assert "Traceback" not in done.stderr
