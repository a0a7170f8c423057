"""Processes we do not necessarily own: recognise them across restarts and learn when they end.

A pid alone can be reused; a pid with its start time (field 22 of /proc/<pid>/stat) cannot.
A pidfd becomes readable when its process exits, child or not, so a restarted balancer can
wait on workers its predecessor launched, without polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable
from pathlib import Path

from cl.credentials import CANNOT_LOOK

POLL_INTERVAL = 1.0
"""Seconds between looks at a process watched without a pidfd."""


def _poll(pid: int, callback: Callable[[], None]) -> None:
    """Look every `POLL_INTERVAL` with signal 0, which needs no descriptor."""

    def look() -> None:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reap it if it was our child
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            callback()
            return
        except PermissionError:
            pass  # there, and not ours to signal
        loop.call_later(POLL_INTERVAL, look)

    loop = asyncio.get_running_loop()
    loop.call_later(POLL_INTERVAL, look)


def _stat(pid: int) -> list[str]:
    """/proc/<pid>/stat's fields after the command name (which may hold spaces and parentheses):
    [0] the state, [19] the start time. Raises OSError as the read does."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def start_time(pid: int) -> str | None:
    try:
        return _stat(pid)[19]
    except OSError:
        return None


def alive(pid: int, started: str | None) -> bool:
    """True if `pid` is still the process that started at `started` (and not a zombie). When this
    process cannot look (no descriptor to spare), the answer is yes: a worker taken for gone would
    have its session run a second time."""
    try:
        fields = _stat(pid)
    except OSError as exc:
        return exc.errno in CANNOT_LOOK
    return fields[0] != "Z" and fields[19] == started


def send_signal(pid: int, started: str | None, signum: int) -> bool:
    """Signal `pid` if it is still the process that started at `started`: through a pidfd opened
    before the check, so a pid reused meanwhile is never signalled. False if it is gone."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:  # gone, or this process is short of descriptors: not signalled either way
        return False
    try:
        if not alive(pid, started):
            return False
        signal.pidfd_send_signal(fd, signum)
    except ProcessLookupError:
        return False
    finally:
        os.close(fd)
    return True


def on_exit(pid: int, callback: Callable[[], None]) -> bool:
    """Call `callback` on the running loop once `pid` has exited. False if it is already gone.
    Without a descriptor to spare for a pidfd, it looks every `POLL_INTERVAL` instead."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    except OSError:  # EMFILE, ENFILE, ENOMEM: this process is short of something, the worker is not
        _poll(pid, callback)
        return True
    loop = asyncio.get_running_loop()

    def exited() -> None:
        loop.remove_reader(fd)
        os.close(fd)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reap it if it was our child
        callback()

    loop.add_reader(fd, exited)
    return True
