"""A hostile CLI tries every way out of its session, under `make run` as root and under systemd (the
installed units in a throwaway systemd 252, each session in its `cl-worker@` unit, its CLI in a
`cl-cli@` unit): either way each job's CLI runs as a user of the pool (cl-cli-N), in a view of its
own. Every attempt is refused, and the refusal itself is asserted.

The CLI is `tests/fakes/hostile`, chosen per job by its prompt: one job is the victim (it waits),
the other attacks the sockets, the daemons, the victim's worker and CLI, the store, the
credentials, the victim's session files and the run logs, plants links where the worker works,
prints the token it holds, and ends on a wall, so that the next worker (moved to another account)
has to deal with what it planted.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import shutil
import signal
import sqlite3
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sdbox import Box, booted, cli_network, drop_credential, submit, unavailable

from cl.client import DaemonUnreachable, call
from cl.config import load_config
from utils import POOL, REPO, FakeApi, Planted, free_port, make_run, oauth_credential, wait_until, write_credential

HOSTILE = REPO / "tests" / "fakes" / "hostile"
HOSTILE_GATEWAY = REPO / "tests" / "fakes" / "hostile_gateway"
SYSTEM_PYTHON = Path("/usr/bin/python3")

pytestmark = [
    pytest.mark.skipif(os.getuid() != 0, reason="the CLI gets its own user only when cl runs as root"),
    pytest.mark.skipif(not SYSTEM_PYTHON.exists(), reason="the fake CLI needs a python3 that cl-cli can run"),
]


def install_fake(source: Path, directory: Path) -> Path:
    """The fake CLI where its own user can run it (not under /root), with a system interpreter."""
    directory.mkdir(mode=0o755, exist_ok=True)
    target = directory / source.name
    target.write_text(f"#!{SYSTEM_PYTHON}\n" + source.read_text().split("\n", 1)[1])
    target.chmod(0o755)
    return target


@dataclass
class Run:
    """`make run VAR=var` as root, and how to reach it."""

    var: Path
    process: subprocess.Popen[str]

    def ask(self, daemon: str, request: dict[str, Any]) -> dict[str, Any]:
        return call(self.var / "run" / f"{daemon}.sock", request)

    def jobs(self) -> dict[int, dict[str, Any]]:
        return {job["id"]: job for job in self.ask("balancer", {"request": "status", "finished": True})["jobs"]}

    def submit(self, prompt: str, cwd: Path) -> int:
        reply = self.ask("balancer", {"request": "submit", "cwd": str(cwd), "prompt": prompt})
        assert reply["ok"], reply
        return int(reply["job"])


@pytest.fixture
def var() -> Iterator[Path]:
    """A `make run` directory cl-cli can reach (a pytest tmp dir is under a 0700 one)."""
    root = Path(tempfile.mkdtemp(prefix="cl-hostile-", dir="/var/tmp"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def started(var: Path, config: str) -> Run:
    """`make run` on `var` with this configuration, both daemons answering (stopped again if not)."""
    (var / "config.toml").write_text(config)
    process = make_run(var)
    run = Run(var, process)

    def answers() -> bool:
        try:
            return all(run.ask(daemon, {"request": "accounts", "names": []})["ok"] for daemon in ("balancer", "rescue"))
        except DaemonUnreachable:
            assert process.poll() is None, process.communicate()[0]
            return False

    try:
        wait_until(answers, "both daemons to answer", timeout=120)
    except BaseException:
        stop(run)
        raise
    return run


def stop(run: Run) -> str:
    os.killpg(run.process.pid, signal.SIGINT)
    out, _ = run.process.communicate(timeout=60)
    return out


@dataclass
class Attack:
    """What the hostile CLI reported, and what the test saw around it."""

    report: dict[str, Any]
    resumed: dict[str, Any]
    targets: dict[str, Any]
    daemons: list[int]
    victim: list[int]
    """The victim's worker and CLI (host pids)."""
    pool: set[int]
    """The uids of the CLI's users."""
    accounts_before: dict[Path, bytes]
    planted: Planted
    logs: dict[str, str]
    """Each run's log, by file name."""
    integrity: str
    """The state store's `PRAGMA integrity_check` afterwards."""
    said: str
    """What the daemons said (their output, or their journal)."""
    ip_rules: str | None = None
    """Under systemd: the worker unit's IP address rules, as systemd loaded them."""
    ip_firewall: bool = False
    """Under systemd: whether the box can enforce them (BPF on the unified cgroup hierarchy)."""
    ptrace_refused: str = "ESRCH"
    """ESRCH (no such process in its namespace); EPERM where the worker unit's seccomp filter
    refuses ptrace itself."""


VICTIM, ATTACK = "victim", "--dangerously-skip-permissions, then attack"
METRICS, ANOTHER_LOOPBACK_PORT, GATEWAY_ADDRESS = "127.0.0.1:9847", "127.0.0.1:8123", "127.0.0.2:8479"


def targets_in(credentials: Path, state: Path, sessions: Path, sockets: list[Path]) -> dict[str, Any]:
    return {
        "connect": [str(path) for path in sockets],
        "read": [
            str(credentials),
            str(credentials / "credentials-a1.json"),
            str(credentials / "credentials-a2.json"),
            str(state / "cl.db"),
            str(state / "logs"),
            str(sessions / "job-1"),
            str(sessions / "job-1" / ".credentials.json"),
        ],
        "write": [str(state / "cl.db"), str(credentials / "credentials-a2.json"), str(sessions / "job-1" / "x")],
        "links": [str(credentials / "credentials-a2.json"), str(state / "cl.db")],
    }


@pytest.fixture(scope="module", params=["make run as root", "systemd"])
def attack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Attack]:
    """The whole story once in each place: a victim job, an attacking job that walls on a1 and is
    moved to a2, both done."""
    if request.param == "systemd":
        if (why := unavailable()) is not None:
            pytest.skip(why)
        tmp = tmp_path_factory.mktemp("hostile-box")
        with booted(tmp, f"clhostile{os.getpid()}") as box:
            yield _attack_under_systemd(box, tmp, Planted())
        return
    root = Path(tempfile.mkdtemp(prefix="cl-hostile-", dir="/var/tmp"))  # pytest's tmp is under a 0700 dir
    root.chmod(0o755)
    try:
        yield _attack_under_make_run(root, Planted())
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _attack_under_make_run(var: Path, planted: Planted) -> Attack:
    fakes = install_fake(HOSTILE, var / "bin")
    work = var / "work"
    work.mkdir()
    state, credentials, runtime = var / "state", var / "claude", var / "run"
    sockets = [runtime / "balancer.sock", runtime / "rescue.sock"]
    targets = targets_in(credentials, state, var / "sessions", sockets)
    config = (
        'credentials_dir = "claude"\nstate_dir = "state"\nsessions_dir = "sessions"\nruntime_dir = "run"\n'
        f'claude_bin = "{fakes}"\ncli_readable = ["{fakes.parent}"]\nplacement = "fill-first"\ngateway = false\n'
        f'[worker.env]\nHOSTILE_TARGETS_FILE = "{fakes.parent / "targets.json"}"\n'
    )
    run = started(var, config)
    try:
        daemons = daemons_in_group(run.process.pid)
        assert len(daemons) == 2, daemons
        operators_dir(work)
        accounts = [write_credential(credentials, name, oauth_credential(planted)) for name in ("a1", "a2")]
        before = {path: path.read_bytes() for path in accounts}
        victim = run.submit(VICTIM, work)  # fill-first: both jobs start on a1
        wait_until((work / "victim.pid").exists, "the victim to run")
        pids = [worker_of_job_1(state), *processes_running(str(fakes))]
        aim(targets, daemons, pids, fakes.parent / "targets.json")  # known once they run: the fake reads the file then
        attacker = run.submit(ATTACK, work)
        wait_until((work / "resumed.json").exists, "the attacker to wall on a1 and resume on a2")
        (work / "release").touch()
        wait_until(lambda: {run.jobs()[victim]["state"], run.jobs()[attacker]["state"]} == {"done"}, "both done")
    finally:
        (work / "release").touch()
        out = stop(run)
    return Attack(
        report=json.loads((work / "attack.json").read_text()),
        resumed=json.loads((work / "resumed.json").read_text()),
        targets=targets,
        daemons=daemons,
        victim=pids,
        pool=pool_uids(),
        accounts_before=before,
        planted=planted,
        logs={log.name: log.read_text() for log in (state / "logs").iterdir()},
        integrity=sqlite3.connect(state / "cl.db").execute("PRAGMA integrity_check").fetchone()[0],
        said=out,
        ptrace_refused="ESRCH",
    )


def daemons_in_group(group: int) -> list[int]:
    """The balancer's and the rescuer's pids in `make run`'s process group.

    A daemon's child between fork and exec (about to be `claude --version` or bwrap) still shows
    the daemon's command line: a match whose parent matches too is such a child, and left out.
    """
    pattern = r"from cl\.(balancer|rescue) import"
    found = subprocess.run(["pgrep", "-f", "-g", str(group), pattern], capture_output=True, text=True, check=False)
    matching = {int(pid) for pid in found.stdout.split()}
    return sorted(pid for pid in matching if parent_of(pid) not in matching | {None})


def parent_of(pid: int) -> int | None:
    """`pid`'s parent, or None once it has gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return None
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))


def operators_dir(work: Path) -> None:
    """A job's directory as an operator makes it: writable by the CLI's users' group."""
    os.chown(work, -1, grp.getgrnam(POOL).gr_gid)
    work.chmod(0o2770)


def pool_uids() -> set[int]:
    return {entry.pw_uid for entry in pwd.getpwall() if entry.pw_name.startswith(f"{POOL}-")}


def worker_of_job_1(state: Path) -> int:
    with contextlib.closing(sqlite3.connect(state / "cl.db")) as db:
        return int(db.execute("SELECT pid FROM runs WHERE job_id = 1").fetchone()[0])


def processes_running(script: str) -> list[int]:
    """The pids of the interpreters running `script` (the victim's CLI: only it runs yet)."""
    found = subprocess.run(["pgrep", "-f", f"python3 {script} "], capture_output=True, text=True, check=False)
    return [int(pid) for pid in found.stdout.split()]


def aim(targets: dict[str, Any], daemons: list[int], victim: list[int], path: Path) -> None:
    """The victim's worker and CLI, and the daemons, as the attack's targets (`path`, for the fake)."""
    assert len(victim) == 2, victim
    targets["signal"] = targets["ptrace"] = [*daemons, *victim]
    targets["environ"] = victim
    path.write_text(json.dumps(targets))


def _attack_under_systemd(box: Box, tmp: Path, planted: Planted) -> Attack:
    sockets = [Path("/run/cl") / f"{name}.sock" for name in ("balancer", "rescue", "worker")]
    targets = targets_in(Path("/opt/claude"), Path("/var/lib/cl"), Path("/var/lib/cl-sessions"), sockets)
    config = (
        f'cli_network = "{cli_network(box)}"\n'
        'claude_bin = "/opt/fakes/hostile"\ncli_readable = ["/srv/fake"]\nplacement = "fill-first"\ngateway = false\n'
        '[worker.env]\nHOSTILE_TARGETS_FILE = "/srv/fake/targets.json"\n'
    )
    box(
        "sh",
        "-c",
        "mkdir -p /etc/cl /srv/work && chgrp cl-cli /srv/work && chmod 2770 /srv/work"
        f" && printf '%s' '{config}' > /etc/cl/config.toml",
    )
    box("systemctl", "enable", "--now", "cl-balancer.service", "cl-rescue.service", "cl-metrics.socket")
    box("systemd-run", "--unit=listener", str(SYSTEM_PYTHON), "-m", "http.server", "--bind", "127.0.0.1", "8123")
    units = ("cl-balancer", "cl-rescue")
    daemons = [int(box("systemctl", "show", "-p", "MainPID", "--value", unit).stdout) for unit in units]
    for name in ("a1", "a2"):
        drop_credential(box, tmp / "claude", name, oauth_credential(planted))
    before = {path: path.read_bytes() for path in sorted((tmp / "claude").glob("credentials-*.json"))}

    def exists(path: str) -> bool:
        if box("test", "-e", path, check=False).returncode == 0:
            return True
        assert "session failed" not in (said := box("journalctl", "--no-pager").stdout), said[-4000:]
        return False

    def states() -> set[str]:
        return {job["state"] for job in json.loads(box("/opt/cl/bin/cl", "jobs", "--all", "--json").stdout)}

    submit(box, "/srv/work", VICTIM)
    wait_until(lambda: exists("/srv/work/victim.pid"), "the victim to run")
    store = "import sqlite3; print(sqlite3.connect('/var/lib/cl/cl.db').execute('SELECT pid FROM runs').fetchone()[0])"
    cli = box("pgrep", "-f", "python3 /opt/fakes/hostile ").stdout.split()
    pids = [int(box(str(SYSTEM_PYTHON), "-c", store).stdout), *map(int, cli)]
    targets["tcp"] = [METRICS, ANOTHER_LOOPBACK_PORT, GATEWAY_ADDRESS]
    aim(targets, daemons, pids, tmp / "fake" / "targets.json")
    submit(box, "/srv/work", ATTACK)
    wait_until(lambda: exists("/srv/work/resumed.json"), "the attacker to wall on a1 and resume on a2")
    box("touch", "/srv/work/release")
    wait_until(lambda: states() == {"done"}, "both done")
    logs = {
        name: box("cat", f"/var/lib/cl/logs/{name}").stdout for name in box("ls", "/var/lib/cl/logs").stdout.split()
    }
    integrity = box(
        "/usr/bin/python3",
        "-c",
        "import sqlite3; print(sqlite3.connect('/var/lib/cl/cl.db').execute('PRAGMA integrity_check').fetchone()[0])",
    ).stdout.strip()
    return Attack(
        report=json.loads(box("cat", "/srv/work/attack.json").stdout),
        resumed=json.loads(box("cat", "/srv/work/resumed.json").stdout),
        targets=targets,
        daemons=daemons,
        victim=pids,
        pool={int(box("id", "-u", f"{POOL}-{n}").stdout) for n in range(1, 17)},
        accounts_before=before,
        planted=planted,
        logs=logs,
        integrity=integrity,
        said=box("journalctl", "-u", "cl-balancer", "-u", "cl-rescue", "--no-pager").stdout,
        ip_rules=box(
            "systemctl", "show", "-p", "IPAddressAllow", "-p", "IPAddressDeny", "cl-cli@x.service"
        ).stdout.strip(),
        ip_firewall=cli_network(box) == "filtered",
        ptrace_refused="EPERM",
    )


def test_the_cli_runs_as_a_user_of_the_pool_without_capabilities(attack: Attack) -> None:
    assert attack.report["me"]["uid"] in attack.pool
    assert set(attack.report["me"]["capabilities"].values()) == {0}
    assert attack.report["became_root"] is False


def test_under_systemd_no_loopback_port_but_the_gateways_address_nor_link_local_is_reachable(attack: Attack) -> None:
    """The CLI's unit's (cl-cli@) IPAddressDeny=/IPAddressAllow=, as systemd loaded them: the metrics port
    and another local service on 127.0.0.1 refused before a packet leaves (EPERM), the gateway's
    own address allowed (nothing listens there in direct mode: ECONNREFUSED). systemd enforces
    them with BPF on the unified cgroup hierarchy only; a box on hybrid cgroups checks the unit.
    Under `make run` the CLI's network is the host's (docs/reliability.md says so)."""
    if attack.ip_rules is None:
        pytest.skip("under make run the CLI's network is not narrowed")
    allowed, denied = (line.partition("=")[2].split() for line in attack.ip_rules.splitlines())
    assert allowed == ["127.0.0.2/32"]  # the gateway's address, nothing else on loopback
    assert set(denied) == {"127.0.0.0/8", "::1/128", "169.254.0.0/16", "fe80::/64", "224.0.0.0/4", "ff00::/8"}
    assert load_config({}).gateway_listen.startswith("127.0.0.2:")
    reached = {address: outcome["error"] for address, outcome in attack.report["tcp"].items()}
    if attack.ip_firewall:
        assert reached == {METRICS: "EPERM", ANOTHER_LOOPBACK_PORT: "EPERM", GATEWAY_ADDRESS: "ECONNREFUSED"}


def test_the_prompt_is_never_an_argument_nor_an_option(attack: Attack) -> None:
    assert attack.report["me"]["prompt"] == "--dangerously-skip-permissions, then attack"
    assert attack.report["me"]["prompt_in_argv"] is False


def test_the_control_sockets_do_not_exist_for_it(attack: Attack) -> None:
    refusals = {path: outcome["error"] for path, outcome in attack.report["connect"].items()}
    assert refusals == dict.fromkeys(attack.targets["connect"], "ENOENT")


def test_it_cannot_signal_trace_or_read_the_daemons_nor_another_jobs_worker_or_cli(attack: Attack) -> None:
    """None of them is in its PID namespace (ESRCH); that each job's CLI has a uid of its own is
    shown without the namespace in test_sandbox.py."""
    pids = [str(pid) for pid in [*attack.daemons, *attack.victim]]
    assert {pid: attack.report["signal"][pid]["error"] for pid in pids} == dict.fromkeys(pids, "ESRCH")
    assert {pid: attack.report["ptrace"][pid]["error"] for pid in pids} == dict.fromkeys(pids, attack.ptrace_refused)
    victim = [str(pid) for pid in attack.victim]
    assert attack.report["environ"] == {pid: {"ok": False, "error": "ENOENT"} for pid in victim}


def test_it_reads_and_writes_nothing_of_cls_nor_other_accounts_nor_another_job(attack: Attack) -> None:
    """cl's places are empty in its view, read-only and not listable; another job's config dir is not there."""
    credentials, account_1, account_2, store, logs, config_dir, credential_copy = attack.targets["read"]
    reads = {path: outcome["error"] for path, outcome in attack.report["read"].items()}
    assert reads == {
        credentials: "EACCES",  # not listable
        account_1: "ENOENT",
        account_2: "ENOENT",
        store: "ENOENT",
        logs: "ENOENT",
        config_dir: "ENOENT",
        credential_copy: "ENOENT",
    }
    store, account_2, other_job = attack.targets["write"]
    writes = {path: outcome["error"] for path, outcome in attack.report["write"].items()}
    assert writes == {store: "EROFS", account_2: "EROFS", other_job: "ENOENT"}


def test_what_it_plants_steers_no_privileged_write(attack: Attack) -> None:
    assert attack.report["planted"] == [".credentials.json", ".session.lock", ".account.1", ".credentials.json.1"]
    assert {path: path.read_bytes() for path in attack.accounts_before} == attack.accounts_before
    assert attack.integrity == "ok"
    # The resumed run holds a2's credential in a file of its own, not through the planted link.
    assert attack.resumed["config_dir_credential_is_link"] is False
    assert attack.resumed["holds_tail"] == attack.planted.tokens[2][-6:]


def test_the_token_it_prints_is_redacted_in_the_runs_log(attack: Attack) -> None:
    attack_log = attack.logs["job-2-run-2.log"]
    assert "the credential I hold is ***" in attack_log  # stdout
    assert "stderr too: ***" in attack_log
    for name, text in attack.logs.items():
        assert not attack.planted.leaks(text, name)


def test_the_daemons_said_nothing_was_amiss(attack: Attack) -> None:
    assert "Traceback" not in attack.said, attack.said
    assert "confine" not in attack.said


def test_under_make_run_in_gateway_mode_the_cli_reaches_no_token(var: Path, fake_api: FakeApi) -> None:
    """`make run` as root in gateway mode (the default), with the hostile gateway CLI: no planted
    token in its environment, any file it can read (the whole `make run` directory included), any
    /proc environ or command line, or any answer of the gateway; its printed wall moves nothing."""
    planted = Planted()
    fake = install_fake(HOSTILE_GATEWAY, var / "bin")
    work = var / "work"
    work.mkdir()
    look = ":".join(str(var / name) for name in ("claude", "state", "sessions", "run", ""))
    config = (
        'credentials_dir = "claude"\nstate_dir = "state"\nsessions_dir = "sessions"\nruntime_dir = "run"\n'
        f'claude_bin = "{fake}"\ncli_readable = ["{fake.parent}"]\ngateway_listen = "127.0.0.1:{free_port()}"\n'
        f'gateway_upstream = "{fake_api.url}"\noauth_token_url = "{fake_api.url}/v1/oauth/token"\n'
        f'[worker.env]\nHOSTILE_LOOK = "{look}"\n'
    )
    run = started(var, config)
    try:
        wait_until((var / "run" / "gateway.sock").exists, "cl-gateway to listen")
        operators_dir(work)
        for name in ("a1", "a2"):
            write_credential(var / "claude", name, oauth_credential(planted))
        job = run.submit("attack", work)
        wait_until(lambda: run.jobs().get(job, {}).get("state") == "failed", "the hostile turn to end", timeout=60)
        waiting = run.ask("rescue", {"request": "waiting"})
    finally:
        said = stop(run)
    loot = json.loads((work / "loot.json").read_text())
    assert loot["files"], "the hostile CLI read nothing: the test would prove nothing"
    assert not planted.leaks(json.dumps(loot), "what the hostile CLI reached")
    assert not planted.leaks(said, "what make run printed")
    answers = {(a["method"], a["path"], a["header"], a["with"]): a["status"] for a in loot["gateway"]}
    assert answers[("POST", "/v1/messages", "authorization", True)] == 200
    assert answers[("POST", "/v1/oauth/token", "authorization", True)] == 404
    assert waiting["sessions"] == []  # the wall it printed walled and moved nothing
    assert "the CLI reported a wall the API did not send" in said
