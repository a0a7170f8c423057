"""What cl-balancer and cl-rescue both are, written once.

Each is a loop of passes over the state store, woken by events (a request, the roster changing,
a run ending or first answering, a wall's reset), with workers it launches and watches. This class
holds that: the store, the supervisor, the wake-up, the reset timer, taking over the live runs
found at start, a run's end, the `run-changed` request. `Balancer` and `Rescuer` add their own
pass and requests (`cl.daemon` runs either through the same lifecycle).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, ClassVar

import structlog

from cl import daemon, doctor, fleet
from cl.config import Config
from cl.launcher import under_socket_activation
from cl.protocol import Handler, Peer, Reply, Request, RequestError, id_field
from cl.registry import CredentialRegistry
from cl.states import LIVE_RUNS, RunState
from cl.store import AsyncStore, Facts, Run, Store, StoreUnavailable, retry_delay
from cl.supervisor import Supervisor

if TYPE_CHECKING:
    from cl.store.notifications import Listener

log = structlog.get_logger("cl.service")


class Service:
    name: ClassVar[str]
    """`balancer` or `rescue`: the daemon, its socket, the launcher of its runs (`Run.launcher`)."""
    peer: ClassVar[str]
    """The other daemon, told of every run this one settles."""
    lost_launch: ClassVar[str]
    """Why a run this daemon wrote but never saw claimed is abandoned at start."""

    def __init__(self, config: Config, registry: CredentialRegistry, status_changed: Callable[[], None]) -> None:
        self.config = config
        self.registry = registry
        self.status_changed = status_changed
        self.store = AsyncStore(Store(config.database, config.store_busy_timeout))
        self.supervisor = Supervisor(config, self.store, peer=self.peer, ended=self._ended, present=self.present)
        self._wake = asyncio.Event()
        self.reset_timer = daemon.ResetTimer(self.wake)
        self.blocked: doctor.Finding | None = None
        """What stops every CLI from starting (`cl.doctor`): while it holds, no pass runs."""
        self._problems: set[str] = set()

    def handlers(self) -> dict[str, Handler]:
        return {"run-changed": self._run_changed}

    def wake(self) -> None:
        self._wake.set()

    async def facts(self, states: tuple[str, ...], limit: int) -> Facts:
        """What a pass decides on: in a fleet, this host's jobs only; its accounts (as its registry
        has them now) whose credential a host with a lower name serves set aside; and, if this host
        reaches the fleet (`fleet_listen`), the other live hosts' usable accounts it has no file for."""
        facts = await self.store.facts(states, limit, self.own_host)
        if not self.fleet:
            return facts
        identities = {name: fleet.fingerprint(account) for name, account in self.registry.accounts.items()}
        stale_after = fleet.stale_after(self.config)
        held = {identity for identity in identities.values() if identity is not None}
        served = await self.store.served_below(self.config.host_name, held, stale_after)
        aside = {name for name, identity in identities.items() if identity in served}
        if not self.config.reaches_fleet:
            return dataclasses.replace(facts, aside=aside)
        homes = await self.store.homes(self.config.host_name, stale_after, reachable=True)
        elsewhere = {name: home for name, home in homes.items() if name not in self.registry.accounts}
        return dataclasses.replace(facts, aside=aside, elsewhere=elsewhere)

    def usable(self, facts: Facts) -> list[str]:
        """The accounts work may go to now, walls and room aside: this host's usable files, and the
        fleet's accounts that `facts` found elsewhere. Derived each time, never kept."""
        here = [name for name in self.registry.sorted_names() if self.registry.accounts[name].usable]
        return here + sorted(facts.elsewhere)

    async def present(self, account: str) -> bool:
        """The account is in this host's roster now, or (this host reaching the fleet) in a live
        host's, usable there."""
        if account in self.registry.accounts:
            return True
        if not self.config.reaches_fleet:
            return False
        return bool(await self.store.homes(self.config.host_name, fleet.stale_after(self.config), account))

    @property
    def fleet(self) -> bool:
        """The store is shared by the hosts of a fleet (PostgreSQL): each host's daemons keep to the
        jobs submitted on it (its directories, its workers). A store of one host's own (SQLite)
        holds only its jobs, whatever the machine's name has become."""
        return bool(self.config.store)

    @property
    def own_host(self) -> str | None:
        """Whose jobs and runs this host's daemons place, watch and take over (`Store.facts`,
        `Store.runs_in`): None is everyone's."""
        return self.config.host_name if self.fleet else None

    async def start(self) -> None:
        """Nothing to put in place before READY=1 beyond the control socket."""

    async def work(self) -> None:
        """Take over the live runs, then a pass each time something may have changed; the
        background tasks alongside. Cancelled at shutdown."""
        await self._take_over_runs()
        await self.check()
        background = [*self.background(), *([self._follow_the_fleet()] if self.config.reaches_fleet else [])]
        tasks = [asyncio.create_task(task) for task in (*background, self._keep_checking())]
        listener = self._listen() if self.config.reaches_fleet else None
        try:
            await daemon.serve_passes(self._wake, self._pass)
        finally:
            for task in tasks:
                task.cancel()
            if listener is not None:
                await asyncio.to_thread(listener.close)
            self.supervisor.close()
            self.store.close()

    async def _pass(self) -> None:
        if self.blocked is None:
            await self.one_pass()

    async def check(self) -> None:
        """What the CLI needs, checked (`doctor.environment`); each problem said once while it lasts."""
        switch = not under_socket_activation(self.config)  # else each cl-worker@ unit checks its view
        findings = await asyncio.to_thread(doctor.environment, self.config, workers_switch=switch)
        problems = {finding.line(): finding for finding in findings if not finding.ok}
        for line in problems.keys() - self._problems:
            found = problems[line]
            said = log.error if found.blocks else log.warning
            said(
                "work waits: a CLI cannot start" if found.blocks else "check found a problem",
                check=found.check,
                found=found.said,
                fix=found.fix,
            )
        self._problems = set(problems)
        before, self.blocked = self.blocked, doctor.blocking(findings)
        if before is not None and self.blocked is None:
            log.info("work resumes: every check passes")
            self.wake()
        self.status_changed()

    async def reloaded(self) -> None:
        await self.check()

    async def _keep_checking(self) -> None:
        """Again every `RECHECK` seconds while something blocks work, every `WELL_RECHECK` otherwise."""
        while True:
            await asyncio.sleep(doctor.RECHECK if self.blocked else doctor.WELL_RECHECK)
            await self.check()

    def _listen(self) -> Listener:
        """A pass when the database says another host did something that may give us work."""
        from cl.store.notifications import Listener  # noqa: PLC0415 - psycopg only where a server is used

        loop = asyncio.get_running_loop()
        listener = Listener(
            self.config.store, f"cl-{self.name} {self.config.host_name}", lambda: loop.call_soon_threadsafe(self.wake)
        )
        listener.start()
        return listener

    async def _follow_the_fleet(self) -> None:
        """A pass every heartbeat besides: a host that went silent (its accounts leave the fleet)
        notifies nothing, nor does anything while this host is not listening."""
        while True:
            await asyncio.sleep(self.config.heartbeat_interval)
            self.wake()

    async def _take_over_runs(self) -> None:
        """At start, every live run: one this daemon wrote but no worker claimed is abandoned (its
        job goes back to where it was, and is tried again), a live worker is watched, a vanished
        one orphaned. A run the other daemon wrote and no worker claimed yet is that daemon's.
        An unavailable store (locked, out of reach) is waited out: each step is one transaction
        that a second try finds done."""
        delay = 0.0
        while True:
            try:
                for run in await self.store.runs_in(LIVE_RUNS, self.own_host):
                    if run.state == RunState.STARTING and run.launcher != self.name:
                        continue
                    # Never claimed: its launcher (an earlier us) died first, or the worker is about
                    # to claim it. Abandoning wins or the claim does, in one transaction each.
                    self.taken_over(run, await self.supervisor.recover(run, self.lost_launch))
                break
            except StoreUnavailable as exc:
                if not delay:
                    log.warning("taking over the live runs: state store unavailable, retrying", error=str(exc))
                delay = retry_delay(delay)
                await asyncio.sleep(delay)
        self.wake()

    def _ended(self, run: Run, by_worker: bool) -> None:
        self.run_ended(run, by_worker)
        self.wake()

    async def _run_changed(self, request: Request, peer: Peer) -> Reply:
        """A worker's run ended or first answered, or the other daemon settled a run: cl's own
        processes only (root, or the daemons' user), never an operator's."""
        if peer.uid not in (0, os.getuid()):
            raise RequestError("forbidden", "run-changed comes from cl's own processes only")
        run_id = id_field(request, "run")
        if request.get("event") == "answered" and (run := await self.store.get_run(run_id)) is not None:
            await self.answered(run)
        self.wake()
        return {}

    # What each daemon adds.

    async def one_pass(self) -> None:
        raise NotImplementedError

    def background(self) -> list[Coroutine[Any, Any, None]]:
        """Tasks that run beside the passes."""
        return []

    def taken_over(self, run: Run, now: Run) -> None:
        """`run`, found live at start, is `now` after taking it over."""

    def run_ended(self, run: Run, by_worker: bool) -> None:
        """A watched worker exited; `run` as it ended, settled by its worker or by us."""

    async def answered(self, run: Run) -> None:
        """The account first answered `run`."""
