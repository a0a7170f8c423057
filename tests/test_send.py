"""`cl send N TEXT`: a job's session continues with a new prompt, in its own CLI when that is
alive (after the turn it is in, or with a live move), resumed by restart when it has ended;
ledgered like a move, and `cl wait` / `cl result` follow the latest turn."""

from __future__ import annotations

import json

from cl.states import RunState
from cl.store import Run, Store
from utils import Layout, Planted, both, cl, job_states, oauth_credential, submit, wait_until, write_credential


def runs(layout: Layout, job: int) -> list[Run]:
    store = Store(layout.database)
    try:
        return store.job_runs(job)
    finally:
        store.close()


def events(layout: Layout) -> list[str]:
    store = Store(layout.database)
    try:
        return [entry["event"] for entry in store.ledger(1000)]
    finally:
        store.close()


def test_a_finished_job_takes_a_follow_up_resumed_where_there_is_room(layout: Layout, planted: Planted) -> None:
    write_credential(layout.credentials, "a1", oauth_credential(planted))
    with both(layout):
        job = submit(layout, "first")
        assert cl(layout, "wait", str(job)).returncode == 0
        sent = cl(layout, "send", str(job), "and then?")
        assert sent.returncode == 0, sent.stderr
        assert "resumes with it" in sent.stdout
        waited = cl(layout, "wait", str(job))  # follows the latest turn
        assert waited.returncode == 0, waited.stderr
        answer = cl(layout, "result", str(job)).stdout
        story = json.loads(cl(layout, "job", str(job), "--json").stdout)
        told = cl(layout, "job", str(job)).stdout
    first, follow = layout.claude_calls()
    assert (follow["prompt"], follow["session_id"], follow["history"]) == ("and then?", first["session_id"], 2)
    assert "--resume" in follow["argv"]
    assert answer.startswith("Hi from fake claude (n_messages=3")  # the latest turn's answer
    assert [(r["state"]) for r in story["runs"]] == ["done", "done"]
    assert [r["follow_up"] for r in story["runs"]] == [None, "and then?"]
    assert story["moves"] == []  # a follow-up is not a move
    assert f"run {story['runs'][1]['id']} took a follow-up (cl send): and then?" in told
    assert {"follow-up sent", "follow-up started", "move settled"} <= set(events(layout))


def test_a_running_job_takes_its_follow_up_in_its_own_cli_after_the_turn(layout: Layout, planted: Planted) -> None:
    write_credential(layout.credentials, "a1", oauth_credential(planted))
    layout.hold.touch()  # the first turn works on
    try:
        with both(layout):
            job = submit(layout, "long task")
            wait_until(layout.claude_calls, "the turn to start")
            sent = cl(layout, "send", str(job), "then this")
            assert "when the turn it is in ends" in sent.stdout, sent.stderr
            assert cl(layout, "send", str(job), "and this").returncode == 0  # joined with the first
            layout.hold.unlink()
            assert cl(layout, "wait", str(job)).returncode == 0
    finally:
        layout.hold.unlink(missing_ok=True)
    first, follow = layout.claude_calls()
    assert follow["pid"] == first["pid"]  # the same process: no restart
    assert follow["prompt"] == "then this\n\nand this"
    assert [(r.state, r.live, r.prompt) for r in runs(layout, job)] == [
        ("done", False, None),
        ("done", True, "then this\n\nand this"),
    ]


def test_a_follow_up_to_a_walled_session_goes_with_its_move(layout: Layout, planted: Planted) -> None:
    walled = planted.token()
    write_credential(layout.credentials, "a1", oauth_credential(planted, token=walled))
    layout.quota({walled: 0})
    with both(layout):
        job = submit(layout, "walls")
        wait_until(lambda: job_states(layout) == {job: "walled"}, "the wall")
        assert "with the session's move" in cl(layout, "send", str(job), "go on with step 2").stdout
        write_credential(layout.credentials, "a2", oauth_credential(planted))
        assert cl(layout, "wait", str(job)).returncode == 0
    first, moved = layout.claude_calls()
    assert (moved["prompt"], moved["pid"]) == ("go on with step 2", first["pid"])  # instead of "continue", live


def test_follow_ups_that_cannot_be_taken_are_refused(layout: Layout) -> None:
    with both(layout):
        queued = submit(layout, "no account yet")
        refused = cl(layout, "send", str(queued), "too early")
        assert (refused.returncode, "has not started a session yet" in refused.stderr) == (2, True)
        assert cl(layout, "cancel", str(queued)).returncode == 0
        cancelled = cl(layout, "send", str(queued), "too late")
        assert (cancelled.returncode, "was cancelled" in cancelled.stderr) == (2, True)
        assert cl(layout, "send", "99", "nobody").returncode == 4
        assert cl(layout, "send", str(queued), " ").returncode == 2
    assert layout.claude_calls() == []


def test_a_follow_up_sent_as_the_cli_ends_queues_the_session_to_resume(store: Store) -> None:
    """The race `cl send` can lose to a turn's end: the text is never dropped, the job queues."""
    job = store.add_job("/srv/work", "first")
    run = store.place(job.id, "a1", limit=4)
    assert run is not None
    store.claim(run.id, 1, "1", "log")
    store.set_session(run.id, "00000000-0000-4000-8000-000000000001")
    assert store.send(job.id, "more", 1000) == ("running", "next-turn")
    store.settle(run.id, RunState.DONE)  # the worker found no follow-up a moment earlier
    after = store.get_job(job.id)
    assert after is not None
    assert (after.state, after.pending_prompt) == ("queued", "more")
    follow = store.place(job.id, "a2", 4, after.session_id)
    assert follow is not None
    assert (follow.prompt, follow.resume, follow.is_move, follow.launcher) == (
        "more",
        after.session_id,
        False,
        "balancer",
    )
