"""The balancer with the real Claude Code CLI (pinned) against the local fake Anthropic API.

For an OAuth credential file and for an API key: placement, a session that finishes, a session
that walls (429 with the unified headers), the wall recorded with its reset, and the transcript
where our own path scheme says the CLI keeps it.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from cl.claude_code.transcripts import transcript_path
from utils import (
    POOL,
    DaemonProcess,
    FakeApi,
    Layout,
    Planted,
    api_key_credential,
    both,
    cl,
    job_state_set,
    job_states,
    job_view,
    json_lines,
    oauth_credential,
    wait_until,
    write_credential,
)

pytestmark = pytest.mark.as_installed  # the real CLI runs as its own user (as root, as CI runs)


def real_cli_env(layout: Layout, claude_bin: Path, fake_api: FakeApi | None, **extra: str) -> dict[str, str]:
    """The daemons' environment for the real CLI: a home of its own, the fake API if given."""
    home = layout.root / "home"
    home.mkdir()
    api = {"ANTHROPIC_BASE_URL": fake_api.url} if fake_api else {}
    return layout.env(CL_CLAUDE_BIN=str(claude_bin), HOME=str(home), **api, **extra)


@pytest.mark.parametrize("kind", ["oauth", "api-key"])
def test_real_cli_finishes_then_walls(
    kind: str, layout: Layout, planted: Planted, fake_api: FakeApi, claude_bin: Path
) -> None:
    content = oauth_credential(planted) if kind == "oauth" else api_key_credential(planted)
    write_credential(layout.credentials, "x", content)
    fake_api.limit(planted.tokens[0], 1)  # one message, then the wall
    env = real_cli_env(layout, claude_bin, fake_api)
    balancer = DaemonProcess("balancer", layout, env=env).start()
    try:
        first = json.loads(cl(layout, "submit", "--cwd", str(layout.work), "--prompt", "say hi", "--json").stdout)[
            "job"
        ]
        wait_until(lambda: job_view(layout, first)["state"] == "done", "the first session to finish")
        done = job_view(layout, first)
        assert done["account"] == "x"
        session_dir = layout.sessions / f"job-{first}"
        assert transcript_path(session_dir, str(layout.work), done["session_id"]).exists()

        second = json.loads(cl(layout, "submit", "--cwd", str(layout.work), "--prompt", "more", "--json").stdout)["job"]
        wait_until(lambda: job_view(layout, second)["state"] == "walled", "the second session to wall")
        account = json.loads(cl(layout, "status", "--json").stdout)["accounts"][0]
        assert account["walled_until"] is not None
        requests = fake_api.requests()
        assert [r["walled"] for r in requests] == [False, True]  # one request each, the wall not retried
        assert {r["cred_tail"] for r in requests} == {planted.tokens[0][-6:]}
        log = balancer.log()
        assert "wall recorded" in log
        if kind == "oauth":  # subscriptions get a rate_limit_event with the reset time
            assert "known_reset=True" in log
    finally:
        balancer.stop()


def test_real_cli_sessions_move_to_a_dropped_in_account_with_their_conversation(
    layout: Layout, planted: Planted, fake_api: FakeApi, claude_bin: Path
) -> None:
    """The seed's afternoon with the real client: three accounts wall, a fourth arrives, every
    session goes on there in the CLI that walled (a live move) and the fake API sees each earlier
    conversation under a4's token."""
    for name in ("a1", "a2", "a3"):
        write_credential(layout.credentials, name, oauth_credential(planted))
        fake_api.limit(planted.tokens[-2], 0)  # the access token (the refresh token came after it)
    env = real_cli_env(layout, claude_bin, fake_api)
    with both(layout, env=env) as (_balancer, rescue):
        prompts = [f"step one of task {i}" for i in range(3)]
        for prompt in prompts:
            cl(layout, "submit", "--cwd", str(layout.work), "--prompt", prompt)
        wait_until(lambda: "sessions=3" in rescue.log(), "all three sessions to wait", timeout=120)
        a4 = planted.token()
        write_credential(layout.credentials, "a4", oauth_credential(planted, token=a4))
        wait_until(lambda: job_state_set(layout) == {"done"}, "every session to finish on a4", timeout=120)
        jobs = json.loads(cl(layout, "jobs", "--all", "--json").stdout)
        stories = [json.loads(cl(layout, "job", str(job["id"]), "--json").stdout) for job in jobs]
    assert [(story["moves"][-1]["to"], story["moves"][-1]["how"]) for story in stories] == [("a4", "live")] * 3
    on_a4 = [r for r in fake_api.requests() if r["cred_tail"] == a4[-6:] and not r["walled"]]
    for prompt in prompts:  # each conversation went out again, under the new account's token
        assert sum(any(prompt in m for m in r["messages"]) for r in on_a4) == 1, prompt
    assert {job["account"] for job in jobs} == {"a4"}
    owners = {  # written by each job's CLI as its own user
        transcript_path(layout.sessions / f"job-{job['id']}", str(layout.work), job["session_id"]).stat().st_uid
        for job in jobs
    }
    if layout.sandboxed:
        assert len(owners) == 3, owners
        assert {pwd.getpwuid(uid).pw_name.rpartition("-")[0] for uid in owners} == {POOL}
    else:
        assert owners == {os.getuid()}


def cli_of(layout: Layout, job: int) -> int | None:
    """The pid of the CLI process running job `job` (its environment names the job's config dir)."""
    mark = f"CLAUDE_CONFIG_DIR={layout.sessions / f'job-{job}'}".encode()
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and mark in (entry / "environ").read_bytes().split(b"\0"):
                return int(entry.name)
        except OSError:
            continue
    return None


def test_real_cli_walled_right_after_a_tool_call_goes_on_live_in_the_same_process(
    layout: Layout, planted: Planted, fake_api: FakeApi, claude_bin: Path
) -> None:
    """The session runs a background shell, walls on the request that carries the tool's result,
    and goes on under a2 in the same process: the next request carries a2's token and the whole
    conversation (the tool call and its result), from the same CLI with the same session, while
    the shell it started still runs."""
    write_credential(layout.credentials, "a1", oauth_credential(planted))
    fake_api.limit(planted.tokens[-2], 1)  # the prompt is answered (a tool call); the tool's result walls
    env = real_cli_env(layout, claude_bin, fake_api, CL_CLAUDE_ARGS="--allowedTools Bash")
    shell = layout.work / "shell.pid"
    (fake_api.watch / "shell.pid").symlink_to(shell)
    prompt = f"start the server [[bash: echo $$ > {shell}; exec sleep 300]]"
    with both(layout, env=env) as (balancer, _rescue):
        job = json.loads(cl(layout, "submit", "--cwd", str(layout.work), "--prompt", prompt, "--json").stdout)["job"]
        wait_until(lambda: job_view(layout, job)["state"] == "walled", "the session to wall", timeout=60)
        wait_until(lambda: "session held" in balancer.log(), "the session to be held")
        cli = cli_of(layout, job)
        assert cli is not None
        (fake_api.watch / "cli.pid").write_text(str(cli))
        a2 = planted.token()
        write_credential(layout.credentials, "a2", oauth_credential(planted, token=a2))
        wait_until(lambda: job_view(layout, job)["state"] == "done", "the session to finish on a2", timeout=60)
        story = json.loads(cl(layout, "job", str(job), "--json").stdout)
        log = balancer.log()
    first, walled, moved = fake_api.requests()
    assert (first["walled"], walled["walled"], moved["walled"]) == (False, True, False)
    assert walled["messages"][-2:] == ["[tool_use Bash]", "[tool_result]"]  # the wall came mid-turn
    assert moved["cred_tail"] == a2[-6:]
    assert moved["messages"][:-1] == walled["messages"][:-1]  # the whole conversation, under a2's token
    assert moved["messages"][-1] == "[tool_result] | continue"
    assert moved["session"] == walled["session"] == story["job"]["session_id"]
    assert moved["alive"] == {"cli": True, "shell": True}  # the same CLI, and the shell it started
    assert [(r["account"], r["state"]) for r in story["runs"]] == [("a1", "walled"), ("a2", "done")]
    assert [m["how"] for m in story["moves"]] == ["live"]
    assert "live move not taken" not in log


@pytest.mark.parametrize("kind", ["oauth-token", "api-key"])
def test_real_cli_on_a_token_or_api_key_account_is_moved_by_restart(
    kind: str, layout: Layout, planted: Planted, fake_api: FakeApi, claude_bin: Path
) -> None:
    """A credential the CLI takes from its environment cannot change under a running process: the
    walled session is not held, and moves to a2 by a restart with `--resume`, its conversation
    whole. (It walls after an answer, a tool call: docs/claude-code.md, fact 14, says why.)"""
    secret = planted.token() if kind == "oauth-token" else planted.token("plainkey-")
    content = json.dumps({"oauthToken": secret} if kind == "oauth-token" else {"apiKey": secret})
    write_credential(layout.credentials, "t1", content)
    fake_api.limit(secret, 2)  # the first job's answer, the second's tool call; the tool's result walls
    env = real_cli_env(layout, claude_bin, fake_api, CL_CLAUDE_ARGS="--allowedTools Bash")
    with both(layout, env=env) as (balancer, _rescue):
        first = json.loads(cl(layout, "submit", "--cwd", str(layout.work), "--prompt", "one", "--json").stdout)["job"]
        wait_until(lambda: job_view(layout, first)["state"] == "done", "the first session to finish", timeout=60)
        two = "two [[bash: true]]"
        job = json.loads(cl(layout, "submit", "--cwd", str(layout.work), "--prompt", two, "--json").stdout)["job"]
        wait_until(lambda: job_view(layout, job)["state"] == "walled", "the session to wall", timeout=60)
        a2 = planted.token()
        write_credential(layout.credentials, "a2", oauth_credential(planted, token=a2))
        wait_until(lambda: job_view(layout, job)["state"] == "done", "the session to finish on a2", timeout=60)
        story = json.loads(cl(layout, "job", str(job), "--json").stdout)
        log = balancer.log()
    *_, walled, moved = fake_api.requests()
    assert (walled["walled"], moved["walled"], moved["cred_tail"]) == (True, False, a2[-6:])
    assert moved["messages"][:3] == walled["messages"][:3]  # the whole conversation, under a2's token:
    assert moved["messages"][2] == "[tool_use Bash]"  # the prompt, the tool call (and its result), then
    assert any(message.endswith(" | continue") for message in moved["messages"])  # the resume prompt
    assert [m["how"] for m in story["moves"]] == ["restart"]
    assert "session held" not in log


def test_real_cli_a_token_sessions_first_prompt_that_walled_goes_with_its_move(
    layout: Layout, planted: Planted, fake_api: FakeApi, claude_bin: Path
) -> None:
    """2.1.332 drops a prompt that walled before any answer under `CLAUDE_CODE_OAUTH_TOKEN` when
    the session is resumed (docs/claude-code.md, fact 14): the move sends the job's prompt again,
    before the resume prompt, so the new account is asked the task itself."""
    token = planted.token()
    write_credential(layout.credentials, "t1", json.dumps({"oauthToken": token}))
    fake_api.limit(token, 0)
    env = real_cli_env(layout, claude_bin, fake_api)
    prompt = "the task itself"
    with both(layout, env=env):
        job = json.loads(cl(layout, "submit", "--cwd", str(layout.work), "--prompt", prompt, "--json").stdout)["job"]
        wait_until(lambda: job_view(layout, job)["state"] == "walled", "the session to wall", timeout=60)
        a2 = planted.token()
        write_credential(layout.credentials, "a2", oauth_credential(planted, token=a2))
        wait_until(lambda: job_view(layout, job)["state"] == "done", "the session to finish on a2", timeout=60)
    walled, moved = fake_api.requests()
    assert (walled["walled"], moved["walled"], moved["cred_tail"]) == (True, False, a2[-6:])
    assert any(message.endswith(f"{prompt}\n\ncontinue") for message in moved["messages"]), moved["messages"]


FAKES = Path(__file__).resolve().parent / "fakes"


def private_network(root: Path, access: str, refresh: str) -> Path:
    """A directory for `fakes/in_private_network`: a test CA and platform.claude.com's
    certificate signed by it, the tokens the stand-in hands out. Skips where it cannot run."""
    if os.geteuid() != 0 or not all(shutil.which(tool) for tool in ("unshare", "ip", "openssl")):
        pytest.skip("needs root with unshare, ip and openssl: a private network with its own platform.claude.com")
    probe = subprocess.run(["unshare", "--mount", "--net", "true"], capture_output=True, check=False)
    if probe.returncode:
        pytest.skip(f"cannot make a private network and mount namespace here: {probe.stderr.decode().strip()}")
    net = root / "net"
    net.mkdir()

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=net, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=cl test CA", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign")  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
            "-subj", "/CN=platform.claude.com")  # fmt: skip
    (net / "ext.cnf").write_text("subjectAltName=DNS:platform.claude.com\nextendedKeyUsage=serverAuth\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf")  # fmt: skip
    (net / "access").write_text(access)
    (net / "refresh").write_text(refresh)
    return net


def test_the_real_cli_refreshes_an_expired_token_and_the_account_keeps_it(
    layout: Layout, planted: Planted, claude_bin: Path
) -> None:
    """The real CLI 2.1.332 with an expired access token refreshes it against a stand-in for
    platform.claude.com (a private network namespace, a test CA): it replaces the job's
    `.credentials.json` link with a file of its own, and the worker carries the new tokens
    back into the account's file, which the next request and every other session then use."""
    old, new, new_refresh = planted.token(), planted.token(), planted.token("sk-ant-ort01-")
    net = private_network(layout.root, new, new_refresh)  # the CLI's user reads the test CA there
    an_hour_ago = int((time.time() - 3600) * 1000)
    account_file = write_credential(
        layout.credentials, "a1", oauth_credential(planted, token=old, expires_at_ms=an_hour_ago)
    )
    env = real_cli_env(layout, claude_bin, None, NODE_EXTRA_CA_CERTS=str(net / "ca.pem"), CL_CLI_READABLE=str(net))
    wrap = ["unshare", "--mount", "--net", "--", str(FAKES / "in_private_network"), str(net)]
    balancer = DaemonProcess("balancer", layout, env=env, wrap=wrap).start()
    try:
        job = json.loads(cl(layout, "submit", "--cwd", str(layout.work), "--prompt", "hello", "--json").stdout)["job"]
        wait_until(lambda: job_states(layout).get(job) == "done", "the session to finish", timeout=120)
        log = balancer.log()
    finally:
        balancer.stop()
    wanted = planted.name_of(new), planted.name_of(new_refresh)  # names: a failure never prints a token
    assert planted.tokens_in(account_file) == wanted
    assert json.loads(account_file.read_bytes())["claudeAiOauth"]["expiresAt"] > time.time() * 1000
    assert planted.tokens_in(layout.sessions / f"job-{job}" / ".credentials.json") == wanted  # the job's copy too
    assert "refreshed credentials kept account=a1" in log
    (token_request,) = json_lines(net / "oauth.jsonl")
    assert (token_request["path"], token_request["grant"]) == ("/v1/oauth/token", "refresh_token")
    requests = json_lines(net / "api.jsonl")
    tail = new[-6:]
    assert {r["cred_tail"] for r in requests} == {tail}  # the API saw the new token, only
