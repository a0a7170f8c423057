"""What the state store holds and hands out: jobs, runs, walls, settings, and the errors it raises.

Rows come back as these frozen records, whichever backend holds them (`cl.store`).
"""

from __future__ import annotations

import dataclasses
import enum
import fnmatch
from collections.abc import Mapping
from typing import Any, NamedTuple

from cl.moments import iso_utc
from cl.states import RESCUABLE, IllegalTransition, JobState, RunState
from cl.windows import Window

__all__ = ["IllegalTransition", "Window"]

NEEDS_LOGIN = "needs-login"
"""The kind of wall the gateway records for an account whose refresh token was refused."""

BUSY_TIMEOUT = 10.0
"""Seconds a write waits for another writer's lock before the store reports itself unavailable."""


class Renewal(enum.Enum):
    """What renewing a run's lease found (`Store.renew`)."""

    RENEWED = "renewed"
    IDLE = "idle"
    """The run is not running: nothing to renew (its worker holds its CLI, or goes on in another run)."""
    FENCED = "fenced"
    """The session changed hands: its worker must stop its CLI and write nothing more."""


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
    host: str | None = None
    """The host it was submitted on, where its directory is (`cl.fleet`); None: from before hosts."""
    epoch: int = 0
    """Moves on each time its session changes hands (a worker's claim, an orphaning): a write for
    a run of an earlier epoch is refused (fencing)."""

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
    epoch: int | None = None
    """Its job's epoch when its worker claimed it (None: never claimed)."""
    lease_until: float | None = None
    """While running: when its lease lapses unless its worker renews it (the database's clock)."""

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
    allow_overage: bool = False
    """It may spend paid overage once its windows are used up; otherwise the first answer the API
    bills as overage walls it until its window resets."""
    pause_at: float | None = None
    """It takes no new or moved work while one of its windows is this full (0.9: 90%)."""

    def serves(self, model: str | None) -> bool:
        """A job without a model takes the CLI's default, which any account serves."""
        return model is None or self.models is None or any(fnmatch.fnmatchcase(model, p) for p in self.models)

    def public(self) -> dict[str, Any]:
        return {
            "account": self.account,
            "paused_since": iso_utc(self.paused_at) if self.paused_at is not None else None,
            "max_sessions": self.max_sessions,
            "models": list(self.models) if self.models is not None else None,
            "allow_overage": self.allow_overage,
            "pause_at": self.pause_at,
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


HISTORY_HOURS = 24
"""How far back the dashboard's history goes (`Store.history`); older hours are pruned."""

MOVED_EARLY = "moved early"
"""How the error of a run whose session moved before its account walled begins (the reason follows)."""

MODEL_WINDOWS = {"seven_day_opus": "opus", "seven_day_sonnet": "sonnet"}
"""The windows that wall one family of models, not the account (the API's representative claim)."""


def family(model: str | None) -> str | None:
    """The family of models a model name belongs to, as the model windows count them (None: one
    no window counts alone, or no model named: the CLI's default)."""
    if model is None:
        return None
    return next((name for name in MODEL_WINDOWS.values() if name in model.lower()), None)


def model_walled(walls: Mapping[str, float | None], model: str | None) -> bool:
    """Whether one account's standing model walls (family -> reset) bar `model`: its own family's
    wall, or any, for a job that names no model (the CLI's default may be any of them)."""
    return bool(walls) and (model is None or family(model) in walls)


UsageRow = tuple[float | None, float | None, int, int]
"""five_hour, seven_day (utilization last reported, or None), input_tokens, output_tokens."""


@dataclasses.dataclass(frozen=True, slots=True)
class Listing:
    """The jobs and their sessions as `status` shows them: JSON arrays, and the queue's length."""

    sessions_json: str
    jobs_json: str
    queue: int
    hidden: int = 0
    """Finished jobs left out of a listing of live ones (the same submitter's)."""


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
    model_walls: dict[str, dict[str, float | None]] = dataclasses.field(default_factory=dict)
    """Model windows standing now: account -> family -> reset."""
    windows: dict[str, dict[str, Window]] = dataclasses.field(default_factory=dict)
    """Each account's windows as last read, with their burn rates (`Store.windows`)."""
    probation: frozenset[str] = frozenset()
    """The accounts on probation (`Store.probation`)."""


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


class Placement(NamedTuple):
    """One job for `Store.place_many`: the account chosen, its limit, and the session a
    follow-up resumes (None for a fresh job)."""

    job_id: int
    account: str
    limit: int
    resume: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Facts:
    """What placement and rescue decide on, read in one transaction."""

    jobs: list[Job]
    walls: dict[str, WallRecord]
    """Walls standing now."""
    probation: frozenset[str]
    """Accounts whose wall has reset but that have not answered since: one session at a time."""
    live: dict[str, int]
    usage: dict[str, dict[str, float | None]]
    settings: dict[str, AccountSettings] = dataclasses.field(default_factory=dict)
    held: int = 0
    """Walled sessions whose worker holds their CLI alive for a live move (each keeps its CLI's user)."""
    aside: set[str] = dataclasses.field(default_factory=set)
    """This host's accounts another host of the fleet serves (the same credential): no work goes
    there. Not the store's to say: the caller sets it from its registry (`Service.facts`)."""
    elsewhere: dict[str, Home] = dataclasses.field(default_factory=dict)
    """Usable accounts other live hosts publish and this host has no file for, with their homes:
    work may go there through the home's gateway (`fleet_listen`). Set by `Service.facts`."""
    model_walls: dict[str, dict[str, float | None]] = dataclasses.field(default_factory=dict)
    """Model windows standing now: account -> family -> reset (`MODEL_WINDOWS`)."""
    windows: dict[str, dict[str, Window]] = dataclasses.field(default_factory=dict)
    """Each account's windows as last read, with their burn rates (`Store.windows`)."""

    def walled_for(self, account: str, model: str | None) -> bool:
        """Whether a job of `model` may not go to `account` for a wall: its own, or its model's."""
        return account in self.walls or model_walled(self.model_walls.get(account, {}), model)


class Home(NamedTuple):
    """Where an account of another host lives: that host, and its gateway's fleet address."""

    host: str
    gateway: str


class Published(NamedTuple):
    """An account as its home host publishes it: never a secret."""

    account: str
    state: str
    fingerprint: str | None
    """A hash of the credential it holds (`cl.fleet.fingerprint`): the same file on two hosts shows."""


@dataclasses.dataclass(frozen=True, slots=True)
class HostRecord:
    """A host of the fleet as the store has it."""

    name: str
    heartbeat_age: float
    """Seconds since its last heartbeat, on the database's clock."""
    accounts: tuple[Published, ...]
