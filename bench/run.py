"""Benchmarks for the roster: `make bench` (or `python bench/run.py [--quick]`).

Prints each figure against its goal (bench/README.md):
* propagation: a credential file lands (os.replace returns) -> both daemons' `accounts`
  replies show it, at 4 and at 10,000 accounts;
* cold start: process spawned -> READY=1 on a NOTIFY_SOCKET, with 10,000 credential files;
* idle CPU of each daemon (utime+stime from /proc) and RSS at 10,000 accounts;
* the watchfiles `step` trade-off (latency vs idle CPU), next to raw inotify as the floor.
Nothing leaves the machine: temp dirs, Unix sockets, child processes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from cl.client import DaemonUnreachable, call

BIN = Path(sys.executable).parent
HERE = Path(__file__).resolve().parent
TICKS = os.sysconf("SC_CLK_TCK")
HELD = 86400.0
"""The lease of a run the bench claims as its own worker: nothing renews it, so it lasts the run."""
CREDENTIAL = json.dumps(
    {"claudeAiOauth": {"accessToken": "bench-token-0123456789", "refreshToken": "r", "expiresAt": 4102444800000}}
)


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def spread(samples: list[float]) -> str:
    """`p50 X ms p99 Y ms`, as every figure here is printed."""
    return f"p50 {ms(percentile(samples, 50))} p99 {ms(percentile(samples, 99))}"


def wait_for(condition: Callable[..., object], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.002)


def populate(directory: Path, count: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        path = directory / f"credentials-acct{i:05d}.json"
        path.write_text(CREDENTIAL)
        path.chmod(0o600)


def drop(directory: Path, name: str) -> float:
    """Write a credential atomically; the time it landed."""
    tmp = directory / f".{name}.tmp"
    tmp.write_text(CREDENTIAL)
    tmp.chmod(0o600)
    tmp.replace(directory / f"credentials-{name}.json")
    return time.perf_counter()


def env_for(root: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CL_", "NOTIFY_SOCKET", "WATCHDOG_", "JOURNAL_"))}
    env |= {
        "CL_CONFIG": "/dev/null",
        "CL_CREDENTIALS_DIR": str(root / "claude"),
        "CL_STATE_DIR": str(root / "state"),
        "CL_SESSIONS_DIR": str(root / "sessions"),
        "CL_RUNTIME_DIR": str(root / "run"),
        "CL_CONFINEMENT": os.environ.get("CL_CONFINEMENT", "none"),  # as root, "sandbox" measures the sandbox
        "CL_CLI_NETWORK": "host",  # no cl-worker@ unit narrows it here
        "CL_GATEWAY": os.environ.get("CL_GATEWAY", "false"),  # CL_GATEWAY=true python bench/...: gateway mode
        "CL_CLI_ENV_KEEP": "FAKE_CLAUDE_* ANTHROPIC_BASE_URL",  # what steers the fake CLI, and the fake API
    }
    return env | extra


def wait_ready(notify: socket.socket) -> None:
    notify.settimeout(60)
    while b"READY=1" not in notify.recv(4096):
        pass


def daemons(root: Path, **extra: str) -> AbstractContextManager[dict[str, subprocess.Popen[bytes]]]:
    """Both daemons on `root`, started and READY; `extra` adds to their environment."""
    return daemons_named(root, ("balancer", "rescue"), extra)


@contextmanager
def daemons_named(
    root: Path, names: tuple[str, ...], extra: dict[str, str]
) -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    """The daemons `names` on `root`, started and READY; `extra` adds to their environment."""
    notify_path = root / "notify.sock"
    notify_path.unlink(missing_ok=True)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    env = env_for(root, NOTIFY_SOCKET=str(notify_path), **extra)
    logs = {name: (root / f"{name}.log").open("ab") for name in names}
    procs = {name: subprocess.Popen([str(BIN / f"cl-{name}")], env=env, stderr=log) for name, log in logs.items()}
    try:
        try:
            for _ in procs:
                wait_ready(notify)
        except TimeoutError:  # say why: a daemon that died or hangs before READY left its reason in its log
            for name, proc in procs.items():
                print(f"cl-{name} ({'exited ' + str(proc.poll()) if proc.poll() is not None else 'running'}):")
                print((root / f"{name}.log").read_text(errors="replace")[-3000:])
            raise
        yield procs
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        for log in logs.values():
            log.close()
        notify.close()


def end_workers(root: Path) -> None:
    """Kill what the daemons on `root` launched and that outlives them (a worker holding its
    session's CLI for `live_wait`), found by the state dir its environment names; its CLI goes
    with it (PDEATHSIG)."""
    mark = f"CL_STATE_DIR={root / 'state'}".encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if mark in (entry / "environ").read_bytes().split(b"\0"):
                    os.kill(int(entry.name), signal.SIGKILL)


def visible(socket_path: Path, name: str) -> bool:
    try:
        return bool(call(socket_path, {"request": "accounts", "names": [name]}, timeout=5)["accounts"])
    except DaemonUnreachable:
        return False


def propagation(root: Path, accounts: int, samples: int) -> list[float]:
    populate(root / "claude", accounts)
    sockets = [root / "run" / f"{name}.sock" for name in ("balancer", "rescue")]
    latencies = []
    with daemons(root):
        for i in range(samples):
            name = f"new{i:05d}"
            landed = drop(root / "claude", name)
            pending = list(sockets)
            while pending:
                pending = [s for s in pending if not visible(s, name)]
            latencies.append(time.perf_counter() - landed)
            time.sleep(0.02)  # let each sample start from an idle watcher, as a real drop would
    return latencies


def cold_start(root: Path, runs: int) -> list[float]:
    populate(root / "claude", 10_000)
    notify_path = root / "notify.sock"
    times = []
    for _ in range(runs):
        notify_path.unlink(missing_ok=True)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.bind(str(notify_path))
            start = time.perf_counter()
            proc = subprocess.Popen(
                [str(BIN / "cl-balancer")], env=env_for(root, NOTIFY_SOCKET=str(notify_path)), stderr=subprocess.DEVNULL
            )
            wait_ready(notify)
            times.append(time.perf_counter() - start)
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    return times


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def idle_and_memory(root: Path, accounts: int, seconds: float) -> dict[str, tuple[float, float]]:
    """Per daemon: (idle CPU % of one core over `seconds`, RSS MB) with `accounts` loaded."""
    populate(root / "claude", accounts)
    with daemons(root) as procs:
        time.sleep(1)  # past start-up work
        before = {name: cpu_seconds(p.pid) for name, p in procs.items()}
        time.sleep(seconds)
        return {name: ((cpu_seconds(p.pid) - before[name]) / seconds * 100, rss_mb(p.pid)) for name, p in procs.items()}


def step_sweep(steps: list[int], samples: int, idle_seconds: float) -> list[dict[str, float | str]]:
    rows = []
    for watcher in ["inotify", *map(str, steps)]:
        out = subprocess.run(
            [sys.executable, str(HERE / "watch_step.py"), watcher, str(samples), str(idle_seconds)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        rows.append(json.loads(out))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples, 10 s idle windows")
    args = parser.parse_args()
    samples, idle = (50, 10.0) if args.quick else (300, 60.0)

    with tempfile.TemporaryDirectory(prefix="cl-bench-") as tmp:
        results = {}
        for accounts in (4, 10_000):
            root = Path(tmp) / f"prop{accounts}"
            lat = propagation(root, accounts, samples if accounts == 4 else samples // 2)
            results[accounts] = lat
            print(
                f"propagation, {accounts:>6} accounts: {spread(lat)}"
                f"  max {ms(max(lat))}  (n={len(lat)}; goal p99 <= 25 ms)",
                flush=True,
            )
        starts = cold_start(Path(tmp) / "cold", 5)
        print(
            f"cold start to READY=1, 10000 files: median {ms(statistics.median(starts))}  max {ms(max(starts))}"
            "  (goal <= 1 s)",
            flush=True,
        )
        for accounts in (4, 10_000):
            usage = idle_and_memory(Path(tmp) / f"idle{accounts}", accounts, idle)
            for name, (cpu, rss) in usage.items():
                print(
                    f"cl-{name:<8} {accounts:>6} accounts: idle CPU {cpu:.2f}% of a core over {idle:.0f} s"
                    f"  RSS {rss:.1f} MB  (goals <= 1 %, <= 80 MB)",
                    flush=True,
                )
        print("\nwatch step trade-off (one registry, in-process event latency; idle CPU of the whole process):")
        print(f"{'watcher':>12} {'p50':>9} {'p99':>9} {'idle CPU':>9}")
        for row in step_sweep([1, 5, 8, 10, 20, 50], max(30, samples // 3), idle / 3):
            print(f"{row['watcher']:>12} {ms(float(row['p50'])):>9} {ms(float(row['p99'])):>9} {row['cpu']:>8.2f}%")


if __name__ == "__main__":
    main()
