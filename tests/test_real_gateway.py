"""The real Claude Code CLI (pinned) in gateway mode: it holds a capability, cl-gateway holds the
tokens, the fake API on 127.0.0.1 sees only the accounts' real credentials.

First what the gateway relies on, measured on the CLI alone (docs/claude-code.md, fact 16);
then the CLI through cl: a quota 429 answered on another account within the same turn, a wall
with no room held and resumed in the same process, the seed's afternoon, and a refresh.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_gateway import Gateway, account, capability_of, oauth_file, running, runs_of

from cl import capability
from cl.claude_code.environment import QUIET
from cl.store import Store
from real_cli import OLDER, install
from utils import FakeApi, Layout, Planted, cl, job_state_set, job_states, status, stored, wait_until, write_credential

pytestmark = pytest.mark.as_installed  # the real CLI runs as its own user (as root, as CI runs)


@pytest.fixture
def gateway(layout: Layout, fake_api: FakeApi, claude_bin: Path) -> Iterator[Gateway]:
    home = layout.root / "home"
    home.mkdir()
    with running(layout, fake_api, CL_CLAUDE_BIN=str(claude_bin), HOME=str(home)) as gateway:
        yield gateway


def older(version: str) -> Path:
    path, why = install(version)
    if path is None:
        pytest.skip(f"Claude Code {version} is not available: {why}")
    return path


def one_turn(claude_bin: Path, root: Path, api: FakeApi, **env: str) -> list[dict[str, Any]]:
    """The CLI alone, one turn against the fake API: its stream-json events."""
    config = root / "config"
    work = root / "work"
    work.mkdir(parents=True, exist_ok=True)
    config.mkdir(exist_ok=True)
    base = {"PATH": os.environ["PATH"], "HOME": str(config), "CLAUDE_CONFIG_DIR": str(config)}
    line = json.dumps({"type": "user", "message": {"role": "user", "content": "hi"}}) + "\n"
    done = subprocess.run(
        [str(claude_bin), "-p", "--input-format", "stream-json", "--output-format", "stream-json", "--verbose"],
        input=line,
        capture_output=True,
        text=True,
        cwd=work,
        env={**base, **QUIET, "ANTHROPIC_BASE_URL": api.url, **env},
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_the_cli_in_subscription_mode_on_a_capability_file_and_not_on_auth_token(
    claude_bin: Path, fake_api: FakeApi, tmp_path: Path
) -> None:
    """Fact 16: a `.credentials.json` whose access token is the capability (no refresh token, far
    expiry) keeps the CLI a subscription client: bearer, the OAuth beta flag, `rate_limit_event`s,
    and it never rewrites the file. `ANTHROPIC_AUTH_TOKEN` sends the same bearer, but as an API
    user: no OAuth beta, no `rate_limit_event`. So the gateway gives the CLI the file."""
    held = capability.new()
    (tmp_path / "file" / "config").mkdir(parents=True)
    credential = tmp_path / "file" / "config" / ".credentials.json"
    credential.write_bytes(capability.credential_file(held))
    as_file = one_turn(claude_bin, tmp_path / "file", fake_api)
    as_variable = one_turn(claude_bin, tmp_path / "variable", fake_api, ANTHROPIC_AUTH_TOKEN=held)
    by_file, by_variable = fake_api.messages()
    assert by_file["auth"] == by_variable["auth"] == "bearer"
    assert by_file["cred_tail"] == by_variable["cred_tail"] == held[-6:]
    assert "oauth-2025-04-20" in by_file["beta"]
    assert "oauth-2025-04-20" not in by_variable["beta"]
    assert any(event["type"] == "rate_limit_event" for event in as_file)
    assert not any(event["type"] == "rate_limit_event" for event in as_variable)
    assert credential.read_bytes() == capability.credential_file(held)  # never refreshed, never rewritten
    assert "x-claude-code-session-id" in by_file["header_names"]


@pytest.mark.parametrize("version", OLDER)
def test_older_clis_take_a_capability_file_as_a_subscription_credential(
    version: str, fake_api: FakeApi, tmp_path: Path
) -> None:
    """Fact 18: 2.0.77 and 1.0.128 too send the capability as a bearer with the OAuth beta flag,
    only to `/v1/messages`, and leave the file alone. (They print no `rate_limit_event`: in gateway
    mode the walls come from the API's headers, so nothing is lost.)"""
    held = capability.new()
    (tmp_path / "config").mkdir()
    credential = tmp_path / "config" / ".credentials.json"
    credential.write_bytes(capability.credential_file(held))
    events = one_turn(older(version), tmp_path, fake_api)
    assert [e for e in events if e["type"] == "result"][-1]["is_error"] is False
    requests = fake_api.requests()
    assert requests
    assert {r["path"].split("?")[0] for r in requests} == {"/v1/messages"}
    assert {(r["auth"], r["cred_tail"]) for r in requests} == {("bearer", held[-6:])}
    assert all("oauth-2025-04-20" in r["beta"] for r in requests)
    assert credential.read_bytes() == capability.credential_file(held)


def test_real_cli_a_quota_429_is_answered_on_another_account_in_the_same_turn(
    gateway: Gateway, layout: Layout, planted: Planted
) -> None:
    a1 = account(layout, planted, "a1")
    a2 = account(layout, planted, "a2")
    gateway.api.limit(a1, 0)
    job = json.loads(cl(layout, "submit", "--cwd", str(layout.work), "--prompt", "hello", "--json").stdout)["job"]
    wait_until(lambda: job_states(layout).get(job) == "done", "the session to finish on a2", timeout=120)
    requests = gateway.api.messages()
    assert [(r["cred_tail"], r["walled"]) for r in requests] == [(a1[-6:], True), (a2[-6:], False)]
    assert requests[0]["session"] == requests[1]["session"]  # the same request of the same session
    assert requests[0]["messages"] == requests[1]["messages"]
    result = json.loads(cl(layout, "result", str(job), "--json").stdout)
    assert result["is_error"] is False  # the CLI's turn succeeded: it never saw the 429
    first, moved = runs_of(layout, job)
    assert (first.account, moved.account, moved.live, moved.pid) == ("a1", "a2", True, first.pid)
    story = json.loads(cl(layout, "job", str(job), "--json").stdout)
    assert [(m["to"], m["how"]) for m in story["moves"]] == [("a2", "live")]
    assert capability_of(layout, job).startswith("cl-cap-")


def test_real_cli_moves_early_at_its_next_turn_when_its_account_crosses_move_at(
    gateway: Gateway, layout: Layout, planted: Planted
) -> None:
    """a1's answers say 96% of its 5-hour window, resetting in 2 hours: the session's next turn
    (a follow-up, `cl send`) goes to a2, in the same process, and no request fails."""
    a1 = account(layout, planted, "a1")
    a2 = account(layout, planted, "a2")
    gateway.api.windows(a1, five_hour=(0.96, time.time() + 7200))
    job = json.loads(cl(layout, "submit", "--cwd", str(layout.work), "--prompt", "[[slow: 4]] one", "--json").stdout)[
        "job"
    ]
    wait_until(gateway.api.messages, "the first turn's request", timeout=120)
    assert cl(layout, "send", str(job), "two").returncode == 0  # taken after the turn, by the same CLI
    wait_until(
        lambda: len(runs_of(layout, job)) == 3 and job_states(layout).get(job) == "done", "turn two", timeout=120
    )
    requests = gateway.api.messages()
    assert [(r["cred_tail"], r["walled"]) for r in requests] == [(a1[-6:], False), (a2[-6:], False)]
    assert requests[0]["session"] == requests[1]["session"]
    first, follow, moved = runs_of(layout, job)
    assert [r.account for r in (first, follow, moved)] == ["a1", "a1", "a2"]
    assert (moved.pid, moved.live) == (first.pid, True)  # the same CLI went on
    (move,) = json.loads(cl(layout, "job", str(job), "--json").stdout)["moves"]
    assert move["why"].startswith("moved early: a1 at 96% of 5h, resets in 1h5"), move
    assert json.loads(cl(layout, "result", str(job), "--json").stdout)["is_error"] is False


def test_real_cli_moves_early_inside_a_turn_at_its_next_request(
    gateway: Gateway, layout: Layout, planted: Planted
) -> None:
    """The answer that says a1 crossed move_at calls a tool: the request with the tool's result,
    the same turn's next, goes to a2 (the CLI sends the whole conversation with each request)."""
    a1 = account(layout, planted, "a1")
    a2 = account(layout, planted, "a2")
    gateway.api.windows(a1, five_hour=(0.96, time.time() + 7200))
    job = json.loads(cl(layout, "submit", "--cwd", str(layout.work), "--prompt", "[[bash: true]]", "--json").stdout)
    wait_until(lambda: job_states(layout).get(job["job"]) == "done", "the turn to end", timeout=120)
    first, result = gateway.api.messages()[:2]
    assert (first["cred_tail"], result["cred_tail"], result["messages"][-1]) == (a1[-6:], a2[-6:], "[tool_result]")
    assert result["session"] == first["session"]
    assert {r["cred_tail"] for r in gateway.api.messages()[1:]} == {a2[-6:]}


def test_real_cli_tries_again_after_a_plain_429_and_no_account_is_benched(
    gateway: Gateway, layout: Layout, planted: Planted
) -> None:
    """A 429 without the unified headers (the API limiting requests, not the account's usage):
    the gateway passes it on as it is, the real CLI tries again after `retry-after` (1 s) and its
    turn succeeds on a1. Nothing walled, nothing moved."""
    a1 = account(layout, planted, "a1")
    account(layout, planted, "a2")
    gateway.api.refuse(a1, 429)
    job = json.loads(cl(layout, "submit", "--cwd", str(layout.work), "--prompt", "hello", "--json").stdout)["job"]
    wait_until(lambda: job_states(layout).get(job) == "done", "the session to finish on a1", timeout=120)
    requests = gateway.api.messages()
    assert [(r["cred_tail"], r.get("refused")) for r in requests] == [(a1[-6:], 429), (a1[-6:], None)]
    assert [run.account for run in runs_of(layout, job)] == ["a1"]
    assert stored(layout, Store.walls) == {}
    result = json.loads(cl(layout, "result", str(job), "--json").stdout)
    assert result["is_error"] is False


def test_real_cli_a_model_windows_wall_moves_its_session_and_leaves_other_models_on_the_account(
    gateway: Gateway, layout: Layout, planted: Planted
) -> None:
    """a1's Opus window is spent: the real CLI's Opus session goes on on a2 in the same turn, and a
    Sonnet job still runs on a1."""
    a1, a2 = account(layout, planted, "a1"), account(layout, planted, "a2")
    gateway.api.model_wall(a1, "opus", "seven_day_opus")

    def submitted(model: str) -> int:
        argv = ("submit", "--cwd", str(layout.work), "--prompt", "hello", "--model", model, "--json")
        job: int = json.loads(cl(layout, *argv).stdout)["job"]
        wait_until(lambda: job_states(layout).get(job) == "done", f"the {model} session to finish", timeout=120)
        return job

    opus = submitted("claude-opus-4-5")
    assert cl(layout, "accounts", "pause", "a2").returncode == 0  # a1 or nothing, whatever the policy
    sonnet = submitted("claude-sonnet-4-5")
    assert [(run.account, run.state) for run in runs_of(layout, opus)] == [("a1", "walled"), ("a2", "done")]
    assert [run.account for run in runs_of(layout, sonnet)] == ["a1"]
    assert [(r["cred_tail"], r["walled"]) for r in gateway.api.messages()] == [
        (a1[-6:], True),
        (a2[-6:], False),
        (a1[-6:], False),
    ]


def test_real_cli_past_its_windows_pays_overage_for_one_answer_and_goes_on_elsewhere(
    gateway: Gateway, layout: Layout, planted: Planted
) -> None:
    """a1's windows are used up and the API bills its answers as overage. The turn's first answer
    (a tool call) was paid for and reaches the CLI; a1 is walled, and the same turn's next request
    (the tool's result) never reaches the API on a1: it is moved in flight to a2."""
    a1, a2 = account(layout, planted, "a1"), account(layout, planted, "a2")
    gateway.api.overage(a1)
    prompt = "look [[bash: true]]"
    job = json.loads(cl(layout, "submit", "--cwd", str(layout.work), "--prompt", prompt, "--json").stdout)["job"]
    wait_until(lambda: job_states(layout).get(job) == "done", "the session to finish on a2", timeout=120)
    first, *rest = [r["cred_tail"] for r in gateway.api.messages()]
    assert (first, set(rest)) == (a1[-6:], {a2[-6:]})  # the tool's result and what follows: on a2
    assert [(run.account, run.state) for run in runs_of(layout, job)] == [("a1", "walled"), ("a2", "done")]
    assert stored(layout, Store.walls)["a1"].kind == "overage"
    assert json.loads(cl(layout, "result", str(job), "--json").stdout)["is_error"] is False


def test_an_older_cli_through_the_gateway_is_moved_in_flight_too(
    layout: Layout, fake_api: FakeApi, planted: Planted
) -> None:
    """2.0.77, whose side queries go out beside the main request: each request that met a1's wall
    (two at once, here) is answered on a2, the CLI sees no wall, one CLI start, the job done."""
    home = layout.root / "home"
    home.mkdir()
    with running(layout, fake_api, CL_CLAUDE_BIN=str(older("2.0.77")), HOME=str(home)) as gateway:
        a1 = account(layout, planted, "a1")
        a2 = account(layout, planted, "a2")
        gateway.api.limit(a1, 0)
        job = json.loads(cl(layout, "submit", "--cwd", str(layout.work), "--prompt", "hi", "--json").stdout)["job"]
        wait_until(lambda: job_states(layout).get(job) == "done", "the session to finish on a2", timeout=120)
        seen = [(r["cred_tail"], r["walled"]) for r in gateway.api.messages()]
        log = gateway.gateway.log()
        result = json.loads(cl(layout, "result", str(job), "--json").stdout)
    assert seen[0] == (a1[-6:], True)
    assert set(seen) == {(a1[-6:], True), (a2[-6:], False)}  # a1's answers all walls, a2's all answers
    walled = seen.count((a1[-6:], True))
    assert log.count("request moved in flight") == walled  # each walled request answered on a2
    assert result["is_error"] is False
    assert len({run.pid for run in runs_of(layout, job)}) == 1


def test_real_cli_walled_with_no_room_is_held_and_goes_on_in_the_same_process_when_a_file_lands(
    gateway: Gateway, layout: Layout, planted: Planted
) -> None:
    a1 = account(layout, planted, "a1")
    gateway.api.limit(a1, 0)
    job = json.loads(cl(layout, "submit", "--cwd", str(layout.work), "--prompt", "hello", "--json").stdout)["job"]
    wait_until(lambda: "session held for a live move" in gateway.balancer.log(), "the session held", timeout=120)
    assert status(layout)["waiting"]["reason"] == "no-eligible-account"
    a2 = account(layout, planted, "a2")
    wait_until(lambda: job_states(layout).get(job) == "done", "the session to go on on a2", timeout=120)
    walled, moved = gateway.api.messages()
    assert (walled["cred_tail"], walled["walled"], moved["cred_tail"]) == (a1[-6:], True, a2[-6:])
    assert moved["session"] == walled["session"]
    assert any(m.endswith("hello\n | continue") for m in moved["messages"])  # the wall's prompt, then the resume
    story = json.loads(cl(layout, "job", str(job), "--json").stdout)
    assert [(m["to"], m["how"]) for m in story["moves"]] == [("a2", "live")]
    pids = {run.pid for run in runs_of(layout, job)}
    assert len(pids) == 1  # one worker, one CLI start


def test_real_cli_the_seed_afternoon_through_the_gateway(gateway: Gateway, layout: Layout, planted: Planted) -> None:
    """Three accounts wall while their sessions run; a fourth file lands; every session goes on
    there live, and only the gateway ever sent a token to the API."""
    for name in ("a1", "a2", "a3"):
        gateway.api.limit(account(layout, planted, name), 0)
    for i in range(3):
        cl(layout, "submit", "--cwd", str(layout.work), "--prompt", f"step one of task {i}")
    wait_until(lambda: "sessions=3" in gateway.rescue.log(), "all three sessions to wait", timeout=120)
    a4 = account(layout, planted, "a4")
    wait_until(lambda: job_state_set(layout) == {"done"}, "every session to finish on a4", timeout=120)
    jobs = json.loads(cl(layout, "jobs", "--all", "--json").stdout)
    for job in jobs:
        story = json.loads(cl(layout, "job", str(job["id"]), "--json").stdout)
        assert (story["moves"][-1]["to"], story["moves"][-1]["how"]) == ("a4", "live")
        assert len({run.pid for run in runs_of(layout, job["id"])}) == 1
    on_a4 = [r for r in gateway.api.messages() if r["cred_tail"] == a4[-6:]]
    assert len(on_a4) == 3
    held = {capability_of(layout, job["id"])[-6:] for job in jobs}
    assert not held & {r["cred_tail"] for r in gateway.api.messages()}  # no capability reached the API
    assert {r["path"] for r in gateway.api.requests()} == {"/v1/messages?beta=true"}
    assert "request refused" not in gateway.gateway.log()  # the CLI asked for nothing else (its HEAD / aside)


def test_real_cli_runs_on_a_token_the_gateway_refreshed(gateway: Gateway, layout: Layout, planted: Planted) -> None:
    soon = int((time.time() + 60) * 1000)
    path = write_credential(layout.credentials, "a1", oauth_file(planted, expires_ms=soon))
    job = json.loads(cl(layout, "submit", "--cwd", str(layout.work), "--prompt", "hello", "--json").stdout)["job"]
    wait_until(lambda: job_states(layout).get(job) == "done", "the session to finish", timeout=120)
    issued = gateway.api.get("/_fake/tokens")
    planted.tokens += issued
    access = json.loads(path.read_text())["claudeAiOauth"]["accessToken"]
    assert access in issued
    assert [r["cred_tail"] for r in gateway.api.messages()] == [access[-6:]]
    (refresh,) = [r for r in gateway.api.requests() if r["path"] == "/v1/oauth/token"]
    assert refresh["outcome"] == "ok"


def test_real_cli_waits_out_a_gateway_restart(gateway: Gateway, layout: Layout, planted: Planted) -> None:
    """The gateway is down when the CLI sends its request (killed; systemd restarts it within a
    second): the CLI retries a refused connection, and its request goes through once the gateway
    is back. Nothing was lost: the job is done in one CLI start."""
    account(layout, planted, "a1")
    gateway.gateway.stop(signal.SIGKILL)
    job = json.loads(cl(layout, "submit", "--cwd", str(layout.work), "--prompt", "hello", "--json").stdout)["job"]
    wait_until(lambda: capability_file(layout, job).exists(), "the CLI to start without its gateway", timeout=60)
    time.sleep(2)  # the CLI meets a closed port, as it would while systemd restarts the gateway
    gateway.gateway.start()
    wait_until(lambda: job_states(layout).get(job) == "done", "the session to finish", timeout=120)
    (run,) = runs_of(layout, job)
    assert run.log_path is not None
    assert '"subtype":"api_retry"' in Path(run.log_path).read_text()  # it did meet the closed port
    assert [r["walled"] for r in gateway.api.messages()] == [False]


def capability_file(layout: Layout, job: int) -> Path:
    return layout.sessions / f"job-{job}" / ".credentials.json"
