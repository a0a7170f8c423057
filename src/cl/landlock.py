"""Confining what the CLI may write, with Landlock (Linux 5.13+, unprivileged, inherited by children).

A worker confines its CLI between fork and exec: writes are allowed beneath the job's cwd, the
job's config dir, /tmp and /dev (and whatever `cli_writable` adds), nowhere else. Reading and
executing stay as they were: the CLI reads the whole repository, its own install, the system.
So a session cannot touch the state store, other jobs' directories or the credential files.
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Iterable

_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS = 38

WRITE_FILE = 1 << 1
_DIRECTORY_WRITES = sum(1 << bit for bit in range(4, 13))  # remove dir/file, make char/dir/reg/sock/fifo/block/sym
REFER = 1 << 13  # ABI 2: moving and linking across directories
TRUNCATE = 1 << 14  # ABI 3

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


def confine_writes(paths: Iterable[str], version: int) -> None:
    """Allow this process (and what it execs) to write beneath `paths` only. Raises LandlockError.

    Meant for the moment between fork and exec: it allocates nothing Python-side it cannot spare.
    A path that does not exist is skipped; a file gets the rights a file can have.
    """
    handled = handled_writes(version)
    attr = struct.pack("=Q", handled)
    ruleset = int(_libc.syscall(_SYS_CREATE_RULESET, attr, len(attr), 0))
    if ruleset < 0:
        raise LandlockError(ctypes.get_errno(), "landlock_create_ruleset failed")
    try:
        for path in paths:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                is_dir = os.path.isdir(f"/proc/self/fd/{fd}")
                allowed = handled if is_dir else handled & (WRITE_FILE | TRUNCATE)
                rule = struct.pack("=Qi", allowed, fd)
                if _libc.syscall(_SYS_ADD_RULE, ruleset, _RULE_PATH_BENEATH, rule, 0) < 0:
                    raise LandlockError(ctypes.get_errno(), f"landlock_add_rule failed for {path}")
            finally:
                os.close(fd)
        if _libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0:
            raise LandlockError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS failed")
        if _libc.syscall(_SYS_RESTRICT_SELF, ruleset, 0) < 0:
            raise LandlockError(ctypes.get_errno(), "landlock_restrict_self failed")
    finally:
        os.close(ruleset)
