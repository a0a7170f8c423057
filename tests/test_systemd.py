"""The user's story under a real systemd 252 (PID 1 in a throwaway box made by ../shared/tools/sdbox).

Install into the box, `systemctl enable --now` both units (Type=notify readiness), drop a credential
file in, read `account added` from `journalctl -u` with its priority, reload, stop. Skipped, with
the reason, where `sdbox check` says the machine cannot run a box.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sdbox import Box, booted, configure, drop_credential, entries, journal, submit, unavailable, with_fake_cli

from cl.journal import MESSAGE_IDS
from utils import FAR_FUTURE_MS, Planted, oauth_credential, wait_until


@pytest.fixture
def box(tmp_path: Path) -> Iterator[Box]:
    if (why := unavailable()) is not None:
        pytest.skip(why)
    with booted(tmp_path, f"cltest{os.getpid()}") as run:
        yield run


def test_enable_drop_a_credential_reload_and_stop(box: Box, tmp_path: Path, planted: Planted) -> None:
    box("systemctl", "enable", "--now", "cl-balancer.service", "cl-rescue.service")
    for unit in ("cl-balancer", "cl-rescue"):  # `start` returned: both sent READY=1
        assert box("systemctl", "is-active", unit).stdout.strip() == "active"

    drop_credential(box, tmp_path / "claude", "a4", oauth_credential(planted))

    for unit in ("cl-balancer", "cl-rescue"):
        wait_until(
            lambda unit=unit: any(  # type: ignore[misc]
                prio == 6 and message.startswith("account added account=a4 state=ok")
                for prio, message in journal(box, unit)
            ),
            f"`account added` in journalctl -u {unit}",
        )
    views = json.loads(box("/opt/cl/bin/cl", "accounts", "--json").stdout)
    assert views["balancer"] == views["rescue"]
    assert [(a["name"], a["file"]) for a in views["balancer"]] == [("a4", "ok")]
    # No Claude Code in the box yet: what a newcomer's first `enable --now` meets, said where they look.
    missing = "work waits: claude_bin: 'claude' is not found on PATH /usr/local/sbin:/usr/local/bin:"
    assert (
        box("systemctl", "show", "-p", "StatusText", "cl-rescue")
        .stdout.strip()
        .startswith(f"StatusText=1 account, 1 usable, none waiting, 0 moved; {missing}")
    )
    assert any(
        message.startswith("work waits: a CLI cannot start check=claude_bin")
        for _, message in journal(box, "cl-balancer")
    )
    doctor = box("/opt/cl/bin/cl", "doctor", check=False)
    assert doctor.returncode == 8
    assert any(line.split()[:2] == ["FAIL", "claude_bin"] for line in doctor.stdout.splitlines()), doctor.stdout

    box("systemctl", "reload", "cl-balancer")
    assert any(message.startswith("reloaded") for _, message in journal(box, "cl-balancer"))
    box("systemctl", "stop", "cl-balancer", "cl-rescue")
    for unit in ("cl-balancer", "cl-rescue"):
        assert box("systemctl", "is-active", unit, check=False).stdout.strip() == "inactive"
        assert "Deactivated successfully" in box("journalctl", "-u", unit, "--no-pager").stdout
    everything = box("journalctl", "--no-pager", "-o", "json").stdout
    assert not planted.leaks(everything, "the journal")


def test_a_session_runs_in_its_own_worker_unit_and_survives_a_balancer_restart(
    box: Box, tmp_path: Path, planted: Planted
) -> None:
    fake = tmp_path / "fake"  # the fake CLI's files, at /srv/fake in the box: the CLI's user writes there
    hold = fake / "hold"  # the fake CLI works as long as this file exists
    hold.touch()
    old, new = planted.token(), planted.token()  # and it refreshes a1's token on the way
    later = FAR_FUTURE_MS + 3_600_000
    fresh = {"access": new, "refresh": planted.token("sk-ant-ort01-"), "expires_at_ms": later}
    (fake / "refresh.json").write_text(json.dumps({old: fresh}))
    with_fake_cli(
        box,
        FAKE_CLAUDE_REFRESH="/srv/fake/refresh.json",
        FAKE_CLAUDE_HOLD="/srv/fake/hold",
        FAKE_CLAUDE_LOG="/srv/fake/fake-claude.jsonl",
        FAKE_CLAUDE_TOUCH="/var/lib/cl/cl.db:/srv/work/notes.txt",
    )
    box("systemctl", "enable", "--now", "cl-balancer.service")
    drop_credential(box, tmp_path / "claude", "a1", oauth_credential(planted, token=old))
    wait_until(lambda: "a1" in box("/opt/cl/bin/cl", "accounts", "--from", "balancer").stdout, "a1 to show")
    account_file = tmp_path / "claude" / "credentials-a1.json"
    before = account_file.stat()

    job = submit(box, "/srv/work", "long")

    def state() -> str:
        jobs = json.loads(box("/opt/cl/bin/cl", "jobs", "--all", "--json").stdout)
        return str(next(j["state"] for j in jobs if j["id"] == job))

    wait_until(
        lambda: box("test", "-s", "/srv/fake/fake-claude.jsonl", check=False).returncode == 0, "the CLI to start"
    )
    units = box("systemctl", "list-units", "--no-legend", "cl-worker@*").stdout
    assert "cl-worker@" in units  # the session runs in a worker unit of its own, not under the balancer
    (unit,) = [word for word in units.split() if word.startswith("cl-worker@")]
    worker = int(box("systemctl", "show", "-p", "MainPID", "--value", unit).stdout)
    status = dict(line.split(":", 1) for line in box("cat", f"/proc/{worker}/status").stdout.splitlines())
    # The worker kept only the right to become its job's user (its saved uid): no capability left.
    cl_uid, cli_uid = (box("id", "-u", user).stdout.strip() for user in ("cl", "cl-cli-1"))
    assert status["Uid"].split()[:3] == [cl_uid, cl_uid, cli_uid]
    assert {status[key].strip() for key in ("CapPrm", "CapEff", "CapAmb")} == {"0" * 16}
    # Its CLI runs in a cl-cli@ unit of its own, whose starter kept no capability once it started it.
    units = box("systemctl", "list-units", "--no-legend", "cl-cli@*").stdout
    (cli_unit,) = [word for word in units.split() if word.startswith("cl-cli@")]
    starter = int(box("systemctl", "show", "-p", "MainPID", "--value", cli_unit).stdout)
    status = dict(line.split(":", 1) for line in box("cat", f"/proc/{starter}/status").stdout.splitlines())
    assert {status[key].strip() for key in ("CapPrm", "CapEff", "CapAmb")} == {"0" * 16}
    # Its connection was the balancer's, made before the worker started and handed to it (systemd
    # names each instance of an Accept=yes Unix socket N-PID-UID, after the process that connected).
    balancer = box("systemctl", "show", "-p", "MainPID", "--value", "cl-balancer").stdout.strip()
    assert cli_unit.removeprefix("cl-cli@").split("-")[1] == balancer
    box("systemctl", "restart", "cl-balancer")
    wait_until(lambda: any("session adopted" in m for _, m in journal(box, "cl-balancer")), "the session's adoption")
    assert state() == "running"
    hold.unlink()
    wait_until(lambda: state() == "done", "the session to finish")
    (call,) = [json.loads(line) for line in box("cat", "/srv/fake/fake-claude.jsonl").stdout.splitlines()]  # once
    # The CLI runs as a user of the pool; the job's cwd is writable for it, the state store is not there.
    assert call["uid"] == int(box("id", "-u", "cl-cli-1").stdout)
    assert call["touched"] == {"/var/lib/cl/cl.db": False, "/srv/work/notes.txt": True}
    # The worker unit (user cl) carried the refreshed token back into a1's own file, in place.
    after = account_file.stat()
    wanted = planted.name_of(new)  # a name, not the token: a failure never prints a token
    assert planted.tokens_in(account_file)[0] == wanted
    assert (after.st_ino, after.st_uid, after.st_mode) == (before.st_ino, before.st_uid, before.st_mode)
    worker_journal = box("journalctl", "-u", "cl-worker@*", "--no-pager").stdout
    assert "refreshed credentials kept account=a1" in worker_journal
    assert not planted.leaks(box("journalctl", "--no-pager", "-o", "json").stdout, "the journal")


def test_a_walled_session_is_rescued_and_the_journal_tells_the_story(
    box: Box, tmp_path: Path, planted: Planted
) -> None:
    walled = planted.token()
    quota = json.dumps({walled: 0})
    (tmp_path / "fake" / "quota.json").write_text(quota)
    (tmp_path / "fake" / "quota.json").chmod(0o666)  # the fake counts it down, as the CLI's user it runs as
    with_fake_cli(box, FAKE_CLAUDE_QUOTA="/srv/fake/quota.json", FAKE_CLAUDE_LOG="/srv/fake/fake-claude.jsonl")
    drop_credential(box, tmp_path / "claude", "a1", oauth_credential(planted, token=walled))
    box("systemctl", "enable", "--now", "cl-balancer.service", "cl-rescue.service")
    submit(box, "/srv/work", "long")

    def said(unit: str, priority: int, text: str) -> bool:
        return any(p == priority and m.startswith(text) for p, m in journal(box, unit))

    wait_until(lambda: said("cl-rescue", 4, "waiting sessions=1 reason=no-eligible-account"), "the session to wait")
    assert said("cl-rescue", 4, "session walled")
    assert "1 session waiting (no-eligible-account)" in box("systemctl", "status", "cl-rescue").stdout
    drop_credential(box, tmp_path / "claude", "a2", oauth_credential(planted))
    wait_until(lambda: said("cl-rescue", 6, "session resumed"), "the session to be resumed on a2")
    for line in ("account added account=a2", "session moved"):
        assert said("cl-rescue", 6, line), line
    wait_until(
        lambda: json.loads(box("/opt/cl/bin/cl", "jobs", "--all", "--json").stdout)[0]["state"] == "done", "done"
    )

    # Each event's fields are journal fields; the events an operator acts on carry a MESSAGE_ID.
    about_a2 = [e["MESSAGE"].split()[:2] for e in entries(box, "-u", "cl-rescue", "ACCOUNT=a2")]
    assert ["account", "added"] in about_a2
    assert ["session", "moved"] in about_a2
    (moved,) = entries(box, f"MESSAGE_ID={MESSAGE_IDS['session moved']}")
    assert (moved["_SYSTEMD_UNIT"], moved["SYSLOG_IDENTIFIER"]) == ("cl-rescue.service", "cl-rescue")
    assert (moved["ACCOUNT"], moved["FROM"], moved["JOB"], moved["LIVE"]) == ("a2", "a1", "1", "True")
    # The move was live: the CLI went on in its own cl-worker@ unit, told by the rescuer's signal.
    assert any(m.startswith("session moved live") for _, m in journal(box, "cl-worker@*"))
    assert moved["SESSION"] == json.loads(box("/opt/cl/bin/cl", "jobs", "--all", "--json").stdout)[0]["session_id"]
    for event in ("session walled", "waiting", "all accounts walled", "session resumed", "account added"):
        assert entries(box, "-u", "cl-rescue", f"MESSAGE_ID={MESSAGE_IDS[event]}"), event
    explained = box("journalctl", "-x", "--no-pager", f"MESSAGE_ID={MESSAGE_IDS['session moved']}").stdout
    assert f"Subject: Session {moved['SESSION']} moved to account a2" in explained  # the shipped catalog
    everything = box("journalctl", "--no-pager", "-o", "json").stdout
    assert not planted.leaks(everything, "the journal")

    # cl-metrics, started by its socket on the first scrape, asks both daemons.
    box("systemctl", "enable", "--now", "cl-metrics.socket")
    scrape = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9847/metrics').read().decode())"
    got = box("/opt/cl/bin/python", "-c", scrape, check=False)
    assert got.returncode == 0, got.stderr + box("journalctl", "-u", "cl-metrics", "--no-pager").stdout
    text = got.stdout
    assert 'cl_up{daemon="balancer"} 1.0' in text
    assert 'cl_up{daemon="rescue"} 1.0' in text
    assert 'cl_moves_total{daemon="rescue"} 1.0' in text
    assert 'cl_live_moves_total{daemon="rescue"} 1.0' in text


def test_a_stalled_daemon_is_killed_by_the_watchdog_and_restarted(box: Box) -> None:
    dropin = "[Service]\nWatchdogSec=2\nTimeoutAbortSec=1\n"  # the shipped 30 s, shortened for the test
    box(
        "sh",
        "-c",
        f"mkdir -p /etc/systemd/system/cl-rescue.service.d && printf '{dropin}' > "
        "/etc/systemd/system/cl-rescue.service.d/watchdog.conf && systemctl daemon-reload",
    )
    box("systemctl", "enable", "--now", "cl-rescue.service")

    def main_pid() -> int:
        return int(box("systemctl", "show", "-p", "MainPID", "--value", "cl-rescue").stdout)

    stalled = main_pid()
    box("kill", "-STOP", str(stalled))  # its event loop stops: no more WATCHDOG=1
    wait_until(lambda: main_pid() not in (0, stalled), "systemd to kill it and start another", timeout=60)
    wait_until(lambda: box("systemctl", "is-active", "cl-rescue", check=False).stdout.strip() == "active", "READY")
    assert "Watchdog timeout" in box("journalctl", "-u", "cl-rescue", "--no-pager").stdout
    assert box("systemctl", "show", "-p", "NRestarts", "--value", "cl-rescue").stdout.strip() == "1"


def test_operators_see_and_act_on_their_own_jobs_and_root_and_admins_on_all(box: Box) -> None:
    """Two operators in group cl, an admin in cl-admin: each operator sees and cancels only their own
    job and reads only their own output; the admin and root see both; a job cannot be pointed at
    another operator's directory."""
    box(
        "sh",
        "-c",
        "useradd -G cl alice && useradd -G cl bob && useradd -G cl,cl-admin carol"
        " && mkdir -p /srv/alice /srv/bob && chown alice:cl-cli /srv/alice && chown bob:cl-cli /srv/bob"
        " && chmod 2770 /srv/alice /srv/bob",
    )
    box("systemctl", "enable", "--now", "cl-balancer.service", "cl-rescue.service")

    def cl(user: str, *args: str) -> subprocess.CompletedProcess[str]:
        return box(
            "setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "/opt/cl/bin/cl", *args, check=False
        )

    def jobs(user: str) -> set[int]:
        result = cl(user, "jobs", "--all", "--json")
        assert result.returncode == 0, result.stderr
        return {job["id"] for job in json.loads(result.stdout)}

    alices = submit(box, "/srv/alice", "alice's work", "--reuid=alice", "--regid=alice", "--init-groups")
    bobs = submit(box, "/srv/bob", "bob's work", "--reuid=bob", "--regid=bob", "--init-groups")
    assert (jobs("alice"), jobs("bob"), jobs("carol"), jobs("root")) == (
        {alices},
        {bobs},
        {alices, bobs},
        {alices, bobs},
    )
    waiting = json.loads(cl("alice", "status", "--json").stdout)
    assert [job["id"] for job in waiting["jobs"]] == [alices]

    for command in (["cancel", str(alices)], ["logs", str(alices)], ["job", str(alices)]):
        refused = cl("bob", *command)  # as if it did not exist: bob learns no other operator's ids
        assert (refused.returncode, refused.stderr.strip()) == (4, f"cl: cl-balancer: no job {alices}")
    session = json.loads(cl("alice", "job", str(alices), "--json").stdout)["job"]["session_id"]
    if session:  # a session id, or its start, is another operator's too
        refused = cl("bob", "logs", session[:8])
        assert (refused.returncode, refused.stderr.strip()) == (4, f"cl: cl-balancer: no session '{session[:8]}'")
    elsewhere = cl("bob", "submit", "--cwd", "/srv/alice", "--prompt", "peek")
    assert elsewhere.returncode == 2
    bob = int(box("id", "-u", "bob").stdout)
    assert elsewhere.stderr.strip().endswith(f"--cwd /srv/alice: the submitter (uid {bob}) cannot write it")
    assert cl("alice", "cancel", str(alices)).returncode == 0
    assert cl("carol", "cancel", str(bobs)).returncode == 0

    refused = cl("alice", "accounts", "pause", "a1")  # submitting work is not running the accounts
    assert (refused.returncode, refused.stderr.strip()) == (
        2,
        "cl: cl-balancer: account settings are for root and group cl-admin",
    )
    assert cl("carol", "accounts", "pause", "a1", "--force").returncode == 0  # before its file lands
    assert "paused" in cl("alice", "accounts").stdout


def test_cancelling_a_session_stops_its_cli_and_ends_its_units(box: Box, tmp_path: Path, planted: Planted) -> None:
    """The balancer signals the worker (both user cl); the worker stops the CLI, which runs as a
    user of the pool in a cl-cli@ unit and which it may only signal as that user; both units end,
    the job is cancelled."""
    (tmp_path / "fake" / "hold").touch()
    with_fake_cli(box, FAKE_CLAUDE_HOLD="/srv/fake/hold", FAKE_CLAUDE_LOG="/srv/fake/fake-claude.jsonl")
    box("systemctl", "enable", "--now", "cl-balancer.service", "cl-rescue.service")
    drop_credential(box, tmp_path / "claude", "a1", oauth_credential(planted))
    wait_until(lambda: "a1" in box("/opt/cl/bin/cl", "accounts", "--from", "balancer").stdout, "a1 to show")
    job = submit(box, "/srv/work", "a runaway")
    wait_until(lambda: box("test", "-s", "/srv/fake/fake-claude.jsonl", check=False).returncode == 0, "the CLI")
    assert box("/opt/cl/bin/cl", "cancel", str(job)).stdout.strip() == f"job {job} cancelled"
    wait_until(lambda: box("/opt/cl/bin/cl", "wait", str(job), check=False).returncode == 6, "the job to end cancelled")
    units = ("cl-worker@*", "cl-cli@*")
    wait_until(lambda: not box("systemctl", "list-units", "--no-legend", *units).stdout.strip(), "the units")
    assert "session cancelled" in box("journalctl", "-u", "cl-worker@*", "--no-pager").stdout
    assert box("pgrep", "-G", "cl-cli", check=False).returncode == 1  # nothing of the CLI's is left


def test_the_gateway_unit_refreshes_holds_the_tokens_and_moves_a_walled_request(
    box: Box, tmp_path: Path, planted: Planted
) -> None:
    """Gateway mode under systemd: cl-gateway.service (its own sandbox: network, the roster
    writable in place, a user namespace) refreshes a1 ahead of expiry into its file, forwards the
    fake CLI's requests (from its cl-worker@ unit) with the real token, and answers a quota 429
    on a2, the request moved in flight by cl-rescue over its socket. The API is the fake one,
    in the box, on its loopback."""
    fake = tmp_path / "fake"
    api = with_gateway(box, fake, "/opt/fakes/claude", FAKE_CLAUDE_LOG="/srv/fake/fake-claude.jsonl")
    box("systemctl", "enable", "--now", "cl-gateway.service", "cl-balancer.service", "cl-rescue.service")
    assert box("systemctl", "is-active", "cl-gateway").stdout.strip() == "active"  # READY=1 once listening
    soon = int((time.time() + 60) * 1000)  # within refresh_margin: due at once
    a1, a1_refresh, a2 = planted.token(), planted.token("sk-ant-ort01-"), planted.token()
    a1_file = {"accessToken": a1, "refreshToken": a1_refresh, "expiresAt": soon, "scopes": ["user:inference"]}
    drop_credential(box, tmp_path / "claude", "a1", json.dumps({"claudeAiOauth": a1_file}))
    wait_until(
        lambda: (
            json.loads((tmp_path / "claude" / "credentials-a1.json").read_text())["claudeAiOauth"]["accessToken"] != a1
        ),
        "the gateway to write a1's refreshed token into its file",
    )
    refreshed = json.loads((tmp_path / "claude" / "credentials-a1.json").read_text())["claudeAiOauth"]["accessToken"]
    planted.tokens += _tokens(box, api)
    drop_credential(box, tmp_path / "claude", "a2", oauth_credential(planted, token=a2))
    limit = json.dumps({"key": refreshed, "limit": 0})
    _post(box, f"{api}/_fake/limit", limit)  # a1's next request walls
    job = submit(box, "/srv/work", "hello through the gateway")
    wait_until(
        lambda: json.loads(box("/opt/cl/bin/cl", "job", str(job), "--json").stdout)["job"]["state"] == "done",
        "the job to finish on a2",
    )
    requests = [json.loads(line) for line in (fake / "api.jsonl").read_text().splitlines()]
    inference = [(r["cred_tail"], r["walled"]) for r in requests if r.get("path", "").startswith("/v1/messages")]
    assert inference == [(refreshed[-6:], True), (a2[-6:], False)]
    (call,) = [json.loads(line) for line in (fake / "fake-claude.jsonl").read_text().splitlines()]
    assert call["token_tail"] not in {t[-6:] for t in planted.tokens}  # the CLI held a capability
    story = json.loads(box("/opt/cl/bin/cl", "job", str(job), "--json").stdout)
    assert [(m["to"], m["how"]) for m in story["moves"]] == [("a2", "live")]
    gateway = [e for e in entries(box, "-u", "cl-gateway") if isinstance(e.get("MESSAGE"), str)]
    for event, account in (("token refreshed", "a1"), ("wall from the API", "a1"), ("request moved in flight", "a2")):
        assert any(e["MESSAGE"].startswith(event) and e.get("ACCOUNT") == account for e in gateway), event
    assert not planted.leaks(box("journalctl", "--no-pager", "-o", "json").stdout, "the journal")


def with_gateway(box: Box, fake: Path, claude_bin: str, **env: str) -> str:
    """Gateway mode in the box: the fake API (its own transient unit, on the box's loopback) as the
    upstream and the token endpoint, `claude_bin` with these `[worker.env]` variables; the API's URL."""
    box(
        "systemd-run", "--unit=fake-api", "/usr/bin/python3", "/opt/fakes/fake_anthropic.py",
        "--port-file", "/srv/fake/api.port", "--log", "/srv/fake/api.jsonl",
    )  # fmt: skip
    wait_until((fake / "api.port").exists, "the fake API in the box to listen")
    api = f"http://127.0.0.1:{(fake / 'api.port').read_text()}"
    configure(
        box, f'claude_bin = "{claude_bin}"\ngateway_upstream = "{api}"\noauth_token_url = "{api}/v1/oauth/token"\n', env
    )
    return api


def test_a_hostile_cli_in_its_worker_unit_reaches_no_token_through_or_around_the_gateway(
    box: Box, tmp_path: Path, planted: Planted
) -> None:
    """The token hunt of tests/test_gateway.py under systemd: the hostile CLI, as cl-cli in its
    cl-worker@ unit, searches its environment, the files it can read (its config dir, home, /tmp,
    the roster, state, sessions and runtime dirs), every /proc environ and command line, and the
    gateway's answers to every path it tries; then prints a wall the API never sent."""
    look = "/opt/claude:/var/lib/cl:/var/lib/cl-sessions:/run/cl:/etc/cl"
    with_gateway(box, tmp_path / "fake", "/opt/fakes/hostile_gateway", HOSTILE_LOOK=look)
    box("systemctl", "enable", "--now", "cl-gateway.service", "cl-balancer.service", "cl-rescue.service")
    for name in ("a1", "a2"):
        drop_credential(box, tmp_path / "claude", name, oauth_credential(planted))
    job = submit(box, "/srv/work", "attack")
    wait_until(
        lambda: json.loads(box("/opt/cl/bin/cl", "job", str(job), "--json").stdout)["job"]["state"] == "failed",
        "the hostile turn to end",
    )
    loot = json.loads(box("cat", "/srv/work/loot.json").stdout)
    assert loot["files"], "the hostile CLI read nothing: the test would prove nothing"
    assert not planted.leaks(json.dumps(loot), "what the hostile CLI reached")
    answers = {(a["method"], a["path"], a["header"], a["with"]): a["status"] for a in loot["gateway"]}
    assert answers[("POST", "/v1/messages", "authorization", True)] == 200
    assert answers[("POST", "/v1/oauth/token", "authorization", True)] == 404
    assert answers[("POST", "/v1/messages", "authorization", False)] == 401
    story = json.loads(box("/opt/cl/bin/cl", "job", str(job), "--json").stdout)
    assert story["moves"] == []  # the wall it printed moved nothing
    status = json.loads(box("/opt/cl/bin/cl", "status", "--json").stdout)
    assert all(a["walled_until"] is None for a in status["accounts"])  # and walled nothing
    assert not planted.leaks(box("journalctl", "--no-pager", "-o", "json").stdout, "the journal")


def _post(box: Box, url: str, body: str) -> None:
    box("/usr/bin/python3", "-c", f"import urllib.request as u; u.urlopen(u.Request({url!r}, {body.encode()!r}))")


def _tokens(box: Box, api: str) -> list[str]:
    script = f"import urllib.request as u; print(u.urlopen({api + '/_fake/tokens'!r}).read().decode())"
    tokens: list[str] = json.loads(box("/usr/bin/python3", "-c", script).stdout)
    return tokens
