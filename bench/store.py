"""The state store's two backends side by side, in one run (`python bench/store.py [--quick]`).

SQLite (a file in a temp dir) and PostgreSQL (a server of the bench's own, started as the tests
start theirs: tests/postgres.py, on a Unix socket) each get the same work, in turn:

* placement: 10,000 queued jobs placed over 100 accounts, each `Store.place` one transaction
  (the decision is not timed: bench/balancer.py measures that), by one placer;
* `status`: `Store.snapshot` at 1,000 live sessions, after a change each time (nothing kept);
* a claim: `Store.claim` of a placed run (the worker's first write), each its own transaction.

Nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import postgres
from cl.store import Store


def placement(where: Path | str, jobs: int) -> float:
    """Jobs placed per second."""
    store = Store(where)
    with store.transaction() as db:
        for i in range(jobs):
            db.execute(
                "INSERT INTO jobs (cwd, prompt, state, created_at, updated_at) VALUES (?, ?, 'queued', ?, ?)",
                ("/srv", f"job {i}", time.time(), time.time()),
            )
    ids = [job.id for job in store.jobs(("queued",))]
    start = time.perf_counter()
    for i, job_id in enumerate(ids):
        store.place(job_id, f"acct{i % 100:03d}", limit=jobs)
    elapsed = time.perf_counter() - start
    store.close()
    return len(ids) / elapsed


def per_call(call: Callable[[], object], samples: int) -> list[float]:
    times = []
    for _ in range(samples):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000)
    return times


def status_and_claim(where: Path | str, sessions: int, samples: int) -> tuple[list[float], list[float]]:
    """`snapshot` after a change (ms), and a claim (ms)."""
    store = Store(where)
    runs = []
    for i in range(sessions + samples):
        job = store.add_job("/srv", f"job {i}")
        run = store.place(job.id, f"acct{i % 100:03d}", limit=sessions + samples)
        assert run is not None
        runs.append(run.id)
    for run_id in runs[:sessions]:
        store.claim(run_id, 1, "1", "/dev/null")
    unclaimed = iter(runs[sessions:])

    def changed_then_status() -> None:
        store.record_usage("acct000", {"five_hour": 0.5})
        store.snapshot()

    status = per_call(changed_then_status, samples)
    claim = per_call(lambda: store.claim(next(unclaimed), 1, "1", "/dev/null"), samples)
    store.close()
    return status, claim


def quantiles(times: list[float]) -> str:
    cuts = statistics.quantiles(times, n=100)
    return f"p50 {cuts[49]:.2f} ms, p99 {cuts[98]:.2f} ms (n={len(times)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of the work")
    args = parser.parse_args()
    jobs, sessions, samples = (1_000, 100, 50) if args.quick else (10_000, 1_000, 200)
    server = postgres.Server()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            backends: dict[str, Callable[[], Path | str]] = {
                "sqlite": lambda: Path(tempfile.mkdtemp(dir=tmp)) / "cl.db",
                "postgresql": server.database,
            }
            for name, fresh in backends.items():
                print(f"{name}: placement {placement(fresh(), jobs):,.0f} jobs/s ({jobs:,} queued, one placer)")
                status, claim = status_and_claim(fresh(), sessions, samples)
                print(f"{name}: status after a change at {sessions:,} sessions: {quantiles(status)}")
                print(f"{name}: a worker's claim: {quantiles(claim)}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
