"""`cl-worker RUN`: one supervised `claude` process for one run of a job.

A daemon (the balancer placing a job, the rescuer moving a session) writes the run (`starting`)
and launches this process detached, so that a daemon restart neither kills it nor loses it: the
worker claims its run in the store (`starting` -> `running`, with its pid and start time), or
exits at once if the run was abandoned meanwhile, so a run never executes twice. It locks the
job's config dir (the CLI inherits the lock: one live process per session), then runs the CLI
in the job's cwd with `CLAUDE_CONFIG_DIR` = that dir, whose `.credentials.json` is a symlink to
the account's credential file (token and API-key accounts come through the environment
instead; a token the CLI refreshes is carried back to the account's file, see `cl.refresh`).
The CLI gets PDEATHSIG (if the worker dies, so does its CLI, and the run is found
orphaned rather than running unseen) and a Landlock ruleset (it writes only where its job
lives). The worker keeps the whole output in a log file, reads the stream as it arrives
(session id, usage, utilization, the first answer, a wall), writes the outcome, and tells
both daemons.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from cl import landlock, logs, refresh
from cl.claude_code.stream import Outcome, StreamState
from cl.client import tell
from cl.config import Config
from cl.forkserver import ForkServer
from cl.processes import start_time
from cl.store import Job, Run, RunState, Store, iso_utc

log = structlog.get_logger("cl.worker")

PR_SET_PDEATHSIG = 1
FORK_SERVER = ForkServer()
_RUN_STATE = {
    Outcome.DONE: RunState.DONE,
    Outcome.FAILED: RunState.FAILED,
    Outcome.WALLED: RunState.WALLED,
    Outcome.UNAUTHORIZED: RunState.WALLED,
}


def session_config_dir(config: Config, job_id: int) -> Path:
    """The job's own Claude Code config dir: its transcript lives here whatever the account."""
    return config.state_dir / "sessions" / f"job-{job_id}"


def log_path(config: Config, job_id: int, run_id: int) -> Path:
    return config.state_dir / "logs" / f"job-{job_id}-run-{run_id}.log"


def launch(run_id: int, env: dict[str, str], socket_path: Path) -> int:
    """Start a worker for `run_id` that outlives the launcher; its pid.

    Under systemd, `cl-worker.socket` listens at `socket_path` (Accept=yes): a connection makes
    systemd start a `cl-worker@` unit with its own sandbox (network, write access), which reads
    `{"run", "env"}` and answers `{"pid"}`. Without it (tests, `make run`) the fork server forks
    the worker, in a session of its own. Either way the launcher learns of its end through a pidfd.
    """
    if socket_path.is_socket():
        return _launch_by_socket(run_id, env, socket_path)
    return FORK_SERVER.spawn(run_id, env)


def prepare_launches(socket_path: Path) -> None:
    """Have the fork server imported before the first launch needs it (no-op under systemd)."""
    if not socket_path.is_socket():
        FORK_SERVER.start()


def _launch_by_socket(run_id: int, env: dict[str, str], socket_path: Path) -> int:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(socket_path))
        sock.sendall(json.dumps({"run": run_id, "env": env}).encode() + b"\n")
        reply = sock.makefile("rb").readline()
    return int(json.loads(reply)["pid"])


def _accept_from_socket() -> tuple[int, dict[str, str]]:
    """`--from-socket`: the run and environment the launcher sent on stdin; our pid goes back."""
    request = json.loads(sys.stdin.buffer.readline())
    sys.stdout.write(json.dumps({"pid": os.getpid()}) + "\n")
    sys.stdout.flush()
    os.close(1)  # the launcher is done with us; our output goes to the journal
    os.dup2(2, 1)
    own = {k: v for k, v in os.environ.items() if k in ("JOURNAL_STREAM", "INVOCATION_ID")}
    return int(request["run"]), {**request["env"], **own}


def claude_argv(config: Config, job: Job, run: Run) -> list[str]:
    prompt = config.resume_prompt if run.resume else job.prompt
    argv = [config.claude_bin, "-p", prompt, "--output-format", "stream-json", "--verbose"]
    if job.model:
        argv += ["--model", job.model]
    if job.max_turns:
        argv += ["--max-turns", str(job.max_turns)]
    if run.resume:
        argv += ["--resume", run.resume]
    return argv + list(config.claude_args)


def _cli_preexec(writable: list[str], landlock_abi: int) -> Callable[[], None]:
    """Between fork and exec of the CLI: die with the worker; write only beneath `writable`."""

    def preexec() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if landlock_abi:
            landlock.confine_writes(writable, landlock_abi)

    return preexec


def work(config: Config, store: Store, run_id: int) -> RunState | None:
    """Claim and execute one run; its final state, or None if it was not ours to run."""
    run = store.run(run_id)
    job = store.job(run.job_id) if run else None
    if run is None or job is None:
        log.error("no such run", run=run_id)
        return None
    path = log_path(config, job.id, run.id)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    me = os.getpid()
    if store.claim(run.id, me, start_time(me) or "", str(path)) is None:
        log.info("run not claimable, leaving it", run=run.id, job=job.id)
        return None
    bound = log.bind(job=job.id, run=run.id, account=run.account)
    config_dir = session_config_dir(config, job.id)
    lock = _hold_session(config_dir, bound)
    linked = (config_dir / refresh.LINK).is_symlink()  # an OAuth account: its file, through the link
    refresh.claim(config_dir, config.credentials_dir, run.account if linked else None)
    if not os.path.isdir(job.cwd):
        store.settle(run.id, RunState.FAILED, f"working directory {job.cwd} does not exist (or is not visible here)")
        bound.error("session failed", error="no working directory", cwd=job.cwd)
        return RunState.FAILED
    ran = _run_cli(config, store, job, run, path, lock=lock)
    if ran is None:
        return RunState.FAILED
    return _settle(config, store, run, *ran)


def _settle(config: Config, store: Store, run: Run, state: StreamState, code: int) -> RunState:
    """Write what the run said: usage, a wall (or refused credentials), the outcome."""
    bound = log.bind(job=run.job_id, run=run.id, account=run.account, session=state.session_id)
    outcome, error = state.outcome(code)
    if state.utilization or state.usage:
        store.record_usage(run.account, state.utilization, time.time(), _tokens(state.usage))
    if (wall := state.wall) is not None:
        # No reset in the output (API-key walls): try again after `wall_retry`, never "forever".
        reset = wall.reset_at.timestamp() if wall.reset_at else time.time() + config.wall_retry
        store.record_wall(run.account, wall.source, reset, wall.kind)
        bound.warning("session walled", resets=iso_utc(reset), known_reset=bool(wall.reset_at))
    elif outcome is Outcome.UNAUTHORIZED:
        # The file changed or its token was revoked under us: bench the account for `wall_retry`
        # (so no session bounces on it) and let the rescuer take the session elsewhere.
        reset = time.time() + config.wall_retry
        store.record_wall(run.account, "cli", reset, "unauthorized")
        bound.warning("credentials refused", retry_at=iso_utc(reset))
    final = _RUN_STATE[outcome]
    store.settle(run.id, final, error)
    if final is RunState.DONE:
        if not state.answered:
            _answered(config, store, run, bound)
        bound.info("session done")
    elif final is RunState.FAILED:
        bound.error("session failed", exit_code=code, error=error)
    return final


def _hold_session(config_dir: Path, bound: Any) -> int:
    """Lock the job's config dir for this worker and its CLI: one live process per session, ever.

    The CLI inherits the locked descriptor, so the lock outlives a worker killed before its CLI.
    A worker that finds it held waits for the earlier process to exit (it got PDEATHSIG).
    """
    config_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(config_dir / ".session.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        bound.warning("waiting for the session's previous process to exit")
        fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _answered(config: Config, store: Store, run: Run, bound: Any) -> None:
    """The account answered: the store notes it (lifting a reset wall), both daemons hear of it."""
    if (lifted := store.answered(run.id)) is not None:
        bound.info("wall lifted", account=lifted)
    tell_daemons(config, run.id, "answered")


def tell_daemons(config: Config, run_id: int, event: str) -> None:
    for daemon in ("balancer", "rescue"):
        tell(config.socket_path(daemon), {"request": "run-changed", "run": run_id, "event": event})


def _run_cli(
    config: Config, store: Store, job: Job, run: Run, path: Path, *, lock: int
) -> tuple[StreamState, int] | None:
    """Run the CLI, keeping its output and reading it as it comes; None if it did not start."""
    bound = log.bind(job=job.id, run=run.id, account=run.account)
    config_dir = session_config_dir(config, job.id)
    state = StreamState()
    # Not the account's file: a refreshed token lands in the config dir (see cl.refresh).
    writable = [job.cwd, str(config_dir), "/tmp", "/dev", *config.cli_writable]  # noqa: S108
    if not (landlock_abi := landlock.abi()):
        bound.warning("no Landlock in this kernel: the CLI may write wherever the worker can")
    with path.open("ab") as output:
        try:
            claude = subprocess.Popen(
                claude_argv(config, job, run),
                cwd=job.cwd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=output,
                pass_fds=(lock,),
                preexec_fn=_cli_preexec(writable, landlock_abi),  # noqa: PLW1509 - syscalls only, no locks taken
            )
        except (OSError, subprocess.SubprocessError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else str(exc)
            store.settle(run.id, RunState.FAILED, f"cannot start {config.claude_bin}: {reason}")
            bound.error("cli did not start", error=reason, cwd=job.cwd)
            return None
        assert claude.stdout is not None
        answered = False
        for raw in claude.stdout:
            output.write(raw)
            output.flush()
            known = state.session_id
            state.feed(raw.decode(errors="replace"))
            if state.session_id and state.session_id != known:
                store.set_session(run.id, state.session_id)
                bound.info("session resumed" if run.resume else "session started", session=state.session_id)
            if state.answered and not answered:
                answered = True
                _answered(config, store, run, bound)
            refresh.carry_back(config_dir, config.credentials_dir)  # a token refreshed: to the account
        code = claude.wait()
        refresh.carry_back(config_dir, config.credentials_dir)
        return state, code


def _tokens(usage: dict[str, Any] | None) -> tuple[int, int]:
    def count(key: str) -> int:
        value = (usage or {}).get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    return count("input_tokens") + count("cache_read_input_tokens") + count("cache_creation_input_tokens"), count(
        "output_tokens"
    )


def run(run_id: int) -> int:
    """Be the worker for `run_id`, configured from the environment; the exit code."""
    if (config := logs.start_process("worker")) is None:
        return 2
    store = Store(config.database, config.store_busy_timeout)
    work(config, store, run_id)
    store.close()
    tell_daemons(config, run_id, "ended")
    return 0


def main() -> None:
    try:
        if sys.argv[1:] == ["--from-socket"]:
            run_id, env = _accept_from_socket()
            os.environ.clear()
            os.environ.update(env)
        else:
            run_id = int(sys.argv[1])
    except (IndexError, ValueError, KeyError, TypeError):
        print("usage: cl-worker RUN_ID | cl-worker --from-socket (a request on stdin)", file=sys.stderr)
        sys.exit(2)
    sys.exit(run(run_id))


if __name__ == "__main__":
    main()
