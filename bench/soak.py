"""Soak benchmark (`python bench/soak.py`, part of `make bench`): a year of history.

100,000 finished jobs with their runs and ledger rows (three a job), 10,000 accounts, 1,000 live
sessions; then, each figure beside its goal:
* `status` on the socket (request -> whole reply), n=300: p99 <= 20 ms;
* each daemon's RSS: <= 80 MB;
* placement of 10,000 more jobs over 100 accounts on that store: >= 2,000 jobs/s;
* the database file after a retention pass: no larger than one holding 10,000 such jobs.
"""

from __future__ import annotations

import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

from balancer import placement_throughput
from run import HELD, daemons, ms, percentile, populate, rss_mb, spread

from cl import logs
from cl.client import exchange
from cl.processes import start_time
from cl.store import Store

HISTORY = 100_000
LIVE = 1_000


def with_history(path: Path, jobs: int, ended_at: float) -> int:
    """A store holding `jobs` finished jobs, each with its run and three ledger rows; its size."""
    Store(path).close()
    db = sqlite3.connect(path)
    with db:
        db.execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)"
            " INSERT INTO jobs (cwd, prompt, state, account, session_id, created_at, updated_at, submitter)"
            " SELECT '/srv/work', 'a prompt of a typical length for job ' || i, 'done', printf('acct%05d', i % 10000),"
            " printf('00000000-0000-0000-0000-%012d', i), ?, ?, 0 FROM n",
            (jobs, ended_at, ended_at),
        )
        db.execute(
            "INSERT INTO runs (job_id, account, state, session_id, log_path, created_at, ended_at)"
            " SELECT id, account, 'done', session_id, '/var/lib/cl/logs/job-' || id || '-run-1.log', created_at,"
            " updated_at FROM jobs"
        )
        for event in ("job queued", "job placed", "run done"):
            db.execute(
                "INSERT INTO ledger (at, event, job_id, account, detail)"
                " SELECT ?, ?, id, account, '{\"run\": ' || id || '}' FROM jobs",
                (ended_at, event),
            )
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    return path.stat().st_size


def live_sessions(path: Path) -> None:
    store = Store(path)
    for i in range(LIVE):
        job = store.add_job("/srv/work", f"live {i}")
        run = store.place(job.id, f"acct{i % 10_000:05d}", limit=1)
        assert run is not None
        store.claim(run.id, os.getpid(), start_time(os.getpid()) or "", os.devnull, lease=HELD)  # live: ours, adopted
        store.set_session(run.id, f"00000000-0000-0000-0001-{i:012d}")
        store.record_usage(run.account, {"five_hour": 0.25}, used_at=time.time(), tokens=(900, 90))
    store.close()


def main() -> None:
    logs.configure("warning")
    long_ago = time.time() - 365 * 86400
    with tempfile.TemporaryDirectory(prefix="cl-soak-") as tmp:
        root = Path(tmp)
        database = root / "state" / "cl.db"
        database.parent.mkdir(parents=True)
        full = with_history(database, HISTORY, long_ago)
        live_sessions(database)
        populate(root / "claude", 10_000)
        times = []
        with daemons(root, CL_RETENTION_DAYS="3650") as procs:  # the year stays while status is measured
            socket_path = root / "run" / "balancer.sock"
            exchange(socket_path, {"request": "status"})
            for i in range(300):
                if i % 3 == 0:  # a session's id recorded, as a worker would: the listing is read again
                    store = Store(database)
                    store.set_session(1 + HISTORY + i % LIVE, f"00000000-0000-0000-0002-{i:012d}")
                    store.close()
                start = time.perf_counter()
                exchange(socket_path, {"request": "status"})
                times.append(time.perf_counter() - start)
            rss = {name: rss_mb(proc.pid) for name, proc in procs.items()}
        print(
            f"status with {HISTORY:,} finished jobs, 10,000 accounts, {LIVE:,} live sessions: {spread(times)}"
            f" (goal p99 <= 20 ms: {'met' if percentile(times, 99) <= 0.020 else 'MISSED'})",
            flush=True,
        )
        print(
            "RSS: "
            + ", ".join(f"cl-{name} {mb:.1f} MB" for name, mb in rss.items())
            + f" (goal <= 80 MB: {'met' if max(rss.values()) <= 80 else 'MISSED'})",
            flush=True,
        )
        rate = placement_throughput(root / "place", database=database)
        print(f"placement on that store: {rate:,.0f} jobs/s (goal >= 2,000: {'met' if rate >= 2000 else 'MISSED'})")
        store = Store(database)
        started = time.perf_counter()
        pruned = store.prune(time.time() - 30 * 86400)
        took = time.perf_counter() - started
        store.close()
        after = database.stat().st_size
        ten_thousand = with_history(root / "ten-thousand.db", 10_000, long_ago)
        print(
            f"retention pass: {pruned:,} jobs forgotten in {ms(took)}; the file {full / 2**20:.1f} MB before,"
            f" {after / 2**20:.1f} MB after, one holding 10,000 jobs {ten_thousand / 2**20:.1f} MB"
            f" (goal: no larger: {'met' if after <= ten_thousand else 'MISSED'})"
        )


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
