"""The fork server: each request forks a worker; a server that died is replaced; it ends with its launcher."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from cl.forkserver import ForkServer
from utils import Layout, wait_until


def gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists()


def test_workers_are_forked_and_a_dead_server_is_replaced(
    layout: Layout, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in layout.env().items():  # the server's environment is its workers'
        monkeypatch.setenv(name, value)
    server = ForkServer()
    first = server.spawn(12345)  # no such run: the worker says so and exits
    wait_until(lambda: gone(first), "the first worker to exit")
    dead = server._process
    assert dead is not None
    os.kill(dead.pid, signal.SIGKILL)
    dead.wait()
    second = server.spawn(12346)
    wait_until(lambda: gone(second), "the second worker to exit")
    assert capfd.readouterr().err.count("no such run") == 2  # both ran the worker, in the new server too
    replacement = server._process
    assert replacement is not None
    assert replacement is not dead
    server.close()
    assert gone(replacement.pid)
