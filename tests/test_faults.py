"""Faults from outside: a locked state store, a full disk. Each gets a clear log line and is waited
out; no work is lost."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from cl.states import RunState
from cl.store import Store
from utils import (
    BIN,
    DaemonProcess,
    Layout,
    Planted,
    both,
    cl,
    job_states,
    oauth_credential,
    submit,
    wait_until,
    write_credential,
)


def test_a_locked_store_is_reported_and_waited_out(layout: Layout, planted: Planted) -> None:
    env = layout.env(CL_STORE_BUSY_TIMEOUT="0.2")
    balancer = DaemonProcess("balancer", layout, env=env).start()
    try:
        job = submit(layout, "queued before the lock")  # no account yet: it waits in the queue
        other = sqlite3.connect(layout.state / "cl.db", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another writer holds the lock, far past the busy timeout
        refused = cl(layout, "submit", "--cwd", str(layout.work), "--prompt", "during the lock")
        assert refused.returncode == 3
        assert "database is locked; try again" in refused.stderr
        assert cl(layout, "status").returncode == 0  # reads do not wait for a writer
        write_credential(layout.credentials, "a1", oauth_credential(planted))  # placement now hits the lock
        wait_until(lambda: "state store unavailable, retrying" in balancer.log(), "the lock to be reported")
        other.execute("ROLLBACK")
        other.close()
        wait_until(lambda: "state store available again" in balancer.log(), "the store to come back")
        wait_until(lambda: job_states(layout) == {job: "done"}, "the queued job to run once the lock is gone")
        # (and the refused submit left nothing behind)
        assert balancer.log().count("state store unavailable, retrying") == 1  # said once per outage
    finally:
        balancer.stop()


def in_private_tmpfs(state: Path, size: str, ballast_kib: int) -> list[str]:
    """A `wrap` for DaemonProcess: the daemon's state dir is a small tmpfs of its own (a private
    mount namespace, so nothing outside the test sees it), mostly filled by a ballast file."""
    script = (
        f"mount -t tmpfs -o size={size},mode=0700 cl-test-state {state}"
        f" && dd if=/dev/zero of={state}/ballast bs=1024 count={ballast_kib} status=none"
        ' && exec "$0"'
    )
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare for a tmpfs")
def test_a_full_disk_is_reported_and_survived_without_corruption(layout: Layout, planted: Planted) -> None:
    wrap = in_private_tmpfs(layout.state, "8m", 7200)
    balancer = DaemonProcess("balancer", layout, wrap=wrap).start()
    try:
        prompt = "x" * 40_000
        submitted = []
        while (result := cl(layout, "submit", "--cwd", str(layout.work), "--prompt", prompt)).returncode == 0:
            submitted.append(int(result.stdout))
            assert len(submitted) < 100, "the small tmpfs never filled up"
        assert result.returncode == 3
        assert "database or disk is full; try again" in result.stderr
        assert "request refused: state store unavailable" in balancer.log()
        assert cl(layout, "status").returncode == 0  # still answering, from what it has
        subprocess.run(  # the operator frees space
            ["nsenter", "--target", str(balancer.pid), "--mount", "rm", f"{layout.state}/ballast"], check=True
        )
        after = cl(layout, "submit", "--cwd", str(layout.work), "--prompt", "after the space came back", "--json")
        assert after.returncode == 0, after.stderr
        write_credential(layout.credentials, "a1", oauth_credential(planted))
        everything = [*submitted, json.loads(after.stdout)["job"]]
        wait_until(
            lambda: job_states(layout) == dict.fromkeys(everything, "done"),
            "every job accepted before and after the full disk to run",
            timeout=120,
        )
        database = layout.state / "cl.db"
        integrity = (
            f"import sqlite3; print(sqlite3.connect('{database}').execute('PRAGMA integrity_check').fetchone()[0])"
        )
        check = subprocess.run(
            ["nsenter", "--target", str(balancer.pid), "--mount", sys.executable, "-c", integrity],
            capture_output=True,
            text=True,
            check=True,
        )
        assert check.stdout.strip() == "ok"
    finally:
        balancer.stop()


def ptrace_works() -> bool:
    if shutil.which("strace") is None:
        return False
    probe = subprocess.run(["strace", "-qq", "-o", "/dev/null", "true"], capture_output=True, check=False)
    return probe.returncode == 0


@pytest.mark.skipif(not ptrace_works(), reason="needs strace and ptrace to slow a path down")
def test_a_slow_credentials_path_is_reported_and_the_rest_works(layout: Layout, planted: Planted) -> None:
    slow = layout.credentials / "credentials-slow.json"
    # Every open of that one file takes three seconds, as on a struggling network file system
    # (strace -D: the tracer is a grandchild, so the daemon keeps its pid and gets our signals).
    wrap = ["strace", "-D", "-f", "-qq", "-o", "/dev/null", "-P", str(slow), "-e", "trace=openat"]
    wrap += ["-e", "inject=openat:delay_enter=3000000"]
    write_credential(layout.credentials, "a1", oauth_credential(planted))
    balancer = DaemonProcess("balancer", layout, wrap=wrap).start()
    try:
        write_credential(layout.credentials, "slow", oauth_credential(planted))
        assert balancer.file_states()["a1"] == "ok"  # answered, the other account untouched
        wait_until(lambda: balancer.file_states().get("slow") == "ok", "the slow file to be read after all")
        wait_until(lambda: "credentials directory is slow" in balancer.log(), "the slowness to be reported")
        line = next(line for line in balancer.log().splitlines() if "credentials directory is slow" in line)
        assert "reading=slow" in line
        job = submit(layout, "works meanwhile")
        wait_until(lambda: job_states(layout) == {job: "done"}, "the job")
    finally:
        balancer.stop()


LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")


@pytest.mark.skipif(not LIBFAKETIME.exists(), reason="needs libfaketime (Debian: faketime) to move the clock")
def test_a_clock_jump_is_reported_and_walls_are_judged_by_the_new_time(layout: Layout, planted: Planted) -> None:
    """The daemons' wall clock (only theirs: libfaketime, monotonic time untouched) jumps two hours
    ahead while a session waits for a wall that resets in one: it is moved at once, not in an hour."""
    token = planted.token()
    write_credential(layout.credentials, "a1", oauth_credential(planted, token=token))
    layout.quota({token: 0})
    clock = layout.root / "faketime"
    clock.write_text("+0\n")
    env = layout.env(
        LD_PRELOAD=str(LIBFAKETIME),
        FAKETIME_TIMESTAMP_FILE=str(clock),
        FAKETIME_NO_CACHE="1",
        FAKETIME_DONT_FAKE_MONOTONIC="1",
    )
    with both(layout, env=env) as (_balancer, rescue):
        job = submit(layout, "walls, then the clock jumps")
        wait_until(lambda: "next_reset=" in rescue.log(), "the session to wait for a1's reset, an hour away")
        layout.quota({token: 100})
        clock.write_text("+2h\n")
        wait_until(lambda: "system clock jumped" in rescue.log(), "the jump to be noticed")
        wait_until(
            lambda: job_states(layout) == {job: "done"}, "the session to move now that the wall is two hours old"
        )
        assert "session moved" in rescue.log()


def test_a_worker_waits_out_a_locked_store_at_start_and_at_end(layout: Layout, planted: Planted) -> None:
    """The store is locked past its busy timeout when the worker claims its run, and again when it
    records the outcome: the work is recorded once, the CLI runs once, nothing failed or orphaned.
    The test plays `cl-worker.socket`, so that it holds the lock between the launch and the claim."""
    after = layout.root / "after"  # the CLI, having answered, waits here: the lock goes on first
    after.touch()
    env = layout.env(CL_STORE_BUSY_TIMEOUT="0.3", FAKE_CLAUDE_HOLD_AFTER=str(after))
    write_credential(layout.credentials, "a1", oauth_credential(planted))
    lock = sqlite3.connect(layout.state / "cl.db", isolation_level=None, timeout=30)
    said = layout.root / "worker.log"

    def waiting(times: int) -> bool:  # the worker found the store locked past its busy timeout
        return said.exists() and said.read_text().count("state store unavailable, waiting") == times

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as launches, said.open("wb") as log:
        launches.bind(str(layout.runtime / "worker.sock"))
        launches.listen()
        launches.settimeout(30)
        balancer = DaemonProcess("balancer", layout, env=env).start()
        worker = None
        try:
            submit(layout, "under a locked store")
            connection, _ = launches.accept()
            with connection, connection.makefile("rb") as request:
                run = json.loads(request.readline())["run"]
                lock.execute("BEGIN IMMEDIATE")  # before the worker may claim
                worker = subprocess.Popen([str(BIN / "cl-worker"), str(run)], env=env, stderr=log)
                connection.sendall(json.dumps({"pid": worker.pid}).encode() + b"\n")
            wait_until(lambda: waiting(1), "the worker to wait for the store at its claim")
            lock.execute("ROLLBACK")
            wait_until(layout.claude_calls, "the CLI to start, once the store is back")
            lock.execute("BEGIN IMMEDIATE")  # and again, as the CLI finishes
            after.unlink()
            wait_until(lambda: waiting(2), "the worker to wait for the store with the outcome")
            assert worker.poll() is None  # waiting, not gone: its daemon must not orphan the run
            lock.execute("ROLLBACK")
            assert worker.wait(30) == 0
            wait_until(lambda: job_states(layout) == {1: "done"}, "the job to be done")
        finally:
            after.unlink(missing_ok=True)
            lock.close()
            if worker is not None and worker.poll() is None:
                worker.kill()
                worker.wait()
            balancer.stop()
    store = Store(layout.database)
    assert [run.state for run in store.runs_in(tuple(RunState))] == [RunState.DONE]
    store.close()
    assert len(layout.claude_calls()) == 1


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit (util-linux)")
def test_exhausted_descriptors_never_change_the_roster(layout: Layout, planted: Planted) -> None:
    """At `ulimit -n 256`, 300 idle connections take every descriptor while a file is dropped in
    and the daemon rescans: nothing it could not read is taken for gone or bad (the registry's own
    test makes the listing itself fail, deterministically); the trouble is one log line per try,
    never a traceback; the daemon answers as soon as the connections go, and sees the new file."""
    for name in ("a1", "a2", "a3"):
        write_credential(layout.credentials, name, oauth_credential(planted))
    balancer = DaemonProcess("balancer", layout, wrap=["prlimit", "--nofile=256:256", "--"]).start()
    try:
        assert balancer.file_states() == dict.fromkeys(("a1", "a2", "a3"), "ok")
        idle = []
        try:
            for _ in range(300):
                connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                connection.connect(str(balancer.socket))
                idle.append(connection)
            wait_until(lambda: "cannot accept connections now" in balancer.log(), "every descriptor to be taken")
            write_credential(layout.credentials, "a4", oauth_credential(planted))
            assert balancer.process is not None
            balancer.process.send_signal(signal.SIGHUP)  # and a full rescan
            wait_until(lambda: "reloaded" in balancer.log(), "the rescan")
        finally:
            for connection in idle:
                connection.close()
        wait_until(lambda: balancer.file_states().get("a4") == "ok", "the new file, once descriptors are back")
        assert balancer.file_states() == dict.fromkeys(("a1", "a2", "a3", "a4"), "ok")
        log = balancer.log()
        assert "account removed" not in log
        assert "account invalid" not in log
        assert "Traceback" not in log
    finally:
        balancer.stop()
