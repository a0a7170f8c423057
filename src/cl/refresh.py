"""Keep an OAuth token the CLI refreshed: carry it back to the account's credential file.

A job's `.credentials.json` is a symlink to its account's file. When the CLI refreshes an
expired token it writes a temp file beside that path and renames it over the path (seen with
the real 2.1.332, tests/test_real_claude.py), so the link becomes a file of the job's own
and the account's file keeps a refresh token the server may already have rotated out. The
worker therefore carries such a file back into the account's file and points the link at it
again: other sessions on the account pick the token up (the CLI reloads its credentials when
the file's mtime changes) and the registry sees a change of the account, not a new one.

The roster directory is not the worker's to create files in (root-owned, 0750), so the
account's file is rewritten in place: one `pwrite` of the new JSON padded with spaces to the
old length (JSON allows trailing whitespace), so the file never shrinks under a reader. A
credential that is not a usable OAuth one (a refresh that lost a race blanks the token) is
never carried back: the account's file keeps its last good tokens.

`.account` in the job's dir names the account whose credentials the CLI there last had; a
daemon re-pointing the link for a move first sets a refreshed file aside (`point`), and
the next worker carries it back to that account before its own run.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from pathlib import Path

import structlog

from cl.credentials import MAX_CREDENTIAL_BYTES, AccountState, CredentialKind, credential_filename, parse_credential

log = structlog.get_logger("cl.refresh")

LINK = ".credentials.json"
SET_ASIDE = ".credentials.refreshed.json"
OWNER = ".account"


def point(config_dir: Path, credentials_dir: Path, account: str | None) -> None:
    """Make the job's `.credentials.json` a link to `account`'s file (atomically), or remove it
    (None: the account's credential comes through the environment). A file the CLI left there
    is set aside first, never lost."""
    _set_aside(config_dir)
    if account is None:
        (config_dir / LINK).unlink(missing_ok=True)
    else:
        _link(config_dir, credentials_dir, account)


def _set_aside(config_dir: Path) -> None:
    """If the CLI replaced the link with a file of its own, move that file to `SET_ASIDE`."""
    link = config_dir / LINK
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISREG(link.lstat().st_mode):
            link.replace(config_dir / SET_ASIDE)


def claim(config_dir: Path, credentials_dir: Path, account: str | None) -> None:
    """A worker's start: carry back what an earlier run left set aside, then note whose
    credentials this run's CLI gets (None: none through the link)."""
    carry_back(config_dir, credentials_dir)
    owner = config_dir / OWNER
    if account is None:
        owner.unlink(missing_ok=True)
    else:
        tmp = owner.with_name(f"{OWNER}.{os.getpid()}")
        tmp.write_text(account)
        tmp.replace(owner)


def carry_back(config_dir: Path, credentials_dir: Path) -> str | None:
    """Carry a refreshed credential in the job's dir (set aside, or where the link was) to the
    account it belongs to, and point the link back; that account's name, or None.

    Cheap when there is nothing to do (one `lstat` each): the worker calls it on every stream
    event. A file that cannot be written back stays where it is (tried once), so nothing is lost.
    """
    carried = None
    for path in (config_dir / SET_ASIDE, config_dir / LINK):
        try:
            st = path.lstat()
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(st.st_mode) or (st.st_ino, st.st_mtime_ns) in _failed:
            continue
        owner = _owner(config_dir)
        if owner is None or not _keep(path, credentials_dir / credential_filename(owner), owner):
            _failed.add((st.st_ino, st.st_mtime_ns))
            continue
        carried = owner
        if path.name == LINK:
            _link(config_dir, credentials_dir, owner)
        else:
            path.unlink()
    return carried


_failed: set[tuple[int, int]] = set()
"""Files (inode, mtime) that could not be written back: not tried again on every event."""


def _link(config_dir: Path, credentials_dir: Path, account: str) -> None:
    tmp = config_dir / f"{LINK}.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(credentials_dir / credential_filename(account))
    tmp.replace(config_dir / LINK)


def _keep(refreshed: Path, account_file: Path, owner: str) -> bool:
    """Write `refreshed` into the account's file if it is a usable OAuth credential; True if
    the job's copy may go (written back, or not worth keeping)."""
    bound = log.bind(account=owner)
    try:
        data = _read(refreshed)
    except OSError as exc:
        bound.error("refreshed credentials unreadable", error=os.strerror(exc.errno or 0))
        return False
    account = parse_credential(owner, data)
    if account.kind is not CredentialKind.OAUTH or account.state is not AccountState.OK:
        bound.warning("refreshed credentials not kept", state=str(account.state), reason=account.reason)
        return True
    try:
        _write_in_place(account_file, data)
    except OSError as exc:
        bound.error("refreshed credentials not saved", error=os.strerror(exc.errno or 0), file=str(account_file))
        return False
    expires = account.expires_at.isoformat() if account.expires_at else None
    bound.info("refreshed credentials kept", expires_at=expires)
    return True


def _owner(config_dir: Path) -> str | None:
    try:
        return (config_dir / OWNER).read_text().strip() or None
    except FileNotFoundError:
        return None


def _read(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        return os.read(fd, MAX_CREDENTIAL_BYTES + 1)
    finally:
        os.close(fd)


def _write_in_place(path: Path, data: bytes) -> None:
    """One write at offset 0, padded to the file's length, under an exclusive lock (two
    workers of one account take turns): a reader sees the old content or the new."""
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EISDIR, "not a regular file")
        if st.st_nlink != 1:
            raise OSError(errno.EMLINK, "a hard link")
        padded = data + b" " * max(0, st.st_size - len(data))
        if os.pwrite(fd, padded, 0) != len(padded):
            raise OSError(errno.ENOSPC, "short write")
        os.fsync(fd)
    finally:
        os.close(fd)
