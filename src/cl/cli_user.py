"""Who the Claude Code CLI runs as: a user of its own, never the worker's or a daemon's.

The worker holds the state store and reads its account's credential; the CLI runs whatever a
repository steers it to. When the worker may switch users (root under `make run`, or the
CAP_SETUID and CAP_SETGID that the `cl-worker@` unit grants), the CLI runs as `cli_user`
with no capabilities at all, and the worker does every file operation in the CLI's own tree
with that user's file-system identity (`setfsuid`): a link or a file the CLI planted there
can never make the worker read or write with its own rights.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import pwd
import struct
from collections.abc import Iterator

_libc = ctypes.CDLL(None, use_errno=True)
_CAP_SETGID, _CAP_SETUID = 6, 7
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
    def resolve(cls, name: str, *, switching: bool | None = None) -> CliUser:
        """`name` if the worker can switch to it (`switching`; None: if this process can);
        otherwise this process's own user (the daemons say at start what that leaves out).
        Raises CliUserError if it could switch but `name` does not exist: running the CLI with
        a privileged identity is never the fallback."""
        own = cls(os.getuid(), os.getgid(), _user_name(os.getuid()), separate=False)
        if not name:
            return own
        switching = can_switch_users() if switching is None else switching
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            if switching:
                raise CliUserError(f"cli_user {name!r} does not exist (see packaging/systemd/sysusers.d)") from None
            return own
        if entry.pw_uid == os.getuid() or not switching:
            return own
        return cls(entry.pw_uid, entry.pw_gid, name, separate=True)

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
        """In the CLI's process, between fork and exec: take this user's identity and groups,
        and drop every capability (an unprivileged worker with ambient capabilities would
        otherwise pass them on)."""
        if self.separate:
            os.initgroups(self.name, self.gid)
            os.setresgid(self.gid, self.gid, self.gid)
            os.setresuid(self.uid, self.uid, self.uid)
        _drop_capabilities()


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


def _drop_capabilities() -> None:
    _libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header = ctypes.create_string_buffer(struct.pack("=Ii", _CAPABILITY_VERSION_3, 0))
    data = ctypes.create_string_buffer(bytes(24))  # effective, permitted, inheritable: all empty
    if _libc.capset(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed: the CLI would keep capabilities")
