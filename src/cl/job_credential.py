"""A job's own credential: a copy of its account's, kept in step with it both ways.

The CLI reads `.credentials.json` in its config dir and may hold nothing else: the account's
file, and every other account's, stays where the CLI cannot read it. So the worker copies the
account's credential there, and keeps the two in step by `expiresAt`:

* the CLI refreshed its token (2.1.332 writes a temp file beside the path and renames it over
  it): the copy is newer, and goes back into the account's file, so other sessions and the next
  run get the new refresh token the server may have rotated the old one out for;
* the account's file is newer (another session's refresh, a new login): it goes into the copy;
  the CLI picks it up at its next request (it reloads the file when it changes).

What goes back is decided by the store and the file's content alone: only to the account the
store says the run is on (or, for what an earlier run left, the account that run was on), only
a usable OAuth credential, and only if it expires strictly later than what the account's file
holds. A blanked token (a refresh that lost a race) or a stale one never replaces a good one.

The config dir is the CLI's: the worker opens it once (no symlink followed) and does everything
in it relative to that descriptor, as the CLI's user (`CliUser.acting`), with `O_NOFOLLOW` and
`O_EXCL`. The account's file is not the worker's to replace (the roster directory is root's), so
it is rewritten in place: one `pwrite`, padded with spaces to the old length under an exclusive
lock, so no reader sees it shortened or torn.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import stat
import threading
from pathlib import Path

import structlog

from cl.cli_user import CliUser
from cl.credentials import (
    MAX_CREDENTIAL_BYTES,
    Account,
    AccountState,
    CredentialKind,
    parse_credential,
    rewrite_in_place,
)

log = structlog.get_logger("cl.job_credential")

NAME = ".credentials.json"
_OPEN = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC

Signature = tuple[int, int, int]
"""A file's inode, mtime and size: whether it changed since it was last looked at."""


class JobCredential:
    """The credential in one job's config dir (opened as `cli`, by descriptor)."""

    def __init__(self, config_dir: Path, cli: CliUser, mark: Path) -> None:
        self._cli = cli
        self._mark = mark
        """Where the worker notes (a digest of) what it last put in the copy, out of the CLI's reach:
        a copy that differs was written by the CLI (a refresh), the only kind that may go back."""
        with cli.acting():
            self._dir = os.open(config_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        self._syncing = threading.Lock()
        self._closed = False
        self._seen: tuple[Signature | None, Signature | None] | None = None
        self._unsaved: Signature | None = None
        """A copy that could not be written back: tried once, not on every event."""

    def close(self) -> None:
        with self._syncing:
            os.close(self._dir)
            self._closed = True

    def size_of(self, relative: str) -> int | None:
        """The size of a file beneath the config dir (a transcript), or None."""
        with self._cli.acting():
            try:
                return os.stat(relative, dir_fd=self._dir).st_size
            except OSError:
                return None

    def sync(self, account_file: Path, account: str) -> None:
        """Bring the copy and the account's file in step (the later `expiresAt` wins). Cheap when
        neither changed since the last call: two `stat`s. The worker calls it on every event, and
        every few seconds while the CLI says nothing (a long tool call), from another thread."""
        with self._syncing:
            if not self._closed:
                self._sync(account_file, account)

    def _sync(self, account_file: Path, account: str) -> None:
        seen = (self._copy_signature(), _signature(account_file))
        if seen == self._seen:
            return
        copy, read = self._read_copy(), _read_account(account_file, account)
        if read is None:
            return  # the account's file is gone: the roster will say so, and the copy stays
        current, content = read
        if current.kind is not CredentialKind.OAUTH:
            self.remove()  # the account's credential reaches the CLI through its environment now
        elif copy is not None and self._from_cli(copy) and _newer(parse_credential(account, copy), current):
            if not self._carry_back(copy, account_file, account):
                return
        elif copy is None or copy.rstrip() != content.rstrip():
            if copy is not None and self._from_cli(copy):
                self._not_kept(copy, account)
            self._write_copy(content)
        self._seen = (self._copy_signature(), _signature(account_file))

    def carry_back(self, account_file: Path, account: str) -> None:
        """What an earlier run's CLI on `account` left in the copy goes back to it if it is newer."""
        copy, read = self._read_copy(), _read_account(account_file, account)
        if copy is None or read is None or not self._from_cli(copy):
            return
        if _newer(parse_credential(account, copy), read[0]):
            self._carry_back(copy, account_file, account)

    def install(self, data: bytes) -> None:
        """Put `data` in the config dir as the CLI's credential (gateway mode: its capability)."""
        with self._syncing:
            self._write_copy(data)
            self._seen = None

    def remove(self) -> None:
        with self._cli.acting(), contextlib.suppress(FileNotFoundError):
            os.unlink(NAME, dir_fd=self._dir)

    def _carry_back(self, copy: bytes, account_file: Path, account: str) -> bool:
        bound = log.bind(account=account)
        signature = self._copy_signature()
        if signature == self._unsaved:
            return False
        try:
            rewrite_in_place(account_file, lambda _now: copy)
        except OSError as exc:
            self._unsaved = signature
            bound.error("refreshed credentials not saved", error=os.strerror(exc.errno or 0), file=str(account_file))
            return False
        self._note(copy)
        expires = parse_credential(account, copy).expires_at
        bound.info("refreshed credentials kept", expires_at=expires.isoformat() if expires else None)
        return True

    def _from_cli(self, copy: bytes) -> bool:
        """The copy is not what a worker last put there: the CLI wrote it."""
        try:
            return self._mark.read_text() != _digest(copy)
        except FileNotFoundError:
            return True

    def _note(self, copy: bytes) -> None:
        temporary = self._mark.with_name(f"{self._mark.name}.{os.getpid()}")
        temporary.write_text(_digest(copy))
        temporary.replace(self._mark)

    def _not_kept(self, copy: bytes, account: str) -> None:
        """Say why a copy the CLI changed does not go back (it is replaced by the account's)."""
        parsed = parse_credential(account, copy)
        if parsed.kind is CredentialKind.OAUTH and parsed.state is AccountState.OK:
            return  # an older token: the account's file moved on (another session refreshed)
        log.warning("refreshed credentials not kept", account=account, state=str(parsed.state), reason=parsed.reason)

    def _set_aside(self) -> None:
        """Not a regular file or a symlink (which a rename replaces) where the copy goes: renamed
        aside, and said (a CLI planted it, or a tool made it)."""
        try:
            kind = stat.S_IFMT(os.stat(NAME, dir_fd=self._dir, follow_symlinks=False).st_mode)
        except FileNotFoundError:
            return
        if kind not in (stat.S_IFREG, stat.S_IFLNK):
            aside = f"{NAME}.not-a-file-{secrets.token_hex(4)}"
            os.rename(NAME, aside, src_dir_fd=self._dir, dst_dir_fd=self._dir)
            log.warning("something not a file stood where the CLI's credential goes, set aside", kept=aside)

    def _copy_signature(self) -> Signature | None:
        with self._cli.acting():
            try:
                return _of(os.stat(NAME, dir_fd=self._dir, follow_symlinks=False))
            except FileNotFoundError:
                return None

    def _read_copy(self) -> bytes | None:
        """The copy's bytes if it is a regular file (not a link, a FIFO, nor oversized)."""
        with self._cli.acting():
            try:
                fd = os.open(NAME, os.O_RDONLY | _OPEN, dir_fd=self._dir)
            except OSError:
                return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_CREDENTIAL_BYTES:
                return None
            return os.read(fd, MAX_CREDENTIAL_BYTES)
        finally:
            os.close(fd)

    def _write_copy(self, data: bytes) -> None:
        """A new file of the CLI's own, renamed over the copy: the CLI never sees it half-written.
        Whatever else stands where the copy goes (a directory, a FIFO) is set aside first."""
        temporary = f"{NAME}.cl-{secrets.token_hex(8)}"
        with self._cli.acting():
            self._set_aside()
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _OPEN, 0o600, dir_fd=self._dir)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(temporary, NAME, src_dir_fd=self._dir, dst_dir_fd=self._dir)
        self._note(data)


def _newer(copy: Account, current: Account) -> bool:
    """A usable OAuth credential that expires strictly later than the account's."""
    return (
        copy.kind is CredentialKind.OAUTH
        and copy.state is AccountState.OK
        and copy.expires_at is not None
        and (current.expires_at is None or copy.expires_at > current.expires_at)
    )


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _of(st: os.stat_result) -> Signature:
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _signature(path: Path) -> Signature | None:
    try:
        return _of(os.stat(path))
    except OSError:
        return None


def _read(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | _OPEN)
    try:
        return os.read(fd, MAX_CREDENTIAL_BYTES + 1)
    finally:
        os.close(fd)


def _read_account(path: Path, account: str) -> tuple[Account, bytes] | None:
    """The account's credential as its file holds it now, with the file's bytes."""
    try:
        content = _read(path)
    except OSError:
        return None
    return parse_credential(account, content), content
