"""The embedded backend: one SQLite file, `<state_dir>/cl.db`, shared by the daemons and their workers.

WAL mode with a busy timeout: readers never wait for the writer, and `BEGIN IMMEDIATE` takes the
write lock up front, so no two writers interleave. The schema is versioned (`PRAGMA user_version`)
and migrated forward on open.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Hashable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from cl.states import JOB_TRANSITIONS, RUN_TRANSITIONS, IllegalTransition
from cl.store.backend import Db, capability_run, illegal_transition
from cl.store.records import Run, StoreError, StoreUnavailable

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
    # 11: the fleet. Each host's roster as its own registry last saw it (names, states, a
    # fingerprint of the credential, never a secret), with its heartbeat on the database's clock.
    """
    CREATE TABLE hosts (
        name TEXT PRIMARY KEY,
        heartbeat_at REAL NOT NULL,
        roster_digest TEXT NOT NULL
    );
    CREATE TABLE host_accounts (
        host TEXT NOT NULL,
        account TEXT NOT NULL,
        state TEXT NOT NULL,
        fingerprint TEXT,
        PRIMARY KEY (host, account)
    );
    CREATE INDEX host_accounts_by_fingerprint ON host_accounts(fingerprint)
    """,
    # 12: the host a job was submitted on, where its directory is: in a fleet, only that host's
    # daemons place, watch and move it (none: from before hosts, any host's)
    """
    ALTER TABLE jobs ADD COLUMN host TEXT;
    CREATE INDEX jobs_by_host ON jobs(host, state, id)
    """,
    # 13: where each host's gateway takes the other hosts' requests for its accounts (`fleet_listen`)
    "ALTER TABLE hosts ADD COLUMN gateway TEXT",
    # 14: a host's gateway could not reach another's (`Store.cut_off`): no work goes from it to
    # that host's accounts until then
    """
    CREATE TABLE unreachable (
        host TEXT NOT NULL,
        home TEXT NOT NULL,
        until REAL NOT NULL,
        PRIMARY KEY (host, home)
    )
    """,
    # 15: leases and epochs (`Store.claim`, `Store.renew`): a running run's worker renews its
    # lease; the job's epoch moves on when its session changes hands, and fences the old holder
    """
    ALTER TABLE jobs ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE runs ADD COLUMN epoch INTEGER;
    ALTER TABLE runs ADD COLUMN lease_until REAL
    """,
    # 16: walls of one model's window (`seven_day_opus`, `seven_day_sonnet`): the account still
    # serves the other models
    """
    CREATE TABLE model_walls (
        account TEXT NOT NULL,
        model TEXT NOT NULL,
        reset_at REAL,
        recorded_at REAL NOT NULL,
        PRIMARY KEY (account, model)
    )
    """,
    # 17: an account allowed to spend paid overage past its windows (`cl accounts set`)
    "ALTER TABLE account_settings ADD COLUMN allow_overage INTEGER",
    # 18: each account's windows as the API's headers last said them (utilization, reset), and
    # their burn rate, measured between readings a minute or more apart (`Store.record_usage`)
    """
    CREATE TABLE windows (
        account TEXT NOT NULL,
        period TEXT NOT NULL,
        utilization REAL NOT NULL,
        reset_at REAL,
        observed_at REAL NOT NULL,
        base_utilization REAL NOT NULL,
        base_at REAL NOT NULL,
        per_hour REAL,
        PRIMARY KEY (account, period)
    )
    """,
    # 19: an account that takes no new work while a window of its is this full (`cl accounts set`)
    "ALTER TABLE account_settings ADD COLUMN pause_at REAL",
    # 20: each window's last reading in each hour, for the dashboard's last 24 hours (`Store.history`)
    """
    CREATE TABLE window_hours (
        account TEXT NOT NULL,
        period TEXT NOT NULL,
        hour INTEGER NOT NULL,
        utilization REAL NOT NULL,
        PRIMARY KEY (hour, period, account)
    )
    """,
    # 21: a window whose period follows one used up (`Window.after_wall`: the ramp after a wall)
    "ALTER TABLE windows ADD COLUMN after_wall INTEGER NOT NULL DEFAULT 0",
    # 22: a window's burn rate per session live on its account (`Window.per_session`: pacing)
    "ALTER TABLE windows ADD COLUMN per_session REAL",
]


class SqliteBackend:
    now = "((julianday('now') - 2440587.5) * 86400.0)"

    @staticmethod
    def iso_utc(column: str) -> str:
        return f"strftime('%Y-%m-%dT%H:%M:%SZ', {column}, 'unixepoch')"

    @staticmethod
    def json_rows(fields: str, rows: str) -> str:
        return f"SELECT json_group_array(json_object({fields})) FROM {rows}"  # in the rows' order

    def __init__(self, path: Path, busy_timeout: float) -> None:
        self.path = path
        self.where = str(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._unavailable():
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=busy_timeout)
            self._db.row_factory = sqlite3.Row
            self._db.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
            self._db.execute("PRAGMA synchronous = NORMAL")
            self._db.execute("PRAGMA foreign_keys = ON")
            self._prepare(busy_timeout)
            self._enforce_transitions()

    def _enforce_transitions(self) -> None:
        """Triggers of this connection's own (TEMP) that refuse a state change `cl.states` does not allow."""
        for table, transitions in (("jobs", JOB_TRANSITIONS), ("runs", RUN_TRANSITIONS)):
            self._db.execute(
                f"CREATE TEMP TRIGGER IF NOT EXISTS {table}_transitions BEFORE UPDATE OF state ON main.{table}"
                f" WHEN {illegal_transition(transitions)}"
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

    def _migrate(self) -> None:
        if self.schema_version() == len(MIGRATIONS):
            return  # current: no write lock taken
        with self.transaction(write=True) as db:
            version = self.schema_version()
            if version > len(MIGRATIONS):
                raise StoreError(f"{self.path}: schema version {version} is newer than this cl ({len(MIGRATIONS)})")
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in script.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {number}")

    def schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    @contextmanager
    def _unavailable(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.OperationalError as exc:
            raise StoreUnavailable(f"state store {self.path}: {exc}") from exc

    claiming = locking = ""

    @staticmethod
    def lock_accounts(db: Db, accounts: Sequence[str]) -> None:  # noqa: ARG004 - the Backend's signature
        return None  # every writer holds the whole file

    @contextmanager
    def transaction(self, *, write: bool, exclusive: bool = True) -> Iterator[Db]:  # noqa: ARG002
        """BEGIN IMMEDIATE for a write, `exclusive` or not (one writer holds the file at a time);
        `write=False` is a consistent read (WAL readers never wait)."""
        with self._unavailable():
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

    @contextmanager
    def reading(self) -> Iterator[Db]:
        with self._unavailable():
            yield self._db

    def changes(self) -> Hashable:
        """Another connection's commits move `data_version`, this one's `total_changes`."""
        with self._unavailable():
            return (self._db.execute("PRAGMA data_version").fetchone()[0], self._db.total_changes)

    def compact(self) -> None:
        with self._unavailable():
            self._db.execute("VACUUM")

    def lookup(self) -> SqliteLookup:
        return SqliteLookup(self.path)

    def close(self) -> None:
        self._db.close()


class SqliteLookup:
    """A read-only connection of its own that gives up at once when the file is locked (a VACUUM,
    a checkpoint), so the caller can ask the store's thread instead. WAL readers are otherwise
    never blocked by a writer."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=0)
        self._db.execute("PRAGMA query_only = ON")

    def capability_run(self, digest: str) -> Run | None:
        try:
            return capability_run(self._db, digest)
        except sqlite3.OperationalError as exc:
            raise StoreUnavailable(f"state store {self._path}: {exc}") from exc

    def close(self) -> None:
        self._db.close()
