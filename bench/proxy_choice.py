"""Which library the gateway is built on (`python bench/proxy_choice.py`; needs `pip install httpx uvicorn`).

Two minimal streaming relays with the gateway's shape (read the request, forward it upstream
with a header swapped, stream the answer back chunk by chunk), each in a process of its own:
aiohttp (its server and its client on one loop) and httpx behind uvicorn (an ASGI app, the
choice the issue offered). The same client asks bench/upstream.py directly and through each, in
turn, in one run: added time to first byte and added total per request at 1 and 50 streams at
once, and each relay's CPU per 1,000 requests. The gateway itself is measured by bench/gateway.py.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from gateway import Client, free_address
from run import HERE, percentile, spread

AIOHTTP_RELAY = """
import sys
from aiohttp import ClientSession, ClientTimeout, TCPConnector, web
upstream = sys.argv[2]
async def start(app):
    app["client"] = ClientSession(connector=TCPConnector(limit=0), auto_decompress=False, timeout=ClientTimeout(None))
async def relay(request):
    headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
    body = await request.read()
    async with request.app["client"].post(upstream + request.path_qs, headers=headers, data=body) as answer:
        response = web.StreamResponse(status=answer.status, headers={"content-type": answer.content_type})
        await response.prepare(request)
        async for chunk in answer.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response
async def stop(app):
    await app["client"].close()
app = web.Application()
app.on_startup.append(start)
app.on_cleanup.append(stop)
app.router.add_post("/v1/messages", relay)
host, port = sys.argv[1].split(":")
web.run_app(app, host=host, port=int(port), access_log=None, print=None)
"""

HTTPX_RELAY = """
import sys
import httpx
import uvicorn
upstream = sys.argv[2]
client = httpx.AsyncClient(limits=httpx.Limits(max_connections=None, max_keepalive_connections=None), timeout=None)
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    headers = [(k, v) for k, v in scope["headers"] if k.lower() not in (b"host", b"content-length")]
    request = client.build_request("POST", upstream + scope["path"], headers=headers, content=body)
    answer = await client.send(request, stream=True)
    await send({"type": "http.response.start", "status": answer.status_code,
                "headers": [(b"content-type", answer.headers.get("content-type", "").encode())]})
    async for chunk in answer.aiter_raw():
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})
    await answer.aclose()
host, port = sys.argv[1].split(":")
uvicorn.run(app, host=host, port=int(port), log_level="warning", access_log=False)
"""


def cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def compare(upstream: str, relays: dict[str, tuple[str, int]], rounds: int) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        client = Client(session)
        for url, _pid in relays.values():
            for _ in range(20):
                await client.ask(url, "token")
        for concurrency in (1, 50):
            figures: dict[str, dict[str, list[float]]] = {"direct": {"ttfb": [], "total": []}}
            figures |= {name: {"ttfb": [], "total": []} for name in relays}
            spent = dict.fromkeys(relays, 0.0)
            for _ in range(rounds if concurrency == 1 else max(2, rounds // 20)):
                for name, url in [("direct", upstream), *((n, u) for n, (u, _) in relays.items())]:
                    before = cpu(relays[name][1]) if name in relays else 0.0
                    for first, whole, _ in await asyncio.gather(
                        *(client.ask(url, "token", gap_ms=2) for _ in range(concurrency))
                    ):
                        figures[name]["ttfb"].append(first)
                        figures[name]["total"].append(whole)
                    if name in relays:
                        spent[name] += cpu(relays[name][1]) - before
            print(f"\n{concurrency} stream(s) at once:")
            for name in figures:
                ttfb, total = figures[name]["ttfb"], figures[name]["total"]
                line = f"  {name:8} ttfb {spread(ttfb)}  total {spread(total)}"
                if name in relays:
                    added = percentile(ttfb, 99) - percentile(figures["direct"]["ttfb"], 99)
                    per_1000 = spent[name] / len(ttfb) * 1000
                    line += f"  added ttfb at p99 {added * 1000:.2f} ms  CPU per 1,000 requests {per_1000:.2f} s"
                print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cl-bench-proxy-") as tmp:
        port_file = Path(tmp) / "upstream.port"
        processes = [subprocess.Popen([sys.executable, str(HERE / "upstream.py"), str(port_file), "walled"])]
        try:
            while not port_file.exists():
                time.sleep(0.01)
            upstream = f"http://127.0.0.1:{port_file.read_text()}"
            relays = {}
            for name, code in (("aiohttp", AIOHTTP_RELAY), ("httpx", HTTPX_RELAY)):
                address = free_address()
                processes.append(subprocess.Popen([sys.executable, "-c", code, address, upstream]))
                relays[name] = (f"http://{address}", processes[-1].pid)
            time.sleep(2)  # both relays listening
            asyncio.run(compare(upstream, relays, args.rounds))
        finally:
            for process in processes:
                process.terminate()
                process.wait(10)


if __name__ == "__main__":
    main()
