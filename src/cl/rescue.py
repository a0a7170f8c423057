"""cl-rescue: moves sessions whose account walled (or whose worker vanished) onto a healthy account.

A move (docs/design.md): every job has its own Claude Code config dir, holding its copy of its
account's credential. Moving a session is one store transaction (the ledger's "move started", a
`starting` run on the new account that resumes the session) and a worker that puts the new
account's credential in that dir and runs `claude --resume <id>` in the same dir and cwd: the CLI
sends the whole earlier conversation with the new account's token. The worker measures the
transcript before and after; when the run ends, the move is settled in the ledger with whether
the transcript grew.

Work arrives by push: a worker tells us when its run ends or first gets an answer, the other
daemon when it settles a run, the registry when the roster changes, a timer when the earliest
wall of a waiting session resets. At start, and every `reconcile_interval`, we also look for
workers that vanished unseen. Nothing here remembers the roster: each pass
takes the registry's accounts as they are now.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
import random
import sys
import time
from collections.abc import Callable, Collection, Coroutine, Sequence
from typing import Any

import structlog

from cl import daemon, pacing, placement, session_files
from cl.config import Config
from cl.moments import iso_utc
from cl.processes import alive
from cl.protocol import Handler, Peer, Reply, Request, RequestError, id_field, whole_number
from cl.registry import CredentialRegistry
from cl.service import Service
from cl.states import RESCUABLE, JobState, RunState
from cl.store import Facts, Job, Run, Store, StoreUnavailable
from cl.supervisor import log_outcome
from cl.tally import Histogram

log = structlog.get_logger("cl.rescue")

BATCH = 1000
"""Sessions considered per pass; a pass that moved a full batch runs again at once."""
HELD_KEPT = 4096
"""Jobs whose last hold is remembered, so that it is said once, not at every request."""


@dataclasses.dataclass(frozen=True, slots=True)
class Waiting:
    """The walled and orphaned sessions that cannot move now, and what would end their wait."""

    jobs: tuple[Job, ...] = ()
    next_reset: float | None = None
    """The earliest reset of a standing wall on an account we have: the next chance, short of a new file."""
    probing: tuple[str, ...] = ()
    """Accounts whose wall has reset, each with one session trying them before the rest follow."""
    ramping: tuple[str, ...] = ()
    """Accounts after a wall that the ramp holds at what their 5-hour window sustains."""

    @classmethod
    def of(cls, jobs: Sequence[Job], facts: Facts, usable: Collection[str], placer: placement.Placer) -> Waiting:
        """Derived, each time, from the store's facts, the accounts usable now (`Service.usable`)
        and the placements `placer` has left room for."""
        if not jobs:
            return cls()
        usable = set(usable)
        resets = [w.reset_at for name, w in facts.walls.items() if name in usable and w.reset_at is not None]
        resets += [r for name, by in facts.model_walls.items() if name in usable for r in by.values() if r is not None]
        probing = tuple(sorted(name for name in facts.probation if name in usable))
        return cls(tuple(jobs), min(resets) if resets else None, probing, placer.ramping)

    @property
    def reason(self) -> str:
        return "no-eligible-account" if self.jobs else ""

    def chances(self) -> dict[str, str]:
        """What may end the wait short of a new file, as the waiting line says it."""
        said = {"next_reset": iso_utc(self.next_reset)} if self.next_reset else {}
        if self.probing:
            said["probing"] = ",".join(self.probing)
        if self.ramping:
            said["ramping"] = ",".join(self.ramping)
        return said


class Rescuer(Service):
    name = "rescue"
    peer = "balancer"
    lost_launch = "rescuer stopped before launching"

    def __init__(self, config: Config, registry: CredentialRegistry, status_changed: Callable[[], None]) -> None:
        super().__init__(config, registry, status_changed)
        self._waiting = Waiting()
        """What the last pass found (and logged): for STATUS= and to log the waiting line once per change."""
        self._announced: dict[int, float] = {}
        """Job id -> the `updated_at` we logged its wall or orphaning for: once per event."""
        self._moves = 0
        self._live_moves = 0
        self._move_failures = 0
        self._wall_to_resumed = Histogram()
        self._held: dict[int, str] = {}
        """Job id -> the hold last said for it (an early move not made): said once, not at each request."""
        self._all_walled = False
        """Whether every usable account was walled at the last pass (logged when that begins)."""

    def handlers(self) -> dict[str, Handler]:
        return {
            **super().handlers(),
            "waiting": self._waiting_request,
            "metrics": self._metrics,
            "move-now": self._move_now,
        }

    def status(self) -> str:
        blocked = f"; work waits: {self.blocked.line()}" if self.blocked else ""
        if count := len(self._waiting.jobs):
            noun = "session" if count == 1 else "sessions"
            return f"{count} {noun} waiting ({self._waiting.reason}), {self._moves} moved{blocked}"
        return f"none waiting, {self._moves} moved{blocked}"

    def run_ended(self, run: Run, by_worker: bool) -> None:
        if by_worker and run.is_move and run.state == RunState.DONE:  # walls, failures: own lines
            log_outcome(run)

    def taken_over(self, run: Run, now: Run) -> None:
        if now.state == RunState.ABANDONED:  # a move begun but never launched: tried again
            log.info("move rolled back", run=run.id, job=run.job_id, account=run.account)

    def background(self) -> list[Coroutine[Any, Any, None]]:
        return [self._find_vanished_workers()]

    async def _find_vanished_workers(self) -> None:
        """The safety net behind the pushes: a worker that vanished while nobody watched it, or
        whose lease lapsed (`cl.lease`: it stopped its CLI, or hangs; either way it is fenced off)."""
        while True:
            await asyncio.sleep(self.config.reconcile_interval)
            try:
                for run in await self.store.runs_in((RunState.RUNNING,), self.own_host):
                    if run.pid is not None and not alive(run.pid, run.pid_start):
                        await self.supervisor.orphan(run)
                        self.wake()
                for run in await self.store.lapsed(self.own_host):  # its worker stopped its CLI, or hangs
                    await self.supervisor.orphan(run, "its lease lapsed: its worker stopped its CLI")
                    self.wake()
            except StoreUnavailable as exc:  # the passes report the outage; try again next time
                log.debug("looking for vanished workers skipped: state store unavailable", error=str(exc))

    async def answered(self, run: Run) -> None:
        if run.is_move:
            log.info("session resumed", session=run.resume, job=run.job_id, account=run.account)
            waited = await self.store.waited_for_answer(run.id)
            if waited is not None:
                self._wall_to_resumed.observe(waited)

    async def one_pass(self) -> None:
        await self._settle_moves()
        facts = await self.facts(RESCUABLE, BATCH)
        self._note_all_walled(facts)
        placer = self._placer(facts)
        waiting = await self._rescue(facts, placer)
        self._announced = {job.id: self._announced[job.id] for job in waiting if job.id in self._announced}
        self._report(Waiting.of(waiting, facts, self.usable(facts), placer))
        if len(facts.jobs) == BATCH and len(waiting) < BATCH:
            self.wake()  # more behind this batch

    def _placer(self, facts: Facts) -> placement.Placer:
        """Where the sessions waiting in `facts` may go now."""
        return placement.Placer(
            self.usable(facts),
            facts,
            self.config.max_sessions_per_account,
            self.config.placement,
            move_at=self.config.move_at,
            at_once=placement.at_once(self.config),  # held sessions not counted: a live move needs no new user
            ramp=self.config.ramp_after_wall,
        )

    async def _rescue(self, facts: Facts, placer: placement.Placer) -> list[Job]:
        """Move every session that can move now, oldest job first; the ones left waiting. Each
        move's worker is launched while the next move is written: a storm moves in parallel."""
        waiting = []
        launches: list[asyncio.Task[None]] = []
        try:
            for job in facts.jobs:
                self._announce(job, facts)
                if await self._given_up(job):
                    continue
                if job.session_id is None:  # it never started a conversation: nothing to resume
                    if await self.store.requeue(job.id, "no session to resume"):
                        log.info("job requeued", job=job.id, account=job.account, reason="no session to resume")
                        run = await self.store.latest_run(job.id)
                        await self.supervisor.tell_peer(run.id if run else 0)  # the balancer places it
                    continue
                if not await placer.take(functools.partial(self._move, job, launches=launches), job.model):
                    waiting.append(job)
        finally:
            await asyncio.gather(*launches)  # a pass ends once its workers are launched
        return waiting

    async def _given_up(self, job: Job) -> bool:
        """The job fails, with the reason, if its session moved `max_moves_per_hour` times in the
        last hour (walls that never end: a CLI that fakes them, or resets a second away) or its
        worker vanished `max_orphanings` times (a worker that dies on something of the job's)."""
        moves, orphaned = await self.store.troubles(job.id, time.time() - 3600)
        if moves >= self.config.max_moves_per_hour:
            reason = f"moved {moves} times in the last hour (max_moves_per_hour = {self.config.max_moves_per_hour})"
        elif orphaned >= self.config.max_orphanings:
            reason = f"its worker vanished {orphaned} times (max_orphanings = {self.config.max_orphanings})"
        else:
            return False
        if await self.store.give_up(job.id, reason):
            log.error("session given up", job=job.id, session=job.session_id, account=job.account, error=reason)
        return True

    async def _move(self, job: Job, account: str, limit: int, *, launches: list[asyncio.Task[None]]) -> bool:
        """Write the move and start the resumed run: handed to the worker still holding the
        session's CLI (a live move), or a new worker's (a restart). False if the job changed
        meanwhile (another pass or daemon got to it)."""
        assert job.session_id is not None
        holder = await self.store.held_run(job.id)
        held = holder is not None and alive(holder.pid or 0, holder.pid_start)
        run = await self.store.place(job.id, account, limit, job.session_id, live=held)
        if run is None:
            return False
        self._moved(job, run, job.account)
        if run.live and holder is not None:
            launches.append(asyncio.create_task(self.supervisor.hand_over(run, holder)))
        else:
            launches.append(asyncio.create_task(self.supervisor.launch(run)))
        return True

    def _moved(self, job: Job, run: Run, source: str | None, **how: bool) -> None:
        """A move written: counted, and said once."""
        self._moves += 1
        self._live_moves += run.live
        fields = {"from": source, **how}
        log.info(
            "session moved",
            session=job.session_id,
            job=job.id,
            run=run.id,
            account=run.account,
            live=run.live,
            **fields,
        )

    async def _settle_moves(self) -> None:
        """Each ended move goes in the ledger with whether its transcript grew; a done session
        whose transcript did not grow is reported, never silently accepted."""
        for run, grew in await self.store.call(functools.partial(_verify_moves, host=self.own_host)):
            if run.state == RunState.DONE and not grew:
                log.error("transcript did not grow after the move", session=run.resume, job=run.job_id, run=run.id)
            elif run.state == RunState.FAILED:
                self._move_failures += 1
                log.error(
                    "session failed",
                    session=run.resume,
                    job=run.job_id,
                    account=run.account,
                    error=run.error,
                    move=True,
                )

    def _note_all_walled(self, facts: Facts) -> None:
        """The story this project comes from: say so, once, when every usable account has walled."""
        usable = self.usable(facts)
        walled = bool(usable) and all(name in facts.walls for name in usable)
        if walled and not self._all_walled:
            resets = [reset for name in usable if (reset := facts.walls[name].reset_at) is not None]
            first = {"next_reset": iso_utc(min(resets))} if resets else {}
            log.warning("all accounts walled", accounts=len(usable), **first)
        elif self._all_walled and not walled:
            log.info("an account is free again")
        self._all_walled = walled

    def _announce(self, job: Job, facts: Facts) -> None:
        """The operator's first line about a session in trouble, once per wall or orphaning."""
        if self._announced.get(job.id) == job.updated_at:
            return
        self._announced[job.id] = job.updated_at
        if job.session_id is None:
            return  # nothing to move: its requeue is the news
        if job.state == JobState.ORPHANED:
            log.warning("session orphaned", session=job.session_id, job=job.id, account=job.account)
            return
        wall = facts.walls.get(job.account or "")
        resets = iso_utc(wall.reset_at) if wall and wall.reset_at else None
        kind = wall.kind if wall else None
        log.warning("session walled", session=job.session_id, job=job.id, account=job.account, resets=resets, kind=kind)

    def _report(self, now: Waiting) -> None:
        """Log the waiting line when it changes, keep STATUS= current, wake at the next reset."""
        before = self._waiting
        if now.chances() != before.chances() or len(now.jobs) != len(before.jobs):
            if now.jobs:
                log.warning("waiting", sessions=len(now.jobs), reason=now.reason, **now.chances())
            elif before.jobs:
                log.info("no sessions waiting")
        self._waiting = now
        self.status_changed()
        self.reset_timer.set(now.next_reset, jitter=random.uniform(0, self.config.reset_jitter))  # noqa: S311

    # requests

    async def _move_now(self, request: Request, peer: Peer) -> Reply:
        """The gateway's question: a running session's request met a wall the API sent (the wall
        is in the store already), or its account cannot be used from here any more (its file gone,
        its home cut off). Moved now, live, while its request waits: the run it goes on as. Only
        the gateway (our own user, or root) may ask, and only for a run whose account the store
        holds walled or this host cannot use: a session whose account has room is never moved
        this way.

        With `early` (a window, `five_hour` or `seven_day`: the gateway saw the account's
        utilization cross `move_at` there, or the API warn of it), the session's next request
        waits and its account has not walled: it moves only if the store's windows say it should
        (`pacing.early_move`) and to an account with clearly more room; else the reply is `hold`,
        with the reason.

        With `context` (the tokens of the session's last answer, read and written from the
        prompt cache), a move is weighed against waiting (`pacing.move_cost`, at the rate the
        session has spent since its first run began): a wall that resets sooner than the move
        would repay (`pacing.worth_waiting`) is waited out, the reply `wait_until` its reset."""
        if peer.uid not in (0, os.getuid()):
            raise RequestError("forbidden", "only cl-gateway moves a session in flight")
        early = request.get("early")
        if early is not None and early not in pacing.PERIODS:
            raise RequestError("bad-request", f'"early" must be one of {", ".join(pacing.PERIODS)}')
        context = whole_number(request, "context", 0)
        run = await self.store.get_run(id_field(request, "run"))
        if run is None or run.state != RunState.RUNNING:
            raise RequestError("not-found", "no such running run")
        job = await self.store.get_job(run.job_id)
        facts = await self.facts(RESCUABLE, 0)
        usable = self.usable(facts)
        reason = None
        if job is None:
            raise RequestError("not-found", "no such running run")
        asked_at = time.time()
        cost = await self._move_cost(job, context, asked_at) if self.config.max_wait_for_reset else None
        if early is not None:
            usable, reason = self._early(run, job, facts, usable, early, cost=cost)
        elif not facts.walled_for(run.account, job.model) and run.account in usable:
            raise RequestError("not-walled", f"account {run.account} is not walled, and may still be used")
        elif (reset := _reset(facts, run.account)) is not None and pacing.worth_waiting(
            reset - asked_at, cost, self.config.max_wait_for_reset
        ):
            assert cost is not None
            log.info("session waits for its account's reset", job=job.id, run=run.id, account=run.account,
                     until=iso_utc(reset), wait_seconds=round(reset - asked_at, 3),
                     move_cost_seconds=round(cost, 3))  # fmt: skip
            return {"wait_until": reset}
        placer = placement.Placer(
            usable,
            facts,
            self.config.max_sessions_per_account,
            self.config.placement,
            move_at=self.config.move_at,
            ramp=self.config.ramp_after_wall and early is not None,  # at a wall, one held back would see it
        )
        moved: list[Run] = []

        async def attempt(account: str, limit: int) -> bool:
            log_path = functools.partial(session_files.log_path, self.config, run.job_id)
            found = await self.store.move_in_flight(
                run.id, account, limit, lambda run_id: str(log_path(run_id)), reason
            )
            moved.extend([found] if found else [])
            return found is not None

        if not await placer.take(attempt, job.model) or not moved:
            raise RequestError("no-room", "no account has room")
        now = moved[0]
        self._moved(job, now, run.account, in_flight=True, **({"early": True} if early else {}))
        await self.supervisor.hand_over(now, run)  # its worker goes on with the new run; watched
        await self.supervisor.tell_peer(now.id)
        return {"run": now.id, "account": now.account}

    async def _move_cost(self, job: Job, context: int | None, now: float) -> float | None:
        """What a move costs the session, in seconds of its work (`pacing.move_cost`), at the rate
        it has spent over all its runs, on every account it ran on."""
        runs = await self.store.job_runs(job.id)
        read, written = sum(r.cache_read_tokens for r in runs), sum(r.cache_creation_tokens for r in runs)
        return pacing.move_cost(context, read, written, now - min(r.created_at for r in runs))

    def _early(
        self, run: Run, job: Job, facts: Facts, usable: list[str], warned: str, *, cost: float | None
    ) -> tuple[list[str], str]:
        """The accounts an early move may go to, and its reason; `hold` (with the reason, said
        once per window) if the session should stay (`cost`: what a move costs it, in seconds)."""
        outlook = pacing.Outlook(facts.windows, facts.live)
        most = self.config.max_wait_for_reset
        move, reason = pacing.early_move(outlook, run.account, self.config.move_at, warned, cost=cost, most=most)
        emptier = functools.partial(pacing.clearly_emptier, outlook, facts.live, run.account, self.config.move_at)
        targets = [name for name in usable if name != run.account and emptier(name)] if move else []
        if not targets:
            reason = reason if not move else f"held: no account has clearly more room than {run.account}"
            said = reason.split(", resets")[0]  # the same hold as the request before, or a new one
            if self._held.get(job.id) != said:
                if len(self._held) >= HELD_KEPT:
                    self._held.clear()  # at worst, a hold said twice
                self._held[job.id] = said
                log.info("session held", job=job.id, session=job.session_id, account=run.account, reason=reason)
            raise RequestError("hold", reason)
        return targets, reason

    async def _metrics(self, _request: Request, _peer: Peer) -> Reply:
        """What `cl-metrics` exposes of the rescuer: what it counted since it started."""
        return {
            "waiting": len(self._waiting.jobs),
            "counters": {"moves": self._moves, "live_moves": self._live_moves, "failures": self._move_failures},
            "histograms": {"wall_to_resumed": self._wall_to_resumed.public()},
        }

    async def _waiting_request(self, _request: Request, peer: Peer) -> Reply:
        """The sessions waiting for an account, and what for (`cl status`): read now, not remembered.
        The peer's own sessions only, unless it sees everyone's."""
        facts = await self.facts(RESCUABLE, BATCH)
        everyone = peer.sees_all(self.config.admin_group)
        shown = [job for job in facts.jobs if job.session_id and (everyone or job.submitter == peer.uid)]
        waiting = Waiting.of(shown, facts, self.usable(facts), self._placer(facts))
        return {
            "reason": waiting.reason or None,
            "blocked": self.blocked.line() if self.blocked else None,
            "next_reset": iso_utc(waiting.next_reset) if waiting.next_reset else None,
            "probing": list(waiting.probing),
            "ramping": list(waiting.ramping),
            "sessions": [
                {
                    "session_id": job.session_id,
                    "job": job.id,
                    "account": job.account,
                    "state": job.state,
                    "since": iso_utc(job.updated_at),
                }
                for job in waiting.jobs
            ],
        }


def _reset(facts: Facts, account: str) -> float | None:
    """When `account`'s standing wall resets, if the API walled it for a window (5-hour, 7-day)
    and named the reset (not a refused credential, a paid overage or a home cut off)."""
    wall = facts.walls.get(account)
    return wall.reset_at if wall is not None and wall.source == "api" and wall.kind in pacing.PERIODS else None


def _verify_moves(store: Store, host: str | None) -> list[tuple[Run, bool]]:
    """Settle every ended, unverified move of `host`'s jobs (on the store's thread): each with
    whether it grew (one settled meanwhile by an earlier rescuer's pass is left out)."""
    settled = [(run, store.verify_move(run.id)) for run in store.unverified_moves(host)]
    return [(run, grew) for run, grew in settled if grew is not None]


def main() -> None:
    sys.exit(daemon.main("rescue", Rescuer))
