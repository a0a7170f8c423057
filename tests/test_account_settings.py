"""Operators' settings per account (`cl accounts pause|resume|set`), end to end: the real `cl`,
both daemons, workers and the fake CLI. Settings are facts keyed by name: they steer placement
and rescue, and never make an account exist."""

from __future__ import annotations

import json
import time

from utils import (
    DaemonProcess,
    Layout,
    Planted,
    both,
    cl,
    history,
    job_states,
    oauth_credential,
    status,
    stored,
    submit,
    wait_until,
    write_credential,
)


def accounts_of(layout: Layout) -> dict[int, str]:
    return {job["id"]: job["account"] for job in history(layout)["jobs"]}


def ok(layout: Layout, *args: str) -> str:
    result = cl(layout, *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_a_paused_account_takes_no_new_work_finishes_its_own_and_stays_paused(layout: Layout, planted: Planted) -> None:
    for name in ("a1", "a2"):
        write_credential(layout.credentials, name, oauth_credential(planted))
    with both(layout) as daemons:
        layout.hold.touch()
        running = submit(layout, "already running on a1")
        wait_until(layout.claude_calls, "the first session to start")
        assert ok(layout, "accounts", "pause", "a1") == "a1: paused\n"
        assert ok(layout, "accounts", "pause", "a2") == "a2: paused\n"
        queued = submit(layout, "waits for a resume")
        rows = {line.split()[0]: line.split() for line in ok(layout, "status").splitlines() if line}
        assert rows["a1"][1:3] == ["paused", "1"]  # its live session goes on
        assert "1 job(s) queued: 2 paused (cl accounts resume NAME)\n" in ok(layout, "status")
        layout.hold.unlink()
        wait_until(lambda: job_states(layout)[running] == "done", "the paused account's live session to finish")
        for daemon in daemons:  # the pause is kept across restarts
            daemon.stop()
            daemon.start()
        table = ok(layout, "accounts").splitlines()
        assert table[0].split() == ["ACCOUNT", "STATE", "KIND", "EXPIRES", "5H", "7D", "SETTINGS", "REASON"]
        listed = [(row.split()[:2], row.split()[7:9]) for row in table[1:]]  # (expiry is two words)
        assert listed == [(["a1", "paused"], ["paused", "paused"]), (["a2", "paused"], ["paused", "paused"])]
        assert table[1].endswith(": cl accounts resume a1")
        assert job_states(layout)[queued] == "queued"
        assert ok(layout, "accounts", "resume", "a2") == "a2: -\n"
        wait_until(lambda: job_states(layout)[queued] == "done", "the queued job to run on the resumed account")
        assert accounts_of(layout) == {running: "a1", queued: "a2"}
    assert len(layout.claude_calls()) == 2


def test_a_walled_session_does_not_move_to_a_paused_account(layout: Layout, planted: Planted) -> None:
    walled = planted.token()
    write_credential(layout.credentials, "a1", oauth_credential(planted, token=walled))
    write_credential(layout.credentials, "a2", oauth_credential(planted))
    layout.quota({walled: 0})
    with both(layout) as (_balancer, rescue):
        ok(layout, "accounts", "pause", "a2")
        job = submit(layout, "walls on a1")
        wait_until(lambda: "no-eligible-account" in rescue.log(), "the walled session to wait")
        assert [w["job"] for w in status(layout)["waiting"]["sessions"]] == [job]
        ok(layout, "accounts", "resume", "a2")
        wait_until(lambda: job_states(layout)[job] == "done", "the session to move to a2 once resumed")
        assert accounts_of(layout) == {job: "a2"}


def test_an_accounts_own_session_limit(layout: Layout, planted: Planted) -> None:
    for name in ("a1", "a2"):
        write_credential(layout.credentials, name, oauth_credential(planted))
    balancer = DaemonProcess("balancer", layout, env=layout.env(CL_PLACEMENT="fill-first")).start()
    try:
        assert ok(layout, "accounts", "set", "a1", "max_sessions=1") == "a1: max 1\n"
        layout.hold.touch()
        first, second = submit(layout, "first"), submit(layout, "second")
        wait_until(lambda: len(layout.claude_calls()) == 2, "both to start")
        layout.hold.unlink()
        wait_until(lambda: set(job_states(layout).values()) == {"done"}, "both to finish")
        # fill-first would have put both on a1 (the default limit is 4): a1's own limit sent one on
        assert accounts_of(layout) == {first: "a1", second: "a2"}
        assert ok(layout, "accounts", "set", "a1", "max_sessions=") == "a1: -\n"  # back to the default
    finally:
        balancer.stop()


def test_models_route_work_and_a_model_no_account_serves_is_refused_at_submit(layout: Layout, planted: Planted) -> None:
    for name in ("a1", "a2"):
        write_credential(layout.credentials, name, oauth_credential(planted))
    balancer = DaemonProcess("balancer", layout).start()
    try:
        ok(layout, "accounts", "set", "a1", "models=opus")
        assert (
            ok(layout, "accounts", "set", "a2", "models=claude-sonnet-*,haiku") == "a2: models claude-sonnet-*,haiku\n"
        )
        refused = cl(layout, "submit", "--cwd", str(layout.work), "--prompt", "p", "--model", "gpt-5")
        assert (refused.returncode, refused.stderr.strip()) == (
            2,
            "cl: cl-balancer: no account may serve model 'gpt-5'; the accounts serve: claude-sonnet-*, haiku, opus",
        )
        jobs = {}
        for model in ("claude-sonnet-4-5", "opus"):
            result = cl(layout, "submit", "--cwd", str(layout.work), "--prompt", model, "--model", model, "--json")
            assert result.returncode == 0, result.stderr
            jobs[json.loads(result.stdout)["job"]] = model
        plain = submit(layout, "no model asked: the CLI's default, any account")
        wait_until(lambda: set(job_states(layout).values()) == {"done"}, "all three to finish")
        placed = accounts_of(layout)
        assert {jobs[job]: placed[job] for job in jobs} == {"claude-sonnet-4-5": "a2", "opus": "a1"}
        assert placed[plain] in {"a1", "a2"}
        models = {
            call["prompt"]: call["argv"][call["argv"].index("--model") + 1]
            for call in layout.claude_calls()
            if "--model" in call["argv"]
        }
        assert models == {"claude-sonnet-4-5": "claude-sonnet-4-5", "opus": "opus"}
        ok(layout, "accounts", "pause", "a1")  # the one account that serves opus
        waits = cl(layout, "submit", "--cwd", str(layout.work), "--prompt", "o", "--model", "opus", "--json")
        wait_until(lambda: json.loads(waits.stdout)["job"] in job_states(layout), "the job to be listed")
        shown = cl(layout, "status").stdout
        assert "1 job(s) queued: 1 ok but at its session limit or not serving the job's model (cl accounts)" in shown
        assert "; 1 for opus: no account serves opus (cl accounts set NAME models=...)" in shown, shown
    finally:
        balancer.stop()


def test_a_setting_never_makes_an_account_exist(layout: Layout, planted: Planted) -> None:
    write_credential(layout.credentials, "a1", oauth_credential(planted))
    with both(layout):
        result = cl(layout, "accounts", "set", "ghost", "max_sessions=2")
        assert (result.returncode, result.stdout) == (0, "ghost: max 2\n")
        assert result.stderr == "cl: there is no account ghost now: the setting waits for its credential file\n"
        listed = cl(layout, "accounts")
        assert listed.returncode == 0, listed.stderr  # both daemons still agree: ghost is in neither roster
        ghost = next(line for line in listed.stdout.splitlines() if line.startswith("ghost"))
        assert ghost.split()[:8] == ["ghost", "absent", "-", "-", "-", "-", "max", "2"]
        assert ghost.endswith("no credential file: its settings wait for one")
        views = json.loads(ok(layout, "accounts", "--json"))
        assert [a["name"] for a in views["balancer"]] == [a["name"] for a in views["rescue"]] == ["a1"]
        absent = [(a["name"], a["settings"]["max_sessions"]) for a in views["accounts"] if a["state"] == "absent"]
        assert absent == [("ghost", 2)]
        assert [a["name"] for a in status(layout)["accounts"]] == ["a1"]
        write_credential(layout.credentials, "ghost", oauth_credential(planted))
        wait_until(lambda: "ghost" in {a["name"] for a in status(layout)["accounts"]}, "the file to bring ghost in")
        shown = {a["name"]: a for a in status(layout)["accounts"]}
        assert shown["ghost"]["settings"]["max_sessions"] == 2
        typo = cl(layout, "accounts", "pause", "a11")  # pausing a name with no file: a typo, unless forced
        assert (typo.returncode, typo.stderr) == (
            4,
            "cl: cl-balancer: there is no account a11 (no credentials-a11.json); --force pauses it before it lands\n",
        )
        forced = cl(layout, "accounts", "pause", "a11", "--force")
        assert (forced.returncode, forced.stdout) == (0, "a11: paused\n")


def test_bad_settings_are_refused_precisely(layout: Layout, planted: Planted) -> None:
    write_credential(layout.credentials, "a1", oauth_credential(planted))
    balancer = DaemonProcess("balancer", layout).start()
    try:
        for args, error in (
            (
                ["set", "a1", "colour=red"],
                "'colour=red': expected KEY=VALUE with KEY one of max_sessions, models, allow_overage, pause_at",
            ),
            (
                ["set", "a1", "max_sessions"],
                "'max_sessions': expected KEY=VALUE with KEY one of max_sessions, models, allow_overage, pause_at",
            ),
            (["set", "a1", "max_sessions=0"], "max_sessions=0: a whole number from 1, or empty for the default"),
            (["set", "a1", "allow_overage=maybe"], "allow_overage=maybe: yes or no (empty: no, the default)"),
            (["set", "a1", "pause_at=1.5"], "pause_at=1.5: a utilization like 0.9 or 90% (empty: never)"),
            (["set", "a1", "pause_at=nine"], "pause_at=nine: a utilization like 0.9 or 90% (empty: never)"),
            (["pause", "no such/name"], 'cl-balancer: "account" must be an account name (letters, digits, - and _)'),
        ):
            result = cl(layout, "accounts", *args)
            assert (result.returncode, result.stderr.strip()) == (2, f"cl: {error}"), args
        refused = balancer.request({"request": "account", "account": "a1", "models": []})
        assert refused["code"] == "bad-request"
        refused = balancer.request({"request": "account", "account": "a1", "pause_at": 0})
        assert refused["error"] == '"pause_at" must be a utilization above 0 and at most 1, or null'
        refused = balancer.request({"request": "account", "account": "a1", "pause_at": True})
        assert refused["code"] == "bad-request"
        assert balancer.request({"request": "account", "account": "a1"})["error"].startswith("nothing to change")
        assert balancer.request({"request": "settings"})["settings"] == []  # nothing refused was kept
    finally:
        balancer.stop()


def test_pause_at_keeps_new_work_off_an_account_whose_window_is_that_full(layout: Layout, planted: Planted) -> None:
    for name in ("a1", "a2"):
        write_credential(layout.credentials, name, oauth_credential(planted))
    reset = {"seven_day": time.time() + 86400}
    stored(layout, lambda store: store.record_usage("a1", {"seven_day": 0.92}, time.time(), resets=reset))
    stored(layout, lambda store: store.record_usage("a2", {"seven_day": 0.91}, time.time(), resets=reset))
    with both(layout):
        assert ok(layout, "accounts", "set", "a2", "pause_at=90%") == "a2: pause at 90%\n"
        job = submit(layout, "to a1: a2 is emptier, but past its pause_at")
        wait_until(lambda: job_states(layout)[job] == "done", "the job to run")
        assert ok(layout, "accounts", "set", "a1", "pause_at=0.9") == "a1: pause at 90%\n"
        waits = submit(layout, "waits: both past their pause_at")
        wait_until(lambda: "queued" in ok(layout, "status"), "the job to wait")
        assert job_states(layout)[waits] == "queued"
        assert ok(layout, "accounts", "set", "a1", "pause_at=") == "a1: -\n"
        wait_until(lambda: job_states(layout)[waits] == "done", "the job to run once a1's pause_at is gone")
        assert accounts_of(layout) == {job: "a1", waits: "a1"}
