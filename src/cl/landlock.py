"""Confining the CLI with Landlock (Linux 5.13+, unprivileged, inherited by every child).

A worker confines its CLI between fork and exec:
* writes only beneath the job's cwd, its config dir, /tmp and /dev (and `cli_writable`);
* reads everywhere except cl's private trees (the state dir, the credentials dir, the control
  sockets' dir, the other jobs' config dirs): the rules name everything else, down each private
  tree's ancestors (`readable_except`), so the CLI reads the repository, its own install and
  the system, and nothing of another job or account;
* (ABI 6, Linux 6.12+) signals only to processes of its own domain: not the daemons, not its
  worker, not another job's CLI. Landlock also refuses ptrace outside the domain (every ABI).
Execution is not restricted.
"""

from __future__ import annotations

import ctypes
import os
import stat
import struct
from collections.abc import Iterable

_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS = 38

READ_FILE = 1 << 2
READ_DIR = 1 << 3
WRITE_FILE = 1 << 1
_DIRECTORY_WRITES = sum(1 << bit for bit in range(4, 13))  # remove dir/file, make char/dir/reg/sock/fifo/block/sym
REFER = 1 << 13  # ABI 2: moving and linking across directories
TRUNCATE = 1 << 14  # ABI 3
SCOPE_SIGNAL = 1 << 1  # ABI 6
SIGNAL_SCOPE_ABI = 6

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class LandlockError(OSError):
    pass


def abi() -> int:
    """The kernel's Landlock ABI version; 0 if Landlock is missing or disabled."""
    version = int(_libc.syscall(_SYS_CREATE_RULESET, None, 0, _CREATE_RULESET_VERSION))
    return max(version, 0)


def handled_writes(version: int) -> int:
    rights = WRITE_FILE | _DIRECTORY_WRITES
    if version >= 2:
        rights |= REFER
    if version >= 3:
        rights |= TRUNCATE
    return rights


def readable_except(private: Iterable[str]) -> list[str]:
    """Every path beside the ancestors of `private`: rules for these let the CLI read the whole
    system but the private trees. A symlink is left out (its target is named where it lives)."""
    hidden = {os.path.realpath(path) for path in private}
    ancestors = {os.path.dirname(path) for path in hidden}
    for start in list(ancestors):
        path = start
        while path != "/":
            path = os.path.dirname(path)
            ancestors.add(path)
    ancestors = {path for path in ancestors if not any(_beneath(path, secret) for secret in hidden)}
    readable = []
    for directory in sorted(ancestors):
        try:
            entries = os.listdir(directory)
        except OSError:
            continue
        for entry in entries:
            path = os.path.join(directory, entry)
            if path not in hidden and path not in ancestors and not os.path.islink(path):
                readable.append(path)
    return readable


def _beneath(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


Rule = tuple[int, int]
"""An open `O_PATH` descriptor and the rights granted beneath it."""


def open_rules(paths: Iterable[str], rights: int) -> list[Rule]:
    """Open each path (`O_PATH`, as whoever calls this: the CLI's user for the CLI's own places)
    for a rule granting `rights` beneath it; a file gets the rights a file can have, a path that
    cannot be opened is skipped. Close them with `close_rules` once the CLI is started."""
    rules = []
    for path in paths:
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            continue
        is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
        rules.append((fd, rights if is_dir else rights & (WRITE_FILE | TRUNCATE | READ_FILE)))
    return rules


def close_rules(rules: Iterable[Rule]) -> None:
    for fd, _rights in rules:
        os.close(fd)


def writing(version: int) -> int:
    """The rights a writable place gets: every one handled."""
    return handled_writes(version) | READING


READING = READ_FILE | READ_DIR


def confine(rules: Iterable[Rule], version: int) -> None:
    """Allow this process (and what it execs) only what `rules` grant (of the rights handled:
    writing and reading), and to signal only its own domain. Raises LandlockError.

    Meant for the moment between fork and exec: it only makes system calls.
    """
    handled = writing(version)
    scoped = version >= SIGNAL_SCOPE_ABI  # the attribute grew a `scoped` field (after `handled_access_net`)
    attr = struct.pack("=QQQ", handled, 0, SCOPE_SIGNAL) if scoped else struct.pack("=Q", handled)
    ruleset = int(_libc.syscall(_SYS_CREATE_RULESET, attr, len(attr), 0))
    if ruleset < 0:
        raise LandlockError(ctypes.get_errno(), "landlock_create_ruleset failed")
    try:
        for fd, rights in rules:
            rule = struct.pack("=Qi", rights, fd)
            if _libc.syscall(_SYS_ADD_RULE, ruleset, _RULE_PATH_BENEATH, rule, 0) < 0:
                raise LandlockError(ctypes.get_errno(), "landlock_add_rule failed")
        if _libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0:
            raise LandlockError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS failed")
        if _libc.syscall(_SYS_RESTRICT_SELF, ruleset, 0) < 0:
            raise LandlockError(ctypes.get_errno(), "landlock_restrict_self failed")
    finally:
        os.close(ruleset)
