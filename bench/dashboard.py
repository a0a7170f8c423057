"""The dashboard at 10,000 accounts and 1,000 sessions (`python bench/dashboard.py [--quick]`,
part of `make bench`).

* `/dashboard.json` through cl-metrics, as the page asks it every 2 s: each request's time, with
  usage recorded between requests as the gateway would (goal: p99 <= 50 ms);
* the page in Debian's chromium (Playwright): load -> the first data shown, and a filter typed ->
  the table redrawn (usable: well under a second each);
* the daemons' CPU while the page stays open, and while none is (goal: <= 1 % each);
* `cl status --watch` at the same size: each refresh's time.
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from run import BIN, HELD, cpu_seconds, daemons, env_for, populate, spread

from cl.processes import start_time
from cl.store import Store

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]


def fill(root: Path) -> Store:
    """10,000 accounts, 1,000 live sessions on them, each account's windows read."""
    populate(root / "claude", 10_000)
    store = Store(root / "state" / "cl.db")
    now = time.time()
    for i in range(10_000):
        used = (i % 97) / 100
        store.record_usage(
            f"acct{i:05d}", {"five_hour": used, "seven_day": used / 2}, now, resets={"five_hour": now + 3600}
        )
    for i in range(1_000):
        job = store.add_job("/tmp", f"job {i}")  # noqa: S108 - a path stored, never used
        run = store.place(job.id, f"acct{i * 10:05d}", limit=1)
        assert run is not None
        store.claim(run.id, os.getpid(), start_time(os.getpid()) or "", os.devnull, lease=HELD)
    return store


def endpoint(url: str, store: Store, samples: int) -> list[float]:
    times = []
    for i in range(samples):
        store.record_usage(f"acct{i % 10_000:05d}", {"five_hour": 0.5}, time.time(), resets={"five_hour": 1e10})
        start = time.perf_counter()
        with urllib.request.urlopen(f"{url}/dashboard.json", timeout=30) as reply:  # noqa: S310 - loopback
            reply.read()
        times.append(time.perf_counter() - start)
    return times


def page(url: str) -> tuple[float, float]:
    """Load -> first data shown; filter typed -> table redrawn (seconds)."""
    from playwright.sync_api import sync_playwright  # noqa: PLC0415 - only this figure needs it

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        tab = browser.new_page()
        start = time.perf_counter()
        tab.goto(f"{url}/")
        tab.locator("#shown", has_text="200 of 10000 shown").wait_for(timeout=60_000)
        loaded = time.perf_counter() - start
        start = time.perf_counter()
        tab.fill("#filter", "acct0424")
        tab.locator("#shown", has_text="10 shown").wait_for(timeout=60_000)
        filtered = time.perf_counter() - start
        browser.close()
    return loaded, filtered


def cpu_percent(pids: dict[str, int], seconds: float) -> dict[str, float]:
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    time.sleep(seconds)
    return {name: (cpu_seconds(pid) - before[name]) / seconds * 100 for name, pid in pids.items()}


def watch_refreshes(root: Path, seconds: float) -> list[float]:
    """`cl status --watch 0.5`: the time between two screens."""
    process = subprocess.Popen(
        [str(BIN / "cl"), "status", "--watch", "0.5"], env=env_for(root), stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    stamps = []
    deadline = time.monotonic() + seconds
    for line in iter(process.stdout.readline, ""):
        if "job(s) queued" in line:
            stamps.append(time.perf_counter())
        if time.monotonic() > deadline:
            break
    process.terminate()
    process.wait(10)
    return [b - a - 0.5 for a, b in itertools.pairwise(stamps)]  # less the interval asked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer samples, shorter idle windows")
    args = parser.parse_args()
    samples, idle = (100, 20.0) if args.quick else (500, 60.0)
    with tempfile.TemporaryDirectory(prefix="cl-bench-dashboard-") as tmp:
        root = Path(tmp)
        store = fill(root)
        port = 20000 + os.getpid() % 20000
        url = f"http://127.0.0.1:{port}"
        with daemons(root) as procs:
            metrics = subprocess.Popen([str(BIN / "cl-metrics"), "--listen", f"127.0.0.1:{port}"], env=env_for(root))
            try:
                time.sleep(1)
                pids = {**{name: proc.pid for name, proc in procs.items()}, "metrics": metrics.pid}
                time.sleep(5)  # settled after the start
                print(f"daemons' CPU, no dashboard ever opened ({idle:.0f} s): {_percents(cpu_percent(pids, idle))}")
                urllib.request.urlopen(f"{url}/dashboard.json", timeout=60).read()  # noqa: S310 - the first renders all
                times = endpoint(url, store, samples)
                print(f"/dashboard.json at 10,000 accounts, 1,000 sessions: {spread(times)} (goal: p99 <= 50 ms)")
                refreshes = watch_refreshes(root, 10.0)
                print(f"cl status --watch, one refresh (less its interval): {spread(refreshes)}")
                if Path(CHROMIUM).exists():
                    loaded, filtered = page(url)
                    print(
                        f"page in chromium: first data shown {loaded * 1000:.0f} ms, a filter {filtered * 1000:.0f} ms"
                    )
                    with_page = _open_page_cpu(url, pids, idle)
                    print(f"daemons' CPU with the page open ({idle:.0f} s, polling every 2 s): {_percents(with_page)}")
                else:
                    print("page in chromium: skipped (apt install chromium)")
            finally:
                metrics.terminate()
                metrics.wait(10)
        store.close()


def _open_page_cpu(url: str, pids: dict[str, int], seconds: float) -> dict[str, float]:
    from playwright.sync_api import sync_playwright  # noqa: PLC0415

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        tab = browser.new_page()
        tab.goto(f"{url}/")
        tab.locator("#shown", has_text="shown").wait_for(timeout=60_000)
        used = cpu_percent(pids, seconds)
        browser.close()
    return used


def _percents(used: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.2f} %" for name, value in used.items())


if __name__ == "__main__":
    main()
