"""The dashboard in a real browser: Debian's chromium driven by Playwright (never a
downloaded browser), against a real embedded cluster (``tests/e2e/embedded.py``) running
the demo app.

One test walks what an operator does, each step waiting for what the page shows under
a deadline: a wrong token is refused with a clear message, the right one logs in, the
overview shows the demo app; a release deployed from the CLI appears on the app page and
its timeline advances live (server-sent events) to ``succeeded``; the rollback button
(after its confirmation) brings the earlier release back; the page scales the app; a line
the app writes appears in the live logs; a debug session shows a request whose trace
opens; a machine is drained and put online again; the audit log filters. A viewer's
session shows no write control, the pages fit a narrow screen, the keyboard reaches the
navigation, and logout ends the session. Every response the pages get is recorded: none
may be a 4xx or 5xx but the wrong login's 401.

``SUPERAGENT_UI_SCREENSHOTS=docs/screenshots`` saves a screenshot of each page there (the
ones in docs/ are made so).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

import superagent.demo
from tests.e2e.embedded import running_cluster

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WAIT = 30_000  # ms: what a page shows after an action, on a busy 2-core machine
DEPLOY_WAIT = 90_000  # ms: a deploy to its end
GATE_TIMEOUT = 60.0  # s: a gated test stage fails when the gate is not opened within this

try:
    from playwright.sync_api import Page, expect, sync_playwright
except ImportError:  # pragma: no cover - the test extras install it
    sync_playwright = None

pytestmark = pytest.mark.skipif(
    sync_playwright is None or not CHROMIUM.exists(),
    reason="needs the playwright package and Debian's chromium (/usr/bin/chromium;"
           " scripts/test installs both)")


@dataclass(frozen=True, kw_only=True)
class Target:
    url: str
    token: str
    viewer: str
    proxy: str
    node: str
    src: Path
    shots: Path | None


def demo_release(dest: Path, greeting: str, *, gate: Path | None = None) -> Path:
    """The demo app, with its own greeting (so new content) and, with a ``gate``, a test
    stage that passes only once the file ``gate`` exists (so the deploy is seen running
    for as long as the test wants, however slow the machine) and fails after
    ``GATE_TIMEOUT`` without it."""
    shutil.copytree(Path(superagent.demo.__file__).parent / "app", dest)
    manifest = (dest / "superagent.toml").read_text()
    manifest = manifest.replace('GREETING = "Hello from superagent"', f'GREETING = "{greeting}"')
    if gate is not None:
        (dest / "gated_test.py").write_text(
            "import os, sys, time\n"
            f"deadline = time.monotonic() + {GATE_TIMEOUT}\n"
            f"while not os.path.exists({str(gate)!r}):\n"
            "    if time.monotonic() > deadline:\n"
            "        sys.exit('the test never opened the gate')\n"
            "    time.sleep(0.05)  # polls the gate file, bounded by the deadline\n")
        manifest = manifest.replace('command = "python3 -m unittest -q test_app"',
                                    'command = "python3 gated_test.py"')
    (dest / "superagent.toml").write_text(manifest)
    return dest


def fetch(url: str) -> None:
    with urllib.request.urlopen(url, timeout=10) as answer:
        answer.read()


def shot(t: Target, page: Page, name: str, *, full: bool = True) -> None:
    if t.shots is not None:
        page.screenshot(path=str(t.shots / f"{name}.png"), full_page=full)


def login(page: Page, t: Target, token: str) -> None:
    page.goto(f"{t.url}/ui")
    page.fill("#token", token)
    page.click("form.login button[type=submit]")
    expect(page.locator("#logout")).to_be_visible(timeout=WAIT)


def drive(t: Target) -> None:
    """The browser's part, in a worker thread (the cluster runs on trio's thread)."""
    assert sync_playwright is not None
    refused: list[tuple[int, str]] = []
    streams: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 800})
            page = context.new_page()
            page.on("response", lambda r: refused.append((r.status, r.url))
                    if r.status >= 400 else None)
            page.on("request", lambda r: streams.append(r.url) if "/events" in r.url else None)

            # a wrong token: refused, said so, no session
            page.goto(f"{t.url}/ui")
            page.fill("#token", "sa_not-a-token-at-all-not-a-token-at-all")
            page.click("form.login button[type=submit]")
            expect(page.locator("#login-error")).to_contain_text("unknown or revoked token",
                                                                 timeout=WAIT)
            assert refused == [(401, f"{t.url}/ui/login")]
            login(page, t, t.token)
            expect(page.locator("#who")).to_contain_text("admin (admin)")
            apps = page.locator("table", has_text="serving")
            expect(apps).to_contain_text("hello", timeout=WAIT)
            expect(apps).to_contain_text("2 ready", timeout=WAIT)
            expect(apps.locator("a", has_text="/hello/")).to_have_count(1)
            expect(page.locator("main")).to_contain_text("healthy")
            # traffic: the figures come from two heartbeats' counters with requests between
            p50 = apps.locator("tbody tr").first.locator("td.num").nth(2)
            deadline = time.monotonic() + WAIT / 1000
            while "ms" not in p50.inner_text():
                assert time.monotonic() < deadline, "no latency figure on the overview"
                fetch(f"{t.proxy}/hello/")
                page.wait_for_timeout(100)  # a poll, not a wait for the page: it moves on
            expect(apps.locator("svg.spark")).to_have_count(1)
            shot(t, page, "overview")

            # the keyboard reaches the navigation
            for _ in range(8):
                page.keyboard.press("Tab")
                if page.evaluate("document.activeElement.textContent") == "Machines":
                    break
            page.keyboard.press("Enter")
            expect(page.locator("h1")).to_have_text("Machines", timeout=WAIT)

            # the app page; a line the app writes appears live
            page.goto(f"{t.url}/ui/#/apps/hello")
            expect(page.locator("#serving")).to_have_text("r1", timeout=WAIT)
            expect(page.locator("#log-state")).to_contain_text("following", timeout=WAIT)
            marker = uuid.uuid4().hex
            fetch(f"{t.proxy}/hello/?marker={marker}")
            expect(page.locator("#log-lines")).to_contain_text(marker, timeout=WAIT)

            # a release deployed from the CLI: its timeline advances live
            gate = t.src.parent / "open-the-test-gate"  # reachable by the app's user
            src2 = demo_release(t.src.parent / "hello-2", "Hello again", gate=gate)
            subprocess.run([sys.executable, "-m", "superagent", "deploy", str(src2),
                            "--server", t.url, "--no-follow"], check=True, timeout=60,
                           env={**os.environ, "SUPERAGENT_TOKEN": t.token},
                           stdout=subprocess.DEVNULL)
            timeline = page.locator("#timeline")
            expect(timeline).to_contain_text("of r2", timeout=WAIT)
            expect(timeline).to_contain_text("running", timeout=WAIT)
            expect(timeline).not_to_contain_text("tested")  # the test stage waits for us
            gate.touch()
            expect(timeline).to_contain_text("tested", timeout=DEPLOY_WAIT)
            expect(timeline).to_contain_text("✓ succeeded", timeout=DEPLOY_WAIT)  # finished
            expect(page.locator("#serving")).to_have_text("r2", timeout=WAIT)
            assert any("/deploys/hello-r2" in url for url in streams), streams
            shot(t, page, "app", full=False)

            # roll back with the button, once confirmed
            page.once("dialog", lambda dialog: dialog.accept())
            page.click("button[aria-label='Roll back to r1']")
            expect(page.locator("#serving")).to_have_text("r1", timeout=DEPLOY_WAIT)
            expect(timeline).to_contain_text("of r1", timeout=WAIT)
            expect(timeline).to_contain_text("✓ succeeded", timeout=DEPLOY_WAIT)  # a scale
            # while the rollback's deploy runs would be refused (409)

            # scale from the page
            page.fill("#scale-count", "1")
            page.select_option("#scale-mode", "per_node")
            page.click("form[aria-label='Scale'] button")
            expect(page.locator("#scale")).to_contain_text("1 per machine", timeout=WAIT)
            expect(page.locator("#placement")).to_have_text(f"{t.node}: 1", timeout=WAIT)

            # a debug session: a request arrives, its trace opens
            page.click("#debug-open")
            expect(page.locator("#debug-state")).to_contain_text("open until", timeout=WAIT)
            fetch(f"{t.proxy}/hello/?debug={marker}")
            request = page.locator("#debug-requests button", has_text=f"debug={marker}")
            expect(request).to_have_count(1, timeout=WAIT)
            request.click()
            expect(page.locator("#trace h3")).to_contain_text("Trace", timeout=WAIT)
            expect(page.locator("#trace")).to_contain_text(f"debug={marker}", timeout=WAIT)
            page.click("#debug-close")
            expect(page.locator("#debug-state")).to_have_text("Debug session closed.",
                                                              timeout=WAIT)

            # drain the machine, then online again
            page.click("nav a[href='#/machines']")
            row = page.locator("tr", has_text=t.node)
            expect(row).to_contain_text("online", timeout=WAIT)
            page.click(f"button[aria-label='drain {t.node}']")
            expect(row).to_contain_text("draining", timeout=WAIT)
            shot(t, page, "machines")
            page.click(f"button[aria-label='online {t.node}']")
            expect(row).to_contain_text("✓ online", timeout=WAIT)

            # the audit log, filtered
            page.click("nav a[href='#/audit']")
            expect(page.locator("main table")).to_contain_text("set_node_lifecycle",
                                                               timeout=WAIT)
            page.fill("#audit-type", "lifecycle")
            rows = page.locator("main table tbody tr")
            expect(rows).to_have_count(2, timeout=WAIT)
            expect(rows.first).to_contain_text("draining -> online")
            page.fill("#audit-type", "")
            shot(t, page, "audit", full=False)

            # a narrow screen: nothing wider than it
            page.set_viewport_size({"width": 390, "height": 800})
            page.click("nav a[href='#/']")
            expect(page.locator("main table").first).to_be_visible(timeout=WAIT)
            assert page.evaluate("document.documentElement.scrollWidth") <= 390
            shot(t, page, "overview-narrow", full=False)

            # logout: back to the login form
            page.click("#logout")
            expect(page.locator("#login-error")).to_contain_text("Logged out", timeout=WAIT)

            # a viewer: the same pages, no write control
            viewer = browser.new_context(viewport={"width": 1280, "height": 800})
            vpage = viewer.new_page()
            vpage.on("response", lambda r: refused.append((r.status, r.url))
                     if r.status >= 400 else None)
            login(vpage, t, t.viewer)
            vpage.goto(f"{t.url}/ui/#/apps/hello")
            expect(vpage.locator("#serving")).to_have_text("r1", timeout=WAIT)
            expect(vpage.locator("main")).to_contain_text("need a token that may write")
            for control in ("#scale-count", "#debug-open", "button:has-text('Roll back')"):
                expect(vpage.locator(control)).to_have_count(0)
            vpage.goto(f"{t.url}/ui/#/machines")
            expect(vpage.locator("main table")).to_contain_text(t.node, timeout=WAIT)
            expect(vpage.locator("button", has_text="Drain")).to_have_count(0)
        finally:
            browser.close()
    assert refused == [(401, f"{t.url}/ui/login")], refused


async def test_dashboard_in_a_browser() -> None:
    async with running_cluster() as cluster:
        src = demo_release(cluster.src / "hello", "Hello from superagent")
        first = await cluster.deploy(src)
        assert first["status"] == "succeeded", first
        made = await cluster.api.post("/api/v1/tokens", json={"name": "watch", "role": "viewer"})
        assert made.status_code == 201, made.text
        nodes = (await cluster.api.get("/api/v1/nodes")).json()["nodes"]
        shots = os.environ.get("SUPERAGENT_UI_SCREENSHOTS")
        target = Target(url=cluster.embedded.coordinator.config.url,
                        token=cluster.embedded.token_file.read_text().strip(),
                        viewer=made.json()["token"], proxy=cluster.proxy,
                        node=nodes[0]["name"], src=src,
                        shots=Path(shots).resolve() if shots else None)
        await trio.to_thread.run_sync(drive, target)
