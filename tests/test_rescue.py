"""cl-rescue end to end: both real daemons, real workers, the fake `claude`, real SQLite, real inotify."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from cl.states import RunState
from cl.store import Store
from utils import (
    BIN,
    DaemonProcess,
    Layout,
    Planted,
    both,
    cl,
    history,
    job_state_set,
    live_runs,
    oauth_credential,
    status,
    submit,
    wait_until,
    write_credential,
)


def jobs(layout: Layout) -> dict[int, dict[str, Any]]:
    return {job["id"]: job for job in history(layout)["jobs"]}


def walled_accounts(layout: Layout, planted: Planted, names: list[str]) -> dict[str, str]:
    """Accounts whose every request walls (the fake's quota is 0): name -> token."""
    tokens = {name: planted.token() for name in names}
    for name, token in tokens.items():
        write_credential(layout.credentials, name, oauth_credential(planted, token=token))
    layout.quota(dict.fromkeys(tokens.values(), 0))
    return tokens


def resumed_calls(layout: Layout) -> list[dict[str, Any]]:
    """The turns that resumed a session elsewhere, live or by restart (their prompt is `resume_prompt`)."""
    return [call for call in layout.claude_calls() if call["prompt"] == "continue"]


def ledger(layout: Layout) -> list[dict[str, Any]]:
    store = Store(layout.database)
    try:
        return store.ledger(10_000)
    finally:
        store.close()


def test_the_seed_afternoon(layout: Layout, planted: Planted, store_at: Path | str) -> None:
    """Three accounts wall at once, the rescuer waits, a fourth file is dropped in, every session
    moves to it with its conversation and finishes, each in its own process (a live move); with
    the state in an SQLite file and in PostgreSQL."""
    tokens = walled_accounts(layout, planted, ["a1", "a2", "a3"])
    with both(layout) as (_balancer, rescue):
        with layout.started_together(3):  # one on each account, all three walling at once
            submitted = [submit(layout, f"step one of task {i}") for i in range(3)]
        wait_until(
            lambda: "sessions=3" in rescue.log() and "no-eligible-account" in rescue.log(), "the rescuer to wait"
        )
        calls = layout.claude_calls()
        first_runs = {call["session_id"]: call for call in reversed(calls)}
        assert len(first_runs) == 3
        assert {call["token_tail"] for call in calls} == {t[-6:] for t in tokens.values()}  # all three walled
        report = status(layout)
        assert {w["job"] for w in report["waiting"]["sessions"]} == set(submitted)
        assert report["waiting"]["reason"] == "no-eligible-account"
        text = cl(layout, "status").stdout
        assert "3 session(s) waiting for an account: a new credential file or the next wall reset at" in text

        a4 = planted.token()
        write_credential(layout.credentials, "a4", oauth_credential(planted, token=a4))
        wait_until(lambda: job_state_set(layout) == {"done"}, "every session to finish on a4")

        calls = layout.claude_calls()
        moved = [call for call in calls if call["token_tail"] == a4[-6:]]
        assert sorted(call["session_id"] for call in moved) == sorted(first_runs)  # each once
        for call in moved:
            assert call["prompt"] == "continue"
            assert call["history"] >= 1  # the earlier conversation went out with the new token
            before = [c for c in calls if c["session_id"] == call["session_id"] and c["t"] < call["t"]][-1]
            assert call["pid"] == before["pid"]  # the process that walled goes on: no restart
        for job in jobs(layout).values():
            assert job["account"] == "a4"
            assert job["session_id"] in first_runs  # the same session, not a new one
        log = rescue.log()
        for line in ("session walled", "account added", "session moved", "session resumed"):
            assert line in log, line
        assert len(re.findall(r"session moved .*account=a4 .*live=True", log)) == 3
        assert cl(layout, "accounts").returncode == 0  # both daemons see the same four accounts
        assert status(layout)["waiting"]["sessions"] == []
    settled = [entry for entry in ledger(layout) if entry["event"] == "move settled"]
    assert all(entry["detail"]["grew"] for entry in settled)
    assert sum(entry["detail"]["outcome"] == "done" for entry in settled) == 3
    assert layout.store == (store_at if isinstance(store_at, str) else "")
    assert (layout.state / "cl.db").exists() == (not layout.store)  # the store it was given, and no other


def test_a_failed_resume_is_marked_failed_with_its_reason(layout: Layout, planted: Planted) -> None:
    """A move by restart (`live_wait = 0`) whose `--resume` finds no conversation, of a session
    that was answered before (its first turn on a1; its follow-up walls there)."""
    token = planted.token()
    write_credential(layout.credentials, "a1", oauth_credential(planted, token=token))
    layout.quota({token: 1})
    with both(layout, env=layout.env(CL_LIVE_WAIT="0")) as (_balancer, rescue):
        job = submit(layout, "answered once")
        wait_until(lambda: job_state_set(layout) == {"done"}, "the first turn to be answered")
        assert cl(layout, "send", str(job), "and then?").returncode == 0
        wait_until(lambda: "no-eligible-account" in rescue.log(), "the follow-up to wall and wait")
        for transcript in (layout.sessions).rglob("*.jsonl"):
            transcript.unlink()  # the conversation is gone: the resume cannot find it
        write_credential(layout.credentials, "a2", oauth_credential(planted))
        wait_until(lambda: job_state_set(layout) == {"failed"}, "the resume to fail")
        assert "No conversation found with session ID" in jobs(layout)[job]["error"]
        wait_until(lambda: "session failed" in rescue.log() and "move=True" in rescue.log(), "the rescuer to report it")
        assert [entry["event"] for entry in ledger(layout)].count("move started") == 1  # not retried


def test_a_session_that_never_reached_the_disk_starts_afresh(layout: Layout, planted: Planted) -> None:
    """The CLI said its session id and died before writing the prompt (here: its transcript is
    gone), and nothing of the session was ever answered: the move starts the job afresh on its
    own prompt, where `--resume` could only fail. Nothing was answered, so nothing runs twice."""
    walled_accounts(layout, planted, ["a1"])
    with both(layout, env=layout.env(CL_LIVE_WAIT="0")) as (_balancer, rescue):
        job = submit(layout, "never on disk")
        wait_until(lambda: "no-eligible-account" in rescue.log(), "the session to wait")
        for transcript in (layout.sessions).rglob("*.jsonl"):
            transcript.unlink()
        write_credential(layout.credentials, "a2", oauth_credential(planted))
        wait_until(lambda: job_state_set(layout) == {"done"}, "the job to run afresh")
        shown = jobs(layout)[job]
    first, again = layout.claude_calls()
    assert (again["prompt"], again["history"], "--resume" in again["argv"]) == ("never on disk", 0, False)
    assert again["session_id"] != first["session_id"]
    assert shown["session_id"] == again["session_id"]


def test_a_reset_readmits_one_session_first_then_the_rest(layout: Layout, planted: Planted) -> None:
    (token,) = walled_accounts(layout, planted, ["a1"]).values()
    hold = layout.hold
    with both(layout, env=layout.env(CL_RESET_JITTER="0.2")) as (_balancer, rescue):
        with layout.started_together(3):
            for i in range(3):
                submit(layout, f"task {i}")
        wait_until(lambda: "sessions=3" in rescue.log(), "all three sessions to wait for a1's reset")
        hold.touch()  # the first session back will be held before its answer comes
        layout.quota({token: 100})  # the account's real limit has reset too
        store = Store(layout.database)  # the reset, an hour away, now comes in a second
        store.record_wall("a1", "test", time.time() + 1, "five_hour")
        store.close()
        rescue.request({"request": "run-changed", "run": 0})  # as any run's news would: a pass sees it
        wait_until(lambda: "probing=a1" in rescue.log(), "one session to try a1 after the reset", timeout=60)
        assert "sessions=2" in rescue.log().split("probing=a1")[0].splitlines()[-1]
        wait_until(lambda: resumed_calls(layout), "the probe to reach the CLI (and be held there)")
        assert status(layout)["waiting"]["probing"] == ["a1"]
        hold.unlink()
        wait_until(lambda: job_state_set(layout) == {"done"}, "all three to finish on a1")
    probe, *rest = resumed_calls(layout)
    lifted = next(entry for entry in ledger(layout) if entry["event"] == "wall lifted")
    assert probe["t"] < lifted["at"] < min(call["t"] for call in rest)
    assert len(rest) == 2


def test_an_orphaned_session_is_resumed(layout: Layout, planted: Planted) -> None:
    write_credential(layout.credentials, "a1", oauth_credential(planted))
    hold = layout.root / "hold"
    hold.touch()
    with both(layout, env=layout.env(FAKE_CLAUDE_HOLD=str(hold))) as (_balancer, rescue):
        job = submit(layout, "interrupted work")
        wait_until(lambda: len(layout.claude_calls()) == 1, "the session to start")
        run = wait_until(lambda: next((r for r in live_runs(layout) if r.session_id), None), "its session id")
        assert run.pid is not None
        # the CLI writes the prompt to its transcript just after it says its session id
        wait_until(lambda: _transcript_holds(layout, job, "interrupted work"), "the prompt in the transcript")
        os.kill(run.pid, signal.SIGKILL)  # the worker vanishes; its CLI goes with it (PDEATHSIG)
        wait_until(lambda: "session orphaned" in rescue.log(), "the rescuer to hear of the orphan")
        hold.unlink()
        wait_until(lambda: job_state_set(layout) == {"done"}, "the session to finish after all")
    (first, resumed) = layout.claude_calls()
    assert resumed["session_id"] == first["session_id"]
    assert "--resume" in resumed["argv"]
    assert resumed["history"] == 1  # the prompt it was working on
    assert jobs_in_store(layout)[job] == "done"


def _transcript_holds(layout: Layout, job: int, text: str) -> bool:
    transcripts = (layout.sessions / f"job-{job}" / "projects").rglob("*.jsonl")
    return any(text in path.read_text() for path in transcripts)


def jobs_in_store(layout: Layout) -> dict[int, str]:
    store = Store(layout.database)
    try:
        return {job.id: job.state for job in store.jobs()}
    finally:
        store.close()


def test_a_session_that_walled_while_the_rescuer_was_down_is_rescued_at_its_start(
    layout: Layout, planted: Planted
) -> None:
    walled_accounts(layout, planted, ["a1"])
    balancer = DaemonProcess("balancer", layout).start()
    try:
        job = submit(layout, "walls with nobody to rescue it")
        wait_until(lambda: jobs(layout)[job]["state"] == "walled", "the session to wall")
        write_credential(layout.credentials, "a2", oauth_credential(planted))
        rescue = DaemonProcess("rescue", layout).start()
        wait_until(lambda: jobs(layout)[job]["state"] == "done", "the rescuer to move it at its start")
        assert "session moved" in rescue.log()
        assert rescue.stop() == 0
    finally:
        balancer.stop()


def test_a_session_finishing_frees_room_for_a_waiting_one(layout: Layout, planted: Planted) -> None:
    hold = layout.root / "hold"
    hold.touch()
    env = layout.env(CL_MAX_SESSIONS_PER_ACCOUNT="1", FAKE_CLAUDE_HOLD=str(hold), FAKE_CLAUDE_HOLD_MATCH="busy")
    write_credential(layout.credentials, "a2", oauth_credential(planted))
    with both(layout, env=env) as (_balancer, rescue):
        busy = submit(layout, "keeps a2 busy")
        wait_until(lambda: jobs(layout)[busy]["state"] == "running", "a2 to be full")
        walled_accounts(layout, planted, ["a1"])
        walled = submit(layout, "walls on a1")
        wait_until(lambda: "sessions=1" in rescue.log(), "the walled session to wait: a2 is full")
        assert [w["job"] for w in status(layout)["waiting"]["sessions"]] == [walled]
        hold.unlink()  # the busy session finishes: a2 has room again
        wait_until(lambda: job_state_set(layout) == {"done"}, "the waiting session to move into the freed room")
        assert jobs(layout)[walled]["account"] == "a2"


def test_a_job_the_rescuer_requeues_wakes_the_balancer(layout: Layout) -> None:
    """A walled job with no session to resume goes back to the queue, and the rescuer tells the
    balancer so (its own wake may have come and gone before the requeue: it sat queued for 25 s)."""
    heard: list[dict[str, Any]] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as balancer:  # the balancer's socket, listening
        balancer.bind(str(layout.runtime / "balancer.sock"))
        balancer.listen()
        balancer.settimeout(20)
        store = Store(layout.database)
        job = store.add_job(str(layout.work), "x")
        run = store.place(job.id, "a1", limit=1)
        assert run is not None
        store.claim(run.id, os.getpid(), "0", "/dev/null")
        store.settle(run.id, RunState.WALLED, "credentials refused")  # before any session began
        store.close()
        rescue = DaemonProcess("rescue", layout).start()
        try:
            while not heard:
                connection, _ = balancer.accept()
                with connection:
                    line = connection.makefile("rb").readline()
                    heard.append(json.loads(line))
                    connection.sendall(b'{"ok": true}\n')
        finally:
            rescue.stop()
    assert heard[0]["request"] == "run-changed"
    assert "job requeued" in rescue.log()


def test_a_jobs_story_its_answer_and_waiting_for_it(layout: Layout, planted: Planted) -> None:
    """`cl job N` tells the runs and the move (a1 -> a2, and why); `cl result N` the answer;
    `cl wait N` returns when the job ends, its exit code the outcome."""
    walled = planted.token()
    write_credential(layout.credentials, "a1", oauth_credential(planted, token=walled))
    layout.quota({walled: 0})
    with both(layout):
        job = submit(layout, "walls once, then answers")
        wait_until(lambda: "walled" in {j["state"] for j in history(layout)["jobs"]}, "the wall")
        follower = subprocess.Popen(  # follows the session across its move, to its end
            [str(BIN / "cl"), "logs", "-f", str(job)], env=layout.env(), stdout=subprocess.PIPE, text=True
        )
        write_credential(layout.credentials, "a2", oauth_credential(planted))
        waited = cl(layout, "wait", str(job))
        assert waited.returncode == 0, waited.stderr
        story = json.loads(cl(layout, "job", str(job), "--json").stdout)
        answer = cl(layout, "result", str(job))
        table = cl(layout, "job", str(job)).stdout
        missing = cl(layout, "wait", "99")
        followed, _ = follower.communicate(timeout=60)
        raw = [json.loads(line) for line in cl(layout, "logs", "--raw", str(job)).stdout.splitlines()]
    assert story["job"]["state"] == "done"
    assert [(r["account"], r["state"]) for r in story["runs"]] == [("a1", "walled"), ("a2", "done")]
    assert [(m["from"], m["to"], m["why"], m["how"]) for m in story["moves"]] == [("a1", "a2", "walled", "live")]
    assert answer.stdout.startswith("Hi from fake claude (n_messages=2")  # the whole conversation went on
    assert "moved a1 -> a2 at" in table
    assert "(walled; live)" in table
    assert missing.returncode == 4
    marks = [" ".join(line.split()[:2]) for line in followed.splitlines() if line.startswith(("⚠", "──"))]
    assert marks == ["── session", "⚠ usage", "── error", "── moved", "── session", "── done,"], followed
    assert "── moved a1 → a2 (walled; live) at " in followed
    assert [event["type"] for event in raw].count("cl_move") == 1  # --raw: stream-json, cl's line too
    assert [event["type"] for event in raw][-1] == "result"
