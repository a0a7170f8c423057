"""Each live job's CLI runs as a user of its own, in a view of its own (`confinement = "sandbox"`):
it writes its cwd and its config dir, has a /tmp of its own, and cl's places and other operators'
trees do not exist for it. What it sees is checked from inside (what the fake CLI could open) and
from outside (what changed on the host). The view fails closed, and a job's directory is pinned
from the moment its worker opens it."""

from __future__ import annotations

import json
import os
import pwd
import socket
import subprocess
from pathlib import Path

import pytest

from utils import (
    POOL,
    DaemonProcess,
    FakeApi,
    Layout,
    Planted,
    both,
    cl,
    free_port,
    job_view,
    json_lines,
    live_runs,
    oauth_credential,
    proc_status,
    status,
    wait_until,
    write_credential,
)

pytestmark = [
    pytest.mark.skipif(os.getuid() != 0, reason="a user per job needs a worker that may switch users (root)"),
    pytest.mark.as_installed,
]


SESSION = "3f1d2c4b-5a69-4788-9abc-def012345678"


def submit(layout: Layout, prompt: str = "hi") -> int:
    done = cl(layout, "submit", "--cwd", str(layout.work), "--prompt", prompt, "--json")
    assert done.returncode == 0, done.stderr
    return int(json.loads(done.stdout)["job"])


def test_the_cli_sees_its_job_and_the_system_and_nothing_of_cl_nor_of_other_operators(
    layout: Layout, planted: Planted
) -> None:
    write_credential(layout.credentials, "a1", oauth_credential(planted))
    (layout.state / "notes.txt").write_text("the daemons' own")
    bob = layout.root / "bob"
    bob.mkdir(mode=0o777)
    (bob / "secret.env").write_text("bob's")
    (bob / "secret.env").chmod(0o666)  # the rights would let it: the view does not
    host_tmp = Path("/tmp") / f"cl-sandbox-{os.getpid()}.txt"
    targets = {
        "cwd": layout.work / "made-by-the-session.txt",
        "config dir": layout.sessions / "job-1" / "made-by-the-session.txt",
        "tmp": host_tmp,
        "state dir": layout.state / "notes.txt",
        "credential": layout.credentials / "credentials-a1.json",
        "another operator's tree": bob / "secret.env",
        "system": Path("/etc/cl-sandbox-test"),
    }
    env = layout.env(FAKE_CLAUDE_TOUCH=":".join(map(str, targets.values())))
    daemon = DaemonProcess("balancer", layout, env=env).start()
    try:
        submit(layout)
        (call,) = wait_until(lambda: json_lines(layout.fakes / "fake-claude.jsonl"), "the CLI to run")
        wait_until(lambda: job_view(layout, 1)["state"] == "done", "the job to finish")
    finally:
        daemon.stop()
    inside = {name: call["touched"][str(path)] for name, path in targets.items()}
    assert inside == {
        "cwd": True,
        "config dir": True,
        "tmp": True,  # its own /tmp
        "state dir": False,
        "credential": False,
        "another operator's tree": False,
        "system": False,
    }
    outside = {name: path.exists() for name, path in targets.items()}
    assert outside == {
        "cwd": True,
        "config dir": True,
        "tmp": False,  # not the host's
        "state dir": True,
        "credential": True,
        "another operator's tree": True,
        "system": False,
    }
    assert (bob / "secret.env").read_text() == "bob's"
    assert (layout.state / "notes.txt").read_text() == "the daemons' own"
    assert pwd.getpwuid(call["uid"]).pw_name.startswith(f"{POOL}-")


def test_jobs_that_run_at_once_run_as_different_users_and_a_user_goes_back_to_the_pool(
    layout: Layout, planted: Planted
) -> None:
    write_credential(layout.credentials, "a1", oauth_credential(planted))
    layout.hold.touch()
    daemon = DaemonProcess("balancer", layout).start()
    try:
        first, second = submit(layout, "one"), submit(layout, "two")
        wait_until(lambda: len(json_lines(layout.fakes / "fake-claude.jsonl")) == 2, "both CLIs to run")
        workers = [proc_status(run.pid) for run in live_runs(layout) if run.pid]
        one, two = (call["uid"] for call in json_lines(layout.fakes / "fake-claude.jsonl"))
        # Without the view's namespaces, the kernel alone: one job's user may not signal the other's CLI.
        pattern = "^python3 .*fakes/claude"
        found = subprocess.run(["pgrep", "-u", str(two), "-f", pattern], capture_output=True, text=True, check=False)
        (other_cli,) = found.stdout.split()
        as_one = ["setpriv", f"--reuid={one}", f"--regid={one}", "--clear-groups", "kill", "-STOP", other_cli]
        refused = subprocess.run(as_one, capture_output=True, text=True, check=False)
        layout.hold.unlink()
        wait_until(
            lambda: {job_view(layout, first)["state"], job_view(layout, second)["state"]} == {"done"}, "both done"
        )
        third = submit(layout, "three")
        wait_until(lambda: job_view(layout, third)["state"] == "done", "the third job")
    finally:
        layout.hold.unlink(missing_ok=True)
        daemon.stop()
    assert refused.returncode != 0
    assert "Operation not permitted" in refused.stderr
    calls = json_lines(layout.fakes / "fake-claude.jsonl")
    uids = {call["prompt"]: call["uid"] for call in calls}
    assert uids["one"] != uids["two"], calls
    # Each worker (root here) kept only the right to become its own job's user: it is its saved
    # uid, and the worker holds no supplementary group and no capability but CAP_KILL (it starts
    # its CLI itself: the CLI's parent-death signal goes with the worker's rights).
    assert sorted(int(worker["Uid"].split()[2]) for worker in workers) == sorted([uids["one"], uids["two"]])
    kill_only = f"{1 << 5:016x}"
    for worker in workers:
        caps = (worker["CapPrm"], worker["CapEff"], worker["CapAmb"], worker["Groups"])
        assert caps == (kill_only, kill_only, "0" * 16, "")
    assert uids["three"] in (uids["one"], uids["two"])  # the first free member: one the two before gave back
    for number, prompt in ((first, "one"), (second, "two"), (third, "three")):  # each job's files are its user's
        assert (layout.sessions / f"job-{number}").stat().st_uid == uids[prompt]


def failed_job(layout: Layout, planted: Planted, **env: str) -> tuple[str, DaemonProcess]:
    """A job submitted to a balancer with these settings, failed: its error, and the balancer."""
    write_credential(layout.credentials, "a1", oauth_credential(planted))
    daemon = DaemonProcess("balancer", layout, env=layout.env(**env)).start()
    try:
        number = submit(layout)
        wait_until(lambda: job_view(layout, number)["state"] == "failed", "the job to fail")
        return str(job_view(layout, number)["error"]), daemon
    finally:
        daemon.stop()


def test_a_job_whose_user_cannot_be_had_waits_with_the_reason(layout: Layout, planted: Planted) -> None:
    write_credential(layout.credentials, "a1", oauth_credential(planted))
    with both(layout, env=layout.env(CL_CLI_POOL_SIZE="17")) as (balancer, _rescue):  # sysusers makes 16
        number = submit(layout)
        wait_until(lambda: status(layout)["blocked"], "the balancer to say what stops work")
        assert (
            status(layout)["blocked"] == "users: missing: cl-cli-17 (fix: systemd-sysusers /usr/lib/sysusers.d/cl.conf)"
        )
        assert job_view(layout, number)["state"] == "queued"
    assert json_lines(layout.fakes / "fake-claude.jsonl") == []  # no CLI ran, confined less or at all
    assert "work waits: a CLI cannot start" in balancer.log()


def test_unconfined_is_written_in_the_config_and_said_at_every_start(layout: Layout, planted: Planted) -> None:
    write_credential(layout.credentials, "a1", oauth_credential(planted))
    daemon = DaemonProcess("balancer", layout, env=layout.env(CL_CONFINEMENT="none")).start()
    try:
        numbers = [submit(layout, "one"), submit(layout, "two")]
        wait_until(lambda: all(job_view(layout, n)["state"] == "done" for n in numbers), "both jobs")
    finally:
        daemon.stop()
    said = [line for line in daemon.log().splitlines() if "confinement = none" in line]
    assert len(said) == 3  # the daemon at start, and each worker
    assert {call["uid"] for call in json_lines(layout.fakes / "fake-claude.jsonl")} == {os.getuid()}


def test_a_cwd_swapped_for_a_symlink_before_its_cli_starts_is_refused(layout: Layout, planted: Planted) -> None:
    bob = layout.root / "bob"  # another operator's, which the CLI's users could write
    bob.mkdir()
    os.chown(bob, -1, layout.work.stat().st_gid)
    bob.chmod(0o2770)
    daemon = DaemonProcess("balancer", layout).start()
    try:
        number = submit(layout)  # no account yet: it waits in the queue
        layout.work.rename(layout.root / "work-was")
        layout.work.symlink_to(bob)
        write_credential(layout.credentials, "a1", oauth_credential(planted))
        wait_until(lambda: job_view(layout, number)["state"] == "failed", "the job to fail")
        error = job_view(layout, number)["error"]
    finally:
        daemon.stop()
    assert f"it now resolves to {bob}" in str(error)
    assert json_lines(layout.fakes / "fake-claude.jsonl") == []
    assert list(bob.iterdir()) == []


def test_a_cwd_swapped_for_a_symlink_while_its_cli_runs_changes_nothing_for_it(
    layout: Layout, planted: Planted
) -> None:
    """The CLI's tools resolve the cwd's path again at every call: in its view the path is the
    directory its worker opened, for the CLI's whole life."""
    write_credential(layout.credentials, "a1", oauth_credential(planted))
    bob = layout.root / "bob"
    bob.mkdir(mode=0o2777)
    layout.hold.touch()
    daemon = DaemonProcess("balancer", layout, env=layout.env(FAKE_CLAUDE_MARK="written.txt")).start()
    try:
        number = submit(layout)
        wait_until(lambda: json_lines(layout.fakes / "fake-claude.jsonl"), "the CLI to run")
        layout.work.rename(layout.root / "work-was")
        layout.work.symlink_to(bob)
        layout.hold.unlink()
        wait_until(lambda: job_view(layout, number)["state"] == "done", "the job to finish")
    finally:
        layout.hold.unlink(missing_ok=True)
        daemon.stop()
    assert (layout.root / "work-was" / "written.txt").exists()
    assert list(bob.iterdir()) == []


def test_a_cli_that_forks_without_end_is_held_to_its_process_limit(layout: Layout, planted: Planted) -> None:
    """Each job has a user of its own, so the limit on that user's processes is the job's."""
    script = layout.root / "bin" / "forks"  # in the view (cli_readable), where no job may change it
    script.parent.mkdir()
    script.write_text(
        "#!/usr/bin/python3\nimport json, os, sys, time\n"
        "if sys.argv[1:] == ['--version']:\n    sys.exit(print('2.1.332 (forks)'))\n"  # as any CLI answers
        "sys.stdin.readline()\nforked = 0\n"
        "for _ in range(200):\n    try:\n        pid = os.fork()\n    except OSError:\n        break\n"
        "    if pid == 0:\n        time.sleep(60)\n        os._exit(0)\n    forked += 1\n"
        "open('forked.txt', 'w').write(str(forked))\n"
        f"print(json.dumps({{'type': 'system', 'subtype': 'init', 'session_id': '{SESSION}'}}))\n"
        'print(json.dumps({"type": "result", "subtype": "success", "is_error": False, "result": "forked"}))\n'
    )
    script.chmod(0o755)
    write_credential(layout.credentials, "a1", oauth_credential(planted))
    env = layout.env(CL_CLAUDE_BIN=str(script), CL_CLI_PROCESSES_MAX="20", CL_CLI_READABLE=str(script.parent))
    daemon = DaemonProcess("balancer", layout, env=env).start()
    try:
        number = submit(layout)
        wait_until(lambda: job_view(layout, number)["state"] == "done", "the job to finish")
    finally:
        daemon.stop()
    assert 0 < int((layout.work / "forked.txt").read_text()) < 20


def test_with_a_network_of_its_own_the_cli_reaches_the_gateway_and_no_other_loopback_port(
    layout: Layout, planted: Planted, fake_api: FakeApi
) -> None:
    """`cli_network = "gateway"`: the CLI's requests reach the API through the relay and the
    gateway's socket; a service on the host's loopback (as the metrics port would be) is not there."""
    write_credential(layout.credentials, "a1", oauth_credential(planted))
    with socket.create_server(("127.0.0.1", 0)) as elsewhere:
        other = f"127.0.0.1:{elsewhere.getsockname()[1]}"
        env = layout.env(
            CL_GATEWAY="true",
            CL_GATEWAY_LISTEN=f"127.0.0.2:{free_port()}",
            CL_GATEWAY_UPSTREAM=fake_api.url,
            CL_CLI_NETWORK="gateway",
            FAKE_CLAUDE_CONNECT=other,
        )
        daemons = [DaemonProcess(name, layout, env=env) for name in ("gateway", "balancer")]
        try:
            for daemon in daemons:
                daemon.start()
            number = submit(layout)
            wait_until(lambda: job_view(layout, number)["state"] == "done", "the job to be answered through the relay")
        finally:
            for daemon in reversed(daemons):
                daemon.stop()
    (call,) = layout.claude_calls()
    assert call["touched"] == {other: "ECONNREFUSED"}  # nothing listens on its own loopback
    assert [request["cred_tail"] for request in fake_api.requests()] == [planted.tokens[0][-6:]]


def test_a_network_said_to_be_filtered_that_is_not_runs_no_cli(layout: Layout, planted: Planted) -> None:
    """`cli_network = "filtered"` (the default) where nothing narrows the network (no cl-cli@
    unit, as here; or cgroups where systemd cannot apply IPAddressDeny=): the run fails with the
    reason, and no CLI starts. Fails closed, whatever the sandbox."""
    error, _daemon = failed_job(layout, planted, CL_CLI_NETWORK="filtered")
    assert "cli_network = 'filtered', but loopback is reachable from here" in error
    assert layout.claude_calls() == []


def test_with_every_cli_user_taken_a_new_job_waits_and_says_why(layout: Layout, planted: Planted) -> None:
    write_credential(layout.credentials, "a1", oauth_credential(planted))
    layout.hold.touch()
    daemon = DaemonProcess("balancer", layout, env=layout.env(CL_CLI_POOL_SIZE="1")).start()
    try:
        first = submit(layout, "one")
        wait_until(lambda: json_lines(layout.fakes / "fake-claude.jsonl"), "the first CLI to run")
        second = submit(layout, "two")
        wait_until(lambda: "reason=every-cli-user-taken" in daemon.log(), "the second job to wait for a user")
        assert job_view(layout, second)["state"] == "queued"
        layout.hold.unlink()
        wait_until(
            lambda: {job_view(layout, first)["state"], job_view(layout, second)["state"]} == {"done"}, "both done"
        )
    finally:
        layout.hold.unlink(missing_ok=True)
        daemon.stop()
    assert "jobs waiting queued=1 reason=every-cli-user-taken cli_pool_size=1" in daemon.log()
