"""An account lives where its file lives: the fleet's hosts reach each other's accounts only
through the account's home gateway, over TLS with certificates both ways.

Three hosts on one machine, each with its own daemons, directories, sockets and host name, its
gateway on its own loopback address (alpha 127.0.0.1, beta 127.0.0.2, gamma 127.0.0.3), one real
PostgreSQL database. The fake API listens on all three addresses, one port, and says which one
each request came to: each host's gateway is told to use its own, so the fake sees who sent what.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import json
import signal
import socket
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import postgres
from cl.store import Store
from utils import (
    FAR_FUTURE_MS,
    DaemonProcess,
    FakeApi,
    Layout,
    Planted,
    cl,
    end_workers,
    fake_api_running,
    free_port,
    job_states,
    stored,
    submit,
    wait_until,
    write_credential,
)

ADDRESSES = {"alpha": "127.0.0.1", "beta": "127.0.0.2", "gamma": "127.0.0.3"}


def certificates(root: Path, hosts: list[str], authority: str = "cl fleet CA") -> Path:
    """A certificate authority and, for each host, a key and a certificate it signed naming the
    host (DNS subjectAltName), good for both ends of a connection: `<host>.pem`, `<host>.key`."""
    root.mkdir()

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=root, check=True, capture_output=True)

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", f"/CN={authority}",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign")  # fmt: skip
    for host in hosts:
        openssl("req", *ec, "-keyout", f"{host}.key", "-out", f"{host}.csr", "-subj", f"/CN={host}")
        (root / f"{host}.cnf").write_text(f"subjectAltName=DNS:{host}\nextendedKeyUsage=serverAuth,clientAuth\n")
        openssl("x509", "-req", "-in", f"{host}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{host}.pem", "-days", "2", "-extfile", f"{host}.cnf")  # fmt: skip
    return root


@dataclass
class Host:
    name: str
    layout: Layout
    gateway_listen: str
    fleet_listen: str
    daemons: dict[str, DaemonProcess]

    def log(self, daemon: str) -> str:
        return self.daemons[daemon].log()


@contextlib.contextmanager
def fleet_running(
    root: Path, database: str, api: FakeApi, tls: Path, heartbeat: float = 0.5, **extra: str
) -> Iterator[dict[str, Host]]:
    """The three hosts, each with its gateway, balancer and rescuer, reaching each other's accounts."""
    port = api.url.rpartition(":")[2]
    hosts: dict[str, Host] = {}
    try:
        for name, address in ADDRESSES.items():
            layout = Layout(root / name, store=as_role(database, name))
            gateway_listen, fleet_listen = f"{address}:{free_port()}", f"{address}:{free_port()}"
            env = layout.env(
                CL_HOST=name,
                CL_HEARTBEAT_INTERVAL=str(heartbeat),
                CL_GATEWAY="true",
                CL_GATEWAY_LISTEN=gateway_listen,
                CL_GATEWAY_UPSTREAM=f"http://{address}:{port}",
                CL_OAUTH_TOKEN_URL=f"http://{address}:{port}/v1/oauth/token",
                CL_FLEET_LISTEN=fleet_listen,
                CL_FLEET_CERT=str(tls / f"{name}.pem"),
                CL_FLEET_KEY=str(tls / f"{name}.key"),
                CL_FLEET_CA=str(tls / "ca.pem"),
                **extra,
            )
            daemons = {daemon: DaemonProcess(daemon, layout, env=env) for daemon in ("gateway", "balancer", "rescue")}
            hosts[name] = Host(name, layout, gateway_listen, fleet_listen, daemons)
            for daemon in daemons.values():
                daemon.start()
        yield hosts
    except BaseException:
        for host in hosts.values():
            for daemon in host.daemons.values():
                print(f"--- the end of {host.name}'s cl-{daemon.name} log:\n{daemon.log()[-4000:]}")
        raise
    finally:
        for host in hosts.values():
            for daemon in reversed(host.daemons.values()):
                if daemon.process is not None:
                    daemon.stop()


def as_role(database: str, host: str) -> str:
    """The database's URL for `host`: each host connects as a role of its own (a superuser, made
    once per server), so that a test can cut one host off (`ALTER ROLE host NOLOGIN`)."""
    server, _, query = database.partition("?")
    return f"{server}?{query.replace('user=postgres', f'user={host}')}"


@pytest.fixture
def tls(tmp_path: Path) -> Path:
    return certificates(tmp_path / "tls", list(ADDRESSES))


def make_roles(server: postgres.Server) -> None:
    """A role per host (`as_role`), on `server`."""
    for host in ADDRESSES:
        server.sql(f"DO $$ BEGIN CREATE ROLE {host} SUPERUSER LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$")


@pytest.fixture(autouse=True)
def roles(postgresql: postgres.Server) -> None:
    make_roles(postgresql)


@pytest.fixture
def api(tmp_path: Path) -> Iterator[FakeApi]:
    with fake_api_running(tmp_path, "--also-on", "127.0.0.2,127.0.0.3") as api:
        yield api


@pytest.fixture
def hosts(tmp_path: Path, postgresql: postgres.Server, api: FakeApi, tls: Path) -> Iterator[dict[str, Host]]:
    with fleet_running(tmp_path, postgresql.database(), api, tls) as hosts:
        yield hosts


def account(layout: Layout, planted: Planted, name: str) -> str:
    """An OAuth account's file dropped in on a host; its access token."""
    access = planted.token()
    oauth = {
        "accessToken": access,
        "refreshToken": planted.token("sk-ant-ort01-"),
        "expiresAt": FAR_FUTURE_MS,
        "scopes": ["user:inference"],
        "subscriptionType": "max",
    }
    write_credential(layout.credentials, name, json.dumps({"claudeAiOauth": oauth}))
    return access


def hosts_seen(layout: Layout) -> list[dict[str, Any]]:
    """The fleet's hosts, as `layout`'s host sees them (`cl hosts`)."""
    hosts: list[dict[str, Any]] = json.loads(cl(layout, "hosts", "--json").stdout)["hosts"]
    return hosts


def published(layout: Layout) -> set[str]:
    """The accounts the live hosts publish, as `layout`'s host sees them."""
    return {account["name"] for host in hosts_seen(layout) if host["live"] for account in host["accounts"]}


def jobs(layout: Layout) -> dict[int, dict[str, Any]]:
    return {job["id"]: job for job in json.loads(cl(layout, "jobs", "--all", "--json").stdout)}


def test_the_seeds_afternoon_across_hosts(hosts: dict[str, Host], api: FakeApi, planted: Planted) -> None:
    """Alpha's three accounts wall while its sessions run; then a fourth account's file is dropped
    on gamma. Alpha's sessions go on under it, live, one CLI start each: their capability and
    base URL unchanged, alpha's gateway forwards to gamma's, and the fourth account's token
    reaches the API from gamma's gateway only. A job submitted on beta, which has no account,
    runs on it too."""
    alpha, beta, gamma = hosts["alpha"].layout, hosts["beta"].layout, hosts["gamma"].layout
    walled = [account(alpha, planted, name) for name in ("a1", "a2", "a3")]
    for token in walled:
        api.limit(token, 0)  # each walls its first request
    with alpha.started_together(3):
        sessions = [submit(alpha, f"session {i}") for i in range(3)]
    wait_until(lambda: set(job_states(alpha).values()) == {"walled"}, "alpha's three sessions to wall")
    wait_until(lambda: hosts["alpha"].log("balancer").count("session held for a live move") == 3, "each one held")
    fourth = account(gamma, planted, "a4")
    wait_until(lambda: set(job_states(alpha).values()) == {"done"}, "alpha's sessions to go on under a4", timeout=60)
    on_beta = submit(beta, "on beta")
    wait_until(lambda: job_states(beta).get(on_beta) == "done", "beta's job to run on a4")

    calls = alpha.claude_calls()
    assert len({call["pid"] for call in calls}) == 3  # one CLI start each
    assert sorted(call["prompt"] for call in calls) == sorted([*(f"session {i}" for i in range(3)), *["continue"] * 3])
    for job in sessions:
        runs = stored(alpha, functools.partial(Store.job_runs, job_id=job))
        assert (runs[-1].account, runs[-1].live, runs[-1].state) == ("a4", True, "done")
        assert len({run.pid for run in runs}) == 1  # the same worker, the same CLI, all along
    assert jobs(beta)[on_beta]["account"] == "a4"
    messages = api.messages()
    assert {m["via"] for m in messages if m["cred_tail"] == fourth[-6:]} == {"127.0.0.3"}  # gamma's gateway only
    assert len([m for m in messages if m["cred_tail"] == fourth[-6:]]) == 4
    assert {m["via"] for m in messages if m["cred_tail"] != fourth[-6:]} == {"127.0.0.1"}
    assert "listening for the fleet" in hosts["gamma"].log("gateway")
    assert not planted.leaks(hosts["alpha"].log("gateway") + hosts["beta"].log("gateway"), "the forwarding logs")
    for name in ("a1", "a2", "a3"):  # alpha's own accounts would not serve the model; gamma's a4 does
        assert cl(alpha, "accounts", "set", name, "models=opus").returncode == 0
    asked = cl(alpha, "submit", "--cwd", str(alpha.work), "--prompt", "on sonnet", "--model", "sonnet", "--json")
    assert asked.returncode == 0, asked.stderr


def fleet_client(tls: Path, host: str | None, authority: str = "ca.pem") -> ssl.SSLContext:
    """A client's TLS context: trusting `authority`, presenting `host`'s certificate (or none)."""
    context = ssl.create_default_context(cafile=str(tls / authority))
    if host is not None:
        context.load_cert_chain(tls / f"{host}.pem", tls / f"{host}.key")
    return context


def ask(address: str, context: ssl.SSLContext, name: str, token: str) -> tuple[int, str]:
    """A POST /v1/messages to a gateway's fleet listener, as the host `name` expects it to be."""
    host, _, port = address.rpartition(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=20)
    try:
        connection.sock = context.wrap_socket(socket.create_connection((host, int(port)), 20), server_hostname=name)
        connection.request("POST", "/v1/messages", b"{}", {"authorization": f"Bearer {token}"})
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def test_a_gateway_takes_the_fleets_requests_only_with_a_certificate_of_the_fleet(
    hosts: dict[str, Host], tls: Path, tmp_path: Path, planted: Planted
) -> None:
    """Gamma's fleet listener: no certificate, or one another authority signed, is refused in the
    handshake; a fleet certificate with an unknown capability gets 401, and a capability whose
    account does not live there gets 421 (never forwarded on)."""
    gamma = hosts["gamma"].fleet_listen
    stranger = certificates(tmp_path / "stranger", ["alpha"], authority="not the fleet's CA")
    for context in (fleet_client(tls, None), fleet_client(stranger, "alpha", "../tls/ca.pem")):
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            ask(gamma, context, "gamma", "cl-cap-nothing")
    with pytest.raises(ssl.SSLCertVerificationError):  # the home is checked too: gamma is not beta
        ask(gamma, fleet_client(tls, "alpha"), "beta", "cl-cap-nothing")
    status, body = ask(gamma, fleet_client(tls, "alpha"), "gamma", "cl-cap-nothing")
    assert (status, json.loads(body)["error"]["type"]) == (401, "authentication_error")

    alpha = hosts["alpha"].layout
    account(alpha, planted, "a1")
    alpha.hold.touch()
    try:
        job = submit(alpha, "held")
        wait_until(lambda: len(alpha.claude_calls()) == 1, "alpha's CLI to start")
        held = json.loads((alpha.sessions / f"job-{job}" / ".credentials.json").read_text())
        status, body = ask(gamma, fleet_client(tls, "alpha"), "gamma", held["claudeAiOauth"]["accessToken"])
    finally:
        alpha.hold.unlink()
    assert (status, "account a1 is not served by this host" in body) == (421, True)
    wait_until(lambda: job_states(alpha).get(job) == "done", "alpha's own session to end")
    assert stored(alpha, Store.walls) == {}


def test_a_host_learns_of_another_hosts_change_when_the_database_tells_it(
    tmp_path: Path, postgresql: postgres.Server, api: FakeApi, tls: Path, planted: Planted
) -> None:
    """Heartbeats a minute apart, so no pass per heartbeat explains what follows. A job on beta,
    which has no account, waits; a file dropped on gamma, the database notifies beta's balancer,
    which places the job there. Beta's listening connection cut (`pg_terminate_backend`), it
    listens again, and the next file dropped on gamma is heard of as the first was."""
    with fleet_running(tmp_path, postgresql.database(), api, tls, heartbeat=60) as hosts:
        beta, gamma, said = hosts["beta"].layout, hosts["gamma"].layout, hosts["beta"].daemons["balancer"].log
        first = submit(beta, "first")
        wait_until(lambda: said().count("reason=no-eligible-account") == 1, "the job to wait for an account")
        account(gamma, planted, "g1")
        wait_until(lambda: job_states(beta).get(first) == "done", "the job to run on g1", timeout=40)
        (gamma.credentials / "credentials-g1.json").unlink()
        second = submit(beta, "second")
        wait_until(lambda: said().count("reason=no-eligible-account") == 2, "the next job to wait")
        (cut,) = postgresql.sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'cl-balancer beta'"
        )
        assert cut == (True,)
        wait_until(lambda: "listening for the fleet's changes again" in said(), "beta to listen again")
        account(gamma, planted, "g2")
        wait_until(lambda: job_states(beta).get(second) == "done", "the next job to run on g2", timeout=40)
        placed = [jobs(beta)[job]["account"] for job in (first, second)]
    assert said().count("not listening for the fleet's changes") == 1
    assert placed == ["g1", "g2"]


def test_when_an_accounts_home_dies_its_sessions_move_or_wait_and_go_on_when_it_is_back(
    tmp_path: Path, postgresql: postgres.Server, api: FakeApi, tls: Path, planted: Planted
) -> None:
    """Alpha has no account of its own; gamma has a4, beta b1. Gamma dies (its daemons killed)
    while alpha's session on a4 waits to send its request: the request meets no home, gamma is
    cut off from alpha for `wall_retry`, and the session goes on on b1 at once, its CLI none the
    wiser. Then, b1 paused and gamma back, a session on a4 meets gamma dead again with no other
    account: its turn ends as on a wall and it waits, held, until gamma is back and the cut-off
    has passed, then goes on on a4. One CLI start each, nothing run twice."""
    with fleet_running(tmp_path, postgresql.database(), api, tls, CL_WALL_RETRY="4") as hosts:
        alpha, beta, gamma = hosts["alpha"].layout, hosts["beta"].layout, hosts["gamma"]
        a4, b1 = account(gamma.layout, planted, "a4"), account(beta, planted, "b1")

        def dies() -> None:
            for daemon in gamma.daemons.values():
                daemon.stop(signal.SIGKILL)

        def comes_back() -> None:
            for daemon in gamma.daemons.values():
                daemon.start()

        def held_on_a4(prompt: str) -> int:
            alpha.hold.touch()
            job = submit(alpha, prompt)
            wait_until(lambda: len({c["pid"] for c in alpha.claude_calls()}) == job, f"{prompt}'s CLI to start")
            assert jobs(alpha)[job]["account"] == "a4"
            return job

        first = held_on_a4("first")  # a4 before b1: the same room, the name first
        dies()
        alpha.hold.unlink()
        wait_until(lambda: job_states(alpha).get(first) == "done", "the first session to go on on b1")
        assert [r.account for r in stored(alpha, functools.partial(Store.job_runs, job_id=first))] == ["a4", "b1"]

        assert cl(beta, "accounts", "pause", "b1").returncode == 0
        comes_back()
        second = held_on_a4("second")  # once the cut-off has passed
        dies()
        alpha.hold.unlink()
        wait_until(lambda: job_states(alpha).get(second) == "walled", "the second session to wait")
        wait_until(lambda: "session held for a live move" in hosts["alpha"].log("balancer"), "its CLI held")
        comes_back()
        wait_until(lambda: job_states(alpha).get(second) == "done", "the second session to go on on a4")
        story = cl(alpha, "job", str(second)).stdout
        runs = stored(alpha, functools.partial(Store.job_runs, job_id=second))

    calls = alpha.claude_calls()
    assert len({call["pid"] for call in calls}) == 2  # one CLI start each
    assert [call["prompt"] for call in calls] == ["first", "second", "continue"]
    assert [(run.account, run.state) for run in runs] == [("a4", "walled"), ("a4", "done")]
    assert runs[1].live
    assert runs[1].pid == runs[0].pid
    said = hosts["alpha"].log("gateway")
    assert said.count("an account's home cannot be reached") == 1  # not reached between the two: one outage
    assert said.count("an account's home is reachable again") == 1
    assert "account a4: its home host cannot be reached from this host" in story, story
    assert "transcript did not grow" not in hosts["alpha"].log("rescue")  # moved in flight, measured as it began
    messages = api.messages()
    assert [m["cred_tail"] for m in messages] == [b1[-6:], a4[-6:]]  # nothing went twice
    assert {m["via"] for m in messages} == {"127.0.0.2", "127.0.0.3"}


def test_the_database_restarting_with_sessions_under_way_loses_nothing_and_runs_nothing_twice(
    tmp_path: Path, postgresql: postgres.Server, api: FakeApi, tls: Path, planted: Planted
) -> None:
    """Sessions on alpha and beta, on alpha's a1 and gamma's a4, wait to send their requests while
    the database restarts (every connection dropped). Then each goes on: every job done, one CLI
    start and one request each; the daemons listen for the fleet's changes again."""
    with fleet_running(tmp_path, postgresql.database(), api, tls) as hosts:
        alpha, beta = hosts["alpha"].layout, hosts["beta"].layout
        account(alpha, planted, "a1")
        account(hosts["gamma"].layout, planted, "a4")
        wait_until(lambda: "a4" in published(alpha), "gamma's a4 to be the fleet's")
        with alpha.started_together(4), beta.started_together(1):
            on_alpha = [submit(alpha, f"alpha {i}") for i in range(4)]
            on_beta = submit(beta, "beta 0")
            wait_until(lambda: len(alpha.claude_calls()) == 4 and len(beta.claude_calls()) == 1, "every CLI")
            postgresql.restart()
        wait_until(lambda: set(job_states(alpha).values()) == {"done"}, "alpha's sessions", timeout=60)
        wait_until(lambda: job_states(beta).get(on_beta) == "done", "beta's session", timeout=60)
        wait_until(
            lambda: all(
                "listening for the fleet's changes again" in h.log(d)
                for h in hosts.values()
                for d in ("balancer", "rescue")
            ),
            "every daemon to listen again",
        )
        placed = {job: jobs(alpha)[job]["account"] for job in on_alpha}
    assert sorted(placed.values()) == ["a1", "a1", "a4", "a4"]
    calls = alpha.claude_calls() + beta.claude_calls()
    assert sorted(call["prompt"] for call in calls) == ["alpha 0", "alpha 1", "alpha 2", "alpha 3", "beta 0"]
    assert len({(call["pid"]) for call in calls}) == 5
    assert len(api.messages()) == 5  # one request each: nothing went twice


def test_while_the_database_is_away_a_cli_is_told_the_api_is_overloaded(
    hosts: dict[str, Host], postgresql: postgres.Server
) -> None:
    """A request the gateway cannot take to its run (the store refuses connections) is answered
    529, which the CLI tries again later, not 500; once the store answers, as ever."""
    name = hosts["alpha"].layout.store.partition("?")[0].rpartition("/")[2]
    host, _, port = hosts["alpha"].gateway_listen.rpartition(":")

    def status() -> tuple[int, str]:
        connection = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            connection.request("POST", "/v1/messages", b"{}", {"authorization": "Bearer cl-cap-unknown"})
            response = connection.getresponse()
            return response.status, json.loads(response.read())["error"]["type"]
        finally:
            connection.close()

    postgresql.sql(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
    try:
        postgresql.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", name)
        assert status() == (529, "overloaded_error")
    finally:
        postgresql.sql(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
    wait_until(lambda: status() == (401, "authentication_error"), "the gateway to reach the store again")
    assert "request refused: state store unavailable" in hosts["alpha"].log("gateway")


def test_a_host_that_dies_whole_takes_its_session_back_when_it_returns_and_no_other_host_takes_it(
    hosts: dict[str, Host], api: FakeApi, planted: Planted
) -> None:
    """Alpha's session runs on gamma's a4 when alpha dies whole: its daemons killed, its worker
    too (its CLI with it). Alpha drops out of the fleet; beta and gamma leave its job alone. Its
    daemons start again: the session is found orphaned and resumed, once, through gamma."""
    alpha = hosts["alpha"]
    a4 = account(hosts["gamma"].layout, planted, "a4")
    wait_until(lambda: "a4" in published(alpha.layout), "gamma's a4 to be the fleet's")
    alpha.layout.hold.touch()
    job = submit(alpha.layout, "interrupted")
    wait_until(lambda: any(run.session_id for run in stored(alpha.layout, Store.runs_in)), "the session to have its id")
    for daemon in alpha.daemons.values():
        daemon.stop(signal.SIGKILL)
    assert end_workers(alpha.layout)  # the worker: its CLI goes with it
    wait_until(
        lambda: not any(h["live"] for h in hosts_seen(hosts["beta"].layout) if h["name"] == "alpha"), "alpha out"
    )
    assert stored(alpha.layout, Store.jobs)[0].state == "running"  # nobody took it over
    alpha.layout.hold.unlink()
    for daemon in alpha.daemons.values():
        daemon.start()
    wait_until(lambda: job_states(alpha.layout).get(job) == "done", "the session to be resumed and end")
    first, resumed = alpha.layout.claude_calls()
    assert (resumed["session_id"], "--resume" in resumed["argv"]) == (first["session_id"], True)
    assert "session orphaned" in alpha.log("rescue")
    for other in ("beta", "gamma"):
        assert not hosts[other].layout.claude_calls()
        assert "session orphaned" not in hosts[other].log("rescue") + hosts[other].log("balancer")
    assert [(m["cred_tail"], m["via"]) for m in api.messages()] == [(a4[-6:], "127.0.0.3")]  # the resumed turn


def test_a_host_cut_off_from_the_database_leaves_the_fleet_and_sessions_on_its_accounts_move(
    hosts: dict[str, Host], api: FakeApi, postgresql: postgres.Server, planted: Planted
) -> None:
    """Beta's session is placed on alpha's a1 and waits to send its request. Alpha is cut off from
    the database (its role refused, its connections ended): its heartbeats stop and its gateway
    cannot take a capability to its run. The session goes on, live, on gamma's g1: through
    alpha's refusal (503 to another host) or, once alpha has dropped out, without asking it. The
    cut healed, alpha's heartbeats resume and a1 is the fleet's again."""
    alpha, beta = hosts["alpha"], hosts["beta"].layout
    a1, g1 = account(alpha.layout, planted, "a1"), account(hosts["gamma"].layout, planted, "g1")
    wait_until(lambda: {"a1", "g1"} <= published(beta), "a1 and g1 to be the fleet's")
    beta.hold.touch()
    job = submit(beta, "on a1")
    wait_until(lambda: len(beta.claude_calls()) == 1, "beta's CLI to start")
    assert jobs(beta)[job]["account"] == "a1"  # the same room: the name first
    postgresql.sql("ALTER ROLE alpha NOLOGIN")
    try:
        postgresql.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'alpha'")
        beta.hold.unlink()
        wait_until(lambda: job_states(beta).get(job) == "done", "the session to go on on g1")
        wait_until(lambda: "heartbeats missed" in alpha.log("balancer"), "alpha to miss its heartbeats")
        wait_until(lambda: "a1" not in published(beta), "a1 to leave the fleet")
    finally:
        postgresql.sql("ALTER ROLE alpha LOGIN")
    wait_until(lambda: "heartbeats again" in alpha.log("balancer"), "alpha's heartbeats to resume")
    wait_until(lambda: "a1" in published(beta), "a1 to be the fleet's again")
    runs = stored(beta, functools.partial(Store.job_runs, job_id=job))
    assert [(run.account, run.live) for run in runs] == [("a1", False), ("g1", True)]
    assert len({call["pid"] for call in beta.claude_calls()}) == 1  # one CLI start
    assert [(m["cred_tail"], m["via"]) for m in api.messages()] == [(g1[-6:], "127.0.0.3")]
    assert a1[-6:] not in {m["cred_tail"] for m in api.messages()}


def test_a_host_cut_off_from_the_database_stops_its_clis_before_their_leases_lapse(
    tmp_path: Path, postgresql: postgres.Server, api: FakeApi, tls: Path, planted: Planted
) -> None:
    """Alpha's session runs on a1 when alpha is cut off from the database. Its worker cannot renew
    the run's lease (3 s here): it stops its CLI before the lease lapses, so when the lease has
    lapsed on the database's clock no process of the session is alive, and a1's room is the
    fleet's again. The cut healed, alpha's rescuer finds the run orphaned and resumes it, once."""
    database = postgresql.database()
    with fleet_running(tmp_path, database, api, tls, CL_RUN_LEASE="3") as hosts:
        alpha = hosts["alpha"]
        account(alpha.layout, planted, "a1")
        wait_until(lambda: "a1" in published(hosts["beta"].layout), "a1 to be the fleet's")
        alpha.layout.hold.touch()
        job = submit(alpha.layout, "cut off")
        wait_until(lambda: any(run.session_id for run in stored(alpha.layout, Store.runs_in)), "the session's id")
        (started,) = wait_until(alpha.layout.claude_calls, "the CLI to start")
        fleet = Store(database)  # as the database's owner: not cut off
        try:
            (run,) = fleet.runs_in(("running",))
            postgresql.sql("ALTER ROLE alpha NOLOGIN")
            try:
                postgresql.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'alpha'")
                lapsed = fleet.get_run(run.id)
                assert lapsed is not None
                assert lapsed.lease_until is not None
                wait_until(lambda: [r.id for r in fleet.lapsed()] == [run.id], "the lease to lapse", timeout=60)
                assert not Path(f"/proc/{started['pid']}").exists()  # the CLI was stopped first
                assert "lease lost, stopping the CLI" in alpha.log("balancer")
                assert fleet.live_counts().get("a1", 0) == 0
                assert fleet.get_job(job).state == "running"  # type: ignore[union-attr]  # nobody took it over
            finally:
                postgresql.sql("ALTER ROLE alpha LOGIN")
            alpha.layout.hold.unlink()
            wait_until(lambda: job_states(alpha.layout).get(job) == "done", "the session to be resumed and end")
            runs = fleet.job_runs(job)
        finally:
            fleet.close()
    assert [r.state for r in runs] == ["orphaned", "done"]
    first, resumed = alpha.layout.claude_calls()
    assert (resumed["session_id"], "--resume" in resumed["argv"]) == (first["session_id"], True)


def test_a_black_holed_link_to_an_accounts_home_is_cut_off_and_its_session_moves(
    tmp_path: Path, postgresql: postgres.Server, api: FakeApi, tls: Path, planted: Planted
) -> None:
    """Gamma's gateway goes silent (stopped: its kernel still takes connections and bytes, nothing
    answers) while gamma's balancer and rescuer go on: gamma stays in the fleet, only the link
    from alpha to it is dead. A session of alpha's on gamma's a4 sends its request into the
    silence (on the connection a first session left open): after `fleet_answer_timeout` gamma is
    cut off from alpha and the session goes on, live, on beta's b1. When gamma wakes, the request
    it finds waiting names a run that has moved on: it is refused, and a4's token never reaches
    the API for it."""
    with fleet_running(tmp_path, postgresql.database(), api, tls, CL_FLEET_ANSWER_TIMEOUT="2") as hosts:
        alpha, gamma = hosts["alpha"].layout, hosts["gamma"]
        a4, b1 = account(gamma.layout, planted, "a4"), account(hosts["beta"].layout, planted, "b1")
        wait_until(lambda: {"a4", "b1"} <= published(alpha), "a4 and b1 to be the fleet's")
        assert cl(alpha, "accounts", "pause", "b1").returncode == 0  # until both sessions are on a4
        first = submit(alpha, "first")  # through gamma: alpha's gateway keeps the connection open
        wait_until(lambda: job_states(alpha).get(first) == "done", "the first session to end on a4")
        alpha.hold.touch()
        second = submit(alpha, "second")
        wait_until(lambda: len(alpha.claude_calls()) == 2, "the second session's CLI to start")
        assert jobs(alpha)[second]["account"] == "a4"
        assert cl(alpha, "accounts", "resume", "b1").returncode == 0
        silent = gamma.daemons["gateway"].process
        assert silent is not None
        silent.send_signal(signal.SIGSTOP)
        try:
            alpha.hold.unlink()
            wait_until(lambda: job_states(alpha).get(second) == "done", "the second session to go on on b1")
        finally:
            silent.send_signal(signal.SIGCONT)
        runs = stored(alpha, functools.partial(Store.job_runs, job_id=second))
        assert [(run.account, run.live) for run in runs] == [("a4", False), ("b1", True)]
        assert len({call["pid"] for call in alpha.claude_calls()}) == 2  # one CLI start each
        assert "no answer in 2 s" in hosts["alpha"].log("gateway")
        assert "published" in gamma.log("balancer")  # gamma stayed in the fleet meanwhile
        # gamma awake: the request it found waiting, from before alpha gave up on it, was read first
        status, _ = ask(gamma.fleet_listen, fleet_client(tls, "alpha"), "gamma", "cl-cap-nothing")
        assert status == 401
    assert [m["cred_tail"] for m in api.messages()] == [a4[-6:], b1[-6:]]
