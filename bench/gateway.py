"""Gateway benchmarks (`python bench/gateway.py [--quick]`, part of `make bench`).

Side by side in one run, the same client asks a fast streaming stand-in for the API
(bench/upstream.py) directly and through cl-gateway, alternating, so the figures are the
gateway's own cost on this machine at this moment:

* added time to first byte and added total time per request, at 1 and at 200 concurrent
  streams (goal: p99 <= 2 ms): 200 sessions streaming at once as a model streams (100 events 20
  ms apart, their starts spread), and 200 requests started in the same instant, flat out (8 events
  2 ms apart), where the client, the upstream and the gateway share two saturated cores;
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
import dataclasses
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
from run import BIN, HELD, cpu_seconds, daemons_named, percentile, rss_mb, spread

from cl import capability
from cl.processes import start_time
from cl.store import Store

HERE = Path(__file__).resolve().parent
FAR = 4_102_444_800_000
WALLED = "bench-walled-token-000000"
TOKENS = {"a1": "bench-a1-token-0000000000", "a2": "bench-a2-token-0000000000", "w1": WALLED}
Asked = tuple[float, float, list[float]]
"""One request's time to first byte, total time, and each chunk's delay."""
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
            store.claim(run.id, me, started, os.devnull, lease=HELD)  # ours: a move signals us (SIGUSR1, ignored)
            store.set_session(run.id, str(uuid.uuid4()))
            secret = capability.new()
            store.issue_capability(capability.digest(secret), run.id)
            held[account].append(secret)
    store.close()
    return held["a1"], held["w1"]


class Client:
    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session

    async def ask(self, url: str, token: str, chunks: int = 8, gap_ms: float = 0) -> Asked:
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
    rounds: int, concurrency: int, direct: Callable[[], Awaitable[Asked]], through: Callable[[int], Awaitable[Asked]]
) -> dict[str, dict[str, list[float]]]:
    """`rounds` rounds of `concurrency` requests at once, direct then through the gateway, in turn."""
    figures: dict[str, dict[str, list[float]]] = {way: {"ttfb": [], "total": [], "chunk": []} for way in WAYS}
    for _ in range(rounds):
        for way in ("direct", "gateway"):
            calls = [direct() if way == "direct" else through(i) for i in range(concurrency)]
            for ttfb, total, delays in await asyncio.gather(*calls):
                figures[way]["ttfb"].append(ttfb)
                figures[way]["total"].append(total)
                figures[way]["chunk"] += delays
    return figures


WAYS = ("direct", "gateway")


async def sessions(client: Client, url: str, tokens: list[str], count: int, seconds: float) -> dict[str, list[float]]:
    """`count` sessions, each asking again as soon as its stream ends, for `seconds`; their starts
    spread over the first stream's length, so the streams are open at once without arriving at once."""
    figures: dict[str, list[float]] = {"ttfb": [], "total": [], "chunk": []}
    until = time.monotonic() + seconds

    async def session(i: int) -> None:
        await asyncio.sleep(i * 2.0 / count)  # a stream lasts ~2 s: the starts spread over it
        while time.monotonic() < until:
            ttfb, total, delays = await client.ask(url, tokens[i % len(tokens)], chunks=100, gap_ms=20)
            figures["ttfb"].append(ttfb)
            figures["total"].append(total)
            figures["chunk"] += delays

    await asyncio.gather(*(session(i) for i in range(count)))
    return figures


def report(title: str, figures: dict[str, dict[str, list[float]]], goal: float) -> None:
    print(f"\n{title}")
    for key in ("ttfb", "total", "chunk"):
        direct, through = figures["direct"][key], figures["gateway"][key]
        added = percentile(through, 99) - percentile(direct, 99)
        verdict = "met" if added <= goal else "NOT met"
        both = f"direct {spread(direct)}   gateway {spread(through)}"
        print(f"  {key:6} {both}   added at p99 {added * 1000:.2f} ms ({verdict})")


@dataclasses.dataclass
class Bench:
    """What every figure asks with: the client, the two ways in, the capabilities, the gateway's pid."""

    client: Client
    upstream: str
    gateway: str
    a1: list[str]
    """Capabilities of running runs on a1."""
    w1: list[str]
    """Capabilities of running runs on w1, whose token the upstream walls."""
    pid: int
    quick: bool

    def paced(self, gap_ms: float) -> tuple[Callable[[], Awaitable[Asked]], Callable[[int], Awaitable[Asked]]]:
        """A request of 8 events `gap_ms` apart, directly and through the gateway."""

        def direct() -> Awaitable[Asked]:
            return self.client.ask(self.upstream, TOKENS["a1"], gap_ms=gap_ms)

        def through(i: int) -> Awaitable[Asked]:
            return self.client.ask(self.gateway, self.a1[i % len(self.a1)], gap_ms=gap_ms)

        return direct, through


async def one_at_a_time(bench: Bench) -> None:
    one = await side_by_side(100 if bench.quick else 400, 1, *bench.paced(2))
    report("1 stream at a time (8 chunks 2 ms apart)", one, 0.002)


async def open_at_once(bench: Bench) -> None:
    steady: dict[str, dict[str, list[float]]] = {way: {"ttfb": [], "total": [], "chunk": []} for way in WAYS}
    spent = 0.0
    for _ in range(1 if bench.quick else 3):
        for way, url, tokens in (("direct", bench.upstream, [TOKENS["a1"]]), ("gateway", bench.gateway, bench.a1)):
            cpu_before = cpu_seconds(bench.pid)
            for key, values in (await sessions(bench.client, url, tokens, 200, 5.0 if bench.quick else 10.0)).items():
                steady[way][key] += values
            if way == "gateway":
                spent += cpu_seconds(bench.pid) - cpu_before
    report("200 streams open at once, as sessions stream (100 events 20 ms apart, starts spread)", steady, 0.002)
    print(f"  gateway CPU per 1,000 requests: {spent / len(steady['gateway']['ttfb']) * 1000:.2f} s (100 events each)")


async def flat_out(bench: Bench) -> None:
    rounds = 5 if bench.quick else 20
    cpu_before = cpu_seconds(bench.pid)
    figures = await side_by_side(rounds, 200, *bench.paced(2))
    cpu = cpu_seconds(bench.pid) - cpu_before
    report("200 streams started in the same instant, flat out (8 events 2 ms apart: 2 cores saturated)", figures, 0.002)
    print(f"  gateway CPU per 1,000 requests: {cpu / (rounds * 200) * 1000:.2f} s")


async def memory(bench: Bench) -> None:
    idle = peak = rss_mb(bench.pid)
    streams = asyncio.gather(*(bench.client.ask(bench.gateway, bench.a1[i], chunks=20, gap_ms=100) for i in range(500)))
    while not streams.done():
        peak = max(peak, rss_mb(bench.pid))
        await asyncio.sleep(0.05)
    await streams
    print(f"gateway RSS: {idle:.1f} MB idle, {peak:.1f} MB at most with 500 streams open (goal <= 80 MB)")


async def moved_in_flight(bench: Bench) -> None:
    extra = []
    for token in bench.w1:
        own_429 = (await bench.client.ask(bench.upstream, WALLED, chunks=1))[1]
        own_answer = (await bench.client.ask(bench.upstream, TOKENS["a2"], chunks=1))[1]
        moved = (await bench.client.ask(bench.gateway, token, chunks=1))[1]
        extra.append(moved - own_429 - own_answer)
    verdict = "met" if percentile(extra, 99) <= 0.030 else "NOT met"
    print(f"quota 429 answered on a2, beyond the upstream's own time: {spread(extra)} (n={len(extra)}, {verdict})")


async def measure(held: tuple[list[str], list[str]], upstream: str, gateway: str, pid: int, quick: bool) -> None:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        bench = Bench(Client(session), upstream, gateway, *held, pid, quick)
        for i in range(20):  # warm both paths' connections
            await bench.client.ask(upstream, TOKENS["a1"])
            await bench.client.ask(gateway, bench.a1[i % len(bench.a1)])
        for figure in (one_at_a_time, open_at_once, flat_out, memory, moved_in_flight):
            await figure(bench)


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
