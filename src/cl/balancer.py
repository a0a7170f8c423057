"""cl-balancer: hands queued jobs to the account with the most room.

Placement runs when something can change its answer, never on a polling timer: a job
submitted, the roster changing (a registry event), a run ending (a worker's pidfd or its
`run-ended` request), the earliest standing wall reaching its reset time. Each placement is one
store transaction (job -> running, a `starting` run) before the worker is launched; the worker
claims the run, so a balancer killed at any point loses no job and runs none twice. At start
the balancer settles what happened while it was down: never-claimed runs go back to the queue,
live workers are adopted, vanished ones are marked orphaned for the rescuer.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import structlog

from cl import daemon, placement
from cl.claude_code.environment import worker_environment
from cl.config import Config
from cl.processes import alive, on_exit
from cl.protocol import Encoded, Handler, Reply, Request, RequestError
from cl.registry import CredentialRegistry, Subscription
from cl.store import LIVE_RUNS, AsyncStore, Job, JobState, Run, RunState, Store, iso_utc
from cl.worker import launch, point_credentials, session_config_dir

log = structlog.get_logger("cl.balancer")

MAX_PROMPT_BYTES = 1 << 20


class Balancer:
    def __init__(self, config: Config, registry: CredentialRegistry, status_changed: Callable[[], None]) -> None:
        self.config = config
        self.registry = registry
        self._status_changed = status_changed
        self.store = AsyncStore(Store(config.database))
        self._wake = asyncio.Event()
        self._reset_timer: asyncio.TimerHandle | None = None
        self._counts = {"walled": 0, "running": 0, "queued": 0}
        self._waiting_logged = False

    def handlers(self) -> Mapping[str, Handler]:
        return {
            "submit": self._submit,
            "cancel": self._cancel,
            "status": self._status,
            "logs": self._logs,
            "run-ended": self._run_ended,
        }

    def status(self) -> str:
        c = self._counts
        return f"{c['walled']} walled, {c['running']} sessions, {c['queued']} queued"

    async def run(self) -> None:
        await self._reconcile()
        changes = self.registry.subscribe()
        watcher = asyncio.create_task(self._wake_on_roster_changes(changes))
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                await self._place()
        finally:
            watcher.cancel()
            changes.close()
            self.store.close()

    def wake(self) -> None:
        self._wake.set()

    async def _wake_on_roster_changes(self, changes: Subscription) -> None:
        async for _ in changes:
            changes.drain()
            self.wake()

    async def _reconcile(self) -> None:
        store = self.store.store
        for run in await self.store.run(store.runs, LIVE_RUNS):
            if run.state == RunState.STARTING:
                # Never claimed: its launcher (an earlier us) died first, or the worker is about
                # to claim it. Abandoning wins or the claim does, in one transaction each.
                if await self.store.run(store.settle, run.id, RunState.ABANDONED, "launcher stopped first"):
                    log.info("run abandoned, job requeued", run=run.id, job=run.job_id, account=run.account)
            elif run.pid is not None and alive(run.pid, run.pid_start) and on_exit(run.pid, self._ended(run.id)):
                log.info("session adopted", run=run.id, job=run.job_id, account=run.account, pid=run.pid)
            else:
                await self._orphan(run.id)
        self.wake()

    def _ended(self, run_id: int) -> Callable[[], None]:
        def ended() -> None:
            asyncio.get_running_loop().create_task(self._settle_if_live(run_id))

        return ended

    async def _settle_if_live(self, run_id: int) -> None:
        """A worker ended: if it did not settle its run itself, say what became of it."""
        store = self.store.store
        run = await self.store.run(store.run, run_id)
        if run is not None and run.state == RunState.STARTING:
            error = "the worker exited before starting the CLI; see the log"
            await self.store.run(store.settle, run_id, RunState.FAILED, error)
            log.error("worker failed to start", run=run_id, job=run.job_id, account=run.account)
        elif run is not None and run.state in LIVE_RUNS:
            await self._orphan(run_id)
        elif run is not None:  # the worker settled it: the outcome goes in our log too
            level = {RunState.DONE: log.info, RunState.WALLED: log.warning}.get(RunState(run.state), log.error)
            level(f"session {run.state}", job=run.job_id, run=run_id, account=run.account, session=run.session_id)
        self.wake()

    async def _orphan(self, run_id: int) -> None:
        state = RunState.ORPHANED
        run = await self.store.run(self.store.store.settle, run_id, state, "worker gone without an outcome")
        if run is not None:
            log.warning("session orphaned", run=run_id, job=run.job_id, account=run.account, session=run.session_id)

    async def _place(self) -> None:
        store = self.store.store
        queued, walls, live, usage = await self.store.run(store.placement_facts, 1000)
        if queued:
            await self._place_jobs(queued, walls, live, usage)
        self._counts = {
            "walled": sum(1 for name in walls if name in self.registry.accounts),
            "running": sum(live.values()),
            "queued": await self.store.run(store.queue_length),
        }
        self._status_changed()
        self._schedule_wall_expiry(walls.values())

    async def _place_jobs(
        self, queued: list[Job], walls: Mapping[str, Any], live: dict[str, int], usage: Mapping[str, Any]
    ) -> None:
        """Place what can be placed, in queue order; `live` follows."""
        store = self.store.store
        limit = self.config.max_sessions_per_account
        candidates = placement.eligible(self.registry.accounts, walls, live, limit)
        for job in queued:
            account = placement.choose(candidates, live, usage, self.config.placement)
            if account is None:
                if not self._waiting_logged:
                    log.warning("jobs waiting", queued=len(queued), reason="no-eligible-account")
                    self._waiting_logged = True
                break
            self._waiting_logged = False
            run = await self.store.run(store.place, job.id, account.name)
            if run is None:
                continue  # cancelled meanwhile
            live[account.name] = live.get(account.name, 0) + 1
            if live[account.name] >= limit:
                candidates.remove(account)
            await self._launch(run, job.id)

    async def _launch(self, run: Run, job_id: int) -> None:
        account = self.registry.accounts.get(run.account)
        if account is None:  # gone between choosing and launching
            await self.store.run(self.store.store.settle, run.id, RunState.ABANDONED, "account removed")
            return
        config_dir = session_config_dir(self.config, job_id)
        await asyncio.to_thread(point_credentials, self.config, config_dir, account.name, account.kind)
        env = worker_environment(os.environ, account, str(config_dir), self.config.worker_env)
        try:
            pid = await asyncio.to_thread(launch, run.id, env, self.config.socket_path("worker"))
        except (OSError, ValueError, KeyError) as exc:
            await self.store.run(self.store.store.settle, run.id, RunState.FAILED, f"cannot launch a worker: {exc}")
            log.error("cannot launch a worker", job=job_id, run=run.id, account=account.name, error=str(exc))
            return
        if not on_exit(pid, self._ended(run.id)):  # gone already
            await self._settle_if_live(run.id)
        log.info("job placed", job=job_id, run=run.id, account=account.name, pid=pid)

    def _schedule_wall_expiry(self, walls: Any) -> None:
        """Wake at the earliest reset of a standing wall: that account may take work again."""
        resets = [wall.reset_at for wall in walls if wall.reset_at is not None]
        if self._reset_timer is not None:
            self._reset_timer.cancel()
            self._reset_timer = None
        if resets:
            loop = asyncio.get_running_loop()
            delay = max(0.0, min(resets) - time.time()) + 0.05
            self._reset_timer = loop.call_later(delay, self.wake)

    # requests

    async def _submit(self, request: Request) -> Reply:
        cwd, prompt = request.get("cwd"), request.get("prompt")
        model, max_turns = request.get("model"), request.get("max_turns")
        if not isinstance(cwd, str) or not os.path.isabs(cwd):
            raise RequestError("bad-request", '"cwd" must be an absolute path')
        if not isinstance(prompt, str) or not prompt.strip():
            raise RequestError("bad-request", '"prompt" must be a non-empty string')
        if len(prompt.encode()) > MAX_PROMPT_BYTES:
            raise RequestError("bad-request", f'"prompt" is over {MAX_PROMPT_BYTES} bytes')
        if model is not None and not isinstance(model, str):
            raise RequestError("bad-request", '"model" must be a string')
        if max_turns is not None and (not isinstance(max_turns, int) or isinstance(max_turns, bool) or max_turns < 1):
            raise RequestError("bad-request", '"max_turns" must be a positive whole number')
        job = await self.store.run(self.store.store.add_job, cwd, prompt, model, max_turns)
        log.info("job queued", job=job.id, cwd=cwd)
        self.wake()
        return {"job": job.id}

    async def _cancel(self, request: Request) -> Reply:
        job_id = _job_id(request)
        job = await self.store.run(self.store.store.cancel_job, job_id)
        if job is None:
            raise RequestError("not-found", f"no job {job_id}")
        if job.state != JobState.CANCELLED:
            raise RequestError("not-queued", f"job {job_id} is {job.state}; only a queued job can be cancelled")
        log.info("job cancelled", job=job_id)
        return {"job": job_id, "state": job.state}

    async def _run_ended(self, request: Request) -> Reply:
        run_id = request.get("run")
        if not isinstance(run_id, int):
            raise RequestError("bad-request", '"run" must be a run id')
        self.wake()
        return {}

    async def _status(self, _request: Request) -> Encoded:
        """Accounts, sessions, jobs and the queue: built from cached pieces, it stays fast at 10,000 accounts."""
        snapshot = await self.store.run(self.store.store.snapshot)
        jobs, walls, live, usage = snapshot.jobs, snapshot.walls, snapshot.live, snapshot.usage
        roster = self.registry.accounts
        busy = walls.keys() | live.keys() | usage.keys()
        accounts = []
        for name in self.registry.sorted_names():
            head = roster[name].json_head
            if name not in busy:
                accounts.append(head + _IDLE_TAIL)
                continue
            wall = walls.get(name)
            until = json.dumps(iso_utc(wall.reset_at)) if wall and wall.reset_at else "null"
            used = {k: v for k, v in usage.get(name, {}).items() if v is not None and k != "last_used_at"}
            tail = f',"usage":{json.dumps(used)}' if used else ""
            accounts.append(f'{head},"walled_until":{until},"sessions":{live.get(name, 0)}{tail}}}')
        sessions = [
            {
                "session_id": job.session_id,
                "job": job.id,
                "account": job.account,
                "state": job.run_state,
                "cwd": job.cwd,
                "started_at": job.run_started_at,
                "error": job.run_error,
            }
            for job in jobs
            if job.run_state is not None
        ]
        job_views = [
            {
                "id": job.id,
                "state": job.state,
                "account": job.account,
                "session_id": job.session_id,
                "cwd": job.cwd,
                "created_at": job.created_at,
                "error": job.error,
            }
            for job in jobs
        ]
        queue = sum(1 for job in jobs if job.state == JobState.QUEUED)
        return Encoded(
            f'{{"accounts":[{",".join(accounts)}],"sessions":{json.dumps(sessions)},'
            f'"jobs":{json.dumps(job_views)},"queue":{queue}}}'
        )

    async def _logs(self, request: Request) -> Reply:
        """A run's output from `offset` on: `{"data", "offset", "finished"}`; `job` or `session` names it."""
        store = self.store.store
        offset = request.get("offset", 0)
        if not isinstance(offset, int) or offset < 0:
            raise RequestError("bad-request", '"offset" must be a byte offset')
        wanted = request.get("session") or request.get("job")
        if not isinstance(wanted, int | str) or isinstance(wanted, bool):
            raise RequestError("bad-request", '"session" or "job" must name one')
        run = await self.store.run(store.latest_run, wanted)
        if run is None:
            raise RequestError("not-found", f"no session or job {wanted!r}")
        data = b""
        if run.log_path:
            data = await asyncio.to_thread(_read_from, Path(run.log_path), offset, 1 << 20)
        return {
            "data": data.decode(errors="replace"),
            "offset": offset + len(data),
            "finished": run.state not in LIVE_RUNS,
        }


_IDLE_TAIL = ',"walled_until":null,"sessions":0}'


def _read_from(path: Path, offset: int, limit: int) -> bytes:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read(limit)
    except FileNotFoundError:
        return b""


def _job_id(request: Request) -> int:
    job_id = request.get("job")
    if not isinstance(job_id, int) or isinstance(job_id, bool):
        raise RequestError("bad-request", '"job" must be a job id')
    return job_id


def main() -> None:
    sys.exit(daemon.run("balancer", Balancer))
