"""`cl-worker RUN`: one supervised `claude` process for a run of a job, and the live moves after it.

A daemon (the balancer placing a job, the rescuer moving a session) writes the run (`starting`)
and launches this process detached (`cl.launcher`), naming the run and nothing else, so that a
daemon restart neither kills it nor loses it: the worker claims its run in the store (`starting`
-> `running`, with its pid and start time), or exits at once if the run was abandoned meanwhile,
so a run never executes twice. Then, in this order:

* it locks the session (a lock file in the state dir that the CLI inherits: one live process
  per session, even if a worker is killed before its CLI);
* it takes a user for the CLI from the pool (`cl.cli_user`) and gives it the job's config dir, with
  the job's own copy of the account's credential (`cl.job_credential`; token and API-key accounts
  come through the environment);
* it opens the working directory once, no symlink followed, and checks what it opened again
  (`cl.workdir`): every start of the CLI enters that descriptor;
* it starts the CLI as a user of its own (`cl.cli_user`), in a view of its own (`cl.sandbox`),
  itself or under systemd through a `cl-cli@` unit of its own (`cl.cli_start`): if the worker dies,
  so does its CLI, and the run is found orphaned rather than running unseen. It gives the CLI the
  prompt as a user message on its standard input (`cl.cli_process`): a prompt is never an argument;
* it reads the turn as it arrives (session id, usage, utilization, the first answer, a wall),
  keeps the credential copy in step, and keeps the output, redacted, in the run's log;
* it writes the outcome and tells both daemons. After an answer it closes the CLI's input and
  the CLI exits.

In gateway mode (the default) the CLI's credential is a capability for its run (`cl.capability`):
the worker issues it when it starts the CLI and revokes it when the CLI ends; the account's
token never reaches the job's config dir, and its walls and usage are the gateway's to record
(a wall the CLI prints stands only if the API sent it). A move made while the CLI's request waits
at the gateway (`move-now`) hands the worker the run to go on as (SIGUSR1); so does a follow-up.

After a wall, if the CLI can go on under another account while it runs (a capability; in direct
mode an OAuth credential file and a CLI version not measured to keep its first one), the worker
keeps the CLI alive, idle, for up to `live_wait` seconds (the run says `held_until`). A move the
rescuer hands over then (SIGUSR1, the next run `starting` and `live`) is claimed here: in direct
mode the job's credential copy is re-pointed to the new account; the resume prompt is sent into
the same process, which keeps its pid, its session, and what it started. In direct mode, if that
turn walls again before any answer, the CLI kept the old credential: the worker restarts it with
`--resume` on the same run, says so, and the version is recorded as one that does not swap once
the restart answers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import json
import math
import os
import queue
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import structlog

from cl import capability, cli_start, cli_user, fleet, lease, logs, redact, sandbox, workdir
from cl.claude_code.environment import passed, worker_environment
from cl.claude_code.stream import Outcome, StreamState
from cl.claude_code.transcripts import transcript_path
from cl.cli_process import CliProcess, Event, Events, Output
from cl.cli_user import CliUser, CliUserError
from cl.client import tell
from cl.config import Config
from cl.credentials import Account, CredentialKind, credential_filename, read_account
from cl.job_credential import JobCredential
from cl.lease import Lease
from cl.moments import iso_utc
from cl.processes import start_time
from cl.session_files import credential_mark_path, lock_path, log_path, session_config_dir
from cl.states import JobState, RunState
from cl.store import MOVED_EARLY, Job, Renewal, Run, Store, StoreUnavailable

log = structlog.get_logger("cl.worker")

MAX_TOKENS = 2**40
MAX_RESULT_TEXT = 32 * 1024
MAX_FIELD = 200
RESULT_FIELDS = ("type", "subtype", "is_error", "api_error_status", "num_turns", "total_cost_usd", "duration_ms")
LOCK_POLL = 0.1
MAX_STORE_WAIT = 5.0
"""Seconds between a worker's tries at an unavailable state store, at most."""
MAX_LAUNCH_REQUEST = 4096
"""Bytes of a launch request (`{"run": N}`), at most."""
MAX_WALL = 8 * 86400
"""Seconds a wall may stand at most: the longest usage window is seven days."""
_RUN_STATE = {
    Outcome.DONE: RunState.DONE,
    Outcome.FAILED: RunState.FAILED,
    Outcome.WALLED: RunState.WALLED,
    Outcome.UNAUTHORIZED: RunState.WALLED,
}


T = TypeVar("T")


def patiently(call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`call(*args)`, waiting out a state store that is unavailable (locked past its busy timeout,
    the disk full) with backoff, said once: a worker's claim and outcome must reach the store,
    however long that takes, and the worker must not exit meanwhile (its daemon would take its
    exit for a failure, or its run for an orphan, and run the session again)."""
    delay, said = 0.05, False
    while True:
        try:
            return call(*args, **kwargs)
        except StoreUnavailable as exc:
            if not said:
                log.warning("state store unavailable, waiting", error=str(exc))
                said = True
            time.sleep(delay)
            delay = min(MAX_STORE_WAIT, delay * 2)


class Patient:
    """A `Store` whose every call is made `patiently`, one at a time with the lease's renewals
    (`renewing`): the store is one connection."""

    def __init__(self, store: Store, lock: threading.RLock) -> None:
        self._store, self._lock = store, lock

    @classmethod
    def of(cls, store: Store, lock: threading.RLock) -> Store:
        return cast("Store", cls(store, lock))  # the same interface; only its failures differ

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._store, name)

        def locked(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                return method(*args, **kwargs)

        return functools.partial(patiently, locked)


def renewing(store: Store, lock: threading.RLock) -> Callable[[int, float], Renewal]:
    """The store's `renew` for the lease's thread: `StoreUnavailable` at once while the worker's
    own call holds the store (the lease tries again shortly; its watch does not wait for it)."""

    def renew(run_id: int, seconds: float) -> Renewal:
        if not lock.acquire(timeout=lease.RETRY):
            raise StoreUnavailable("the worker's store is busy")
        try:
            return store.renew(run_id, seconds)
        finally:
            lock.release()

    return renew


class RunRefused(Exception):
    """The run cannot start here (its directory refused): the run fails with this."""


class AccountUnusable(Exception):
    """The run's account went away or bad between placement and now: not the session's fault."""


def claude_argv(config: Config, job: Job, resume: str | None) -> list[str]:
    """The CLI's command line (`resume`: the session it resumes): options only. Prompts are user
    messages on its standard input."""
    argv = [config.claude_bin, "-p", "--input-format", "stream-json", "--output-format", "stream-json", "--verbose"]
    if job.model:
        argv += ["--model", job.model]
    if job.max_turns:
        argv += ["--max-turns", str(job.max_turns)]
    if resume:
        argv += ["--resume", resume]
    return argv + list(config.claude_args)


def work(
    config: Config,
    store: Store,
    run_id: int,
    renew: Callable[[int, float], Renewal],
    starter: socket.socket | None = None,
) -> Run | None:
    """Claim and execute one run, and the live moves handed to it; the last run, or None if the
    first was not ours to run. Its lease is renewed with `renew` from the claim on. `starter`: a
    connection to the CLI's starter, made early (`cli_start.connect`), for its first start."""
    run = store.get_run(run_id)
    job = store.get_job(run.job_id) if run else None
    if run is None or job is None:
        log.error("no such run", run=run_id)
        return None
    path = log_path(config, job.id, run.id)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    me = os.getpid()
    claimed = store.claim(run.id, me, start_time(me) or "", str(path), lease=config.run_lease)
    if claimed is None:
        log.info("run not claimable, leaving it", run=run.id, job=job.id)
        return None
    run, leased = claimed, Lease(renew, config.run_lease, claimed.id)
    leased.start()
    try:
        return _claimed(config, store, job, run, leased, starter=starter)
    finally:
        leased.end()


def _claimed(config: Config, store: Store, job: Job, run: Run, leased: Lease, *, starter: socket.socket | None) -> Run:
    bound = log.bind(job=job.id, run=run.id, account=run.account)
    if (lock := _hold_session(config, job.id, bound)) is None:
        reason = f"the session's previous process still runs after {config.session_lock_wait:g} s (it holds its lock)"
        _refused(store, run, reason, bound)
        return run
    config_dir = session_config_dir(config, job.id)
    try:
        slot = _cli_user(config, config_dir, bound)
        credential = _ready_config_dir(config, job.id, slot.user, first=store.previous_account(run.id) is None)
        cli_user.keep_only(slot.user, signals=config.starter_socket is None)  # else the starter's to do
    except (CliUserError, sandbox.SandboxUnavailable, OSError) as exc:
        _refused(store, run, f"cannot ready the session's CLI: {_reason(exc)}", bound)
        return run
    locks = (lock, *slot.fds)
    output = Output(log_path(config, job.id, run.id))
    session = _Session(config, store, job, slot.user, credential, locks, run, output, leased, starter=starter)
    signal.signal(signal.SIGUSR1, lambda _signum, _frame: session.events.put(Event.WAKE))
    signal.signal(signal.SIGTERM, _on_terminate(session))
    try:
        _work(session)
    except (RunRefused, workdir.WorkdirRefused) as exc:
        _refused(store, session.run, str(exc), bound)
    except AccountUnusable as exc:
        _bench(config, store, session.run, str(exc), bound)
    finally:
        if session.process is not None:
            _finish(session)
        session.output.close()
        credential.close()
        if session.cwd is not None:
            os.close(session.cwd)
    return session.run


@dataclasses.dataclass(slots=True)
class _Session:
    """What a worker works with once its first run is claimed, locked and its config dir ready.
    `run` is the current run: a live move hands the worker the next one."""

    config: Config
    store: Store
    job: Job
    cli: CliUser
    credential: JobCredential
    locks: tuple[int, ...]
    """The session's lock and the pool member's (`cl.cli_user.take`): the CLI inherits both."""
    run: Run
    output: Output
    lease: Lease
    process: CliProcess | None = None
    starter: socket.socket | None = None
    """A connection to the CLI's starter, handed by the worker's launcher or made as it began, for
    the first start: the starter readies itself while the worker claims its run and readies the session."""
    cwd: int | None = None
    """The job's directory, opened once (no symlink followed) and kept for every start of its CLI."""
    oauth: bool = False
    """The current run's account is an OAuth credential file (its copy is kept in step)."""
    capability: str | None = None
    """In gateway mode, the digest of the capability the CLI holds (`cl.capability`)."""
    turn_began: int | None = None
    """The session's transcript's size when the current turn began (None: a new session's)."""
    turn_at: float = 0.0
    """When the current turn's prompt was sent."""
    afresh: bool = False
    """The current run resumes a session that never reached the disk (its CLI was killed before it
    wrote the prompt) and that nothing ever answered: its CLI starts anew on the job's prompt."""
    events: Events = dataclasses.field(default_factory=Events)
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    """Set when the job was cancelled while its CLI ran."""

    @property
    def account_file(self) -> Path:
        return _account_file(self.config, self.run.account)

    def bound(self, **fields: Any) -> Any:
        return log.bind(job=self.job.id, run=self.run.id, account=self.run.account, **fields)

    def go_on(self, run: Run) -> None:
        """The same CLI goes on as `run` (a live move, a follow-up): the lease follows it."""
        self.run, self.lease.run_id = run, run.id

    def started(self, process: CliProcess | None) -> None:
        self.process = process
        self.lease.hold(process)


def _work(session: _Session) -> None:
    """The session's turns: the first run's prompt, then each run that follows in the same CLI
    (a live move after a wall held, a follow-up after an answer), until a run settles for good."""
    job, store = session.job, session.store
    account = _account(session)
    session.cwd = _open_cwd(session)
    swap = False
    """The current run moved live to another account's credential, not yet answered."""
    untaken: str | None = None
    """The CLI version whose live move walled again before an answer: the turn now is by restart."""
    restarted: int | None = None
    """The run whose CLI ended before it took its prompt, restarted once for it."""
    while True:
        run = session.run
        session.turn_began, session.afresh = None, False
        if run.resume:
            transcript = str(transcript_path(Path(), job.cwd, run.resume))
            session.turn_began = session.credential.size_of(transcript)
            store.transcript_before(run.id, session.turn_began)
            session.afresh = _never_on_disk(session)
        if session.process is None and not _start(session, account):
            return
        assert session.process is not None
        session.turn_at = time.time()
        session.process.send(_prompt(session))
        state = _turn(session)
        if run.live and state.session_id is None and not state.ended and restarted != run.id:
            # The held CLI ended (it exited after its wall) before it took the prompt handed to it.
            restarted = run.id
            session.bound().warning("the CLI ended before it took its prompt, starting it again with --resume")
            _finish(session)
            continue
        _moved_in_flight(session)
        _unless_the_api_said_so(session, state)
        if swap and _unconfirmed(state):
            # The wall may be the old account's: the CLI may not have taken the new credential.
            # Today's restart, at once, on the account the move chose: its own wall, if it has
            # one, is then recorded as any run's; an answer shows the version does not swap.
            swap, untaken = False, state.version or "unknown"
            session.bound().warning("live move not taken by the CLI, moving by restart", cli_version=untaken)
            _finish(session)
            continue
        _measured(session, state, swap, untaken)
        if (current := session.run).resume:  # a move's transcript, measured (one made in flight too)
            measured = state.session_id if session.afresh and current is run else current.resume
            resumed = str(transcript_path(Path(), job.cwd, measured or current.resume))
            store.transcript_after(current.id, session.credential.size_of(resumed))
        if (following := _after_turn(session, account, state)) is None:
            return
        swap = following.is_move and following.account != current.account and not session.config.gateway
        session.go_on(following)
        untaken = None
        account = _account(session)


def _after_turn(session: _Session, account: Account | None, state: StreamState) -> Run | None:
    """The run the same CLI goes on with: a follow-up after an answer, or a live move after a
    wall, once held. None when the current run has settled for good (or was let go)."""
    config, store, run = session.config, session.store, session.run
    if state.ended and state.outcome()[0] is Outcome.DONE and (follow := _follow_up(session, state)):
        return follow
    if state.ended and state.wall is not None and _holds(session, account, state):
        held_until = time.time() + config.live_wait
        _settle(config, store, run, state, None, held_until=held_until)
        tell_daemons(config, run.id, "ended")
        if (handed := _hold(session, held_until)) is not None:
            session.bound().info("session moved live", to=handed.account, session=run.session_id, next_run=handed.id)
        return handed
    code = _finish(session)
    state.stderr = session.output.stderr()  # (its reader has joined: the tail is whole)
    if session.cancelled.is_set():
        store.settle(run.id, RunState.CANCELLED, "cancelled while it ran")
        session.bound().info("session cancelled", session=state.session_id)
    else:
        _settle(config, store, run, state, code)
    return None


def _prompt(session: _Session) -> str:
    """The current run's prompt: a follow-up's text, else the resume prompt for a session it
    resumes (with the job's prompt before it if the CLI dropped that: `_prompt_lost`), else the job's."""
    run, config, job = session.run, session.config, session.job
    if run.prompt:
        return run.prompt
    if not run.resume or session.afresh:
        return job.prompt
    return f"{job.prompt}\n\n{config.resume_prompt}" if _prompt_lost(session) else config.resume_prompt


def _never_on_disk(session: _Session) -> bool:
    """The session the current run resumes has no transcript (or an empty one) and no run of the
    job was ever answered: its CLI was killed between saying its session id and writing the
    prompt. Nothing of it was kept or answered, so starting afresh loses nothing and runs nothing
    twice; `--resume` would only fail (`No conversation found`)."""
    run = session.run
    if session.turn_began or session.process is not None or run.prompt or run.live:
        return False
    if session.store.answered_before(run.id):
        return False
    session.bound().warning("the session to resume never reached the disk: starting it afresh", session=run.resume)
    return True


def _prompt_lost(session: _Session) -> bool:
    """A session whose first prompt walled under a token the CLI had from its environment loses
    that prompt on `--resume` (docs/claude-code.md, fact 14): no earlier run of it was ever
    answered, and the previous one was on a token account."""
    run, store = session.run, session.store
    previous = store.previous_account(run.id)
    if run.live or previous is None or store.answered_before(run.id):
        return False
    read = read_account(_account_file(session.config, previous), previous)
    return read is not None and read[0].kind is CredentialKind.OAUTH_TOKEN


def _follow_up(session: _Session, state: StreamState) -> Run | None:
    """After a turn that ended well: the follow-up run (`cl send`) its CLI goes on with, if one
    waits; the run the turn was is done, its result written."""
    config, job, run = session.config, session.job, session.run
    follow = session.store.follow_up(run.id, lambda run_id: str(log_path(config, job.id, run_id)))
    if follow is None:
        return None
    _record(config, session.store, run, state, None)
    session.output.use(log_path(config, job.id, follow.id))
    session.bound().info("follow-up sent in place", session=state.session_id, next_run=follow.id)
    return follow


def _start(session: _Session, account: Account | None) -> bool:
    """Start the session's CLI for the current run; False (the run failed) if it did not start."""
    config, job, run, cli = session.config, session.job, session.run, session.cli
    bound = session.bound()
    assert session.cwd is not None
    config_dir = session_config_dir(config, job.id)
    if config.cli_network == "host" and config.confinement == "sandbox":
        bound.warning("cli_network = host: the CLI reaches every address this host reaches, loopback included")
    opened = None
    try:
        with cli.acting():  # its own config dir, as the CLI's user opens it: no link followed
            opened = sandbox.open_directory(str(config_dir))
        if config.gateway:
            _give_capability(session)
        launch = cli_start.Launch(
            claude_argv(config, job, None if session.afresh else run.resume),
            cli_environment(config, account, cli, config_dir),
            cli,
            (session.cwd, job.cwd),
            (opened, str(config_dir)),
            session.locks,
        )
        connected, session.starter = session.starter, None
        process = CliProcess(
            cli_start.start(config, launch, connected),
            cli=cli,
            events=session.events,
            output=session.output,
            # between events too: another session's refresh must reach this CLI before it refreshes
            on_quiet=functools.partial(_sync, session) if session.oauth else None,
        )
        session.started(process)
    except (cli_start.StartRefused, OSError, ValueError, subprocess.SubprocessError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        if session.capability is not None:
            session.store.revoke_capability(session.capability)
            session.capability = None
        session.store.settle(run.id, RunState.FAILED, f"cannot start {config.claude_bin}: {reason}")
        bound.error("cli did not start", error=reason, cwd=job.cwd)
        return False
    finally:
        if opened is not None:
            os.close(opened)
    return True


def _open_cwd(session: _Session) -> int:
    """The job's directory, opened once as the CLI's user with no symlink followed on the way,
    and checked (`cl.workdir`) as what was opened: every start of its CLI enters that descriptor,
    whatever becomes of the path. Raises RunRefused or WorkdirRefused."""
    job, cli = session.job, session.cli
    writer = workdir.Writer(f"the CLI's user {cli.name}", cli.uid, cli.groups())
    with cli.acting():  # as the CLI's user sees the path
        cwd = workdir.check_for_job(session.config, job.cwd, [writer])
        if cwd != job.cwd:
            raise RunRefused(f"{job.cwd}: it now resolves to {cwd}; the job runs only where it was submitted")
        try:
            fd = sandbox.open_directory(job.cwd)
        except OSError as exc:
            raise RunRefused(f"{job.cwd}: {exc.strerror}; the job runs only where it was submitted") from None
    opened, there = os.fstat(fd), os.stat(cwd)
    if (opened.st_dev, opened.st_ino) != (there.st_dev, there.st_ino):
        os.close(fd)
        raise RunRefused(f"{job.cwd}: it changed while it was opened; the job runs only where it was submitted")
    return fd


def _give_capability(session: _Session) -> None:
    """A new capability for the CLI about to start: its digest in the store naming the run, the
    capability itself as the access token of the CLI's `.credentials.json`, and nowhere else."""
    held = capability.new()
    redact.remember(held)
    session.capability = capability.digest(held)
    session.store.issue_capability(session.capability, session.run.id)
    session.credential.install(capability.credential_file(held))


def _sync(session: _Session) -> None:
    """The credential copy and the current run's account file in step (a refreshed token, either way)."""
    if session.oauth:
        session.credential.sync(session.account_file, session.run.account)


def _turn(session: _Session) -> StreamState:
    """Read the CLI's output until the turn's `result` (`ended`) or the end of its output."""
    store, run = session.store, session.run
    state = StreamState()
    while (item := session.events.get()) is not Event.EOF:
        if item is Event.WAKE:
            _moved_in_flight(session)  # a move taken while holding is handled there
            continue
        _sync(session)
        line = item.decode(errors="replace")
        session.output.write(line)
        known, answered = state.session_id, state.answered
        state.feed(line)
        if state.session_id and state.session_id != known:
            if store.set_session(session.run.id, state.session_id):
                resumed = run.resume and not session.afresh
                session.bound().info("session resumed" if resumed else "session started", session=state.session_id)
            else:
                session.bound().warning("the CLI reported another job's session id, not taken", said=state.session_id)
                state.session_id = known
        if state.answered and not answered:
            _answered(session.config, store, session.run, session.bound())
        if state.ended:
            return state
    session.events.put(Event.EOF)  # for `_finish`
    return state


def _moved_in_flight(session: _Session) -> None:
    """The rescuer moved the session while its request waited at the gateway (`move-now`): the
    same CLI goes on, as the run that move made, on the new account (its capability went with it)."""
    if session.capability is None:
        return
    while (after := session.store.successor(session.run.id)) is not None:
        if after.resume:  # as the turn began: the moved request may have been answered already
            session.store.transcript_before(after.id, session.turn_began)
        session.bound().info("session moved live", to=after.account, session=after.resume, next_run=after.id)
        session.output.use(log_path(session.config, session.job.id, after.id))
        session.go_on(after)


def _finish(session: _Session) -> int:
    """End the CLI (end of input) and read what it still says; its exit code."""
    assert session.process is not None
    code = session.process.close()
    if session.process.stopped:
        session.bound().warning(
            "the CLI went on after its last turn (background tasks), stopped", pid=session.process.pid
        )
    while (item := session.events.get()) is not Event.EOF:
        if isinstance(item, bytes):
            session.output.write(item.decode(errors="replace"))
    session.process.join()
    _sync(session)
    session.started(None)
    if session.capability is not None:
        session.store.revoke_capability(session.capability)
        session.capability = None
    return code


def _unconfirmed(state: StreamState) -> bool:
    """A live move's first turn (to another account) walled before any answer: whose wall it was
    is unknown. Whatever was recorded of the version: that record comes from what CLIs print, and
    a hostile one must not make another session's old-account wall count against a new account."""
    return state.ended and state.wall is not None and not state.answered


def _holds(session: _Session, account: Account | None, state: StreamState) -> bool:
    """Whether a walled turn's CLI is kept alive for a live move: `live_wait` not 0, and the CLI
    holds a capability (gateway mode), or an account's credential file (a variable cannot change
    under a running process) with a CLI version not measured to keep its first credential."""
    if session.config.live_wait <= 0 or session.cancelled.is_set():
        return False
    if session.capability is not None:
        return True  # the CLI holds a capability, not a credential: nothing in it has to change
    if account is None or account.kind is not CredentialKind.OAUTH:
        return False
    return state.version is not None and session.store.swaps(state.version) is not False


def _measured(session: _Session, state: StreamState, swap: bool, untaken: str | None) -> None:
    """What a live move to another account showed of the CLI's version, once an answer settles
    it: the new credential was taken (`swap`), or (the restart after it answered) it was not."""
    if not state.answered:
        return
    if untaken is not None:
        session.store.record_swap(untaken, swaps=False)
    elif swap and state.version is not None and session.store.swaps(state.version) is None:
        session.store.record_swap(state.version, swaps=True)


def _hold(session: _Session, until: float) -> Run | None:
    """Keep the walled session's CLI alive, idle, until a live move is handed over (claimed: the
    next run), `until` passes, the CLI ends or the job is cancelled (None: let go)."""
    store, run = session.store, session.run
    session.bound().info("session held for a live move", until=iso_utc(until))
    while True:
        try:
            item = session.events.get(timeout=max(0.0, until - time.time()))
        except queue.Empty:
            item = None  # the wait is over
        if isinstance(item, bytes):  # output while idle: kept, nothing to act on
            session.output.write(item.decode(errors="replace"))
            continue
        if item is Event.EOF:  # the CLI ended: nothing goes on in it (a move handed over is abandoned)
            store.release(run.id)
            session.events.put(Event.EOF)  # for `_finish`
            return None
        going = item is Event.WAKE and not session.cancelled.is_set()
        # Let go when the wait is over, unless a move was handed over meanwhile: that one is taken.
        handed = store.handed_over(run.id) if going else store.release(run.id)
        if handed is not None and not session.cancelled.is_set() and (claimed := _claim(session, handed)):
            return claimed
        if not going:
            return None


def _claim(session: _Session, run: Run) -> Run | None:
    """Claim the live move handed to this worker, in its own epoch (refused if the session has
    changed hands meanwhile)."""
    path = log_path(session.config, session.job.id, run.id)
    me = os.getpid()
    lease, epoch = session.config.run_lease, session.run.epoch
    claimed = session.store.claim(run.id, me, start_time(me) or "", str(path), lease=lease, epoch=epoch)
    if claimed is not None:
        session.output.use(path)
    return claimed


def _refused(store: Store, run: Run, reason: str, bound: Any) -> RunState:
    store.settle(run.id, RunState.FAILED, reason)
    bound.error("session failed", error=reason)
    return RunState.FAILED


def _bench(config: Config, store: Store, run: Run, reason: str, bound: Any) -> RunState:
    """As when the CLI says its credentials are refused: the account is benched for `wall_retry`,
    and the session goes to the rescuer (a fresh job back to the queue)."""
    reset = time.time() + config.wall_retry
    store.record_wall(run.account, "worker", reset, "unauthorized")
    store.settle(run.id, RunState.WALLED, reason)
    bound.warning("credentials refused", retry_at=iso_utc(reset), error=reason)
    return RunState.WALLED


def _reason(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return str(exc)


def _cli_user(config: Config, config_dir: Path, bound: Any) -> cli_user.Slot:
    """Who the job's CLI runs as: with `confinement = "sandbox"`, a free member of the pool (the
    one that owns the job's config dir, if free), waiting up to `session_lock_wait` seconds for
    one; with "none", the worker's own user, said at every start. Raises CliUserError or
    SandboxUnavailable when the sandbox cannot hold here: the CLI never runs with less."""
    if config.confinement == "none":
        bound.warning("confinement = none: the CLI runs unconfined, as the worker's own user")
        return cli_user.Slot(CliUser.own(), None)
    if not cli_user.can_switch_users():
        raise CliUserError(
            "confinement = 'sandbox' needs a worker that may switch users (root, or a cl-worker@ unit);"
            " set confinement = 'none' to run the CLI unconfined"
        )
    sandbox.bwrap()
    try:
        owner: int | None = os.lstat(config_dir).st_uid
    except FileNotFoundError:
        owner = None
    take = functools.partial(cli_user.take, config.cli_pool, config.cli_pool_size, config.state_dir / "pool", owner)
    waiting = "every CLI user is taken, waiting for one"
    if (slot := _within(config.session_lock_wait, take, bound, waiting, cli_pool_size=config.cli_pool_size)) is None:
        raise CliUserError(f"all {config.cli_pool_size} of the CLI's users are taken (cli_pool_size)")
    return slot


def _ready_config_dir(config: Config, job_id: int, cli: CliUser, *, first: bool) -> JobCredential:
    """The job's config dir, given to the CLI's user. The sessions dir is the worker's (0710, group
    `cli_pool`: the pool's users may pass, and only into their own). A job's first run finding one
    already there finds another store's job of that number (the state store was made anew): that
    one is set aside, never reused, credential copy included."""
    sessions = config.sessions_dir
    if not sessions.is_dir():
        sessions.mkdir(parents=True, mode=0o710, exist_ok=True)
        os.chown(sessions, -1, cli.gid)
    config_dir = session_config_dir(config, job_id)
    if first and os.path.lexists(config_dir):
        aside = config_dir.with_name(f"{config_dir.name}.earlier-{time.time_ns()}")
        os.rename(config_dir, aside)
        log.warning("an earlier job's session files set aside", job=job_id, kept=str(aside))
    with contextlib.suppress(FileExistsError):
        config_dir.mkdir(mode=0o700)
    cli_user.adopt(config_dir, cli)
    return JobCredential(config_dir, cli, credential_mark_path(config, job_id))


def _account(session: _Session) -> Account | None:
    """The run's account as its file says now, with the job's credential copy made to match.
    What the previous run's CLI left in the copy first goes back to that run's account. None in
    gateway mode for an account another live host of the fleet serves: its gateway holds the file."""
    run, credential, config = session.run, session.credential, session.config
    previous = session.store.previous_account(run.id)
    if not config.gateway and previous is not None and previous != run.account:
        credential.carry_back(_account_file(config, previous), previous)
    read = read_account(session.account_file, run.account)
    if (
        read is None
        and config.reaches_fleet
        and session.store.homes(config.host_name, fleet.stale_after(config), run.account)
    ):
        return None
    if read is None:
        raise AccountUnusable(f"account {run.account} cannot be used: its credential file is gone")
    account = read[0]
    if not account.usable:
        raise AccountUnusable(f"account {run.account} cannot be used: {account.reason or account.state}")
    if config.gateway:
        return account  # the CLI's credential is its capability, whatever the account
    session.oauth = account.kind is CredentialKind.OAUTH
    if session.oauth:
        credential.sync(session.account_file, run.account)
    else:
        credential.remove()
    return account


def _account_file(config: Config, account: str) -> Path:
    return config.credentials_dir / credential_filename(account)


def _theirs(said: str) -> str:
    """The CLI's words as a run's reason: decoded already, stored scrubbed, and never taken for
    cl's own reason for an early move (`MOVED_EARLY`, which a CLI could print to disguise a wall)."""
    said = redact.scrub(said)
    return f"the CLI said: {said}" if said.lower().startswith(MOVED_EARLY) else said


def _settle(
    config: Config, store: Store, run: Run, state: StreamState, code: int | None, *, held_until: float | None = None
) -> RunState:
    """Write what the run said: usage, a wall (or refused credentials), the outcome; with
    `held_until`, that its CLI is held alive for a live move until then."""
    bound = log.bind(job=run.job_id, run=run.id, account=run.account, session=state.session_id)
    outcome, error = _record(config, store, run, state, code)
    final = _RUN_STATE[outcome]
    store.settle(run.id, final, error, held_until=held_until)
    if final is RunState.DONE:
        if not state.answered:
            _answered(config, store, run, bound)
        bound.info("session done")
    elif final is RunState.FAILED:
        bound.error("session failed", exit_code=code, error=error)
    return final


def _record(config: Config, store: Store, run: Run, state: StreamState, code: int | None) -> tuple[Outcome, str | None]:
    """Write what a turn said (its result, usage, a wall or refused credentials); its outcome."""
    bound = log.bind(job=run.job_id, run=run.id, account=run.account, session=state.session_id)
    outcome, said = state.outcome(code)
    error = _theirs(said) if said else said
    if state.result is not None:
        store.record_result(run.id, redact.scrub(json.dumps(_kept(state.result))))
    if config.gateway:  # usage and walls are the gateway's to record, from the API's headers
        if state.usage:
            store.record_usage(run.account, {}, time.time(), _tokens(state.usage))
        if outcome is Outcome.UNAUTHORIZED:
            return Outcome.FAILED, f"the CLI's requests were refused: {error}"
        return outcome, error
    if state.utilization or state.usage:
        store.record_usage(run.account, state.utilization, time.time(), _tokens(state.usage))
    if (wall := state.wall) is not None:
        # No reset in the output (API-key walls): try again after `wall_retry`, never "forever". The
        # CLI's output says when: it may bench its own account no longer than the longest real
        # window (a week), whatever it prints.
        reset = wall.reset_at.timestamp() if wall.reset_at else time.time() + config.wall_retry
        reset = min(reset, time.time() + MAX_WALL)
        store.record_wall(run.account, wall.source, reset, wall.kind)
        bound.warning("wall recorded", resets=iso_utc(reset), known_reset=bool(wall.reset_at))
    elif outcome is Outcome.UNAUTHORIZED:
        # The file changed or its token was revoked under us: bench the account for `wall_retry`
        # (so no session bounces on it) and let the rescuer take the session elsewhere.
        reset = time.time() + config.wall_retry
        store.record_wall(run.account, "cli", reset, "unauthorized")
        bound.warning("credentials refused", retry_at=iso_utc(reset))
    return outcome, error


def _unless_the_api_said_so(session: _Session, state: StreamState) -> None:
    """In gateway mode a wall is the API's word, which the gateway records: a wall the CLI claims
    stands only if the store holds the account walled, or the gateway itself answered one of this
    turn's requests as a wall (its home cut off). Otherwise it only ends the CLI's turn (a
    failure): it walls nothing and moves nothing."""
    if (
        session.capability is None
        or state.wall is None
        or session.store.walled_for(session.run.account, session.job.model)
    ):
        return
    config, store = session.config, session.store
    if config.reaches_fleet and store.walled_by_gateway(session.job.id, session.turn_at):  # its own, this turn
        home = "its home host cannot be reached from this host; the session waits for it or another account"
        state.wall = dataclasses.replace(state.wall, message=f"account {session.run.account}: {home}")
        return
    session.bound().warning("the CLI reported a wall the API did not send", said=state.wall.message)
    state.wall = None


def _hold_session(config: Config, job_id: int, bound: Any) -> int | None:
    """Lock the session for this worker and its CLI: one live process per session, ever; None if
    it is still held after `session_lock_wait` seconds.

    The lock file lives in the state dir, where the CLI cannot plant anything; the CLI inherits
    the locked descriptor (read-only), so the lock outlives a worker killed before its CLI. A
    worker that finds it held waits, a bounded time, for the earlier process to exit (it got
    PDEATHSIG, and what it left running ends with it: see `_end_the_tree`).
    """
    path = lock_path(config, job_id)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    waiting = "waiting for the session's previous process to exit"
    if _within(config.session_lock_wait, lambda: fd if _locked(fd) else None, bound, waiting) is None:
        os.close(fd)
        return None
    return fd


def _within(seconds: float, attempt: Callable[[], T | None], bound: Any, waiting: str, **fields: Any) -> T | None:
    """What `attempt` gives, trying again every `LOCK_POLL` seconds for up to `seconds` (`waiting`
    said once if the first try gives nothing); None if it never does."""
    if (got := attempt()) is not None:
        return got
    bound.warning(waiting, at_most=seconds, **fields)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(LOCK_POLL)
        if (got := attempt()) is not None:
            return got
    return None


def _locked(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _on_terminate(session: _Session) -> Callable[[int, Any], None]:
    """SIGTERM: if the job was cancelled (`cl cancel`), stop the CLI, its whole tree, and let the
    run end as cancelled (a held session is let go); otherwise (a service manager stopping us)
    end as before, the session left to be resumed."""

    def handler(signum: int, _frame: Any) -> None:
        job = session.store.get_job(session.job.id)
        if job is None or job.state != JobState.CANCELLED:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        session.cancelled.set()
        if session.process is not None:
            session.process.stop()
        session.events.put(Event.WAKE)

    return handler


def _answered(config: Config, store: Store, run: Run, bound: Any) -> None:
    """The account answered: the store notes it (lifting a reset wall), both daemons hear of it."""
    if (lifted := store.answered(run.id)) is not None:
        bound.info("wall lifted", account=lifted)
    tell_daemons(config, run.id, "answered")


def tell_daemons(config: Config, run_id: int, event: str) -> None:
    for daemon in ("balancer", "rescue"):
        tell(config.socket_path(daemon), {"request": "run-changed", "run": run_id, "event": event})


def cli_environment(config: Config, account: Account | None, cli: CliUser, config_dir: Path) -> dict[str, str]:
    """The worker's environment for the CLI: what of the daemon's is allowed (`passed`), the
    account's credential variable if it has one, and the CLI's own home (its config dir)."""
    base = {k: v for k, v in os.environ.items() if passed(k, config.cli_env_keep)}
    if config.gateway:  # the capability in its config dir is its credential; the gateway its API
        env = worker_environment(base, None, str(config_dir), config.worker_env)
        env["ANTHROPIC_BASE_URL"] = f"http://{config.gateway_listen}"
    else:
        env = worker_environment(base, account, str(config_dir), config.worker_env)
    env["HOME"] = str(config_dir)
    if cli.separate:
        env["USER"] = env["LOGNAME"] = cli.name
    return env


def _kept(result: dict[str, Any]) -> dict[str, Any]:
    """What of a result event is stored: its known fields, its texts cut to `MAX_RESULT_TEXT`, so
    that what the CLI prints cannot grow the store without bound."""
    kept = {key: value for key in RESULT_FIELDS if _plain(value := result.get(key))}
    if isinstance(text := result.get("result"), str):
        kept["result"] = text[:MAX_RESULT_TEXT]
    if isinstance(errors := result.get("errors"), list):
        kept["errors"] = [str(error)[:500] for error in errors[:5]]
    input_tokens, output_tokens = _tokens(result.get("usage") if isinstance(result.get("usage"), dict) else None)
    kept["usage"] = {"input_tokens": input_tokens, "output_tokens": output_tokens}
    return kept


def _plain(value: Any) -> bool:
    """A short string, or a number JSON can carry (not NaN, not infinite)."""
    if isinstance(value, str):
        return len(value) <= MAX_FIELD
    return isinstance(value, int | float) and math.isfinite(value)


def _tokens(usage: dict[str, Any] | None) -> tuple[int, int]:
    def count(key: str) -> int:  # what the CLI printed, bounded: the store's integers are 64-bit
        value = (usage or {}).get(key)
        return min(max(value, 0), MAX_TOKENS) if isinstance(value, int) and not isinstance(value, bool) else 0

    return count("input_tokens") + count("cache_read_input_tokens") + count("cache_creation_input_tokens"), count(
        "output_tokens"
    )


def run(run_id: int, handed: socket.socket | None = None) -> int:
    """Be the worker for `run_id`, configured from the environment; the exit code. `handed`: a
    connection to the CLI's starter its launcher made for it."""
    if (config := logs.start_process("worker")) is None:
        return 2
    starter = cli_start.connect(config, handed)  # first: the starter readies itself meanwhile
    store, lock = patiently(Store, config.database, config.store_busy_timeout), threading.RLock()
    last = work(config, Patient.of(store, lock), run_id, renewing(store, lock), starter)
    with lock:
        store.close()
    tell_daemons(config, last.id if last else run_id, "ended")
    return 0


def _accept_from_socket() -> tuple[int, socket.socket | None]:
    """`--from-socket` (a `cl-worker@` unit): the run named on the connection, from a peer that
    is root or our own user, and the connection to the CLI's starter it may hand with it; our pid
    goes back. Nothing else is taken from the peer."""
    with socket.socket(fileno=os.dup(0)) as connection:
        _pid, uid, _gid = struct.unpack("3i", connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        if uid not in (0, os.getuid()):
            print(f"cl-worker: refused a launch from uid {uid}", file=sys.stderr)
            sys.exit(2)
        line, handed = _request_line(connection)
    request = json.loads(line)
    run_id = request["run"]
    if not isinstance(run_id, int) or isinstance(run_id, bool):
        raise TypeError("run must be a run id")
    sys.stdout.write(json.dumps({"pid": os.getpid()}) + "\n")
    sys.stdout.flush()
    os.close(1)  # the launcher is done with us; our output goes to the journal
    os.dup2(2, 1)
    return run_id, handed


def _request_line(connection: socket.socket) -> tuple[bytes, socket.socket | None]:
    """The launch request's line, and the one connection (a sequential-packet Unix socket) it may
    carry; any other descriptor is closed."""
    line, handed = b"", None
    while not line.endswith(b"\n") and len(line) < MAX_LAUNCH_REQUEST:
        data, fds, _flags, _ = socket.recv_fds(connection, MAX_LAUNCH_REQUEST, 1, socket.MSG_CMSG_CLOEXEC)
        if not data:
            break
        line += data
        for fd in fds:
            given = socket.socket(fileno=fd)
            if handed is None and (given.family, given.type) == (socket.AF_UNIX, socket.SOCK_SEQPACKET):
                handed = given
            else:
                given.close()
    return line, handed


def main() -> None:
    try:
        run_id, handed = _accept_from_socket() if sys.argv[1:] == ["--from-socket"] else (int(sys.argv[1]), None)
    except (IndexError, ValueError, KeyError, TypeError):
        print("usage: cl-worker RUN_ID | cl-worker --from-socket (a request on stdin)", file=sys.stderr)
        sys.exit(2)
    sys.exit(run(run_id, handed))


if __name__ == "__main__":
    main()
