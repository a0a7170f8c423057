"""How a job's CLI starts: a child of its worker, or by `cl-cli@`, a unit of its own per CLI.

Either way the same thing starts: sandboxed, the command in the job's view (`cl.sandbox`) as the
job's pool user (`cl.cli_user`), with no capability and no way to gain one, under its user's
process limit, dying with its parent. And either way what the configuration promises is checked
first, where the CLI will run: its network narrowed as `cli_network` says, a view that can be
built (`sandbox.probe`). A confinement that does not hold is refused (`StartRefused`): the CLI
never runs with less.

* `here` (`make run`, the tests; `confinement = "none"`): the worker starts it itself.
* `by_starter` (a `cl-worker@` unit, `cli_starter` set): the worker may build no namespace, mount
  nothing and reach no network; it asks `cl-cli.socket` (Accept=yes, mode 0600, user cl), and each
  connection starts a `cl-cli@` unit running `cl.cli_starter`: user cl with CAP_SETUID and
  CAP_SETGID, the namespaces and the network the CLI needs, and nothing else. This is OpenSSH's
  privilege separation: the small part that holds privileges does one thing and keeps none once
  it is done. The worker sends the `Launch` (the pool user, the job's directory and config dir as
  descriptors it opened and checked, and their paths, the command and its environment, the CLI's
  standard streams, the pool member's holds), proving that user is its own (SCM_CREDENTIALS, its
  saved uid); the answer is the CLI's pid, then its exit status. The worker signals its CLI
  itself: it may become the pool user.
"""

from __future__ import annotations

import array
import ctypes
import dataclasses
import json
import os
import resource
import signal
import socket
import struct
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Protocol

from cl import sandbox, workdir
from cl.cli_user import CliUser
from cl.config import Config

PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
MAX_REQUEST = 256 * 1024
"""Bytes of a request to the starter, at most (the command and its environment)."""
MAX_HOLDS = 4
"""Holds (lock descriptors) the CLI may inherit, at most."""
START_TIMEOUT = 60.0
"""Seconds the starter has to answer (its view's probe is bounded by `sandbox.PROBE_TIMEOUT`)."""


class StartRefused(Exception):
    """The CLI did not start: its confinement cannot hold here, or the starter refused; the message says why."""


class Process(Protocol):
    """A started CLI, as the worker uses it: a `subprocess.Popen`'s part of it."""

    pid: int
    stdin: IO[bytes] | None
    stdout: IO[bytes] | None
    stderr: IO[bytes] | None

    @property
    def returncode(self) -> int | Any: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def poll(self) -> int | None: ...


@dataclasses.dataclass(frozen=True, slots=True)
class Launch:
    """One start of a job's CLI."""

    command: Sequence[str]
    env: Mapping[str, str]
    cli: CliUser
    cwd: tuple[int, str]
    """The job's directory: the descriptor the worker opened once (no symlink followed), its path."""
    config_dir: tuple[int, str]
    """The job's config dir: a descriptor opened as the CLI's user, its path."""
    holds: tuple[int, ...] = ()
    """The session's lock and the pool member's: the CLI and all it starts inherit them."""


def start(config: Config, launch: Launch, connected: socket.socket | None = None) -> Process:
    """The CLI started the configured way (`connected`: to its starter, by `connect`). Raises
    StartRefused, OSError or SubprocessError."""
    if (starter := config.starter_socket) is not None:
        return by_starter(starter, launch, connected)
    return here(config, launch)


def connect(config: Config, handed: socket.socket | None = None) -> socket.socket | None:
    """A connection to the CLI's starter, if one starts it, made ahead of the start: a `cl-cli@`
    unit's fresh interpreter gets ready while the worker readies its job. `handed`, if the worker's
    launcher made one for it (closed if none is needed). None if there is none (or it cannot be
    reached now: the start tries again, and says why it cannot)."""
    if (starter := config.starter_socket) is None:
        if handed is not None:
            handed.close()
        return None
    if handed is not None:
        handed.settimeout(START_TIMEOUT)
        return handed
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        conn.settimeout(START_TIMEOUT)
        conn.connect(str(starter))
    except OSError:
        conn.close()
        return None
    return conn


def here(
    config: Config, launch: Launch, streams: Sequence[int] = (), probe: sandbox.Probe | None = None
) -> subprocess.Popen[bytes]:
    """The CLI as a child of this process, on pipes (or on `streams`: its stdin, stdout, stderr).
    `probe`: the view's, started ahead (else it is made now, as the CLI's user)."""
    sandboxed = config.confinement == "sandbox"
    command, opened = _confined(config, launch, probe) if sandboxed else (list(launch.command), [])
    stdin, stdout, stderr = streams or (subprocess.PIPE,) * 3
    try:
        return subprocess.Popen(
            command,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            env=dict(launch.env),
            pass_fds=(*launch.holds, launch.cwd[0], launch.config_dir[0], *opened),
            start_new_session=True,  # a process group of its own, ended with it
            preexec_fn=_preexec(launch.cli, launch.cwd[0], config),  # noqa: PLW1509 - syscalls only
        )
    finally:
        for fd in opened:
            os.close(fd)


def _confined(config: Config, launch: Launch, probe: sandbox.Probe | None) -> tuple[list[str], list[int]]:
    """The command in the job's view, and the descriptors opened for it (to close once it has
    started). Raises StartRefused where the configured confinement cannot hold."""
    try:
        sandbox.check_network(config.cli_network)
        own_proc = probe.own_proc() if probe else sandbox.probe(launch.cli.become)
    except sandbox.SandboxUnavailable as exc:
        raise StartRefused(str(exc)) from None
    gateway_dir = None
    if config.cli_network == "gateway":  # opened with our own right, not the CLI's user's
        gateway_dir = os.open(config.gateway_socket.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    view = sandbox.View(
        launch.cwd,
        launch.config_dir,
        [str(path) for path in workdir.private_dirs(config).values()],
        config.cli_readable,
        config.cli_writable,
        own_proc=own_proc,
        gateway_only=gateway_dir,
        gateway_socket=config.gateway_socket.name,
    )
    command = sandbox.argv(view, launch.command, config.gateway_listen)
    return command, [] if gateway_dir is None else [gateway_dir]


def _preexec(cli: CliUser, cwd: int, config: Config) -> Callable[[], None]:
    """Between fork and exec of the CLI: unconfined, its job's directory; sandboxed (bwrap then
    enters the directory itself), the process limit of its pool user. Then the CLI's own user
    with no capabilities and no way to gain any, and death with its parent (set last: a change of
    user clears it, and so would an exec that gains privileges)."""
    parent = os.getpid()
    sandboxed = config.confinement == "sandbox"
    hard = resource.getrlimit(resource.RLIMIT_NPROC)[1]  # no lower limit is ever raised: that takes a capability
    processes = config.cli_processes_max if hard == resource.RLIM_INFINITY else min(config.cli_processes_max, hard)

    def preexec() -> None:
        if sandboxed:
            resource.setrlimit(resource.RLIMIT_NPROC, (processes, processes))
        else:
            os.fchdir(cwd)
        cli.become()
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)  # its exec gains nothing (root's would regain every capability)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before PDEATHSIG was set
            os._exit(1)

    return preexec


# The worker's side of cl-cli@.


def by_starter(path: Path, launch: Launch, connected: socket.socket | None = None) -> Started:
    """The CLI started by a `cl-cli@` unit (its socket at `path`, or `connected` to it already),
    on pipes to this process."""
    pipes = [os.pipe() for _ in range(3)]
    theirs = [pipes[0][0], pipes[1][1], pipes[2][1]]
    ours = [pipes[0][1], pipes[1][0], pipes[2][0]]
    conn = connected or socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    request = {
        "user": launch.cli.name,
        "cwd": launch.cwd[1],
        "config_dir": launch.config_dir[1],
        "command": list(launch.command),
        "env": dict(launch.env),
    }
    try:
        conn.settimeout(START_TIMEOUT)
        if connected is None:
            conn.connect(str(path))
        fds = [*theirs, launch.cwd[0], launch.config_dir[0], *launch.holds]
        as_member = struct.pack("3i", os.getpid(), launch.cli.uid, launch.cli.gid)  # our saved ids: the kernel checks
        ancillary = [
            (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes()),
            (socket.SOL_SOCKET, socket.SCM_CREDENTIALS, as_member),
        ]
        conn.sendmsg([json.dumps(request).encode()], ancillary)
        reply = _message(conn)
    except OSError as exc:
        reply = {"error": f"the CLI's starter at {path} did not answer: {exc.strerror or exc}"}
    finally:
        for fd in theirs:
            os.close(fd)
    if not isinstance(pid := reply.get("pid"), int):
        conn.close()
        for fd in ours:
            os.close(fd)
        raise StartRefused(str(reply.get("error") or "the CLI's starter ended without an answer"))
    return Started(pid, conn, ours)


class Started:
    """A CLI that `cl-cli@` started: its pid, the worker's ends of its standard streams, its exit
    status once the starter says it (or the starter's end: then as killed). The connection stays
    open while the CLI may run: closed (this process gone), the starter ends the CLI."""

    def __init__(self, pid: int, conn: socket.socket, streams: Sequence[int]) -> None:
        self.pid = pid
        self.stdin: IO[bytes] | None = os.fdopen(streams[0], "wb")
        self.stdout: IO[bytes] | None = os.fdopen(streams[1], "rb")
        self.stderr: IO[bytes] | None = os.fdopen(streams[2], "rb")
        self.returncode: int | None = None
        self._conn = conn
        self._exited = threading.Event()
        threading.Thread(target=self._await_exit, daemon=True).start()

    def wait(self, timeout: float | None = None) -> int:
        if not self._exited.wait(timeout):
            raise subprocess.TimeoutExpired("cl-cli@", timeout or 0.0)
        assert self.returncode is not None
        return self.returncode

    def poll(self) -> int | None:
        return self.returncode if self._exited.is_set() else None

    def _await_exit(self) -> None:
        self._conn.settimeout(None)
        try:
            code = _message(self._conn).get("exit")
        except OSError:
            code = None
        self.returncode = code if isinstance(code, int) and not isinstance(code, bool) else -signal.SIGKILL
        self._conn.close()
        self._exited.set()


def _message(conn: socket.socket) -> dict[str, Any]:
    """One message from `conn`, a JSON object ({} at the end of the connection or for anything else)."""
    data = conn.recv(MAX_REQUEST)
    try:
        message = json.loads(data) if data else {}
    except ValueError:
        return {}
    return message if isinstance(message, dict) else {}
