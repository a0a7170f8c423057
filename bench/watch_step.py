"""One row of the step sweep, in a fresh process: `watch_step.py WATCHER SAMPLES IDLE_SECONDS`.

WATCHER is a watchfiles `step` in ms (a CredentialRegistry with that step) or `inotify`
(raw inotify through ctypes on the event loop: the floor). Prints one JSON object.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

from cl import logs
from cl.registry import CredentialRegistry

CREDENTIAL = '{"claudeAiOauth": {"accessToken": "bench-token-0123456789", "expiresAt": 4102444800000}}'
IN_CLOSE_WRITE, IN_MOVED_TO, IN_CREATE = 0x8, 0x80, 0x100


def drop(directory: Path, name: str) -> float:
    tmp = directory / f".{name}.tmp"
    tmp.write_text(CREDENTIAL)
    tmp.replace(directory / f"credentials-{name}.json")
    return time.perf_counter()


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def registry_row(directory: Path, step: int, samples: int, idle: float) -> tuple[list[float], float]:
    registry = CredentialRegistry(directory, step_ms=step)
    await registry.start()
    subscription = registry.subscribe()
    latencies = []
    for i in range(samples):
        landed = drop(directory, f"n{i}")
        await anext(subscription)
        latencies.append(time.perf_counter() - landed)
        await asyncio.sleep(0.02)
    before = cpu()
    await asyncio.sleep(idle)
    used = cpu() - before
    await registry.stop()
    return latencies, used


async def inotify_row(directory: Path, samples: int, idle: float) -> tuple[list[float], float]:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    libc.inotify_add_watch(fd, str(directory).encode(), IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE)
    loop = asyncio.get_running_loop()
    arrived: asyncio.Queue[float] = asyncio.Queue()

    def readable() -> None:
        os.read(fd, 65536)
        arrived.put_nowait(time.perf_counter())

    loop.add_reader(fd, readable)
    latencies = []
    for i in range(samples):
        landed = drop(directory, f"n{i}")
        while (seen := await arrived.get()) < landed:
            pass
        latencies.append(seen - landed)
        await asyncio.sleep(0.02)
    before = cpu()
    await asyncio.sleep(idle)
    used = cpu() - before
    loop.remove_reader(fd)
    os.close(fd)
    return latencies, used


def main() -> None:
    watcher, samples, idle = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    logs.configure("warning")  # stdout is for the one JSON row
    with tempfile.TemporaryDirectory(prefix="cl-step-") as tmp:
        if watcher == "inotify":
            latencies, used = asyncio.run(inotify_row(Path(tmp), samples, idle))
            label = "raw inotify"
        else:
            latencies, used = asyncio.run(registry_row(Path(tmp), int(watcher), samples, idle))
            label = f"step {watcher} ms"
    latencies.sort()
    print(
        json.dumps(
            {
                "watcher": label,
                "p50": latencies[len(latencies) // 2],
                "p99": latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))],
                "cpu": used / idle * 100,
            }
        )
    )


if __name__ == "__main__":
    main()
