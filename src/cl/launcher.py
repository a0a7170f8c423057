"""How a daemon starts a worker for a run: one interface, two ways.

A launch names a run and nothing else: the worker reads everything it needs (the job, the
account, the configuration) from the store, the roster directory and its own configuration, so
whoever can reach the launch channel can at most start a run the store holds as `starting`.

Under systemd, `cl-worker.socket` listens at `worker.sock` (Accept=yes, mode 0600, user cl):
a connection makes systemd start a `cl-worker@` unit with its own sandbox (network, write
access, the right to run the CLI as its own user), which reads `{"run"}` and answers `{"pid"}`.
When a `cl-cli@` unit will start the CLI (`cli_starter`), the launcher connects to it first and
hands the worker that connection with the run: the starter's interpreter gets ready while the
worker's does, not after.
Without it (tests, `make run`) the fork server forks the worker, in a session of its own.
Either way the launcher learns of its end through a pidfd.
"""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Iterator
from pathlib import Path

from cl.config import Config
from cl.forkserver import ForkServer

FORK_SERVER = ForkServer()


def launch(run_id: int, socket_path: Path, starter: Path | None = None) -> int:
    """Start a worker for `run_id` that outlives the launcher; its pid. Under systemd the worker
    is handed a connection to its CLI's `starter`, if one starts it."""
    if socket_path.is_socket():
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock, _connected(starter) as handed:
            sock.settimeout(30)
            sock.connect(str(socket_path))
            request = json.dumps({"run": run_id}).encode() + b"\n"
            sent = socket.send_fds(sock, [request], [handed.fileno()]) if handed else 0
            sock.sendall(request[sent:])
            reply = sock.makefile("rb").readline()
        return int(json.loads(reply)["pid"])
    return FORK_SERVER.spawn(run_id)


@contextlib.contextmanager
def _connected(starter: Path | None) -> Iterator[socket.socket | None]:
    """A connection to `starter` for the worker to take (ours closed once it is handed on); None
    if there is no starter or it does not take one now: the worker then connects itself."""
    if starter is None:
        yield None
        return
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK)
    with conn:
        try:
            conn.connect(str(starter))  # never waits: a starter unit that takes no more is no reason to
        except OSError:
            yield None
        else:
            conn.setblocking(True)  # the worker's copy shares the flag
            yield conn


def prepare_launches(socket_path: Path) -> None:
    """Have the fork server imported before the first launch needs it (no-op under systemd)."""
    if not socket_path.is_socket():
        FORK_SERVER.start()


def stop_launches() -> None:
    """At shutdown: end the fork server, if one runs (the workers it forked live on)."""
    FORK_SERVER.close()


def under_socket_activation(config: Config) -> bool:
    return config.socket_path("worker").is_socket()
