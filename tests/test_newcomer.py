"""A newcomer's first hour, as docs/operating.md ("Trying it with make run") walks it: a fresh
clone, `make run` with the fake CLI, three credential files dropped in, a job, a wall, a pause;
at each step what `cl status`, `cl accounts`, `cl doctor` and the dashboard's data say.

The clone runs on this checkout's virtualenv (`VENV=`, never remade: no network in the tests),
so its code is the code under test; what the clone brings is the README's path: the Makefile, the
fake CLI, the relative `claude_bin`."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_dashboard import fetch, metrics_serving

from utils import BIN, POOL, REPO, Planted, interruptible, oauth_credential, wait_until, write_credential

VENV = REPO / ".venv"


@pytest.fixture
def clone() -> Iterator[Path]:
    """A fresh clone of this checkout, where the CLI's users may reach it when they exist (as root:
    a folder under /var/tmp every user may search; pytest's own is root's alone)."""
    if not (REPO / ".git").exists():
        pytest.skip("needs a git checkout to clone")
    place = Path(tempfile.mkdtemp(prefix="cl-newcomer-", dir="/var/tmp"))
    place.chmod(0o755)
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(place / "cl")], check=True)
    yield place / "cl"
    shutil.rmtree(place)


@contextlib.contextmanager
def make_run(clone: Path, **env: str) -> Iterator[subprocess.Popen[str]]:
    """`make run` in the clone, a foreground job; Ctrl-C at the end."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CL_", "NOTIFY_SOCKET", "WATCHDOG_", "JOURNAL_"))}
    make = subprocess.Popen(
        ["make", "--no-print-directory", "-o", str(VENV / ".installed"), "run", f"VENV={VENV}"],
        cwd=clone,
        env={**base, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=interruptible,  # noqa: PLW1509 - no threads in that child
    )
    failed = False
    try:
        yield make
    except BaseException:
        failed = True
        raise
    finally:
        os.killpg(make.pid, signal.SIGINT)
        try:
            out, _ = make.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(make.pid, signal.SIGKILL)
            out, _ = make.communicate(timeout=60)
            raise AssertionError(f"make run did not stop at Ctrl-C:\n{out}") from None
        assert "Traceback" not in out, out
        if failed:
            print(f"make run said:\n{out}")  # shown with the failure


def test_a_newcomers_first_hour_from_a_fresh_clone(clone: Path, planted: Planted) -> None:
    var = clone / "var"
    config = var / "config.toml"
    with make_run(clone):  # the first start writes var/config.toml
        sockets = [var / "run" / f"{name}.sock" for name in ("balancer", "rescue", "gateway")]
        wait_until(lambda: all(path.exists() for path in sockets), "make run to start", timeout=120)
    quota, work = configure_for_the_fake(var)
    env = {**os.environ, "CL_CONFIG": str(config)}
    env = {k: v for k, v in env.items() if not k.startswith(("CL_", "FAKE_")) or k == "CL_CONFIG"}

    def cl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "cl"), *args], env=env, capture_output=True, text=True, timeout=60, check=False
        )

    def states(command: str) -> dict[str, str]:
        shown = json.loads(cl(command, "--json").stdout)
        return {a["name"]: a["state"] for a in shown["accounts"]}

    with make_run(clone, FAKE_CLAUDE_QUOTA=str(quota)), metrics_serving(env) as url:
        board = dashboard(url)
        wait_until(lambda: cl("status").returncode == 0 and cl("accounts").returncode == 0, "the daemons to answer")
        tokens = {name: planted.token("sk-ant-oat01-") for name in ("a1", "a2", "a3")}
        for name, token in tokens.items():
            write_credential(var / "claude", name, oauth_credential(planted, token=token))
        wait_until(lambda: states("accounts") == dict.fromkeys(tokens, "ok"), "three accounts in cl accounts")
        assert states("status") == dict.fromkeys(tokens, "ok")
        doctor = cl("doctor")
        assert doctor.returncode == 0, doctor.stdout
        assert "3 account(s), 3 usable" in doctor.stdout
        assert board()["counts"] == {"ok": 3}

        first = submit(cl, work, "hello")
        wait_until(lambda: job_state(cl, first) == "done", "the first job to be done")

        quota.write_text(json.dumps({tokens["a1"]: 0}))  # a1 has no turn left
        for name in ("a2", "a3"):
            assert cl("accounts", "pause", name).returncode == 0
        second = submit(cl, work, "walls on a1")
        wait_until(lambda: job_state(cl, second) == "walled", "the job to wall on a1")
        assert states("status") == {"a1": "walled", "a2": "paused", "a3": "paused"}
        assert states("accounts") == {"a1": "walled", "a2": "paused", "a3": "paused"}
        shown = cl("status").stdout
        assert "1 session(s) waiting for an account" in shown, shown
        assert any(line.split()[:2] == ["a1", "walled"] for line in shown.splitlines()), shown
        assert cl("doctor").returncode == 0  # nothing stops work: the accounts do, and cl status says so
        wait_until(lambda: board()["counts"] == {"walled": 1, "paused": 2}, "the dashboard to show it")

        assert cl("accounts", "resume", "a3").returncode == 0
        wait_until(lambda: job_state(cl, second) == "done", "the walled session to move to a3 and finish")
        assert states("status") == {"a1": "walled", "a2": "paused", "a3": "ok"}
        wait_until(
            lambda: any(e["kind"] == "move" and (e["from"], e["account"]) == ("a1", "a3") for e in board()["events"]),
            "the dashboard's timeline to show the move",
            timeout=60,
        )
        seen = cl("status").stdout + cl("accounts").stdout + cl("doctor").stdout + json.dumps(board())
    assert not planted.leaks(seen, "what the newcomer saw")


def configure_for_the_fake(var: Path) -> tuple[Path, Path]:
    """What docs/operating.md adds to var/config.toml for the fake CLI (as root, also what the
    CLI's view needs); the quota file and a directory for the jobs."""
    added = 'claude_bin = "../tests/fakes/claude"\ngateway = false\ncli_env_keep = ["FAKE_CLAUDE_*"]\n'
    quota = var / "fake" / "quota.json"
    quota.parent.mkdir()
    quota.write_text("{}")
    work = var / "work"
    work.mkdir()
    if os.geteuid() == 0:  # as root, each job's CLI is a user of the pool, in a view of its own
        added += 'cli_readable = ["../tests/fakes"]\ncli_writable = ["fake"]\n'
        shutil.chown(work, group=POOL)
        work.chmod(0o2770)
        quota.parent.chmod(0o777)
        quota.chmod(0o666)
    config = var / "config.toml"
    config.write_text(config.read_text() + added)
    return quota, work


def submit(cl: Any, work: Path, prompt: str) -> int:
    done = cl("submit", "--cwd", str(work), "--prompt", prompt, "--json")
    assert done.returncode == 0, done.stderr
    return int(json.loads(done.stdout)["job"])


def job_state(cl: Any, job: int) -> str:
    return str(next(j["state"] for j in json.loads(cl("jobs", "--all", "--json").stdout) if j["id"] == job))


def dashboard(url: str) -> Any:
    """A function that reads the dashboard's data, as its page does."""

    def board() -> dict[str, Any]:
        data: dict[str, Any] = json.loads(fetch(f"{url}/dashboard.json")[2])
        return data

    return board
