"""The state store on a real SQLite file and a real PostgreSQL database, each test on both:
schema, jobs, walls, usage, ledger, concurrent writers."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import re
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

import postgres
from cl import cli_process, worker
from cl.claude_code.stream import StreamState
from cl.config import Config
from cl.states import RESCUABLE, RunState
from cl.store import (
    AsyncStore,
    NoRoom,
    Placement,
    Published,
    Renewal,
    Run,
    Snapshot,
    Store,
    StoreError,
    StoreUnavailable,
    Window,
)
from cl.store import postgresql as on_postgresql
from cl.store import sqlite as on_sqlite
from utils import wait_until


def migrations(where: Path | str) -> list[str]:
    return on_sqlite.MIGRATIONS if isinstance(where, Path) else on_postgresql.MIGRATIONS


def test_a_new_store_gets_the_schema_and_reopening_migrates_nothing(store: Store, store_at: Path | str) -> None:
    assert store.schema_version == len(migrations(store_at))
    if isinstance(store_at, Path):
        assert sqlite3.connect(store_at).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.add_job("/work/a", "do a")
    store.close()
    reopened = Store(store_at)
    assert reopened.schema_version == len(migrations(store_at))
    assert [job.prompt for job in reopened.jobs()] == ["do a"]
    reopened.close()


def test_a_newer_schema_is_refused(store: Store, store_at: Path | str) -> None:
    newer = len(migrations(store_at)) + 1
    with store.transaction() as db:
        if isinstance(store_at, Path):
            db.execute(f"PRAGMA user_version = {newer}")
        else:
            db.execute("UPDATE schema_version SET version = ?", (newer,))
    with pytest.raises(StoreError, match="newer than this cl"):
        Store(store_at)


def test_jobs_queue_survive_reopening_and_cancel(store: Store, store_at: Path | str) -> None:
    first = store.add_job("/work/a", "do a", model="opus", max_turns=3)
    second = store.add_job("/work/b", "do b")
    assert (first.state, first.model, first.max_turns) == ("queued", "opus", 3)
    store.close()
    reopened = Store(store_at)
    assert [job.id for job in reopened.jobs(("queued",))] == [first.id, second.id]
    cancelled = reopened.cancel_job(first.id)
    assert cancelled is not None
    assert (cancelled[0].state, cancelled[1]) == ("cancelled", None)  # no run to stop
    assert reopened.cancel_job(9999) is None
    assert [job.id for job in reopened.jobs(("queued",))] == [second.id]
    assert [entry["event"] for entry in reopened.ledger()] == ["job queued", "job queued", "job cancelled"]


def test_walls_stand_until_their_reset(store: Store) -> None:
    store.record_wall("a1", "rate_limit_event", reset_at=2000.0, kind="five_hour")
    store.record_wall("a2", "text", reset_at=None)
    assert set(store.walls(now=1000.0)) == {"a1", "a2"}
    assert set(store.walls(now=3000.0)) == {"a2"}
    store.record_wall("a1", "result", reset_at=5000.0)  # a later wall replaces the earlier one
    assert store.walls(now=3000.0)["a1"].source == "result"
    assert set(store.walls(now=9000.0)) == {"a2"}  # no known reset: it stands


def test_a_model_windows_wall_bars_that_model_and_a_default_one_and_no_other(store: Store) -> None:
    """`seven_day_opus` walls a1 for Opus (and for a job naming no model: the CLI's default may
    be Opus), inside the placing transactions too; Sonnet still goes there."""
    store.record_wall("a1", "api", reset_at=time.time() + 3600, kind="seven_day_opus")
    assert store.walls() == {}
    assert store.model_walls().keys() == {"a1"}
    assert (store.walled_for("a1", "claude-opus-4-5"), store.walled_for("a1", "claude-sonnet-4-5")) == (True, False)
    assert store.walled_for("a1", None)
    opus, default, sonnet = (store.add_job("/srv", m or "default", m) for m in ("opus", None, "sonnet"))
    with pytest.raises(NoRoom):
        store.place(opus.id, "a1", limit=5)
    refused, placed = store.place_many([Placement(default.id, "a1", 5), Placement(sonnet.id, "a1", 5)])
    assert isinstance(refused, NoRoom)
    assert isinstance(placed, Run)
    running = store.place(opus.id, "a2", limit=5)
    assert running is not None
    running = store.claim(running.id, 4242, "start", "/tmp/log")
    assert running is not None
    assert store.set_session(running.id, "s-opus")
    with pytest.raises(NoRoom):
        store.move_in_flight(running.id, "a1", 5, str)
    store.record_wall("a1", "api", reset_at=time.time() - 1, kind="seven_day_opus")  # its reset passed
    assert store.model_walls() == {}
    assert store.move_in_flight(running.id, "a1", 5, str) is not None


def test_a_wall_whose_reset_the_api_named_ends_with_no_probation(store: Store) -> None:
    """Past its reset, a wall the CLI reported (or a refused credential's) leaves its account on
    probation, one session until it answers; a usage window's wall from the API's headers does not."""
    past = time.time() - 1
    store.record_wall("a1", "cli", past, "five_hour")
    store.record_wall("a2", "api", past, "unauthorized")
    store.record_wall("a3", "api", past, "five_hour")
    store.record_wall("a4", "api", past, "seven_day")
    assert store.facts(RESCUABLE, 0).probation == {"a1", "a2"}


def test_a_windows_burn_rate_is_measured_within_its_period(store: Store) -> None:
    """Readings a minute or more apart measure the burn rate (averaged with the one before);
    closer ones wait; a new period (another reset) starts from its first reading, keeping the rate."""
    five = {"five_hour": 9000.0}
    store.record_usage("a1", {"five_hour": 0.10, "seven_day": 0.5}, 1000.0, resets={**five, "seven_day": 99000.0})
    assert store.windows()["a1"]["seven_day"] == Window(0.5, 99000.0, None, 1000.0)
    store.record_usage("a1", {"five_hour": 0.12}, 1030.0, resets=five)  # 30 s on: not yet
    assert store.windows()["a1"]["five_hour"] == Window(0.12, 9000.0, None, 1030.0)
    store.record_usage("a1", {"five_hour": 0.20}, 1360.0, resets=five)  # +0.10 in 6 min: 1.0 an hour
    assert store.windows()["a1"]["five_hour"].per_hour == pytest.approx(1.0)
    store.record_usage("a1", {"five_hour": 0.25}, 1720.0, resets=five)  # 0.5 an hour now: the mean
    assert store.windows()["a1"]["five_hour"].per_hour == pytest.approx(0.75)
    store.record_usage("a1", {"five_hour": 0.01}, 1800.0, resets={"five_hour": 27000.0})  # a new period
    assert store.windows()["a1"]["five_hour"][:2] == (0.01, 27000.0)
    assert store.windows()["a1"]["five_hour"].per_hour == pytest.approx(0.75)
    store.record_usage("a1", {"five_hour": 0.11}, 2160.0, resets={"five_hour": 27000.0})
    assert store.windows()["a1"]["five_hour"].per_hour == pytest.approx(0.875)  # from the new base


def test_a_windows_rate_per_session_is_shared_among_the_runs_live_when_measured(store: Store) -> None:
    """Two runs live on a1 while its window gains 1.0 an hour: 0.5 each, twice; then one, gaining
    0.5 an hour: still 0.5 each, while the account's own rate only halves toward it. A measure with
    none live (the gateway's probe of an idle account) leaves the rate per session as it was."""
    five = {"five_hour": 9000.0}
    runs = [store.place(store.add_job("/work/a", f"do {n}").id, "a1", limit=2) for n in range(2)]
    store.record_usage("a1", {"five_hour": 0.1}, 1000.0, resets=five)

    def measured(used: float, at: float) -> tuple[float | None, float | None]:
        store.record_usage("a1", {"five_hour": used}, at, resets=five)
        window = store.windows()["a1"]["five_hour"]
        return window.per_hour, window.per_session

    assert measured(0.2, 1360.0) == pytest.approx((1.0, 0.5))  # +0.1 in 6 min
    assert measured(0.3, 1720.0) == pytest.approx((1.0, 0.5))
    first, second = runs
    assert first is not None
    assert second is not None
    store.settle(first.id, RunState.DONE)
    assert measured(0.35, 2080.0) == pytest.approx((0.75, 0.5))  # one run: +0.05
    store.settle(second.id, RunState.DONE)
    assert measured(0.35, 2440.0) == pytest.approx((0.375, 0.5))  # none


def test_a_window_whose_period_follows_a_wall_says_so_for_that_period(store: Store) -> None:
    """A 5-hour period that follows one read used up (a wall) is marked, for all its readings; the
    next is not. Nor is one that follows an earlier period read under 1. A week read used up marks
    the 5-hour period read first after the week's reset, whatever order the headers came in."""

    def after_wall(period: str = "five_hour") -> bool:
        return store.windows()["a1"][period].after_wall

    store.record_usage("a1", {"five_hour": 0.4}, 1000.0, resets={"five_hour": 9000.0})
    store.record_usage("a1", {"five_hour": 1.0}, 2000.0, resets={"five_hour": 9000.0})  # the wall
    assert not after_wall()
    store.record_usage("a1", {"five_hour": 0.02}, 9100.0, resets={"five_hour": 27100.0})
    assert after_wall()
    store.record_usage("a1", {"five_hour": 0.6}, 12000.0, resets={"five_hour": 27100.0})
    assert after_wall()  # all that period
    store.record_usage("a1", {"five_hour": 0.01}, 27200.0, resets={"five_hour": 45200.0})
    assert not after_wall()
    week = {"seven_day": 30000.0, "five_hour": 46000.0}
    store.record_usage("a1", {"seven_day": 1.0, "five_hour": 0.3}, 28000.0, resets=week)  # the week's wall
    assert not after_wall()
    after = {"seven_day": 630000.0, "five_hour": 48000.0}
    store.record_usage("a1", {"seven_day": 0.01, "five_hour": 0.01}, 30100.0, resets=after)
    assert after_wall()
    assert after_wall("seven_day")


def test_the_dashboards_history_keeps_each_hours_last_reading_for_a_day(store: Store) -> None:
    now = 100 * 3600.0 + 1800
    for hour, (a1, a2) in {75: (0.9, 0.9), 98: (0.2, 0.4), 99: (0.3, 0.6), 100: (0.5, 0.7)}.items():
        for name, used in (("a1", a1), ("a2", a2)):
            store.record_usage(name, {"five_hour": used - 0.1}, hour * 3600.0, resets={"five_hour": now})
            store.record_usage(name, {"five_hour": used}, hour * 3600.0 + 60, resets={"five_hour": now})  # the last
    history = store.history(now, {"a1", "a2"}, top=1)
    assert history["fleet"]["five_hour"] == [  # hour 75 is over a day ago: not shown
        [98 * 3600, pytest.approx(0.3), pytest.approx(0.4)],
        [99 * 3600, pytest.approx(0.45), pytest.approx(0.6)],
        [100 * 3600, pytest.approx(0.6), pytest.approx(0.7)],
    ]
    assert history["accounts"] == {"a2": [[98 * 3600, 0.4], [99 * 3600, 0.6], [100 * 3600, 0.7]]}  # the fullest now
    assert list(store.history(now, {"a1"}, top=1)["accounts"]) == ["a1"]  # of the roster, always
    assert store.events(0) == []


def test_a_shorter_burn_step_measures_shorter_periods(store: Store) -> None:
    """`burn_step` (accelerated time, bench/week.py): readings a step apart measure, and a reset
    a step or more later is a new period."""
    store.record_usage("a1", {"five_hour": 0.1}, 1000.0, resets={"five_hour": 1004.0}, burn_step=0.5)
    store.record_usage("a1", {"five_hour": 0.2}, 1001.0, resets={"five_hour": 1004.0}, burn_step=0.5)
    assert store.windows()["a1"]["five_hour"].per_hour == pytest.approx(360.0)  # +0.1 a second
    store.record_usage("a1", {"five_hour": 0.0}, 1005.0, resets={"five_hour": 1009.0}, burn_step=0.5)
    store.record_usage("a1", {"five_hour": 0.1}, 1006.0, resets={"five_hour": 1009.0}, burn_step=0.5)
    assert store.windows()["a1"]["five_hour"].per_hour == pytest.approx(360.0)  # the new period's own


def test_usage_keeps_what_a_report_does_not_say(store: Store) -> None:
    store.record_usage("a1", {"five_hour": 0.5, "seven_day": 0.2}, used_at=100.0, tokens=(10, 3))
    store.record_usage("a1", {"five_hour": 0.7}, tokens=(5, 1))
    assert store.usage() == {
        "a1": {"five_hour": 0.7, "seven_day": 0.2, "last_used_at": 100.0, "input_tokens": 15, "output_tokens": 4}
    }


def test_two_processes_write_at_once_without_locking_errors(store: Store, store_at: Path | str) -> None:
    code = (
        "import sys; from cl.store import Store\n"
        "s = Store(sys.argv[1])\n"
        "for i in range(200): s.add_job('/w', f'{sys.argv[2]}-{i}')\n"
    )
    writers = [subprocess.Popen([sys.executable, "-c", code, str(store_at), name]) for name in ("x", "y")]
    assert [writer.wait(60) for writer in writers] == [0, 0]
    assert len(store.jobs(("queued",))) == 400


async def test_async_store_runs_calls_in_order_off_the_loop(store: Store) -> None:
    async_store = AsyncStore(store)
    jobs = [await async_store.add_job("/w", f"p{i}") for i in range(5)]
    assert [job.prompt for job in await async_store.call(Store.jobs)] == [job.prompt for job in jobs]
    async_store.close()


def test_status_snapshot_sees_every_commit_from_this_or_another_connection(store: Store, store_at: Path | str) -> None:
    other = Store(store_at)  # a worker or the rescuer, in another process

    def shown(snapshot: Snapshot) -> tuple[Any, ...]:
        listing, counts = snapshot.listing, snapshot.counts
        jobs, sessions = json.loads(listing.jobs_json), json.loads(listing.sessions_json)
        return (
            jobs,
            sessions,
            listing.queue,
            counts.live,
            counts.usage,
            set(snapshot.walls),
            snapshot.windows,
            snapshot.settings,
        )

    def fresh() -> Snapshot:  # read by a store that has kept nothing
        reader = Store(store_at)
        try:
            return reader.snapshot()
        finally:
            reader.close()

    assert shown(store.snapshot()) == ([], [], 0, {}, {}, set(), {}, {})
    first = other.add_job("/work/a", "do a")
    steps: list[Callable[[], object]] = [
        lambda: store.place(first.id, "a1", limit=1),
        lambda: other.claim(1, 4242, "start", "/tmp/log"),
        lambda: other.set_session(1, "5e55-1011"),
        lambda: other.record_usage("a1", {"five_hour": 0.5}, tokens=(3, 4)),
        lambda: other.record_usage("a1", {"five_hour": 0.6}, 100.0, resets={"five_hour": 9000.0}),
        lambda: other.record_usage("a1", {"five_hour": 0.7}, 100.0, resets={"five_hour": 9000.0}),  # the same moment
        lambda: other.set_account("a1", 0, pause_at=0.9),
        lambda: other.record_wall("a2", "result", reset_at=None),
        lambda: store.settle(1, "done"),  # type: ignore[arg-type]
        lambda: other.add_job("/work/b", 'say "hi"\n'),
        lambda: other.cancel_job(2),
    ]
    for step in steps:
        before = store.snapshot()
        step()
        after = store.snapshot()
        assert shown(after) == shown(fresh()) != shown(before)
        assert shown(store.snapshot()) == shown(after)  # unchanged since: the same answer
    jobs, sessions, queue, live, usage, walls, _windows, _settings = shown(after)
    kept = store.snapshot()
    other.publish("host-b", [])  # a commit that changes none of it (a heartbeat)
    again = store.snapshot()
    assert (again.counts, again.windows, again.settings) == (kept.counts, kept.windows, kept.settings)
    assert again.counts is kept.counts  # nothing read again
    assert again.windows is kept.windows
    assert [(job["id"], job["state"]) for job in jobs] == [(1, "done"), (2, "cancelled")]
    assert sessions == [
        {
            "session_id": "5e55-1011",
            "job": 1,
            "account": "a1",
            "state": "done",
            "cwd": "/work/a",
            "host": None,
            "started_at": sessions[0]["started_at"],
            "error": None,
        }
    ]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", jobs[0]["created_at"])
    assert (queue, live, usage, walls) == (0, {}, {"a1": (0.7, None, 3, 4)}, {"a2"})
    before = store.snapshot()
    other.record_usage("a1", {"seven_day": 0.1})  # usage alone: the jobs' listing is kept
    assert store.snapshot().listing is before.listing
    other.close()


def test_a_claimed_run_is_never_abandoned(store: Store) -> None:
    """A restarting daemon read the run as `starting`; its worker claimed it a moment later:
    the abandon that follows must lose, or the session would run twice."""
    job = store.add_job("/work/a", "do a")
    run = store.place(job.id, "a1", limit=1)
    assert run is not None
    assert store.claim(run.id, 4242, "start", "/tmp/log") is not None
    assert store.settle(run.id, RunState.ABANDONED, "launcher stopped first") is None
    claimed = store.get_run(run.id)
    assert claimed is not None
    assert (claimed.state, store.get_job(job.id).state) == ("running", "running")  # type: ignore[union-attr]


def test_a_session_that_changed_hands_fences_off_its_old_worker(store: Store) -> None:
    """Every claim by a new worker, and every orphaning, moves the job's epoch on; the old
    worker's renewal then says `FENCED`, and none of its writes for the session land."""
    job = store.add_job("/work/a", "do a")
    first = store.place(job.id, "a1", limit=2)
    assert first is not None
    first = store.claim(first.id, 4242, "start", "/tmp/log")
    assert first is not None
    assert first.epoch == 1
    assert first.lease_until is not None
    assert store.renew(first.id, 30) is Renewal.RENEWED
    assert store.set_session(first.id, "s-1") is True
    orphaned = store.settle(first.id, RunState.ORPHANED, "its lease lapsed")  # the rescuer takes it over
    assert orphaned is not None
    assert store.get_job(job.id).epoch == 2  # type: ignore[union-attr]
    assert store.renew(first.id, 30) is Renewal.FENCED
    assert store.set_session(first.id, "s-old") is False
    store.record_wall("a1", "cli", time.time() - 1)  # a reset wall, which an answer would lift
    assert store.answered(first.id) is None  # not an answer of the session's: nothing lifted
    store.record_result(first.id, '{"result": "stale"}')
    assert store.get_run(first.id).result is None  # type: ignore[union-attr]
    assert store.follow_up(first.id, str) is None
    assert store.move_in_flight(first.id, "a2", 2, str) is None
    second = store.place(job.id, "a2", limit=2, resume="s-1")
    assert second is not None
    assert store.claim(second.id, 4343, "start", "/tmp/log", epoch=1) is None  # the old worker's epoch
    second = store.claim(second.id, 4343, "start", "/tmp/log")
    assert second is not None
    assert second.epoch == 3
    assert store.get_job(job.id).session_id == "s-1"  # type: ignore[union-attr]  # not the old worker's
    assert store.set_session(second.id, "s-new") is True


def test_a_worker_that_ended_its_run_renews_nothing_and_is_not_fenced(store: Store) -> None:
    """Between runs (held for a live move, a turn ended) a renewal finds nothing running: `IDLE`,
    and the live move handed to the same worker is claimed in the same epoch."""
    job = store.add_job("/work/a", "do a")
    run = store.place(job.id, "a1", limit=2)
    assert run is not None
    run = store.claim(run.id, 4242, "start", "/tmp/log")
    assert run is not None
    assert store.set_session(run.id, "s-1")
    store.settle(run.id, RunState.WALLED, "walled", held_until=time.time() + 60)
    assert store.renew(run.id, 30) is Renewal.IDLE
    handed = store.place(job.id, "a2", limit=2, resume="s-1", live=True)
    assert handed is not None
    moved = store.claim(handed.id, 4242, "start", "/tmp/log", epoch=run.epoch)
    assert moved is not None
    assert moved.epoch == run.epoch
    assert store.renew(moved.id, 30) is Renewal.RENEWED


def test_a_run_whose_lease_lapsed_is_found_and_holds_no_room(store: Store) -> None:
    """A run whose worker stopped renewing (its host gone, or cut off) is the rescuer's to orphan,
    and its account's room is free again: its CLI was stopped before the lease lapsed."""
    job, other = store.add_job("/work/a", "do a"), store.add_job("/work/b", "do b")
    run = store.place(job.id, "a1", limit=1)
    assert run is not None
    assert store.claim(run.id, 4242, "start", "/tmp/log", lease=60) is not None
    assert store.lapsed() == []
    with pytest.raises(NoRoom):
        store.place(other.id, "a1", limit=1)
    assert store.renew(run.id, 0) is Renewal.RENEWED  # a lease of no time: lapsed at once
    wait_until(lambda: [lapsed.id for lapsed in store.lapsed()] == [run.id], what="the lease to lapse")
    assert store.live_counts().get("a1", 0) == 0
    assert store.place(other.id, "a1", limit=1) is not None


def _open_at_once(where: Path | str, barrier: Any) -> None:
    barrier.wait()
    Store(where).close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_processes_opening_a_fresh_store_at_once_both_succeed(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """`systemctl enable --now` of both daemons on a fresh install opens the store twice at the same
    instant: switching to WAL can find the file locked without SQLite's busy handler waiting, and
    two migrations of an empty database must not both make the schema."""
    server = request.getfixturevalue("postgresql") if backend == "postgresql" else None

    def fresh(trial: int) -> Path | str:
        return tmp_path / f"{trial}.db" if server is None else server.database()

    trials = 200 if server is None else 20
    context = multiprocessing.get_context("fork")
    failed = 0
    for trial in range(trials):
        barrier = context.Barrier(2)
        where = fresh(trial)
        openers = [context.Process(target=_open_at_once, args=(where, barrier)) for _ in range(2)]
        for opener in openers:
            opener.start()
        for opener in openers:
            opener.join()
        failed += sum(1 for opener in openers if opener.exitcode)
    assert failed == 0


def test_a_wall_the_cli_announces_stands_a_week_at_most(store: Store) -> None:
    """The CLI's output says when its account's wall resets; a hostile one cannot bench it for a year."""
    job = store.add_job("/srv", "x")
    run = store.place(job.id, "a1", limit=1)
    assert run is not None
    state = StreamState()
    year_3000 = 32503680000
    info = {"status": "rejected", "resetsAt": year_3000, "rateLimitType": "five_hour"}
    state.feed(json.dumps({"type": "rate_limit_event", "rate_limit_info": info}))
    worker._settle(Config(gateway=False), store, run, state, 1)  # direct mode: the CLI says
    wall = store.walls()["a1"]
    assert wall.reset_at is not None
    assert wall.reset_at <= time.time() + worker.MAX_WALL


def test_retention_forgets_finished_jobs_and_their_history_and_keeps_live_work(store: Store) -> None:
    jobs = {state: store.add_job("/srv", state) for state in ("done", "failed", "cancelled", "running", "recent")}
    for state in ("done", "failed", "cancelled", "running"):
        run = store.place(jobs[state].id, "a1", limit=10)
        assert run is not None
        if state != "running":
            store.settle(run.id, RunState.FAILED if state == "failed" else RunState.DONE, None)
    store.cancel_job(jobs["cancelled"].id)
    recent = store.place(jobs["recent"].id, "a1", limit=10)
    assert recent is not None
    store.settle(recent.id, RunState.DONE)
    old = time.time() - 40 * 86400
    with store.transaction() as db:  # all but "recent" last changed 40 days ago
        db.execute("UPDATE jobs SET updated_at = ? WHERE prompt != 'recent'", (old,))
        db.execute("UPDATE ledger SET at = ? WHERE job_id != ? OR job_id IS NULL", (old, jobs["recent"].id))
    store.record_wall("a1", "cli", time.time() + 60)  # a ledger row about no job, from now: kept
    for host in ("renamed", "current"):
        store.publish(host, [Published("a1", "ok", "f1")])
    with store.transaction() as db:  # the machine's name changed 40 days ago
        db.execute("UPDATE hosts SET heartbeat_at = ? WHERE name = 'renamed'", (old,))

    assert store.prune(time.time() - 30 * 86400) == 3
    kept = {job.prompt for job in store.jobs()}
    assert kept == {"running", "recent"}
    assert {run.job_id for run in store.runs_in(tuple(RunState))} == {jobs["running"].id, jobs["recent"].id}
    assert {entry["job_id"] for entry in store.ledger(1000)} == {jobs["running"].id, jobs["recent"].id, None}
    assert store.add_job("/srv", "next").id > jobs["recent"].id  # ids are never reused
    assert [(host.name, host.accounts) for host in store.hosts()] == [("current", (Published("a1", "ok", "f1"),))]


def test_a_session_is_found_by_the_start_of_its_id(store: Store) -> None:
    for session in ("abcd1111-0000-0000-0000-000000000000", "abcd2222-0000-0000-0000-000000000000"):
        run = store.place(store.add_job("/srv", session).id, "a1", limit=10)
        assert run is not None
        store.set_session(run.id, session)
    assert store.jobs_with_session("abcd1") == [1]
    assert store.jobs_with_session("abcd") == [1, 2]  # ambiguous: the caller asks for more of it
    assert store.jobs_with_session("abcd_") == []  # LIKE's wildcards are only letters here
    assert store.jobs_with_session("ffff") == []


def test_a_result_the_cli_prints_is_stored_bounded() -> None:
    huge = {
        "type": "result",
        "subtype": "success",
        "result": "x" * 1_000_000,
        "total_cost_usd": float("inf"),
        "usage": {"input_tokens": 2**70, "output_tokens": -5},
        "errors": ["e" * 10_000] * 1000,
        "junk": ["y" * 1000] * 1000,
    }
    kept = worker._kept(huge)
    assert len(json.dumps(kept)) < 40_000
    assert kept["usage"] == {"input_tokens": worker.MAX_TOKENS, "output_tokens": 0}
    assert "total_cost_usd" not in kept
    assert "junk" not in kept


def test_a_runs_log_keeps_a_bounded_amount_of_what_the_cli_prints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli_process, "MAX_LOG_BYTES", 1000)
    out = cli_process.Output(tmp_path / "run.log")
    for i in range(100):
        out.write(f"line {i:04d} " + "x" * 40 + "\n")
    out.close()
    text = (tmp_path / "run.log").read_text()
    assert len(text) <= 1000 + 100
    assert text.endswith("[cl: the output goes on; the log keeps no more of it]\n")
    assert text.count("[cl:") == 1


def _place_at_once(where: Path | str, job_id: int, barrier: Any, placed: Any) -> None:
    store = Store(where)
    barrier.wait()
    with contextlib.suppress(NoRoom):
        if job_id % 2:  # a move's placement (exclusive) ...
            run: Run | NoRoom | None = store.place(job_id, "a1", limit=2)
        else:  # ... or a balancer's batch (not exclusive on PostgreSQL: the account is held instead)
            (run,) = store.place_many([Placement(job_id, "a1", 2)])
        if isinstance(run, Run):
            with placed.get_lock():
                placed.value += 1
    store.close()


def test_writers_racing_to_place_never_exceed_an_accounts_limit(store: Store, store_at: Path | str) -> None:
    """Placing counts an account's live runs and adds one in one transaction: writers adding to
    one account never interleave there (SQLite's write lock; on PostgreSQL the account's lock,
    which batches and single placements both take), or two placers that both counted one live
    run would both add theirs."""
    context = multiprocessing.get_context("fork")
    for _round in range(5):
        jobs = [store.add_job("/srv", f"p{i}") for i in range(8)]
        barrier, placed = context.Barrier(len(jobs)), context.Value("i", 0)
        placers = [context.Process(target=_place_at_once, args=(store_at, job.id, barrier, placed)) for job in jobs]
        for placer in placers:
            placer.start()
        for placer in placers:
            placer.join(60)
        assert [placer.exitcode for placer in placers] == [0] * len(jobs)
        assert placed.value == 2
        assert store.live_counts() == {"a1": 2}
        for run in store.runs_in():
            store.settle(run.id, RunState.DONE)


def _in_thread(call: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    answer: list[Any] = []
    thread = threading.Thread(target=lambda: answer.append(call()), daemon=True)
    thread.start()
    return thread, answer


def test_a_batch_skips_the_jobs_another_writer_holds_and_waits_only_for_its_accounts(
    postgresql: postgres.Server,
) -> None:
    """PostgreSQL: placement does not wait for an exclusive writer. A job another transaction holds
    (a cancel under way, another placer) is skipped, not waited for (`FOR UPDATE SKIP LOCKED`): the rest
    of the batch is placed, and the skipped job the next time. An account another transaction
    holds makes a batch on it wait; a batch on another account goes by meanwhile."""
    database = postgresql.database()
    store, apart = Store(database), Store(database)  # the second: another host's, opened before
    try:
        first, second, third = (store.add_job("/srv", f"p{i}").id for i in range(3))
        with psycopg.connect(database, autocommit=True) as other:
            other.execute("BEGIN")
            other.execute("SELECT pg_advisory_xact_lock(%s)", (on_postgresql.WRITE_LOCK,))  # an exclusive writer
            other.execute("SELECT 1 FROM jobs WHERE id = %s FOR UPDATE", (first,))
            other.execute("SELECT pg_advisory_xact_lock(%s, hashtext('a1'))", (on_postgresql.ACCOUNT_LOCKS,))
            elsewhere, placed = _in_thread(
                lambda: store.place_many([Placement(first, "a2", 5), Placement(second, "a2", 5)])
            )
            elsewhere.join(30)
            assert not elsewhere.is_alive()  # neither the held job nor the held account stopped it
            assert placed[0][0] is None
            assert isinstance(placed[0][1], Run)
            waiting, on_a1 = _in_thread(lambda: apart.place_many([Placement(third, "a1", 5)])[0])
            wait_until(lambda: _waits_for_a_lock(postgresql), "the batch on a1 to wait for a1")
            assert not on_a1
            other.execute("COMMIT")
        waiting.join(30)
        assert isinstance(on_a1[0], Run)
        assert isinstance(store.place_many([Placement(first, "a2", 5)])[0], Run)  # no longer held
    finally:
        store.close()
        apart.close()


def _waits_for_a_lock(server: postgres.Server) -> bool:
    """A transaction waits for an account's lock (`lock_accounts`)."""
    return bool(
        server.sql("SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE %s", "%hashtext%")
    )


def test_placements_in_one_transaction_each_stand_or_meet_no_room_alone(store: Store) -> None:
    """`place_many`: each placement counts the ones before it in the same transaction; one that
    meets no room writes nothing, and the others stand; a job no longer waiting is None."""
    jobs = [store.add_job("/srv", f"j{i}") for i in range(5)]
    store.cancel_job(jobs[3].id)
    store.record_wall("walled", "api", time.time() + 3600, "five_hour")
    outcomes = store.place_many(
        [
            Placement(jobs[0].id, "a1", 2),
            Placement(jobs[1].id, "a1", 2),
            Placement(jobs[2].id, "a1", 2),  # a1 holds two live runs now: the two above
            Placement(jobs[3].id, "a2", 2),
            Placement(jobs[4].id, "walled", 2),
        ]
    )
    assert [type(outcome).__name__ for outcome in outcomes] == ["Run", "Run", "NoRoom", "NoneType", "NoRoom"]
    assert store.live_counts() == {"a1": 2}
    assert [job.state for job in store.jobs()] == ["running", "running", "queued", "cancelled", "queued"]
    assert [e["event"] for e in store.ledger(100)].count("job placed") == 2


def test_a_server_that_drops_its_connections_is_waited_out_then_used_again(postgresql: postgres.Server) -> None:
    """The database restarts, or cuts this host off: calls fail as `StoreUnavailable` (which every
    caller waits out) while it cannot be reached, and work again once it can, on a new connection."""
    where = postgresql.database()
    name = where.split("?")[0].rsplit("/", 1)[1]
    store = Store(where, busy_timeout=1.0)
    store.add_job("/srv", "before")
    postgresql.sql(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
    postgresql.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", name)
    with pytest.raises(StoreUnavailable, match=f"state store postgresql database {name} on "):
        store.add_job("/srv", "while cut off")
    postgresql.sql(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
    wait_until(lambda: _added(store, "after"), "the store to reach its database again")
    assert [job.prompt for job in store.jobs()] == ["before", "after"]
    store.close()


def _added(store: Store, prompt: str) -> bool:
    try:
        store.add_job("/srv", prompt)
    except StoreUnavailable:
        return False
    return True
