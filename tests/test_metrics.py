"""`cl-metrics` end to end: socket-activated as systemd does it, asking both real daemons at each
scrape, parsed with prometheus_client's own parser; and the example alert rules, with promtool."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from utils import (
    BIN,
    REPO,
    Layout,
    Planted,
    both,
    cl,
    job_states,
    oauth_credential,
    status,
    submit,
    wait_until,
    write_credential,
)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@contextlib.contextmanager
def metrics_endpoint(layout: Layout) -> Iterator[str]:
    """cl-metrics behind `systemd-socket-activate`, which listens and hands it the socket on the
    first connection, as cl-metrics.socket does; its URL."""
    if shutil.which("systemd-socket-activate") is None:
        pytest.skip("needs systemd-socket-activate (package systemd)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = layout.env()
    passed = [f"--setenv={name}={env[name]}" for name in ("CL_CONFIG", "CL_RUNTIME_DIR")]  # it passes no other
    activator = subprocess.Popen(
        ["systemd-socket-activate", "--listen", f"127.0.0.1:{port}", *passed, str(BIN / "cl-metrics")], env=env
    )
    try:
        wait_until(lambda: _listening(port), "the socket to listen")
        yield f"http://127.0.0.1:{port}/metrics"
    finally:
        activator.terminate()
        activator.wait(20)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=30) as response:  # noqa: S310 - our own loopback URL
        assert response.status == 200
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_the_endpoint_reports_accounts_queue_counters_and_latencies(layout: Layout, planted: Planted) -> None:
    walled = planted.token()
    write_credential(layout.credentials, "a1", oauth_credential(planted, token=walled))
    write_credential(layout.credentials, "a2", oauth_credential(planted))
    write_credential(layout.credentials, "a3", "{ not json")
    layout.quota({walled: 0})
    with metrics_endpoint(layout) as url:
        down = scrape(url)  # no daemon yet: the endpoint answers, and says so
        assert value(down, "cl_up", daemon="balancer") == value(down, "cl_up", daemon="rescue") == 0
        with both(layout):
            moved = submit(layout, "walls on a1, moves to a2")
            wait_until(lambda: job_states(layout)[moved] == "done", "the session to move and finish")
            fresh = submit(layout, "runs on a2")
            wait_until(lambda: job_states(layout)[fresh] == "done", "the second job to finish")
            assert cl(layout, "accounts", "pause", "a2").returncode == 0
            queued = submit(layout, "waits: a1 walled, a2 paused")
            samples = scrape(url)
            assert job_states(layout)[queued] == "queued"
            in_accounts = {
                a["name"]: a["state"] for a in json.loads(cl(layout, "accounts", "--json").stdout)["accounts"]
            }
            in_status = {a["name"]: a["state"] for a in status(layout)["accounts"]}
            shown = cl(layout, "status").stdout
    in_metrics = {labels[0][1]: labels[1][1] for (name, labels), _ in samples.items() if name == "cl_account_state"}
    assert in_accounts == in_status == in_metrics == {"a1": "walled", "a2": "paused", "a3": "invalid"}  # one state
    assert re.search(r"^a1 +walled( \(5h\))? until 20", shown, re.MULTILINE), shown
    assert re.search(
        r"1 job\(s\) queued: 1 walled, the first until 20.*, 1 paused \(cl accounts resume NAME\), 1 invalid$",
        shown,
        re.MULTILINE,
    )
    assert value(samples, "cl_up", daemon="balancer") == value(samples, "cl_up", daemon="rescue") == 1
    assert {state: value(samples, "cl_accounts", state=state) for state in ("ok", "walled", "paused", "invalid")} == {
        "ok": 0,
        "walled": 1,
        "paused": 1,
        "invalid": 1,
    }
    assert value(samples, "cl_account_state", account="a1", state="walled") == 1
    assert value(samples, "cl_account_walled_until_seconds", account="a1") > 0
    assert value(samples, "cl_account_walled_until_seconds", account="a2") == 0
    assert value(samples, "cl_account_sessions", account="a2") == 0
    assert value(samples, "cl_queue_depth") == 1
    assert value(samples, "cl_queue_oldest_age_seconds") > 0
    assert value(samples, "cl_placements_total", daemon="balancer") == 2
    assert value(samples, "cl_moves_total", daemon="rescue") == 1
    assert value(samples, "cl_live_moves_total", daemon="rescue") == 1  # its CLI went on
    assert value(samples, "cl_failures_total", daemon="balancer") == 0
    assert value(samples, "cl_submit_to_started_seconds_count") == 1  # the first job walled before any answer
    assert value(samples, "cl_wall_to_resumed_seconds_count") == 1
    assert value(samples, "cl_wall_to_resumed_seconds_bucket", le="+Inf") == 1
    assert value(samples, "cl_sessions_waiting") == 0


def test_the_textfile_is_written_whole(layout: Layout, planted: Planted, tmp_path: Path) -> None:
    write_credential(layout.credentials, "a1", oauth_credential(planted))
    (textfiles := tmp_path / "textfiles").mkdir()
    target = textfiles / "cl.prom"
    with both(layout):
        result = subprocess.run(
            [str(BIN / "cl-metrics"), "--textfile", str(target)], env=layout.env(), capture_output=True, check=False
        )
    assert result.returncode == 0, result.stderr
    families = {family.name for family in text_string_to_metric_families(target.read_text())}
    assert {"cl_up", "cl_accounts", "cl_queue_depth", "cl_placements", "cl_wall_to_resumed_seconds"} <= families
    assert [p.name for p in textfiles.iterdir()] == ["cl.prom"]  # no temporary file left behind


def test_the_example_alert_rules_are_valid_and_fire_when_they_should() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("needs promtool (Debian package prometheus; .ci/run installs it)")
    rules = REPO / "packaging" / "prometheus" / "cl-alerts.yml"
    checked = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run(
        [promtool, "test", "rules", "cl-alerts.test.yml"],
        cwd=REPO / "tests" / "prometheus",
        capture_output=True,
        text=True,
        check=False,
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
