"""The state store: jobs, runs, walls, usage and an append-only ledger, in SQLite.

One file, `<state_dir>/cl.db`, in WAL mode with a busy timeout, shared by both daemons and their
workers. The schema is versioned (`PRAGMA user_version`) and migrated forward on open. It never
holds the roster: an account here is only a name that facts are keyed by, and whether that account
exists is the registry's answer alone.

`Store` is the narrow interface a second backend (PostgreSQL, say) would implement.
Its methods are blocking; `AsyncStore` runs them on one dedicated thread so that the event loop
never waits on SQLite.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fnmatch
import json
import sqlite3
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar

from cl.moments import iso_utc
from cl.states import (
    FINISHED_JOBS,
    JOB_TRANSITIONS,
    LIVE_JOBS,
    LIVE_RUNS,
    RESCUABLE,
    RUN_TRANSITIONS,
    IllegalTransition,
    JobState,
    RunState,
)

P = ParamSpec("P")
R = TypeVar("R")

NEEDS_LOGIN = "needs-login"
"""The kind of wall the gateway records for an account whose refresh token was refused."""

BUSY_TIMEOUT = 10.0
"""Seconds a write waits for another writer's lock before the store reports itself unavailable."""

MIGRATIONS: list[str] = [
    # 1: the first schema
    """
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        cwd TEXT NOT NULL,
        prompt TEXT NOT NULL,
        model TEXT,
        max_turns INTEGER,
        state TEXT NOT NULL,
        account TEXT,
        session_id TEXT,
        error TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX jobs_by_state ON jobs(state, id);
    CREATE TABLE walls (
        account TEXT PRIMARY KEY,
        kind TEXT,
        reset_at REAL,
        source TEXT NOT NULL,
        recorded_at REAL NOT NULL
    );
    CREATE TABLE usage (
        account TEXT PRIMARY KEY,
        five_hour REAL,
        seven_day REAL,
        last_used_at REAL
    );
    CREATE TABLE ledger (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at REAL NOT NULL,
        event TEXT NOT NULL,
        job_id INTEGER,
        account TEXT,
        detail TEXT
    );
    """,
    # 2: runs, one per CLI process of a job (the first run, then one per resume)
    """
    CREATE TABLE runs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id INTEGER NOT NULL REFERENCES jobs(id),
        account TEXT NOT NULL,
        state TEXT NOT NULL,
        pid INTEGER,
        pid_start TEXT,
        session_id TEXT,
        resume TEXT,
        log_path TEXT,
        error TEXT,
        created_at REAL NOT NULL,
        ended_at REAL
    );
    CREATE INDEX runs_by_state ON runs(state);
    CREATE INDEX runs_by_job ON runs(job_id);
    """,
    # 3: tokens used per account, from each run's result
    """
    ALTER TABLE usage ADD COLUMN input_tokens INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE usage ADD COLUMN output_tokens INTEGER NOT NULL DEFAULT 0
    """,
    # 4: moves (a run that resumes a session elsewhere) and the first answer a run got
    """
    ALTER TABLE runs ADD COLUMN prior_state TEXT;
    ALTER TABLE runs ADD COLUMN transcript_bytes INTEGER;
    ALTER TABLE runs ADD COLUMN answered_at REAL;
    ALTER TABLE runs ADD COLUMN verified_at REAL;
    CREATE INDEX runs_unverified ON runs(id) WHERE resume IS NOT NULL AND verified_at IS NULL
    """,
    # 5: an account's live runs, counted inside every placing transaction
    """
    CREATE INDEX runs_by_account ON runs(account, state)
    """,
    # 6: who submitted each job (its uid); a move's transcript size after it, as its worker saw it;
    # each run's result event (the answer), redacted
    """
    ALTER TABLE jobs ADD COLUMN submitter INTEGER;
    ALTER TABLE runs ADD COLUMN transcript_bytes_after INTEGER;
    ALTER TABLE runs ADD COLUMN result TEXT;
    CREATE INDEX jobs_by_submitter ON jobs(submitter, id)
    """,
    # 7: operators' settings per account name: paused, a session limit, the models it may serve.
    # Facts keyed by name, like walls: a row never makes an account exist.
    """
    CREATE TABLE account_settings (
        account TEXT PRIMARY KEY,
        paused_at REAL,
        max_sessions INTEGER,
        models TEXT,
        updated_at REAL NOT NULL
    )
    """,
    # 8: live moves. A walled run whose worker holds its CLI alive (until `held_until`) can be
    # handed a move (`live`): the same process goes on with the new account's credential. Whether
    # a CLI version takes a new credential in a running process, as measured by such moves.
    # Follow-ups (`cl send`): the operator's next message, until a run takes it as its prompt.
    """
    ALTER TABLE runs ADD COLUMN live INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE runs ADD COLUMN held_until REAL;
    ALTER TABLE runs ADD COLUMN prompt TEXT;
    ALTER TABLE jobs ADD COLUMN pending_prompt TEXT;
    CREATE TABLE cli_versions (
        version TEXT PRIMARY KEY,
        swaps INTEGER NOT NULL,
        measured_at REAL NOT NULL
    )
    """,
    # 9: the gateway. A capability (its SHA-256 only) names the run whose CLI holds it: it works
    # while that run runs. A wall may name the credential it is about (a fingerprint: a refresh
    # token the token endpoint refused means `needs-login` until the file holds another). What
    # each run read from and wrote to the prompt cache, as the API reported it.
    """
    CREATE TABLE capabilities (
        digest TEXT PRIMARY KEY,
        run_id INTEGER NOT NULL,
        issued_at REAL NOT NULL
    );
    CREATE INDEX capabilities_by_run ON capabilities(run_id);
    ALTER TABLE walls ADD COLUMN credential TEXT;
    ALTER TABLE runs ADD COLUMN cache_read_tokens INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE runs ADD COLUMN cache_creation_tokens INTEGER NOT NULL DEFAULT 0
    """,
    # 10: a session id belongs to one job, the first that reported it: a CLI that prints another
    # job's is not believed.
    """
    CREATE TABLE sessions (
        session_id TEXT PRIMARY KEY,
        job_id INTEGER NOT NULL
    );
    INSERT OR IGNORE INTO sessions (session_id, job_id)
        SELECT session_id, MIN(job_id) FROM runs WHERE session_id IS NOT NULL GROUP BY session_id
    """,
]


@dataclasses.dataclass(frozen=True, slots=True)
class Job:
    id: int
    cwd: str
    prompt: str
    model: str | None
    max_turns: int | None
    state: JobState
    account: str | None
    session_id: str | None
    error: str | None
    created_at: float
    updated_at: float
    submitter: int | None
    """The uid that submitted it (from the connection's peer credentials)."""
    pending_prompt: str | None
    """A follow-up (`cl send`) no run has taken yet."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "state", JobState(self.state))  # as read from a row: text


@dataclasses.dataclass(frozen=True, slots=True)
class Run:
    id: int
    job_id: int
    account: str
    state: RunState
    pid: int | None
    pid_start: str | None
    session_id: str | None
    resume: str | None
    """The session this run resumes (`--resume`), if any."""
    log_path: str | None
    error: str | None
    created_at: float
    ended_at: float | None
    prior_state: str | None
    """A move's job state before it (walled, orphaned): where an abandoned move puts it back."""
    transcript_bytes: int | None
    """A move's transcript size before its CLI started: the move is verified by the transcript growing."""
    answered_at: float | None
    """When the account first answered this run (not a wall): proof the account works."""
    verified_at: float | None
    transcript_bytes_after: int | None
    """A move's transcript size once its CLI exited (measured by its worker, as the CLI's user)."""
    result: str | None
    """The run's `result` event as JSON (redacted): the answer, its cost and usage."""
    live: bool
    """A live move: handed to the worker of the run before it, whose CLI goes on, not launched."""
    held_until: float | None
    """The run walled and its worker holds its CLI alive until then, for a live move."""
    prompt: str | None
    """A follow-up's text (`cl send`): this run's prompt instead of the job's or `resume_prompt`."""
    cache_read_tokens: int
    """Prompt-cache tokens the API read for this run (through the gateway): what stayed warm."""
    cache_creation_tokens: int
    """Prompt-cache tokens the API wrote for this run: a move to another organization starts cold."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "state", RunState(self.state))  # as read from a row: text
        object.__setattr__(self, "live", bool(self.live))

    @property
    def is_move(self) -> bool:
        """It resumes a session that walled or was orphaned (the rescuer's), rather than starting
        a queued job or following one up (the balancer's)."""
        return self.resume is not None and self.prior_state in RESCUABLE

    @property
    def launcher(self) -> str:
        """The daemon that launches this run, and settles it if no worker ever claims it."""
        return "rescue" if self.is_move else "balancer"


@dataclasses.dataclass(frozen=True, slots=True)
class AccountSettings:
    """What an operator set for an account name (`cl accounts pause/set`); unset means the default."""

    account: str
    paused_at: float | None = None
    """Paused since then: it takes no new or moved work; its live sessions finish."""
    max_sessions: int | None = None
    """Its own session limit, instead of `max_sessions_per_account`."""
    models: tuple[str, ...] | None = None
    """The models it may serve, as shell patterns (`opus`, `claude-sonnet-*`); None: all."""

    def serves(self, model: str | None) -> bool:
        """A job without a model takes the CLI's default, which any account serves."""
        return model is None or self.models is None or any(fnmatch.fnmatchcase(model, p) for p in self.models)

    def public(self) -> dict[str, Any]:
        return {
            "account": self.account,
            "paused_since": iso_utc(self.paused_at) if self.paused_at is not None else None,
            "max_sessions": self.max_sessions,
            "models": list(self.models) if self.models is not None else None,
        }


UNSET = AccountSettings("")
"""The settings of a name nobody set anything for: every default."""


@dataclasses.dataclass(frozen=True, slots=True)
class WallRecord:
    account: str
    kind: str | None
    reset_at: float | None
    source: str
    recorded_at: float
    credential: str | None = None
    """For `needs-login`: the fingerprint of the refresh token refused (another in the file lifts it)."""


UsageRow = tuple[float | None, float | None, int, int]
"""five_hour, seven_day (utilization last reported, or None), input_tokens, output_tokens."""


@dataclasses.dataclass(frozen=True, slots=True)
class Listing:
    """The jobs and their sessions as `status` shows them: JSON arrays, and the queue's length."""

    sessions_json: str
    jobs_json: str
    queue: int


@dataclasses.dataclass(frozen=True, slots=True)
class AccountCounts:
    live: dict[str, int]
    usage: dict[str, UsageRow]


@dataclasses.dataclass(frozen=True, slots=True)
class Snapshot:
    """What `status` shows, read in one transaction. The same `listing` or `counts` object is
    handed out again while it is current."""

    listing: Listing
    counts: AccountCounts
    walls: dict[str, WallRecord]
    settings: dict[str, AccountSettings]


class StoreError(Exception):
    """A store problem an operator can act on (a newer schema, a corrupt file)."""


RETRY_MAX = 30.0
"""Seconds at most between two tries of a store that is unavailable."""


def retry_delay(previous: float, first: float = 1.0) -> float:
    """How long to wait before trying an unavailable store again: doubling from `first`."""
    return min(RETRY_MAX, max(first, previous * 2))


class StoreUnavailable(StoreError):
    """The database is locked past the busy timeout, the disk is full, the file cannot be opened:
    a condition that may pass, so callers retry rather than fail the work."""


class NoRoom(Exception):
    """The account is walled or at its session limit (checked inside the placing transaction)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Facts:
    """What placement and rescue decide on, read in one transaction."""

    jobs: list[Job]
    walls: dict[str, WallRecord]
    """Walls standing now."""
    probation: set[str]
    """Accounts whose wall has reset but that have not answered since: one session at a time."""
    live: dict[str, int]
    usage: dict[str, dict[str, float | None]]
    settings: dict[str, AccountSettings] = dataclasses.field(default_factory=dict)
    held: int = 0
    """Walled sessions whose worker holds their CLI alive for a live move (each keeps its CLI's user)."""


class Store:
    def __init__(self, path: Path, busy_timeout: float = BUSY_TIMEOUT) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=busy_timeout)
        self._db.row_factory = sqlite3.Row
        self._db.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        self._db.execute("PRAGMA synchronous = NORMAL")
        self._db.execute("PRAGMA foreign_keys = ON")
        self._shown: tuple[tuple[int, int], int | None, AccountCounts, dict[str, AccountSettings]] | None = None
        """What `snapshot` read, with the changes counters it was read at and the ledger's revision then."""
        self._listings: dict[tuple[int | None, bool], tuple[int | None, Listing]] = {}
        """Each listing (a submitter's or everyone's, with finished jobs or not), with the ledger
        revision it was read at."""
        self._prepare(busy_timeout)
        self._enforce_transitions()

    def _enforce_transitions(self) -> None:
        """Triggers of this connection's own (TEMP) that refuse a state change the tables of
        `cl.states` do not allow: made from those tables, so there is one table, not two."""
        for table, transitions in (("jobs", JOB_TRANSITIONS), ("runs", RUN_TRANSITIONS)):
            allowed = " OR ".join(
                f"(OLD.state = '{source}' AND NEW.state IN ({', '.join(repr(str(t)) for t in sorted(targets))}))"
                for source, targets in transitions.items()
                if targets
            )
            self._db.execute(
                f"CREATE TEMP TRIGGER IF NOT EXISTS {table}_transitions BEFORE UPDATE OF state ON main.{table}"
                f" WHEN OLD.state != NEW.state AND NOT ({allowed})"
                f" BEGIN SELECT RAISE(ABORT, 'illegal {table[:-1]} transition'); END"
            )

    def _prepare(self, busy_timeout: float) -> None:
        """WAL mode and the current schema. Two processes opening a fresh file at once can find it
        locked where SQLite's busy handler does not wait (switching to WAL): retried for up to the
        busy timeout."""
        deadline = time.monotonic() + busy_timeout
        while True:
            try:
                self._db.execute("PRAGMA journal_mode = WAL")
                self._migrate()
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
            else:
                return

    @property
    def schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def transaction(self, *, write: bool = True) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE: the write lock is taken up front, so no two writers interleave.

        `write=False` is a consistent read: WAL readers never wait for a writer.
        """
        self._db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            yield self._db
            self._db.execute("COMMIT")  # inside: a COMMIT that fails (disk full) is rolled back too
        except BaseException as exc:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.IntegrityError) and str(exc).startswith("illegal "):
                raise IllegalTransition(str(exc)) from None
            raise

    def _migrate(self) -> None:
        if self.schema_version == len(MIGRATIONS):
            return  # current: no write lock taken
        with self.transaction() as db:
            version = self.schema_version
            if version > len(MIGRATIONS):
                raise StoreError(f"{self.path}: schema version {version} is newer than this cl ({len(MIGRATIONS)})")
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in script.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {number}")

    def record(
        self, db: sqlite3.Connection, event: str, job_id: int | None = None, account: str | None = None, **detail: Any
    ) -> None:
        """Append to the ledger, inside the caller's transaction."""
        db.execute(
            "INSERT INTO ledger (at, event, job_id, account, detail) VALUES (?, ?, ?, ?, ?)",
            (time.time(), event, job_id, account, json.dumps(detail, default=str) if detail else None),
        )

    # jobs

    def add_job(
        self,
        cwd: str,
        prompt: str,
        model: str | None = None,
        max_turns: int | None = None,
        submitter: int | None = None,
    ) -> Job:
        now = time.time()
        with self.transaction() as db:
            cursor = db.execute(
                "INSERT INTO jobs (cwd, prompt, model, max_turns, state, created_at, updated_at, submitter)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (cwd, prompt, model, max_turns, JobState.QUEUED, now, now, submitter),
            )
            job_id = int(cursor.lastrowid or 0)
            self.record(db, "job queued", job_id, cwd=cwd)
        job = self.get_job(job_id)
        assert job is not None
        return job

    def get_job(self, job_id: int) -> Job | None:
        row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
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
        return [Job(*row) for row in self._db.execute(query, args)]

    def cancel_job(self, job_id: int) -> tuple[Job, Run | None] | None:
        """Cancel a job in any state but finished: nothing places, moves or resumes it again, and a
        run not yet claimed is ended here. The job afterwards, with its run still running (whose
        worker must stop its CLI) or held; None if there is no such job."""
        now = time.time()
        with self.transaction() as db:
            updated = db.execute(
                f"UPDATE jobs SET state = ?, updated_at = ? WHERE id = ? AND state IN {_sql_set(LIVE_JOBS)}",
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
        row = self._db.execute(  # running, or walled with its worker holding the CLI
            "SELECT * FROM runs WHERE job_id = ? AND (state = ? OR held_until IS NOT NULL) ORDER BY id DESC LIMIT 1",
            (job_id, RunState.RUNNING),
        ).fetchone()
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
                " ELSE pending_prompt || char(10) || char(10) || ? END, updated_at = ? WHERE id = ?",
                (text, text, time.time(), job_id),
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
            run = db.execute("SELECT * FROM runs WHERE id = ? AND state = ?", (run_id, RunState.RUNNING)).fetchone()
            if run is None:
                return None
            job = db.execute(
                "SELECT session_id, pending_prompt FROM jobs WHERE id = ? AND state = ?",
                (run["job_id"], JobState.RUNNING),
            ).fetchone()
            if job is None or job["pending_prompt"] is None:
                return None
            db.execute("UPDATE runs SET state = ?, ended_at = ? WHERE id = ?", (RunState.DONE, now, run_id))
            cursor = db.execute(
                "INSERT INTO runs (job_id, account, state, pid, pid_start, session_id, resume, created_at, live,"
                " prompt) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1, ?)",
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
                ),
            )
            follow = int(cursor.lastrowid or 0)
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
        now = time.time()
        waiting = (JobState.QUEUED,) if resume is None else (*RESCUABLE, JobState.QUEUED)
        with self.transaction() as db:
            job = db.execute("SELECT state, account, pending_prompt FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if job is None or job["state"] not in waiting:
                return None
            if self._walled(db, account, now) or self._paused(db, account) or self._live_on(db, account) >= limit:
                raise NoRoom(account)
            live = (
                live
                and db.execute("SELECT 1 FROM runs WHERE job_id = ? AND held_until IS NOT NULL", (job_id,)).fetchone()
                is not None
            )
            db.execute(
                "UPDATE jobs SET state = ?, account = ?, error = NULL, updated_at = ? WHERE id = ?",
                (JobState.RUNNING, account, now, job_id),
            )
            cursor = db.execute(
                "INSERT INTO runs (job_id, account, state, resume, created_at, prior_state, live, prompt)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, account, RunState.STARTING, resume, now, resume and job["state"], live, job["pending_prompt"]),
            )
            run_id = int(cursor.lastrowid or 0)
            if resume is None:
                self.record(db, "job placed", job_id, account, run=run_id)
            elif job["state"] == JobState.QUEUED:
                self.record(db, "follow-up started", job_id, account, run=run_id, session=resume)
            else:
                source = job["account"]
                self.record(db, "move started", job_id, account, run=run_id, session=resume, source=source, live=live)
        return self.get_run(run_id)

    def requeue(self, job_id: int, reason: str) -> bool:
        """A walled or orphaned job with no session to resume goes back to the queue."""
        with self.transaction() as db:
            moved = db.execute(
                "UPDATE jobs SET state = ?, account = NULL, updated_at = ?"
                f" WHERE id = ? AND state IN {_sql_set(RESCUABLE)}",
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
                f" AND prior_state IN {_sql_set(RESCUABLE)}",
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
                f"UPDATE jobs SET state = ?, error = ?, updated_at = ? WHERE id = ? AND state IN {_sql_set(RESCUABLE)}",
                (JobState.FAILED, reason, time.time(), job_id, *RESCUABLE),
            ).rowcount
            if failed:
                self.record(db, "job given up", job_id, error=reason)
        return bool(failed)

    @staticmethod
    def _walled(db: sqlite3.Connection, account: str, now: float) -> bool:
        query = "SELECT 1 FROM walls WHERE account = ? AND (reset_at IS NULL OR reset_at > ?)"
        return db.execute(query, (account, now)).fetchone() is not None

    @staticmethod
    def _paused(db: sqlite3.Connection, account: str) -> bool:
        query = "SELECT 1 FROM account_settings WHERE account = ? AND paused_at IS NOT NULL"
        return db.execute(query, (account,)).fetchone() is not None

    @staticmethod
    def _live_on(db: sqlite3.Connection, account: str) -> int:
        query = f"SELECT COUNT(*) FROM runs WHERE account = ? AND state IN {_sql_set(LIVE_RUNS)}"
        return int(db.execute(query, (account, *LIVE_RUNS)).fetchone()[0])

    def claim(self, run_id: int, pid: int, pid_start: str, log_path: str) -> Run | None:
        """The worker takes its run: starting -> running. None if the run is not `starting` any more."""
        with self.transaction() as db:
            claimed = db.execute(
                "UPDATE runs SET state = ?, pid = ?, pid_start = ?, log_path = ? WHERE id = ? AND state = ?",
                (RunState.RUNNING, pid, pid_start, log_path, run_id, RunState.STARTING),
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

    def held_run(self, job_id: int) -> Run | None:
        """The job's run whose worker holds its CLI for a live move, if any (not necessarily its
        latest: a live move handed to it may have been abandoned since)."""
        row = self._db.execute(
            "SELECT * FROM runs WHERE job_id = ? AND held_until IS NOT NULL ORDER BY id DESC LIMIT 1", (job_id,)
        ).fetchone()
        return Run(*row) if row else None

    def let_go(self, run_id: int) -> None:
        """The worker that held `run_id`'s CLI is gone: the session no longer counts as held."""
        with self.transaction() as db:
            db.execute("UPDATE runs SET held_until = NULL WHERE id = ?", (run_id,))

    def handed_over(self, run_id: int) -> Run | None:
        """The live move handed to the worker holding `run_id`'s CLI (`starting`, its to claim)."""
        return self._handed_over(self._db, run_id)

    def release(self, run_id: int) -> Run | None:
        """The worker holding `run_id`'s CLI stops holding it, unless a live move was handed to it
        meanwhile: that move, or None once released (`place` and this take turns)."""
        with self.transaction() as db:
            if (handed := self._handed_over(db, run_id)) is not None:
                return handed
            db.execute("UPDATE runs SET held_until = NULL WHERE id = ?", (run_id,))
        return None

    @staticmethod
    def _handed_over(db: sqlite3.Connection, run_id: int) -> Run | None:
        row = db.execute(
            "SELECT * FROM runs WHERE job_id = (SELECT job_id FROM runs WHERE id = ?) AND id > ? AND live"
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
        return _capability_run(self._db, digest)

    def record_cache(self, tokens: dict[int, tuple[int, int]]) -> None:
        """Prompt-cache tokens read and written, per run, added up."""
        with self.transaction() as db:
            db.executemany(
                "UPDATE runs SET cache_read_tokens = cache_read_tokens + ?,"
                " cache_creation_tokens = cache_creation_tokens + ? WHERE id = ?",
                [(read, created, run_id) for run_id, (read, created) in tokens.items()],
            )

    def move_in_flight(self, run_id: int, account: str, limit: int, log_path: Callable[[int], str]) -> Run | None:
        """A live move while the CLI's request waits at the gateway: the running `run_id` ends
        walled and the same worker and CLI go on, running, on `account` (a run of its own, which
        the capability follows). None if `run_id` is not running or has no session; raises
        `NoRoom` as `place` does."""
        now = time.time()
        with self.transaction() as db:
            run = db.execute("SELECT * FROM runs WHERE id = ? AND state = ?", (run_id, RunState.RUNNING)).fetchone()
            session = run and db.execute("SELECT session_id FROM jobs WHERE id = ?", (run["job_id"],)).fetchone()[0]
            if run is None or session is None:
                return None
            if self._walled(db, account, now) or self._paused(db, account) or self._live_on(db, account) >= limit:
                raise NoRoom(account)
            job_id = run["job_id"]
            db.execute(
                "UPDATE runs SET state = ?, error = ?, ended_at = ? WHERE id = ?",
                (RunState.WALLED, f"moved to {account} in flight", now, run_id),
            )
            cursor = db.execute(
                "INSERT INTO runs (job_id, account, state, pid, pid_start, session_id, resume, created_at, prior_state,"
                " live, answered_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 1, NULL)",
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
                ),
            )
            moved = int(cursor.lastrowid or 0)
            db.execute("UPDATE runs SET log_path = ? WHERE id = ?", (log_path(moved), moved))
            db.execute("UPDATE capabilities SET run_id = ? WHERE run_id = ?", (moved, run_id))
            db.execute("UPDATE jobs SET account = ?, updated_at = ? WHERE id = ?", (account, now, job_id))
            self.record(db, "run walled", job_id, run=run_id, error="moved in flight")
            source = run["account"]
            self.record(db, "move started", job_id, account, run=moved, session=session, source=source, live=True)
        return self.get_run(moved)

    def successor(self, run_id: int) -> Run | None:
        """The run a move in flight made of `run_id` (its worker goes on with it), if any."""
        row = self._db.execute(
            "SELECT * FROM runs WHERE job_id = (SELECT job_id FROM runs WHERE id = ?) AND id > ? AND live"
            " AND state = ? AND pid = (SELECT pid FROM runs WHERE id = ?) ORDER BY id DESC LIMIT 1",
            (run_id, run_id, RunState.RUNNING, run_id),
        ).fetchone()
        return Run(*row) if row else None

    def swaps(self, version: str) -> bool | None:
        """Whether CLI `version` took a new credential in a running process when last measured."""
        row = self._db.execute("SELECT swaps FROM cli_versions WHERE version = ?", (version,)).fetchone()
        return None if row is None else bool(row[0])

    def record_swap(self, version: str, swaps: bool) -> None:
        """What a live move measured of CLI `version` (the latest measurement stands)."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO cli_versions (version, swaps, measured_at) VALUES (?, ?, ?)"
                " ON CONFLICT (version) DO UPDATE SET swaps = excluded.swaps, measured_at = excluded.measured_at",
                (version, swaps, time.time()),
            )

    def set_session(self, run_id: int, session_id: str) -> bool:
        """The run's session id, as its CLI reported it; False (nothing written) if the id is
        another job's."""
        with self.transaction() as db:
            job_id = self._job_of(db, run_id)
            db.execute("INSERT OR IGNORE INTO sessions (session_id, job_id) VALUES (?, ?)", (session_id, job_id))
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
                f" WHERE id = ? AND state IN {_sql_set(ending)}",
                (state, error, now, held_until, run_id, *ending),
            ).rowcount
            if not ended:
                return None
            job_id, prior = db.execute("SELECT job_id, prior_state FROM runs WHERE id = ?", (run_id,)).fetchone()
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
            db.execute("UPDATE runs SET answered_at = ? WHERE id = ? AND answered_at IS NULL", (now, run_id))
            account = db.execute("SELECT account FROM runs WHERE id = ?", (run_id,)).fetchone()[0]
            lifted = db.execute("DELETE FROM walls WHERE account = ? AND reset_at <= ?", (account, now)).rowcount
            if lifted:
                self.record(db, "wall lifted", self._job_of(db, run_id), account, run=run_id)
        return account if lifted else None

    def waited_for_answer(self, run_id: int) -> float | None:
        """Seconds from what this run answered to, to its first answer: a fresh job's submission,
        or for a move, the end of the run before it (the session walled or orphaned then)."""
        row = self._db.execute(
            "SELECT r.answered_at - CASE WHEN r.resume IS NULL THEN j.created_at ELSE"
            " (SELECT p.ended_at FROM runs p WHERE p.job_id = r.job_id AND p.id < r.id ORDER BY p.id DESC LIMIT 1)"
            " END FROM runs r JOIN jobs j ON j.id = r.job_id WHERE r.id = ?",
            (run_id,),
        ).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def oldest_queued(self) -> float | None:
        """When the oldest queued job was submitted (epoch seconds)."""
        row = self._db.execute("SELECT MIN(created_at) FROM jobs WHERE state = ?", (JobState.QUEUED,)).fetchone()
        return None if row[0] is None else float(row[0])

    def unverified_moves(self) -> list[Run]:
        """Moves whose run has ended but whose outcome the rescuer has not checked yet."""
        rows = self._db.execute(
            "SELECT * FROM runs WHERE resume IS NOT NULL AND verified_at IS NULL"
            f" AND state NOT IN {_sql_set(LIVE_RUNS)} ORDER BY id",
            LIVE_RUNS,
        )
        return [Run(*row) for row in rows]

    def transcript_before(self, run_id: int, size: int | None) -> None:
        """A move's transcript size as its worker found it, before the CLI started."""
        with self.transaction() as db:
            db.execute("UPDATE runs SET transcript_bytes = ? WHERE id = ?", (size, run_id))

    def transcript_after(self, run_id: int, size: int | None) -> None:
        """A move's transcript size once its CLI exited."""
        with self.transaction() as db:
            db.execute("UPDATE runs SET transcript_bytes_after = ? WHERE id = ?", (size, run_id))

    def record_result(self, run_id: int, result: str) -> None:
        with self.transaction() as db:
            db.execute("UPDATE runs SET result = ? WHERE id = ?", (result, run_id))

    def job_runs(self, job_id: int) -> list[Run]:
        """Every run of a job, first to last."""
        return [Run(*row) for row in self._db.execute("SELECT * FROM runs WHERE job_id = ? ORDER BY id", (job_id,))]

    def previous_account(self, run_id: int) -> str | None:
        """The account of the run before this one in its job: whose credential an earlier CLI had."""
        row = self._db.execute(
            "SELECT account FROM runs WHERE job_id = (SELECT job_id FROM runs WHERE id = ?) AND id < ?"
            " ORDER BY id DESC LIMIT 1",
            (run_id, run_id),
        ).fetchone()
        return str(row[0]) if row else None

    def answered_before(self, run_id: int) -> bool:
        """Whether an account ever answered the session before this run (an earlier run of its job)."""
        row = self._db.execute(
            "SELECT 1 FROM runs WHERE job_id = (SELECT job_id FROM runs WHERE id = ?) AND id < ?"
            " AND answered_at IS NOT NULL LIMIT 1",
            (run_id, run_id),
        ).fetchone()
        return row is not None

    def verify_move(self, run_id: int) -> bool:
        """Settle a move in the ledger, with whether the transcript grew. False if already settled."""
        with self.transaction() as db:
            run = db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
            if run is None or run["verified_at"] is not None:
                return False
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
        row = self._db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        return Run(*row) if row else None

    def runs_in(self, states: tuple[str, ...] = LIVE_RUNS) -> list[Run]:
        rows = self._db.execute(f"SELECT * FROM runs WHERE state IN {_sql_set(states)} ORDER BY id", states)
        return [Run(*row) for row in rows]

    def live_counts(self) -> dict[str, int]:
        """Live runs per account name."""
        rows = self._db.execute(
            f"SELECT account, COUNT(*) FROM runs WHERE state IN {_sql_set(LIVE_RUNS)} GROUP BY account", LIVE_RUNS
        )
        return dict(rows.fetchall())

    def latest_run(self, job_id: int) -> Run | None:
        """The job's latest run."""
        row = self._db.execute("SELECT * FROM runs WHERE job_id = ? ORDER BY id DESC LIMIT 1", (job_id,)).fetchone()
        return Run(*row) if row else None

    def jobs_with_session(self, prefix: str, limit: int = 2, submitter: int | None = None) -> list[int]:
        """The jobs whose session id starts with `prefix` (as git takes a hash's start), at most
        `limit`; with `submitter`, only that uid's."""
        pattern = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        mine = "" if submitter is None else " AND submitter = ?"
        rows = self._db.execute(
            f"SELECT id FROM jobs WHERE session_id LIKE ? ESCAPE '\\'{mine} ORDER BY id LIMIT ?",
            (pattern, *(() if submitter is None else (submitter,)), limit),
        )
        return [row[0] for row in rows]

    def facts(self, states: tuple[str, ...], limit: int) -> Facts:
        """The first `limit` jobs in `states` (in submission order), with walls, live runs and usage."""
        now = time.time()
        query = f"SELECT * FROM jobs WHERE state IN {_sql_set(states)} ORDER BY id LIMIT ?"
        with self.transaction(write=False) as db:
            jobs = [Job(*row) for row in db.execute(query, (*states, limit))]
            expired = db.execute("SELECT account FROM walls WHERE reset_at <= ?", (now,))
            probation = {row[0] for row in expired}
            held = db.execute("SELECT COUNT(*) FROM runs WHERE held_until IS NOT NULL").fetchone()[0]
            return Facts(jobs, self.walls(now), probation, self.live_counts(), self.usage(), self.settings(), held)

    def queue_length(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM jobs WHERE state = ?", (JobState.QUEUED,)).fetchone()[0])

    def snapshot(self, submitter: int | None = None, *, finished: bool = True) -> Snapshot:
        """Everything `status` shows, read in one transaction, made cheap to ask again: what was
        read is kept until the database changes (the walls, which end with time, are always read),
        and the jobs' listing until the ledger grows (every change to a job or a run is recorded
        there in its transaction). SQLite renders the listing as JSON: prompts are never loaded,
        and no Python object is made per job (status rendering inside the store, on purpose:
        built in Python, `status` at 1,000 sessions took 39-51 ms; see bench/README.md). With
        `submitter`, the listing holds only that uid's jobs; without `finished`, only live ones
        (each listing kept apart)."""
        # Read before the transaction's snapshot: a commit in between makes the next key differ,
        # so what is kept is never older than its key.
        changes = (self._db.execute("PRAGMA data_version").fetchone()[0], self._db.total_changes)
        with self.transaction(write=False) as db:
            if self._shown is None or self._shown[0] != changes:
                revision = db.execute("SELECT MAX(id) FROM ledger").fetchone()[0]
                usage = db.cursor()
                usage.row_factory = None  # plain tuples: 1,000 rows in a fraction of a millisecond
                usage.execute("SELECT account, five_hour, seven_day, input_tokens, output_tokens FROM usage")
                counts = AccountCounts(self.live_counts(), {account: tuple(row) for account, *row in usage})
                self._shown = (changes, revision, counts, self.settings())
            revision, counts, settings = self._shown[1], self._shown[2], self._shown[3]
            key = (submitter, finished)
            kept = self._listings.get(key)
            if kept is None or kept[0] != revision:
                query, arguments = _listing(submitter, finished=finished)
                listing = Listing(*db.execute(query, arguments).fetchone())
                kept = self._listings[key] = (revision, listing)
            return Snapshot(kept[1], counts, self.walls(), settings)

    @staticmethod
    def _job_of(db: sqlite3.Connection, run_id: int) -> int:
        return int(db.execute("SELECT job_id FROM runs WHERE id = ?", (run_id,)).fetchone()[0])

    # walls and usage

    def record_wall(self, account: str, source: str, reset_at: float | None, kind: str | None = None) -> None:
        now = time.time()
        with self.transaction() as db:
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
                "DELETE FROM walls WHERE account = ? AND kind = ? AND credential IS NOT ?",
                (account, NEEDS_LOGIN, credential),
            ).rowcount
            if lifted:
                self.record(db, "account logged in", account=account)
        return bool(lifted)

    def walls(self, now: float | None = None) -> dict[str, WallRecord]:
        """Walls still standing at `now`; a wall without a known reset stands until lifted."""
        now = time.time() if now is None else now
        rows = self._db.execute("SELECT * FROM walls WHERE reset_at IS NULL OR reset_at > ?", (now,))
        return {row["account"]: WallRecord(*row) for row in rows}

    def prune(self, before: float, batch: int = 5000) -> int:
        """Forget finished jobs last changed before `before` (epoch seconds), with their runs and
        ledger rows, and ledger rows about no job from then; live jobs keep everything. In
        batches, so no write waits long; the file is compacted after a large pass. How many jobs."""
        finished = f"SELECT id FROM jobs WHERE state IN {_sql_set(FINISHED_JOBS)} AND updated_at < ? LIMIT ?"
        pruned = 0
        while True:
            with self.transaction() as db:
                ids = [row[0] for row in db.execute(finished, (*FINISHED_JOBS, before, batch))]
                chosen = _sql_set(tuple(map(str, ids)))
                db.execute(f"DELETE FROM ledger WHERE job_id IN {chosen}", ids)
                db.execute(f"DELETE FROM runs WHERE job_id IN {chosen}", ids)
                db.execute(f"DELETE FROM sessions WHERE job_id IN {chosen}", ids)
                db.execute(f"DELETE FROM jobs WHERE id IN {chosen}", ids)
            pruned += len(ids)
            if len(ids) < batch:
                break
        with self.transaction() as db:
            db.execute("DELETE FROM ledger WHERE job_id IS NULL AND at < ?", (before,))
            db.execute(  # capabilities of CLIs that are gone (a worker killed before it revoked one)
                "DELETE FROM capabilities WHERE issued_at < ? AND run_id NOT IN"
                f" (SELECT id FROM runs WHERE state IN {_sql_set(LIVE_RUNS)})",
                (before, *LIVE_RUNS),
            )
        if pruned >= batch:
            self._db.execute("VACUUM")
        return pruned

    # operators' settings

    def settings(self) -> dict[str, AccountSettings]:
        """Every account name with a setting, present in the roster or not."""
        rows = self._db.execute("SELECT account, paused_at, max_sessions, models FROM account_settings")
        return {
            row[0]: AccountSettings(row[0], row[1], row[2], tuple(json.loads(row[3])) if row[3] is not None else None)
            for row in rows
        }

    def set_account(self, /, account: str, by: int, **changes: Any) -> AccountSettings:
        """Change some of `account`'s settings (`paused`: a bool; `max_sessions`, `models`: a value,
        or None for the default); the row goes when nothing is left set. Ledgered with who did it."""
        now = time.time()
        with self.transaction() as db:
            row = db.execute("SELECT * FROM account_settings WHERE account = ?", (account,)).fetchone()
            paused_at, max_sessions, models = (row[1], row[2], row[3]) if row else (None, None, None)
            if "paused" in changes:
                paused_at = (paused_at or now) if changes["paused"] else None
            if "max_sessions" in changes:
                max_sessions = changes["max_sessions"]
            if "models" in changes:
                models = json.dumps(list(changes["models"])) if changes["models"] is not None else None
            if paused_at is None and max_sessions is None and models is None:
                db.execute("DELETE FROM account_settings WHERE account = ?", (account,))
            else:
                db.execute(
                    "INSERT OR REPLACE INTO account_settings VALUES (?, ?, ?, ?, ?)",
                    (account, paused_at, max_sessions, models, now),
                )
            self.record(db, "account settings changed", account=account, by=by, **changes)
        return self.settings().get(account, AccountSettings(account))

    def record_usage(
        self,
        account: str,
        utilization: dict[str, float],
        used_at: float | None = None,
        tokens: tuple[int, int] = (0, 0),
    ) -> None:
        """Utilization as last reported (a window not reported keeps its value); tokens add up."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO usage (account, five_hour, seven_day, last_used_at, input_tokens, output_tokens)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(account) DO UPDATE SET"
                " five_hour = COALESCE(excluded.five_hour, five_hour),"
                " seven_day = COALESCE(excluded.seven_day, seven_day),"
                " last_used_at = COALESCE(excluded.last_used_at, last_used_at),"
                " input_tokens = input_tokens + excluded.input_tokens,"
                " output_tokens = output_tokens + excluded.output_tokens",
                (account, utilization.get("five_hour"), utilization.get("seven_day"), used_at, *tokens),
            )

    def usage(self) -> dict[str, dict[str, float | None]]:
        rows = self._db.execute("SELECT * FROM usage")
        keys = ("five_hour", "seven_day", "last_used_at", "input_tokens", "output_tokens")
        return {row["account"]: {k: row[k] for k in keys} for row in rows}

    def ledger(self, limit: int = 100) -> list[dict[str, Any]]:
        rows = self._db.execute("SELECT * FROM ledger ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [{**dict(row), "detail": json.loads(row["detail"]) if row["detail"] else None} for row in reversed(rows)]


_ISO = "strftime('%Y-%m-%dT%H:%M:%SZ', {}, 'unixepoch')"


def _listing(submitter: int | None, *, finished: bool) -> tuple[str, tuple[Any, ...]]:
    """The listing's query for a submitter (or everyone), with finished jobs or live ones only:
    each filter a plain condition, so that SQLite takes the index for it."""
    conditions, arguments = [], list[Any]()
    if submitter is not None:
        conditions.append("j.submitter = ?")
        arguments.append(submitter)
    if not finished:
        conditions.append(f"j.state IN {_sql_set(LIVE_JOBS)}")
        arguments.extend(LIVE_JOBS)
    where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
    return _LISTING.replace("{where}", where), (*arguments, JobState.QUEUED)


_LISTING = f"""
WITH line AS MATERIALIZED (
    SELECT j.id, j.state, j.account, j.session_id, j.cwd, {_ISO.format("j.created_at")} AS created_at, j.error,
           r.state AS run_state, {_ISO.format("r.created_at")} AS run_started_at, r.error AS run_error
    FROM jobs j LEFT JOIN runs r ON r.id = (SELECT MAX(id) FROM runs WHERE job_id = j.id)
    {{where}}
    ORDER BY j.id
)
SELECT
    (SELECT json_group_array(json_object(
        'session_id', session_id, 'job', id, 'account', account, 'state', run_state, 'cwd', cwd,
        'started_at', run_started_at, 'error', run_error)) FROM line WHERE run_state IS NOT NULL),
    (SELECT json_group_array(json_object(
        'id', id, 'state', state, 'account', account, 'session_id', session_id, 'cwd', cwd,
        'created_at', created_at, 'error', error)) FROM line),
    (SELECT COUNT(*) FROM jobs WHERE state = ?)
"""


def _sql_set(values: tuple[str, ...]) -> str:
    """`(?, ?, ...)`: placeholders only, the values are always bound."""
    return f"({', '.join('?' * len(values))})"


def _capability_run(db: sqlite3.Connection, digest: str) -> Run | None:
    row = db.execute(
        "SELECT runs.* FROM capabilities JOIN runs ON runs.id = capabilities.run_id"
        " WHERE capabilities.digest = ? AND runs.state = ?",
        (digest, RunState.RUNNING),
    ).fetchone()
    return Run(*row) if row else None


class Lookup:
    """Reads on the caller's own thread (an event loop's) that never wait: a read-only connection
    of their own that gives up at once (`sqlite3.OperationalError`) when the file is locked (a
    VACUUM, a checkpoint), so the caller can ask the store's thread instead. WAL readers are
    otherwise never blocked by a writer."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=0)
        self._db.execute("PRAGMA query_only = ON")

    def capability_run(self, digest: str) -> Run | None:
        return _capability_run(self._db, digest)

    def close(self) -> None:
        self._db.close()


class _OnStoreThread(Generic[P, R]):
    """A `Store` method as a coroutine method of `AsyncStore`: the same arguments, run on the
    store's thread."""

    def __init__(self, method: Callable[Concatenate[Store, P], R]) -> None:
        self._method = method

    def __get__(self, instance: AsyncStore, owner: type[AsyncStore]) -> Callable[P, Coroutine[Any, Any, R]]:
        method = self._method

        async def on_store_thread(*args: P.args, **kwargs: P.kwargs) -> R:
            return await instance.call(method, *args, **kwargs)

        return on_store_thread


class AsyncStore:
    """`Store` for the event loop: every call runs on one dedicated thread, in order, and SQLite's
    operational errors (locked, disk full, I/O) come out as `StoreUnavailable`."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store")

    async def call(self, function: Callable[Concatenate[Store, P], R], *args: P.args, **kwargs: P.kwargs) -> R:
        """`function(store, *args, **kwargs)` on the store's thread (several store calls as one step)."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, lambda: function(self._store, *args, **kwargs))
        except sqlite3.OperationalError as exc:
            raise StoreUnavailable(f"state store {self._store.path}: {exc}") from exc

    add_job = _OnStoreThread(Store.add_job)
    capability_run = _OnStoreThread(Store.capability_run)
    logged_in = _OnStoreThread(Store.logged_in)
    move_in_flight = _OnStoreThread(Store.move_in_flight)
    needs_login = _OnStoreThread(Store.needs_login)
    record_cache = _OnStoreThread(Store.record_cache)
    record_usage = _OnStoreThread(Store.record_usage)
    record_wall = _OnStoreThread(Store.record_wall)
    walls = _OnStoreThread(Store.walls)
    cancel_job = _OnStoreThread(Store.cancel_job)
    facts = _OnStoreThread(Store.facts)
    get_job = _OnStoreThread(Store.get_job)
    get_run = _OnStoreThread(Store.get_run)
    give_up = _OnStoreThread(Store.give_up)
    held_run = _OnStoreThread(Store.held_run)
    job_runs = _OnStoreThread(Store.job_runs)
    jobs_with_session = _OnStoreThread(Store.jobs_with_session)
    latest_run = _OnStoreThread(Store.latest_run)
    let_go = _OnStoreThread(Store.let_go)
    oldest_queued = _OnStoreThread(Store.oldest_queued)
    place = _OnStoreThread(Store.place)
    send = _OnStoreThread(Store.send)
    prune = _OnStoreThread(Store.prune)
    queue_length = _OnStoreThread(Store.queue_length)
    requeue = _OnStoreThread(Store.requeue)
    runs_in = _OnStoreThread(Store.runs_in)
    set_account = _OnStoreThread(Store.set_account)
    settings = _OnStoreThread(Store.settings)
    settle = _OnStoreThread(Store.settle)
    snapshot = _OnStoreThread(Store.snapshot)
    troubles = _OnStoreThread(Store.troubles)
    waited_for_answer = _OnStoreThread(Store.waited_for_answer)

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self._store.close()
