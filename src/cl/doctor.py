"""What stands between cl and work, checked: `cl doctor`, and both daemons at start.

Each check gives a `Finding`: what it found, and if something is wrong the command or setting
that fixes it, and whether it blocks work. cl-balancer and cl-rescue run `environment` at start
(`Service.check`), and again every `RECHECK` seconds while something blocks: meanwhile they place
and move nothing, and queued jobs wait with the reason shown (`cl status`) rather than fail one
after another. `cl doctor` asks the
balancer for its findings (its environment is the one the CLI gets) and adds what is seen from
outside it: each daemon answering, the gateway, the store, the credentials directory.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
import select
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any, NamedTuple

from cl import sandbox
from cl.claude_code import TESTED_VERSIONS
from cl.claude_code.environment import passed
from cl.cli_user import can_switch_users, members
from cl.config import Config
from cl.credentials import account_name, credential_filename, near_miss
from cl.registry import CredentialRegistry

RECHECK = 30.0
"""Seconds between two checks while something blocks work."""
WELL_RECHECK = 600.0
"""Seconds between two checks while nothing does."""
VERSION_TIMEOUT = 10.0
"""Seconds `claude --version` may take (the real one answers in well under one)."""
ANSWER_BYTES = 4096
"""What of `claude --version`'s output is read at most."""
SYSUSERS = "systemd-sysusers /usr/lib/sysusers.d/cl.conf"
"""The command that makes cl's users and groups (`make install` puts the file there)."""


class Finding(NamedTuple):
    check: str
    ok: bool
    said: str
    fix: str | None = None
    blocks: bool = False
    """It stops work (a warning otherwise)."""

    def public(self) -> dict[str, Any]:
        return self._asdict()

    def told(self) -> str:
        """What was found, with the fix if there is one: `not found on PATH ... (fix: ...)`."""
        return self.said + (f" (fix: {self.fix})" if self.fix else "")

    def line(self) -> str:
        """`claude_bin: not found on PATH ... (fix: ...)`, as the logs and `cl status` say it."""
        return f"{self.check}: {self.told()}"


def environment(config: Config, *, workers_switch: bool) -> list[Finding]:
    """What the CLI needs to start: its binary, its version, its users, its view, cl's
    directories. `workers_switch`: this process starts the CLIs itself (not `cl-worker@` units)."""
    found = [*_claude_bin(config), *_users(config), *_directories(config)]
    if config.confinement == "sandbox" and workers_switch:
        found.append(_sandbox())
    return found


def whoami() -> str:
    """This process's user, by name if it has one."""
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def blocking(findings: Iterable[Finding]) -> Finding | None:
    """The first finding that stops work, if any."""
    return next((finding for finding in findings if finding.blocks), None)


def resolve(config: Config) -> Path | None:
    """`claude_bin` as the CLI is started: a path, or a name looked up on this process's PATH
    (the CLI's, which the worker passes on)."""
    if "/" in config.claude_bin:
        return Path(config.claude_bin)
    found = shutil.which(config.claude_bin, path=os.environ.get("PATH", os.defpath))
    return Path(found) if found else None


def runnable_by(path: Path, uid: int, gids: Iterable[int]) -> str | None:
    """Why user `uid` (with groups `gids`) cannot read and run `path`, or None if it can: every
    folder on the way searchable, the file readable and executable (a script is read by its
    interpreter), by the mode bits (an ACL is not read). Symlinks are followed as exec does."""
    groups = set(gids)
    real = path.resolve()
    steps = [*reversed(real.parents), real]
    for step in steps:
        try:
            st = os.stat(step)
        except OSError as exc:
            return f"{step}: {exc.strerror}"
        needed = stat.S_IXOTH if step != real else stat.S_IROTH | stat.S_IXOTH
        if uid == 0 and step != real:
            continue  # root searches any folder
        shift = 6 if st.st_uid == uid else 3 if st.st_gid in groups else 0
        if (st.st_mode >> shift) & needed != needed:
            what = "search" if step != real else "read and run"
            return f"{step} (mode {stat.filemode(st.st_mode)}, owner {st.st_uid}:{st.st_gid}) does not let it {what}"
    return None


def writable_by(path: Path, uid: int, gids: Iterable[int]) -> Path | None:
    """The first of `path` (resolved) and its folders that user `uid` may change, if any: the file,
    or a folder where it could put another file in its place (a sticky folder it does not own
    does not let it)."""
    groups = set(gids)
    real = path.resolve()
    for step in [*reversed(real.parents), real]:
        st = os.stat(step)
        shift = 6 if st.st_uid == uid else 3 if st.st_gid in groups else 0
        sticky = stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX and st.st_uid != uid
        if (st.st_mode >> shift) & stat.S_IWOTH and not sticky:
            return step
    return None


def _claude_bin(config: Config) -> list[Finding]:
    where = resolve(config)
    install = "install Claude Code where the CLI's users can run it (npm install -g @anthropic-ai/claude-code)"
    if where is None:
        path = os.environ.get("PATH", os.defpath)
        fix = f'{install}, or set claude_bin = "/path/to/claude" in {config.config_file}'
        return [Finding("claude_bin", False, f"{config.claude_bin!r} is not found on PATH {path}", fix, True)]
    users = _cli_users(config)
    for name, uid, gids in users:
        if (why := runnable_by(where, uid, gids)) is not None:
            fix = f"{install}, or chmod o+rx along its path"
            return [Finding("claude_bin", False, f"{where}: {name} cannot run it: {why}", fix, True)]
        if config.confinement == "sandbox" and (mine := writable_by(where, uid, gids)) is not None:
            fix = f"chown root: {mine} && chmod go-w {mine}"
            said = f"{where}: {name} may change {mine}: a job could replace the CLI every job runs"
            return [Finding("claude_bin", False, said, fix, True)]
    if config.confinement == "sandbox" and not _in_view(where.resolve(), config):
        fix = f"{install} under /usr/local or /opt, or add its folder to cli_readable in {config.config_file}"
        return [Finding("claude_bin", False, f"{where.resolve()} is outside what a job's view shows", fix, True)]
    found = [Finding("claude_bin", True, f"{where}, runnable by {', '.join(n for n, *_ in users) or 'the CLI'}")]
    return [*found, _version(where, config)]


def _in_view(path: Path, config: Config) -> bool:
    shown = [*sandbox.SYSTEM, *config.cli_readable, *config.cli_writable]
    return any(path.is_relative_to(Path(place).resolve()) for place in shown)


def _cli_users(config: Config) -> list[tuple[str, int, list[int]]]:
    """The users the CLI runs as (those that exist): the pool's first and last, or this
    process's own user with `confinement = "none"`."""
    if config.confinement == "none":
        return [(whoami(), os.getuid(), [*os.getgroups(), os.getgid()])]
    names = members(config.cli_pool, config.cli_pool_size)
    users = []
    for name in dict.fromkeys((names[0], names[-1])):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        gids = [entry.pw_gid, *(g.gr_gid for g in grp.getgrall() if name in g.gr_mem)]
        users.append((name, entry.pw_uid, gids))
    return users


def _version(where: Path, config: Config) -> Finding:
    """`claude --version`, run as the CLI's user where this process may switch users (the binary
    is the CLI's: it runs with no more than the CLI's rights), from `/`, with nothing on stdin.
    Only a binary that cannot be started blocks work; an answer without a version is a warning."""
    users = _cli_users(config) if config.confinement == "sandbox" and can_switch_users() else []
    _name, uid, gids = users[0] if users else ("", None, [None])
    try:
        process = subprocess.Popen(
            [str(where), "--version"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd="/",
            env={**{k: v for k, v in os.environ.items() if passed(k, config.cli_env_keep)}, "HOME": "/nonexistent"},
            start_new_session=True,
            user=uid,
            group=gids[0],
            extra_groups=[] if users else None,
        )
    except OSError as exc:
        fix = "reinstall Claude Code"
        return Finding("claude version", False, f"{where} cannot be started: {exc.strerror}", fix, True)
    assert process.stdout is not None
    with process.stdout:
        try:
            said = _answer(process, process.stdout, time.monotonic() + VERSION_TIMEOUT)
        finally:  # whatever it started ends with it
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    if said is None:
        return Finding("claude version", False, f"{where} --version did not answer in {VERSION_TIMEOUT:g} s")
    match = re.match(r"\s*(\d+\.\d+\.\d+)", said)
    if process.returncode != 0 or match is None:
        tail = said.strip().splitlines()[-1:] or ["no output"]
        why = f"{where} --version said no version (exit {process.returncode}): {tail[0][:200]}"
        return Finding("claude version", False, why)
    version = match.group(1)
    if version not in TESTED_VERSIONS:
        tested = ", ".join(TESTED_VERSIONS)
        fix = f"install a tested one (npm install -g @anthropic-ai/claude-code@{TESTED_VERSIONS[0]})"
        return Finding("claude version", False, f"{version} is not a version cl was tested with ({tested})", fix)
    return Finding("claude version", True, f"{version}, tested")


def _answer(process: subprocess.Popen[bytes], output: IO[bytes], deadline: float) -> str | None:
    """What `process` printed (its first `ANSWER_BYTES`) by the time it exited, or None if it
    had not exited by `deadline`. Its end, not the end of its output, ends the wait: a child it
    leaves may hold the pipe open."""
    said = b""
    while process.poll() is None or select.select([output], [], [], 0)[0]:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        if select.select([output], [], [], min(remaining, 0.05))[0]:
            chunk = os.read(output.fileno(), 4096)
            if not chunk and process.poll() is not None:
                break
            said = (said + chunk)[:ANSWER_BYTES]
    return said.decode(errors="replace")


def _users(config: Config) -> list[Finding]:
    if config.confinement == "none":
        return [Finding("users", True, "confinement = none: the CLI runs as the worker's own user")]
    missing = [name for name in members(config.cli_pool, config.cli_pool_size) if not exists(pwd.getpwnam, name)]
    missing += [f"group {group}" for group in (config.cli_pool, config.admin_group) if not exists(grp.getgrnam, group)]
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        return [Finding("users", False, f"missing: {shown}", SYSUSERS, True)]
    return [Finding("users", True, f"{config.cli_pool}-1..{config.cli_pool_size} and their groups exist")]


def exists(lookup: Callable[[str], object], name: str) -> bool:
    """`exists(pwd.getpwnam, "cl-cli-1")`: the user (or with `grp.getgrnam`, the group) is there."""
    try:
        lookup(name)
    except KeyError:
        return False
    return True


def _sandbox() -> Finding:
    if not can_switch_users():
        fix = "run the daemons as root (the units do), or set confinement = 'none'"
        return Finding("sandbox", False, "this process cannot switch users", fix, True)
    try:
        sandbox.bwrap()
        sandbox.probe()
    except sandbox.SandboxUnavailable as exc:
        return Finding(
            "sandbox", False, str(exc), "apt install bubblewrap; sysctl kernel.unprivileged_userns_clone=1", True
        )
    return Finding("sandbox", True, "bubblewrap builds a view here")


def _directories(config: Config) -> list[Finding]:
    """cl's directories: there (the state, runtime and sessions ones are made at start, so only
    their parents must be) and writable by nobody but their owner where a stranger's write would
    matter: anyone who can write the credentials directory adds accounts."""
    found = []
    for key in ("credentials_dir", "state_dir"):
        path: Path = getattr(config, key)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            if key == "credentials_dir":
                fix = f"mkdir -m 0700 {path}"
                found.append(Finding("directories", False, f"{key} {path} does not exist", fix, True))
            continue
        except OSError as exc:
            found.append(Finding("directories", False, f"{key} {path}: {exc.strerror}", None, True))
            continue
        if not stat.S_ISDIR(st.st_mode):
            found.append(Finding("directories", False, f"{key} {path} is not a directory", None, True))
        elif st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            fix = f"chmod go-w {path}"
            mode = stat.filemode(st.st_mode)
            found.append(Finding("directories", False, f"{key} {path} is writable by others ({mode})", fix, True))
    return found or [
        Finding("directories", True, "credentials_dir and state_dir are there, writable by their owner only")
    ]


def roster(registry: CredentialRegistry) -> list[Finding]:
    """How many accounts the registry has, and each file it had to skip, with why."""
    accounts = registry.accounts
    usable = registry.usable_count
    found = [
        Finding(
            "credentials",
            usable > 0,
            f"{len(accounts)} account(s), {usable} usable, in {registry.directory}",
            None if usable else f"drop a credential file in: {registry.directory}/credentials-NAME.json",
            usable == 0,
        )
    ]
    for name in registry.sorted_names():
        if not accounts[name].usable:
            why = f"{credential_filename(name)}: {accounts[name].state}: {accounts[name].reason or 'not usable'}"
            found.append(Finding("credentials", False, why))
    return [*found, *ignored(registry.directory)]


def ignored(directory: Path) -> list[Finding]:
    """Every file in the credentials directory that is not an account, and why."""
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []  # said by `environment`
    except OSError as exc:
        return [Finding("credentials", False, f"{directory}: {exc.strerror}: its files not looked at")]
    ignored = []
    for name in names:
        better = near_miss(name)
        if account_name(name) is not None or (name.startswith(".") and better is None):
            continue  # an account, or a hidden file nobody meant as one (an editor's)
        why = f"not a credential file's name: call it {better}" if better else "not named credentials-NAME.json"
        ignored.append(Finding("credentials", False, f"{name} ignored: {why}"))
    return ignored


def gateway_port(config: Config) -> Finding:
    """The gateway's address for the CLIs (`gateway_listen`) takes connections."""
    host, _, port = config.gateway_listen.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        fix = "systemctl start cl-gateway"
        return Finding("gateway", False, f"{config.gateway_listen} takes no connection: {exc}", fix, True)
    return Finding("gateway", True, f"{config.gateway_listen} takes connections")
