"""Faults from outside: a locked state store. Each gets a clear log line and is waited out; no work is lost."""

from __future__ import annotations

import json
import sqlite3

from utils import DaemonProcess, Layout, Planted, cl, oauth_credential, wait_until, write_credential


def submit(layout: Layout, prompt: str) -> int:
    result = cl(layout, "submit", "--cwd", str(layout.work), "--prompt", prompt, "--json")
    assert result.returncode == 0, result.stderr
    job: int = json.loads(result.stdout)["job"]
    return job


def test_a_locked_store_is_reported_and_waited_out(layout: Layout, planted: Planted) -> None:
    env = layout.env(CL_STORE_BUSY_TIMEOUT="0.2")
    balancer = DaemonProcess("balancer", layout, env=env).start()
    try:
        job = submit(layout, "queued before the lock")  # no account yet: it waits in the queue
        other = sqlite3.connect(layout.state / "cl.db", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another writer holds the lock, far past the busy timeout
        refused = cl(layout, "submit", "--cwd", str(layout.work), "--prompt", "during the lock")
        assert refused.returncode == 3
        assert "database is locked; try again" in refused.stderr
        assert cl(layout, "status").returncode == 0  # reads do not wait for a writer
        write_credential(layout.credentials, "a1", oauth_credential(planted))  # placement now hits the lock
        wait_until(lambda: "state store unavailable, retrying" in balancer.log(), "the lock to be reported")
        other.execute("ROLLBACK")
        other.close()
        wait_until(lambda: "state store available again" in balancer.log(), "the store to come back")
        jobs = json.loads(cl(layout, "jobs", "--json").stdout)
        wait_until(
            lambda: [j["state"] for j in json.loads(cl(layout, "jobs", "--json").stdout)] == ["done"],
            "the queued job to run once the lock is gone",
        )
        assert [j["id"] for j in jobs] == [job]  # the refused submit left nothing behind
        assert balancer.log().count("state store unavailable") == 1  # said once per outage
    finally:
        balancer.stop()
