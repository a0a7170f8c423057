"""Rescue benchmarks (`python bench/rescue.py [--quick]`, part of `make bench`).

Every daemon, worker and CLI is a real process; the Anthropic API is the local fake
(tests/fakes/fake_anthropic.py), which stamps each request it receives. Each figure is measured
for the live move and for the restart (`live_wait = 0`) side by side, in the same run.

* wall -> first request under the new account, with the real CLI (tests/real_cli.py's pinned
  version): a session walls on its account (the fake API's 429) and the rescuer moves it to a
  healthy one; the figure ends when the fake API receives that session's next request with the
  healthy account's token;
* file dropped -> first request: three sessions wait with every account walled, a credential
  file lands (os.replace returns); the figure ends at each session's first request under it;
* the floor: the same CLI with no cl, one and three at once, walled, its credential re-pointed,
  the next message written -> its request under the new token: what a live move cannot beat;
* storm: 500 sessions walled at once with room for all of them elsewhere (no CLI: 500 would not
  fit on this machine). Live: every session is held (its worker plays by this bench, which
  claims each move handed over as a held worker would); restart: every worker is launched
  through a socket the bench answers (as systemd's cl-worker.socket would). The figure ends when
  every session continues: its move claimed, or its worker launched.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from subprocess import PIPE
from typing import Any

from run import HELD, HERE, cpu_seconds, daemons, daemons_named, end_workers, ms, spread, wait_for

from cl import logs
from cl.claude_code.stream import user_message
from cl.client import call
from cl.processes import start_time
from cl.states import JobState, RunState
from cl.store import Store

TESTS = HERE.parent / "tests"
FAKE_API = TESTS / "fakes" / "fake_anthropic.py"
WAITING_IDLE_SECONDS = 20
MODES = {"live": ("3600", False), "restart": ("0", False), "gateway": ("3600", True)}
"""`live_wait` per mode, and whether the CLIs go through cl-gateway (with it, a wall met while
another account has room is answered there, the session moved in flight; direct otherwise)."""


def credential(directory: Path, name: str) -> tuple[str, float]:
    """Land a credential with a token of its own, atomically; the token and when it landed."""
    token = f"bench-{name}-{os.urandom(8).hex()}"
    oauth = {"accessToken": token, "refreshToken": "r", "expiresAt": 4102444800000, "scopes": ["user:inference"]}
    doc = {"claudeAiOauth": {**oauth, "subscriptionType": "max"}}
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{name}.tmp"
    tmp.write_text(json.dumps(doc))
    tmp.chmod(0o600)
    tmp.replace(directory / f"credentials-{name}.json")
    return token, time.time()


class FakeApi:
    """The fake Anthropic API, as a process; its log of requests, each stamped on arrival."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.log = root / "api.jsonl"
        port = root / "api.port"
        self.process = subprocess.Popen(
            [sys.executable, str(FAKE_API), "--port-file", str(port), "--log", str(self.log)], stderr=subprocess.DEVNULL
        )
        wait_for(port.exists, "the fake API to listen")
        self.url = f"http://127.0.0.1:{port.read_text()}"

    def limit(self, token: str, messages: int) -> None:
        data = json.dumps({"key": token, "limit": messages}).encode()
        request = urllib.request.Request(f"{self.url}/_fake/limit", data=data, method="POST")  # noqa: S310 - loopback
        with urllib.request.urlopen(request, timeout=10):  # noqa: S310
            pass

    def requests(self) -> list[dict[str, Any]]:
        """The complete lines of the log (the server may be writing one)."""
        *complete, _partial = self.log.read_text().split("\n") if self.log.exists() else [""]
        return [json.loads(line) for line in complete]

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(10)


class Jobs:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.store = Store(root / "state" / "cl.db")

    def submit(self, prompt: str) -> int:
        request = {"request": "submit", "cwd": str(self.root / "work"), "prompt": prompt}
        return int(call(self.root / "run" / "balancer.sock", request)["job"])

    def states(self) -> dict[int, str]:
        return {job.id: job.state for job in self.store.jobs()}

    def waiting(self) -> int:
        return len(call(self.root / "run" / "rescue.sock", {"request": "waiting"})["sessions"])

    def live_moves(self) -> int:
        return sum(e["event"] == "move started" and e["detail"]["live"] for e in self.store.ledger(1_000_000))


@contextlib.contextmanager
def with_real_cli(root: Path, claude: Path, mode: tuple[str, bool]) -> Iterator[tuple[FakeApi, Jobs]]:
    live_wait, gateway = mode
    api = FakeApi(root)
    (root / "work").mkdir(parents=True, exist_ok=True)
    env = {"CL_CLAUDE_BIN": str(claude), "CL_LIVE_WAIT": live_wait, "CL_RESET_JITTER": "0"}
    if gateway:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            listen = f"127.0.0.1:{sock.getsockname()[1]}"
        env |= {"CL_GATEWAY": "true", "CL_GATEWAY_LISTEN": listen, "CL_GATEWAY_UPSTREAM": api.url}
    else:
        env |= {"ANTHROPIC_BASE_URL": api.url, "CL_GATEWAY": "false"}
    names = ("balancer", "rescue", "gateway") if gateway else ("balancer", "rescue")
    try:
        with daemons_named(root, names, env):
            yield api, Jobs(root)
    finally:
        end_workers(root)  # the sessions still held for a live move
        api.close()


def first_under(api: FakeApi, token: str, session: str) -> float | None:
    """When the fake API first saw `session` with `token`."""
    tail = token[-6:]
    return next((r["t"] for r in api.requests() if r["session"] == session and r["cred_tail"] == tail), None)


def wall_to_first_request(root: Path, claude: Path, samples: int, mode: tuple[str, bool]) -> tuple[list[float], int]:
    """Per sample: a fresh account that walls at once takes a job; the rescuer moves it to `h`."""
    with with_real_cli(root, claude, mode) as (api, jobs):
        healthy, _ = credential(root / "claude", "h")
        jobs.submit("warm up h")  # h reports some usage: a fresh account has more room
        wait_for(lambda: set(jobs.states().values()) == {JobState.DONE}, "the warm-up job")
        latencies = []
        for i in range(samples):
            token, _ = credential(root / "claude", f"w{i:03d}")
            api.limit(token, 0)
            wait_for(lambda i=i: _sees(root, f"w{i:03d}"), "both daemons to see it")
            job = jobs.submit(f"task {i}")
            wait_for(lambda job=job: jobs.states()[job] == JobState.DONE, f"job {job} to be moved and done")
            wall = next(r for r in api.requests() if r["walled"] and r["cred_tail"] == token[-6:])
            first = first_under(api, healthy, wall["session"])
            assert first is not None
            latencies.append(first - wall["t"])
        return latencies, jobs.live_moves()


def _sees(root: Path, name: str) -> bool:
    request = {"request": "accounts", "names": [name]}
    return all(call(root / "run" / f"{d}.sock", request)["accounts"] for d in ("balancer", "rescue"))


def file_to_first_request(
    root: Path, claude: Path, trials: int, mode: tuple[str, bool], waiting: int = 3
) -> tuple[dict[str, list[float]], int, float]:
    """Per trial: `waiting` sessions wall on every account there is and wait; a file lands with
    room for them all; from the landing to each one's move committed, its run claimed (by the
    held worker, or a new one) and its first request under the new account. Then that account
    walls too. Also the rescuer's CPU while sessions wait."""
    with with_real_cli(root, claude, mode) as (api, jobs):
        walled, _ = credential(root / "claude", "first")
        api.limit(walled, 0)
        latencies: dict[str, list[float]] = {"move": [], "claim": [], "request": []}
        for trial in range(trials):
            before = set(jobs.states())
            for i in range(waiting):
                jobs.submit(f"trial {trial} task {i}")
            wait_for(lambda: jobs.waiting() == waiting, "every session to wait")
            sessions = {job.session_id for job in jobs.store.jobs() if job.id not in before}
            token, landed = credential(root / "claude", f"n{trial:03d}")
            wait_for(lambda: set(jobs.states().values()) == {JobState.DONE}, "the sessions to finish")
            for session in sessions:
                first = first_under(api, token, str(session))
                assert first is not None
                latencies["request"].append(first - landed)
            for move, claim in resumes(jobs.store.ledger(1_000_000), after=landed):
                latencies["move"].append(move - landed)
                latencies["claim"].append(claim - landed)
            api.limit(token, 0)  # used up: the next trial's sessions wall there too
        for i in range(waiting):
            jobs.submit(f"idle {i}")
        wait_for(lambda: jobs.waiting() == waiting, "every session to wait")
        pid = _rescue_pid(root)
        before_cpu, start = cpu_seconds(pid), time.monotonic()
        time.sleep(WAITING_IDLE_SECONDS)
        idle = (cpu_seconds(pid) - before_cpu) / (time.monotonic() - start)
        return latencies, jobs.live_moves(), idle


def resumes(entries: list[dict[str, Any]], after: float) -> list[tuple[float, float]]:
    """Each move started after `after`: when it was committed, and when its run was claimed."""
    started = {e["detail"]["run"]: e["at"] for e in entries if e["event"] == "move started" and e["at"] > after}
    claimed = {e["detail"]["run"]: e["at"] for e in entries if e["event"] == "run started"}
    return [(at, claimed[run]) for run, at in started.items() if run in claimed]


def cli_floor(root: Path, claude: Path, sessions: int, rounds: int) -> list[float]:
    """The CLI alone, no cl: `sessions` CLIs walled at once, their credential files re-pointed,
    the next message written to each at once -> each one's request under the new token. What no
    live move can beat on this machine."""
    api = FakeApi(root)
    old, _ = credential(root / "roster", "old")
    new, _ = credential(root / "roster", "new")
    api.limit(old, 0)
    (root / "work").mkdir(parents=True, exist_ok=True)
    clis = []
    try:
        for i in range(sessions):
            config = root / f"config-{i}"
            config.mkdir()
            shutil.copy(root / "roster" / "credentials-old.json", config / ".credentials.json")
            env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "CLAUDE_"))}
            env |= {"CLAUDE_CONFIG_DIR": str(config), "HOME": str(config), "ANTHROPIC_BASE_URL": api.url}
            argv = [str(claude), "-p", "--input-format", "stream-json", "--output-format", "stream-json", "--verbose"]
            clis.append((config, subprocess.Popen(argv, stdin=PIPE, stdout=PIPE, cwd=root / "work", env=env)))
        latencies = []
        for trial in range(rounds):
            for name in ("old", "new"):
                for config, _ in clis:  # re-pointed, atomically, as the worker does
                    shutil.copy(root / "roster" / f"credentials-{name}.json", config / ".credentials.tmp")
                    (config / ".credentials.tmp").replace(config / ".credentials.json")
                sent = time.time()
                for _, cli in clis:
                    assert cli.stdin is not None
                    cli.stdin.write(user_message(f"{name} {trial}"))
                    cli.stdin.flush()
                for _, cli in clis:
                    assert cli.stdout is not None
                    while json.loads(cli.stdout.readline()).get("type") != "result":
                        pass
            tail = new[-6:]
            latencies += [r["t"] - sent for r in api.requests() if r["t"] > sent and r["cred_tail"] == tail]
        return latencies
    finally:
        for _, cli in clis:
            if cli.stdin is not None:
                cli.stdin.close()
            cli.wait(30)
        api.close()


def _rescue_pid(root: Path) -> int:
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"cl-rescue" in (entry / "cmdline").read_bytes():
                environ = (entry / "environ").read_bytes()
                if f"CL_STATE_DIR={root / 'state'}".encode() in environ.split(b"\0"):
                    return int(entry.name)
        except OSError:
            continue
    raise SystemExit("no cl-rescue")


class Launcher:
    """Plays cl-worker.socket: takes launch requests and answers with a live pid (ours)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(1024)
        self.runs: list[int] = []
        self.last = 0.0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            conn, _ = self.server.accept()
            with conn:
                request = json.loads(conn.makefile("rb").readline())
                self.runs.append(int(request["run"]))
                self.last = time.time()
                conn.sendall(json.dumps({"pid": os.getpid()}).encode() + b"\n")


class Holder:
    """Plays every held worker at once (they all have this process's pid): on SIGUSR1, claims each
    live move handed over, as a held worker would."""

    def __init__(self, database: Path, held: list[int]) -> None:
        self.store = Store(database)
        self.held = set(held)
        self.claimed: list[int] = []
        self.last = 0.0
        self._wake = threading.Event()
        signal.signal(signal.SIGUSR1, lambda _signum, _frame: self._wake.set())
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        me = os.getpid()
        started = start_time(me) or ""
        while self.held:
            self._wake.wait()
            self._wake.clear()
            for run_id in list(self.held):
                handed = self.store.handed_over(run_id)
                if handed is not None and self.store.claim(handed.id, me, started, "/dev/null", lease=HELD):
                    self.claimed.append(handed.id)
                    self.held.discard(run_id)
                    self.last = time.time()


def storm(root: Path, live: bool, sessions: int = 500, walled_accounts: int = 5) -> tuple[float, float, int]:
    """`sessions` walled at once (as their workers would report it), room for all elsewhere; the
    moves committed, every session continuing, and how many moved twice."""
    room = -(-sessions // 4) + 5
    for i in range(walled_accounts + room):
        credential(root / "claude", f"acct{i:04d}")
    (root / "work").mkdir(parents=True, exist_ok=True)
    store = Store(root / "state" / "cl.db")
    me = os.getpid()
    started = start_time(me) or ""
    runs = []
    for i in range(sessions):
        job = store.add_job(str(root / "work"), f"task {i}")
        run = store.place(job.id, f"acct{i % walled_accounts:04d}", limit=sessions)
        assert run is not None
        store.claim(run.id, me, started, str(root / "x.log"), lease=HELD)
        store.set_session(run.id, f"00000000-0000-4000-8000-{i:012d}")
        runs.append(run)
    launcher = Launcher(root / "run" / "worker.sock")
    holder = Holder(root / "state" / "cl.db", [run.id for run in runs]) if live else None
    with daemons(root, CL_CLAUDE_BIN="/bin/false"):
        start = time.time()
        for i in range(walled_accounts):
            store.record_wall(f"acct{i:04d}", "bench", time.time() + 3600, "five_hour")
        for run in runs:
            store.settle(run.id, RunState.WALLED, "walled", held_until=time.time() + 3600 if live else None)
        rescue = root / "run" / "rescue.sock"
        for run in runs:  # each worker tells the rescuer, as they would
            call(rescue, {"request": "run-changed", "run": run.id})
        if holder is not None:
            wait_for(lambda: len(holder.claimed) >= sessions, "every live move to be claimed")
        else:
            wait_for(lambda: len(launcher.runs) >= sessions, "every move to be launched")
        moves = [e for e in store.ledger(1_000_000) if e["event"] == "move started"]
    store.close()
    per_job = Counter(e["job_id"] for e in moves)
    continued = holder.claimed if holder else launcher.runs
    twice = sum(count > 1 for count in per_job.values()) + len(continued) - len(set(continued))
    last = holder.last if holder else launcher.last
    return max(e["at"] for e in moves) - start, last - start, twice


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    logs.configure("warning")
    samples = 10 if args.quick else 40
    sys.path.insert(0, str(TESTS))
    from real_cli import CLAUDE_CODE_VERSION, install  # noqa: PLC0415 - the tests' pinned CLI

    claude, why = install()
    with tempfile.TemporaryDirectory(prefix="cl-bench-") as tmp:
        if claude is None:
            print(f"real CLI figures skipped: {why}", flush=True)
        else:
            for mode, setting in MODES.items():
                latencies, live = wall_to_first_request(Path(tmp) / f"wall-{mode}", claude, samples, setting)
                print(
                    f"{mode:>7}: wall -> first request under the new account {spread(latencies)}"
                    f"  (n={len(latencies)}, {live} live; Claude Code {CLAUDE_CODE_VERSION}; goal live p99 <= 100 ms)",
                    flush=True,
                )
            for sessions in (1, 3):
                floor = cli_floor(Path(tmp) / f"floor-{sessions}", claude, sessions, samples)
                print(
                    f"  floor: the CLI alone, {sessions} at once: message written -> request under the new"
                    f" credential {spread(floor)}  (n={len(floor)}; no cl: what a live move cannot beat)",
                    flush=True,
                )
            for mode, setting in MODES.items():
                trials = max(3, samples // 3)
                steps, live, idle = file_to_first_request(Path(tmp) / f"file-{mode}", claude, trials, setting)
                print(
                    f"{mode:>7}: file landed -> first request under it {spread(steps['request'])}"
                    f"  (n={len(steps['request'])}, 3 waiting each time, {live} live; goal live p99 <= 100 ms);"
                    f" -> move committed {spread(steps['move'])}; -> run claimed {spread(steps['claim'])};"
                    f" cl-rescue CPU while 3 wait: {idle * 100:.2f} % of a core",
                    flush=True,
                )
        for live in (True, False):
            committed, continued, twice = storm(Path(tmp) / f"storm-{live}", live)
            print(
                f"{'live' if live else 'restart':>7}: storm, 500 sessions walled at once: all moves committed in"
                f" {ms(committed)}, all continuing in {ms(continued)}; moved twice: {twice}  (goal <= 2 s, none twice)",
                flush=True,
            )


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
