"""Gateway benchmarks (`python bench/gateway.py [--quick]`, part of `make bench`).

Side by side in one run, the same client asks a fast streaming stand-in for the API
(bench/upstream.py) directly and through cl-gateway, alternating, so the figures are the
gateway's own cost on this machine at this moment:

* added time to first byte and added total time per request, at 1 and at 200 concurrent
  streams (goal: p99 <= 2 ms);
* a streamed chunk's delay, from the upstream's write to the client's read (goal: <= 1 ms added at p99);
* the gateway's RSS while 500 streams are open (goal: <= 80 MB);
* a quota 429 answered on another account (the rescuer's move in flight, then the same
  request again), beyond what the upstream itself took for the 429 and the answer (goal: p99 <= 30 ms);
* the gateway's CPU time per 1,000 requests.

The store holds a running run, with its capability, for every stream; cl-rescue runs beside
the gateway for the moves. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
from run import BIN, TICKS, daemons_named, percentile, spread

from cl import capability
from cl.processes import start_time
from cl.store import Store

HERE = Path(__file__).resolve().parent
FAR = 4_102_444_800_000
WALLED = "bench-walled-token-000000"
TOKENS = {"a1": "bench-a1-token-0000000000", "a2": "bench-a2-token-0000000000", "w1": WALLED}
BODY = json.dumps({"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}).encode()


def setup(root: Path, streams: int, walled: int) -> tuple[list[str], list[str]]:
    """Accounts a1, a2 and w1 (whose token the upstream walls); `streams` running runs on a1 and
    `walled` on w1, each with a capability. The capabilities, a1's then w1's."""
    (root / "claude").mkdir(parents=True)
    for name, token in TOKENS.items():
        path = root / "claude" / f"credentials-{name}.json"
        path.write_text(json.dumps({"claudeAiOauth": {"accessToken": token, "refreshToken": "", "expiresAt": FAR}}))
        path.chmod(0o600)
    store = Store(root / "state" / "cl.db")
    me, started = os.getpid(), start_time(os.getpid()) or ""
    held: dict[str, list[str]] = {"a1": [], "w1": []}
    for account, count in (("a1", streams), ("w1", walled)):
        for i in range(count):
            job = store.add_job("/tmp", f"stream {i}")  # noqa: S108 - a path stored, never used
            run = store.place(job.id, account, limit=1_000_000)
            assert run is not None
            store.claim(run.id, me, started, os.devnull)  # ours: a move signals us (SIGUSR1, ignored)
            store.set_session(run.id, str(uuid.uuid4()))
            secret = capability.new()
            store.issue_capability(capability.digest(secret), run.id)
            held[account].append(secret)
    store.close()
    return held["a1"], held["w1"]


class Client:
    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session

    async def ask(self, url: str, token: str, chunks: int = 8, gap_ms: float = 0) -> tuple[float, float, list[float]]:
        """One streamed request: time to first byte, total time, and each chunk's delay."""
        headers = {"authorization": f"Bearer {token}", "x-bench-chunks": str(chunks), "x-bench-gap-ms": str(gap_ms)}
        started = time.monotonic()
        delays: list[float] = []
        first = None
        async with self.session.post(f"{url}/v1/messages", data=BODY, headers=headers) as response:
            buffer = b""
            async for chunk in response.content.iter_any():
                now = time.monotonic()
                first = first or now
                buffer += chunk
                while b"\n\n" in buffer:
                    event, buffer = buffer.split(b"\n\n", 1)
                    data = event.split(b"data: ", 1)[-1]
                    if response.status == 200:
                        delays.append(now - json.loads(data)["t"])
        end = time.monotonic()
        return (first or end) - started, end - started, delays


async def side_by_side(
    rounds: int, concurrency: int, direct: Callable[[], Awaitable[tuple[float, float, list[float]]]],
    through: Callable[[int], Awaitable[tuple[float, float, list[float]]]],
) -> dict[str, dict[str, list[float]]]:  # fmt: skip
    """`rounds` rounds of `concurrency` requests at once, direct then through the gateway, in turn."""
    figures: dict[str, dict[str, list[float]]] = {
        way: {"ttfb": [], "total": [], "chunk": []} for way in ("direct", "gateway")
    }
    for _ in range(rounds):
        for way in ("direct", "gateway"):
            calls = [direct() if way == "direct" else through(i) for i in range(concurrency)]
            for ttfb, total, delays in await asyncio.gather(*calls):
                figures[way]["ttfb"].append(ttfb)
                figures[way]["total"].append(total)
                figures[way]["chunk"] += delays
    return figures


def report(title: str, figures: dict[str, dict[str, list[float]]], goal: float) -> None:
    print(f"\n{title}")
    for key in ("ttfb", "total", "chunk"):
        direct, through = figures["direct"][key], figures["gateway"][key]
        added = percentile(through, 99) - percentile(direct, 99)
        verdict = "met" if added <= goal else "NOT met"
        both = f"direct {spread(direct)}   gateway {spread(through)}"
        print(f"  {key:6} {both}   added at p99 {added * 1000:.2f} ms ({verdict})")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def measure(
    held: tuple[list[str], list[str]], upstream: str, gateway: str, gateway_pid: int, quick: bool
) -> None:
    a1, w1 = held
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        client = Client(session)
        for i in range(20):  # warm both paths' connections
            await client.ask(upstream, TOKENS["a1"])
            await client.ask(gateway, a1[i % len(a1)])

        def direct() -> Awaitable[tuple[float, float, list[float]]]:
            return client.ask(upstream, TOKENS["a1"], gap_ms=2)

        def through(i: int) -> Awaitable[tuple[float, float, list[float]]]:
            return client.ask(gateway, a1[i % len(a1)], gap_ms=2)

        one = await side_by_side(100 if quick else 400, 1, direct, through)
        report("1 stream at a time (8 chunks 2 ms apart)", one, 0.002)
        cpu_before = cpu_seconds(gateway_pid)
        rounds = 5 if quick else 20
        many = await side_by_side(rounds, 200, direct, through)
        cpu = cpu_seconds(gateway_pid) - cpu_before
        report("200 streams at once", many, 0.002)
        print(f"\ngateway CPU per 1,000 requests: {cpu / (rounds * 200) * 1000:.2f} s (at 200 at once)")

        idle = rss_mb(gateway_pid)
        peak = idle
        streams = asyncio.gather(*(client.ask(gateway, a1[i], chunks=20, gap_ms=100) for i in range(500)))
        while not streams.done():
            peak = max(peak, rss_mb(gateway_pid))
            await asyncio.sleep(0.05)
        await streams
        print(f"gateway RSS: {idle:.1f} MB idle, {peak:.1f} MB at most with 500 streams open (goal <= 80 MB)")

        extra = []
        for token in w1:
            own_429 = (await client.ask(upstream, WALLED, chunks=1))[1]
            own_answer = (await client.ask(upstream, TOKENS["a2"], chunks=1))[1]
            moved = (await client.ask(gateway, token, chunks=1))[1]
            extra.append(moved - own_429 - own_answer)
        verdict = "met" if percentile(extra, 99) <= 0.030 else "NOT met"
        print(f"quota 429 answered on a2, beyond the upstream's own time: {spread(extra)} (n={len(extra)}, {verdict})")


def free_address() -> str:
    """A loopback HOST:PORT nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples (a smoke run)")
    args = parser.parse_args()
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # the rescuer's word to a run's worker: the runs are ours
    with tempfile.TemporaryDirectory(prefix="cl-bench-gateway-") as tmp:
        root = Path(tmp)
        held = setup(root, 500, 20 if args.quick else 100)
        port_file = root / "upstream.port"
        upstream = subprocess.Popen([sys.executable, str(HERE / "upstream.py"), str(port_file), WALLED])
        try:
            while not port_file.exists():
                time.sleep(0.01)
            upstream_url = f"http://127.0.0.1:{port_file.read_text()}"
            listen = free_address()
            env = {
                "CL_GATEWAY": "true",
                "CL_GATEWAY_LISTEN": listen,
                "CL_GATEWAY_UPSTREAM": upstream_url,
                "CL_MAX_SESSIONS_PER_ACCOUNT": "1000",
                "CL_LOG_LEVEL": "warning",
            }
            with daemons_named(root, ("gateway", "rescue"), env) as procs:
                print(f"cl-gateway {BIN / 'cl-gateway'} on {listen}, upstream {upstream_url}")
                asyncio.run(measure(held, upstream_url, f"http://{listen}", procs["gateway"].pid, args.quick))
        finally:
            upstream.terminate()
            upstream.wait(10)


if __name__ == "__main__":
    main()
