"""Who the Claude Code CLI runs as: a user of its own for each live job, never the worker's or a daemon's.

The worker holds the state store; the CLI runs whatever a repository steers it to. With
`confinement = "sandbox"` (the default) each live job's CLI runs as a user of a pool,
`cli_pool`-1 ... `cli_pool`-N (N = `cli_pool_size`, made by sysusers, all in group `cli_pool`),
as Nix runs concurrent builds under its build users: two jobs never share a uid, so the kernel
keeps their files, signals, ptrace and /proc apart. A worker takes a free member (`take`: a lock
file per member in the state dir, held by the worker and by the CLI, which passes it on to all it
starts, so a member is free again only once the whole session is gone) and gives the job's
config dir to it (`adopt`).

The worker may switch users at its start (root under `make run`; CAP_SETUID, CAP_SETGID and
CAP_CHOWN in a `cl-worker@` unit): it takes its job's user, gives it the job's config dir, then
keeps only the right to become that one user (`keep_only`: it is its saved uid) and drops every
capability. The CLI becomes that user between fork and exec, and keeps no capability at all.
In the CLI's own tree the worker acts with that user's file-system identity (`setfsuid`): a link
or a file the CLI planted there can never make the worker read or write with its own rights.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import fcntl
import os
import pwd
import stat
import struct
from collections.abc import Iterator
from pathlib import Path

from cl.config import Config

_libc = ctypes.CDLL(None, use_errno=True)
_CAP_KILL, _CAP_SETGID, _CAP_SETUID = 5, 6, 7
_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
_CAPABILITY_VERSION_3 = 0x20080522


class CliUserError(Exception):
    """The configured `cli_user` cannot be used; the message says why and what to do."""


@dataclasses.dataclass(frozen=True, slots=True)
class CliUser:
    uid: int
    gid: int
    name: str
    separate: bool
    """The CLI runs as a user other than the worker's (the worker can switch, and does)."""

    @classmethod
    def own(cls) -> CliUser:
        """This process's own user (`confinement = "none"`)."""
        return cls(os.getuid(), os.getgid(), _user_name(os.getuid()), separate=False)

    @classmethod
    def named(cls, name: str) -> CliUser:
        """The user `name`; raises CliUserError if there is none."""
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            made_by = "packaging/systemd/sysusers.d makes the CLI's users"
            raise CliUserError(f"user {name!r} does not exist ({made_by})") from None
        return cls(entry.pw_uid, entry.pw_gid, name, separate=entry.pw_uid != os.getuid())

    @contextlib.contextmanager
    def acting(self) -> Iterator[None]:
        """File operations inside run with this user's file-system identity (this thread only)."""
        if not self.separate:
            yield
            return
        own_uid, own_gid = os.geteuid(), os.getegid()
        _set_fs_ids(self.uid, self.gid)
        try:
            yield
        finally:
            _set_fs_ids(own_uid, own_gid)

    def groups(self) -> frozenset[int]:
        """The groups the CLI has (what its right to write a directory may come from)."""
        if self.separate:
            return frozenset(os.getgrouplist(self.name, self.gid))
        return frozenset({*os.getgroups(), self.gid})

    def become(self) -> None:
        """In the CLI's process, between fork and exec: take this user's identity (its one group,
        the pool's) and drop every capability (an unprivileged worker with ambient capabilities
        would otherwise pass them on). Needs no privilege in a worker that `keep_only`s this user."""
        if self.separate:
            if os.getgroups():
                os.setgroups([])
            os.setresgid(self.gid, self.gid, self.gid)
            os.setresuid(self.uid, self.uid, self.uid)
        drop_capabilities()


def keep_only(user: CliUser, *, signals: bool = False) -> None:
    """From now on this process may become `user` and nothing else: `user` is its saved user
    and group, it has no supplementary group and no capability. A long-lived worker keeps
    CAP_SETUID only until its job's user is chosen and given the job's config dir: what
    `acting` and `become` do later (to its saved ids) needs no privilege. With `signals` it keeps
    CAP_KILL, if it has it: a worker that starts its CLI itself must still be able to signal it,
    for the kernel sends the CLI its parent-death signal with the dying worker's rights."""
    if not user.separate:
        return
    os.setgroups([])
    os.setresgid(-1, -1, user.gid)
    os.setresuid(-1, -1, user.uid)
    drop_capabilities(keep=_CAP_KILL if signals else None)


def members(pool: str, size: int) -> list[str]:
    """The pool's user names, in order."""
    return [f"{pool}-{number}" for number in range(1, size + 1)]


@dataclasses.dataclass(frozen=True, slots=True)
class Slot:
    """A pool member taken by one worker: the user, and the two descriptors that hold it."""

    user: CliUser
    lock: int | None
    """The worker's hold (None for the worker's own user, `confinement = "none"`, which no pool holds)."""
    inherited: int | None = None
    """The CLI's hold, inherited by all it starts: the member stays taken while any of it lives.
    What the CLI does with it (lets go of it) frees nothing while the worker holds `lock`."""

    @property
    def fds(self) -> tuple[int, ...]:
        """What the CLI inherits of it."""
        return () if self.inherited is None else (self.inherited,)

    def release(self) -> None:
        for fd in (self.lock, self.inherited):
            if fd is not None:
                os.close(fd)


def take(pool: str, size: int, locks: Path, prefer: int | None = None) -> Slot | None:
    """A free member of the pool (the one whose uid is `prefer` first, if free), held for the
    caller; None if every member is taken. Raises CliUserError if a member does not exist.

    A member is free when nothing holds its lock file. Takers go one at a time (a lock on the
    directory); the one that finds a member free holds its file shared, twice: once itself, once
    for its CLI (`Slot`)."""
    locks.mkdir(parents=True, exist_ok=True, mode=0o700)
    users = [CliUser.named(name) for name in members(pool, size)]
    users.sort(key=lambda user: user.uid != prefer)
    guard = os.open(locks, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(guard, fcntl.LOCK_EX)
        for user in users:
            if (held := _free(locks / f"{user.name}.lock")) is not None:
                return Slot(user, *held)
        return None
    finally:
        os.close(guard)


def _free(path: Path) -> tuple[int, int] | None:
    """Two descriptors holding `path` shared, if nothing held it (the caller holds the takers' lock:
    no other taker comes in while the first one's exclusive test turns shared)."""
    held = [os.open(path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600) for _ in range(2)]
    try:
        fcntl.flock(held[0], fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        for fd in held:
            os.close(fd)
        return None
    for fd in held:
        fcntl.flock(fd, fcntl.LOCK_SH)
    return held[0], held[1]


def adopt(path: Path, user: CliUser) -> None:
    """Give the tree at `path` (a job's config dir an earlier run's member owns) to `user`: every
    entry the earlier member owns, by descriptor, no link followed. Its owner's runs are over (its
    lock was free). An entry someone else owns (a hard link the CLI made to another's file) keeps
    its owner: what the CLI left there never steers a chown."""
    st = os.lstat(path)
    if (st.st_uid, st.st_gid) == (user.uid, user.gid):
        return
    if not stat.S_ISDIR(st.st_mode):
        raise CliUserError(f"{path}: not a directory")
    # Root walks the tree as itself; a worker that is not (a cl-worker@ unit) walks it as its owner.
    walker = contextlib.nullcontext() if os.geteuid() == 0 else CliUser(st.st_uid, st.st_gid, "", True).acting()
    with walker:  # bottom up: a directory changes hands once its walker is done with it
        for _top, dirs, files, top_fd in os.fwalk(path, topdown=False, follow_symlinks=False):
            for name in [*dirs, *files]:
                if os.stat(name, dir_fd=top_fd, follow_symlinks=False).st_uid == st.st_uid:
                    os.chown(name, user.uid, user.gid, dir_fd=top_fd, follow_symlinks=False)
        os.chown(path, user.uid, user.gid, follow_symlinks=False)


def checked(config: Config) -> CliUser:
    """Whose rights a job's directory must grant (`cl.workdir`), besides its submitter's: the
    pool's first user (every member has the pool's group), or with `confinement = "none"` this
    process's own. Raises CliUserError if the pool has no such user."""
    if config.confinement == "none":
        return CliUser.own()
    return CliUser.named(members(config.cli_pool, 1)[0])


def can_switch_users() -> bool:
    """True if this process holds CAP_SETUID and CAP_SETGID (root does)."""
    effective = _capabilities("CapEff")
    return bool(effective >> _CAP_SETUID & 1 and effective >> _CAP_SETGID & 1)


def _capabilities(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1], 16)
    return 0


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _set_fs_ids(uid: int, gid: int) -> None:
    _libc.setfsgid(gid)
    _libc.setfsuid(uid)
    if _libc.setfsuid(-1) != uid or _libc.setfsgid(-1) != gid:  # -1 only reads the current value
        raise PermissionError(f"cannot act as uid {uid}, gid {gid} (setfsuid)")


def drop_capabilities(keep: int | None = None) -> None:
    """Every capability gone, ambient ones included, but `keep` (its number) if this process has it."""
    kept = 1 << keep if keep is not None and _capabilities("CapPrm") >> keep & 1 else 0
    _libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header = ctypes.create_string_buffer(struct.pack("=Ii", _CAPABILITY_VERSION_3, 0))
    data = ctypes.create_string_buffer(struct.pack("=6I", kept, kept, 0, 0, 0, 0))  # effective, permitted, inheritable
    if _libc.capset(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed: the CLI would keep capabilities")
