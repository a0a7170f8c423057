"""The dashboard `cl-metrics` serves, in a real headless Chromium (Debian's, driven by
Playwright): live data, a wall and a move as the page shows them, nothing private on it; and
the Grafana dashboard's queries against the metrics cl-metrics exposes."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_gateway import account, running

from utils import BIN, REPO, FakeApi, Layout, Planted, free_port, job_states, stored, submit, wait_until

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",  # as root in a machine with no user namespaces for it; the page is ours
    "--disable-gpu",
    "--disable-background-networking",  # nothing leaves the machine
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PAGE = REPO / "src" / "cl" / "dashboard.html"
GRAFANA = REPO / "packaging" / "grafana" / "cl.json"


@contextlib.contextmanager
def metrics_serving(env: dict[str, str]) -> Iterator[str]:
    """cl-metrics on a free loopback port, as its unit runs it; its URL."""
    port = free_port()
    process = subprocess.Popen([str(BIN / "cl-metrics"), "--listen", f"127.0.0.1:{port}"], env=env)
    try:
        wait_until(lambda: _accepts(port), "cl-metrics to listen")
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(20)


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def fetch(url: str) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(url, timeout=30) as reply:  # noqa: S310 - our own loopback URL
        return reply.status, reply.headers["Content-Type"], reply.read()


@pytest.fixture
def browser() -> Iterator[Any]:
    """Debian's Chromium under Playwright (whose own browser download is not reachable here)."""
    playwright_api = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.exists():
        if os.environ.get("REQUIRE_CHROMIUM") == "required":
            pytest.fail("chromium is not installed (apt install chromium)")
        pytest.skip("needs Debian's chromium (apt install chromium)")
    with playwright_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        try:
            yield launched
        finally:
            launched.close()


def test_the_page_shows_accounts_live_then_a_wall_and_a_move_and_nothing_private(
    layout: Layout, planted: Planted, fake_api: FakeApi, browser: Any, tmp_path: Path
) -> None:
    a1 = account(layout, planted, "a1")
    account(layout, planted, "a2")
    fake_api.limit(a1, 0)  # a1's first request walls: the session moves to a2 in flight
    with running(layout, fake_api) as gateway, metrics_serving(gateway.env) as url:
        page = browser.new_page(viewport={"width": 1000, "height": 900})
        page.goto(f"{url}/")
        page.locator("#summary", has_text="2 accounts: 2 ok").wait_for()  # (locators: the page's CSP allows no eval)
        assert page.locator("#accounts tbody tr").count() == 2
        job = submit(layout, "a private prompt 7d1e")
        wait_until(lambda: job_states(layout).get(job) == "done", "the job to move to a2 and finish")
        page.locator("tr[data-account=a1] .state", has_text="walled").wait_for(timeout=30_000)
        page.locator("#events", has_text="moved: a1 → a2").wait_for(timeout=30_000)
        a1_row = page.locator("tr[data-account=a1]").inner_text()
        assert re.search(r"walled\s+5h until \d\d:\d\dZ \(in \d+h\d\dm\)", a1_row), a1_row
        a2_row = page.locator("tr[data-account=a2]").inner_text()
        assert re.search(r"ok\s+\d+%", a2_row), a2_row  # its 5-hour window, as the API's headers said it
        assert "wall: a1" in page.locator("#events").inner_text()
        assert page.locator("#chart circle").count() >= 3  # this hour's utilization: the mean, a1's, a2's
        shown = page.content()
        assert "private prompt" not in shown
        assert str(layout.work) not in shown
        assert not planted.leaks(shown, "the dashboard")
        page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
        if wanted := os.environ.get("CL_DASHBOARD_SCREENSHOT"):  # docs/dashboard.png is made so
            shutil.copy(tmp_path / "dashboard.png", wanted)
        status, kind, body = fetch(f"{url}/dashboard.json")
        assert (status, kind) == (200, "application/json")
        data = json.loads(body)
        assert set(data) == {
            "ok",
            "at",
            "total",
            "counts",
            "sessions",
            "matching",
            "accounts",
            "queue",
            "blocked",
            "history",
            "events",
        }
        assert (data["total"], data["counts"], data["matching"]) == (2, {"walled": 1, "ok": 1}, 2)
        assert [a["name"] for a in data["accounts"]] == ["a1", "a2"]  # the one that needs a look first
        filtered = json.loads(fetch(f"{url}/dashboard.json?filter=2")[2])
        assert ([a["name"] for a in filtered["accounts"]], filtered["matching"]) == (["a2"], 1)
        assert not {"cwd", "prompt", "session_id", "job"} & {key for a in data["accounts"] for key in a}
        assert not planted.leaks(body.decode(), "the dashboard's data")
        assert fetch(f"{url}/metrics")[2].startswith(b"# HELP")  # the metrics, as before
        with pytest.raises(urllib.error.HTTPError) as elsewhere:
            fetch(f"{url}/favicon.ico")  # no scrape of every daemon for a browser's icon
        assert elsewhere.value.code == 404
        elsewhere.value.close()


def test_a_window_whose_reset_has_passed_shows_empty_with_when_it_reset(
    layout: Layout, planted: Planted, fake_api: FakeApi, browser: Any
) -> None:
    """a1's 5-hour window was read used up and has reset since, with no answer after: the page
    shows it empty, as `cl accounts` does, not full."""
    account(layout, planted, "a1")
    now = time.time()
    stored(layout, lambda store: store.record_usage("a1", {"five_hour": 1.0}, now - 60, resets={"five_hour": now - 1}))
    with running(layout, fake_api) as gateway, metrics_serving(gateway.env) as url:
        page = browser.new_page()
        page.goto(f"{url}/")
        row = page.locator("tr[data-account=a1]", has_text="reset")
        row.wait_for()
        assert re.search(r"\b0% reset 0h00m ago, was 100%", row.inner_text()), row.inner_text()
        assert page.locator("tr[data-account=a1] .meter i.full").count() == 0


def test_the_page_is_one_file_that_fetches_nothing_but_its_data() -> None:
    html = PAGE.read_text()
    assert re.findall(r"\b(?:src|href)\s*=", html) == []  # no script, style, image or font from elsewhere
    assert "http://" not in html
    assert "https://" not in html
    assert re.findall(r"fetch\((.*), \{", html) == ["`dashboard.json?filter=${encodeURIComponent(wanted)}`"]


def test_the_page_says_so_when_the_balancer_does_not_answer(layout: Layout) -> None:
    with metrics_serving(layout.env()) as url:
        with pytest.raises(urllib.error.HTTPError) as refused:
            fetch(f"{url}/dashboard.json")
        assert refused.value.code == 503
        refused.value.close()
        status, kind, body = fetch(f"{url}/")
        assert (status, kind) == (200, "text/html; charset=utf-8")
        assert body == PAGE.read_bytes()


def exposed_names() -> set[str]:
    """Every metric name cl-metrics can expose, a histogram's (`_seconds`) with its series' suffixes."""
    names = set(re.findall(r'"(cl_[a-z_]+)"', (REPO / "src" / "cl" / "metrics.py").read_text()))
    suffixed = {
        name + suffix for name in names if name.endswith("_seconds") for suffix in ("_bucket", "_sum", "_count")
    }
    return names | suffixed


def test_the_grafana_dashboards_queries_name_only_metrics_cl_exposes() -> None:
    dashboard = json.loads(GRAFANA.read_text())
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert len(queries) >= 6
    used = {name for query in queries for name in re.findall(r"\b(cl_[a-z_]+)", query)}
    assert used, queries
    assert used <= exposed_names(), used - exposed_names()
    assert {"cl_account_state", "cl_account_utilization_ratio", "cl_queue_depth"} <= used
