"""Live moves with the fake CLI: a walled session's CLI is held alive and goes on under another
account in the same process; and every case where it must not, or cannot, falls back to a restart
with `--resume` (the real CLI's side is in test_real_claude.py)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from cl.store import Run, Store
from utils import (
    Layout,
    Planted,
    api_key_credential,
    both,
    cl,
    job_state_set,
    job_states,
    oauth_credential,
    submit,
    wait_until,
    write_credential,
)


def walls_on_a1(layout: Layout, planted: Planted) -> str:
    token = planted.token()
    write_credential(layout.credentials, "a1", oauth_credential(planted, token=token))
    layout.quota({token: 0})
    return token


def runs(layout: Layout, job: int = 1) -> list[Run]:
    store = Store(layout.database)
    try:
        return store.job_runs(job)
    finally:
        store.close()


def held(layout: Layout) -> Run | None:
    return next((run for run in runs(layout) if run.held_until is not None), None)


def swaps(layout: Layout, version: str) -> bool | None:
    store = Store(layout.database)
    try:
        return store.swaps(version)
    finally:
        store.close()


def alive(pid: int) -> bool:
    """Running, not a zombie (one reaped between the two looks is gone too: its /proc entry is
    missing, or its read fails with ESRCH when the reaping lands between open and read)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def turns(layout: Layout, session: str) -> list[dict[str, Any]]:
    return [call for call in layout.claude_calls() if call["session_id"] == session]


def test_a_walled_session_goes_on_in_its_own_process_with_what_it_started(layout: Layout, planted: Planted) -> None:
    """The same pid and session, the whole conversation under a2's token, and the process the
    session started before the wall still running after the move."""
    walls_on_a1(layout, planted)
    left = layout.fakes / "left.pid"
    with both(layout, env=layout.env(FAKE_CLAUDE_LEAVE_BEHIND=str(left))) as (balancer, rescue):
        job = submit(layout, "start a server, then wall")
        wait_until(lambda: held(layout), "the walled session to be held")
        (first,) = layout.claude_calls()
        a2 = planted.token()
        write_credential(layout.credentials, "a2", oauth_credential(planted, token=a2))
        wait_until(lambda: len(layout.claude_calls()) == 2, "the session to go on")
        server_alive_after_the_move = alive(int(left.read_text()))
        wait_until(lambda: job_states(layout) == {job: "done"}, "the session to finish")
        story = cl(layout, "job", str(job), "--json").stdout
    first, moved = layout.claude_calls()
    assert (moved["pid"], moved["session_id"], moved["argv"]) == (first["pid"], first["session_id"], first["argv"])
    assert (moved["token_tail"], moved["prompt"], moved["history"]) == (a2[-6:], "continue", 1)
    assert server_alive_after_the_move
    assert '"how": "live"' in story
    walled, done = runs(layout)
    assert (walled.state, walled.held_until, done.state, done.live, done.pid) == (
        "walled",
        None,
        "done",
        True,
        walled.pid,
    )
    assert "live=True" in rescue.log().split("session moved")[1].splitlines()[0]
    assert "session moved live" in balancer.log()  # the worker's line (the balancer forked it)
    assert swaps(layout, "2.1.332-fake") is True  # measured by this move


def test_a_cli_that_keeps_its_first_credential_is_moved_by_restart_once_and_remembered(
    layout: Layout, planted: Planted
) -> None:
    """A CLI that never re-reads its credential (2.0.x) walls again on the old account after the
    live move: the worker restarts it with `--resume` on the new account at once, says so once
    with the version, and the version is not held again."""
    a1 = walls_on_a1(layout, planted)
    env = layout.env(FAKE_CLAUDE_NO_RELOAD="1", FAKE_CLAUDE_VERSION="2.0.77-fake")
    with both(layout, env=env) as (balancer, rescue):
        job = submit(layout, "old CLI")
        wait_until(lambda: held(layout), "the walled session to be held")
        a2 = planted.token()
        write_credential(layout.credentials, "a2", oauth_credential(planted, token=a2))
        wait_until(lambda: job_states(layout) == {job: "done"}, "the session to finish by restart")
        assert swaps(layout, "2.0.77-fake") is False
        session = layout.claude_calls()[0]["session_id"]
        first, live, restart = turns(layout, session)
        assert first["pid"] == live["pid"] != restart["pid"]
        assert (live["token_tail"], restart["token_tail"]) == (a1[-6:], a2[-6:])  # the swap was not taken
        assert "--resume" in restart["argv"]
        assert restart["history"] >= 1
        log = balancer.log()
        assert log.count("live move not taken by the CLI, moving by restart") == 1
        assert "cli_version=2.0.77-fake" in log
        assert [(r.account, r.state, r.live) for r in runs(layout)] == [("a1", "walled", False), ("a2", "done", True)]

        # The next session of that version walls: not held, moved by restart straight away.
        layout.quota({a1: 0, a2: 0})
        second = submit(layout, "old CLI again")
        wait_until(lambda: "walled" in job_states(layout).values(), "the second session to wall")
        write_credential(layout.credentials, "a3", oauth_credential(planted))
        wait_until(lambda: job_states(layout)[second] == "done", "the second session to finish")
    assert [(r.state, r.held_until, r.live) for r in runs(layout, second)] == [
        ("walled", None, False),
        ("done", None, False),
    ]
    assert "live=False" in rescue.log()


def test_token_and_api_key_accounts_are_moved_by_restart(layout: Layout, planted: Planted) -> None:
    """A credential that reaches the CLI through its environment cannot change under a running
    process: such a session is not held, and moves by restart."""
    key = api_key_credential(planted)
    write_credential(layout.credentials, "k1", key)
    layout.quota({planted.tokens[-1]: 0})
    with both(layout):
        job = submit(layout, "on an API key")
        wait_until(lambda: job_states(layout) == {job: "walled"}, "the wall")
        assert held(layout) is None
        write_credential(layout.credentials, "a2", oauth_credential(planted))
        wait_until(lambda: job_states(layout) == {job: "done"}, "the session to finish on a2")
    first, moved = layout.claude_calls()
    assert first["pid"] != moved["pid"]
    assert "--resume" in moved["argv"]
    assert [r.live for r in runs(layout)] == [False, False]


def test_a_held_session_is_let_go_after_live_wait_and_moved_by_restart(layout: Layout, planted: Planted) -> None:
    walls_on_a1(layout, planted)
    with both(layout, env=layout.env(CL_LIVE_WAIT="1")) as (balancer, _rescue):
        job = submit(layout, "waits long")
        wait_until(lambda: "session held" in balancer.log(), "the session to be held")
        (first,) = layout.claude_calls()
        wait_until(lambda: not alive(first["pid"]), "its CLI to be let go after live_wait")
        assert held(layout) is None
        assert job_states(layout) == {job: "walled"}
        write_credential(layout.credentials, "a2", oauth_credential(planted))
        wait_until(lambda: job_states(layout) == {job: "done"}, "the session to finish by restart")
    _, moved = layout.claude_calls()
    assert moved["pid"] != first["pid"]
    assert "--resume" in moved["argv"]


def test_a_held_session_is_cancelled_and_its_cli_stops(layout: Layout, planted: Planted) -> None:
    walls_on_a1(layout, planted)
    with both(layout) as (_balancer, rescue):
        job = submit(layout, "held, then cancelled")
        run = wait_until(lambda: held(layout), "the session to be held")
        (call,) = layout.claude_calls()
        assert cl(layout, "cancel", str(job)).returncode == 0
        wait_until(
            lambda: not alive(call["pid"]) and run.pid is not None and not alive(run.pid), "CLI and worker to stop"
        )
        write_credential(layout.credentials, "a2", oauth_credential(planted))
        time.sleep(1)  # a move would start now if the job were still walled: none may
        assert job_states(layout) == {job: "cancelled"}
        assert "session moved" not in rescue.log()
    assert len(layout.claude_calls()) == 1


def test_a_held_worker_killed_leaves_a_session_moved_by_restart(layout: Layout, planted: Planted) -> None:
    walls_on_a1(layout, planted)
    with both(layout):
        job = submit(layout, "held, then its worker dies")
        run = wait_until(lambda: held(layout), "the session to be held")
        assert run.pid is not None
        os.kill(run.pid, signal.SIGKILL)  # its CLI goes with it (PDEATHSIG)
        (call,) = layout.claude_calls()
        wait_until(lambda: not alive(call["pid"]), "the CLI to go with its worker")
        write_credential(layout.credentials, "a2", oauth_credential(planted))
        wait_until(lambda: job_state_set(layout) == {"done"}, "the session to finish by restart")
    _, moved = layout.claude_calls()
    assert "--resume" in moved["argv"]
    assert moved["history"] >= 1
    assert [r.live for r in runs(layout, job)] == [False, False]


def test_a_live_move_rolled_back_by_a_rescuer_restart_is_made_live_again(layout: Layout, planted: Planted) -> None:
    """cl-rescue wrote a live move and died before telling the holder: at its start the move is
    rolled back, and made again, live, to the worker still holding the session's CLI (not by a
    restart, whose worker would wait for the held session's lock)."""
    walls_on_a1(layout, planted)
    with both(layout) as (_balancer, rescue):
        job = submit(layout, "held while the rescuer dies")
        wait_until(lambda: held(layout), "the session to be held")
        rescue.stop(signal.SIGKILL)
        write_credential(layout.credentials, "a2", oauth_credential(planted))
        store = Store(layout.database)
        try:
            session = store.get_job(job)
            assert session is not None
            unsent = store.place(job, "a2", 4, session.session_id, live=True)  # as the rescuer would, then died
        finally:
            store.close()
        assert unsent is not None
        assert unsent.live
        rescue.start()
        wait_until(lambda: job_states(layout) == {job: "done"}, "the session to finish")
        assert "move rolled back" in rescue.log()
    first, moved = layout.claude_calls()
    assert moved["pid"] == first["pid"]
    assert [(r.state, r.live) for r in runs(layout, job)] == [("walled", False), ("abandoned", True), ("done", True)]
