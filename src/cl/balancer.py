"""cl-balancer: hands queued jobs to the account with the most room.

Placement runs when something can change its answer, never on a polling timer: a job
submitted, the roster changing (a registry event), a run ending or getting its first answer (a
worker's pidfd or its `run-changed` request), the earliest standing wall reaching its reset time. Each placement is one
store transaction (job -> running, a `starting` run) before the worker is launched; the worker
claims the run, so a balancer killed at any point loses no job and runs none twice. At start
the balancer settles what happened while it was down: never-claimed runs go back to the queue,
live workers are adopted, vanished ones are marked orphaned for the rescuer.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import structlog

from cl import cli_user, daemon, doctor, fleet, placement, redact, workdir
from cl.account_state import Standing, standing
from cl.cli_user import CliUserError
from cl.client import MAX_PROMPT_BYTES
from cl.config import Config
from cl.credentials import is_account_name
from cl.launcher import under_socket_activation
from cl.moments import iso_utc
from cl.processes import alive
from cl.protocol import Encoded, Handler, Peer, Reply, Request, RequestError, id_field, text_field, whole_number
from cl.registry import CredentialRegistry
from cl.service import Service
from cl.states import FINISHED_JOBS, LIVE_RUNS, JobState, RunState
from cl.status import Board, StatusView
from cl.store import HISTORY_HOURS, MOVED_EARLY, UNSET, Facts, Job, NoRoom, Placement, Run, StoreUnavailable
from cl.supervisor import log_outcome
from cl.tally import Histogram

log = structlog.get_logger("cl.balancer")

MAX_TURNS = 100_000
MIN_SESSION_PREFIX = 4
MAX_JOB_DIGITS = 18
"""A job id has at most this many digits (the store's integers are 64-bit)."""
RETENTION_INTERVAL = 6 * 3600.0
"""Seconds between retention passes."""
PLACE_BATCH = 128
"""Jobs placed in one transaction at most: on PostgreSQL 64 placed about 1,850 jobs/s fleet-wide,
128 about 2,700, 256 about 5,000 (bench/fleet.py); a job's worker starts once its batch is
written, at 128 some 45 ms after the first of a burst."""
DASHBOARD_TICK = 2.0
"""Seconds between two reads of the accounts while a dashboard is open (the page asks as often)."""
DASHBOARD_REFRESH = 30.0
"""Seconds between two reads of the dashboard's history while one is open."""
DASHBOARD_ROWS = 200
"""Accounts the dashboard lists at most: those that need a look first (the counts cover all)."""
DASHBOARD_IDLE = 300.0
"""A dashboard not heard from for this long is closed: its history is no longer read."""


class Balancer(Service):
    name = "balancer"
    peer = "rescue"
    lost_launch = "launcher stopped first"

    def __init__(self, config: Config, registry: CredentialRegistry, status_changed: Callable[[], None]) -> None:
        super().__init__(config, registry, status_changed)
        self._counts = {"walled": 0, "running": 0, "queued": 0}
        self._ramping: tuple[str, ...] = ()
        """The accounts the ramp after a wall held back at the last placement pass (`cl status`)."""
        self._waiting_logged = False
        self._status_view = StatusView(registry)
        self._placements = 0
        self._failures = 0
        self._submit_to_started = Histogram()
        self._publisher = fleet.Publisher(config, registry, self.store)
        self._dashboard_asked = -DASHBOARD_IDLE
        self._board: tuple[Board, int, float, int] | None = None
        """The dashboard's accounts, the queue's length, when, and the roster version they show, as
        last read (`_keep_dashboard`; a request reads them again if the roster changed since)."""
        self._history: bytes | None = None
        """The dashboard's `"history":…,"events":…` members, as last read."""

    def handlers(self) -> dict[str, Handler]:
        return {
            **super().handlers(),
            "submit": self._submit,
            "cancel": self._cancel,
            "send": self._send,
            "status": self._status,
            "logs": self._logs,
            "job": self._job,
            "settings": self._settings,
            "account": self._account,
            "metrics": self._metrics,
            "hosts": self._hosts,
            "doctor": self._doctor,
            "dashboard": self._dashboard,
        }

    def status(self) -> str:
        c = self._counts
        said = f"{c['walled']} walled, {c['running']} sessions, {c['queued']} queued"
        return said + (f"; work waits: {self.blocked.line()}" if self.blocked else "")

    def background(self) -> list[Coroutine[Any, Any, None]]:
        return [self._retain(), self._publisher.run(), self._keep_dashboard()]

    async def _keep_dashboard(self) -> None:
        """While a dashboard asked within `DASHBOARD_IDLE`: the accounts read again every
        `DASHBOARD_TICK` seconds (nothing changed: nothing rendered), the history and timeline
        every `DASHBOARD_REFRESH`. None open: nothing read. A request is answered from what is kept."""
        ticks = 0
        while True:
            await asyncio.sleep(DASHBOARD_TICK)
            if time.monotonic() - self._dashboard_asked < DASHBOARD_IDLE:
                with contextlib.suppress(StoreUnavailable):
                    await self._read_board()
                    ticks += 1
                    if ticks * DASHBOARD_TICK >= DASHBOARD_REFRESH:
                        await self._read_history()
                        ticks = 0

    async def _read_board(self) -> None:
        snapshot = await self.store.snapshot(None, finished=False)
        self._board = (self._status_view.board(snapshot), snapshot.listing.queue, time.time(), self.registry.version)

    async def _read_history(self) -> None:
        now = time.time()
        history = await self.store.history(now, self.registry.accounts)
        events = await self.store.events(now - HISTORY_HOURS * 3600)
        self._history = f'"history":{json.dumps(history)},"events":{json.dumps(events)}'.encode()

    async def _retain(self) -> None:
        """History is kept `retention_days`: finished jobs older than that are forgotten, at
        start and every `RETENTION_INTERVAL` (the balancer alone does it: one pass is enough)."""
        while True:
            before = time.time() - self.config.retention_days * 86400
            try:
                if pruned := await self.store.prune(before):
                    log.info("history pruned", jobs=pruned, retention_days=self.config.retention_days)
            except StoreUnavailable as exc:
                log.warning("history not pruned: state store unavailable, trying again later", error=str(exc))
            await asyncio.sleep(RETENTION_INTERVAL)

    def run_ended(self, run: Run, by_worker: bool) -> None:
        if by_worker:
            log_outcome(run)
        self._failures += run.state == RunState.FAILED

    def taken_over(self, run: Run, now: Run) -> None:
        if now.state == RunState.ABANDONED:
            log.info("run abandoned, job requeued", run=run.id, job=run.job_id, account=run.account)
        elif now.state == RunState.RUNNING:
            log.info("session adopted", run=run.id, job=run.job_id, account=run.account, pid=now.pid)

    async def answered(self, run: Run) -> None:
        if not run.is_move:  # a move's first answer is the rescuer's to time
            waited = await self.store.waited_for_answer(run.id)
            if waited is not None:
                self._submit_to_started.observe(waited)

    async def one_pass(self) -> None:
        facts = await self.facts((JobState.QUEUED,), 1000)
        self._ramping = await self._place_jobs(facts) if facts.jobs else ()
        self._counts = {
            "walled": sum(1 for name in facts.walls if name in self.registry.accounts),
            "running": sum(facts.live.values()),
            "queued": await self.store.queue_length(),
        }
        self.status_changed()
        resets = [wall.reset_at for wall in facts.walls.values() if wall.reset_at is not None]
        self.reset_timer.set(min(resets, default=None), jitter=0.05)  # that account may take work again

    async def _place_jobs(self, facts: Facts) -> tuple[str, ...]:
        """Place what can be placed, in queue order, up to `PLACE_BATCH` jobs to a transaction; a
        job whose account turned out to have no room is offered the others again, first. The
        accounts the ramp after a wall held back (`Placer.ramping`)."""
        placer = placement.Placer(
            self.usable(facts),
            facts,
            self.config.max_sessions_per_account,
            self.config.placement,
            move_at=self.config.move_at,
            at_once=placement.at_once(self.config, facts.held),  # a new job's CLI needs a user of its own
            ramp=self.config.ramp_after_wall,
        )
        waiting = 0
        offered = collections.deque(facts.jobs)
        while offered:
            batch: list[tuple[Job, Placement]] = []
            while offered and len(batch) < PLACE_BATCH:
                job = offered.popleft()
                if (choice := placer.assign(job.model)) is None:
                    waiting += 1  # no account may serve it now: later jobs may still go
                else:
                    batch.append((job, Placement(job.id, *choice, job.session_id)))
            if not batch:
                continue
            again = []
            for (job, placed), outcome in zip(batch, await self.store.place_many([p for _, p in batch]), strict=True):
                if isinstance(outcome, NoRoom):
                    placer.refused(placed.account)
                    again.append(job)
                elif outcome is None:
                    placer.returned(placed.account)  # cancelled meanwhile
                else:
                    await self._launch_placed(job, outcome)
            offered.extendleft(reversed(again))
        if waiting and not self._waiting_logged and placer.full:
            log.warning("jobs waiting", queued=waiting, reason="every-cli-user-taken", cli_pool_size=placer.at_most)
        elif waiting and not self._waiting_logged:
            log.warning("jobs waiting", queued=waiting, reason="no-eligible-account")
        self._waiting_logged = bool(waiting)
        return placer.ramping

    async def _launch_placed(self, job: Job, run: Run) -> None:
        """Launch a placed run's worker. A job with a session is a follow-up (`cl send`): its run
        resumes the session."""
        await self.supervisor.launch(run)
        self._placements += 1
        if job.session_id is None:
            log.info("job placed", job=job.id, run=run.id, account=run.account)
        else:
            log.info("follow-up placed", job=job.id, run=run.id, account=run.account, session=job.session_id)

    # requests

    async def _submit(self, request: Request, peer: Peer) -> Reply:
        cwd, prompt = text_field(request, "cwd"), text_field(request, "prompt", lines=True)
        model, max_turns = text_field(request, "model"), whole_number(request, "max_turns", 1, MAX_TURNS)
        if cwd is None or not os.path.isabs(cwd):
            raise RequestError("bad-request", '"cwd" must be an absolute path')
        if prompt is None or not prompt.strip():
            raise RequestError("bad-request", '"prompt" must be a non-empty string')
        if len(prompt.encode()) > MAX_PROMPT_BYTES:
            raise RequestError("bad-request", f'"prompt" is over {MAX_PROMPT_BYTES} bytes')
        if model is not None:
            await self._check_served(model)
        cwd = await asyncio.to_thread(self._workdir, cwd, peer)
        job = await self.store.add_job(cwd, prompt, model, max_turns, submitter=peer.uid, host=self.config.host_name)
        log.info("job queued", job=job.id, cwd=cwd, submitter=peer.uid)
        self.wake()
        return {"job": job.id}

    async def _roster_names(self) -> list[str]:
        """The accounts of the roster now; reaching the fleet, its other hosts' accounts too."""
        names = self.registry.sorted_names()
        if self.config.reaches_fleet:
            names = [*names, *await self.store.homes(self.config.host_name, fleet.stale_after(self.config))]
        return names

    async def _check_served(self, model: str) -> None:
        """Refuse a model that no account of the roster may serve (with no account yet, the job
        waits for one, as any job does). Reaching the fleet, its accounts are the roster too."""
        names = await self._roster_names()
        settings = await self.store.settings()
        if names and not any(settings.get(name, UNSET).serves(model) for name in names):
            served = sorted({pattern for name in names for pattern in settings.get(name, UNSET).models or ()})
            raise RequestError(
                "refused", f"no account may serve model {model!r}; the accounts serve: {', '.join(served)}"
            )

    def _workdir(self, cwd: str, peer: Peer) -> str:
        """The job's directory, resolved, if it obeys `cl.workdir`'s rules for the submitter and
        the CLI's user; a `refused` error naming the rule otherwise."""
        writers = [workdir.Writer(f"the submitter (uid {peer.uid})", peer.uid, peer.groups | {peer.gid})]
        try:
            cli = cli_user.checked(self.config)
        except CliUserError as exc:
            raise RequestError("refused", str(exc)) from None
        writers.append(workdir.Writer(f"the CLI's user {cli.name}", cli.uid, cli.groups()))
        try:
            return workdir.check_for_job(self.config, cwd, writers)
        except workdir.WorkdirRefused as exc:
            raise RequestError("refused", f"--cwd {exc}") from None

    async def _own_job(self, request: Request, peer: Peer) -> Job:
        """The job the request names, if the peer may see it. Another operator's job is `not-found`,
        as one that does not exist is: the answer tells no one which ids are taken."""
        job_id = id_field(request, "job")
        job = await self.store.get_job(job_id)
        if job is None or not peer.owns(job.submitter, self.config.admin_group):
            raise RequestError("not-found", f"no job {job_id}")
        return job

    async def _cancel(self, request: Request, peer: Peer) -> Reply:
        job_id = (await self._own_job(request, peer)).id
        cancelled = await self.store.cancel_job(job_id)
        if cancelled is None:
            raise RequestError("not-found", f"no job {job_id}")
        job, running = cancelled
        if job.state != JobState.CANCELLED:
            raise RequestError("finished", f"job {job_id} is {job.state} already; only live work can be cancelled")
        if running is not None and running.pid is not None and alive(running.pid, running.pid_start):
            with contextlib.suppress(ProcessLookupError):
                os.kill(running.pid, signal.SIGTERM)  # its worker stops the CLI, whole tree, and says so
        log.info("job cancelled", job=job_id, run=running.id if running else None, by=peer.uid)
        return {"job": job_id, "state": job.state}

    async def _send(self, request: Request, peer: Peer) -> Reply:
        """A follow-up for a job (`cl send`): taken by its CLI after the turn it is in, sent with
        the session's next move, or (a finished job) resuming the session where there is most room."""
        job_id = (await self._own_job(request, peer)).id
        text = text_field(request, "text", lines=True)
        if text is None or not text.strip():
            raise RequestError("bad-request", '"text" must be a non-empty string')
        if len(text.encode()) > MAX_PROMPT_BYTES:
            raise RequestError("bad-request", f'"text" is over {MAX_PROMPT_BYTES} bytes')
        sent = await self.store.send(job_id, text, MAX_PROMPT_BYTES)
        if sent is None:
            raise RequestError("not-found", f"no job {job_id}")
        before, outcome = sent
        refusals = {
            "cancelled": f"job {job_id} was cancelled: nothing continues it",
            "not-started": f"job {job_id} has not started a session yet: wait for it (cl wait) and send then",
            "no-session": f"job {job_id} ended ({before}) without a session to continue",
            "too-long": f"the texts waiting for job {job_id} would be over {MAX_PROMPT_BYTES} bytes",
        }
        if outcome in refusals:
            raise RequestError("refused", refusals[outcome])
        log.info("follow-up sent", job=job_id, how=outcome, by=peer.uid)
        self.wake()
        return {"job": job_id, "sent": outcome}

    async def _dashboard(self, request: Request, _peer: Peer) -> Encoded:
        """What the dashboard shows (`cl-metrics`, `/dashboard.json`): the accounts in the order
        that needs a look first (`DASHBOARD_ROWS` at most; `filter`, a part of their name), how
        many are in each state, live sessions, the queue, what blocks work, the last day's history
        of the windows, walls and moves. Aggregates only: no job, prompt, directory or token.
        Answered from what `_keep_dashboard` keeps (at most `DASHBOARD_TICK` seconds old), unless
        the roster changed since: its accounts are never an older roster's."""
        wanted = text_field(request, "filter") or ""
        self._dashboard_asked = time.monotonic()
        if self._history is None:
            await self._read_history()
        if self._board is None or self._board[3] != self.registry.version:  # the roster as it is now, always
            await self._read_board()
        assert self._board is not None
        assert self._history is not None
        board, queue, at, _version = self._board
        matching = [(name, shown) for name, shown in board.accounts if wanted in name] if wanted else board.accounts
        accounts = ",".join(shown for _name, shown in matching[:DASHBOARD_ROWS])
        blocked = json.dumps(self.blocked.line() if self.blocked else None)
        head = (
            f'{{"at":{at},"total":{len(board.accounts)},"counts":{json.dumps(board.counts)},"sessions":{board.sessions},'
            f'"matching":{len(matching)},"accounts":[{accounts}],"queue":{queue},"blocked":{blocked},'
        )
        return Encoded(head.encode() + self._history + b"}")

    async def _doctor(self, _request: Request, _peer: Peer) -> Reply:
        """`cl doctor`: the checks run now, in this daemon's environment (the CLI's), with the
        roster and the store (it answered) as this daemon sees them."""
        switch = not under_socket_activation(self.config)
        found = await asyncio.to_thread(doctor.environment, self.config, workers_switch=switch)
        queued = await self.store.queue_length()
        kind = "PostgreSQL" if self.config.store else f"SQLite {self.config.database}"  # (a URL may hold a password)
        found.append(doctor.Finding("store", True, f"{kind} opens, {queued} job(s) queued"))
        found += await asyncio.to_thread(doctor.roster, self.registry)
        return {"findings": [finding.public() for finding in found], "user": doctor.whoami()}

    async def _settings(self, _request: Request, _peer: Peer) -> Reply:
        """Every account name with a setting, and whether the roster has it now; the accounts of
        the roster that need a new login (the gateway's refresh was refused); each account's
        windows as the API last said them, and when (`cl accounts`)."""
        facts = await self.facts((JobState.QUEUED,), 0)
        roster = self.registry.accounts
        return {
            "settings": [{**s.public(), "present": name in roster} for name, s in sorted(facts.settings.items())],
            "states": {name: self.standing(name, facts).public() for name in self.registry.sorted_names()},
            "windows": {name: {p: w.public() for p, w in by.items()} for name, by in sorted(facts.windows.items())},
        }

    def standing(self, name: str, facts: Facts) -> Standing:
        """The one state of an account of the roster (`cl.account_state`)."""
        wall, settings = facts.walls.get(name), facts.settings.get(name)
        return standing(self.registry.accounts[name], wall, settings, name in facts.probation)

    async def _account(self, request: Request, peer: Peer) -> Reply:
        """Pause or resume an account, or set its `max_sessions`, `models` (None: the default),
        `allow_overage` or `pause_at`. Pausing a name the roster lacks (a typo?) needs `force`.
        Root, the daemons' user and `admin_group` only."""
        if not peer.sees_all(self.config.admin_group):
            raise RequestError("forbidden", f"account settings are for root and group {self.config.admin_group}")
        name = text_field(request, "account")
        if name is None or not is_account_name(name):
            raise RequestError("bad-request", '"account" must be an account name (letters, digits, - and _)')
        changes = _setting_changes(request)
        force = request.get("force", False)
        if not isinstance(force, bool):
            raise RequestError("bad-request", '"force" must be true or false')
        if changes.get("paused") and not force and name not in await self._roster_names():
            raise RequestError(
                "not-found",
                f"there is no account {name} (no credentials-{name}.json); --force pauses it before it lands",
            )
        settings = await self.store.set_account(name, peer.uid, **changes)
        present = name in self.registry.accounts
        log.info("account settings changed", account=name, by=peer.uid, present=present, **changes)
        self.wake()
        await self.supervisor.tell_peer(0)  # the rescuer may move sessions there now, or not
        return {"settings": {**settings.public(), "present": present}}

    async def _hosts(self, _request: Request, _peer: Peer) -> Reply:
        """The fleet (`cl.fleet`): each host that published, its heartbeat's age and roster, and
        the credentials two hosts hold."""
        return fleet.view(await self.store.hosts(), self.config.heartbeat_interval, self.config.host_name)

    async def _metrics(self, _request: Request, _peer: Peer) -> Reply:
        """What `cl-metrics` exposes of the balancer: each account's state and facts, the queue, and
        what this process counted since it started. Nothing about any operator's jobs but counts."""
        facts = await self.facts((JobState.QUEUED,), 0)
        depth = await self.store.queue_length()
        oldest = await self.store.oldest_queued()
        accounts = []
        for name in self.registry.sorted_names():
            wall, usage = facts.walls.get(name), facts.usage.get(name, {})
            accounts.append(
                {
                    "name": name,
                    "state": str(self.standing(name, facts).state),
                    "walled": wall is not None,
                    "walled_until": wall.reset_at if wall else None,
                    "sessions": facts.live.get(name, 0),
                    "five_hour": usage.get("five_hour"),
                    "seven_day": usage.get("seven_day"),
                    "windows": {window: w._asdict() for window, w in facts.windows.get(name, {}).items()},
                }
            )
        return {
            "accounts": accounts,
            "queue": {"depth": depth, "oldest_age": time.time() - oldest if oldest is not None else None},
            "counters": {"placements": self._placements, "failures": self._failures},
            "histograms": {"submit_to_started": self._submit_to_started.public()},
        }

    async def _status(self, request: Request, peer: Peer) -> Encoded:
        """Accounts, sessions, jobs and the queue (see `cl.status`): the peer's own jobs only,
        unless it sees everyone's; live ones only, unless `finished` asks for the whole history."""
        finished = request.get("finished", False)
        if not isinstance(finished, bool):
            raise RequestError("bad-request", '"finished" must be true or false')
        submitter = None if peer.sees_all(self.config.admin_group) else peer.uid
        snapshot = await self.store.snapshot(submitter, finished=finished)
        return self._status_view.render(snapshot, self.blocked.line() if self.blocked else None, self._ramping)

    async def _job(self, request: Request, peer: Peer) -> Reply:
        """One job's whole story: its prompt and state, every run (account, state, times, error,
        the follow-up text it took from `cl send`), the moves between accounts and why, and the
        latest run's result event."""
        job = await self._own_job(request, peer)
        runs = await self.store.job_runs(job.id)
        moves = [
            {
                "at": iso_utc(run.created_at),
                "from": before.account,
                "to": run.account,
                "why": _why(before),
                "how": _how(run),
                "run": run.id,
            }
            for before, run in itertools.pairwise(runs)
            if run.is_move
        ]
        result = next((json.loads(run.result) for run in reversed(runs) if run.result), None)
        return {
            "job": {
                "id": job.id,
                "state": job.state,
                "prompt": job.prompt,
                "cwd": job.cwd,
                "model": job.model,
                "account": job.account,
                "session_id": job.session_id,
                "error": job.error,
                "created_at": iso_utc(job.created_at),
                "updated_at": iso_utc(job.updated_at),
            },
            "runs": [
                {
                    "id": run.id,
                    "account": run.account,
                    "state": run.state,
                    "resumes": run.resume,
                    "started_at": iso_utc(run.created_at),
                    "ended_at": iso_utc(run.ended_at) if run.ended_at else None,
                    "error": run.error,
                    "cache_read_tokens": run.cache_read_tokens,
                    "cache_creation_tokens": run.cache_creation_tokens,
                    "follow_up": run.prompt,
                }
                for run in runs
            ],
            "moves": moves,
            "result": result,
        }

    async def _logs(self, request: Request, peer: Peer) -> Reply:
        """A job's output from `offset` on: `{"data", "offset", "finished"}`; `job` or `session`
        names it. Every run's log in turn, a move marked between two (`cl.logs_view`). Only the
        job's submitter (or who sees all) may read it; it is redacted on its way out."""
        offset = whole_number(request, "offset", 0) or 0
        session = text_field(request, "session") if isinstance(request.get("session"), str) else None
        if session is not None:
            job_id = await self._job_of_session(session, peer)
        else:
            job_id = id_field({"job": request.get("session", request.get("job"))}, "job")
        job = await self._own_job({"job": job_id}, peer)
        runs = await self.store.job_runs(job.id)
        if not runs:
            raise RequestError("not-found", f"job {job.id} has not started: it is {job.state}")
        data = await asyncio.to_thread(read_log, log_parts(runs), offset, 1 << 20)
        return {
            "data": redact.scrub(data.decode(errors="replace")),
            "offset": offset + len(data),
            "finished": job.state in FINISHED_JOBS and runs[-1].state not in LIVE_RUNS,
        }

    async def _job_of_session(self, session: str, peer: Peer) -> int:
        """The job of the session with this id, or with an id starting so (4 characters at least);
        digits name a job first (a session id may start with 8 digits too)."""
        if session.isdigit() and len(session) <= MAX_JOB_DIGITS:
            job_id = int(session)
            if len(session) < MIN_SESSION_PREFIX or await self.store.get_job(job_id) is not None:
                return job_id
        if len(session) < MIN_SESSION_PREFIX:
            raise RequestError("bad-request", f"a session id, or its first {MIN_SESSION_PREFIX} characters or more")
        mine = None if peer.sees_all(self.config.admin_group) else peer.uid  # only among the peer's own
        found = await self.store.jobs_with_session(session, submitter=mine)
        if not found:
            raise RequestError("not-found", f"no session {session!r}")
        if len(found) > 1:
            raise RequestError("bad-request", f"{session!r} starts more than one session id: give more of it")
        return found[0]


MAX_MODELS = 32


def _setting_changes(request: Request) -> dict[str, Any]:
    """The settings a request changes, each checked; a bad-request error naming the first bad one."""
    changes: dict[str, Any] = {}
    for switch in ("paused", "allow_overage"):
        if switch in request:
            if not isinstance(request[switch], bool):
                raise RequestError("bad-request", f'"{switch}" must be true or false')
            changes[switch] = request[switch]
    if "max_sessions" in request:
        changes["max_sessions"] = whole_number(request, "max_sessions", 1, MAX_TURNS)
    if "pause_at" in request:
        changes["pause_at"] = _utilization(request, "pause_at")
    if "models" in request:
        changes["models"] = _models(request["models"])
    if not changes:
        raise RequestError(
            "bad-request", 'nothing to change: give "paused", "max_sessions", "models", "allow_overage" or "pause_at"'
        )
    return changes


def _models(models: Any) -> list[str] | None:
    """The `models` field: a list of model names (shell patterns), or null."""
    if models is None:
        return None
    if not isinstance(models, list) or not 1 <= len(models) <= MAX_MODELS:
        raise RequestError("bad-request", f'"models" must be a list of 1 to {MAX_MODELS} model names, or null')
    names = [text_field({"model": model}, "model") or "" for model in models]
    if not all(names):
        raise RequestError("bad-request", '"models" must not hold an empty name')
    return names


def _utilization(request: Request, key: str) -> float | None:
    """A field holding a utilization above 0 and at most 1, or null."""
    value = request[key]
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise RequestError("bad-request", f'"{key}" must be a utilization above 0 and at most 1, or null')
    return float(value)


def log_parts(runs: list[Run]) -> list[bytes | Path]:
    """A job's output as parts read one after the other: each run's log, and before a run that
    moved the session, one stream-json line of cl's own saying so. Every part but the last is
    final (its run ended), so an offset into the whole stays valid as the job goes on."""
    parts: list[bytes | Path] = []
    for before, run in itertools.pairwise([None, *runs]):
        if before is not None and run is not None and run.is_move:
            move = {"type": "cl_move", "from": before.account, "to": run.account, "why": _why(before), "how": _how(run)}
            parts.append(json.dumps({**move, "at": iso_utc(run.created_at)}).encode() + b"\n")
        if run is not None and run.log_path:
            parts.append(Path(run.log_path))
    return parts


def _why(before: Run) -> str:
    """Why a session moved: how the run before it ended (`walled`, `orphaned`), or an early
    move's reason (`moved early: a1 at 96% of 5h, resets in 2h10m`)."""
    return before.error if before.error and before.error.startswith(MOVED_EARLY) else before.state


def _how(run: Run) -> str:
    """How a move went: `live` (the same CLI process went on) or `restart` (`--resume`)."""
    return "live" if run.live else "restart"


def read_log(parts: list[bytes | Path], offset: int, limit: int) -> bytes:
    """Up to `limit` bytes from `offset` into the parts joined."""
    out = bytearray()
    for part in parts:
        if len(out) >= limit:
            break
        if isinstance(part, bytes):
            chunk = part[offset : offset + limit - len(out)]
            size = len(part)
        else:
            chunk, size = _read_from(part, offset, limit - len(out))
        out += chunk
        offset = max(offset - size, 0)
    return bytes(out)


def _read_from(path: Path, offset: int, limit: int) -> tuple[bytes, int]:
    """What the file holds from `offset` (up to `limit` bytes), and its size then."""
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(offset)
            return f.read(limit) if offset < size else b"", size
    except FileNotFoundError:
        return b"", 0


def main() -> None:
    sys.exit(daemon.main("balancer", Balancer))
