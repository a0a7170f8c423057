"""A fleet on one machine (`python bench/fleet.py [--quick]`): three hosts, each its own
directories and balancer and host name, sharing one PostgreSQL database (a server of the bench's
own, started as the tests start theirs: tests/postgres.py, on a Unix socket).

* a credential file lands on one host (os.replace returns) -> the other two hosts' balancers
  both list it in their `hosts` replies (goal: p99 <= 100 ms), each host holding 100 accounts;
* the database's connections per host, the three balancers idle.

Nothing leaves the machine. What is not measured yet (placement and status fleet-wide, wall ->
move across hosts) needs what is not built yet: see docs/operating.md, "Running a fleet".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import secrets
import sys
import tempfile
import time
from pathlib import Path

from run import daemons_named, percentile, spread

from cl.client import DaemonUnreachable, call

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import postgres

HOSTS = ("h1", "h2", "h3")


def credential() -> str:
    """An account of its own (a fingerprint of its own: the same file on two hosts is a copy)."""
    oauth = {"accessToken": secrets.token_hex(16), "refreshToken": secrets.token_hex(16), "expiresAt": 4102444800000}
    return json.dumps({"claudeAiOauth": oauth})


def land(directory: Path, name: str) -> float:
    """Write a credential atomically; the time it landed."""
    tmp = directory / f".{name}.tmp"
    tmp.write_text(credential())
    tmp.chmod(0o600)
    tmp.replace(directory / f"credentials-{name}.json")
    return time.perf_counter()


def listed(socket_path: Path, host: str, name: str) -> bool:
    try:
        reply = call(socket_path, {"request": "hosts"}, timeout=5)
    except DaemonUnreachable:
        return False
    return any(
        h["name"] == host and h["live"] and any(a["name"] == name for a in h["accounts"]) for h in reply["hosts"]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 samples instead of 100")
    args = parser.parse_args()
    samples = 20 if args.quick else 100
    server = postgres.Server()
    try:
        database = server.database()
        with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
            roots = {host: Path(tmp) / host for host in HOSTS}
            for host, root in roots.items():
                (root / "claude").mkdir(parents=True)
                for i in range(100):
                    land(root / "claude", f"{host}-a{i:03d}")
                stack.enter_context(daemons_named(root, ("balancer",), {"CL_STORE": database, "CL_HOST": host}))
            sockets = {host: root / "run" / "balancer.sock" for host, root in roots.items()}
            latencies = []
            for i in range(samples):
                host = HOSTS[i % len(HOSTS)]
                name = f"{host}-new{i:03d}"
                landed = land(roots[host] / "claude", name)
                pending = [socket for other, socket in sockets.items() if other != host]
                while pending:
                    pending = [socket for socket in pending if not listed(socket, host, name)]
                latencies.append(time.perf_counter() - landed)
                time.sleep(0.05)  # each sample from idle watchers, as a real drop would be
            name = database.split("?")[0].rsplit("/", 1)[1]
            ((connections,),) = server.sql("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", name)
        verdict = "ok" if percentile(latencies, 99) <= 0.1 else "OVER GOAL"
        print(f"file lands on one host -> listed by the other two: {spread(latencies)} (n={samples}) [{verdict}]")
        print(f"database connections, three idle balancers: {connections} ({connections / len(HOSTS):g} per host)")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
