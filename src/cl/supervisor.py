"""Launching workers for runs and learning of their end: one implementation for both daemons.

A daemon that launches a worker, or finds one running at start, holds a pidfd on it. When the
worker exits without having settled its run, the supervisor says what became of it: `failed`
if it never claimed the run, `orphaned` if it claimed it and vanished without an outcome (the
rescuer resumes those). Every change a daemon makes to a run is told to the other daemon.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable

import structlog

from cl.client import tell
from cl.config import Config
from cl.launcher import launch, prepare_launches, stop_launches
from cl.processes import alive, on_exit, send_signal
from cl.states import LIVE_RUNS, RunState
from cl.store import AsyncStore, Run, StoreUnavailable, retry_delay

log = structlog.get_logger("cl.supervisor")


class Supervisor:
    def __init__(
        self,
        config: Config,
        store: AsyncStore,
        peer: str,
        ended: Callable[[Run, bool], None],
        present: Callable[[str], Awaitable[bool]],
    ) -> None:
        self.config = config
        self.store = store
        self._present = present
        """Whether an account is in the roster now (`Service.present`)."""
        self._peer = peer
        """The other daemon: told of every run this one settles."""
        self._ended = ended
        """Called with each run once its worker has exited, and whether the worker settled it."""
        self._checks: set[asyncio.Task[None]] = set()
        self._closed = False
        prepare_launches(config.socket_path("worker"))

    async def launch(self, run: Run) -> None:
        """Start the run's worker (it readies the session's files itself, as the CLI's user)."""
        if await self._account_gone(run):
            return
        try:
            pid = await asyncio.to_thread(launch, run.id, self.config.socket_path("worker"), self.config.starter_socket)
        except (OSError, ValueError, KeyError) as exc:
            await self.settle(run, RunState.FAILED, f"cannot launch a worker: {exc}")
            log.error("cannot launch a worker", job=run.job_id, run=run.id, account=run.account, error=str(exc))
            return
        if not on_exit(pid, self._exited(run.id)):  # gone already
            await self.check(run.id)

    async def hand_over(self, run: Run, holder: Run) -> None:
        """A live move: the worker holding `holder`'s CLI is told (SIGUSR1) to claim `run` and go on
        with the new account, and is watched from now on. If it is gone, or goes before claiming,
        the move is abandoned (the job walls again) and made anew by restart."""
        if await self._account_gone(run):
            return
        pid = holder.pid
        if pid is None or not send_signal(pid, holder.pid_start, signal.SIGUSR1):
            if pid is None or not alive(pid, holder.pid_start):
                await self.store.let_go(holder.id)  # gone: the next pass moves it by restart
            await self.check(run.id)
        elif not on_exit(pid, self._exited(run.id)):
            await self.check(run.id)

    async def _account_gone(self, run: Run) -> bool:
        """The run's account left the roster between choosing it and starting the run: abandoned."""
        if await self._present(run.account):
            return False
        await self.settle(run, RunState.ABANDONED, "account removed")
        return True

    async def recover(self, run: Run, why: str) -> Run:
        """At a daemon's start, one live run: a `starting` one is abandoned with `why` (its
        launcher, an earlier us, died first) unless its worker claims it first, in which case it
        is watched like any running one; a running one is watched, or orphaned if its worker is
        gone. The run as it stands afterwards."""
        if run.state == RunState.STARTING:
            run = await self.settle(run, RunState.ABANDONED, why)
            if run.state != RunState.RUNNING:  # abandoned, or ended already
                return run
        if self.adopt(run):
            return run
        return await self.orphan(run)

    def close(self) -> None:
        """At shutdown: stop checking ended workers (the next start settles what is left), and
        end the fork server rather than leave it to notice its launcher gone."""
        self._closed = True
        for task in self._checks:
            task.cancel()
        stop_launches()

    def adopt(self, run: Run) -> bool:
        """Watch a running run's worker; False if that worker is gone."""
        return run.pid is not None and alive(run.pid, run.pid_start) and on_exit(run.pid, self._exited(run.id))

    def _exited(self, run_id: int) -> Callable[[], None]:
        def exited() -> None:
            if self._closed:
                return
            task = asyncio.get_running_loop().create_task(self._check_until_recorded(run_id))
            self._checks.add(task)
            task.add_done_callback(self._checks.discard)

        return exited

    async def _check_until_recorded(self, run_id: int) -> None:
        """A worker's end must reach the store, however long the store is unavailable."""
        delay = 0.0
        while True:
            try:
                await self.check(run_id)
            except StoreUnavailable as exc:
                log.error("worker ended, not recorded yet: state store unavailable", run=run_id, error=str(exc))
                delay = retry_delay(delay)
                await asyncio.sleep(delay)
            else:
                return

    async def check(self, run_id: int) -> None:
        """A worker ended: if it did not settle its run itself, say what became of it."""
        run = await self.store.get_run(run_id)
        if run is None:
            return
        by_worker = run.state not in LIVE_RUNS
        if run.state == RunState.STARTING and run.live:
            run = await self.settle(run, RunState.ABANDONED, "the session's CLI ended before the live move")
        elif run.state == RunState.STARTING:
            run = await self.settle(run, RunState.FAILED, "the worker exited before starting the CLI; see the log")
            log.error("worker failed to start", run=run_id, job=run.job_id, account=run.account)
        elif run.state in LIVE_RUNS:
            run = await self.orphan(run)
        self._ended(run, by_worker)

    async def orphan(self, run: Run, why: str = "worker gone without an outcome") -> Run:
        run = await self.settle(run, RunState.ORPHANED, why)
        if run.state == RunState.ORPHANED:
            log.warning("session orphaned", run=run.id, job=run.job_id, account=run.account, session=run.session_id)
        return run

    async def settle(self, run: Run, state: RunState, error: str) -> Run:
        """Settle a live run and tell the other daemon; the run as it stands afterwards."""
        settled = await self.store.settle(run.id, state, error)
        if settled is None:  # someone else settled it first
            return await self.store.get_run(run.id) or run
        await self.tell_peer(run.id)
        return settled

    async def tell_peer(self, run_id: int) -> None:
        """The other daemon looks again: a run of this job changed (or the job went back to the queue)."""
        await asyncio.to_thread(tell, self.config.socket_path(self._peer), {"request": "run-changed", "run": run_id})


def log_outcome(run: Run) -> None:
    """A worker's outcome, in the daemon's own log too; a wall is the rescuer's to tell (its
    `session walled` line, once per wall, with the reset)."""
    if run.state == RunState.WALLED:
        return
    level = {RunState.DONE: log.info, RunState.CANCELLED: log.info}.get(run.state, log.error)
    level(f"session {run.state}", job=run.job_id, run=run.id, account=run.account, session=run.session_id)
