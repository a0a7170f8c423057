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
  connection starts a `cl-cli@` unit running `serve`: user cl with CAP_SETUID and CAP_SETGID, the
  namespaces and the network the CLI needs, and nothing else. This is OpenSSH's privilege
  separation: the small part that holds privileges does one thing and keeps none once it is done.
  It takes one request (`Launch`: the pool user, the job's directory and config dir as descriptors
  the worker opened and checked, and their paths, the command and its environment, the CLI's
  standard streams, the pool member's holds) from the workers' user only, and for the user the
  worker proves is its own (SCM_CREDENTIALS: the kernel lets a process without CAP_SETUID name
  only its real, effective or saved uid, and a worker's saved uid is its job's user): a worker
  gets no other job's user through it. It checks the request against its own configuration (a
  member of the pool; a config dir of the sessions dir, that member's own), builds the view
  itself (the confinement is the starter's to impose, never the worker's to ask for), starts it,
  answers with its pid, drops every capability and waits. The CLI's exit status goes back to the
  worker. When the worker is gone (the connection closed), the starter exits, and systemd ends all
  that is left of the unit. The worker signals its CLI itself: it may become the pool user.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import dataclasses
import json
import os
import resource
import selectors
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Protocol

import structlog

from cl import cli_user, logs, sandbox, workdir
from cl.cli_user import CliUser, CliUserError
from cl.config import Config

log = structlog.get_logger("cl.cli_start")

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


def start(config: Config, launch: Launch) -> Process:
    """The CLI started the configured way. Raises StartRefused, OSError or SubprocessError."""
    if config.cli_starter is not None and config.confinement == "sandbox":
        return by_starter(config.cli_starter, launch)
    return here(config, launch)


def here(config: Config, launch: Launch, streams: Sequence[int] = ()) -> subprocess.Popen[bytes]:
    """The CLI as a child of this process, on pipes (or on `streams`: its stdin, stdout, stderr)."""
    sandboxed = config.confinement == "sandbox"
    command, opened = _confined(config, launch) if sandboxed else (list(launch.command), [])
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


def _confined(config: Config, launch: Launch) -> tuple[list[str], list[int]]:
    """The command in the job's view, and the descriptors opened for it (to close once it has
    started). Raises StartRefused where the configured confinement cannot hold."""
    try:
        sandbox.check_network(config.cli_network)
        own_proc = sandbox.probe(launch.cli.become)
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


def by_starter(path: Path, launch: Launch) -> Started:
    """The CLI started by a `cl-cli@` unit (its socket at `path`), on pipes to this process."""
    pipes = [os.pipe() for _ in range(3)]
    theirs = [pipes[0][0], pipes[1][1], pipes[2][1]]
    ours = [pipes[0][1], pipes[1][0], pipes[2][0]]
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    request = {
        "user": launch.cli.name,
        "cwd": launch.cwd[1],
        "config_dir": launch.config_dir[1],
        "command": list(launch.command),
        "env": dict(launch.env),
    }
    try:
        conn.settimeout(START_TIMEOUT)
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


# The starter: cl-cli@.


def serve(conn: socket.socket, config: Config) -> int:
    """One CLI for the worker at the other end of `conn` (of the user the socket belongs to, or
    root): started, then waited for; the exit code of this process (0: it started)."""
    _pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    if uid not in (0, _owner(conn)):
        log.error("cli start refused: not a worker", uid=uid)
        return 2
    fds: list[int] = []
    try:
        data, fds, sender, flags = _receive(conn)
        launch, streams = _request(config, data, fds, flags, sender)
        process = here(config, launch, streams)
    except (StartRefused, CliUserError, OSError, ValueError, subprocess.SubprocessError) as exc:
        said = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        log.error("cli not started", error=said)
        _send(conn, {"error": said})
        return 1
    finally:
        for fd in fds:
            os.close(fd)
    _send(conn, {"pid": process.pid})
    log.info("cli started", pid=process.pid, user=launch.cli.name, config_dir=launch.config_dir[1])
    launch.cli.become()  # from now on its job's user, no capability: it may signal what it started, nothing else
    if (code := _until_exit(conn, process)) is None:
        log.warning("worker gone, ending its cli", pid=process.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # bwrap leads its group: its view and all in it end with it
        return 0
    _send(conn, {"exit": code})
    log.info("cli exited", pid=process.pid, code=code)
    return 0


def _receive(conn: socket.socket) -> tuple[bytes, list[int], int | None, int]:
    """One request: its bytes, its descriptors, the uid its sender proved (SCM_CREDENTIALS: the
    kernel takes only one of the sender's own real, effective or saved uids, unless it may switch
    users at will) and the message's flags."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    room = socket.CMSG_SPACE(struct.calcsize("3i")) + socket.CMSG_SPACE((5 + MAX_HOLDS) * 4)
    data, ancillary, flags, _ = conn.recvmsg(MAX_REQUEST, room)
    fds, sender = array.array("i"), None
    for level, kind, payload in ancillary:
        if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        elif (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS):
            sender = struct.unpack("3i", payload)[1]
    return data, list(fds), sender, flags


def _owner(conn: socket.socket) -> int | None:
    """The owner of the socket `conn` came in on (the user its workers run as), if it has a path."""
    name = conn.getsockname()
    try:
        return os.stat(name).st_uid if isinstance(name, str) and name.startswith("/") else None
    except OSError:
        return None


def _request(
    config: Config, data: bytes, fds: Sequence[int], flags: int, sender: int | None
) -> tuple[Launch, list[int]]:
    """The launch a request asks for, checked against this host's configuration and the uid its
    sender proved, and the CLI's standard streams. Raises StartRefused (or CliUserError) with what
    is wrong with it."""
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        raise StartRefused(f"a request is {MAX_REQUEST} bytes and {5 + MAX_HOLDS} descriptors at most")
    if not 5 <= len(fds) <= 5 + MAX_HOLDS:
        raise StartRefused("a request carries the CLI's 3 streams, its directory, its config dir and its holds")
    user, cwd, config_dir, command, env = _fields(data)
    if user not in cli_user.members(config.cli_pool, config.cli_pool_size):
        raise StartRefused(f"{user!r} is not a user of the CLI's pool ({config.cli_pool}, {config.cli_pool_size})")
    cli = CliUser.named(user)
    if sender != cli.uid:  # a worker has its job's user as its saved uid (`cli_user.keep_only`), none other
        raise StartRefused(f"a CLI starts as its worker's own user only: {user} asked for by uid {sender}")
    if Path(config_dir).parent != config.sessions_dir:
        raise StartRefused(f"{config_dir}: not a config dir of {config.sessions_dir}")
    given, there = os.fstat(fds[4]), os.lstat(config_dir)
    if not stat.S_ISDIR(given.st_mode) or (given.st_dev, given.st_ino) != (there.st_dev, there.st_ino):
        raise StartRefused(f"{config_dir}: not the directory the request carries")
    if given.st_uid != cli.uid:
        raise StartRefused(f"{config_dir}: not {user}'s own")
    if not stat.S_ISDIR(os.fstat(fds[3]).st_mode):
        raise StartRefused(f"{cwd}: not a directory")
    launch = Launch(command, env, cli, (fds[3], cwd), (fds[4], config_dir), tuple(fds[5:]))
    return launch, list(fds[:3])


def _fields(data: bytes) -> tuple[str, str, str, list[str], dict[str, str]]:
    """A request's user, directory, config dir, command and environment, each of the right type."""
    try:
        request = json.loads(data)
    except ValueError:
        request = None
    if not isinstance(request, dict):
        raise StartRefused("a request is one JSON object")
    user, cwd, config_dir = (request.get(key) for key in ("user", "cwd", "config_dir"))
    command, env = request.get("command"), request.get("env")
    if not (isinstance(command, list) and command and all(isinstance(arg, str) for arg in command)):
        raise StartRefused('"command" must be a list of strings')
    if not (isinstance(env, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())):
        raise StartRefused('"env" must map names to strings')
    if not (isinstance(user, str) and isinstance(cwd, str) and isinstance(config_dir, str)):
        raise StartRefused('"user", "cwd" and "config_dir" must be strings')
    if not (cwd.startswith("/") and config_dir.startswith("/")):
        raise StartRefused('"cwd" and "config_dir" must be absolute paths')
    return user, cwd, config_dir, command, env


def _until_exit(conn: socket.socket, process: subprocess.Popen[bytes]) -> int | None:
    """The CLI's exit code once it exits; None if the worker went first (or spoke out of turn)."""
    pidfd = os.pidfd_open(process.pid)
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(pidfd, selectors.EVENT_READ)
            selector.register(conn, selectors.EVENT_READ)
            ready = {key.fd for key, _ in selector.select()}
    finally:
        os.close(pidfd)
    return process.wait() if pidfd in ready else None


def _send(conn: socket.socket, message: dict[str, Any]) -> None:
    try:
        conn.send(json.dumps(message).encode())
    except OSError as exc:
        log.warning("worker gone", error=exc.strerror)


def main() -> None:
    """`cl-cli-starter`: one CLI for the worker connected on standard input (`cl-cli@`, Accept=yes)."""
    conn = socket.socket(fileno=os.dup(0))
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):  # the connection is the worker's, never the CLI's
        os.dup2(devnull, fd)
    os.close(devnull)
    if (config := logs.start_process("cli-starter")) is None:
        sys.exit(2)
    sys.exit(serve(conn, config))


if __name__ == "__main__":
    main()
