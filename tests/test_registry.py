"""CredentialRegistry on real inotify in real temp directories."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import resource
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from cl.credentials import AccountState
from cl.registry import AccountChange, ChangeKind, CredentialRegistry, Subscription
from utils import Planted, oauth_credential, write_credential

TIMEOUT = 20.0


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[CredentialRegistry]:
    directory = tmp_path / "claude"
    directory.mkdir()
    registry = CredentialRegistry(directory)
    await registry.start()
    yield registry
    await registry.stop()


async def next_change(subscription: Subscription) -> AccountChange:
    return await asyncio.wait_for(anext(subscription), TIMEOUT)


async def changes_until(subscription: Subscription, last: tuple[ChangeKind, str]) -> list[tuple[ChangeKind, str]]:
    seen: list[tuple[ChangeKind, str]] = []
    while not seen or seen[-1] != last:
        change = await next_change(subscription)
        seen.append((change.kind, change.name))
    return seen


async def test_existing_files_load_at_start(tmp_path: Path, planted: Planted) -> None:
    write_credential(tmp_path, "a", oauth_credential(planted))
    write_credential(tmp_path, "b", "{oops")
    registry = CredentialRegistry(tmp_path)
    with capture_logs() as logs:
        await registry.start()
    await registry.stop()
    assert {name: a.state for name, a in registry.accounts.items()} == {
        "a": AccountState.OK,
        "b": AccountState.INVALID,
    }
    events = [entry["event"] for entry in logs]
    assert "credentials loaded" in events
    assert events.count("account invalid") == 1  # only the problem account gets its own line at load
    assert "account added" not in events


async def test_add_change_remove(registry: CredentialRegistry, planted: Planted) -> None:
    directory = registry.directory
    subscription = registry.subscribe()
    write_credential(directory, "a", oauth_credential(planted))
    change = await next_change(subscription)
    assert (change.kind, change.name, change.previous) == (ChangeKind.ADDED, "a", None)
    assert change.account is not None
    assert change.account.state is AccountState.OK

    # Claude Code refreshing its token rewrites the file in place: one CHANGED, no remove+add.
    (directory / "credentials-a.json").write_text(oauth_credential(planted))
    change = await next_change(subscription)
    assert (change.kind, change.name) == (ChangeKind.CHANGED, "a")

    # The same bytes written again change nothing; the next event is about b.
    content = (directory / "credentials-a.json").read_text()
    (directory / "credentials-a.json").write_text(content)
    write_credential(directory, "b", oauth_credential(planted))
    assert await changes_until(subscription, (ChangeKind.ADDED, "b")) == [(ChangeKind.ADDED, "b")]

    (directory / "credentials-a.json").unlink()
    change = await next_change(subscription)
    assert (change.kind, change.name, change.account) == (ChangeKind.REMOVED, "a", None)
    assert set(registry.accounts) == {"b"}


async def test_atomic_replace_is_a_change(registry: CredentialRegistry, planted: Planted) -> None:
    subscription = registry.subscribe()
    write_credential(registry.directory, "a", oauth_credential(planted))
    await next_change(subscription)
    write_credential(registry.directory, "a", json.dumps({"claudeAiOauth": {"accessToken": "", "expiresAt": 0}}))
    change = await next_change(subscription)
    assert (change.kind, change.name) == (ChangeKind.CHANGED, "a")
    assert change.account is not None
    assert change.account.state is AccountState.NEEDS_LOGIN


async def test_rename_and_editor_files(registry: CredentialRegistry, planted: Planted) -> None:
    directory = registry.directory
    subscription = registry.subscribe()
    write_credential(directory, "a", oauth_credential(planted))
    await next_change(subscription)
    for junk in ("credentials-a.json~", ".credentials-a.json.swp", "4913", ".#credentials-a.json", "notes.txt"):
        (directory / junk).write_text(oauth_credential(planted))
    (directory / "credentials-a.json").rename(directory / "credentials-b.json")
    seen = {(change.kind, change.name) for change in [await next_change(subscription) for _ in range(2)]}
    assert seen == {(ChangeKind.REMOVED, "a"), (ChangeKind.ADDED, "b")}
    await registry.resync()
    assert set(registry.accounts) == {"b"}


async def test_directory_deleted_and_recreated(registry: CredentialRegistry, planted: Planted) -> None:
    directory = registry.directory
    subscription = registry.subscribe()
    write_credential(directory, "a", oauth_credential(planted))
    await next_change(subscription)
    shutil.rmtree(directory)
    change = await next_change(subscription)
    assert (change.kind, change.name) == (ChangeKind.REMOVED, "a")
    directory.mkdir()
    write_credential(directory, "b", oauth_credential(planted))
    change = await next_change(subscription)
    assert (change.kind, change.name) == (ChangeKind.ADDED, "b")
    write_credential(directory, "c", oauth_credential(planted))
    change = await next_change(subscription)
    assert (change.kind, change.name) == (ChangeKind.ADDED, "c")


async def test_directory_missing_at_start(tmp_path: Path, planted: Planted) -> None:
    directory = tmp_path / "not" / "yet"
    registry = CredentialRegistry(directory)
    with capture_logs() as logs:
        await registry.start()
    try:
        assert dict(registry.accounts) == {}
        assert any(entry["event"] == "credentials directory unavailable" for entry in logs)
        subscription = registry.subscribe()
        directory.mkdir(parents=True)
        write_credential(directory, "a", oauth_credential(planted))
        change = await next_change(subscription)
        assert (change.kind, change.name) == (ChangeKind.ADDED, "a")
    finally:
        await registry.stop()


async def test_periodic_resync_notices_expiry(tmp_path: Path, planted: Planted) -> None:
    soon_ms = int((time.time() + 1) * 1000)  # and no refresh token to renew it with
    write_credential(
        tmp_path, "a", json.dumps({"claudeAiOauth": {"accessToken": planted.token(), "expiresAt": soon_ms}})
    )
    registry = CredentialRegistry(tmp_path, resync_interval=0.2)
    await registry.start()
    try:
        subscription = registry.subscribe()
        change = await next_change(subscription)
        assert change.account is not None
        assert (change.kind, change.account.state) == (ChangeKind.CHANGED, AccountState.EXPIRED)
    finally:
        await registry.stop()


async def test_resync_catches_what_no_event_reported(tmp_path: Path, planted: Planted) -> None:
    """What inotify lost (an overflow) the full resync finds: here, no watcher at all."""
    registry = CredentialRegistry(tmp_path)
    await registry.resync()
    write_credential(tmp_path, "a", oauth_credential(planted))
    (tmp_path / "credentials-gone.json").write_text("{}")
    await registry.resync()
    (tmp_path / "credentials-gone.json").unlink()
    await registry.resync()
    assert set(registry.accounts) == {"a"}


async def test_a_burst_of_files_is_all_seen(registry: CredentialRegistry, planted: Planted) -> None:
    subscription = registry.subscribe()
    names = {f"n{i}" for i in range(300)}
    for name in names:
        write_credential(registry.directory, name, oauth_credential(planted))
    seen: set[str] = set()
    while seen != names:
        seen.add((await next_change(subscription)).name)
    assert set(registry.accounts) == names


async def test_odd_names_are_reported_once(registry: CredentialRegistry, planted: Planted) -> None:
    with capture_logs() as logs:
        (registry.directory / "credentials-has space.json").write_text(oauth_credential(planted))
        os.close(
            os.open(os.path.join(os.fsencode(registry.directory), b"credentials-\xff.json"), os.O_CREAT | os.O_WRONLY)
        )
        for _ in range(3):
            await registry.resync()
        (registry.directory / "credential-a5.json").write_text(oauth_credential(planted))  # a typo
        for _ in range(2):
            await registry.resync()
    ignored = [entry for entry in logs if entry["event"] == "file ignored: not a valid credential name"]
    assert sorted((entry["file"], entry["rename_to"]) for entry in ignored) == [
        ("credential-a5.json", "credentials-a5.json"),
        ("credentials-\\xff.json", "credentials-NAME.json"),
        ("credentials-has space.json", "credentials-has-space.json"),
    ]
    assert dict(registry.accounts) == {}


async def test_subscribers_see_every_change_in_order(registry: CredentialRegistry, planted: Planted) -> None:
    first, second = registry.subscribe(), registry.subscribe()
    path = write_credential(registry.directory, "a", oauth_credential(planted))
    await next_change(first)
    path.unlink()
    await next_change(first)
    assert [(await next_change(second)).kind for _ in range(2)] == [ChangeKind.ADDED, ChangeKind.REMOVED]
    first.close()
    second.close()


async def test_usable_count_follows_every_change(registry: CredentialRegistry, planted: Planted) -> None:
    subscription = registry.subscribe()
    steps = [
        ("a", oauth_credential(planted)),
        ("b", oauth_credential(planted)),
        ("a", "{broken"),
        ("b", json.dumps({"claudeAiOauth": {"accessToken": "", "expiresAt": 0}})),
        ("a", oauth_credential(planted)),
        ("a", None),
    ]
    for name, content in steps:
        if content is None:
            (registry.directory / f"credentials-{name}.json").unlink()
        else:
            write_credential(registry.directory, name, content)
        await next_change(subscription)
        assert registry.usable_count == sum(account.usable for account in registry.accounts.values())
    assert registry.usable_count == 0


async def test_sorted_names_follow_the_roster(registry: CredentialRegistry, planted: Planted) -> None:
    subscription = registry.subscribe()
    for name in ("b", "a", "c"):
        write_credential(registry.directory, name, oauth_credential(planted))
        await next_change(subscription)
    assert registry.sorted_names() == ["a", "b", "c"]
    (registry.directory / "credentials-b.json").unlink()
    await next_change(subscription)
    assert registry.sorted_names() == ["a", "c"]


async def test_a_directory_that_cannot_be_read_now_is_unknown_not_empty(tmp_path: Path, planted: Planted) -> None:
    """Out of descriptors, a rescan cannot even list the directory: the roster stays as last read,
    the trouble is said once, and the registry looks again until it can (then sees what changed)."""
    for name in ("a1", "a2"):
        write_credential(tmp_path, name, oauth_credential(planted))
    registry = CredentialRegistry(tmp_path, resync_interval=3600)
    await registry.start()
    taken: list[int] = []
    gc.collect()  # what earlier tests left to be finalized closes its descriptors now, not mid-test
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 32, limits[1]))
    try:
        with capture_logs() as logged:
            try:
                while True:
                    taken.append(os.open(os.devnull, os.O_RDONLY))
            except OSError:
                pass  # every descriptor this process may have is taken
            await registry.resync()
            assert sorted(registry.accounts) == ["a1", "a2"]
            await registry.resync()
            for fd in taken:
                os.close(fd)
            taken = []
            write_credential(tmp_path, "a3", oauth_credential(planted))
            for _ in range(2000):  # the registry looks again every second until it can
                if "a3" in registry.accounts and any(e["event"].endswith("readable again") for e in logged):
                    break
                await asyncio.sleep(0.01)
        events = [entry["event"] for entry in logged]
        assert events.count("credentials directory cannot be read now: keeping the roster as last read") == 1
        assert "credentials directory readable again" in events
        assert "account removed" not in events
        assert "a3" in registry.accounts
    finally:
        for fd in taken:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)
        await registry.stop()
