"""A token the CLI refreshed reaches the account's file, and a blanked or older one never does.

The fake CLI refreshes as 2.1.332 does (a temp file renamed over `.credentials.json`, the job's
own copy of its account's credential); the workers carry the result back into the account's file.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from structlog.testing import capture_logs

from cl.cli_user import CliUser
from cl.job_credential import JobCredential
from utils import (
    FAR_FUTURE_MS,
    DaemonProcess,
    Layout,
    Planted,
    all_in,
    both,
    job_states,
    live_runs,
    oauth_credential,
    submit,
    wait_until,
    write_credential,
)

LATER_MS = FAR_FUTURE_MS + 3_600_000
"""A refreshed token's expiry: later than every planted one's, as a real refresh's is."""


def refreshes(layout: Layout, table: dict[str, dict[str, object]]) -> dict[str, str]:
    """The environment under which the fake CLI refreshes the tokens in `table`."""
    path = layout.root / "refresh.json"
    path.write_text(json.dumps(table))
    return layout.env(FAKE_CLAUDE_REFRESH=str(path))


@contextlib.contextmanager
def released(*paths: Path) -> Iterator[None]:
    """Remove hold files at the end, whatever happened: a failed test leaves no session waiting."""
    try:
        yield
    finally:
        for path in paths:
            path.unlink(missing_ok=True)


def test_a_refreshed_token_reaches_the_accounts_file_and_the_next_session(layout: Layout, planted: Planted) -> None:
    old, new = planted.token(), planted.token()
    account_file = write_credential(layout.credentials, "a1", oauth_credential(planted, token=old))
    inode = account_file.stat().st_ino
    fresh = {"access": new, "refresh": planted.token("sk-ant-ort01-"), "expires_at_ms": LATER_MS}
    running = layout.root / "running"  # the first session goes on after its first answer
    running.touch()
    env = refreshes(layout, {old: fresh}) | {"FAKE_CLAUDE_HOLD_AFTER": str(running)}
    balancer = DaemonProcess("balancer", layout, env=env).start()
    try:
        submit(layout, "first")
        wanted = planted.name_of(new)  # names, not tokens: a failure never prints a token
        wait_until(lambda: planted.tokens_in(account_file)[0] == wanted, "the refreshed token in the account's file")
        assert job_states(layout) == {1: "running"}  # carried back at once: other sessions need it now
        running.unlink()
        wait_until(lambda: all_in(layout, "done", 1), "the first session to finish")
        assert account_file.stat().st_ino == inode  # rewritten in place, not replaced
        copy = layout.sessions / "job-1" / ".credentials.json"
        assert planted.tokens_in(copy) == planted.tokens_in(account_file)  # the job's copy and the account agree
        wait_until(lambda: "account changed account=a1" in balancer.log(), "the registry to see a change")
        assert balancer.file_states() == {"a1": "ok"}
        assert "refreshed credentials kept account=a1" in balancer.log()
        assert "account removed" not in balancer.log()

        submit(layout, "second")
        wait_until(lambda: all_in(layout, "done", 2), "the second session to finish")
    finally:
        running.unlink(missing_ok=True)  # a failed test leaves no session waiting forever
        balancer.stop()
    assert [call["token_tail"] for call in layout.claude_calls()] == [old[-6:], new[-6:]]


def test_a_blanked_refresh_never_reaches_the_accounts_file(layout: Layout, planted: Planted) -> None:
    old = planted.token()
    account_file = write_credential(layout.credentials, "a1", oauth_credential(planted, token=old))
    before = account_file.read_bytes()
    lost_race = {"access": "", "refresh": "", "expires_at_ms": 0}
    balancer = DaemonProcess("balancer", layout, env=refreshes(layout, {old: lost_race})).start()
    try:
        submit(layout, "first")
        wait_until(lambda: all_in(layout, "done", 1), "the session to finish")
        assert account_file.read_bytes() == before
        copy = layout.sessions / "job-1" / ".credentials.json"
        assert copy.read_bytes() == before  # the blanked copy gave way to the account's good one
        assert "refreshed credentials not kept account=a1 state=needs-login" in balancer.log()
        assert balancer.file_states() == {"a1": "ok"}
    finally:
        balancer.stop()


def test_a_refresh_left_by_a_killed_worker_is_carried_back_by_the_next(layout: Layout, planted: Planted) -> None:
    """The worker dies after the CLI refreshed and before it saw a stream event: the resumed
    session's worker carries the copy back to the account the store says the earlier run was on."""
    old, new = planted.token(), planted.token()
    account_file = write_credential(layout.credentials, "a1", oauth_credential(planted, token=old))
    fresh = {"access": new, "refresh": planted.token("sk-ant-ort01-"), "expires_at_ms": LATER_MS}
    layout.hold.touch()  # after its refresh, the CLI waits: no stream event follows it
    gate = layout.root / "gate"  # and it refreshes only once its worker has read the init event
    gate.touch()
    with (
        both(layout, env=refreshes(layout, {old: fresh}) | {"FAKE_CLAUDE_REFRESH_GATE": str(gate)}),
        released(gate, layout.hold),
    ):
        submit(layout, "interrupted")
        run = wait_until(lambda: next((r for r in live_runs(layout) if r.session_id), None), "the session id")
        assert run.pid is not None
        gate.unlink()
        copy = layout.sessions / "job-1" / ".credentials.json"
        wanted = planted.name_of(new)
        wait_until(lambda: planted.tokens_in(copy)[0] == wanted, "the CLI to refresh its token")
        os.kill(run.pid, signal.SIGKILL)  # the worker vanishes; its CLI goes with it (PDEATHSIG)
        wait_until(lambda: planted.tokens_in(account_file)[0] == wanted, "the next worker to carry the token back")
        layout.hold.unlink()
        wait_until(lambda: all_in(layout, "done", 1), "the resumed session to finish")
    first, resumed = layout.claude_calls()
    assert (first["token_tail"], resumed["token_tail"]) == (old[-6:], new[-6:])


def test_carry_back_never_shortens_the_file_and_loses_nothing_it_cannot_write(tmp_path: Path, planted: Planted) -> None:
    credentials, config_dir = tmp_path / "claude", tmp_path / "job-1"
    credentials.mkdir()
    config_dir.mkdir()
    longer = {**json.loads(oauth_credential(planted)), "mcpOAuth": {"server": "x" * 200}}  # longer than the refresh
    account_file = write_credential(credentials, "a1", json.dumps(longer))
    size = account_file.stat().st_size
    credential = JobCredential(config_dir, CliUser.own(), tmp_path / "job-1.credential")
    credential.sync(account_file, "a1")
    copy = config_dir / ".credentials.json"
    assert copy.read_bytes() == account_file.read_bytes()  # the job's own copy
    new = planted.token()
    copy.write_text(oauth_credential(planted, token=new, expires_at_ms=LATER_MS))  # as the CLI leaves it
    credential.sync(account_file, "a1")
    wanted = planted.name_of(new)
    assert (planted.tokens_in(account_file)[0], account_file.stat().st_size) == (wanted, size)  # padded, parses

    os.link(account_file, tmp_path / "elsewhere.json")  # a file the registry refuses: not written through
    copy.write_text(oauth_credential(planted, expires_at_ms=LATER_MS + 1))
    with capture_logs() as logged:
        credential.sync(account_file, "a1")
        os.utime(account_file)  # the account's file changed: the next sync looks again, and still cannot
        credential.sync(account_file, "a1")
    assert [entry["event"] for entry in logged] == ["refreshed credentials not saved"]  # tried once
    assert planted.tokens_in(copy)[0] != wanted  # kept where it was: nothing lost
    assert planted.tokens_in(account_file)[0] == wanted
    credential.close()


def test_an_older_token_never_replaces_a_newer_one(tmp_path: Path, planted: Planted) -> None:
    """A token set aside days ago (expired, refreshable) must not replace a fresh login: the
    account's file is newer, and it goes into the job's copy instead."""
    credentials, config_dir = tmp_path / "claude", tmp_path / "job-1"
    credentials.mkdir()
    config_dir.mkdir()
    fresh = oauth_credential(planted, expires_at_ms=LATER_MS)
    account_file = write_credential(credentials, "a1", fresh)
    three_days_ago = int((time.time() - 3 * 86400) * 1000)
    (config_dir / ".credentials.json").write_text(oauth_credential(planted, expires_at_ms=three_days_ago))
    credential = JobCredential(config_dir, CliUser.own(), tmp_path / "job-1.credential")
    credential.carry_back(account_file, "a1")
    assert account_file.read_text() == fresh
    credential.sync(account_file, "a1")
    assert account_file.read_text() == fresh
    assert (config_dir / ".credentials.json").read_text() == fresh
    credential.close()


def test_an_account_whose_access_token_expired_takes_work_and_comes_back_renewed(
    layout: Layout, planted: Planted
) -> None:
    """Idle overnight, its access token expired: it has a refresh token, so it is still an
    account to use (the CLI renews it on its first request), never one that sits unused."""
    old, new = planted.token(), planted.token()
    an_hour_ago = int((time.time() - 3600) * 1000)
    account_file = write_credential(
        layout.credentials, "a1", oauth_credential(planted, token=old, expires_at_ms=an_hour_ago)
    )
    fresh = {"access": new, "refresh": planted.token("sk-ant-ort01-"), "expires_at_ms": LATER_MS}
    balancer = DaemonProcess("balancer", layout, env=refreshes(layout, {old: fresh})).start()
    try:
        (account,) = balancer.request({"request": "accounts"})["accounts"]
        assert (account["file"], account["renewable"]) == ("ok", True)
        submit(layout, "good morning")
        wait_until(lambda: all_in(layout, "done", 1), "the session to finish")
        wanted = planted.name_of(new)
        assert planted.tokens_in(account_file)[0] == wanted
        renewed = f"{datetime.fromtimestamp(LATER_MS / 1000, UTC).isoformat()}"
        wait_until(
            lambda: balancer.request({"request": "accounts"})["accounts"][0]["expires_at"] == renewed,
            "the registry to see the renewed expiry",
        )
    finally:
        balancer.stop()


def test_a_new_login_dropped_in_is_never_overwritten_by_a_sessions_older_copy(tmp_path: Path, planted: Planted) -> None:
    """Only what the CLI itself wrote goes back: an operator's new login, expiring sooner than the
    token the job's copy still holds, replaces the copy, not the other way round."""
    credentials, config_dir = tmp_path / "claude", tmp_path / "job-1"
    credentials.mkdir()
    config_dir.mkdir()
    account_file = write_credential(credentials, "a1", oauth_credential(planted, expires_at_ms=LATER_MS))
    credential = JobCredential(config_dir, CliUser.own(), tmp_path / "job-1.credential")
    credential.sync(account_file, "a1")
    login = oauth_credential(planted, expires_at_ms=FAR_FUTURE_MS)  # sooner than the copy's
    write_credential(credentials, "a1", login)
    credential.sync(account_file, "a1")
    assert account_file.read_text() == login
    assert (config_dir / ".credentials.json").read_text() == login
    credential.close()


def test_another_sessions_refresh_reaches_a_cli_that_is_busy_in_a_tool_call(layout: Layout, planted: Planted) -> None:
    """While a session says nothing for a while (a long tool call), the account's file moves on
    (another session refreshed it): the session's copy follows within a few seconds, before this
    CLI would refresh with a refresh token the server has rotated out."""
    account_file = write_credential(layout.credentials, "a1", oauth_credential(planted))
    busy = layout.root / "busy"  # after its answer, the CLI waits: no event comes meanwhile
    busy.touch()
    balancer = DaemonProcess("balancer", layout, env=layout.env(FAKE_CLAUDE_HOLD_AFTER=str(busy))).start()
    try:
        submit(layout, "a long tool call")
        copy = layout.sessions / "job-1" / ".credentials.json"
        wait_until(lambda: layout.claude_calls() and copy.exists(), "the session to be busy")
        refreshed = oauth_credential(planted, expires_at_ms=LATER_MS)  # what another session's worker wrote back
        write_credential(layout.credentials, "a1", refreshed)
        wanted = planted.tokens_in(account_file)
        wait_until(lambda: planted.tokens_in(copy) == wanted, "the busy session's copy to follow")
        assert job_states(layout) == {1: "running"}
    finally:
        busy.unlink(missing_ok=True)
        balancer.stop()
