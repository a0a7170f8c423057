"""Balancer benchmarks (`python bench/balancer.py [--quick]`, part of `make bench`).

* `status` round trip on the socket with 10,000 accounts and 1,000 sessions in the store (each
  session's account with its usage), and with the same store every `cl` command an operator
  types, end to end (process start included; goal: p50 under 200 ms each);
* submit -> worker's CLI started, with the fake `claude` (tests/fakes/claude): the socket
  request is sent -> the CLI process writes its first log line;
* placement throughput: 10,000 queued jobs over 100 accounts, each decision + its store
  transaction, workers not launched (that cost is the previous figure).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from run import BIN, HELD, daemons, env_for, populate, spread

from cl import logs
from cl.client import call, exchange
from cl.config import Config
from cl.placement import choose, eligible
from cl.processes import start_time
from cl.registry import CredentialRegistry
from cl.states import JobState
from cl.store import Store

FAKE_CLAUDE = Path(__file__).resolve().parents[1] / "tests" / "fakes" / "claude"


COMMANDS = (
    "cl status",
    "cl status --json",
    "cl accounts",
    "cl sessions",
    "cl jobs --all",
    "cl job 1",
    "cl logs 1",
    "cl --help",
)
"""Each timed as a person runs it: a new process, its imports, both daemons asked if it asks both."""


def status_round_trip(root: Path, samples: int) -> dict[str, list[float]]:
    """The `status` exchange (request sent -> whole reply received) with the store unchanged
    between requests, after usage recorded by another process, and after a change to a run;
    the client's JSON decoding of the reply; the whole `cl status --json` command."""
    populate(root / "claude", 10_000)
    store = Store(root / "state" / "cl.db")
    for i in range(1_000):
        job = store.add_job("/tmp", f"job {i}")  # noqa: S108 - a path stored, never used
        run = store.place(job.id, f"acct{i % 10_000:05d}", limit=1)
        assert run is not None
        store.claim(run.id, os.getpid(), start_time(os.getpid()) or "", os.devnull, lease=HELD)  # live: ours, adopted
        store.set_session(run.id, f"00000000-0000-0000-0000-{i:012d}")
        store.record_usage(run.account, {"five_hour": 0.25, "seven_day": 0.1}, used_at=time.time(), tokens=(900, 90))
    socket_path = root / "run" / "balancer.sock"
    changes: dict[str, Callable[[int], object]] = {
        "unchanged": lambda _: None,
        "usage": lambda i: store.record_usage(f"acct{i % 1_000:05d}", {"five_hour": 0.5}, tokens=(1, 1)),
        "job": lambda i: store.set_session(i % 1_000 + 1, f"00000000-0000-0000-0001-{i:012d}"),
    }
    times: dict[str, list[float]] = {name: [] for name in [*changes, "decode", *COMMANDS]}
    with daemons(root):
        exchange(socket_path, {"request": "status"})  # the first renders every account
        for i in range(samples * len(changes)):
            name = list(changes)[i % len(changes)]
            changes[name](i)  # as a worker reporting usage, or a session starting, would
            start = time.perf_counter()
            line = exchange(socket_path, {"request": "status"})
            times[name].append(time.perf_counter() - start)
            start = time.perf_counter()
            reply = json.loads(line)
            times["decode"].append(time.perf_counter() - start)
        assert (len(reply["accounts"]), len(reply["sessions"])) == (10_000, 1_000)
        for _ in range(max(5, samples // 10)):
            for command in COMMANDS:
                start = time.perf_counter()
                subprocess.run(
                    [str(BIN / "cl"), *command.split()[1:]], env=env_for(root), capture_output=True, check=True
                )
                times[command].append(time.perf_counter() - start)
    store.close()
    return times


def submit_to_started(root: Path, samples: int) -> list[float]:
    populate(root / "claude", 4)
    (root / "work").mkdir()
    fake_log = root / "fake.jsonl"
    latencies = []
    with daemons(root, CL_CLAUDE_BIN=str(FAKE_CLAUDE), FAKE_CLAUDE_LOG=str(fake_log)):
        socket_path = root / "run" / "balancer.sock"
        for i in range(samples):
            sent = time.time()
            call(socket_path, {"request": "submit", "cwd": str(root / "work"), "prompt": f"p{i}"})
            deadline = time.monotonic() + 30
            while True:
                lines = fake_log.read_text().split("\n")[:-1] if fake_log.exists() else []  # complete lines
                if len(lines) > i:
                    latencies.append(json.loads(lines[i])["t"] - sent)
                    break
                if time.monotonic() > deadline:
                    last = call(socket_path, {"request": "status", "finished": True})["jobs"][-1]
                    raise SystemExit(f"job {i} did not start in 30 s: {last}")
                time.sleep(0.001)
            time.sleep(0.05)
    return latencies


def placement_throughput(root: Path, jobs: int = 10_000, accounts: int = 100, database: Path | None = None) -> float:
    """Jobs placed a second; `database` may already hold a history (the soak benchmark's)."""
    populate(root / "claude", accounts)
    store = Store(database or root / "cl.db")
    for i in range(jobs):
        store.add_job("/tmp", f"job {i}")  # noqa: S108
    import asyncio  # noqa: PLC0415 - only this figure needs a loop

    async def roster() -> CredentialRegistry:
        registry = CredentialRegistry(root / "claude")
        await registry.resync()
        return registry

    registry = asyncio.run(roster())
    start = time.perf_counter()
    live: dict[str, int] = {}
    usage = store.usage()
    walls = store.walls()
    usable = [name for name, account in registry.accounts.items() if account.usable]
    for job in store.jobs((JobState.QUEUED,)):
        chosen = choose(eligible(usable, walls, live, 1_000), live, usage, Config().placement)
        assert chosen is not None
        store.place(job.id, chosen, limit=1_000)
        live[chosen] = live.get(chosen, 0) + 1
    elapsed = time.perf_counter() - start
    store.close()
    return jobs / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    logs.configure("warning")
    samples = 50 if args.quick else 300
    with tempfile.TemporaryDirectory(prefix="cl-bench-") as tmp:
        status = status_round_trip(Path(tmp) / "status", samples)
        print(
            "status, 10000 accounts / 1000 sessions (goal p99 <= 20 ms), request -> whole reply (1 MB):"
            f" store unchanged {spread(status['unchanged'])}; usage recorded before each {spread(status['usage'])};"
            f" a session's id recorded before each {spread(status['job'])};"
            f" then the client's json.loads {spread(status['decode'])}",
            flush=True,
        )
        print("commands end to end, same store (goal p50 < 200 ms each):", flush=True)
        for command in COMMANDS:
            print(f"  {command:<18} {spread(status[command])}", flush=True)
        started = submit_to_started(Path(tmp) / "submit", samples // 5)
        print(
            f"submit -> CLI started (fake claude): {spread(started)}  (n={len(started)})",
            flush=True,
        )
        rate = placement_throughput(Path(tmp) / "place")
        print(f"placement: {rate:,.0f} jobs/s (10000 queued jobs, 100 accounts, launch excluded)", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
