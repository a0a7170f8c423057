"""A job's CLI started by `cl-cli@`, a unit of its own (`cl.cli_start`), not by its worker: the
worker's unit may then build no namespace and reach no network. Here the test plays
`cl-cli.socket` (Accept=yes): each connection starts `cl-cli-starter` with it as standard input,
as systemd does; `tests/test_systemd.py` runs the real units. The starter checks each request
against its own configuration and refuses the rest; a CLI outlives neither its starter nor its
worker."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pwd
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cl import cli_start
from cl.cli_user import CliUser
from cl.config import Config
from utils import (
    FAKE_CLAUDE,
    POOL,
    DaemonProcess,
    Layout,
    Planted,
    cli_socket,
    job_view,
    json_lines,
    live_runs,
    oauth_credential,
    submit,
    wait_until,
    worker_socket,
    write_credential,
)

pytestmark = [
    pytest.mark.skipif(os.getuid() != 0, reason="a user per job needs a starter that may switch users (root)"),
    pytest.mark.as_installed,
]

MEMBER = f"{POOL}-1"


@contextlib.contextmanager
def balancer(
    layout: Layout, *, starter: bool = True, **env: str
) -> Iterator[tuple[list[subprocess.Popen[bytes]], Path]]:
    """A balancer whose workers' CLIs are started by `cl-cli-starter` (`cli_socket`; with `starter`
    false, by the workers themselves), with these settings: the starters and their log."""
    layout.runtime.mkdir(parents=True, exist_ok=True)
    socket_path, log = layout.runtime / "starter.sock", layout.root / "starter.log"
    settings = layout.env(**({"CL_CLI_STARTER": str(socket_path)} if starter else {}), **env)
    with cli_socket(str(socket_path), settings, log) as started:
        daemon = DaemonProcess("balancer", layout, env=settings).start()
        try:
            yield started, log
        finally:
            daemon.stop()


def test_a_job_runs_in_what_the_starter_starts_and_the_worker_starts_nothing(layout: Layout, planted: Planted) -> None:
    write_credential(layout.credentials, "a1", oauth_credential(planted))
    with balancer(layout) as (started, log):
        job = submit(layout, "hi")
        wait_until(lambda: job_view(layout, job)["state"] == "done", "the job to finish")
    (call,) = json_lines(layout.fakes / "fake-claude.jsonl")
    assert pwd.getpwuid(call["uid"]).pw_name.startswith(f"{POOL}-")  # as a user of the pool, in its view
    assert [starter.returncode for starter in started] == [0]
    said = log.read_text()
    assert "cli started" in said
    assert "cli exited" in said


def test_the_starter_checks_the_network_where_the_cli_would_run(layout: Layout, planted: Planted) -> None:
    """`cli_network = "filtered"` where nothing narrows the starter's network (no cl-cli@ unit, as
    here): the starter refuses, the job fails with its reason, no CLI runs."""
    write_credential(layout.credentials, "a1", oauth_credential(planted))
    with balancer(layout, CL_CLI_NETWORK="filtered") as (started, _log):
        job = submit(layout, "hi")
        wait_until(lambda: job_view(layout, job)["state"] == "failed", "the job to fail")
        error = str(job_view(layout, job)["error"])
    assert "cli_network = 'filtered', but loopback is reachable from here" in error
    assert [starter.returncode for starter in started] == [1]
    assert json_lines(layout.fakes / "fake-claude.jsonl") == []


def test_a_worker_that_ends_before_its_cli_starts_leaves_its_starter_quiet(layout: Layout, planted: Planted) -> None:
    """The worker connects to its starter as it begins (the starter readies itself meanwhile); a
    run refused before its CLI starts (its cwd swapped for a link) just closes the connection."""
    with balancer(layout) as (started, log):
        job = submit(layout, "hi")  # no account yet: it waits in the queue
        layout.work.rename(layout.root / "work-was")
        layout.work.symlink_to(layout.root / "work-was")
        write_credential(layout.credentials, "a1", oauth_credential(planted))
        wait_until(lambda: job_view(layout, job)["state"] == "failed", "the job to fail")
        error = str(job_view(layout, job)["error"])
    assert "it now resolves to" in error
    assert [starter.returncode for starter in started] == [0]
    assert log.read_text() == ""


def test_under_systemd_the_launcher_hands_its_worker_a_connection_to_the_starter(
    layout: Layout, planted: Planted
) -> None:
    """As under systemd: each worker a `cl-worker --from-socket` of its own (`cl-worker.socket`
    played too). Its launcher connects to the starter first and hands the worker that connection
    with the run, so the starter's interpreter readies itself alongside the worker's: the
    starter's peer is the balancer, and it starts the job's CLI."""
    write_credential(layout.credentials, "a1", oauth_credential(planted))
    layout.runtime.mkdir(parents=True, exist_ok=True)
    settings = layout.env(CL_CLI_STARTER=str(layout.runtime / "starter.sock"))
    peers: list[int] = []
    with (
        cli_socket(settings["CL_CLI_STARTER"], settings, layout.root / "starter.log", peers) as started,
        worker_socket(str(layout.runtime / "worker.sock"), settings, layout.root / "workers.log") as workers,
    ):
        daemon = DaemonProcess("balancer", layout, env=settings).start()
        try:
            job = submit(layout, "hi")
            wait_until(lambda: job_view(layout, job)["state"] == "done", "the job to finish")
        finally:
            daemon.stop()
    assert daemon.process is not None
    assert peers == [daemon.process.pid]
    assert [starter.returncode for starter in started] == [0]
    assert [worker.returncode for worker in workers] == [0]
    (call,) = json_lines(layout.fakes / "fake-claude.jsonl")
    assert pwd.getpwuid(call["uid"]).pw_name.startswith(f"{POOL}-")


@pytest.fixture
def launch(layout: Layout) -> Iterator[cli_start.Launch]:
    """A request as a worker would make it for job 1 (its config dir given to `MEMBER`)."""
    member = CliUser.named(MEMBER)
    config_dir = layout.sessions / "job-1"
    config_dir.mkdir(parents=True)
    os.chown(config_dir, member.uid, member.gid)
    cwd, opened = os.open(layout.work, os.O_PATH), os.open(config_dir, os.O_PATH)
    yield cli_start.Launch(
        [str(FAKE_CLAUDE)], {"PATH": "/usr/bin"}, member, (cwd, str(layout.work)), (opened, str(config_dir))
    )
    os.close(cwd)
    os.close(opened)


@pytest.mark.parametrize(
    ("asked", "refusal"),
    [
        ("root", "'root' is not a user of the CLI's pool"),
        ("elsewhere", "not a config dir of"),
        ("another directory", "not the directory the request carries"),
        ("not adopted", f"not {MEMBER}'s own"),
    ],
)
def test_the_starter_refuses_what_its_configuration_does_not_allow(
    layout: Layout, launch: cli_start.Launch, asked: str, refusal: str
) -> None:
    config_dir = Path(launch.config_dir[1])
    if asked == "root":
        launch = cli_start.Launch(launch.command, launch.env, CliUser.named("root"), launch.cwd, launch.config_dir)
    elif asked == "elsewhere":
        launch = cli_start.Launch(launch.command, launch.env, launch.cli, launch.cwd, (launch.config_dir[0], "/tmp"))
    elif asked == "another directory":
        other = config_dir.with_name("job-2")
        other.mkdir()
        os.chown(other, launch.cli.uid, launch.cli.gid)
        launch = cli_start.Launch(
            launch.command, launch.env, launch.cli, launch.cwd, (launch.config_dir[0], str(other))
        )
    else:
        os.chown(config_dir, 0, 0)
    address = str(layout.root / "starter.sock")
    refused = pytest.raises(cli_start.StartRefused, match=refusal)
    with cli_socket(address, layout.env(), layout.root / "starter.log") as started, refused:
        cli_start.by_starter(Path(address), launch)
    assert [starter.returncode for starter in started] == [1]
    assert json_lines(layout.fakes / "fake-claude.jsonl") == []  # nothing ran


def test_the_starter_takes_requests_from_the_workers_user_only(layout: Layout, launch: cli_start.Launch) -> None:
    name = f"cl-test-starter-{os.getpid()}"  # abstract: no file mode stops a connection, the starter must
    request = json.dumps({"user": MEMBER, "cwd": launch.cwd[1], "config_dir": launch.config_dir[1]})
    connect = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n"
        "s.connect('\\0' + sys.argv[1])\n"
        "try:\n"
        "    socket.send_fds(s, [sys.argv[2].encode()], [0, 1, 2, 0, 0])\n"
        "    print(repr(s.recv(4096)))\n"
        "except OSError as e:\n"
        "    print(repr(b''), e)\n"
    )
    with cli_socket(f"\0{name}", layout.env(), layout.root / "starter.log") as started:
        heard = subprocess.run(
            ["/usr/bin/python3", "-c", connect, name, request],  # one a pool user may run
            user=f"{POOL}-2",
            group=POOL,
            extra_groups=[],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
    assert heard.stdout.startswith("b''"), heard  # no answer: the connection closed
    assert [starter.returncode for starter in started] == [2]
    assert "cli start refused: not a worker" in (layout.root / "starter.log").read_text()


def test_the_starter_probes_the_view_while_the_request_is_on_its_way(layout: Layout, launch: cli_start.Launch) -> None:
    """Connected to, before any request: the starter has built both empty views already (a /proc
    of its own, the host's), as the pool's first user, so the job's start waits for neither; the
    CLI then starts as asked."""
    probes = layout.fakes / "probes.log"
    probes.touch(mode=0o666)
    probes.chmod(0o666)
    wrapper = layout.fakes / "bin" / "bwrap"  # what the starter finds first on its PATH
    wrapper.parent.mkdir(mode=0o755)
    said = f'set -f\nline=$(echo "$(id -un)" $* | tr "\\n" " ")\necho "$line" >> {probes}\nexec /usr/bin/bwrap "$@"\n'
    wrapper.write_text(f"#!/bin/sh\n{said}")  # a line each, written at once
    wrapper.chmod(0o755)
    address = str(layout.root / "starter.sock")
    env = layout.env(PATH=f"{wrapper.parent}:/usr/bin:/bin")
    with cli_socket(address, env, layout.root / "starter.log") as started:
        conn = cli_start.connect(Config(cli_starter=Path(address), confinement="sandbox"))
        assert conn is not None
        wait_until(lambda: len(probes.read_text().splitlines()) == 2, "the starter to probe both views")
        cli = cli_start.by_starter(Path(address), dataclasses.replace(launch, command=["/usr/bin/true"]), conn)
        assert cli.wait(60) == 0
        for stream in (cli.stdin, cli.stdout, cli.stderr):
            assert stream is not None
            stream.close()
    *tries, start = probes.read_text().splitlines()  # and the CLI's own view: no probe at the request
    assert len(tries) == 2
    assert all(line.startswith(f"{POOL}-1 ") and " --ro-bind / / " in line for line in tries)
    assert start.startswith(f"{MEMBER} ")
    assert " --ro-bind / / " not in start
    assert [starter.returncode for starter in started] == [0]


WORKER_OF_ANOTHER_JOB = """
import array, json, os, socket, struct, sys
from cl.cli_user import CliUser, keep_only
address, own, asked, request, cwd, config_dir = sys.argv[1:]
own, asked = CliUser.named(own), CliUser.named(asked)
keep_only(own)  # as a worker whose job has `own`: its saved uid, no capability
fds = array.array("i", [0, 1, 2, os.open(cwd, os.O_PATH), os.open(config_dir, os.O_PATH)]).tobytes()
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect(address)
for claimed in (asked, own):
    proof = struct.pack("3i", os.getpid(), claimed.uid, claimed.gid)
    try:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds), (socket.SOL_SOCKET, socket.SCM_CREDENTIALS, proof)]
        s.sendmsg([request.encode()], ancillary)
    except OSError as exc:
        print(f"{claimed.name}: {exc.strerror}")
        continue
    print(f"{claimed.name}: {s.recv(4096).decode()}")
"""


def test_a_worker_starts_a_cli_as_its_own_jobs_user_only(layout: Layout, launch: cli_start.Launch) -> None:
    """A worker (its job's user its saved uid) asking for another job's user: the kernel will not
    let it claim that uid, and what it may claim is not the user asked for."""
    address = str(layout.root / "starter.sock")
    request = {"user": MEMBER, "cwd": launch.cwd[1], "config_dir": launch.config_dir[1], "command": ["true"], "env": {}}
    args = [address, f"{POOL}-2", MEMBER, json.dumps(request), launch.cwd[1], launch.config_dir[1]]
    with cli_socket(address, layout.env(), layout.root / "starter.log") as started:
        heard = subprocess.run(
            [sys.executable, "-c", WORKER_OF_ANOTHER_JOB, *args], capture_output=True, text=True, check=True, timeout=60
        )
    uid = pwd.getpwnam(f"{POOL}-2").pw_uid
    assert heard.stdout.splitlines() == [
        f"{MEMBER}: Operation not permitted",
        f'{POOL}-2: {{"error": "a CLI starts as its worker\'s own user only: {MEMBER} asked for by uid {uid}"}}',
    ]
    assert [starter.returncode for starter in started] == [1]
    assert json_lines(layout.fakes / "fake-claude.jsonl") == []


@pytest.mark.parametrize("started_by", ["cl-cli-starter", "its worker"])
def test_a_cli_whose_worker_is_gone_is_ended_with_all_it_started(
    layout: Layout, planted: Planted, started_by: str
) -> None:
    """Whoever started it: the starter sees its worker's connection close and ends the CLI's
    group; a CLI its worker started itself has the worker's death for its parent-death signal."""
    write_credential(layout.credentials, "a1", oauth_credential(planted))
    hold, left = layout.fakes / "hold", layout.fakes / "left-behind.pid"
    hold.touch()  # the CLI waits, reading nothing: its input's end would not end it
    by_starter = started_by == "cl-cli-starter"
    held = {"FAKE_CLAUDE_HOLD": str(hold), "FAKE_CLAUDE_LEAVE_BEHIND": str(left)}
    with balancer(layout, starter=by_starter, **held) as (started, _log):
        job = submit(layout, "hi")
        wait_until(left.exists, "the CLI to start a process of its own")
        # Its first event read: the CLI has its prompt and waits, with nothing more to write.
        wait_until(lambda: job_view(layout, job)["session_id"], "the CLI's first event")
        (run,) = wait_until(lambda: live_runs(layout), "the run to be live")
        mark = f"FAKE_CLAUDE_HOLD={hold}"  # what the CLI passes on to all it starts
        assert running_with(mark)  # the CLI, its view and the process it left behind
        os.kill(run.pid, signal.SIGKILL)  # the worker vanishes
        wait_until(lambda: not running_with(mark), "the CLI and what it started to end")
    assert [starter.returncode for starter in started] == ([0] if by_starter else [])


ORPHANED = """
import os, signal, subprocess, sys
from cl import cli_start
from cl.cli_user import CliUser, keep_only
from cl.config import load_config
user = CliUser.named(sys.argv[1])
keep_only(user, signals=sys.argv[2] == "keeps CAP_KILL")  # as a worker, once its job's user is chosen
preexec = cli_start._preexec(user, os.open("/", os.O_PATH), load_config({}))  # as it starts its CLI
quiet = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
cli = subprocess.Popen(["sleep", "300"], **quiet, preexec_fn=preexec, start_new_session=True)
print(cli.pid, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("worker", ["keeps CAP_KILL", "keeps nothing"])
def test_a_worker_that_dies_takes_its_cli_along_only_if_it_may_signal_it(worker: str) -> None:
    """The kernel sends a CLI its parent-death signal with the dying worker's rights: a worker
    whose real and effective uid are not the CLI's user (root without capabilities, or cl) may
    not signal it without CAP_KILL, and its CLI would outlive it."""
    orphaning = [sys.executable, "-c", ORPHANED, MEMBER, worker]
    done = subprocess.run(orphaning, capture_output=True, text=True, timeout=60, check=False)
    cli = int(done.stdout)
    try:
        if worker == "keeps CAP_KILL":
            wait_until(lambda: state(cli) in ("Z", None), "the CLI to die with its worker")
        else:
            wait_until(lambda: state(cli) in ("S", "Z", None), "the CLI to sleep or die")  # "R" while it starts
            assert state(cli) == "S"  # outlived it
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(cli, signal.SIGKILL)


def state(pid: int) -> str | None:
    """The process's state letter (`Z`: dead, not reaped), None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


def running_with(variable: str) -> list[int]:
    """The live (not zombie) processes whose environment has `variable` (NAME=value) and no `CL_`
    variable: the CLI's (the daemons and the worker have cl's configuration, the CLI never)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            env = (entry / "environ").read_bytes().split(b"\0") if entry.name.isdigit() else []
            if variable.encode() in env and not any(name.startswith(b"CL_") for name in env):
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                found += [int(entry.name)] if state != "Z" else []
        except OSError:
            continue
    return found
