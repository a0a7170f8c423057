"""A fast stand-in for the API, for `bench/gateway.py`: `python bench/upstream.py PORT_FILE WALLED`.

`POST /v1/messages` streams `x-bench-chunks` SSE events (default 8), `x-bench-gap-ms` apart
(default 0), each carrying the moment it was sent (`time.monotonic()`, one clock for every
process here), with the unified rate-limit headers of an allowed request. A request whose
bearer token is WALLED gets the 429 of a usage wall instead. It listens on 127.0.0.1 (an
ephemeral port, written to PORT_FILE).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

from aiohttp import web

ALLOWED = {
    "anthropic-ratelimit-unified-status": "allowed",
    "anthropic-ratelimit-unified-5h-utilization": "0.1",
    "anthropic-ratelimit-unified-7d-utilization": "0.05",
    "anthropic-ratelimit-unified-representative-claim": "five_hour",
}


def main() -> None:
    port_file, walled = Path(sys.argv[1]), sys.argv[2]

    async def messages(request: web.Request) -> web.StreamResponse:
        await request.read()
        if request.headers.get("authorization") == f"Bearer {walled}":
            reset = str(int(time.time()) + 3600)
            headers = {
                "anthropic-ratelimit-unified-status": "rejected",
                "anthropic-ratelimit-unified-reset": reset,
                "anthropic-ratelimit-unified-representative-claim": "five_hour",
                "retry-after": "3600",
            }
            body = {"type": "error", "error": {"type": "rate_limit_error", "message": "wall"}}
            return web.json_response(body, status=429, headers=headers)
        chunks = int(request.headers.get("x-bench-chunks", "8"))
        gap = float(request.headers.get("x-bench-gap-ms", "0")) / 1000
        response = web.StreamResponse(headers={"content-type": "text/event-stream", **ALLOWED})
        await response.prepare(request)
        for i in range(chunks):
            if i and gap:
                await asyncio.sleep(gap)
            await response.write(f"event: e\ndata: {json.dumps({'t': time.monotonic(), 'i': i})}\n\n".encode())
        await response.write_eof()
        return response

    async def serve() -> None:
        app = web.Application()
        app.router.add_post("/v1/messages", messages)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        port_file.with_suffix(".tmp").write_text(str(port))
        port_file.with_suffix(".tmp").replace(port_file)
        await asyncio.Event().wait()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
