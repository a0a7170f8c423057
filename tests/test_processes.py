"""Watching a process we may not own: its end is learned with a pidfd, or by looking when no
descriptor can be had for one; a process that cannot be looked at is not taken for gone."""

from __future__ import annotations

import asyncio
import os
import resource
import subprocess

from cl.processes import alive, on_exit


async def test_a_process_is_watched_even_without_a_descriptor_to_spare() -> None:
    child = subprocess.Popen(["sleep", "0.5"])  # noqa: ASYNC220 - not the loop's to manage, as a worker is not
    ended = asyncio.Event()
    taken: list[int] = []
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 8, limits[1]))
    try:
        try:
            while True:
                taken.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            pass  # pidfd_open has nothing left: EMFILE
        assert on_exit(child.pid, ended.set) is True
        assert alive(child.pid, "0") is True  # cannot look: never taken for gone (its session would run twice)
    finally:
        for fd in taken:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)
    await asyncio.wait_for(ended.wait(), timeout=20)
    child.wait()
