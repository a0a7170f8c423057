"""One credential file -> one Account: every accepted format and every way to be wrong."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cl.credentials import (
    MAX_CREDENTIAL_BYTES,
    AccountState,
    CredentialKind,
    account_name,
    near_miss,
    parse_credential,
    read_account,
)
from utils import FAR_FUTURE_MS, Planted, api_key_credential, oauth_credential

NOW = 1_800_000_000.0


@pytest.mark.parametrize(
    ("filename", "name"),
    [
        ("credentials-a1.json", "a1"),
        ("credentials-work_team-2.json", "work_team-2"),
        ("credentials-.json", None),
        ("credentials-a.json~", None),
        (".credentials-a.json.swp", None),
        (".credentials-a.json.1234.tmp", None),
        ("credentials-a.b.json", None),
        ("credentials-a b.json", None),
        ("credentials-" + "x" * 65 + ".json", None),
        ("credentials-\udcff.json", None),
        ("4913", None),
    ],
)
def test_account_names(filename: str, name: str | None) -> None:
    assert account_name(filename) == name


def test_near_misses_are_told_apart_from_editor_files_with_what_to_name_them() -> None:
    assert near_miss("credentials-a b.json") == "credentials-a-b.json"
    assert near_miss("credential-a5.json") == "credentials-a5.json"
    assert near_miss(".credentials.json") == "credentials-NAME.json"  # Claude Code's own file, copied in
    assert near_miss("Credentials_work.JSON") == "credentials-work.json"
    assert near_miss("credentials-\udcff.json") == "credentials-NAME.json"
    assert near_miss("credentials-a.json~") is None
    assert near_miss(".credentials-a.json.swp") is None
    assert near_miss("credentials-ok.json") is None
    assert near_miss("notes.json") is None


def test_claude_code_credentials_file(planted: Planted) -> None:
    account = parse_credential("a", oauth_credential(planted).encode(), NOW)
    assert (account.state, account.kind, account.subscription) == (AccountState.OK, CredentialKind.OAUTH, "max")
    assert account.expires_at is not None
    assert account.expires_at.timestamp() == FAR_FUTURE_MS / 1000


def test_long_lived_token_and_api_key(planted: Planted) -> None:
    token = parse_credential("t", json.dumps({"oauthToken": planted.token()}).encode(), NOW)
    key = parse_credential("k", api_key_credential(planted).encode(), NOW)
    assert (token.state, token.kind) == (AccountState.OK, CredentialKind.OAUTH_TOKEN)
    assert (key.state, key.kind) == (AccountState.OK, CredentialKind.API_KEY)


@pytest.mark.parametrize(
    ("content", "state", "reason_part"),
    [
        (b"", AccountState.INVALID, "empty file"),
        (b"  \n", AccountState.INVALID, "empty file"),
        (b'{"claudeAiOauth": {"accessToken": "x"', AccountState.INVALID, "malformed JSON"),
        (b"\xff\xfe\x00garbage", AccountState.INVALID, "not UTF-8"),
        (b"[1, 2]", AccountState.INVALID, "expected a JSON object, got array"),
        (b'{"something": 1}', AccountState.INVALID, "no credential found"),
        (b'{"claudeAiOauth": "x"}', AccountState.INVALID, "claudeAiOauth must be an object"),
        (b'{"claudeAiOauth": {"accessToken": 42}}', AccountState.INVALID, "accessToken must be a string"),
        (b'{"claudeAiOauth": {"accessToken": "t0ken-abcdef", "expiresAt": "soon"}}', AccountState.INVALID, "expiresAt"),
        (b'{"apiKey": ["x"]}', AccountState.INVALID, "apiKey must be a string"),
        (b'{"claudeAiOauth": {"accessToken": "", "expiresAt": 0}}', AccountState.NEEDS_LOGIN, "log in"),
        (b'{"claudeAiOauth": {"accessToken": "t0ken-abcdef", "expiresAt": 0}}', AccountState.NEEDS_LOGIN, "log in"),
        (b'{"apiKey": ""}', AccountState.NEEDS_LOGIN, "log in"),
        (b'{"claudeAiOauth": {"accessToken": "t0ken-abcdef", "expiresAt": 1000}}', AccountState.EXPIRED, None),
        # with a refresh token the CLI renews it on its first request: still an account to use
        (
            b'{"claudeAiOauth": {"accessToken": "t0ken-abcdef", "refreshToken": "r", "expiresAt": 1000}}',
            AccountState.OK,
            None,
        ),
        (b"[" * 100_000, AccountState.INVALID, "malformed JSON"),
    ],
)
def test_bad_and_special_content(content: bytes, state: AccountState, reason_part: str | None) -> None:
    account = parse_credential("x", content, NOW)
    assert account.state is state
    if reason_part is None:
        assert account.reason is None
    else:
        assert account.reason is not None
        assert reason_part in account.reason


def test_reasons_never_quote_the_content(planted: Planted) -> None:
    token = planted.token()
    for broken in (f'{{"apiKey": "{token}"', f'{{"apiKey": "{token}", }}', f'{{"claudeAiOauth": "{token}"}}'):
        account = parse_credential("x", broken.encode(), NOW)
        assert account.state is AccountState.INVALID
        assert token not in (account.reason or "")
        assert token not in repr(account)


def test_files_that_are_not_credentials(tmp_path: Path, planted: Planted) -> None:
    (tmp_path / "dir").mkdir()
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "real").write_text(oauth_credential(planted))
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "big").write_bytes(b" " * (MAX_CREDENTIAL_BYTES + 1))
    reasons = {}
    for name in ("dir", "fifo", "link", "big"):
        read = read_account(tmp_path / name, name)
        assert read is not None
        assert read[0].state is AccountState.INVALID
        reasons[name] = read[0].reason
    assert reasons == {
        "dir": "not a regular file",
        "fifo": "not a regular file",
        "link": "symlink refused: a credential must be a regular file in the directory",
        "big": f"too large ({MAX_CREDENTIAL_BYTES + 1} bytes, limit {MAX_CREDENTIAL_BYTES})",
    }
    assert read_account(tmp_path / "missing", "missing") is None


def test_group_or_world_readable_is_flagged(tmp_path: Path, planted: Planted) -> None:
    path = tmp_path / "credentials-c.json"
    path.write_text(oauth_credential(planted))
    path.chmod(0o600)
    assert read_account(path, "c") is not None
    assert not read_account(path, "c")[0].exposed  # type: ignore[index]
    path.chmod(0o640)
    assert read_account(path, "c")[0].exposed  # type: ignore[index]


def test_token_refresh_changes_the_account_and_a_rewrite_does_not(planted: Planted) -> None:
    content = oauth_credential(planted).encode()
    refreshed = oauth_credential(planted).encode()
    assert parse_credential("a", content, NOW) == parse_credential("a", content, NOW)
    assert parse_credential("a", content, NOW) != parse_credential("a", refreshed, NOW)
