"""Gateway mode with real processes: cl-gateway between the CLIs and the fake API on 127.0.0.1.

The CLI holds a capability, never a token; the gateway forwards with the account's real
credential, takes walls from the API's headers, moves a session whose request met a wall before
the CLI sees it, and refreshes tokens, one refresh at a time per account. The fake CLI here
speaks HTTP to the gateway as the real one does (`tests/test_real_claude.py` has the real one).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import re
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cl.gateway import limits
from cl.gateway.proxy import Recorder
from cl.store import AsyncStore, Run, Store, WallRecord
from utils import (
    BIN,
    FAR_FUTURE_MS,
    DaemonProcess,
    FakeApi,
    Layout,
    Planted,
    api_key_credential,
    cl,
    fake_api_running,
    free_port,
    job_states,
    status,
    stored,
    submit,
    wait_until,
    write_credential,
)


@dataclass
class Gateway:
    """The three daemons in gateway mode, and what they talk to."""

    layout: Layout
    api: FakeApi
    address: str
    env: dict[str, str]
    balancer: DaemonProcess
    rescue: DaemonProcess
    gateway: DaemonProcess

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def logs(self) -> str:
        return self.balancer.log() + self.rescue.log() + self.gateway.log()


def gateway_env(layout: Layout, api: FakeApi, address: str, **extra: str) -> dict[str, str]:
    return layout.env(
        CL_GATEWAY="true",
        CL_GATEWAY_LISTEN=address,
        CL_GATEWAY_UPSTREAM=api.url,
        CL_OAUTH_TOKEN_URL=f"{api.url}/v1/oauth/token",
        **extra,
    )


@contextlib.contextmanager
def running(layout: Layout, api: FakeApi, **extra: str) -> Iterator[Gateway]:
    address = f"127.0.0.1:{free_port()}"
    env = gateway_env(layout, api, address, **extra)
    daemons = [DaemonProcess(name, layout, env=env) for name in ("gateway", "balancer", "rescue")]
    try:
        for daemon in daemons:
            daemon.start()
        yield Gateway(layout, api, address, env, daemons[1], daemons[2], daemons[0])
    finally:
        for daemon in reversed(daemons):
            if daemon.process is not None:
                daemon.stop()


@pytest.fixture
def gateway(layout: Layout, fake_api: FakeApi) -> Iterator[Gateway]:
    with running(layout, fake_api) as gateway:
        yield gateway


def oauth_file(planted: Planted, *, access: str | None = None, refresh: str | None = None, expires_ms: int) -> str:
    oauth = {
        "accessToken": access or planted.token(),
        "refreshToken": refresh or planted.token("sk-ant-ort01-"),
        "expiresAt": expires_ms,
        "scopes": ["user:inference"],
        "subscriptionType": "max",
    }
    return json.dumps({"claudeAiOauth": oauth})


def account(layout: Layout, planted: Planted, name: str, **kwargs: Any) -> str:
    """An OAuth account's file dropped in; its access token."""
    access = planted.token()
    write_credential(layout.credentials, name, oauth_file(planted, access=access, expires_ms=FAR_FUTURE_MS, **kwargs))
    return access


def runs_of(layout: Layout, job: int) -> list[Run]:
    return stored(layout, lambda store: store.job_runs(job))


def ledger(layout: Layout) -> list[dict[str, Any]]:
    return stored(layout, lambda store: store.ledger(10_000))


def walls(layout: Layout) -> dict[str, WallRecord]:
    return stored(layout, Store.walls)


def capability_of(layout: Layout, job: int) -> str:
    """What the job's CLI holds as its access token (the test reads the CLI's config dir as root)."""
    path = layout.sessions / f"job-{job}" / ".credentials.json"
    token: str = json.loads(path.read_text())["claudeAiOauth"]["accessToken"]
    return token


def ask(url: str, path: str, token: str | None, *, method: str = "POST", body: bytes = b"{}") -> tuple[int, bytes]:
    """One request to the gateway as a CLI would make it: its status and body."""
    headers = {"content-type": "application/json", "anthropic-version": "2023-06-01"}
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    request = urllib.request.Request(f"{url}{path}", data=body if method != "GET" else None, headers=headers)  # noqa: S310
    request.method = method
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - loopback
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def metrics(gateway: Gateway) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """What `cl-metrics` says now (it asks the three daemons), by name and labels."""
    out = gateway.layout.root / "metrics.prom"
    subprocess.run([str(BIN / "cl-metrics"), "--textfile", str(out)], env=gateway.env, check=True, timeout=60)
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(out.read_text())
        for sample in family.samples
    }


def message(text: str = "hello") -> bytes:
    return json.dumps(
        {"model": "claude-fake", "max_tokens": 10, "messages": [{"role": "user", "content": text}]}
    ).encode()


def test_the_cli_holds_a_capability_and_the_api_sees_the_accounts_token(
    gateway: Gateway, layout: Layout, planted: Planted
) -> None:
    token = account(layout, planted, "a1")
    job = submit(layout, "hello")
    wait_until(lambda: job_states(layout).get(job) == "done", "the job to finish through the gateway")
    (call,) = layout.claude_calls()
    assert call["auth"] == "oauth"
    assert call["token_tail"] not in {t[-6:] for t in planted.tokens}  # the CLI held no planted token
    assert not {"ANTHROPIC_API_KEY", "CLAUDE_CODE_OAUTH_TOKEN", "ANTHROPIC_AUTH_TOKEN"} & set(call["env_names"])
    (request,) = gateway.api.messages()
    assert request["cred_tail"] == token[-6:]  # the gateway put the account's real token in
    assert request["auth"] == "bearer"
    assert "oauth-2025-04-20" in request["beta"]
    assert "x-claude-code-session-id" in request["header_names"]
    held = capability_of(layout, job)
    assert held.startswith("cl-cap-")
    assert len(held) >= len("cl-cap-") + 43  # 256 bits, base64
    assert not planted.leaks(json.dumps(layout.claude_calls()), "the CLI's log")
    wait_until(
        lambda: stored(layout, Store.usage).get("a1", {}).get("five_hour") == 0.1, "the API's utilization recorded"
    )
    (shown,) = [a for a in json.loads(cl(layout, "status", "--json").stdout)["accounts"] if a["name"] == "a1"]
    assert shown["windows"]["five_hour"]["utilization"] == 0.1
    assert shown["windows"]["seven_day"]["resets"] > shown["windows"]["five_hour"]["resets"]  # the API's own resets
    assert re.search(r"a1 .* 10% \(resets in [0-9]", cl(layout, "status").stdout)
    labels = frozenset({("account", "a1"), ("window", "five_hour")})
    assert metrics(gateway)[("cl_account_window_reset_seconds", labels)] > time.time()


def test_an_api_key_account_gets_its_key_and_no_oauth_beta(gateway: Gateway, layout: Layout, planted: Planted) -> None:
    path = write_credential(layout.credentials, "k1", api_key_credential(planted))
    key = json.loads(path.read_text())["apiKey"]
    job = submit(layout, "hello")
    wait_until(lambda: job_states(layout).get(job) == "done", "the job to finish")
    (request,) = gateway.api.messages()
    assert (request["auth"], request["cred_tail"]) == ("x-api-key", key[-6:])
    assert "authorization" not in request["header_names"]
    assert "oauth-2025-04-20" not in (request["beta"] or "")


def test_a_quota_429_is_answered_on_another_account_and_the_cli_never_sees_it(
    gateway: Gateway, layout: Layout, planted: Planted
) -> None:
    a1 = account(layout, planted, "a1")
    a2 = account(layout, planted, "a2")
    gateway.api.limit(a1, 0)  # a1's next request walls
    job = submit(layout, "hello")
    wait_until(lambda: job_states(layout).get(job) == "done", "the job to finish on a2")
    (call,) = layout.claude_calls()  # one CLI start, one turn
    requests = gateway.api.messages()
    assert [(r["cred_tail"], r["walled"]) for r in requests] == [(a1[-6:], True), (a2[-6:], False)]
    wait_until(lambda: runs_of(layout, job)[-1].cache_creation_tokens, "the moved run's cache tokens recorded")
    first, moved = runs_of(layout, job)
    assert (first.account, first.state, first.error) == ("a1", "walled", "moved to a2 in flight")
    assert (moved.account, moved.state, moved.live, moved.pid) == ("a2", "done", True, first.pid)
    assert (moved.cache_read_tokens, moved.cache_creation_tokens) == (0, 100)  # a2's cache started cold
    assert moved.resume == call["session_id"]
    events = [(e["event"], e["account"]) for e in ledger(layout) if e["job_id"] == job]
    assert ("move started", "a2") in events
    wall = walls(layout)["a1"]
    assert (wall.source, wall.kind) == ("api", "five_hour")
    result = json.loads(cl(layout, "result", str(job), "--json").stdout)
    assert result["is_error"] is False  # the turn succeeded: the CLI never saw the 429
    story = cl(layout, "job", str(job)).stdout
    assert re.search(r"a1\s*->\s*a2|a1 → a2", story), story
    assert "request moved in flight" in gateway.gateway.log()
    assert "error_type=rate_limit_error said=" in gateway.gateway.log()  # the 429's body, read
    seen = metrics(gateway)
    assert seen[("cl_up", frozenset({("daemon", "gateway")}))] == 1
    gateway_label = frozenset({("daemon", "gateway")})
    assert seen[("cl_gateway_walls_total", gateway_label)] == 1
    assert seen[("cl_gateway_moves_in_flight_total", gateway_label)] == 1
    assert seen[("cl_gateway_requests_total", gateway_label)] == 1  # the answer on a2


def two_turns(gateway: Gateway, layout: Layout, after_first: Callable[[], object] = lambda: None) -> int:
    """A job whose CLI takes a follow-up after its first turn, in the same process: the first
    turn's answer is read (its windows with it), then `after_first`, then the second turn."""
    hold = layout.root / "hold-after"
    hold.touch()
    job = submit(layout, "first")
    wait_until(lambda: len(gateway.api.messages()) == 1, "the first turn's request")
    after_first()
    assert cl(layout, "send", str(job), "second").returncode == 0
    hold.unlink()
    wait_until(lambda: len(gateway.api.messages()) == 2, "the second turn's request")
    wait_until(lambda: job_states(layout).get(job) == "done", "the second turn to end")
    return job


@pytest.fixture
def holding(layout: Layout, fake_api: FakeApi) -> Iterator[Gateway]:
    """The daemons with the fake CLI told to wait after its first answer (`two_turns`)."""
    with running(layout, fake_api, FAKE_CLAUDE_HOLD_AFTER=str(layout.root / "hold-after")) as gateway:
        yield gateway


def test_a_session_whose_account_crosses_move_at_moves_at_its_next_turn_before_any_request_fails(
    holding: Gateway, layout: Layout, planted: Planted
) -> None:
    a1 = account(layout, planted, "a1")
    a2 = account(layout, planted, "a2")
    holding.api.windows(a1, five_hour=(0.96, time.time() + 2 * 3600 + 630))  # 2h10m (and a half) on
    job = two_turns(holding, layout)
    requests = holding.api.messages()
    assert [(r["cred_tail"], r["walled"]) for r in requests] == [(a1[-6:], False), (a2[-6:], False)]
    first, follow, moved = runs_of(layout, job)  # the follow-up's run began on a1, and moved
    assert [run.account for run in (first, follow, moved)] == ["a1", "a1", "a2"]
    assert (moved.live, moved.pid, moved.state) == (True, first.pid, "done")
    story = json.loads(cl(layout, "job", str(job), "--json").stdout)
    (move,) = story["moves"]
    assert move["why"] in {f"moved early: a1 at 96% of 5h, resets in 2h{m}m" for m in ("09", "10")}, move
    assert "moved early: a1 at 96% of 5h" in cl(layout, "job", str(job)).stdout
    assert "session moved early" in holding.gateway.log()
    assert walls(layout) == {}  # nothing walled: nothing failed
    assert metrics(holding)[("cl_gateway_early_moves_total", frozenset({("daemon", "gateway")}))] == 1


def test_a_session_holds_when_its_window_resets_before_its_account_would_use_it_up(
    holding: Gateway, layout: Layout, planted: Planted
) -> None:
    """a1 at 96%, its rate measured at nothing an hour (its reading 2 minutes ago the same): its
    reset in 5 minutes comes first, and a move would only cost the session its prompt cache. It
    stays, and the rescuer says why, once. (a2 is paused until the first turn: it starts on a1.)"""
    a1 = account(layout, planted, "a1")
    account(layout, planted, "a2")
    reset = time.time() + 300
    holding.api.windows(a1, five_hour=(0.96, reset))
    stored(layout, lambda store: store.record_usage("a1", {"five_hour": 0.96}, time.time() - 120,
                                                    resets={"five_hour": reset}))  # fmt: skip
    assert cl(layout, "accounts", "pause", "a2").returncode == 0
    job = two_turns(holding, layout, lambda: cl(layout, "accounts", "resume", "a2"))
    assert stored(layout, Store.windows)["a1"]["five_hour"].per_hour == 0.0
    assert {r["cred_tail"] for r in holding.api.messages()} == {a1[-6:]}
    assert json.loads(cl(layout, "job", str(job), "--json").stdout)["moves"] == []
    held = [line for line in holding.rescue.log().splitlines() if "session held" in line]
    assert len(held) == 1, held
    assert "before it would be used up" in held[0]


@pytest.mark.parametrize("ramp", [True, False])
def test_after_a_wall_the_work_waiting_for_the_account_is_ramped_onto_it(
    ramp: bool, layout: Layout, fake_api: FakeApi, planted: Planted
) -> None:
    """Three jobs meet a1's wall, the only account (or queue behind it), and wait. From then on
    every turn holds until the test lets it go. At the reset, with `ramp_after_wall`, a1 takes
    one (no burn rate measured yet: its window sustains one) and the others only once it has
    finished; without it, all three at once. `cl status` says what holds the rest."""
    hold = layout.root / "hold"
    with running(layout, fake_api, FAKE_CLAUDE_HOLD=str(hold), CL_RAMP_AFTER_WALL=str(ramp).lower()):
        a1 = account(layout, planted, "a1")
        fake_api.wall(a1, time.time() + 15)  # time for the three to meet it
        jobs = [submit(layout, f"task {number}") for number in range(3)]

        def waiting() -> bool:  # (queued before a1's wall was known, a job may yet be placed)
            return "a1" in walls(layout) and all(job_states(layout).get(job) in ("walled", "queued") for job in jobs)

        wait_until(waiting, "all three to wait for a1", timeout=60)
        hold.touch()
        since = time.time()

        def back() -> list[Run]:
            return [run for job in jobs for run in runs_of(layout, job) if run.created_at > since]

        wait_until(lambda: len(back()) == (1 if ramp else 3), "work back on a1 after its reset", timeout=60)
        if ramp:  # walled ones (the rescuer's) or queued ones (the balancer's): `cl status` says both
            said = lambda: re.search(r"\ba1\b.*the ramp after a wall", cl(layout, "status").stdout)  # noqa: E731
            wait_until(said, "cl status to say the ramp holds a1")
        hold.unlink()
        wait_until(lambda: all(job_states(layout).get(job) == "done" for job in jobs), "all three done", timeout=120)
        shown = lambda: re.search(r"a1 .*\(resets in [^)]*after a wall\)", cl(layout, "accounts").stdout)  # noqa: E731
        wait_until(shown, "cl accounts to show a1's 5-hour window as the one after its wall")
    spans = sorted((run.created_at, run.ended_at or math.inf) for run in back())
    overlapping = [(one, other) for one, other in itertools.pairwise(spans) if other[0] < one[1]]
    assert len(spans) == 3
    assert bool(overlapping) is not ramp, spans


def test_a_session_meeting_a_wall_moves_onto_an_account_the_ramp_holds_back(
    layout: Layout, fake_api: FakeApi, planted: Planted
) -> None:
    """a2 is after a wall (its 5-hour window read used up, reset since; no rate known): with one
    session live there, the ramp takes no new work to it (a job queues, and `cl status` says why).
    A session whose request meets a1's wall in flight moves there all the same: held back, it
    would see the wall while a2 has room."""
    keep = layout.root / "keep"
    hold_after = str(layout.root / "hold-after")
    env = {"FAKE_CLAUDE_HOLD": str(keep), "FAKE_CLAUDE_HOLD_MATCH": "keep", "FAKE_CLAUDE_HOLD_AFTER": hold_after}
    with running(layout, fake_api, CL_RAMP_AFTER_WALL="true", **env) as holding:
        a1 = account(layout, planted, "a1")
        a2 = account(layout, planted, "a2")
        now = time.time()
        stored(
            layout, lambda store: store.record_usage("a2", {"five_hour": 1.0}, now - 60, resets={"five_hour": now - 1})
        )
        shown = cl(layout, "accounts").stdout  # not read since its reset: empty, and after a wall
        assert re.search(r"a2 .* 0% \(reset \d+m\d\ds ago, was 100%, read [^,]+ ago, after a wall\)", shown), shown
        assert cl(layout, "accounts", "pause", "a1").returncode == 0
        keep.touch()
        kept = submit(layout, "keep going")
        wait_until(lambda: [run.state for run in runs_of(layout, kept)] == ["running"], "a session live on a2")
        queued = submit(layout, "waits")
        said = lambda: "a2 held by the ramp after a wall" in cl(layout, "status").stdout  # noqa: E731
        wait_until(said, "cl status to say the ramp holds a2")
        assert cl(layout, "cancel", str(queued)).returncode == 0
        assert cl(layout, "accounts", "resume", "a1").returncode == 0
        job = two_turns(holding, layout, lambda: holding.api.wall(a1, time.time() + 3600))
        keep.unlink()
    requests = [(r["cred_tail"], r["walled"]) for r in holding.api.messages()][:3]  # (the kept one's after)
    assert requests == [(a1[-6:], False), (a1[-6:], True), (a2[-6:], False)], requests
    assert runs_of(layout, job)[-1].account == "a2"


@pytest.mark.parametrize(("reset_in", "moved"), [(2.0, False), (200.0, True)])
def test_a_wall_that_resets_sooner_than_a_move_repays_is_waited_out_on_the_same_account(
    reset_in: float, moved: bool, layout: Layout, fake_api: FakeApi, planted: Planted
) -> None:
    """The session's first turn wrote its context (100 tokens) to a1's prompt cache, then it
    idled: it spent 125 input tokens' worth (a cache write costs 1.25 an input token) in 8 s or
    more, so a move (its context written cold, 1.15 more a token than read warm) costs it 7 s or
    more of its work. Its next request meets a1's wall: one that resets 2 s on is waited out at
    the gateway, and the request goes on on a1 at the reset; one 200 s on is not: it moves to a2.
    (`max_wait_for_reset` 300 s: the default, 0, never waits.)"""
    hold_after = str(layout.root / "hold-after")
    with running(layout, fake_api, FAKE_CLAUDE_HOLD_AFTER=hold_after, CL_MAX_WAIT_FOR_RESET="300") as holding:
        waits_or_moves(holding, layout, planted, reset_in, moved=moved)


def waits_or_moves(holding: Gateway, layout: Layout, planted: Planted, reset_in: float, *, moved: bool) -> None:
    a1 = account(layout, planted, "a1")
    a2 = account(layout, planted, "a2")
    assert cl(layout, "accounts", "pause", "a2").returncode == 0  # the first turn on a1
    started = time.time()
    until: list[float] = []

    def idle_then_walled() -> None:
        wait_until(lambda: time.time() > started + 8, "the session to have idled", timeout=60)
        until.append(time.time() + reset_in)
        holding.api.wall(a1, until[0])
        assert cl(layout, "accounts", "resume", "a2").returncode == 0

    job = two_turns(holding, layout, idle_then_walled)
    requests = holding.api.messages()
    then = a2[-6:] if moved else a1[-6:]
    assert [(r["cred_tail"], r["walled"]) for r in requests] == [(a1[-6:], False), (a1[-6:], True), (then, False)]
    waits = [line for line in holding.rescue.log().splitlines() if "session waits for its account's reset" in line]
    assert [run.account for run in runs_of(layout, job)][-1] == ("a2" if moved else "a1")
    assert len(waits) == (0 if moved else 1), waits
    if not moved:
        assert requests[2]["t"] >= until[0]  # sent again at the reset, not before
        assert json.loads(cl(layout, "job", str(job), "--json").stdout)["moves"] == []


def test_the_apis_warning_moves_a_session_early(holding: Gateway, layout: Layout, planted: Planted) -> None:
    a1 = account(layout, planted, "a1")
    a2 = account(layout, planted, "a2")
    holding.api.windows(a1, "allowed_warning", five_hour=(0.7, time.time() + 3600))
    job = two_turns(holding, layout)
    assert [r["cred_tail"] for r in holding.api.messages()] == [a1[-6:], a2[-6:]]
    (move,) = json.loads(cl(layout, "job", str(job), "--json").stdout)["moves"]
    assert move["why"].startswith("moved early: a1 at 70% of 5h"), move


def test_with_no_account_clearly_emptier_the_session_stays(holding: Gateway, layout: Layout, planted: Planted) -> None:
    a1 = account(layout, planted, "a1")
    account(layout, planted, "a2")
    reset = time.time() + 3600
    holding.api.windows(a1, five_hour=(0.96, reset))
    stored(
        layout, lambda store: store.record_usage("a2", {"five_hour": 0.85}, time.time(), resets={"five_hour": reset})
    )
    job = two_turns(holding, layout)
    assert {r["cred_tail"] for r in holding.api.messages()} == {a1[-6:]}
    assert json.loads(cl(layout, "job", str(job), "--json").stdout)["moves"] == []
    assert "held: no account has clearly more room than a1" in holding.rescue.log()


def test_idle_accounts_are_read_with_the_clis_quota_check_and_cl_accounts_shows_their_windows(
    layout: Layout, fake_api: FakeApi, planted: Planted
) -> None:
    """No session used a1 or a2: the gateway reads both with a one-token `quota` request, as the
    CLI checks its quota; a1's answer is a wall (recorded), a2's windows show with their age."""
    a1 = account(layout, planted, "a1")
    a2 = account(layout, planted, "a2")
    fake_api.limit(a1, 0)
    fake_api.windows(a2, five_hour=(0.42, time.time() + 3600 + 30), seven_day=(0.2, time.time() + 3 * 86400 + 30))
    with running(layout, fake_api, CL_PROBE_INTERVAL="3600"):
        wait_until(lambda: len(stored(layout, Store.windows)) == 2, "both accounts' windows read")
        probes = fake_api.messages()
        assert sorted((r["cred_tail"], r["messages"], r["max_tokens"]) for r in probes) == sorted(
            [(a1[-6:], ["quota"], 1), (a2[-6:], ["quota"], 1)]
        )
        assert walls(layout)["a1"].kind == "five_hour"
        table = cl(layout, "accounts").stdout
        row = next(line for line in table.splitlines() if line.startswith("a2"))
        assert re.search(r"42% \(resets in (59m\d\ds|1h00m), read 0m\d\ds ago\)", row), table
        assert re.search(r"20% \(resets in 3d0h, read 0m\d\ds ago\)", row), table
        shown = {a["name"]: a["windows"] for a in json.loads(cl(layout, "accounts", "--json").stdout)["accounts"]}
        assert shown["a2"]["five_hour"]["utilization"] == 0.42
        assert len(fake_api.messages()) == 2  # read once in its interval
        assert {name: used["last_used_at"] for name, used in stored(layout, Store.usage).items()} == {
            "a1": None,
            "a2": None,
        }  # read, not used


async def test_a_probe_of_an_idle_account_is_not_a_use_of_it_and_an_answer_to_a_session_is(store: Store) -> None:
    """The last use orders `round-robin` (and `headroom`'s ties): the probe reading an idle account
    every interval must not make it look busy. A session's answer in the same interval is a use."""
    async_store = AsyncStore(store)
    recorder = Recorder(async_store, burn_step=60.0)
    reading = limits.Reading(utilization={"five_hour": 0.1}, resets={"five_hour": time.time() + 3600})
    recorder.usage("a1", reading, idle=True)
    recorder.usage("a2", reading)
    recorder.usage("a2", reading, idle=True)  # read again before the write: still used in the interval
    await recorder.flush()
    assert {name: used["last_used_at"] is not None for name, used in store.usage().items()} == {"a1": False, "a2": True}
    assert store.windows()["a1"]["five_hour"].utilization == 0.1
    async_store.close()


def submit_for(layout: Layout, prompt: str, model: str) -> int:
    result = cl(layout, "submit", "--cwd", str(layout.work), "--prompt", prompt, "--model", model, "--json")
    assert result.returncode == 0, result.stderr
    job: int = json.loads(result.stdout)["job"]
    return job


def test_a_model_windows_wall_moves_that_models_session_and_leaves_the_account_to_the_others(
    gateway: Gateway, layout: Layout, planted: Planted
) -> None:
    """a1's Opus window is spent (the API's 429 claims `seven_day_opus`): the Opus session moves
    to a2 in flight, and a1 is walled for Opus only. A job that names no model does not go to a1
    (its model is the CLI's default, which may be Opus); a Sonnet job does."""
    a1, a2 = account(layout, planted, "a1"), account(layout, planted, "a2")
    gateway.api.model_wall(a1, "opus", "seven_day_opus")
    opus = submit_for(layout, "opus work", "claude-opus-4-5")
    wait_until(lambda: job_states(layout).get(opus) == "done", "the Opus session to go on on a2")
    assert [(run.account, run.state) for run in runs_of(layout, opus)] == [("a1", "walled"), ("a2", "done")]
    assert "a1" not in walls(layout)  # the account is not walled ...
    assert stored(layout, Store.model_walls)["a1"].keys() == {"opus"}  # ... its Opus window is
    (a1_shown,) = [a for a in json.loads(cl(layout, "status", "--json").stdout)["accounts"] if a["name"] == "a1"]
    assert (a1_shown["walled_until"], list(a1_shown["model_walls"])) == (None, ["opus"])
    assert re.search(r"a1\s+ok, opus walled until", cl(layout, "status").stdout)
    default = submit(layout, "no model named")
    wait_until(lambda: job_states(layout).get(default) == "done", "the default-model job to finish")
    assert cl(layout, "accounts", "pause", "a2").returncode == 0  # a1 or nothing, whatever the policy
    sonnet = submit_for(layout, "sonnet work", "claude-sonnet-4-5")
    wait_until(lambda: job_states(layout).get(sonnet) == "done", "the Sonnet job to finish")
    assert [run.account for run in runs_of(layout, default)] == ["a2"]
    assert [run.account for run in runs_of(layout, sonnet)] == ["a1"]
    assert [(r["cred_tail"], r["walled"]) for r in gateway.api.messages()] == [
        (a1[-6:], True),
        (a2[-6:], False),
        (a2[-6:], False),
        (a1[-6:], False),
    ]


@pytest.mark.parametrize("allowed", [False, True])
def test_paid_overage_walls_its_account_unless_the_operator_allowed_it(
    allowed: bool, gateway: Gateway, layout: Layout, planted: Planted
) -> None:
    """a1's windows are used up and the API answers as billed overage. That answer, paid for,
    reaches the CLI; a1 is then walled until its window resets (`overage`) and the next job
    goes to a2. With `allow_overage=yes` for a1 nothing is walled and the next job may go there."""
    a1, a2 = account(layout, planted, "a1"), account(layout, planted, "a2")
    if allowed:
        assert cl(layout, "accounts", "set", "a1", "allow_overage=yes").returncode == 0
    assert cl(layout, "accounts", "pause", "a2").returncode == 0
    gateway.api.overage(a1)
    first = submit(layout, "on a1, past its windows")
    wait_until(lambda: job_states(layout).get(first) == "done", "the first job to finish on a1")
    assert cl(layout, "accounts", "resume", "a2").returncode == 0
    if allowed:
        assert walls(layout) == {}
        return
    wall = walls(layout)["a1"]
    assert (wall.kind, wall.source) == ("overage", "api")
    assert "paid overage used: account walled" in gateway.gateway.log()
    second = submit(layout, "not on a1")
    wait_until(lambda: job_states(layout).get(second) == "done", "the second job to finish")
    assert [run.account for run in runs_of(layout, second)] == ["a2"]
    assert [r["cred_tail"] for r in gateway.api.messages()] == [a1[-6:], a2[-6:]]


@pytest.mark.parametrize("status", [529, 429])
def test_an_overloaded_or_limiting_api_walls_nothing_and_the_cli_tries_again(
    status: int, gateway: Gateway, layout: Layout, planted: Planted
) -> None:
    """529 (overloaded) and a 429 without the unified headers (the API limiting requests, not the
    account's usage) go back to the CLI as they are, which tries again after their `retry-after`:
    no account is benched, no session moved, one CLI start, the turn done on a1."""
    a1 = account(layout, planted, "a1")
    account(layout, planted, "a2")
    gateway.api.refuse(a1, status, times=2)
    job = submit(layout, "hello")
    wait_until(lambda: job_states(layout).get(job) == "done", "the job to finish on a1")
    assert [(r["cred_tail"], r.get("refused")) for r in gateway.api.messages()] == [
        (a1[-6:], status),
        (a1[-6:], status),
        (a1[-6:], None),
    ]
    assert len(layout.claude_calls()) == 1
    assert [run.account for run in runs_of(layout, job)] == ["a1"]
    assert walls(layout) == {}
    assert "wall from the API" not in gateway.gateway.log()


def test_a_refused_credential_benches_its_account_and_the_request_goes_on_elsewhere(
    gateway: Gateway, layout: Layout, planted: Planted
) -> None:
    """The API refuses a1's token (401: revoked): a1 is benched for `wall_retry`, its file left as
    it is, and the same request is answered on a2; the CLI sees no error."""
    a1 = account(layout, planted, "a1")
    a2 = account(layout, planted, "a2")
    before = (layout.credentials / "credentials-a1.json").read_bytes()
    gateway.api.post("/_fake/revoke", {"access": a1})
    job = submit(layout, "hello")
    wait_until(lambda: job_states(layout).get(job) == "done", "the job to finish on a2")
    assert [(r["cred_tail"]) for r in gateway.api.requests() if "cred_tail" in r] == [a1[-6:], a2[-6:]]
    wall = walls(layout)["a1"]
    assert (wall.source, wall.kind) == ("api", "unauthorized")
    assert (layout.credentials / "credentials-a1.json").read_bytes() == before  # no credential written from a 401
    assert [r.account for r in runs_of(layout, job)] == ["a1", "a2"]


def test_with_no_room_the_wall_goes_through_and_the_same_process_goes_on_when_a_file_lands(
    gateway: Gateway, layout: Layout, planted: Planted
) -> None:
    a1 = account(layout, planted, "a1")
    gateway.api.limit(a1, 0)
    job = submit(layout, "hello")
    wait_until(lambda: "session held for a live move" in gateway.balancer.log(), "the walled session held")
    assert job_states(layout)[job] == "walled"
    assert status(layout)["waiting"]["reason"] == "no-eligible-account"
    a2 = account(layout, planted, "a2")
    wait_until(lambda: job_states(layout).get(job) == "done", "the session to go on on a2")
    first, second = layout.claude_calls()
    assert first["pid"] == second["pid"]  # the same process: the capability stayed
    assert second["prompt"] == "continue"
    assert [r["cred_tail"] for r in gateway.api.messages()] == [a1[-6:], a2[-6:]]
    assert [r.account for r in runs_of(layout, job)] == ["a1", "a2"]


def test_with_the_rescuer_down_the_wall_goes_through_and_the_session_moves_when_it_is_back(
    gateway: Gateway, layout: Layout, planted: Planted
) -> None:
    """The move in flight is the rescuer's decision: while it is down the 429 reaches the CLI, the
    session is held, and the rescuer moves it (live) once it is back."""
    a1 = account(layout, planted, "a1")
    account(layout, planted, "a2")
    gateway.api.limit(a1, 0)
    gateway.rescue.stop()
    job = submit(layout, "hello")
    wait_until(lambda: "session held for a live move" in gateway.balancer.log(), "the walled session held")
    assert "cannot ask the rescuer to move a session" in gateway.gateway.log()
    gateway.rescue.start()
    wait_until(lambda: job_states(layout).get(job) == "done", "the session to go on on a2")
    first, second = layout.claude_calls()
    assert first["pid"] == second["pid"]
    assert [r.account for r in runs_of(layout, job)] == ["a1", "a2"]


def test_a_capability_works_only_while_its_run_runs_and_only_for_inference(
    gateway: Gateway, layout: Layout, planted: Planted
) -> None:
    account(layout, planted, "a1")
    layout.hold.touch()  # the CLI's request waits: its run is running
    job = submit(layout, "hello")
    wait_until((layout.sessions / f"job-{job}" / ".credentials.json").exists, "the CLI's credential")
    wait_until(layout.claude_calls, "the CLI to start")
    held = capability_of(layout, job)
    assert ask(gateway.url, "/v1/messages?beta=true", held, body=message())[0] == 200
    for method, path in [
        ("POST", "/v1/oauth/token"),
        ("POST", "/api/oauth/profile"),
        ("GET", "/v1/models"),
        ("POST", "/v1/complete"),
        ("GET", "/_fake/tokens"),
    ]:
        assert ask(gateway.url, path, held, method=method)[0] == 404, path
    assert ask(gateway.url, "/v1/messages", "cl-cap-" + "x" * 43, body=message())[0] == 401
    assert ask(gateway.url, "/v1/messages", None, body=message())[0] == 401
    layout.hold.unlink()
    wait_until(lambda: job_states(layout).get(job) == "done", "the job to end")
    wait_until(lambda: ask(gateway.url, "/v1/messages", held, body=message())[0] == 401, "the capability to end")
    paths = {r["path"].split("?")[0] for r in gateway.api.requests()}
    assert paths == {"/v1/messages"}  # nothing else ever reached upstream


def test_what_the_cli_prints_walls_nothing_and_moves_nothing(
    gateway: Gateway, layout: Layout, planted: Planted
) -> None:
    """A CLI that prints a rejected `rate_limit_event` and a 429 result while the API let its
    request through: its turn ends, and that is all."""
    account(layout, planted, "a1")
    account(layout, planted, "a2")
    hostile = layout.root / "liar"
    hostile.write_text(
        "#!/bin/sh\nread line\n"
        'echo \'{"type":"system","subtype":"init","session_id":"8a6fec7c-0b60-4567-b67f-ff944e2feaae"}\'\n'
        'echo \'{"type":"rate_limit_event","rate_limit_info":{"status":"rejected","resetsAt":'
        f'{int(time.time()) + 8 * 86400},"rateLimitType":"seven_day"}}}}\'\n'
        'echo \'{"type":"result","subtype":"success","is_error":true,"api_error_status":429,'
        '"result":"You have hit your weekly limit","session_id":"8a6fec7c-0b60-4567-b67f-ff944e2feaae"}\'\n'
    )
    hostile.chmod(0o755)
    gateway.balancer.stop()
    balancer = DaemonProcess("balancer", layout, env={**gateway.env, "CL_CLAUDE_BIN": str(hostile)}).start()
    try:
        job = submit(layout, "lie")
        wait_until(lambda: job_states(layout).get(job) == "failed", "the lying turn to end")
        assert walls(layout) == {}
        assert [r.account for r in runs_of(layout, job)] == ["a1"]  # not moved
        assert not [e for e in ledger(layout) if e["event"] in ("move started", "wall recorded")]
        assert "the CLI reported a wall the API did not send" in balancer.log()
    finally:
        balancer.stop()


def test_an_answer_that_breaks_off_ends_that_turn_and_nothing_else(
    gateway: Gateway, layout: Layout, planted: Planted
) -> None:
    account(layout, planted, "a1")
    broken = submit(layout, "[[break]]")
    wait_until(lambda: job_states(layout).get(broken) == "failed", "the broken turn to fail")
    fine = submit(layout, "hello")
    wait_until(lambda: job_states(layout).get(fine) == "done", "the next job to run")
    log = gateway.gateway.log()
    assert "the API's answer broke off" in log
    assert "Traceback" not in log
    assert walls(layout) == {}


def test_the_gateway_refuses_to_run_in_direct_mode(layout: Layout, fake_api: FakeApi) -> None:
    """With `gateway = false` the CLIs refresh their accounts' tokens themselves: a gateway
    refreshing them too would be a second refresher, so it does not start."""
    env = {**gateway_env(layout, fake_api, f"127.0.0.1:{free_port()}"), "CL_GATEWAY": "false"}
    gateway = DaemonProcess("gateway", layout, env=env).start(wait=False)
    assert gateway.exit_code() == 2
    assert "gateway = false (direct mode)" in gateway.log()


def test_worker_env_may_not_steer_the_cli_past_the_gateway(layout: Layout, fake_api: FakeApi) -> None:
    (layout.root / "config.toml").write_text(f'[worker.env]\nANTHROPIC_BASE_URL = "{fake_api.url}"\n')
    env = gateway_env(layout, fake_api, f"127.0.0.1:{free_port()}")
    daemon = DaemonProcess("balancer", layout, env=env).start(wait=False)
    assert daemon.exit_code() == 2
    assert "[worker.env] sets ANTHROPIC_BASE_URL" in daemon.log()


def test_the_gateway_reports_the_same_accounts_as_the_daemons(
    gateway: Gateway, layout: Layout, planted: Planted
) -> None:
    for name in ("a1", "a2", "a3"):
        account(layout, planted, name)
    wait_until(
        lambda: all(
            set(d.file_states()) == {"a1", "a2", "a3"} for d in (gateway.gateway, gateway.balancer, gateway.rescue)
        ),
        "all three daemons to see the three accounts",
    )
    (layout.credentials / "credentials-a2.json").unlink()
    wait_until(
        lambda: all(set(d.file_states()) == {"a1", "a3"} for d in (gateway.gateway, gateway.balancer, gateway.rescue)),
        "all three daemons to see a2 gone",
    )


def test_refresh_ahead_of_expiry_writes_the_new_tokens_into_the_accounts_file(
    gateway: Gateway, layout: Layout, planted: Planted
) -> None:
    soon = int((time.time() + 60) * 1000)  # within the margin (300 s): due now
    old_access, old_refresh = planted.token(), planted.token("sk-ant-ort01-")
    path = write_credential(
        layout.credentials, "a1", oauth_file(planted, access=old_access, refresh=old_refresh, expires_ms=soon)
    )
    wait_until(lambda: json.loads(path.read_text())["claudeAiOauth"]["accessToken"] != old_access, "the refresh")
    refreshed = json.loads(path.read_text())["claudeAiOauth"]
    issued = gateway.api.get("/_fake/tokens")
    assert refreshed["accessToken"] in issued
    assert refreshed["refreshToken"] in issued
    assert refreshed["expiresAt"] > time.time() * 1000 + 3600_000
    assert refreshed["subscriptionType"] == "max"  # every other field kept
    (refresh,) = [r for r in gateway.api.requests() if r["path"] == "/v1/oauth/token"]
    assert refresh["outcome"] == "ok"
    assert refresh["refresh_tail"] == old_refresh[-6:]
    assert set(refresh["fields"]) == {"grant_type", "refresh_token", "client_id"}
    job = submit(layout, "hello")
    wait_until(lambda: job_states(layout).get(job) == "done", "a job on the refreshed account")
    assert gateway.api.messages()[-1]["cred_tail"] == refreshed["accessToken"][-6:]
    planted.tokens += issued  # the minted tokens too may appear in no log
    assert "token refreshed account=a1" in gateway.gateway.log()


def test_a_refused_refresh_token_makes_the_account_need_a_login_until_a_new_one_lands(
    gateway: Gateway, layout: Layout, planted: Planted
) -> None:
    refresh = planted.token("sk-ant-ort01-")
    gateway.api.post("/_fake/revoke", {"refresh": refresh})
    soon = int((time.time() + 60) * 1000)
    write_credential(layout.credentials, "a1", oauth_file(planted, refresh=refresh, expires_ms=soon))
    wait_until(lambda: "needs-login" in cl(layout, "accounts").stdout, "cl accounts to say needs-login")
    assert "needs-login" in cl(layout, "status").stdout
    job = submit(layout, "hello")
    wait_until(lambda: "no usable account" in cl(layout, "status").stdout or status(layout)["queue"], "the job waits")
    assert job_states(layout)[job] == "queued"  # no work goes to it
    assert "account needs login" in gateway.gateway.log()
    refused = [r for r in gateway.api.requests() if r["path"] == "/v1/oauth/token"]
    assert [r["outcome"] for r in refused] == ["invalid_grant"]  # presented once, never again
    seen = metrics(gateway)
    assert seen[("cl_account_state", frozenset({("account", "a1"), ("state", "needs-login")}))] == 1
    assert seen[("cl_token_refreshes_refused_total", frozenset({("daemon", "gateway")}))] == 1
    account(layout, planted, "a1")  # a new login, far from expiry
    wait_until(lambda: job_states(layout).get(job) == "done", "the job to run once logged in")
    assert "needs-login" not in cl(layout, "accounts").stdout


def test_an_operators_new_login_written_during_a_refresh_wins(layout: Layout, planted: Planted, tmp_path: Path) -> None:
    """The token endpoint answers slowly; meanwhile the operator copies a new login in. The
    refresh's compare-and-swap finds another refresh token in the file and leaves it."""
    with fake_api_running(tmp_path, "--token-delay", "2") as api, running(layout, api) as gateway:
        soon = int((time.time() + 60) * 1000)
        path = write_credential(layout.credentials, "a1", oauth_file(planted, expires_ms=soon))
        wait_until(lambda: any(r["path"] == "/v1/oauth/token" for r in api.requests()), "the refresh to start")
        login_access, login_refresh = planted.token(), planted.token("sk-ant-ort01-")
        login = oauth_file(planted, access=login_access, refresh=login_refresh, expires_ms=FAR_FUTURE_MS)
        write_credential(layout.credentials, "a1", login)
        wait_until(lambda: "new login kept" in gateway.gateway.log(), "the refresh to give way")
        assert planted.tokens_in(path) == (planted.name_of(login_access), planted.name_of(login_refresh))


HOSTILE = Path(__file__).resolve().parent / "fakes" / "hostile_gateway"


def test_a_hostile_cli_reaches_no_token_and_no_other_path(
    request: pytest.FixtureRequest, tmp_path: Path, fake_api: FakeApi, planted: Planted
) -> None:
    """The CLI's own user (as `make run` as root lays it out) looks for a real token in its
    environment, every file it can read, every process's /proc environ and command line, the
    gateway's answers to many paths (with its capability and without), an upstream that echoes
    its request's headers; then prints a wall the API never sent."""
    layout = request.getfixturevalue("separated") if os.getuid() == 0 else Layout(tmp_path / "plain")
    account(layout, planted, "a1")
    account(layout, planted, "a2")
    write_credential(layout.credentials, "k1", api_key_credential(planted))
    look = ":".join(str(p) for p in (layout.credentials, layout.state, layout.sessions, layout.runtime, layout.root))
    with running(layout, fake_api, CL_CLAUDE_BIN=str(HOSTILE), HOSTILE_LOOK=look) as gateway:
        job = submit(layout, "attack")
        wait_until(lambda: job_states(layout).get(job) == "failed", "the hostile turn to end", timeout=60)
        standing = walls(layout)
        runs = runs_of(layout, job)
        log = gateway.logs()
    loot = json.loads((layout.work / "loot.json").read_text())
    assert loot["files"], "the hostile CLI read nothing: the test would prove nothing"
    assert loot["env"]["ANTHROPIC_BASE_URL"] == gateway.url
    leaks = planted.leaks(json.dumps(loot), "what the hostile CLI reached")
    assert not leaks, leaks
    answers = {(a["method"], a["path"], a["header"], a["with"]): a["status"] for a in loot["gateway"]}
    for (method, path, _header, held), code in answers.items():
        if not held and (method, path) in (("POST", "/v1/messages"), ("POST", "/v1/messages/count_tokens")):
            assert code == 401, (method, path)
        elif (method, path.split("?")[0]) not in (("POST", "/v1/messages"), ("POST", "/v1/messages/count_tokens")):
            assert code == 404, (method, path, code)
    assert answers[("POST", "/v1/messages", "authorization", True)] == 200
    assert answers[("POST", "/v1/messages?beta=true", "authorization", True)] == 400  # the echo, scrubbed
    upstream = {r["path"].split("?")[0] for r in fake_api.requests()}
    assert upstream <= {"/v1/messages", "/v1/messages/count_tokens"}
    assert standing == {}  # the wall it printed walled nothing
    assert [r.account for r in runs] == [runs[0].account]  # and moved nothing
    assert "the CLI reported a wall the API did not send" in log


def test_a_refresh_under_way_is_written_down_when_the_gateway_stops(
    layout: Layout, planted: Planted, tmp_path: Path
) -> None:
    """SIGTERM while the token endpoint answers slowly: the endpoint rotates the refresh token as
    it answers, so the gateway writes the answer into the account's file before it exits."""
    with fake_api_running(tmp_path, "--token-delay", "2") as api, running(layout, api) as gateway:
        soon = int((time.time() + 60) * 1000)
        path = write_credential(layout.credentials, "a1", oauth_file(planted, expires_ms=soon))
        wait_until(lambda: any(r["path"] == "/v1/oauth/token" for r in api.requests()), "the refresh to start")
        assert gateway.gateway.stop() == 0
        issued = api.get("/_fake/tokens")
        planted.tokens += issued
        assert json.loads(path.read_text())["claudeAiOauth"]["refreshToken"] in issued
        assert "token refreshed account=a1" in gateway.gateway.log()
