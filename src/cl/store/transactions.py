"""The state store's transactions, the same SQL on every backend (`cl.store.sqlite`,
`cl.store.postgresql`).

`Store(where)` opens the store at `where`: a file path for SQLite (the embedded default), or a
`postgresql://` URL for a fleet's shared database. Each method is one transaction (or one read);
writers never interleave on either backend. The store never holds the roster: an account here is
only a name that facts are keyed by, and whether that account exists is the registry's answer alone.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import time
from collections.abc import Callable, Collection, Container, Hashable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cl.config import BURN_STEP, LEASE
from cl.states import FINISHED_JOBS, LIVE_JOBS, LIVE_RUNS, RESCUABLE, JobState, RunState
from cl.store.backend import Backend, Db, Lookup, capability_run, inserted, inserted_many, sql_set
from cl.store.records import (
    BUSY_TIMEOUT,
    HISTORY_HOURS,
    MODEL_WINDOWS,
    MOVED_EARLY,
    NEEDS_LOGIN,
    AccountCounts,
    AccountSettings,
    Facts,
    Home,
    HostRecord,
    Job,
    Listing,
    NoRoom,
    Placement,
    Published,
    Renewal,
    Run,
    Snapshot,
    WallRecord,
    Window,
    model_walled,
)
from cl.store.sqlite import SqliteBackend


class Store:
    def __init__(self, where: Path | str, busy_timeout: float = BUSY_TIMEOUT) -> None:
        self._backend: Backend = open_backend(where, busy_timeout)
        self._shown: (
            tuple[
                Hashable,
                int | None,
                AccountCounts,
                dict[str, AccountSettings],
                dict[str, dict[str, Window]],
                tuple[Any, ...],
            ]
            | None
        ) = None
        """What `snapshot` read, with the backend's changes key it was read at, the ledger's
        revision then and the `READINGS` of usage and windows."""
        self._digest: tuple[Sequence[Published], str] | None = None
        """The roster `publish` was last given, and its digest."""
        self._listings: dict[tuple[int | None, bool], tuple[int | None, Listing]] = {}
        """Each listing (a submitter's or everyone's, with finished jobs or not), with the ledger
        revision it was read at."""

    @property
    def schema_version(self) -> int:
        return self._backend.schema_version()

    def close(self) -> None:
        self._backend.close()

    def lookup(self) -> Lookup | None:
        """Reads for an event loop's own thread that never wait, where the backend has them."""
        return self._backend.lookup()

    @contextmanager
    def transaction(self, *, write: bool = True, exclusive: bool = True) -> Iterator[Db]:
        """One transaction: with `write`, no other writer interleaves (raises `IllegalTransition`
        for a state change `cl.states` does not allow), unless not `exclusive` (`Backend.transaction`:
        placement only); without, a consistent read."""
        with self._backend.transaction(write=write, exclusive=exclusive) as db:
            yield db

    def _rows(self, sql: str, parameters: Sequence[Any] = ()) -> list[Any]:
        """A read's rows (inside the current transaction, if one is open)."""
        with self._backend.reading() as db:
            return db.execute(sql, parameters).fetchall()

    def _row(self, sql: str, parameters: Sequence[Any] = ()) -> Any:
        with self._backend.reading() as db:
            return db.execute(sql, parameters).fetchone()

    def record(self, db: Db, event: str, job_id: int | None = None, account: str | None = None, **detail: Any) -> None:
        """Append to the ledger, inside the caller's transaction."""
        self.records(db, [(event, job_id, account, detail)])

    @staticmethod
    def records(db: Db, entries: Sequence[tuple[str, int | None, str | None, dict[str, Any]]]) -> None:
        """Append several (event, job, account, detail) to the ledger, in one call."""
        now = time.time()
        db.executemany(
            "INSERT INTO ledger (at, event, job_id, account, detail) VALUES (?, ?, ?, ?, ?)",
            [(now, *entry[:3], json.dumps(entry[3], default=str) if entry[3] else None) for entry in entries],
        )

    # jobs

    def add_job(
        self,
        cwd: str,
        prompt: str,
        model: str | None = None,
        max_turns: int | None = None,
        *,
        submitter: int | None = None,
        host: str | None = None,
    ) -> Job:
        now = time.time()
        with self.transaction() as db:
            job = Job(
                *inserted(
                    db,
                    "INSERT INTO jobs (cwd, prompt, model, max_turns, state, created_at, updated_at, submitter, host)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (cwd, prompt, model, max_turns, JobState.QUEUED, now, now, submitter, host),
                )
            )
            self.record(db, "job queued", job.id, cwd=cwd)
        return job

    def get_job(self, job_id: int) -> Job | None:
        row = self._row("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return Job(*row) if row else None

    def jobs(self, states: tuple[str, ...] | None = None, limit: int | None = None) -> list[Job]:
        query, args = "SELECT * FROM jobs", list[Any]()
        if states:
            query += f" WHERE state IN ({', '.join('?' * len(states))})"
            args.extend(states)
        query += " ORDER BY id"
        if limit is not None:
            query += " LIMIT ?"
            args.append(limit)
        return [Job(*row) for row in self._rows(query, args)]

    def cancel_job(self, job_id: int) -> tuple[Job, Run | None] | None:
        """Cancel a job in any state but finished: nothing places, moves or resumes it again, and a
        run not yet claimed is ended here. The job afterwards, with its run still running (whose
        worker must stop its CLI) or held; None if there is no such job."""
        now = time.time()
        with self.transaction() as db:
            updated = db.execute(
                f"UPDATE jobs SET state = ?, updated_at = ? WHERE id = ? AND state IN {sql_set(LIVE_JOBS)}",
                (JobState.CANCELLED, now, job_id, *LIVE_JOBS),
            ).rowcount
            if updated:
                db.execute(
                    "UPDATE runs SET state = ?, error = 'cancelled before it started', ended_at = ?"
                    " WHERE job_id = ? AND state = ?",
                    (RunState.CANCELLED, now, job_id, RunState.STARTING),
                )
                self.record(db, "job cancelled", job_id)
        job = self.get_job(job_id)
        if job is None:
            return None
        row = self._row(  # running, or walled with its worker holding the CLI
            "SELECT * FROM runs WHERE job_id = ? AND (state = ? OR held_until IS NOT NULL) ORDER BY id DESC LIMIT 1",
            (job_id, RunState.RUNNING),
        )
        return job, Run(*row) if row else None

    def send(self, job_id: int, text: str, limit: int) -> tuple[JobState, str] | None:
        """Follow a job up with `text` (`cl send`). The job's state before, and what becomes of
        the text: `next-turn` (its CLI takes it after the turn it is in), `with-move` (the
        session's next move, live or by restart, sends it), `queued` (a finished session resumes
        with it); or a refusal: `not-started`, `no-session`, `cancelled`, `too-long`. None if no
        such job. Texts sent before one is taken are joined, in order, up to `limit` bytes."""
        with self.transaction() as db:
            row = db.execute("SELECT state, session_id, pending_prompt FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            state = JobState(row["state"])
            if state == JobState.CANCELLED:
                return state, "cancelled"
            if row["session_id"] is None:
                return state, "not-started" if state in LIVE_JOBS else "no-session"
            if len((row["pending_prompt"] or "").encode()) + 2 + len(text.encode()) > limit:
                return state, "too-long"
            outcome = {JobState.RUNNING: "next-turn", JobState.WALLED: "with-move", JobState.ORPHANED: "with-move"}
            db.execute(
                "UPDATE jobs SET pending_prompt = CASE WHEN pending_prompt IS NULL THEN ?"
                " ELSE pending_prompt || ? || ? END, updated_at = ? WHERE id = ?",
                (text, "\n\n", text, time.time(), job_id),
            )
            if state in FINISHED_JOBS:
                db.execute(
                    "UPDATE jobs SET state = ?, account = NULL, error = NULL WHERE id = ?", (JobState.QUEUED, job_id)
                )
            self.record(db, "follow-up sent", job_id, bytes=len(text.encode()))
        return state, outcome.get(state, "queued")

    def follow_up(self, run_id: int, log_path: Callable[[int], str]) -> Run | None:
        """The run's turn ended well and its CLI is alive: if a follow-up waits, this run is done
        and a new one, claimed by the same worker (its log at `log_path(run id)`), takes it: the
        job stays running. None if none waits."""
        now = time.time()
        with self.transaction() as db:
            run = db.execute(
                f"SELECT * FROM runs WHERE id = ? AND state = ? AND {HOLDS_EPOCH}", (run_id, RunState.RUNNING)
            ).fetchone()
            if run is None:
                return None
            job = db.execute(
                "SELECT session_id, pending_prompt FROM jobs WHERE id = ? AND state = ?",
                (run["job_id"], JobState.RUNNING),
            ).fetchone()
            if job is None or job["pending_prompt"] is None:
                return None
            db.execute("UPDATE runs SET state = ?, ended_at = ? WHERE id = ?", (RunState.DONE, now, run_id))
            follow = inserted(
                db,
                "INSERT INTO runs (job_id, account, state, pid, pid_start, session_id, resume, created_at, live,"
                " prompt, epoch, lease_until) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?, ?)",
                (
                    run["job_id"],
                    run["account"],
                    RunState.RUNNING,
                    run["pid"],
                    run["pid_start"],
                    job["session_id"],
                    job["session_id"],
                    now,
                    job["pending_prompt"],
                    run["epoch"],
                    run["lease_until"],
                ),
            )["id"]
            db.execute("UPDATE runs SET log_path = ? WHERE id = ?", (log_path(follow), follow))
            db.execute("UPDATE capabilities SET run_id = ? WHERE run_id = ?", (follow, run_id))
            db.execute("UPDATE jobs SET pending_prompt = NULL, updated_at = ? WHERE id = ?", (now, run["job_id"]))
            self.record(db, "follow-up started", run["job_id"], run["account"], run=follow, live=True)
        return self.get_run(follow)

    # runs: placement, claim, session, settlement

    def place(
        self, job_id: int, account: str, limit: int, resume: str | None = None, *, live: bool = False
    ) -> Run | None:
        """Hand a job to `account`: job -> running, and a `starting` run. None if the job is not waiting.

        A queued job is placed; with `resume`, a walled or orphaned job's session moves (the
        ledger's "move started"), or a queued follow-up resumes it ("follow-up started"). With
        `live`, the move is handed to the worker still holding the session's CLI, if it still
        holds it (`release` and this take turns); otherwise (and the run says so) it is a restart.
        The run's prompt is the job's pending follow-up, if any. Raises `NoRoom` if the account is
        walled or has `limit` live runs.
        """
        with self.transaction() as db:
            return self._place(db, Placement(job_id, account, limit, resume), live=live, now=time.time())

    def place_many(self, placements: Sequence[Placement]) -> list[Run | NoRoom | None]:
        """Several placements of waiting jobs (no live moves) in one transaction, each as `place`
        makes it, read and written a batch at a time: the jobs and their accounts' room in four
        queries (the accounts held first and the jobs claimed, so what they say stays true but
        for this batch's own runs, counted as they go), the writes pipelined where the backend
        can. Not exclusive: on PostgreSQL other hosts place at the same time, on other accounts.
        For each: its run, the `NoRoom` it met (nothing written for it), or None if its job is
        not waiting, or another writer holds it now (`Backend.claiming`: tried again later)."""
        now = time.time()
        ids, accounts = [p.job_id for p in placements], sorted({p.account for p in placements})
        outcomes: list[Run | NoRoom | None] = [None] * len(placements)
        placed: list[tuple[int, Placement, Any]] = []
        with self.transaction(exclusive=False) as db:
            self._backend.lock_accounts(db, accounts)  # first: who holds an account never waits for a job
            claimed = f"SELECT id, state, account, pending_prompt, model FROM jobs WHERE id IN {sql_set(ids)}"
            jobs = {row["id"]: row for row in db.execute(claimed + self._backend.claiming, ids)}
            full, live = _without_room(db, accounts, now), _live_runs(db, accounts, now)
            by_model = _model_walls(db, accounts, now)
            for index, placement in enumerate(placements):
                job = jobs.pop(placement.job_id, None)  # a job listed twice is placed once
                if job is None or job["state"] not in _waiting(placement.resume):
                    continue
                if (
                    placement.account in full
                    or live.get(placement.account, 0) >= placement.limit
                    or model_walled(by_model.get(placement.account, {}), job["model"])
                ):
                    outcomes[index] = NoRoom(placement.account)
                    continue
                live[placement.account] = live.get(placement.account, 0) + 1
                placed.append((index, placement, job))
            if placed:
                db.executemany(
                    "UPDATE jobs SET state = ?, account = ?, error = NULL, updated_at = ? WHERE id = ?",
                    [(JobState.RUNNING, placement.account, now, placement.job_id) for _, placement, _ in placed],
                )
                values = [_run_values(placement, job, False, now) for _, placement, job in placed]
                runs = [Run(*row) for row in inserted_many(db, RUN_INSERT, values)]
                self.records(
                    db, [_placed(placement, job, run) for (_, placement, job), run in zip(placed, runs, strict=True)]
                )
                for (index, _, _), run in zip(placed, runs, strict=True):
                    outcomes[index] = run
        return outcomes

    def _place(self, db: Db, placement: Placement, *, live: bool, now: float) -> Run | None:
        self._backend.lock_accounts(db, [placement.account])
        job = db.execute(  # the job and the account's room: one round trip
            f"SELECT state, account, pending_prompt, {ROOM}, model FROM jobs WHERE id = ?{self._backend.locking}",
            (*_room_of(placement.account, now), placement.job_id),
        ).fetchone()
        if job is None or job["state"] not in _waiting(placement.resume):
            return None
        if _full(job[3:6], placement.limit) or _model_walled(db, placement.account, job["model"], now):
            raise NoRoom(placement.account)
        live = (
            live
            and db.execute(
                "SELECT 1 FROM runs WHERE job_id = ? AND held_until IS NOT NULL", (placement.job_id,)
            ).fetchone()
            is not None
        )
        db.execute(
            "UPDATE jobs SET state = ?, account = ?, error = NULL, updated_at = ? WHERE id = ?",
            (JobState.RUNNING, placement.account, now, placement.job_id),
        )
        run = Run(*inserted(db, RUN_INSERT, _run_values(placement, job, live, now)))
        self.records(db, [_placed(placement, job, run)])
        return run

    def requeue(self, job_id: int, reason: str) -> bool:
        """A walled or orphaned job with no session to resume goes back to the queue."""
        with self.transaction() as db:
            moved = db.execute(
                "UPDATE jobs SET state = ?, account = NULL, updated_at = ?"
                f" WHERE id = ? AND state IN {sql_set(RESCUABLE)}",
                (JobState.QUEUED, time.time(), job_id, *RESCUABLE),
            ).rowcount
            if moved:
                self.record(db, "job requeued", job_id, reason=reason)
        return bool(moved)

    def troubles(self, job_id: int, since: float) -> tuple[int, int]:
        """How often the job's session moved since `since`, and how often its worker vanished."""
        with self.transaction(write=False) as db:
            moves = db.execute(
                "SELECT COUNT(*) FROM runs WHERE job_id = ? AND created_at >= ?"
                f" AND prior_state IN {sql_set(RESCUABLE)}",
                (job_id, since, *RESCUABLE),
            ).fetchone()[0]
            orphaned = db.execute(
                "SELECT COUNT(*) FROM runs WHERE job_id = ? AND state = ?", (job_id, RunState.ORPHANED)
            ).fetchone()[0]
        return int(moves), int(orphaned)

    def give_up(self, job_id: int, reason: str) -> bool:
        """A walled or orphaned job fails with `reason` instead of moving again."""
        with self.transaction() as db:
            failed = db.execute(
                f"UPDATE jobs SET state = ?, error = ?, updated_at = ? WHERE id = ? AND state IN {sql_set(RESCUABLE)}",
                (JobState.FAILED, reason, time.time(), job_id, *RESCUABLE),
            ).rowcount
            if failed:
                self.record(db, "job given up", job_id, error=reason)
        return bool(failed)

    def _no_room(self, db: Db, account: str, now: float, limit: int) -> bool:
        """`account` is walled, paused, or has `limit` live runs (held from now on: `lock_accounts`)."""
        self._backend.lock_accounts(db, [account])
        return _full(db.execute(f"SELECT {ROOM}", _room_of(account, now)).fetchone(), limit)

    def claim(
        self, run_id: int, pid: int, pid_start: str, log_path: str, *, lease: float = LEASE, epoch: int | None = None
    ) -> Run | None:
        """The worker takes its run: starting -> running, leased for `lease` seconds. None if the
        run is not `starting` any more, or (`epoch`: a worker going on with a live move handed to
        it) the job's epoch is not the worker's. A new worker takes the session in a new epoch."""
        now = self._backend.now
        with self.transaction() as db:
            if epoch is None:
                db.execute(
                    "UPDATE jobs SET epoch = epoch + 1 WHERE id = (SELECT job_id FROM runs WHERE id = ? AND state = ?)",
                    (run_id, RunState.STARTING),
                )
            going_on = "" if epoch is None else " AND (SELECT epoch FROM jobs WHERE id = runs.job_id) = ?"
            claimed = db.execute(
                "UPDATE runs SET state = ?, pid = ?, pid_start = ?, log_path = ?,"
                f" epoch = (SELECT epoch FROM jobs WHERE id = runs.job_id), lease_until = {now} + ?"
                f" WHERE id = ? AND state = ?{going_on}",
                (
                    RunState.RUNNING,
                    pid,
                    pid_start,
                    log_path,
                    lease,
                    run_id,
                    RunState.STARTING,
                    *([] if epoch is None else [epoch]),
                ),
            ).rowcount
            if claimed:
                job_id = self._job_of(db, run_id)
                db.execute(  # a live move's CLI keeps its capability: it names this run from now on
                    "UPDATE capabilities SET run_id = ? WHERE run_id IN"
                    " (SELECT id FROM runs WHERE job_id = ? AND id < ? AND pid = ? AND pid_start = ?)",
                    (run_id, job_id, run_id, pid, pid_start),
                )
                db.execute("UPDATE runs SET held_until = NULL WHERE job_id = ? AND held_until IS NOT NULL", (job_id,))
                db.execute(  # the follow-up it took is sent now
                    "UPDATE jobs SET pending_prompt = NULL"
                    " WHERE id = ? AND pending_prompt = (SELECT prompt FROM runs WHERE id = ?)",
                    (job_id, run_id),
                )
                self.record(db, "run started", job_id, run=run_id, pid=pid)
        return self.get_run(run_id) if claimed else None

    def renew(self, run_id: int, lease: float) -> Renewal:
        """The worker of `run_id` renews its lease for `lease` seconds from now (the database's
        clock): `RENEWED`; `IDLE` if the run is not running (it ended, its worker holds or goes
        on with another run); `FENCED` if its job's session has changed hands since."""
        with self.transaction() as db:
            renewed = db.execute(
                f"UPDATE runs SET lease_until = {self._backend.now} + ? WHERE id = ? AND state = ? AND {HOLDS_EPOCH}",
                (lease, run_id, RunState.RUNNING),
            ).rowcount
            if renewed:
                return Renewal.RENEWED
            held = _holds(db, run_id)
        return Renewal.IDLE if held else Renewal.FENCED

    def lapsed(self, host: str | None = None) -> list[Run]:
        """Running runs (of `host`'s jobs) whose lease lapsed: their workers stopped their CLIs."""
        on_host = f" AND job_id IN (SELECT id FROM jobs WHERE {ON_HOST})" if host else ""
        rows = self._rows(
            f"SELECT * FROM runs WHERE state = ? AND lease_until < {self._backend.now}{on_host}",
            (RunState.RUNNING, *((host,) if host else ())),
        )
        return [Run(*row) for row in rows]

    def held_run(self, job_id: int) -> Run | None:
        """The job's run whose worker holds its CLI for a live move, if any (not necessarily its
        latest: a live move handed to it may have been abandoned since)."""
        row = self._row(
            "SELECT * FROM runs WHERE job_id = ? AND held_until IS NOT NULL ORDER BY id DESC LIMIT 1", (job_id,)
        )
        return Run(*row) if row else None

    def let_go(self, run_id: int) -> None:
        """The worker that held `run_id`'s CLI is gone: the session no longer counts as held."""
        with self.transaction() as db:
            db.execute("UPDATE runs SET held_until = NULL WHERE id = ?", (run_id,))

    def handed_over(self, run_id: int) -> Run | None:
        """The live move handed to the worker holding `run_id`'s CLI (`starting`, its to claim)."""
        with self._backend.reading() as db:
            return self._handed_over(db, run_id)

    def release(self, run_id: int) -> Run | None:
        """The worker holding `run_id`'s CLI stops holding it, unless a live move was handed to it
        meanwhile: that move, or None once released (`place` and this take turns)."""
        with self.transaction() as db:
            if (handed := self._handed_over(db, run_id)) is not None:
                return handed
            db.execute("UPDATE runs SET held_until = NULL WHERE id = ?", (run_id,))
        return None

    @staticmethod
    def _handed_over(db: Db, run_id: int) -> Run | None:
        row = db.execute(
            "SELECT * FROM runs WHERE job_id = (SELECT job_id FROM runs WHERE id = ?) AND id > ? AND live = 1"
            " AND state = ? ORDER BY id DESC LIMIT 1",
            (run_id, run_id, RunState.STARTING),
        ).fetchone()
        return Run(*row) if row else None

    # capabilities: what a CLI holds instead of a credential (the gateway's side of a run)

    def issue_capability(self, digest: str, run_id: int) -> None:
        """The CLI of `run_id` holds the capability whose SHA-256 is `digest`."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO capabilities (digest, run_id, issued_at) VALUES (?, ?, ?)", (digest, run_id, time.time())
            )

    def revoke_capability(self, digest: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM capabilities WHERE digest = ?", (digest,))

    def capability_run(self, digest: str) -> Run | None:
        """The running run whose CLI holds this capability; None when there is none (unknown,
        revoked, or its run ended: held, walled, done)."""
        with self._backend.reading() as db:
            return capability_run(db, digest)

    def record_cache(self, tokens: dict[int, tuple[int, int]]) -> None:
        """Prompt-cache tokens read and written, per run, added up."""
        with self.transaction() as db:
            db.executemany(
                "UPDATE runs SET cache_read_tokens = cache_read_tokens + ?,"
                " cache_creation_tokens = cache_creation_tokens + ? WHERE id = ?",
                [(read, created, run_id) for run_id, (read, created) in tokens.items()],
            )

    def move_in_flight(
        self, run_id: int, account: str, limit: int, log_path: Callable[[int], str], reason: str | None = None
    ) -> Run | None:
        """A live move while the CLI's request waits at the gateway: the running `run_id` ends
        walled (its error `reason`: an early move's, `MOVED_EARLY`) and the same worker and CLI go
        on, running, on `account` (a run of its own, which the capability follows). None if
        `run_id` is not running or has no session; raises `NoRoom` as `place` does."""
        now = time.time()
        with self.transaction() as db:
            run = db.execute(
                f"SELECT * FROM runs WHERE id = ? AND state = ? AND {HOLDS_EPOCH}", (run_id, RunState.RUNNING)
            ).fetchone()
            job = run and db.execute("SELECT session_id, model FROM jobs WHERE id = ?", (run["job_id"],)).fetchone()
            session = job and job["session_id"]
            if run is None or session is None:
                return None
            if self._no_room(db, account, now, limit) or _model_walled(db, account, job["model"], now):
                raise NoRoom(account)
            job_id = run["job_id"]
            db.execute(
                "UPDATE runs SET state = ?, error = ?, ended_at = ? WHERE id = ?",
                (RunState.WALLED, reason or f"moved to {account} in flight", now, run_id),
            )
            moved = inserted(
                db,
                "INSERT INTO runs (job_id, account, state, pid, pid_start, session_id, resume, created_at, prior_state,"
                " live, answered_at, epoch, lease_until) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 1, NULL, ?, ?)",
                (
                    job_id,
                    account,
                    RunState.RUNNING,
                    run["pid"],
                    run["pid_start"],
                    session,
                    session,
                    now,
                    JobState.WALLED,
                    run["epoch"],
                    run["lease_until"],
                ),
            )["id"]
            db.execute("UPDATE runs SET log_path = ? WHERE id = ?", (log_path(moved), moved))
            db.execute("UPDATE capabilities SET run_id = ? WHERE run_id = ?", (moved, run_id))
            db.execute("UPDATE jobs SET account = ?, updated_at = ? WHERE id = ?", (account, now, job_id))
            self.record(db, "run walled", job_id, run=run_id, error=reason or "moved in flight")
            source = run["account"]
            self.record(db, "move started", job_id, account, run=moved, session=session, source=source, live=True)
        return self.get_run(moved)

    def successor(self, run_id: int) -> Run | None:
        """The run a move in flight made of `run_id` (its worker goes on with it), if any."""
        row = self._row(
            "SELECT * FROM runs WHERE job_id = (SELECT job_id FROM runs WHERE id = ?) AND id > ? AND live = 1"
            " AND state = ? AND pid = (SELECT pid FROM runs WHERE id = ?) ORDER BY id DESC LIMIT 1",
            (run_id, run_id, RunState.RUNNING, run_id),
        )
        return Run(*row) if row else None

    def swaps(self, version: str) -> bool | None:
        """Whether CLI `version` took a new credential in a running process when last measured."""
        row = self._row("SELECT swaps FROM cli_versions WHERE version = ?", (version,))
        return None if row is None else bool(row[0])

    def record_swap(self, version: str, swaps: bool) -> None:
        """What a live move measured of CLI `version` (the latest measurement stands)."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO cli_versions (version, swaps, measured_at) VALUES (?, ?, ?)"
                " ON CONFLICT (version) DO UPDATE SET swaps = excluded.swaps, measured_at = excluded.measured_at",
                (version, int(swaps), time.time()),
            )

    def set_session(self, run_id: int, session_id: str) -> bool:
        """The run's session id, as its CLI reported it; False (nothing written) if the id is
        another job's."""
        with self.transaction() as db:
            if not _holds(db, run_id):
                return False  # fenced: the session changed hands
            job_id = self._job_of(db, run_id)
            db.execute(
                "INSERT INTO sessions (session_id, job_id) VALUES (?, ?) ON CONFLICT DO NOTHING", (session_id, job_id)
            )
            owner = db.execute("SELECT job_id FROM sessions WHERE session_id = ?", (session_id,)).fetchone()[0]
            if owner != job_id:
                return False
            db.execute("UPDATE runs SET session_id = ? WHERE id = ?", (session_id, run_id))
            db.execute(
                "UPDATE jobs SET session_id = ?, updated_at = ? WHERE id = (SELECT job_id FROM runs WHERE id = ?)",
                (session_id, time.time(), run_id),
            )
            self.record(db, "session seen", job_id, run=run_id, session=session_id)
        return True

    def settle(
        self, run_id: int, state: RunState, error: str | None = None, *, held_until: float | None = None
    ) -> Run | None:
        """End a live run and carry the outcome to its job. None if the run had already ended.
        `held_until`: the run walled, and its worker holds the CLI alive until then (one
        transaction: the rescuer never sees the wall without the hold).

        An abandoned run (never claimed) puts its job back where it was: queued, or for a move
        walled or orphaned, so that the move is simply tried again. Only a `starting` run can be
        abandoned: once its worker claimed it, the claim has won, and None says so.
        """
        now = time.time()
        ending = (RunState.STARTING,) if state == RunState.ABANDONED else LIVE_RUNS
        with self.transaction() as db:
            ended = db.execute(
                "UPDATE runs SET state = ?, error = ?, ended_at = ?, held_until = ?"
                f" WHERE id = ? AND state IN {sql_set(ending)} AND {HOLDS_EPOCH}",
                (state, error, now, held_until, run_id, *ending),
            ).rowcount
            if not ended:
                return None
            job_id, prior = db.execute("SELECT job_id, prior_state FROM runs WHERE id = ?", (run_id,)).fetchone()
            if state == RunState.ORPHANED:  # the session changes hands: its worker, if alive, is fenced off
                db.execute("UPDATE jobs SET epoch = epoch + 1 WHERE id = ?", (job_id,))
            pending = db.execute("SELECT pending_prompt FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]
            job_state = {
                RunState.DONE: JobState.DONE,
                RunState.FAILED: JobState.FAILED,
                RunState.WALLED: JobState.WALLED,
                RunState.ORPHANED: JobState.ORPHANED,
                RunState.ABANDONED: prior or JobState.QUEUED,
                RunState.CANCELLED: JobState.CANCELLED,
            }[state]
            if job_state == JobState.DONE and pending is not None:
                job_state = JobState.QUEUED  # a follow-up came as the CLI ended: it resumes the session
            db.execute(  # a cancelled job stays cancelled, whatever its last run says
                "UPDATE jobs SET state = ?, error = ?, updated_at = ?,"
                " account = CASE WHEN ? = 'queued' THEN NULL ELSE account END WHERE id = ? AND state != ?",
                (job_state, error, now, job_state, job_id, JobState.CANCELLED),
            )
            self.record(db, f"run {state}", job_id, run=run_id, error=error)
        return self.get_run(run_id)

    def answered(self, run_id: int) -> str | None:
        """The account answered this run: note it, and lift its wall if that wall's reset has passed.

        Returns the account whose wall was lifted, if one was: its probation is over.
        """
        now = time.time()
        with self.transaction() as db:
            if not _holds(db, run_id):
                return None  # fenced: what a CLI taken over says proves nothing
            db.execute("UPDATE runs SET answered_at = ? WHERE id = ? AND answered_at IS NULL", (now, run_id))
            account = db.execute("SELECT account FROM runs WHERE id = ?", (run_id,)).fetchone()[0]
            lifted = db.execute("DELETE FROM walls WHERE account = ? AND reset_at <= ?", (account, now)).rowcount
            if lifted:
                self.record(db, "wall lifted", self._job_of(db, run_id), account, run=run_id)
        return account if lifted else None

    def waited_for_answer(self, run_id: int) -> float | None:
        """Seconds from what this run answered to, to its first answer: a fresh job's submission,
        or for a move, the end of the run before it (the session walled or orphaned then)."""
        row = self._row(
            "SELECT r.answered_at - CASE WHEN r.resume IS NULL THEN j.created_at ELSE"
            " (SELECT p.ended_at FROM runs p WHERE p.job_id = r.job_id AND p.id < r.id ORDER BY p.id DESC LIMIT 1)"
            " END FROM runs r JOIN jobs j ON j.id = r.job_id WHERE r.id = ?",
            (run_id,),
        )
        return None if row is None or row[0] is None else float(row[0])

    def oldest_queued(self) -> float | None:
        """When the oldest queued job was submitted (epoch seconds)."""
        row = self._row("SELECT MIN(created_at) FROM jobs WHERE state = ?", (JobState.QUEUED,))
        return None if row[0] is None else float(row[0])

    def unverified_moves(self, host: str | None = None) -> list[Run]:
        """Moves whose run has ended but whose outcome the rescuer has not checked yet; with
        `host`, only those of its jobs (`ON_HOST`)."""
        rows = self._rows(
            "SELECT runs.* FROM runs JOIN jobs ON jobs.id = runs.job_id WHERE runs.resume IS NOT NULL"
            f" AND runs.verified_at IS NULL AND runs.state NOT IN {sql_set(LIVE_RUNS)}"
            f"{'' if host is None else f' AND {ON_HOST}'} ORDER BY runs.id",
            (*LIVE_RUNS, *([] if host is None else [host])),
        )
        return [Run(*row) for row in rows]

    def transcript_before(self, run_id: int, size: int | None) -> None:
        """A move's transcript size as its worker found it, before the CLI started."""
        with self.transaction() as db:
            db.execute(f"UPDATE runs SET transcript_bytes = ? WHERE id = ? AND {HOLDS_EPOCH}", (size, run_id))

    def transcript_after(self, run_id: int, size: int | None) -> None:
        """A move's transcript size once its CLI exited."""
        with self.transaction() as db:
            db.execute(f"UPDATE runs SET transcript_bytes_after = ? WHERE id = ? AND {HOLDS_EPOCH}", (size, run_id))

    def record_result(self, run_id: int, result: str) -> None:
        with self.transaction() as db:
            db.execute(f"UPDATE runs SET result = ? WHERE id = ? AND {HOLDS_EPOCH}", (result, run_id))

    def job_runs(self, job_id: int) -> list[Run]:
        """Every run of a job, first to last."""
        return [Run(*row) for row in self._rows("SELECT * FROM runs WHERE job_id = ? ORDER BY id", (job_id,))]

    def previous_account(self, run_id: int) -> str | None:
        """The account of the run before this one in its job: whose credential an earlier CLI had."""
        row = self._row(
            "SELECT account FROM runs WHERE job_id = (SELECT job_id FROM runs WHERE id = ?) AND id < ?"
            " ORDER BY id DESC LIMIT 1",
            (run_id, run_id),
        )
        return str(row[0]) if row else None

    def answered_before(self, run_id: int) -> bool:
        """Whether an account ever answered the session before this run (an earlier run of its job)."""
        row = self._row(
            "SELECT 1 FROM runs WHERE job_id = (SELECT job_id FROM runs WHERE id = ?) AND id < ?"
            " AND answered_at IS NOT NULL LIMIT 1",
            (run_id, run_id),
        )
        return row is not None

    def verify_move(self, run_id: int) -> bool | None:
        """Settle a move in the ledger: whether the transcript grew, None if it was settled already."""
        with self.transaction() as db:
            run = db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
            if run is None or run["verified_at"] is not None:
                return None
            db.execute("UPDATE runs SET verified_at = ? WHERE id = ?", (time.time(), run_id))
            before, transcript_bytes = run["transcript_bytes"], run["transcript_bytes_after"]
            grew = transcript_bytes is not None and (before is None or transcript_bytes > before)
            self.record(
                db,
                "move settled",
                run["job_id"],
                run["account"],
                run=run_id,
                outcome=run["state"],
                transcript_bytes=transcript_bytes,
                grew=grew,
            )
        return grew

    def get_run(self, run_id: int) -> Run | None:
        row = self._row("SELECT * FROM runs WHERE id = ?", (run_id,))
        return Run(*row) if row else None

    def runs_in(self, states: tuple[str, ...] = LIVE_RUNS, host: str | None = None) -> list[Run]:
        """Runs in `states`; with `host`, only those of its jobs (`ON_HOST`)."""
        query = f"SELECT runs.* FROM runs JOIN jobs ON jobs.id = runs.job_id WHERE runs.state IN {sql_set(states)}"
        if host is None:
            return [Run(*row) for row in self._rows(f"{query} ORDER BY runs.id", states)]
        return [Run(*row) for row in self._rows(f"{query} AND {ON_HOST} ORDER BY runs.id", (*states, host))]

    def live_counts(self) -> dict[str, int]:
        """Live runs per account name (a run whose lease lapsed does not count: `LEASED`)."""
        rows = self._rows(
            f"SELECT account, COUNT(*) FROM runs WHERE state IN {sql_set(LIVE_RUNS)} AND {LEASED} GROUP BY account",
            (*LIVE_RUNS, time.time()),
        )
        return {account: int(count) for account, count in rows}

    def latest_run(self, job_id: int) -> Run | None:
        """The job's latest run."""
        row = self._row("SELECT * FROM runs WHERE job_id = ? ORDER BY id DESC LIMIT 1", (job_id,))
        return Run(*row) if row else None

    def jobs_with_session(self, prefix: str, limit: int = 2, submitter: int | None = None) -> list[int]:
        """The jobs whose session id starts with `prefix` (as git takes a hash's start), at most
        `limit`; with `submitter`, only that uid's."""
        pattern = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        mine = "" if submitter is None else " AND submitter = ?"
        rows = self._rows(
            f"SELECT id FROM jobs WHERE session_id LIKE ? ESCAPE '\\'{mine} ORDER BY id LIMIT ?",
            (pattern, *(() if submitter is None else (submitter,)), limit),
        )
        return [row[0] for row in rows]

    def facts(self, states: tuple[str, ...], limit: int, host: str | None = None) -> Facts:
        """The first `limit` jobs in `states` (in submission order; with `host`, only its own, as
        `ON_HOST` says), with walls, live runs and usage."""
        now = time.time()
        mine, arguments = (f" AND {ON_HOST}", (host,)) if host is not None else ("", ())
        query = f"SELECT * FROM jobs WHERE state IN {sql_set(states)}{mine} ORDER BY id LIMIT ?"
        with self.transaction(write=False) as db:
            jobs = [Job(*row) for row in db.execute(query, (*states, *arguments, limit))]
            probation = self.probation(now)
            held = db.execute("SELECT COUNT(*) FROM runs WHERE held_until IS NOT NULL").fetchone()[0]
            return Facts(
                jobs,
                self.walls(now),
                probation,
                self.live_counts(),
                self.usage(),
                self.settings(),
                held,
                model_walls=self.model_walls(now),
                windows=self.windows(),
            )

    def queue_length(self) -> int:
        return int(self._row("SELECT COUNT(*) FROM jobs WHERE state = ?", (JobState.QUEUED,))[0])

    def snapshot(self, submitter: int | None = None, *, finished: bool = True) -> Snapshot:
        """Everything `status` shows, read in one transaction, made cheap to ask again: what was
        read is kept until the database changes (the walls, which end with time, are always read),
        and the jobs' listing until the ledger grows (every change to a job or a run is recorded
        there in its transaction). The database renders the listing as JSON: prompts are never loaded,
        and no Python object is made per job (status rendering inside the store, on purpose:
        built in Python, `status` at 1,000 sessions took 39-51 ms; see bench/README.md). With
        `submitter`, the listing holds only that uid's jobs; without `finished`, only live ones
        (each listing kept apart)."""
        # Read before the transaction's snapshot: a commit in between makes the next key differ,
        # so what is kept is never older than its key.
        changes = self._backend.changes()
        with self.transaction(write=False) as db:
            if self._shown is None or changes is None or self._shown[0] != changes:
                revision = db.execute("SELECT MAX(id) FROM ledger").fetchone()[0]
                read = db.execute(READINGS).fetchone()  # what changed of usage and windows, for a few ms
                shown = self._shown
                if shown is not None and (shown[1], shown[5]) == (revision, read):
                    counts, windows = shown[2], shown[4]  # (a heartbeat, say): the same objects again
                else:
                    usage = db.execute("SELECT account, five_hour, seven_day, input_tokens, output_tokens FROM usage")
                    counts = AccountCounts(self.live_counts(), {account: tuple(row) for account, *row in usage})
                    windows = shown[4] if shown is not None and shown[5][3:] == read[3:] else self.windows()
                settings = self.settings()
                if shown is not None and settings == shown[3]:
                    settings = shown[3]
                self._shown = (changes, revision, counts, settings, windows, read)
            _, revision, counts, settings, windows, _read = self._shown
            key = (submitter, finished)
            kept = self._listings.get(key)
            if kept is None or kept[0] != revision:
                query, arguments = self._listing(submitter, finished=finished)
                listing = Listing(*db.execute(query, arguments).fetchone())
                if not finished:
                    mine, who = ("", ()) if submitter is None else (" AND submitter = ?", (submitter,))
                    hidden = f"SELECT COUNT(*) FROM jobs WHERE state IN {sql_set(FINISHED_JOBS)}{mine}"
                    listing = dataclasses.replace(
                        listing, hidden=db.execute(hidden, (*FINISHED_JOBS, *who)).fetchone()[0]
                    )
                kept = self._listings[key] = (revision, listing)
            now = time.time()
            return Snapshot(
                kept[1], counts, self.walls(now), settings, self.model_walls(now), windows, self.probation(now)
            )

    def _listing(self, submitter: int | None, *, finished: bool) -> tuple[str, tuple[Any, ...]]:
        """The listing's query for a submitter (or everyone), with finished jobs or live ones only:
        each filter a plain condition, so that the database takes the index for it."""
        conditions, arguments = [], list[Any]()
        if submitter is not None:
            conditions.append("j.submitter = ?")
            arguments.append(submitter)
        if not finished:
            conditions.append(f"j.state IN {sql_set(LIVE_JOBS)}")
            arguments.extend(LIVE_JOBS)
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        return _listing(type(self._backend)).replace("{where}", where), (*arguments, JobState.QUEUED)

    @staticmethod
    def _job_of(db: Db, run_id: int) -> int:
        return int(db.execute("SELECT job_id FROM runs WHERE id = ?", (run_id,)).fetchone()[0])

    # walls and usage

    def record_wall(self, account: str, source: str, reset_at: float | None, kind: str | None = None) -> None:
        """`account` walled until `reset_at`; by a model's window (`MODEL_WINDOWS`), for that
        family of models only."""
        now = time.time()
        with self.transaction() as db:
            if (model := MODEL_WINDOWS.get(kind or "")) is not None:
                db.execute(
                    "INSERT INTO model_walls (account, model, reset_at, recorded_at) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT(account, model) DO UPDATE SET reset_at = excluded.reset_at,"
                    " recorded_at = excluded.recorded_at",
                    (account, model, reset_at, now),
                )
            else:
                db.execute(
                    "INSERT INTO walls (account, kind, reset_at, source, recorded_at) VALUES (?, ?, ?, ?, ?)"
                    " ON CONFLICT(account) DO UPDATE SET kind = excluded.kind, reset_at = excluded.reset_at,"
                    " source = excluded.source, recorded_at = excluded.recorded_at",
                    (account, kind, reset_at, source, now),
                )
            self.record(db, "wall recorded", account=account, reset_at=reset_at, kind=kind, source=source)

    def needs_login(self, account: str, credential: str) -> None:
        """The token endpoint refused `account`'s refresh token (fingerprint `credential`): no work
        goes there until its file holds another one (`logged_in`)."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO walls (account, kind, reset_at, source, recorded_at, credential)"
                " VALUES (?, ?, NULL, 'gateway', ?, ?) ON CONFLICT(account) DO UPDATE SET kind = excluded.kind,"
                " reset_at = NULL, source = excluded.source, recorded_at = excluded.recorded_at,"
                " credential = excluded.credential",
                (account, NEEDS_LOGIN, time.time(), credential),
            )
            self.record(db, "account needs login", account=account)

    def logged_in(self, account: str, credential: str) -> bool:
        """`account`'s file now holds a refresh token other than the refused one: its `needs-login`
        goes. True if it was there."""
        with self.transaction() as db:
            lifted = db.execute(
                "DELETE FROM walls WHERE account = ? AND kind = ? AND (credential IS NULL OR credential <> ?)",
                (account, NEEDS_LOGIN, credential),
            ).rowcount
            if lifted:
                self.record(db, "account logged in", account=account)
        return bool(lifted)

    def walled_for(self, account: str, model: str | None) -> bool:
        """Whether a wall bars a job of `model` from `account` now: the account's, or its model's."""
        now = time.time()
        return account in self.walls(now) or model_walled(self.model_walls(now).get(account, {}), model)

    def model_walls(self, now: float | None = None) -> dict[str, dict[str, float | None]]:
        """Model windows standing at `now`: account -> family -> reset."""
        with self._backend.reading() as db:
            return _model_walls(db, None, time.time() if now is None else now)

    def walls(self, now: float | None = None) -> dict[str, WallRecord]:
        """Walls still standing at `now`; a wall without a known reset stands until lifted."""
        now = time.time() if now is None else now
        rows = self._rows(f"SELECT * FROM walls WHERE {STANDING}", (now,))
        return {row["account"]: WallRecord(*row) for row in rows}

    def probation(self, now: float) -> frozenset[str]:
        """The accounts on probation at `now`: their wall's reset passed, and they have not answered
        since (an answer lifts the wall); none after a reset the API's headers named."""
        rows = self._rows(f"SELECT account FROM walls WHERE reset_at <= ? AND NOT {KNOWN_RESET}", (now,))
        return frozenset(row[0] for row in rows)

    def prune(self, before: float, batch: int = 5000) -> int:
        """Forget finished jobs last changed before `before` (epoch seconds), with their runs and
        ledger rows, and ledger rows about no job from then; live jobs keep everything. In
        batches, so no write waits long; the file is compacted after a large pass. How many jobs."""
        finished = f"SELECT id FROM jobs WHERE state IN {sql_set(FINISHED_JOBS)} AND updated_at < ? LIMIT ?"
        pruned = 0
        while True:
            with self.transaction() as db:
                ids = [row[0] for row in db.execute(finished, (*FINISHED_JOBS, before, batch))]
                if not ids:
                    break
                chosen = sql_set(tuple(map(str, ids)))
                db.execute(f"DELETE FROM ledger WHERE job_id IN {chosen}", ids)
                db.execute(f"DELETE FROM runs WHERE job_id IN {chosen}", ids)
                db.execute(f"DELETE FROM sessions WHERE job_id IN {chosen}", ids)
                db.execute(f"DELETE FROM jobs WHERE id IN {chosen}", ids)
            pruned += len(ids)
            if len(ids) < batch:
                break
        with self.transaction() as db:
            db.execute("DELETE FROM window_hours WHERE hour < ?", (int(time.time() // 3600) - HISTORY_HOURS,))
            db.execute("DELETE FROM ledger WHERE job_id IS NULL AND at < ?", (before,))
            gone = "SELECT name FROM hosts WHERE heartbeat_at < ?"  # hosts silent since then (a name given up)
            db.execute(f"DELETE FROM host_accounts WHERE host IN ({gone})", (before,))
            db.execute("DELETE FROM hosts WHERE heartbeat_at < ?", (before,))
            db.execute(  # capabilities of CLIs that are gone (a worker killed before it revoked one)
                "DELETE FROM capabilities WHERE issued_at < ? AND run_id NOT IN"
                f" (SELECT id FROM runs WHERE state IN {sql_set(LIVE_RUNS)})",
                (before, *LIVE_RUNS),
            )
        if pruned >= batch:
            self._backend.compact()
        return pruned

    # the fleet: each host's roster, as its own balancer publishes it

    def publish(self, host: str, accounts: Sequence[Published], gateway: str | None = None) -> bool:
        """`host`'s heartbeat, on the database's clock, with its roster as its registry has it now
        and where its gateway takes the other hosts' requests (`fleet_listen`, if it does): the
        roster written again only when it differs from what the store holds (a heartbeat alone is
        one UPDATE). True if the roster was written."""
        if self._digest is None or self._digest[0] is not accounts:  # the same roster object: the same digest
            self._digest = (accounts, hashlib.sha256(json.dumps(sorted(accounts)).encode()).hexdigest())
        digest = self._digest[1]
        now = self._backend.now
        with self.transaction() as db:
            beat = f"UPDATE hosts SET heartbeat_at = {now}, gateway = ? WHERE name = ? AND roster_digest = ?"
            if db.execute(beat, (gateway, host, digest)).rowcount:
                return False
            db.execute(
                f"INSERT INTO hosts (name, heartbeat_at, roster_digest, gateway) VALUES (?, {now}, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET heartbeat_at = excluded.heartbeat_at,"
                " roster_digest = excluded.roster_digest, gateway = excluded.gateway",
                (host, digest, gateway),
            )
            db.execute("DELETE FROM host_accounts WHERE host = ?", (host,))
            db.executemany(
                "INSERT INTO host_accounts (host, account, state, fingerprint) VALUES (?, ?, ?, ?)",
                [(host, *account) for account in accounts],
            )
        return True

    def homes(
        self, besides: str, stale_after: float, account: str | None = None, *, reachable: bool = False
    ) -> dict[str, Home]:
        """The accounts (or `account` alone) that live hosts other than `besides` publish as usable,
        each with its home: the lowest-named such host whose gateway takes the fleet's requests.
        `reachable`: leaving out the homes `besides` could not reach lately (`cut_off`)."""
        only = " AND host_accounts.account = ?" if account is not None else ""
        cut = (
            " AND NOT EXISTS (SELECT 1 FROM unreachable WHERE unreachable.host = ?"
            f" AND unreachable.home = hosts.name AND unreachable.until > {self._backend.now})"
        )
        rows = self._rows(
            "SELECT host_accounts.account, hosts.name, hosts.gateway FROM host_accounts"
            " JOIN hosts ON hosts.name = host_accounts.host"
            f" WHERE hosts.name <> ? AND host_accounts.state = 'ok' AND hosts.gateway IS NOT NULL"
            f" AND {self._backend.now} - hosts.heartbeat_at <= ?{only}{cut if reachable else ''}"
            " ORDER BY host_accounts.account, hosts.name DESC",
            (besides, stale_after, *([account] if account is not None else []), *([besides] if reachable else [])),
        )
        return {str(name): Home(str(host), str(gateway)) for name, host, gateway in rows}  # the lowest name last

    def cut_off(self, host: str, home: str, seconds: float) -> None:
        """`host`'s gateway could not reach `home`'s: for `seconds` (on the database's clock), no
        work goes from `host` to `home`'s accounts (`homes(reachable=True)`)."""
        with self.transaction() as db:
            db.execute(
                f"INSERT INTO unreachable (host, home, until) VALUES (?, ?, {self._backend.now} + ?)"
                " ON CONFLICT (host, home) DO UPDATE SET until = excluded.until",
                (host, home, seconds),
            )

    def answered_as_wall(self, run: Run, home: str) -> None:
        """The gateway answered a request of `run`'s CLI as a wall of its own (`home` cut off):
        the one wall of this kind its worker believes (`walled_by_gateway`)."""
        with self.transaction() as db:
            self.record(db, ANSWERED_AS_WALL, run.job_id, run.account, run=run.id, home=home)

    def walled_by_gateway(self, job_id: int, since: float) -> bool:
        """The gateway answered a request of the job's CLI as a wall of its own since `since`."""
        query = "SELECT 1 FROM ledger WHERE job_id = ? AND event = ? AND at >= ? LIMIT 1"
        return self._row(query, (job_id, ANSWERED_AS_WALL, since)) is not None

    def reached(self, host: str, home: str) -> None:
        """`host`'s gateway reached `home`'s again."""
        with self.transaction() as db:
            db.execute("DELETE FROM unreachable WHERE host = ? AND home = ?", (host, home))

    def served_below(self, host: str, fingerprints: Collection[str], stale_after: float) -> dict[str, str]:
        """Of these credentials (`cl.fleet.fingerprint`, of `host`'s files as they are now), each
        that a live host (its heartbeat at most `stale_after` seconds old) with a lower name than
        `host` holds too, with the lowest such host: that one serves it."""
        if not fingerprints:
            return {}
        rows = self._rows(
            "SELECT host_accounts.fingerprint, MIN(host_accounts.host) FROM host_accounts"
            " JOIN hosts ON hosts.name = host_accounts.host"
            f" WHERE host_accounts.host < ? AND {self._backend.now} - hosts.heartbeat_at <= ?"
            f" AND host_accounts.fingerprint IN {sql_set(tuple(fingerprints))} GROUP BY host_accounts.fingerprint",
            (host, stale_after, *fingerprints),
        )
        return {str(fingerprint): str(serving) for fingerprint, serving in rows}

    def hosts(self) -> list[HostRecord]:
        """Every host that has published, by name, with the age of its last heartbeat and its roster."""
        with self.transaction(write=False) as db:
            beats = db.execute(f"SELECT name, {self._backend.now} - heartbeat_at FROM hosts ORDER BY name").fetchall()
            rows = db.execute("SELECT host, account, state, fingerprint FROM host_accounts ORDER BY host, account")
            rosters: dict[str, list[Published]] = {}
            for host, *account in rows:
                rosters.setdefault(host, []).append(Published(*account))
        return [HostRecord(name, float(age), tuple(rosters.get(name, ()))) for name, age in beats]

    # operators' settings

    def settings(self) -> dict[str, AccountSettings]:
        """Every account name with a setting, present in the roster or not."""
        rows = self._rows(
            "SELECT account, paused_at, max_sessions, models, allow_overage, pause_at FROM account_settings"
        )
        return {
            row[0]: AccountSettings(
                row[0], row[1], row[2], tuple(json.loads(row[3])) if row[3] is not None else None, bool(row[4]), row[5]
            )
            for row in rows
        }

    def set_account(self, /, account: str, by: int, **changes: Any) -> AccountSettings:
        """Change some of `account`'s settings (`paused`, `allow_overage`: a bool; `max_sessions`,
        `models`, `pause_at`: a value, or None for the default); the row goes when nothing is left set.
        Ledgered with who did it."""
        now = time.time()
        with self.transaction() as db:
            row = db.execute(
                "SELECT paused_at, max_sessions, models, allow_overage, pause_at FROM account_settings"
                " WHERE account = ?",
                (account,),
            ).fetchone()
            paused_at, max_sessions, models, overage, pause_at = tuple(row) if row else (None,) * 5
            if "paused" in changes:
                paused_at = (paused_at or now) if changes["paused"] else None
            if "max_sessions" in changes:
                max_sessions = changes["max_sessions"]
            if "models" in changes:
                models = json.dumps(list(changes["models"])) if changes["models"] is not None else None
            if "allow_overage" in changes:
                overage = 1 if changes["allow_overage"] else None
            if "pause_at" in changes:
                pause_at = changes["pause_at"]
            if (paused_at, max_sessions, models, overage, pause_at) == (None,) * 5:
                db.execute("DELETE FROM account_settings WHERE account = ?", (account,))
            else:
                db.execute(
                    "INSERT INTO account_settings"
                    " (account, paused_at, max_sessions, models, updated_at, allow_overage, pause_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (account) DO UPDATE SET"
                    " paused_at = excluded.paused_at, max_sessions = excluded.max_sessions,"
                    " models = excluded.models, updated_at = excluded.updated_at,"
                    " allow_overage = excluded.allow_overage, pause_at = excluded.pause_at",
                    (account, paused_at, max_sessions, models, now, overage, pause_at),
                )
            self.record(db, "account settings changed", account=account, by=by, **changes)
        return self.settings().get(account, AccountSettings(account))

    def record_usage(
        self,
        account: str,
        utilization: dict[str, float],
        used_at: float | None = None,
        tokens: tuple[int, int] = (0, 0),
        *,
        resets: dict[str, float] | None = None,
        burn_step: float = BURN_STEP,
        idle: bool = False,
    ) -> None:
        """Utilization as last reported at `used_at` (a window not reported keeps its value);
        tokens add up. With `resets` (the API's headers: each window's reset), each window's
        reading is kept with its base, an earlier reading of the same period, for its burn rate
        (`windows`), measured over `burn_step` seconds or more. `idle`: the reading is of an
        account no session used (the gateway's probe), so its last use stays as it was."""
        with self.transaction() as db:
            if resets is not None and used_at is not None:
                db.executemany(
                    WINDOW_UPSERT,
                    [
                        (account, name, value, resets.get(name), used_at, value, used_at, *(burn_step,) * _STEPS)
                        for name, value in sorted(utilization.items(), key=lambda item: item[0] != "five_hour")
                    ],
                )
                db.executemany(
                    "INSERT INTO window_hours (account, period, hour, utilization) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT (hour, period, account) DO UPDATE SET utilization = excluded.utilization",
                    [(account, name, int(used_at // 3600), value) for name, value in utilization.items()],
                )
            db.execute(
                "INSERT INTO usage (account, five_hour, seven_day, last_used_at, input_tokens, output_tokens)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(account) DO UPDATE SET"
                " five_hour = COALESCE(excluded.five_hour, usage.five_hour),"
                " seven_day = COALESCE(excluded.seven_day, usage.seven_day),"
                " last_used_at = COALESCE(excluded.last_used_at, usage.last_used_at),"
                " input_tokens = usage.input_tokens + excluded.input_tokens,"
                " output_tokens = usage.output_tokens + excluded.output_tokens",
                (
                    account,
                    utilization.get("five_hour"),
                    utilization.get("seven_day"),
                    None if idle else used_at,
                    *tokens,
                ),
            )

    def windows(self) -> dict[str, dict[str, Window]]:
        """Each account's windows as last read from the API's headers, with their burn rates."""
        found: dict[str, dict[str, Window]] = {}
        query = (
            "SELECT account, period, utilization, reset_at, per_hour, observed_at, after_wall, per_session FROM windows"
        )
        for row in self._rows(query):
            found.setdefault(row[0], {})[row[1]] = Window(row[2], row[3], row[4], row[5], bool(row[6]), row[7])
        return found

    def history(self, now: float, roster: Container[str], top: int = 8) -> dict[str, Any]:
        """The dashboard's last `HISTORY_HOURS` hours: for each window and hour, the accounts'
        mean and highest utilization (each account's last reading in that hour), and the 5-hour
        window of the `top` accounts of `roster` (the registry's, now) fullest now, hour by hour.
        Hours as Unix times."""
        since = int(now // 3600) - HISTORY_HOURS + 1
        fleet: dict[str, list[list[float]]] = {}
        rows = self._rows(
            "SELECT period, hour, AVG(utilization), MAX(utilization) FROM window_hours WHERE hour >= ?"
            " GROUP BY period, hour ORDER BY period, hour",
            (since,),
        )
        for period, hour, mean, highest in rows:
            fleet.setdefault(period, []).append([hour * 3600, mean, highest])
        fullest = self._rows(  # (a name the roster no longer has keeps its row: some to spare)
            "SELECT account FROM windows WHERE period = 'five_hour' ORDER BY utilization DESC, account LIMIT ?",
            (top * 8,),
        )
        names = [row[0] for row in fullest if row[0] in roster][:top]
        accounts: dict[str, list[list[float]]] = {name: [] for name in names}
        if names:
            rows = self._rows(
                f"SELECT account, hour, utilization FROM window_hours WHERE period = 'five_hour' AND hour >= ?"
                f" AND account IN {sql_set(tuple(names))} ORDER BY account, hour",
                (since, *names),
            )
            for name, hour, used in rows:
                accounts[name].append([hour * 3600, used])
        return {"fleet": fleet, "accounts": accounts}

    def events(self, since: float, limit: int = 200) -> list[dict[str, Any]]:
        """Walls and moves since `since`, newest first: `{"at", "kind": "wall", "account"}` for a
        session that met a wall, `{"at", "kind": "move", "account", "from"}` for a session moved
        (early or after a wall). No job, session or prompt: what the dashboard may show anyone."""
        walls = self._rows(
            "SELECT ended_at, account FROM runs WHERE state = ? AND ended_at >= ?"
            " AND (error IS NULL OR error NOT LIKE ?) ORDER BY id DESC LIMIT ?",
            (RunState.WALLED, since, f"{MOVED_EARLY}%", limit),
        )
        moves = self._rows(
            "SELECT r.created_at, r.account, (SELECT p.account FROM runs p WHERE p.job_id = r.job_id AND p.id < r.id"
            " ORDER BY p.id DESC LIMIT 1) FROM runs r WHERE r.resume IS NOT NULL AND r.prompt IS NULL"
            " AND r.created_at >= ? ORDER BY r.id DESC LIMIT ?",
            (since, limit),
        )
        found = [{"at": at, "kind": "wall", "account": account} for at, account in walls]
        found += [{"at": at, "kind": "move", "account": to, "from": was} for at, to, was in moves if was != to]
        return sorted(found, key=lambda event: -event["at"])[:limit]

    def usage(self) -> dict[str, dict[str, float | None]]:
        rows = self._rows("SELECT * FROM usage")
        keys = ("five_hour", "seven_day", "last_used_at", "input_tokens", "output_tokens")
        return {row["account"]: {k: row[k] for k in keys} for row in rows}

    def ledger(self, limit: int = 100) -> list[dict[str, Any]]:
        rows = self._rows("SELECT * FROM ledger ORDER BY id DESC LIMIT ?", (limit,))
        return [{**dict(row), "detail": json.loads(row["detail"]) if row["detail"] else None} for row in reversed(rows)]


@functools.cache
def _listing(backend: type[Backend]) -> str:
    """`status`'s listing as one query (`{where}` for the filter): the sessions and the jobs as JSON
    arrays, rendered by the database (prompts never loaded, no Python object per job), and the
    queue's length."""
    iso = backend.iso_utc
    return f"""
WITH line AS MATERIALIZED (
    SELECT j.id, j.state, j.account, j.session_id, j.cwd, j.host, j.model, {iso("j.created_at")} AS created_at, j.error,
           r.state AS run_state, {iso("r.created_at")} AS run_started_at, r.error AS run_error
    FROM jobs j LEFT JOIN runs r ON r.id = (SELECT MAX(id) FROM runs WHERE job_id = j.id)
    {{where}}
    ORDER BY j.id
)
SELECT
    ({
        backend.json_rows(
            "'session_id', session_id, 'job', id, 'account', account, 'state', run_state, 'cwd', cwd, 'host', host,"
            " 'started_at', run_started_at, 'error', run_error",
            "line WHERE run_state IS NOT NULL",
        )
    }),
    ({
        backend.json_rows(
            "'id', id, 'state', state, 'account', account, 'session_id', session_id, 'cwd', cwd, 'host', host,"
            " 'model', model, 'created_at', created_at, 'error', error",
            "line",
        )
    }),
    (SELECT COUNT(*) FROM jobs WHERE state = ?)
"""


RUN_COLUMNS = "job_id, account, state, resume, created_at, prior_state, live, prompt"
RUN_INSERT = f"INSERT INTO runs ({RUN_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"


def _waiting(resume: str | None) -> tuple[str, ...]:
    """The job states a placement takes a job from: queued, or (resuming a session) walled or orphaned too."""
    return (JobState.QUEUED,) if resume is None else (*RESCUABLE, JobState.QUEUED)


def _run_values(placement: Placement, job: Any, live: bool, now: float) -> tuple[Any, ...]:
    """`RUN_INSERT`'s values for a placement of `job` (its row: state and pending prompt)."""
    resume, prior = placement.resume, placement.resume and job["state"]
    return (
        placement.job_id,
        placement.account,
        RunState.STARTING,
        resume,
        now,
        prior,
        int(live),
        job["pending_prompt"],
    )


def _placed(placement: Placement, job: Any, run: Run) -> tuple[str, int, str, dict[str, Any]]:
    """The ledger's entry for a placement: a job placed, a follow-up started, a move started."""
    detail: dict[str, Any] = {"run": run.id}
    if placement.resume is None:
        return "job placed", run.job_id, run.account, detail
    detail["session"] = placement.resume
    if job["state"] == JobState.QUEUED:
        return "follow-up started", run.job_id, run.account, detail
    return "move started", run.job_id, run.account, {**detail, "source": job["account"], "live": bool(run.live)}


def _model_walls(db: Db, accounts: Sequence[str] | None, now: float) -> dict[str, dict[str, float | None]]:
    """Model windows standing at `now` (of `accounts`, or all): account -> family -> reset."""
    among = f" AND account IN {sql_set(accounts)}" if accounts is not None else ""
    rows = db.execute(
        f"SELECT account, model, reset_at FROM model_walls WHERE {STANDING}{among}",
        (now, *(accounts or ())),
    )
    walls: dict[str, dict[str, float | None]] = {}
    for account, model, reset_at in rows:
        walls.setdefault(account, {})[model] = reset_at
    return walls


def _model_walled(db: Db, account: str, model: str | None, now: float) -> bool:
    return model_walled(_model_walls(db, [account], now).get(account, {}), model)


def _holds(db: Db, run_id: int) -> bool:
    """The run is still its session's (`HOLDS_EPOCH`)."""
    return db.execute(f"SELECT 1 FROM runs WHERE id = ? AND {HOLDS_EPOCH}", (run_id,)).fetchone() is not None


def _without_room(db: Db, accounts: Sequence[str], now: float) -> set[str]:
    """Of `accounts`, those walled now or paused."""
    walled = db.execute(
        f"SELECT account FROM walls WHERE account IN {sql_set(accounts)} AND {STANDING}"
        f" UNION SELECT account FROM account_settings WHERE account IN {sql_set(accounts)} AND paused_at IS NOT NULL",
        (*accounts, now, *accounts),
    )
    return {row[0] for row in walled}


def _live_runs(db: Db, accounts: Sequence[str], now: float) -> dict[str, int]:
    rows = db.execute(
        f"SELECT account, COUNT(*) FROM runs WHERE account IN {sql_set(accounts)} AND state IN {sql_set(LIVE_RUNS)}"
        f" AND {LEASED} GROUP BY account",
        (*accounts, *LIVE_RUNS, now),
    )
    return {row[0]: int(row[1]) for row in rows}


STANDING = "(reset_at IS NULL OR reset_at > ?)"
"""A wall (of an account, or of a model's window) that stands at `?`: one without a known reset
stands until lifted."""

LEASED = "(lease_until IS NULL OR lease_until > ?)"
"""A live run that counts against its account: starting, or running with its lease held (a run
whose lease lapsed has no CLI: its worker stopped it; its host may be gone)."""

HOLDS_EPOCH = "(runs.epoch IS NULL OR runs.epoch = (SELECT epoch FROM jobs WHERE jobs.id = runs.job_id))"
"""A run that is still its session's (fencing): unclaimed, or claimed in its job's epoch."""

ROOM = (
    f"EXISTS (SELECT 1 FROM walls WHERE account = ? AND {STANDING}),"
    " EXISTS (SELECT 1 FROM account_settings WHERE account = ? AND paused_at IS NOT NULL),"
    f" (SELECT COUNT(*) FROM runs WHERE account = ? AND state IN {sql_set(LIVE_RUNS)} AND {LEASED})"
)
"""An account's room, as three columns: walled now, paused, its live runs (`_room_of` its parameters)."""


def _room_of(account: str, now: float) -> tuple[Any, ...]:
    return (account, now, account, account, *LIVE_RUNS, now)


def _full(room: Sequence[Any], limit: int) -> bool:
    """`ROOM`'s columns say the account is walled, paused, or has `limit` live runs."""
    walled, paused, live = room
    return bool(walled) or bool(paused) or int(live) >= limit


_SAME_PERIOD = "ABS(COALESCE(windows.reset_at, 0) - COALESCE(excluded.reset_at, 0)) < ?"
_MEASURED = f"{_SAME_PERIOD} AND excluded.observed_at - windows.base_at >= ?"
_RATE = "(excluded.utilization - windows.base_utilization) * 3600.0 / (excluded.observed_at - windows.base_at)"
_GAINED = f"CASE WHEN {_RATE} < 0 THEN 0 ELSE {_RATE} END"
"""The utilization gained per hour since the base (never negative)."""
_LIVE_STATES = ", ".join(f"'{state}'" for state in LIVE_RUNS)
_SESSIONS = f"(SELECT COUNT(*) FROM runs WHERE runs.account = windows.account AND runs.state IN ({_LIVE_STATES}))"
"""The runs live on the account now: the sessions a measured gain is shared among."""
_USED_UP = (
    "windows.utilization >= 1 OR EXISTS (SELECT 1 FROM windows AS other WHERE other.account = windows.account"
    " AND other.period <> windows.period AND other.utilization >= 1 AND other.reset_at <= excluded.observed_at)"
)
"""The account's last period of this window ended used up, or another window of its did and has
not been read since its reset."""
WINDOW_UPSERT = f"""
INSERT INTO windows (account, period, utilization, reset_at, observed_at, base_utilization, base_at)
VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (account, period) DO UPDATE SET
    per_hour = CASE WHEN NOT ({_MEASURED}) THEN windows.per_hour
        WHEN windows.per_hour IS NULL THEN {_GAINED}
        ELSE (windows.per_hour + {_GAINED}) / 2 END,
    per_session = CASE WHEN NOT ({_MEASURED}) OR {_SESSIONS} = 0 THEN windows.per_session
        WHEN windows.per_session IS NULL THEN {_GAINED} / {_SESSIONS}
        ELSE (windows.per_session + {_GAINED} / {_SESSIONS}) / 2 END,
    base_utilization = CASE WHEN NOT ({_SAME_PERIOD}) OR {_MEASURED} THEN excluded.utilization
        ELSE windows.base_utilization END,
    base_at = CASE WHEN NOT ({_SAME_PERIOD}) OR {_MEASURED} THEN excluded.observed_at ELSE windows.base_at END,
    after_wall = CASE WHEN {_SAME_PERIOD} THEN windows.after_wall WHEN {_USED_UP} THEN 1 ELSE 0 END,
    utilization = excluded.utilization,
    reset_at = excluded.reset_at,
    observed_at = excluded.observed_at
"""
"""A window's reading. Its burn rate is measured from the base (an earlier reading of the same
period) once a reading comes a step (`burn_step`, a minute) or more after it, which then becomes
the base (and per session: shared among the runs live on the account then); a new period (a
reset a step or more from the last) starts a new base and keeps the rates, the sessions' pace,
and follows a wall if the account had a window used up when its last reading was taken
(`Window.after_wall`: read the five-hour window first, so that a week's wall is seen before its
own new reading replaces it). The reading's 7 values come first, then the step for each other
`?`."""
_STEPS = WINDOW_UPSERT.count("?") - 7

ANSWERED_AS_WALL = "request answered as a wall: its home cut off"

READINGS = """SELECT
    (SELECT COUNT(*) FROM usage), (SELECT MAX(last_used_at) FROM usage), (SELECT COALESCE(SUM(
        input_tokens + output_tokens + COALESCE(five_hour, 0) + COALESCE(seven_day, 0)), 0) FROM usage),
    (SELECT COUNT(*) FROM windows), (SELECT MAX(observed_at) FROM windows),
    (SELECT COALESCE(SUM(utilization + COALESCE(reset_at, 0) + COALESCE(per_hour, 0)), 0) FROM windows)"""
"""What changed of the usage and the windows, read in a few milliseconds at 10,000 accounts:
`snapshot` reads them again only when this differs (each reading moves a time or a sum), not at
every commit of anything (a heartbeat's)."""
KNOWN_RESET = "(walls.source = 'api' AND walls.kind IN ('five_hour', 'seven_day'))"
"""A wall of a usage window whose reset the API's own headers named: it ends then, with no
probation (a session the account turns away meanwhile is moved in flight at the gateway)."""

ON_HOST = "(jobs.host IS NULL OR jobs.host = ?)"
"""A job of this host's: submitted on it, or before hosts were (in a fleet, each host places,
watches and moves only the jobs whose directory it has)."""


def open_backend(where: Path | str, busy_timeout: float) -> Backend:
    """SQLite for a path, PostgreSQL for a `postgresql://` (or `postgres://`) URL."""
    if isinstance(where, str) and where.startswith(("postgresql://", "postgres://")):
        from cl.store.postgresql import PostgresBackend  # noqa: PLC0415 - psycopg only where a server is used

        return PostgresBackend(where, busy_timeout)
    return SqliteBackend(Path(where), busy_timeout)
