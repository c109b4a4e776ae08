"""The report in a real browser: headless Chromium loads it over http://127.0.0.1 and the page must show no console
error, no broken image (naturalWidth 0) and no table without data cells; the Data Docs link must resolve.

Chromium is driven over the DevTools protocol (its websocket, with the `websockets` package prefect already
brings). Without Chromium the test skips, except in CI (CI=true), where .ci/run installs it and its absence fails.
Set SCONE_REPORT_SCREENSHOT=<png> to keep a 1280x2000 screenshot of the report.
"""
import base64
import functools
import http.server
import json
import os
import shutil
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from data.build import BASE, SRUM, build_dataset
from data.card import write_card
from data.config import DataConfig, DatasetSizes
from data.validate import validate_dataset
from dashboards.report import build_report
from test_report_build import MODEL, _no_env_store, repo  # noqa: F401 (fixtures: the store and artifacts)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

# what the page must not have, as one JSON string (evaluated in the page after its load event)
CHECK_JS = """JSON.stringify({
  broken_images: [...document.images].filter(i => !i.complete || i.naturalWidth === 0).map(i => i.getAttribute('src')),
  empty_tables: [...document.querySelectorAll('table')].filter(t => t.querySelectorAll('td').length === 0)
                  .map(t => t.id || t.outerHTML.slice(0, 120)),
  images: document.images.length,
  tables: [...document.querySelectorAll('table')].map(t => t.id),
  headings: [...document.querySelectorAll('h2')].map(h => h.textContent),
  data_docs: (document.querySelector('a#data-docs') || {}).href || null,
})"""


def chromium_binary() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.environ.get("CI") == "true":
        pytest.fail("chromium is not installed, and CI=true requires the browser test: .ci/run installs it "
                    "(apt-get install -y chromium)")
    pytest.skip("chromium is not installed (apt-get install -y chromium); set CI=true to make this a failure")


class Page:
    """A minimal DevTools-protocol client for one page target: commands, plus the events seen meanwhile."""

    def __init__(self, ws_url: str):
        from websockets.sync.client import connect

        self.ws = connect(ws_url, max_size=None, open_timeout=30)
        self.next_id = 0
        self.events: list[dict] = []

    def send(self, method: str, timeout: float = 60, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            msg = json.loads(self.ws.recv(timeout=max(deadline - time.monotonic(), 0.01)))
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_for(self, event: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for e in self.events:
                if e.get("method") == event:
                    return e
            msg = json.loads(self.ws.recv(timeout=max(deadline - time.monotonic(), 0.01)))
            self.events.append(msg)

    def drain(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                self.events.append(json.loads(self.ws.recv(timeout=left)))
            except TimeoutError:
                return

    def console_errors(self) -> list[str]:
        """Console errors, uncaught exceptions and browser log errors (failed loads) seen so far."""
        out = []
        for e in self.events:
            method, p = e.get("method"), e.get("params", {})
            if method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append("console." + p["type"] + ": " + " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
            elif method == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                out.append("exception: " + str(d.get("exception", {}).get("description") or d.get("text")))
            elif method == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                entry = p["entry"]
                out.append(f"log ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}".strip())
        return out

    def close(self) -> None:
        self.ws.close()


class Browser:
    def __init__(self, binary: str, profile: Path):
        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
             "--no-first-run", "--no-default-browser-check", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--disable-extensions", "--hide-scrollbars",
             f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and len(port_file.read_text().splitlines()) >= 2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"chromium did not start: {self.proc.stderr.read()[-2000:]}")
            time.sleep(0.1)
        self.port = int(port_file.read_text().splitlines()[0])

    def open(self, url: str, width: int = 1280, height: int = 2000) -> Page:
        """A new tab at `url`, console and log recorded from before the navigation; returns after its load event."""
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/json/new?about:blank", method="PUT")
        target = json.loads(urllib.request.urlopen(req, timeout=30).read())
        page = Page(target["webSocketDebuggerUrl"])
        for domain in ("Runtime", "Log", "Page"):
            page.send(f"{domain}.enable")
        page.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        page.send("Page.navigate", url=url)
        page.wait_for("Page.loadEventFired")
        page.drain(0.5)  # late console messages
        return page

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    b = Browser(chromium_binary(), tmp_path_factory.mktemp("chromium-profile"))
    yield b
    b.close()


def serve(folder: Path):
    """An http.server thread on a free port serving `folder`; returns (base URL, server)."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server


def evaluate(page: Page) -> dict:
    result = page.send("Runtime.evaluate", expression=CHECK_JS, returnByValue=True)
    return json.loads(result["result"]["value"])


@pytest.fixture(scope="module")
def full_report(repo):  # noqa: F811 (the fixture imported above)
    """test_report_build's store and artifacts, plus two validated datasets (Data Docs, data cards)."""
    artifacts, _ = repo
    cfg = DataConfig(root=str(artifacts / "data"), rows_per_row_group=8, sizes=DatasetSizes(base=12, srum_prompts=7))
    for name in (BASE, SRUM):
        build_dataset(name, cfg)
        validate_dataset(name, cfg)
        write_card(name, cfg)
    return artifacts, build_report(artifacts, "sqlite:///artifacts/mlflow.db", MODEL)


def test_report_renders_in_chromium_without_errors(browser, full_report):
    artifacts, out = full_report
    base, server = serve(artifacts)
    try:
        page = browser.open(f"{base}/reports/{out.name}")
        found = evaluate(page)
        errors = page.console_errors()
        shot = page.send("Page.captureScreenshot", format="png")
        if os.environ.get("SCONE_REPORT_SCREENSHOT"):
            Path(os.environ["SCONE_REPORT_SCREENSHOT"]).write_bytes(base64.b64decode(shot["data"]))
        page.close()
        assert not errors, errors
        assert found["broken_images"] == [], found
        assert found["empty_tables"] == [], found
        # every section rendered, with its images and tables
        assert found["images"] >= 12 and {"sconeeval", "gate", "srum", "t2i", "samples", "validation", "datacards"} <= set(found["tables"])
        assert "Data validation" in found["headings"] and "Data cards" in found["headings"]
        # the Data Docs link is relative to the published report folder and resolves over HTTP
        assert found["data_docs"] == f"{base}/validation/gx/uncommitted/data_docs/local_site/index.html"
        with urllib.request.urlopen(found["data_docs"], timeout=30) as r:
            assert r.status == 200 and BASE in r.read().decode()
    finally:
        server.shutdown()


def test_the_browser_check_catches_errors_broken_images_and_empty_tables(browser, tmp_path):
    """The checks themselves: a page with each fault must be caught."""
    (tmp_path / "ok.png").write_bytes(base64.b64decode(
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="))
    (tmp_path / "bad.html").write_text(
        '<!doctype html><html><head><link rel="icon" href="data:,"></head><body><img src="ok.png"><img src="missing.png">'
        '<table id="empty"><tr><th>h</th></tr></table><table id="full"><tr><td>1</td></tr></table>'
        '<script>console.error("boom")</script></body></html>')
    base, server = serve(tmp_path)
    try:
        page = browser.open(f"{base}/bad.html")
        found, errors = evaluate(page), page.console_errors()
        page.close()
    finally:
        server.shutdown()
    assert found["broken_images"] == ["missing.png"]
    assert found["empty_tables"] == ["empty"]
    assert any("boom" in e for e in errors) and any("404" in e for e in errors), errors
