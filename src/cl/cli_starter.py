"""`cl-cli-starter`, what a `cl-cli@` unit runs: one CLI for the worker connected on its standard
input (`cl-cli.socket`, Accept=yes), started as `cl.cli_start` says, then waited for.

It takes one request from the workers' user only (the socket's owner, or root), for the pool
user the worker proves is its own (SCM_CREDENTIALS: the kernel lets a process without
CAP_SETUID name only its real, effective or saved uid, and a worker's saved uid is its job's
user), so a worker gets no other job's user through it. It checks the request against its own
configuration (a member of the pool; a config dir of the sessions dir, that member's own),
builds the view itself (`cl.cli_start.here`: the confinement is the starter's to impose, never
the worker's to ask for), answers with the CLI's pid and becomes the CLI's user with no
capability: it may signal what it started, nothing else. The CLI's exit status goes back to the
worker; when the worker is gone (its connection closed) it ends the CLI's process group, and
systemd all that is left of the unit. It starts a CLI on every job's critical path: under systemd
its connection is made by the worker's launcher before the worker itself starts (`cl.launcher`),
so what does not need the request (its logging, the view's probe) is done while the request is on
its way.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import selectors
import signal
import socket
import stat
import struct
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog

from cl import cli_user, logs, sandbox
from cl.cli_start import MAX_HOLDS, MAX_REQUEST, Launch, StartRefused, here
from cl.cli_user import CliUser, CliUserError
from cl.config import Config, ConfigError, load_config


def serve(conn: socket.socket, config: Config) -> int:
    """One CLI for the worker at the other end of `conn` (of the user the socket belongs to, or
    root): started, then waited for; the exit code of this process (0: it started)."""
    _pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    if uid not in (0, _owner(conn)):
        _log(config).error("cli start refused: not a worker", uid=uid)
        return 2
    fds: list[int] = []
    with contextlib.ExitStack() as stack:
        probe = _probe_ahead(config, stack)
        log = _log(config)  # while the request is on its way: the CLI's own start then has the CPU
        try:
            data, fds, sender, flags = _receive(conn)
            if not data and not fds:
                return 0  # the worker ended before it had a CLI to start (a run not its own, a refusal)
            launch, streams = _request(config, data, fds, flags, sender)
            process = here(config, launch, streams, probe)
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


def _probe_ahead(config: Config, stack: contextlib.ExitStack) -> sandbox.Probe | None:
    """The view's probe, started while the worker's request is on its way (off the job's path), as
    the pool's first user: its users are alike, and the probe asks what any of them may build here.
    None where the CLI runs unsandboxed or that cannot start: the start then probes as its own user,
    and says what is wrong."""
    if config.confinement != "sandbox":
        return None
    try:
        first = CliUser.named(cli_user.members(config.cli_pool, config.cli_pool_size)[0])
        return stack.enter_context(sandbox.Probe(first.become))
    except (IndexError, CliUserError, sandbox.SandboxUnavailable, OSError, subprocess.SubprocessError):
        return None


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
    with contextlib.suppress(OSError):  # the worker gone: the next step finds out
        conn.send(json.dumps(message).encode())


def _log(config: Config) -> Any:
    """The starter's logger, set up at the first call."""
    if not structlog.is_configured():
        logs.configure_for(config, "cli-starter")
    return structlog.get_logger("cl.cli_starter")


def main() -> None:
    conn = socket.socket(fileno=os.dup(0))
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):  # the connection is the worker's, never the CLI's
        os.dup2(devnull, fd)
    os.close(devnull)
    try:
        config = load_config()
    except ConfigError as exc:
        print(f"cl-cli-starter: configuration error: {exc}", file=sys.stderr)
        sys.exit(2)
    sys.exit(serve(conn, config))


if __name__ == "__main__":
    main()
