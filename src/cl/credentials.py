"""One credential file -> one `Account`: naming, safe reading and validation.

Accepted formats (the file is `credentials-<name>.json`):

* Claude Code's own `.credentials.json`:
  `{"claudeAiOauth": {"accessToken", "refreshToken", "expiresAt" (ms), ...}}`
* a long-lived OAuth token from `claude setup-token`: `{"oauthToken": "..."}`
* an API key: `{"apiKey": "..."}`

Nothing here ever puts file content into a reason or a log field: a reason says what is
wrong, never what was there.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import fcntl
import hashlib
import json
import os
import re
import stat
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from cl import redact
from cl.moments import from_epoch

CANNOT_LOOK = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
"""Errors that say nothing about a file or a directory, only that this process could not look now."""
MAX_CREDENTIAL_BYTES = 64 * 1024
"""Larger files are refused unread: a real credential is a few hundred bytes."""

_NAME = re.compile(r"credentials-([A-Za-z0-9][A-Za-z0-9_-]{0,63})\.json")
_LOOKS_LIKE = re.compile(r"\.?credentials?[-_ .]?(.*)\.json", re.IGNORECASE)
_NOT_IN_A_NAME = re.compile(r"[^A-Za-z0-9_-]+")


def account_name(filename: str) -> str | None:
    """The account name a file name stands for, or None if it is not a credential file."""
    match = _NAME.fullmatch(filename)
    return match.group(1) if match else None


def near_miss(filename: str) -> str | None:
    """For a name an operator probably meant as a credential file but that does not qualify
    (`credential-x.json`, `credentials-bad name.json`, a copied `.credentials.json`): the name to
    give it instead. None for a credential file's name, and for everything else."""
    match = _LOOKS_LIKE.fullmatch(filename)
    if match is None or account_name(filename) is not None:
        return None
    name = _NOT_IN_A_NAME.sub("-", match.group(1)).strip("-_")[:64]
    return credential_filename(name or "NAME")


def is_account_name(name: str) -> bool:
    return _NAME.fullmatch(credential_filename(name)) is not None


def credential_filename(name: str) -> str:
    return f"credentials-{name}.json"


class AccountState(enum.StrEnum):
    OK = "ok"
    """Usable."""
    EXPIRED = "expired"
    """The access token's `expiresAt` has passed."""
    NEEDS_LOGIN = "needs-login"
    """A blanked credential (empty token or `expiresAt: 0`), as left by a refresh race."""
    INVALID = "invalid"
    """Unreadable or not a credential; `reason` says why."""


class CredentialKind(enum.StrEnum):
    OAUTH = "oauth"
    """Claude Code's `.credentials.json` (`claudeAiOauth`)."""
    OAUTH_TOKEN = "oauth-token"  # noqa: S105 - a kind name, not a token
    """A long-lived token, passed to the CLI as `CLAUDE_CODE_OAUTH_TOKEN`."""
    API_KEY = "api-key"
    """An API key, passed to the CLI as `ANTHROPIC_API_KEY`."""


class Secret:
    """A token that prints as `***`: it cannot leak through a repr, an f-string or a log."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value
        redact.remember(value)

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclasses.dataclass(frozen=True, slots=True)
class FileSignature:
    """What `stat` says about a file; equal signatures mean there is no need to re-read."""

    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int
    mode: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileSignature:
        return cls(st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode)


@dataclasses.dataclass(frozen=True, slots=True)
class Account:
    name: str
    state: AccountState
    kind: CredentialKind | None = None
    reason: str | None = None
    expires_at: datetime | None = None
    subscription: str | None = None
    exposed: bool = False
    """The file is readable by group or others."""
    renewable: bool = False
    """An OAuth credential with a refresh token: the CLI renews an expired access token on its
    first request (and the worker carries the new one back), so expiry does not end the account."""
    secrets: tuple[Secret, ...] = dataclasses.field(default=(), repr=False)

    @property
    def usable(self) -> bool:
        return self.state is AccountState.OK

    def expired_by(self, now: float) -> bool:
        return (
            self.state is AccountState.OK
            and not self.renewable
            and self.expires_at is not None
            and self.expires_at.timestamp() <= now
        )

    def with_state(self, state: AccountState) -> Account:
        return dataclasses.replace(self, state=state)

    def public(self) -> dict[str, Any]:
        """The account as its registry has it, shown to clients: never a secret. `file` is its
        credential file's state; the account's one state (`cl.account_state`) adds walls and settings."""
        return {
            "name": self.name,
            "file": str(self.state),
            "kind": str(self.kind) if self.kind else None,
            "reason": self.reason,
            "expires_at": self.expires_at.isoformat() if self.expires_at else None,
            "subscription": self.subscription,
            "renewable": self.renewable,
        }


def read_account(path: str | os.PathLike[str], name: str) -> tuple[Account, FileSignature | None] | None:
    """Read and validate one credential file; None if it does not exist (any more).

    Never raises for bad content or a bad file. Opens with O_NOFOLLOW|O_NONBLOCK, so a
    symlink is refused and a FIFO cannot block; a hard link is refused too (it can be written
    through a name outside the directory, where no event reaches us).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno in CANNOT_LOOK:
            raise  # this process is short of something: the file is unknown, not bad
        return _invalid(name, _open_error(exc)), _lstat_signature(path)
    try:
        st = os.fstat(fd)
        signature = FileSignature.of(st)
        if not stat.S_ISREG(st.st_mode):
            return _invalid(name, "not a regular file"), signature
        if st.st_nlink > 1:  # written through another name, it would change here without an event
            reason = f"hard link refused ({st.st_nlink} names): copy the file in instead"
            return _invalid(name, reason), signature
        if st.st_size > MAX_CREDENTIAL_BYTES:
            reason = f"too large ({st.st_size} bytes, limit {MAX_CREDENTIAL_BYTES})"
            return _invalid(name, reason), signature
        data = os.read(fd, MAX_CREDENTIAL_BYTES + 1)
    except OSError as exc:
        return _invalid(name, f"unreadable: {os.strerror(exc.errno or 0)}"), None
    finally:
        os.close(fd)
    if len(data) > MAX_CREDENTIAL_BYTES:
        return _invalid(name, f"too large (limit {MAX_CREDENTIAL_BYTES} bytes)"), signature
    account = parse_credential(name, data)
    return dataclasses.replace(account, exposed=bool(st.st_mode & 0o077)), signature


def parse_credential(name: str, data: bytes, now: float | None = None) -> Account:
    """Validate a credential's bytes. The reason of an invalid one never quotes the content."""
    if not data.strip():
        return _invalid(name, "empty file")
    try:
        doc = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError:
        return _invalid(name, "not UTF-8 text")
    except json.JSONDecodeError as exc:
        return _invalid(name, f"malformed JSON ({exc.msg} at line {exc.lineno} column {exc.colno})")
    except RecursionError:
        return _invalid(name, "malformed JSON (nested too deeply)")
    if not isinstance(doc, dict):
        return _invalid(name, f"expected a JSON object, got {_json_type(doc)}")
    now = time.time() if now is None else now
    if "claudeAiOauth" in doc:
        return _parse_oauth(name, doc["claudeAiOauth"], now)
    for key, kind in (("oauthToken", CredentialKind.OAUTH_TOKEN), ("apiKey", CredentialKind.API_KEY)):
        if key in doc:
            return _parse_token(name, doc, key, kind, now)
    return _invalid(name, "no credential found (expected claudeAiOauth, oauthToken or apiKey)")


def _parse_oauth(name: str, oauth: Any, now: float) -> Account:
    kind = CredentialKind.OAUTH
    if not isinstance(oauth, dict):
        return _invalid(name, f"claudeAiOauth must be an object, got {_json_type(oauth)}", kind)
    token = oauth.get("accessToken")
    refresh = oauth.get("refreshToken")
    expires_ms = oauth.get("expiresAt")
    subscription = oauth.get("subscriptionType")
    for key, value in (("accessToken", token), ("refreshToken", refresh)):
        if value is not None and not isinstance(value, str):
            return _invalid(name, f"claudeAiOauth.{key} must be a string, got {_json_type(value)}", kind)
    if expires_ms is not None and (isinstance(expires_ms, bool) or not isinstance(expires_ms, int | float)):
        return _invalid(name, f"claudeAiOauth.expiresAt must be a number, got {_json_type(expires_ms)}", kind)
    if subscription is not None and not isinstance(subscription, str):
        subscription = None
    secrets = tuple(Secret(s) for s in (token, refresh) if s)
    if not token or expires_ms == 0:
        return Account(name, AccountState.NEEDS_LOGIN, kind, "blanked credential: log in again", secrets=secrets)
    expires_at = from_epoch(expires_ms / 1000) if expires_ms is not None else None
    account = Account(
        name, AccountState.OK, kind, None, expires_at, subscription, secrets=secrets, renewable=bool(refresh)
    )
    return account.with_state(AccountState.EXPIRED) if account.expired_by(now) else account


def _parse_token(name: str, doc: dict[str, Any], key: str, kind: CredentialKind, now: float) -> Account:
    token = doc[key]
    if not isinstance(token, str):
        return _invalid(name, f"{key} must be a string, got {_json_type(token)}", kind)
    if not token.strip():
        return Account(name, AccountState.NEEDS_LOGIN, kind, f"empty {key}: log in again")
    expires_ms = doc.get("expiresAt")
    if expires_ms is not None and (isinstance(expires_ms, bool) or not isinstance(expires_ms, int | float)):
        return _invalid(name, f"expiresAt must be a number, got {_json_type(expires_ms)}", kind)
    expires_at = from_epoch(expires_ms / 1000) if expires_ms else None
    account = Account(name, AccountState.OK, kind, None, expires_at, secrets=(Secret(token),))
    return account.with_state(AccountState.EXPIRED) if account.expired_by(now) else account


def _invalid(name: str, reason: str, kind: CredentialKind | None = None) -> Account:
    return Account(name, AccountState.INVALID, kind, reason)


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


def _open_error(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "symlink refused: a credential must be a regular file in the directory"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "unreadable: permission denied"
    return f"unreadable: {os.strerror(exc.errno or 0)}"


def _lstat_signature(path: str | os.PathLike[str]) -> FileSignature | None:
    try:
        return FileSignature.of(os.lstat(path))
    except OSError:
        return None


def rewrite_in_place(path: str | os.PathLike[str], update: Callable[[bytes], bytes | None]) -> bool:
    """Rewrite an account's file where it is (the roster directory is not ours to create files
    in): under an exclusive lock, `update` gets the file's bytes as they are now and returns the
    new ones, or None to leave the file alone (a compare-and-swap that lost). One `pwrite` at
    offset 0, padded with spaces to the old length, so a reader sees the old content or the new,
    never a shortened one. True if written; raises OSError (a hard link, not a regular file)."""
    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EISDIR, "not a regular file")
        if st.st_nlink != 1:
            raise OSError(errno.EMLINK, "a hard link")
        data = update(os.pread(fd, MAX_CREDENTIAL_BYTES + 1, 0))
        if data is None:
            return False
        padded = data + b" " * max(0, st.st_size - len(data))
        if os.pwrite(fd, padded, 0) != len(padded):
            raise OSError(errno.ENOSPC, "short write")
        os.fsync(fd)
        return True
    finally:
        os.close(fd)


def refresh_token(account: Account) -> str | None:
    """The refresh token of a renewable OAuth credential, if it is one."""
    if account.kind is not CredentialKind.OAUTH or not account.renewable or len(account.secrets) < 2:
        return None
    return account.secrets[1].reveal()


def fingerprint_of(secret: str) -> str:
    """A non-secret name for a secret: the start of its SHA-256 (the secrets are long and random)."""
    return hashlib.sha256(secret.encode()).hexdigest()[:16]
