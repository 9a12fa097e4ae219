"""The Node toolkit (toolkit/node/) in a real express app, as CommonJS and as an ES module,
and packed for npm.

express is installed from the npm registry into a directory shared by this module's tests
(``npm install --prefer-offline``: from npm's cache when it has it); the test skips when
the registry cannot be reached, as tests/e2e/test_real_apps.py does, and when node or npm
is not installed. The toolkit itself needs nothing: the ES-module and ``npm pack`` tests
run without express.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from superagent.participant.toolchain import SYSTEM_PATH
from tests.support.procs import REPO
from tests.toolkit.servers import Served, check_together, served

NODE_DIR = REPO / "toolkit" / "node"
PATH = os.environ.get("PATH") or SYSTEM_PATH
NODE, NPM = shutil.which("node", path=PATH), shutil.which("npm", path=PATH)
NETWORK_ERRORS = ("ENOTFOUND", "EAI_AGAIN", "ECONNREFUSED", "ETIMEDOUT", "ECONNRESET",
                  "ENETUNREACH", "ENOTCACHED")
INSTALL_TIMEOUT = 300.0

pytestmark = pytest.mark.skipif(not (NODE and NPM), reason="node and npm are not installed")

EXPRESS_APP = '''\
const express = require("express");
const { middleware, emit, currentRequestId } = require(process.env.TOOLKIT);

const together = Number(process.env.TOGETHER);
let arrived = 0;
const waiting = [];

const app = express();
app.use(middleware());
app.get("/healthz", (req, res) => res.send("ok"));
app.get("/hello", (req, res) => {
  const who = req.query.who;
  emit("hello", { who, big: 10n, err: new Error("boom") });
  setImmediate(() => {
    emit("later", { who, level: "debug" });
    res.json({ who, request_id: currentRequestId(), req: req.requestId });
  });
});
app.get("/together", async (req, res) => {
  const who = req.query.who;
  emit("arrived", { who });
  arrived += 1;
  // resolved by whichever request arrives last: the await still resumes in this one's context
  await new Promise((resolve) => {
    waiting.push(resolve);
    if (arrived === together) waiting.forEach((f) => f());
  });
  await new Promise((resolve) => setTimeout(resolve, 0));
  emit("leaving", { who });
  res.json({ who, request_id: currentRequestId() });
});
app.get("/own", (req, res) => {
  res.set("X-Request-Id", "app-chosen");
  res.send("own");
});
app.listen(Number(process.env.PORT), "127.0.0.1");
'''


@pytest.fixture(scope="module")
def express_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with express installed in node_modules."""
    assert NPM is not None
    root = tmp_path_factory.mktemp("express")
    (root / "package.json").write_text(json.dumps({"name": "toolkit-test", "version": "1.0.0",
                                                   "private": True}))
    done = subprocess.run([NPM, "install", "express@4", "--prefer-offline", "--no-audit",
                           "--no-fund"], cwd=root, capture_output=True, text=True,
                          timeout=INSTALL_TIMEOUT)
    if done.returncode != 0:
        found = [marker for marker in NETWORK_ERRORS if marker in done.stderr]
        if found:
            pytest.skip(f"npm registry unreachable: installing express failed with {found[0]}")
        raise AssertionError(f"npm install express failed:\n{done.stderr[-3000:]}")
    return root


@pytest.fixture
def express_app(express_dir: Path, tmp_path: Path) -> Iterator[Served]:
    assert NODE is not None
    script = express_dir / "server.js"
    script.write_text(EXPRESS_APP)
    with served("express-app", tmp_path / "express.log", [NODE, str(script)],
                env={"TOOLKIT": str(NODE_DIR / "superagent.js")}) as app:
        yield app


@pytest.mark.slow
def test_express_middleware_and_emit(express_app: Served) -> None:
    with_id = express_app.get("/hello?who=given", "client-id.1")
    assert with_id.headers["x-request-id"] == "client-id.1"
    without = express_app.get("/hello?who=fresh")
    fresh = without.headers["x-request-id"]
    malformed = express_app.get("/hello?who=malformed", "not ok")
    replaced = malformed.headers["x-request-id"]
    assert len({fresh, replaced, "client-id.1", "not ok"}) == 4
    ids = {"given": "client-id.1", "fresh": fresh, "malformed": replaced}
    for who, response in (("given", with_id), ("fresh", without), ("malformed", malformed)):
        assert response.json() == {"who": who, "request_id": ids[who], "req": ids[who]}

    def both(events: list[dict[str, Any]]) -> bool:
        return all(sum(1 for e in events if e.get("who") == who) == 2 for who in ids)

    events = express_app.wait_events(both, "the hello and later lines of three requests")
    for who, request_id in ids.items():
        mine = [e for e in events if e.get("who") == who]
        assert [(e["event"], e["level"], e["request_id"]) for e in mine] == [
            ("hello", "info", request_id), ("later", "debug", request_id)]
        assert mine[0]["big"] == "10" and mine[0]["err"]["message"] == "boom"
        assert isinstance(mine[0]["ts"], float | int)

    check_together(express_app, express_app.together())
    own = express_app.get("/own", "sent-id")
    assert own.headers.get_list("x-request-id") == ["app-chosen"]


def node(*args: str, cwd: Path = NODE_DIR) -> str:
    assert NODE is not None
    done = subprocess.run([NODE, *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_es_module_and_commonjs_are_one_toolkit(tmp_path: Path) -> None:
    """``import`` (the package's ESM entry, by name through node_modules) and ``require``
    give the same functions; the id set by withRequestId survives an await."""
    package = tmp_path / "node_modules" / "superagent-toolkit"
    shutil.copytree(NODE_DIR, package)
    (tmp_path / "main.mjs").write_text(
        'import { emit, withRequestId, middleware } from "superagent-toolkit";\n'
        'import toolkit from "superagent-toolkit";\n'
        'import { createRequire } from "module";\n'
        'const cjs = createRequire(import.meta.url)("superagent-toolkit");\n'
        'emit("esm", { same: cjs.emit === emit && toolkit.middleware === middleware });\n'
        'await withRequestId("esm-1", async () => { await null; emit("awaited", {}); });\n')
    docs = [json.loads(line) for line in node("main.mjs", cwd=tmp_path).splitlines()]
    assert [(d["event"], d["request_id"]) for d in docs] == [("esm", None), ("awaited", "esm-1")]
    assert docs[0]["same"] is True


def test_encode_bounds_and_never_throws() -> None:
    out = node("-e", '''
const t = require("./superagent.js");
const cyc = {}; cyc.self = cyc;
const big = {}; for (let i = 0; i < 10; i++) big["f" + i] = "\u00e9".repeat(3000);
console.log(t.encode("e", { cyc, ts: 1, nan: NaN, sym: Symbol("s"), u: undefined,
  list: Array.from({ length: 150 }, (_, i) => i), s: "x".repeat(5000),
  bad: { toString() { throw new Error("no"); } }, when: new Date(0) }));
console.log(t.encode("big", big, { requestId: "r" }));
''')
    first, second = (json.loads(line) for line in out.splitlines())
    assert first["cyc"] == {"self": "[Circular]"} and first["ts_"] == 1
    assert (first["nan"], first["sym"], first["u"]) == ("NaN", "Symbol(s)", None)
    assert len(first["list"]) == 101 and first["list"][-1] == "+50 more"
    assert first["s"] == "x" * 4096 + "\u2026"
    assert first["bad"] == {"toString": "toString() { throw new Error(\"no\"); }"}
    assert first["when"] == "1970-01-01T00:00:00.000Z"
    assert second["truncated"] is True and second["request_id"] == "r"
    assert len(json.dumps(second, ensure_ascii=False, separators=(",", ":")).encode()) <= 16384


def test_npm_pack_works_offline(tmp_path: Path) -> None:
    assert NPM is not None
    done = subprocess.run([NPM, "pack", "--offline", "--pack-destination", str(tmp_path)],
                          cwd=NODE_DIR, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    tarball = tmp_path / "superagent-toolkit-0.1.0.tgz"
    with tarfile.open(tarball) as packed:
        names = set(packed.getnames())
    assert names == {"package/package.json", "package/superagent.js",
                     "package/superagent.mjs", "package/README.md"}
