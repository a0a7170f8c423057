"""The fleet: hosts publish their own rosters with a heartbeat; the fleet is the live hosts' union.

Store-level on both backends; on one machine, hosts as sets of directories, each with its own
balancer and host name, sharing one real PostgreSQL database."""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

import postgres
from cl.fleet import clashes, duplicates
from cl.states import RunState
from cl.store import Home, HostRecord, Published, Store
from cl.store.notifications import CHANNEL
from utils import (
    DaemonProcess,
    FakeApi,
    Layout,
    Planted,
    cl,
    free_port,
    job_states,
    oauth_credential,
    submit,
    wait_until,
    write_credential,
)


def test_a_host_publishes_its_roster_when_it_changes_and_its_heartbeat_always(store: Store) -> None:
    roster = [Published("a1", "ok", "f1"), Published("a2", "expired", None)]
    assert store.publish("alpha", roster) is True
    assert store.publish("alpha", roster) is False  # the same roster: a heartbeat alone
    assert store.publish("beta", [Published("b1", "ok", "f2")]) is True
    (alpha, beta) = store.hosts()
    assert (alpha.name, alpha.accounts, beta.name, beta.accounts) == (
        "alpha",
        tuple(roster),
        "beta",
        (roster[0]._replace(account="b1", fingerprint="f2"),),
    )
    assert 0 <= alpha.heartbeat_age < 60  # the database's clock, on both sides of the subtraction
    first = alpha.heartbeat_age
    wait_until(lambda: store.hosts()[0].heartbeat_age > first, "the heartbeat to age")
    assert store.publish("alpha", roster[:1]) is True  # a file removed
    assert store.hosts()[0].accounts == (roster[0],)
    assert store.hosts()[0].heartbeat_age < 60


def test_a_credential_a_live_host_with_a_lower_name_holds_is_served_there(store: Store) -> None:
    store.publish("alpha", [Published("team", "ok", "f1"), Published("a2", "ok", "f2")])
    store.publish("beta", [Published("shared", "ok", "f1"), Published("b2", "ok", "f3"), Published("k", "ok", None)])
    store.publish("gamma", [Published("also", "ok", "f1")])
    # asked about each host's files as they are now (here, what each published)
    assert store.served_below("beta", {"f1", "f3"}, 60) == {"f1": "alpha"}  # beta's "shared" is alpha's
    assert store.served_below("gamma", {"f1"}, 60) == {"f1": "alpha"}
    assert store.served_below("alpha", {"f1", "f2"}, 60) == {}  # the lowest name serves it
    assert store.served_below("gamma", {"f3", "f9"}, 60) == {"f3": "beta"}  # nobody holds f9
    assert store.served_below("beta", set(), 60) == {}
    assert store.facts(("queued",), 0).aside == set()  # not the store's to say
    assert store.served_below("beta", {"f1"}, -1) == {}  # alpha not live (every heartbeat too old): beta serves


def test_an_account_of_another_live_host_has_the_lowest_such_host_for_its_home(store: Store) -> None:
    """Where the fleet's usable accounts live, as `besides` sees them: never itself, never a host
    without a gateway for the fleet, never an account its home does not call usable."""
    store.publish("alpha", [Published("a1", "ok", "f1"), Published("x", "expired", "f2")], "alpha:8480")
    store.publish("beta", [Published("a1", "ok", "f1"), Published("b1", "ok", "f3")], "beta:8480")
    store.publish("gamma", [Published("g1", "ok", "f4")])  # no fleet_listen: its accounts are its own
    assert store.homes("gamma", 60) == {"a1": Home("alpha", "alpha:8480"), "b1": Home("beta", "beta:8480")}
    assert store.homes("alpha", 60) == {"a1": Home("beta", "beta:8480"), "b1": Home("beta", "beta:8480")}
    assert store.homes("gamma", 60, "b1") == {"b1": Home("beta", "beta:8480")}
    assert store.homes("gamma", 60, "x") == {}
    assert store.homes("gamma", -1) == {}  # every heartbeat too old: nobody is live
    store.publish("beta", [Published("a1", "ok", "f1"), Published("b1", "ok", "f3")], "beta:9000")  # a heartbeat
    assert store.homes("gamma", 60, "b1") == {"b1": Home("beta", "beta:9000")}


def test_the_database_notifies_what_may_give_another_host_work(postgresql: postgres.Server) -> None:
    """A roster that changed, a run that ended, an account's settings changed: each notifies the
    fleet's channel (once per transaction); a heartbeat alone, a run placed or claimed does not."""
    url = postgresql.database()
    store = Store(url)
    with psycopg.connect(url, autocommit=True) as listening:
        listening.execute(f"LISTEN {CHANNEL}")

        def heard() -> list[str]:
            """What was notified since the last call, up to a mark sent now (delivered after it)."""
            with psycopg.connect(url, autocommit=True) as marking:
                marking.execute(f"SELECT pg_notify('{CHANNEL}', 'mark')")
            payloads: list[str] = []
            for notification in listening.notifies(timeout=20):
                if notification.payload == "mark":
                    return payloads
                payloads.append(notification.payload)
            raise AssertionError("the mark never came")

        job = store.add_job("/srv", "hello")
        run = store.place(job.id, "a1", limit=4)
        assert run is not None
        store.claim(run.id, 1, "1", "/log")
        assert heard() == []
        store.settle(run.id, RunState.DONE)
        assert heard() == [""]
        store.publish("alpha", [Published("a1", "ok", "f1")], "alpha:8480")
        assert heard() == [""]  # one transaction: one notification
        store.publish("alpha", [Published("a1", "ok", "f1")], "alpha:8480")
        assert heard() == []
        store.set_account("a1", 0, paused=True)
        assert heard() == [""]
    store.close()


def test_in_a_fleet_a_host_keeps_to_its_own_jobs_and_runs(store: Store) -> None:
    """Jobs submitted on alpha, on beta, and before hosts were: alpha's daemons see alpha's and the
    old one's, never beta's; unscoped (one host's own store) every job is its own."""
    jobs = {host: store.add_job("/srv", f"on {host}", host=host) for host in ("alpha", "beta", None)}
    for job in jobs.values():
        store.place(job.id, "a1", limit=10)
    assert store.facts(("running",), 10, "alpha").jobs == [
        store.get_job(jobs["alpha"].id),
        store.get_job(jobs[None].id),
    ]
    assert len(store.facts(("running",), 10).jobs) == 3
    assert {run.job_id for run in store.runs_in(host="beta")} == {jobs["beta"].id, jobs[None].id}
    assert {run.job_id for run in store.runs_in()} == {job.id for job in jobs.values()}
    for job in jobs.values():  # each session moved, and the move ended
        run = store.latest_run(job.id)
        assert run is not None
        store.claim(run.id, 1, "1", "/log")
        store.settle(run.id, RunState.WALLED)
        moved = store.place(job.id, "a2", limit=10, resume=f"s-{job.id}")
        assert moved is not None
        store.claim(moved.id, 1, "1", "/log")
        store.settle(moved.id, RunState.DONE)
    assert {run.job_id for run in store.unverified_moves("alpha")} == {jobs["alpha"].id, jobs[None].id}
    (theirs,) = [run for run in store.unverified_moves("beta") if run.job_id == jobs["beta"].id]
    assert store.verify_move(theirs.id) is False  # its transcript was never measured: it did not grow
    assert store.verify_move(theirs.id) is None  # settled already: not "did not grow" a second time


@pytest.fixture
def fleet(tmp_path: Path, postgresql: postgres.Server) -> dict[str, Layout]:
    """Hosts alpha and beta: their own directories and balancers, one PostgreSQL database."""
    database = postgresql.database()
    return {name: Layout(tmp_path / name, store=database) for name in ("alpha", "beta")}


def balancer(layout: Layout, host: str) -> DaemonProcess:
    env = layout.env(CL_HOST=host, CL_HEARTBEAT_INTERVAL="0.5")
    return DaemonProcess("balancer", layout, env=env).start()


@contextlib.contextmanager
def balancers(fleet: dict[str, Layout]) -> Iterator[list[DaemonProcess]]:
    """Each host's balancer, named as its host, stopped at the end."""
    daemons = [balancer(layout, host) for host, layout in fleet.items()]
    try:
        yield daemons
    finally:
        for daemon in daemons:
            daemon.stop()


def copied_on_both(fleet: dict[str, Layout], planted: Planted) -> None:
    """One credential as alpha's `team` and beta's `shared` (a file copied); beta has `b2` too."""
    copied = oauth_credential(planted)
    write_credential(fleet["alpha"].credentials, "team", copied)
    write_credential(fleet["beta"].credentials, "shared", copied)
    write_credential(fleet["beta"].credentials, "b2", oauth_credential(planted))


def hosts(layout: Layout) -> tuple[int, dict[str, Any], str]:
    result = cl(layout, "hosts", "--json")
    return result.returncode, json.loads(result.stdout), result.stderr


def beats(layout: Layout, host: str, count: int) -> None:
    """Wait for `count` heartbeats of `host`, as `layout`'s host sees them (its age starts over)."""
    seen, last = 0, float("inf")

    def another() -> bool:
        nonlocal seen, last
        (age,) = [float(h["heartbeat_age"]) for h in hosts(layout)[1]["hosts"] if h["name"] == host]
        seen, last = seen + (age < last), age
        return seen > count

    wait_until(another, f"{count} heartbeats of {host}")


def roster_of(reply: dict[str, Any], host: str) -> set[str]:
    return {a["name"] for h in reply["hosts"] if h["name"] == host and h["live"] for a in h["accounts"]}


def test_a_file_on_one_host_shows_on_every_host_and_a_host_that_stops_drops_out(
    fleet: dict[str, Layout], planted: Planted
) -> None:
    alpha, beta = fleet["alpha"], fleet["beta"]
    write_credential(alpha.credentials, "a1", oauth_credential(planted))
    with balancers(fleet) as (_alpha, beta_balancer):
        wait_until(lambda: roster_of(hosts(beta)[1], "alpha") == {"a1"}, "alpha's roster on beta")
        write_credential(beta.credentials, "b1", oauth_credential(planted))
        wait_until(lambda: roster_of(hosts(alpha)[1], "beta") == {"b1"}, "a file dropped on beta, seen on alpha")
        code, reply, said = hosts(alpha)
        assert (code, reply["host"], reply["duplicates"], said) == (0, "alpha", [], "")
        assert [host["name"] for host in reply["hosts"]] == ["alpha", "beta"]
        beta_balancer.stop()
        wait_until(
            lambda: not {h["name"] for h in hosts(alpha)[1]["hosts"] if h["live"]} - {"alpha"}, "beta to drop out"
        )
        (gone,) = [h for h in hosts(alpha)[1]["hosts"] if h["name"] == "beta"]
        assert gone["heartbeat_age"] > 3 * 0.5  # three heartbeats missed, not fewer
        assert "gone: 3 heartbeats late" in cl(alpha, "hosts").stdout


def test_one_credential_on_two_hosts_is_reported_once_and_the_lower_name_serves_it(
    fleet: dict[str, Layout], planted: Planted
) -> None:
    alpha = fleet["alpha"]
    copied_on_both(fleet, planted)
    with balancers(fleet) as daemons:
        wait_until(lambda: hosts(alpha)[1]["duplicates"], "the copy to show")
        code, reply, said = hosts(alpha)
        assert reply["duplicates"] == [
            {
                "held_by": [{"host": "alpha", "account": "team"}, {"host": "beta", "account": "shared"}],
                "served_by": "alpha",
            }
        ]
        assert code == 1
        assert "one credential is on several hosts (team on alpha, shared on beta): alpha is to serve it" in said
        wait_until(lambda: all("one credential on several hosts" in d.log() for d in daemons), "each host to say so")
        beats(alpha, "beta", 4)  # and four heartbeats more: still said once
    for daemon in daemons:
        assert daemon.log().count("one credential on several hosts") == 1


def test_the_host_with_the_higher_name_places_no_work_on_a_credential_the_other_serves(
    fleet: dict[str, Layout], planted: Planted
) -> None:
    beta = fleet["beta"]
    copied_on_both(fleet, planted)
    with balancers(fleet):
        wait_until(lambda: hosts(beta)[1]["duplicates"], "beta to see the copy")
        beta.hold.touch()  # the sessions stay live: each counts where it was placed
        try:
            jobs = [submit(beta, f"job {i}") for i in range(3)]
            wait_until(lambda: len(beta.claude_calls()) == 3, "three sessions to start")
            placed = {job["account"] for job in json.loads(cl(beta, "jobs", "--json").stdout)}
        finally:
            beta.hold.unlink()
        wait_until(lambda: set(job_states(beta).values()) == {"done"}, "the sessions to end")
    assert (len(jobs), placed) == (3, {"b2"})


def test_the_host_with_the_higher_name_leaves_a_shared_credentials_refresh_to_the_other(
    fleet: dict[str, Layout], planted: Planted, fake_api: FakeApi
) -> None:
    """Beta finds the copy due (its margin is wider) while alpha is live: alpha is to refresh it, so
    beta does not, and says so; once alpha drops out, beta refreshes it."""
    alpha, beta = fleet["alpha"], fleet["beta"]
    within_an_hour = int((time.time() + 3600) * 1000)
    copied = json.dumps(
        {
            "claudeAiOauth": {
                "accessToken": planted.token(),
                "refreshToken": planted.token("sk-ant-ort01-"),
                "expiresAt": within_an_hour,
                "scopes": ["user:inference"],
            }
        }
    )
    write_credential(alpha.credentials, "team", copied)
    first = balancer(alpha, "alpha")
    wait_until(lambda: roster_of(hosts(alpha)[1], "alpha") == {"team"}, "alpha's roster published")
    write_credential(beta.credentials, "shared", copied)
    env = beta.env(
        CL_HOST="beta",
        CL_HEARTBEAT_INTERVAL="0.5",
        CL_GATEWAY="true",
        CL_GATEWAY_LISTEN=f"127.0.0.1:{free_port()}",
        CL_GATEWAY_UPSTREAM=fake_api.url,
        CL_OAUTH_TOKEN_URL=f"{fake_api.url}/v1/oauth/token",
        CL_REFRESH_MARGIN="7200",  # due on beta, not on alpha
    )
    gateway = DaemonProcess("gateway", beta, env=env).start()
    try:
        wait_until(
            lambda: "token refresh left to the host that serves this credential" in gateway.log(), "beta to stand aside"
        )
        assert not [r for r in fake_api.requests() if r["path"] == "/v1/oauth/token"]
        first.stop()  # alpha goes: three heartbeats later, beta serves the credential
        wait_until(lambda: "token refreshed account=shared" in gateway.log(), "beta to refresh it", timeout=60)
    finally:
        gateway.stop()
        first.stop()
    assert gateway.log().count("token refresh left to the host that serves this credential") == 1
    planted.tokens += fake_api.get("/_fake/tokens")


def test_each_host_runs_its_own_jobs_and_a_restart_on_one_leaves_the_others_sessions_alone(
    fleet: dict[str, Layout], planted: Planted
) -> None:
    """A job runs on the host it was submitted on, under that host's accounts: one waiting on beta
    (no account there yet) is not alpha's to place, however often alpha looks; and alpha's
    balancer restarting while beta's session runs neither adopts it nor orphans it (its worker is
    not alpha's): the session runs once, to its end."""
    alpha, beta = fleet["alpha"], fleet["beta"]
    write_credential(alpha.credentials, "a1", oauth_credential(planted))
    daemons = {"alpha": balancer(alpha, "alpha"), "beta": balancer(beta, "beta")}

    def restart_alpha() -> None:
        daemons["alpha"].stop()
        daemons["alpha"] = balancer(alpha, "alpha")
        beats(beta, "alpha", 1)  # the new alpha's heartbeat: it publishes once its live runs are taken over

    try:
        on_beta = submit(beta, "on beta")
        wait_until(lambda: "reason=no-eligible-account" in daemons["beta"].log(), "beta's job to wait for an account")
        restart_alpha()  # its first pass: every queued job it may place
        on_alpha = submit(alpha, "on alpha")  # placed after beta's, were beta's alpha's to place
        wait_until(lambda: job_states(alpha).get(on_alpha) == "done", "alpha's job")
        assert job_states(beta)[on_beta] == "queued"
        beta.hold.touch()
        write_credential(beta.credentials, "b1", oauth_credential(planted))
        wait_until(lambda: len(beta.claude_calls()) == 1, "beta's session to start")
        restart_alpha()
        assert job_states(beta)[on_beta] == "running"
        beta.hold.unlink()
        wait_until(lambda: job_states(beta).get(on_beta) == "done", "beta's session to end")
        jobs = {job["id"]: job for job in json.loads(cl(beta, "jobs", "--all", "--json").stdout)}
    finally:
        beta.hold.unlink(missing_ok=True)
        for daemon in daemons.values():
            daemon.stop()
    assert (jobs[on_alpha]["account"], jobs[on_beta]["account"]) == ("a1", "b1")
    assert [call["prompt"] for call in alpha.claude_calls()] == ["on alpha"]
    assert [call["prompt"] for call in beta.claude_calls()] == ["on beta"]  # once: never orphaned, never resumed
    said = daemons["alpha"].log()
    assert "session adopted" not in said  # beta's worker is not alpha's to watch
    assert "session orphaned" not in said


def test_a_host_of_its_own_runs_every_job_whatever_its_name_has_become(layout: Layout, planted: Planted) -> None:
    """SQLite is one host's store: a job submitted before the machine's name changed (a container
    started anew) still runs."""
    first = balancer(layout, "before")
    try:
        job = submit(layout, "submitted before")
        wait_until(lambda: "reason=no-eligible-account" in first.log(), "the job to wait for an account")
    finally:
        first.stop()
    write_credential(layout.credentials, "a1", oauth_credential(planted))
    second = balancer(layout, "after")
    try:
        wait_until(lambda: job_states(layout).get(job) == "done", "the job to run under the new name")
        wait_until(lambda: [h["live"] for h in hosts(layout)[1]["hosts"]] == [True, False], "the old name to be gone")
        shown = cl(layout, "status").stdout
    finally:
        second.stop()
    assert "HEARTBEAT" not in shown  # one live host: no table of hosts


def test_an_account_name_two_hosts_use_for_different_credentials_is_said_to_clash(
    fleet: dict[str, Layout], planted: Planted
) -> None:
    """Walls, usage and settings are kept by account name: two accounts under one name would share
    them. The same credential under one name is a copy (a duplicate), not a clash."""
    write_credential(fleet["alpha"].credentials, "a1", oauth_credential(planted))
    write_credential(fleet["beta"].credentials, "a1", oauth_credential(planted))
    with balancers(fleet) as daemons:
        wait_until(lambda: hosts(fleet["alpha"])[1]["clashes"], "the clash to show")
        code, reply, said = hosts(fleet["alpha"])
        beats(fleet["alpha"], "beta", 2)
    assert (code, reply["clashes"], reply["duplicates"]) == (1, [{"account": "a1", "hosts": ["alpha", "beta"]}], [])
    assert "account name a1 is used on alpha and beta for different credentials" in said
    for daemon in daemons:
        assert daemon.log().count("one account name on several hosts") == 1
    same = [HostRecord(host, 0.0, (Published("a1", "ok", "f1"),)) for host in ("alpha", "beta")]
    assert (clashes(same), len(duplicates(same))) == ([], 1)


def test_accounts_and_status_show_each_accounts_home_and_the_sessions_by_host(
    fleet: dict[str, Layout], planted: Planted
) -> None:
    alpha, beta = fleet["alpha"], fleet["beta"]
    write_credential(alpha.credentials, "a1", oauth_credential(planted))
    write_credential(beta.credentials, "b1", oauth_credential(planted))
    env = alpha.env(CL_HOST="alpha", CL_HEARTBEAT_INTERVAL="0.5")
    with balancers(fleet), contextlib.ExitStack() as stack:
        rescue = DaemonProcess("rescue", alpha, env=env).start()
        stack.callback(rescue.stop)
        wait_until(lambda: roster_of(hosts(alpha)[1], "beta") == {"b1"}, "beta's roster on alpha")
        beta.hold.touch()
        stack.callback(beta.hold.unlink, missing_ok=True)
        submit(beta, "on beta")
        wait_until(lambda: len(beta.claude_calls()) == 1, "beta's session to start")
        accounts = [line.split() for line in cl(alpha, "accounts").stdout.splitlines()]
        shown = cl(alpha, "status").stdout
        fleet_json = json.loads(cl(alpha, "status", "--json").stdout)["fleet"]
    assert accounts[0] == ["ACCOUNT", "STATE", "HOME", "KIND", "EXPIRES", "5H", "7D", "SETTINGS", "REASON"]
    assert accounts[1][:4] == ["a1", "ok", "alpha", "oauth"]
    assert accounts[2] == ["b1", "elsewhere", "beta", "-", "-", "-", "-", "-", "an", "account", "of", "beta"]
    assert re.search(r"alpha \(this host\) +[\d.]+ s ago +live +1 +0 session\(s\)", shown)
    assert re.search(r"beta +[\d.]+ s ago +live +1 +1 session\(s\)", shown)
    assert [host["name"] for host in fleet_json["hosts"]] == ["alpha", "beta"]


def test_heartbeats_missed_while_the_database_is_away_are_said_once_and_resume(
    tmp_path: Path, postgresql: postgres.Server, planted: Planted
) -> None:
    """The database refuses every connection for a while (a restart, a cut): the balancer lives on,
    says once that its heartbeats are missed, and publishes again once the database answers."""
    database = postgresql.database()
    name = database.split("?")[0].rsplit("/", 1)[1]
    layout = Layout(tmp_path, store=database)
    write_credential(layout.credentials, "a1", oauth_credential(planted))
    env = layout.env(CL_HOST="alpha", CL_HEARTBEAT_INTERVAL="0.2", CL_STORE_BUSY_TIMEOUT="0.5")
    daemon = DaemonProcess("balancer", layout, env=env).start()
    try:
        wait_until(lambda: roster_of(hosts(layout)[1], "alpha") == {"a1"}, "the first heartbeat")
        postgresql.sql(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
        postgresql.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", name)
        wait_until(lambda: "heartbeats missed" in daemon.log(), "a miss")
        for _ in range(3):  # each asks the store, and waits out its busy timeout: heartbeats go by, missed
            assert cl(layout, "hosts").returncode == 3  # unavailable, said so
        postgresql.sql(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
        wait_until(lambda: "heartbeats again" in daemon.log(), "the heartbeats to resume", timeout=60)
        beats(layout, "alpha", 2)
    finally:
        postgresql.sql(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
        daemon.stop()
    assert daemon.log().count("heartbeats missed") == 1


def test_a_daemon_whose_database_cannot_be_reached_at_start_says_so_and_exits(layout: Layout) -> None:
    """No traceback: one line that says why, and exit 1 (systemd starts it again)."""
    env = layout.env(CL_STORE=f"postgresql:///cl?host={layout.root / 'no-server'}", CL_STORE_BUSY_TIMEOUT="1")
    for name in ("balancer", "gateway"):
        daemon = DaemonProcess(name, layout, env={**env, "CL_GATEWAY": "true"}).start(wait=False)
        assert daemon.exit_code() == 1
        said = daemon.log()
        assert "cannot open the state store" in said, said
        assert "Traceback" not in said
