"""A fleet on one machine (`python bench/fleet.py [--quick]`): three hosts, each its own
directories and balancer and host name, sharing one PostgreSQL database (a server of the bench's
own, started as the tests start theirs: tests/postgres.py, on a Unix socket).

* placement fleet-wide: 10,000 queued jobs, a third submitted on each host, each host's placer (a
  process of its own, the balancer's store path) placing its own jobs over the fleet's 300
  accounts at once; one job to a transaction (as before batching), `PLACE_BATCH` to one under the
  store-wide write lock (as before placement held accounts instead), and `PLACE_BATCH` to one
  as the balancer places (`Store.place_many`: its accounts held, its jobs claimed `FOR UPDATE
  SKIP LOCKED`), side by side, twice (goal: 2,000 jobs/s);
* `status` (`Store.snapshot`) after a change, at 3 hosts x 1,000 live sessions;
* wall -> move committed across hosts: three full hosts (gateways on 127.0.0.1/2/3, TLS between
  them, the fake CLI and the fake API, as tests/test_fleet_gateways.py runs them); a session on
  alpha placed on gamma's account walls there: from gamma's gateway recording the wall to alpha's
  rescuer committing the move in flight (the ledger's two entries);
* a credential file lands on one host (os.replace returns) -> the other two hosts' balancers
  both list it in their `hosts` replies (goal: p99 <= 100 ms), each host holding 100 accounts;
* the database's connections per host, the three balancers idle.

Nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import multiprocessing
import multiprocessing.synchronize
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from run import daemons_named, percentile, spread

from cl.balancer import PLACE_BATCH
from cl.client import DaemonUnreachable, call
from cl.states import JobState
from cl.store import Placement, Store

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_fleet_gateways import account, certificates, fleet_running, make_roles, published

import postgres
from utils import Layout, Planted, fake_api_running, job_states, submit, wait_until

HOSTS = ("h1", "h2", "h3")


def credential() -> str:
    """An account of its own (a fingerprint of its own: the same file on two hosts is a copy)."""
    oauth = {"accessToken": secrets.token_hex(16), "refreshToken": secrets.token_hex(16), "expiresAt": 4102444800000}
    return json.dumps({"claudeAiOauth": oauth})


def land(directory: Path, name: str) -> float:
    """Write a credential atomically; the time it landed."""
    tmp = directory / f".{name}.tmp"
    tmp.write_text(credential())
    tmp.chmod(0o600)
    tmp.replace(directory / f"credentials-{name}.json")
    return time.perf_counter()


def listed(socket_path: Path, host: str, name: str) -> bool:
    try:
        reply = call(socket_path, {"request": "hosts"}, timeout=5)
    except DaemonUnreachable:
        return False
    return any(
        h["name"] == host and h["live"] and any(a["name"] == name for a in h["accounts"]) for h in reply["hosts"]
    )


def queue(database: str, jobs: int) -> None:
    """`jobs` queued jobs, submitted on the hosts in turn."""
    store = Store(database)
    now = time.time()
    with store.transaction() as db:
        for i in range(jobs):
            db.execute(
                "INSERT INTO jobs (cwd, prompt, state, created_at, updated_at, host) VALUES (?, ?, 'queued', ?, ?, ?)",
                ("/srv", f"job {i}", now, now, HOSTS[i % len(HOSTS)]),
            )
    store.close()


def placer(
    database: str, host: str, batch: int, jobs: int, start: multiprocessing.synchronize.Barrier, *, exclusive: bool
) -> None:
    """One host's placer: its own queued jobs over the fleet's 300 accounts, `batch` to a
    transaction; `exclusive`: each batch under the store-wide write lock, as every writer."""
    store = Store(database)
    if exclusive:

        def transaction(*, write: bool = True, **_asked: Any) -> Any:
            return Store.transaction(store, write=write)  # exclusive, whatever is asked

        store.transaction = transaction  # type: ignore[method-assign]
    ids = [job.id for job in store.facts((JobState.QUEUED,), jobs, host).jobs]
    start.wait()
    for first in range(0, len(ids), batch):
        if batch == 1:
            store.place(ids[first], f"acct{ids[first] % 300:03d}", jobs)
        else:
            store.place_many(
                [Placement(job_id, f"acct{job_id % 300:03d}", jobs) for job_id in ids[first : first + batch]]
            )
    store.close()


def placement(database: str, jobs: int, batch: int, *, exclusive: bool) -> float:
    """Jobs placed per second, fleet-wide: from the three placers' start to the last one's end."""
    queue(database, jobs)
    context = multiprocessing.get_context("fork")
    start = context.Barrier(len(HOSTS) + 1)
    placers = [
        context.Process(target=placer, args=(database, host, batch, jobs, start), kwargs={"exclusive": exclusive})
        for host in HOSTS
    ]
    for process in placers:
        process.start()
    start.wait()
    began = time.perf_counter()
    for process in placers:
        process.join()
    elapsed = time.perf_counter() - began
    assert [process.exitcode for process in placers] == [0] * len(HOSTS)
    return jobs / elapsed


def status(database: str, sessions: int, samples: int) -> list[float]:
    """`Store.snapshot` after a change (seconds), at `sessions` live sessions per host."""
    store = Store(database)
    for i in range(sessions * len(HOSTS)):
        job = store.add_job("/srv", f"job {i}", host=HOSTS[i % len(HOSTS)])
        run = store.place(job.id, f"acct{i % 300:03d}", limit=sessions * len(HOSTS))
        assert run is not None
        store.claim(run.id, 1, "1", "/dev/null")
    times = []
    for _ in range(samples):
        began = time.perf_counter()
        store.record_usage("acct000", {"five_hour": 0.5})
        store.snapshot()
        times.append(time.perf_counter() - began)
    store.close()
    return times


def done(layout: Layout, job: int) -> bool:
    return job_states(layout).get(job) == "done"


def wall_to_move(server: postgres.Server, samples: int) -> list[float]:
    """Seconds from a wall recorded by gamma's gateway to alpha's rescuer's move committed, each
    sample a new session on alpha placed on gamma's a000 (its wall and usage cleared after it)."""
    make_roles(server)
    database = server.database()
    planted = Planted()
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        root = Path(tmp)
        api = stack.enter_context(fake_api_running(root, "--also-on", "127.0.0.2,127.0.0.3"))
        hosts = stack.enter_context(
            fleet_running(root, database, api, certificates(root / "tls", ["alpha", "beta", "gamma"]))
        )
        alpha = hosts["alpha"].layout
        api.limit(account(hosts["gamma"].layout, planted, "a000"), 0)  # every request there walls
        account(hosts["beta"].layout, planted, "z1")
        wait_until(lambda: {"a000", "z1"} <= published(alpha), "the fleet's accounts")
        store = Store(database)
        for i in range(samples):
            wait_until(functools.partial(done, alpha, submit(alpha, f"sample {i}")), "the session to go on on z1")
            time.sleep(0.6)  # gamma's gateway writes the 429's utilization within 0.5 s (its recorder)
            with store.transaction() as db:  # a000 as it was: no wall, no utilization (or z1 would rank first)
                db.execute("DELETE FROM walls WHERE account = 'a000'")
                db.execute("DELETE FROM usage WHERE account = 'a000'")
        ledger = sorted(store.ledger(100_000), key=lambda entry: entry["id"])
        store.close()
    walled, times = 0.0, []
    for entry in ledger:
        if entry["event"] == "wall recorded" and entry["account"] == "a000":
            walled = entry["at"]
        elif entry["event"] == "move started" and entry["detail"].get("source") == "a000":
            times.append(entry["at"] - walled)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 samples instead of 100")
    args = parser.parse_args()
    samples = 20 if args.quick else 100
    jobs, sessions = (1_000, 100) if args.quick else (10_000, 1_000)
    server = postgres.Server()
    try:
        ways = [(1, True, "1 to a transaction"), (PLACE_BATCH, True, f"{PLACE_BATCH} to one, store-wide lock")]
        ways.append((PLACE_BATCH, False, f"{PLACE_BATCH} to one, accounts held, jobs claimed (SKIP LOCKED)"))
        for batch, exclusive, how in ways * 2:  # side by side, twice: the machine is noisy
            rate = placement(server.database(), jobs, batch, exclusive=exclusive)
            verdict = "ok" if rate >= 2000 else "UNDER GOAL"
            print(f"placement, 3 placers at once, {how}: {rate:,.0f} jobs/s ({jobs:,} queued) [{verdict}]")
        times = status(server.database(), sessions, samples)
        print(f"status after a change, {len(HOSTS)} hosts x {sessions:,} sessions: {spread(times)} (n={samples})")
        moves = wall_to_move(server, samples // 2)
        print(f"wall on gamma's account -> alpha's move committed in flight: {spread(moves)} (n={len(moves)})")
        database = server.database()
        with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
            roots = {host: Path(tmp) / host for host in HOSTS}
            for host, root in roots.items():
                (root / "claude").mkdir(parents=True)
                for i in range(100):
                    land(root / "claude", f"{host}-a{i:03d}")
                stack.enter_context(daemons_named(root, ("balancer",), {"CL_STORE": database, "CL_HOST": host}))
            sockets = {host: root / "run" / "balancer.sock" for host, root in roots.items()}
            latencies = []
            for i in range(samples):
                host = HOSTS[i % len(HOSTS)]
                name = f"{host}-new{i:03d}"
                landed = land(roots[host] / "claude", name)
                pending = [socket for other, socket in sockets.items() if other != host]
                while pending:
                    pending = [socket for socket in pending if not listed(socket, host, name)]
                latencies.append(time.perf_counter() - landed)
                time.sleep(0.05)  # each sample from idle watchers, as a real drop would be
            name = database.split("?")[0].rsplit("/", 1)[1]
            ((connections,),) = server.sql("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", name)
        verdict = "ok" if percentile(latencies, 99) <= 0.1 else "OVER GOAL"
        print(f"file lands on one host -> listed by the other two: {spread(latencies)} (n={samples}) [{verdict}]")
        print(f"database connections, three idle balancers: {connections} ({connections / len(HOSTS):g} per host)")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
