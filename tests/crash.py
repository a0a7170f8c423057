"""Kill -9 a daemon while it places jobs and moves sessions live, start it again, judge every job.

Used by tests/test_crash.py (trials in CI) and bench/crash_stress.py (as many as asked). Each
trial starts both daemons on a fresh layout with the fake `claude`: three sessions wall on a1..a3
(every account walled) and are held alive by their workers for a live move, three jobs queue
behind them. Then two healthy accounts are dropped in (a4, a5), so that placements and live moves
run at once, the victim gets SIGKILL after a random delay, and is started again. The victim
"host" is the whole host: both daemons and every worker (their CLIs with them) at once, as when
a machine loses power. On PostgreSQL the victim may also be the database: every process of the
server killed -9 at that moment and started again (it recovers from its write-ahead log).

A verdict lists every problem: a job not done, a job started fresh more than once, a walled
session continued on the new accounts other than exactly once or without its history, a session
with two live processes at once, a transcript lost or not continued. When the whole host dies,
the turns it cut short are run again (its CLIs died mid-turn: nothing of those turns was kept),
so there the rule is what survives a power cut: every job done, its work completed by exactly
one run, every resumed session resumed with its history, never two live processes at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import signal
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import postgres
from cl.store import Job, Store
from utils import DaemonProcess, Layout, Planted, cl, end_workers, oauth_credential, wait_until, write_credential

BUSY_TIMEOUT = 0.2
"""The trials' store busy timeout: the random locks outlast it."""
WALLED = 3
QUEUED = 3
HEALTHY = ("a4", "a5")
DAEMONS = ("balancer", "rescue")


@dataclasses.dataclass(frozen=True)
class Verdict:
    victim: str
    delay: float
    """Seconds between the files landing and SIGKILL."""
    work_before_kill: int
    """Placements and moves onto the new accounts written when the kill came (0 to 6)."""
    unfinished_at_kill: int
    """Jobs not done yet when the kill came: work in flight (written or not)."""
    live_moves: int
    """Moves onto the new accounts made live (a move the kill rolled back is made again, live or not)."""
    restart: float
    """Seconds from the restarted victim's exec to its socket answering (it is READY by then); for
    the database, from its kill to its accepting connections again (crash recovery included)."""
    problems: list[str]


def trial(
    root: Path,
    planted: Planted,
    rng: random.Random,
    victim: str,
    database: postgres.Server | None = None,
) -> Verdict:
    """One kill. On SQLite, while the store is also locked at random moments past its busy timeout
    (by another writer, as a backup or a sqlite3 shell would): the daemons and workers wait it
    out. On `database` (a database of its own there), `victim` "database" kills the server -9."""
    layout = Layout(root, store=database.database() if database is not None else "")
    locks = layout.root / "session-locks"
    locks.mkdir()
    env = layout.env(CL_STORE_BUSY_TIMEOUT=str(BUSY_TIMEOUT), FAKE_CLAUDE_SESSION_LOCKS=str(locks))
    walled = [planted.token() for _ in range(WALLED)]
    for i, token in enumerate(walled, start=1):
        write_credential(layout.credentials, f"a{i}", oauth_credential(planted, token=token))
    layout.quota(dict.fromkeys(walled, 0))
    daemons = {name: DaemonProcess(name, layout, env=env).start() for name in DAEMONS}
    try:
        with layout.started_together(WALLED):
            for i in range(WALLED):
                cl(layout, "submit", "--cwd", str(layout.work), "--prompt", f"walls {i}")
        wait_until(lambda: _held(layout) == WALLED, "every session to be held for a live move")
        for i in range(QUEUED):
            cl(layout, "submit", "--cwd", str(layout.work), "--prompt", f"queued {i}")
        before = _work(layout)
        tokens = {}
        locked = _locked_at_random(layout.state / "cl.db", random.Random(rng.random())) if database is None else None
        with locked or contextlib.nullcontext():
            for name in HEALTHY:
                tokens[name] = planted.token()
                write_credential(layout.credentials, name, oauth_credential(planted, token=tokens[name]))
            delay = rng.uniform(0, 0.15)  # the files land; the work is written in some 20 ms, done in 100
            time.sleep(delay)  # a random point in the work: the kill is what is random, not what we assert
            restart = _strike(victim, layout, daemons, database)
            work_before_kill = _work(layout) - before
            unfinished = sum(job.state != "done" for job in _jobs(layout))
            if victim != "database":
                began = time.perf_counter()
                for name in _killed(victim):
                    daemons[name] = DaemonProcess(name, layout, env=env).start()
                restart = time.perf_counter() - began
        wait_until(lambda: {job.state for job in _jobs(layout)} == {"done"}, "every job to finish", timeout=60)
        wait_until(lambda: _events(layout).count("move settled") >= WALLED, "every move to be settled")
    finally:
        for daemon in daemons.values():
            daemon.stop()
        end_workers(layout)
    live = sum(
        event["event"] == "move started" and event["account"] in HEALTHY and event["detail"]["live"]
        for event in _ledger(layout)
    )
    problems = _problems(layout, set(tokens.values()), whole_host=victim == "host")
    return Verdict(victim, delay, work_before_kill, unfinished, live, restart, problems)


def _killed(victim: str) -> tuple[str, ...]:
    """The daemons a kill of `victim` takes down."""
    return DAEMONS if victim == "host" else (victim,)


def _strike(victim: str, layout: Layout, daemons: dict[str, DaemonProcess], database: postgres.Server | None) -> float:
    """SIGKILL to the victim (a whole host: its daemons, then every worker, their CLIs with them;
    the database: every process of the server, started again): how long the database took to
    accept connections again (0 for the others, started by the trial)."""
    if victim == "database":
        assert database is not None
        began = time.perf_counter()
        database.crash()
        return time.perf_counter() - began
    for name in _killed(victim):
        daemons[name].stop(signal.SIGKILL)
    if victim == "host":
        end_workers(layout)
    return 0.0


def _held(layout: Layout) -> int:
    store = _store(layout)
    try:
        return sum(run.held_until is not None for run in store.runs_in(("walled",)))
    finally:
        store.close()


@contextlib.contextmanager
def _locked_at_random(database: Path, rng: random.Random) -> Iterator[None]:
    """Meanwhile, another writer takes the store's lock now and then, for up to three busy timeouts."""
    stop = threading.Event()

    def lock() -> None:
        other = sqlite3.connect(database, isolation_level=None, timeout=30)
        try:
            while not stop.wait(rng.uniform(0, 0.2)):
                other.execute("BEGIN IMMEDIATE")
                stop.wait(rng.uniform(0, 3 * BUSY_TIMEOUT))
                other.execute("ROLLBACK")
        finally:
            other.close()

    locker = threading.Thread(target=lock, daemon=True)
    locker.start()
    try:
        yield
    finally:
        stop.set()
        locker.join()


def _problems(layout: Layout, healthy: set[str], *, whole_host: bool) -> list[str]:
    problems = _power_cut_problems(layout) if whole_host else _exactly_once_problems(layout, healthy)
    calls = layout.claude_calls()
    problems += [
        f"session {call['session_id']}: resumed without its history"
        for call in calls
        if call["prompt"] == "continue" and call["history"] < 1
    ]
    problems += [f"session {call['session_id']}: two live processes at once" for call in calls if call["overlap"]]
    return problems


def _power_cut_problems(layout: Layout) -> list[str]:
    problems = []
    store = _store(layout)
    try:
        for job in store.jobs():
            done = [run for run in store.job_runs(job.id) if run.state == "done"]
            if job.state != "done" or len(done) != 1:
                problems.append(f"job {job.id}: {job.state}, completed by {len(done)} runs")
            kept = list((layout.sessions / f"job-{job.id}" / "projects").rglob(f"{job.session_id}.jsonl"))
            if len(kept) != 1 or "Hi from fake claude" not in kept[0].read_text():
                problems.append(f"job {job.id}: its session's transcript lost or not continued")
    finally:
        store.close()
    return problems


def _exactly_once_problems(layout: Layout, healthy: set[str]) -> list[str]:
    problems = []
    jobs = _jobs(layout)
    calls = layout.claude_calls()
    fresh = Counter(call["prompt"] for call in calls if call["prompt"] != "continue")
    tails = {token[-6:] for token in healthy}
    resumed = [call for call in calls if call["prompt"] == "continue" and call["token_tail"] in tails]
    per_session = Counter(call["session_id"] for call in resumed)
    for job in jobs:
        if job.state != "done":
            problems.append(f"job {job.id}: {job.state}")
        if job.prompt.startswith("queued") and fresh[job.prompt] != 1:
            problems.append(f"job {job.id}: started {fresh[job.prompt]} times")
        if job.prompt.startswith("walls") and per_session[job.session_id] != 1:
            problems.append(f"job {job.id}: resumed {per_session[job.session_id]} times on the new accounts")
        transcripts = list((layout.sessions / f"job-{job.id}" / "projects").rglob("*.jsonl"))
        if len(transcripts) != 1 or "Hi from fake claude" not in transcripts[0].read_text():
            problems.append(f"job {job.id}: transcript lost or not continued")
    return problems


def _store(layout: Layout) -> Store:
    return Store(layout.database)


def _jobs(layout: Layout) -> list[Job]:
    store = _store(layout)
    try:
        return store.jobs()
    finally:
        store.close()


def _ledger(layout: Layout) -> list[dict[str, Any]]:
    store = _store(layout)
    try:
        return store.ledger(100_000)
    finally:
        store.close()


def _events(layout: Layout) -> list[str]:
    return [entry["event"] for entry in _ledger(layout)]


def _work(layout: Layout) -> int:
    events = _events(layout)
    return events.count("move started") + events.count("job placed")
