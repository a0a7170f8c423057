"""cl-balancer end to end: real daemon, real workers, the fake `claude`, real SQLite and signals."""

from __future__ import annotations

import fcntl
import json
import random
import re
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from cl.client import exchange
from cl.states import RunState
from cl.store import Run, Store
from utils import (
    BIN,
    DaemonProcess,
    Layout,
    Planted,
    all_in,
    api_key_credential,
    both,
    cl,
    history,
    job_state_set,
    job_states,
    live_runs,
    oauth_credential,
    status,
    submit,
    wait_until,
    write_credential,
)


@pytest.fixture
def balancer(layout: Layout) -> Iterator[DaemonProcess]:
    daemon = DaemonProcess("balancer", layout).start()
    yield daemon
    daemon.stop()


@pytest.mark.usefixtures("balancer")
def test_jobs_run_to_done_and_show_in_status(layout: Layout, planted: Planted) -> None:
    write_credential(layout.credentials, "a1", oauth_credential(planted))
    write_credential(layout.credentials, "k1", api_key_credential(planted))
    jobs = [submit(layout, f"task {i}") for i in range(3)]
    wait_until(lambda: all_in(layout, "done", 3), "three jobs done")

    report = status(layout)
    assert set(report) == {"accounts", "sessions", "jobs", "queue", "hidden", "blocked", "ramping", "waiting", "fleet"}
    assert report["queue"] == 0
    assert [host["name"] for host in report["fleet"]["hosts"]] == [report["fleet"]["host"]]  # a fleet of one
    assert {a["name"] for a in report["accounts"]} == {"a1", "k1"}
    for account in report["accounts"]:
        assert {"name", "state", "walled_until", "sessions"} <= set(account)
        assert account["walled_until"] is None
    calls = layout.claude_calls()
    assert sorted(call["prompt"] for call in calls) == [f"task {i}" for i in range(3)]  # each exactly once
    kept = history(layout)  # done now: no longer live work, but kept
    assert report["sessions"] == report["jobs"] == []
    sessions = {s["job"]: s for s in kept["sessions"]}
    assert {s["session_id"] for s in sessions.values()} == {call["session_id"] for call in calls}
    for job in kept["jobs"]:
        assert set(job) >= {"id", "state", "account", "session_id"}
        assert sessions[job["id"]]["account"] == job["account"]
    for call in calls:  # every CLI run speaks stream-json both ways, in the job's cwd, the prompt on stdin
        assert call["argv"][:6] == [
            "-p",
            "--input-format",
            "stream-json",
            "--output-format",
            "stream-json",
            "--verbose",
        ]
        assert call["prompt"] not in call["argv"]
        assert call["cwd"] == str(layout.work)
    log = cl(layout, "logs", str(jobs[0]), "--raw")
    assert log.returncode == 0
    first = json.loads(log.stdout.splitlines()[0])
    assert (first["type"], first["subtype"]) == ("system", "init")
    text = cl(layout, "logs", str(jobs[0])).stdout.splitlines()  # as a person reads it
    assert text[0].startswith(f"── session {first['session_id']} (claude-fake, Claude Code 2.1.332-fake)")
    assert text[1].startswith("Hi from fake claude (n_messages=1")
    assert text[-1] == "── done, tokens 10/12"
    by_session = cl(layout, "logs", sessions[jobs[1]]["session_id"])
    assert by_session.stdout == cl(layout, "logs", str(jobs[1])).stdout, by_session.stderr
    by_prefix = cl(layout, "logs", sessions[jobs[1]]["session_id"][:8])  # as git takes a hash's start
    assert by_prefix.stdout == cl(layout, "logs", str(jobs[1])).stdout
    too_short = cl(layout, "logs", "abc")
    assert (too_short.returncode, "first 4 characters" in too_short.stderr) == (2, True)

    # The same, as tables for people (cl-rescue is not running here: said on stderr, still exit 0).
    table = cl(layout, "status")
    assert table.returncode == 0
    assert "cl-rescue is unreachable" in table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["ACCOUNT", "STATE", "SESSIONS"]
    assert sorted(line.split()[:3] for line in lines[1:3]) == [["a1", "ok", "0"], ["k1", "ok", "0"]]
    assert "0 job(s) queued" in lines
    rows = {line.split()[0]: line.split() for line in cl(layout, "sessions", "--all").stdout.splitlines()}
    assert rows.pop("SESSION") == ["SESSION", "JOB", "ACCOUNT", "STATE", "AGE", "CWD"]
    assert {row[1]: row[3] for row in rows.values()} == {str(job): "done" for job in jobs}
    rows = {line.split()[0]: line.split() for line in cl(layout, "jobs", "--all").stdout.splitlines()}
    assert rows.pop("JOB") == ["JOB", "STATE", "ACCOUNT", "SESSION", "CWD", "ERROR"]
    assert {job: row[1] for job, row in rows.items()} == {str(job): "done" for job in jobs}


@pytest.mark.usefixtures("balancer")
def test_a_session_id_that_starts_with_digits_is_found_by_its_start(layout: Layout, planted: Planted) -> None:
    """`cl logs 12345678` names job 12345678 if there is one, else the session whose id starts so."""
    write_credential(layout.credentials, "a1", oauth_credential(planted))
    job = submit(layout, "numbered")
    wait_until(lambda: all_in(layout, "done", 1), "the job to finish")
    store = Store(layout.database)
    try:
        (run,) = store.job_runs(job)
        store.set_session(run.id, "12345678-0000-4000-8000-000000000000")
    finally:
        store.close()
    by_job = cl(layout, "logs", str(job))
    by_prefix = cl(layout, "logs", "12345678")
    assert by_prefix.returncode == 0, by_prefix.stderr
    assert by_prefix.stdout == by_job.stdout != ""
    assert cl(layout, "logs", "7").returncode == 4  # a short number is a job id: no job 7


@pytest.mark.usefixtures("balancer")
def test_submit_refuses_bad_input_with_exit_2(layout: Layout) -> None:
    missing = cl(layout, "submit", "--cwd", str(layout.root / "nope"), "--prompt", "x")
    assert (missing.returncode, "no such directory" in missing.stderr) == (2, True)
    empty = cl(layout, "submit", "--cwd", str(layout.work), "--prompt", "  ")
    assert (empty.returncode, "the prompt is empty" in empty.stderr) == (2, True)
    unreadable = cl(layout, "submit", "--cwd", str(layout.work), "--prompt-file", str(layout.root / "none.txt"))
    assert unreadable.returncode == 2
    for size in (48 * 1024 + 1, 100 * 1024, 1024 * 1024):  # over the limit, over a request line, far over
        (layout.root / "huge.txt").write_text("é" * (size // 2) + "x" * (size % 2))  # two bytes a letter
        huge = cl(layout, "submit", "--cwd", str(layout.work), "--prompt-file", str(layout.root / "huge.txt"))
        said = f"cl: the prompt is {size:,} bytes; a job takes at most 49,152 bytes (48 KiB): put the rest in a file"
        assert (huge.returncode, said in huge.stderr) == (2, True), huge.stderr
    fits = layout.root / "fits.txt"
    fits.write_text("x" * (48 * 1024))
    assert cl(layout, "submit", "--cwd", str(layout.work), "--prompt-file", str(fits)).returncode == 0
    over = cl(layout, "send", "1", "y" * (48 * 1024 + 1))
    assert (over.returncode, "cl: the text is 49,153 bytes; a job takes at most" in over.stderr) == (2, True)
    over_the_line = exchange(
        layout.runtime / "balancer.sock",
        {"request": "submit", "cwd": str(layout.work), "prompt": "z" * (48 * 1024 + 1)},
    )
    assert json.loads(over_the_line)["error"] == '"prompt" is over 49152 bytes'  # a client that does not check


def test_waiting_jobs_go_to_a_credential_dropped_in(layout: Layout, planted: Planted, balancer: DaemonProcess) -> None:
    job = submit(layout, "wait for me")
    wait_until(lambda: "jobs waiting" in balancer.log(), "the balancer to say that jobs wait")
    assert status(layout)["queue"] == 1
    write_credential(layout.credentials, "a4", oauth_credential(planted))
    wait_until(lambda: job_states(layout) == {job: "done"}, "the job to run on the new account")
    assert history(layout)["jobs"][0]["account"] == "a4"


def test_a_wall_is_recorded_and_work_goes_elsewhere(layout: Layout, planted: Planted, balancer: DaemonProcess) -> None:
    walled_token = planted.token()
    write_credential(layout.credentials, "a1", oauth_credential(planted, token=walled_token))
    write_credential(layout.credentials, "a2", oauth_credential(planted))
    layout.quota({walled_token: 0})
    first = submit(layout, "hits the wall")  # a1 first: equal headroom, then the name
    wait_until(lambda: job_states(layout) == {first: "walled"}, "the first job to wall")
    accounts = {a["name"]: a for a in status(layout)["accounts"]}
    assert accounts["a1"]["walled_until"] is not None
    assert accounts["a2"]["walled_until"] is None
    rows = {line.split()[0]: line for line in cl(layout, "status").stdout.splitlines() if line.startswith("a")}
    assert re.fullmatch(
        r"a1\s+walled until \d{4}-\d\d-\d\d \d\d:\d\dZ \(in \d+m\d\ds\)\s+0.*", rows["a1"].replace(" (5h)", "")
    )
    second = submit(layout, "goes elsewhere")
    wait_until(lambda: job_states(layout).get(second) == "done", "the second job to finish")
    assert {job["id"]: job["account"] for job in history(layout)["jobs"]} == {first: "a1", second: "a2"}
    assert "wall recorded" in balancer.log()  # the worker's line; the rescuer tells `session walled`


def test_a_walls_reset_readmits_its_account(layout: Layout, planted: Planted) -> None:
    token = planted.token()
    write_credential(layout.credentials, "a1", oauth_credential(planted, token=token))
    layout.quota({token: 0})
    daemon = DaemonProcess("balancer", layout, env=layout.env(FAKE_CLAUDE_RESET_IN="3")).start()
    try:
        first = submit(layout, "walls")
        wait_until(lambda: job_states(layout) == {first: "walled"}, "the wall")
        layout.quota({token: 5})  # the account has room again once its wall lifts
        second = submit(layout, "after the reset")
        assert job_states(layout)[second] == "queued"
        wait_until(lambda: job_states(layout)[second] == "done", "the job placed at the reset, not before")
        calls = [call for call in layout.claude_calls() if call["prompt"] == "after the reset"]
        assert len(calls) == 1
    finally:
        daemon.stop()


def test_restarting_the_balancer_keeps_running_sessions(layout: Layout, planted: Planted) -> None:
    write_credential(layout.credentials, "a1", oauth_credential(planted))
    hold = layout.root / "hold"
    hold.touch()
    env = layout.env(FAKE_CLAUDE_HOLD=str(hold))
    first = DaemonProcess("balancer", layout, env=env).start()
    jobs = [submit(layout, f"long {i}") for i in range(2)]
    wait_until(lambda: len(layout.claude_calls()) == 2, "both sessions to start")
    assert first.stop() == 0
    second = DaemonProcess("balancer", layout, env=env).start()
    try:
        wait_until(lambda: second.log().count("session adopted") == 2, "both sessions to be adopted")
        assert job_state_set(layout) == {"running"}
        hold.unlink()
        wait_until(lambda: all_in(layout, "done", 2), "both sessions to finish")
        assert sorted(call["prompt"] for call in layout.claude_calls()) == [f"long {i}" for i in range(2)]  # once each
        assert sorted(job_states(layout)) == jobs
    finally:
        second.stop()


@pytest.mark.parametrize("seed", range(5))
def test_kill_9_while_placing_loses_no_job_and_runs_none_twice(layout: Layout, planted: Planted, seed: int) -> None:
    rng = random.Random(seed)
    for name in ("a1", "a2", "a3"):
        write_credential(layout.credentials, name, oauth_credential(planted))
    env = layout.env(CL_MAX_SESSIONS_PER_ACCOUNT="2")
    daemon = DaemonProcess("balancer", layout, env=env).start()
    prompts = [f"job {i}" for i in range(12)]
    layout.hold.touch()  # sessions stay in flight while the kills land: none can finish before them
    for prompt in prompts:
        submit(layout, prompt)
    live_at_kills = []
    for _ in range(3):  # kill -9 at random moments while it places and workers start
        time.sleep(rng.uniform(0, 0.3))
        daemon.stop(signal.SIGKILL)
        live_at_kills.append(len(live_runs(layout)))
        daemon = DaemonProcess("balancer", layout, env=env).start()
    layout.hold.unlink()
    try:
        wait_until(lambda: all_in(layout, "done", len(prompts)), "every job to finish")
        runs = Counter(call["prompt"] for call in layout.claude_calls())
        assert runs == Counter(prompts)  # every job ran, none twice
        assert max(live_at_kills) > 0, live_at_kills  # a kill landed with sessions running
    finally:
        daemon.stop()


@pytest.mark.usefixtures("balancer")
def test_cancel(layout: Layout, planted: Planted) -> None:
    queued = submit(layout, "never runs")
    result = cl(layout, "cancel", str(queued))
    assert (result.returncode, result.stdout.strip()) == (0, f"job {queued} cancelled")
    assert job_states(layout) == {queued: "cancelled"}
    assert cl(layout, "wait", str(queued)).returncode == 6  # `cl wait`: cancelled
    assert cl(layout, "cancel", "999").returncode == 4
    write_credential(layout.credentials, "a1", oauth_credential(planted))
    done = submit(layout, "runs")
    wait_until(lambda: job_states(layout)[done] == "done", "the job to finish")
    refused = cl(layout, "cancel", str(done))
    assert (refused.returncode, refused.stderr.strip()) == (
        2,
        f"cl: cl-balancer: job {done} is done already; only live work can be cancelled",
    )
    assert [call["prompt"] for call in layout.claude_calls()] == ["runs"]


def test_the_cli_runs_with_only_the_accounts_credential_and_an_allowed_environment(
    layout: Layout, planted: Planted
) -> None:
    write_credential(layout.credentials, "a1", oauth_credential(planted))
    (layout.root / "config.toml").write_text('[worker.env]\nFROM_WORKER_TABLE = "yes"\n')
    leaky = layout.env(
        ANTHROPIC_API_KEY=planted.token("sk-ant-api03-"),
        CLAUDE_CODE_RETRY_WATCHDOG="1",
        FROM_THE_DAEMON="yes",  # as `make run` passes on whatever its user had
        SSH_AUTH_SOCK="/run/user/0/agent",
        PASSED_ON="yes",
        CL_CLI_ENV_KEEP=f"{layout.env()['CL_CLI_ENV_KEEP']} PASSED_*",
    )
    daemon = DaemonProcess("balancer", layout, env=leaky).start()
    try:
        submit(layout, "whose key?")
        wait_until(lambda: all_in(layout, "done", 1), "the job to finish")
        (call,) = layout.claude_calls()
        assert call["auth"] == "oauth"  # the daemon's ANTHROPIC_API_KEY did not reach the CLI
        names = set(call["env_names"])
        assert {"FROM_WORKER_TABLE", "PASSED_ON", "CLAUDE_CONFIG_DIR", "PATH"} <= names  # the table, cli_env_keep
        assert not names & {
            "FROM_THE_DAEMON",  # the launching user's environment does not reach it: an allow list does
            "SSH_AUTH_SOCK",
            "ANTHROPIC_API_KEY",
            "CLAUDE_CODE_RETRY_WATCHDOG",
            "CLAUDE_CODE_OAUTH_TOKEN",
            "NOTIFY_SOCKET",
        }
    finally:
        daemon.stop()


def test_a_run_never_claimed_goes_back_to_the_queue_and_runs_once(layout: Layout, planted: Planted) -> None:
    """The balancer died between writing a run and launching its worker."""
    write_credential(layout.credentials, "a1", oauth_credential(planted))
    store = Store(layout.database)
    job = store.add_job(str(layout.work), "interrupted")
    assert store.place(job.id, "a1", limit=4) is not None
    store.close()
    daemon = DaemonProcess("balancer", layout).start()
    try:
        wait_until(lambda: job_states(layout) == {job.id: "done"}, "the job to run after all")
        assert "run abandoned, job requeued" in daemon.log()
        assert [call["prompt"] for call in layout.claude_calls()] == ["interrupted"]
    finally:
        daemon.stop()


def test_a_run_whose_worker_vanished_is_orphaned(layout: Layout, planted: Planted) -> None:
    write_credential(layout.credentials, "a1", oauth_credential(planted))
    store = Store(layout.database)
    job = store.add_job(str(layout.work), "lost")
    run = store.place(job.id, "a1", limit=4)
    assert run is not None
    assert store.claim(run.id, 999_999, "1", str(layout.root / "x.log")) is not None  # a pid that is not there
    store.close()
    daemon = DaemonProcess("balancer", layout).start()
    try:
        wait_until(lambda: job_states(layout) == {job.id: "orphaned"}, "the job to be marked orphaned")
        assert "session orphaned" in daemon.log()
        assert layout.claude_calls() == []
    finally:
        daemon.stop()


def test_usage_and_a_followed_log(layout: Layout, planted: Planted) -> None:
    write_credential(layout.credentials, "a1", oauth_credential(planted))
    hold = layout.root / "hold"
    hold.touch()
    balancer = DaemonProcess("balancer", layout, env=layout.env(FAKE_CLAUDE_HOLD=str(hold))).start()
    job = submit(layout, "watch me")
    wait_until(lambda: job_states(layout)[job] == "running", "the session to run")
    follower = subprocess.Popen(
        [str(BIN / "cl"), "logs", "-f", "--raw", str(job)], env=layout.env(), stdout=subprocess.PIPE, text=True
    )
    hold.unlink()
    out, _ = follower.communicate(timeout=60)
    assert follower.returncode == 0
    events = [json.loads(line) for line in out.splitlines()]
    assert events[0]["type"] == "system"
    assert events[-1]["type"] == "result"
    (account,) = status(layout)["accounts"]
    assert account["usage"] == {"five_hour": 0.1, "seven_day": 0.05, "input_tokens": 10, "output_tokens": 12}
    as_json = json.loads(cl(layout, "logs", str(job), "--json").stdout)
    assert as_json == {"output": out, "finished": True}
    wait_until(
        lambda: any("session done" in line and "daemon=balancer" in line for line in balancer.log().splitlines()),
        "the outcome in the balancer's own log",
    )
    balancer.stop()


@pytest.mark.usefixtures("balancer")
def test_a_job_whose_directory_vanished_fails_with_the_reason(layout: Layout, planted: Planted) -> None:
    gone = layout.root / "gone"
    gone.mkdir()
    job = json.loads(cl(layout, "submit", "--cwd", str(gone), "--prompt", "x", "--json").stdout)["job"]
    gone.rmdir()  # between submit and placement
    write_credential(layout.credentials, "a1", oauth_credential(planted))
    wait_until(lambda: job_states(layout) == {job: "failed"}, "the job to fail")
    assert "no such directory" in history(layout)["jobs"][0]["error"]
    assert cl(layout, "wait", str(job)).returncode == 5  # `cl wait`: failed
    result = cl(layout, "result", str(job))  # no result: the failure, and the same exit code
    assert result.returncode == 5
    assert result.stderr.startswith(f"cl: job {job} failed: ")
    assert "no such directory" in result.stderr
    assert layout.claude_calls() == []


def test_status_shows_live_work_and_finished_jobs_are_kept_for_retention_days(layout: Layout, planted: Planted) -> None:
    write_credential(layout.credentials, "a1", oauth_credential(planted))
    env = layout.env(CL_RETENTION_DAYS="1e-9")  # a tenth of a millisecond: the next pass forgets it
    with_history = layout.env()
    balancer = DaemonProcess("balancer", layout, env=with_history).start()
    try:
        job = submit(layout, "soon history")
        wait_until(lambda: all_in(layout, "done", 1), "the job to finish")
        assert (status(layout)["jobs"], status(layout)["sessions"]) == ([], [])  # live work only
        assert [j["id"] for j in history(layout)["jobs"]] == [job]
    finally:
        balancer.stop()
    balancer = DaemonProcess("balancer", layout, env=env).start()  # retention runs at start
    try:
        wait_until(lambda: "history pruned jobs=1" in balancer.log(), "the retention pass")
        assert history(layout) == {"jobs": [], "sessions": []}
        assert submit(layout, "next") == job + 1  # an id is never reused
    finally:
        balancer.stop()


def test_what_the_cli_leaves_running_ends_with_its_run(layout: Layout, planted: Planted) -> None:
    """A background process the CLI started (holding the session's lock it inherited) would keep the
    next worker of the session waiting forever: it ends when the run does (its process group)."""
    write_credential(layout.credentials, "a1", oauth_credential(planted))
    left = layout.fakes / "left.pid"
    balancer = DaemonProcess("balancer", layout, env=layout.env(FAKE_CLAUDE_LEAVE_BEHIND=str(left))).start()
    try:
        submit(layout, "start a server and go")
        wait_until(lambda: all_in(layout, "done", 1), "the job to finish")
        pid = int(wait_until(left.read_text, "the background process's pid"))
        wait_until(lambda: not _alive(pid), "the background process to end with the run")
    finally:
        balancer.stop()


def test_a_session_whose_previous_process_never_lets_go_fails_with_the_reason(layout: Layout, planted: Planted) -> None:
    """A wait for the session's lock is bounded (`session_lock_wait`) and said."""
    write_credential(layout.credentials, "a1", oauth_credential(planted))
    lock = layout.state / "jobs" / "job-1.lock"
    lock.parent.mkdir(parents=True)
    with lock.open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # a process of job 1's that is still there, somehow
        balancer = DaemonProcess("balancer", layout, env=layout.env(CL_SESSION_LOCK_WAIT="0.5")).start()
        try:
            submit(layout, "blocked")
            wait_until(lambda: job_states(layout) == {1: "failed"}, "the run to give up")
            (job,) = history(layout)["jobs"]
            assert job["error"] == "the session's previous process still runs after 0.5 s (it holds its lock)"
            assert "waiting for the session's previous process to exit" in balancer.log()
        finally:
            balancer.stop()
    assert layout.claude_calls() == []


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_state_store_made_anew_never_reuses_an_earlier_jobs_session_files(layout: Layout, planted: Planted) -> None:
    """Job ids start again at 1 in a new `cl.db`: the new job 1 gets session files of its own, and
    the earlier job 1's (its transcript, its credential copy) are set aside, not handed to it."""
    write_credential(layout.credentials, "a1", oauth_credential(planted))
    with both(layout):
        submit(layout, "the first store's job 1")
        wait_until(lambda: all_in(layout, "done", 1), "the first job 1")
    for path in layout.state.glob("cl.db*"):
        path.unlink()
    with both(layout) as (balancer, _rescue):
        assert submit(layout, "the second store's job 1") == 1
        wait_until(lambda: all_in(layout, "done", 1), "the second job 1")
        assert "an earlier job's session files set aside job=1" in balancer.log()
    (earlier,) = layout.sessions.glob("job-1.earlier-*")
    assert len(list((earlier / "projects").rglob("*.jsonl"))) == 1
    assert len(list((layout.sessions / "job-1" / "projects").rglob("*.jsonl"))) == 1
    first, second = layout.claude_calls()
    assert (first["history"], second["history"]) == (0, 0)  # the second job started blank


def test_a_running_session_is_cancelled_its_whole_tree_stopped_and_nothing_resumes_it(
    layout: Layout, planted: Planted
) -> None:
    write_credential(layout.credentials, "a1", oauth_credential(planted))
    left = layout.fakes / "left.pid"
    layout.hold.touch()  # the session works on until cancelled
    env = layout.env(FAKE_CLAUDE_LEAVE_BEHIND=str(left))
    try:
        with both(layout, env=env) as (balancer, rescue):
            job = submit(layout, "a runaway")
            (call,) = wait_until(layout.claude_calls, "the session to start")
            cancelled = cl(layout, "cancel", str(job))
            assert (cancelled.returncode, cancelled.stdout.strip()) == (0, f"job {job} cancelled")
            wait_until(lambda: not _alive(call["pid"]), "its CLI to stop")
            wait_until(lambda: not _alive(int(left.read_text())), "what it started to stop too")
            wait_until(lambda: [r.state for r in _runs(layout)] == [RunState.CANCELLED], "the run to end cancelled")
            assert job_states(layout) == {job: "cancelled"}
            assert cl(layout, "wait", str(job)).returncode == 6
            assert "session moved" not in rescue.log()
            assert "session cancelled" in balancer.log()
    finally:
        layout.hold.unlink(missing_ok=True)
    assert len(layout.claude_calls()) == 1  # never resumed


def _runs(layout: Layout) -> list[Run]:
    store = Store(layout.database)
    try:
        return store.runs_in(tuple(RunState))
    finally:
        store.close()


@pytest.mark.usefixtures("balancer")
def test_status_says_why_queued_jobs_wait(layout: Layout, planted: Planted) -> None:
    submit(layout, "nowhere to go")
    assert (
        "1 job(s) queued: waiting for an account (there is none: drop a credential file in)"
        in cl(layout, "status").stdout
    )
    walled = planted.token()
    write_credential(layout.credentials, "a1", oauth_credential(planted, token=walled))
    layout.quota({walled: 0})
    wait_until(lambda: status(layout)["accounts"][0]["walled_until"], "a1 to wall")
    submit(layout, "behind the wall")
    wait_until(lambda: status(layout)["queue"] == 1, "the second job to wait")
    assert "1 job(s) queued: 1 walled, the first until" in cl(layout, "status").stdout
    for name in ("a2", "a3"):  # paused before their files land: the job stays queued
        assert cl(layout, "accounts", "pause", name, "--force").returncode == 0
        write_credential(layout.credentials, name, oauth_credential(planted))
    wait_until(lambda: len(status(layout)["accounts"]) == 3, "a2 and a3 to show")
    said = cl(layout, "status").stdout
    assert "1 job(s) queued: 1 walled, the first until " in said
    assert said.rstrip().endswith(", 2 paused (cl accounts resume NAME)")
