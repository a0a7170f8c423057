"""`CredentialRegistry`: the live account roster, derived from the credentials directory.

This is the only code that reads the directory, and the roster lives nowhere else. Every
watch event is a hint: the named file is re-read from disk and the result is compared with
what is known. Behind inotify (watchfiles) a periodic full resync catches what inotify can
lose (a queue overflow); the directory's parent is watched too, so that a deleted and
recreated directory is noticed and re-armed. Subscribers get every added / changed /
removed account, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

import structlog
import watchfiles

from cl.credentials import (
    Account,
    AccountState,
    FileSignature,
    account_name,
    credential_filename,
    near_miss,
    read_account,
)

log = structlog.get_logger("cl.registry")

T = TypeVar("T")
SLOW_READ = 1.0
"""Seconds after which reading the directory counts as slow (and says so in the log)."""

_Read = tuple[Account, FileSignature | None]


class ChangeKind(enum.StrEnum):
    ADDED = "added"
    CHANGED = "changed"
    REMOVED = "removed"


@dataclass(frozen=True, slots=True)
class AccountChange:
    kind: ChangeKind
    name: str
    account: Account | None
    """The account now; None when removed."""
    previous: Account | None
    """The account before; None when added."""


@dataclass(frozen=True, slots=True)
class _Scan:
    found: dict[str, _Read | None]
    """Every credential file present; None where the signature is unchanged (not re-read)."""
    near_misses: dict[str, Misnamed]
    """Files meant as credential files whose names are not one, by file name."""


@dataclass(frozen=True, slots=True)
class Misnamed:
    """A file an operator probably meant as a credential file, and the name to give it."""

    rename_to: str
    content: tuple[int, int, int]
    """Its inode, size and modification time: a new content is reported again, a chmod is not."""


@dataclass(frozen=True, slots=True)
class _Unknown:
    """The directory could not be looked at now (no descriptors left, no memory): nothing is known
    about it, so nothing about the roster changes."""

    reason: str


class Subscription:
    """An async iterator of `AccountChange`s; `close()` it when done."""

    def __init__(self, subscribers: set[Subscription]) -> None:
        self._queue: asyncio.Queue[AccountChange] = asyncio.Queue()
        self._subscribers = subscribers
        subscribers.add(self)

    def put(self, change: AccountChange) -> None:
        self._queue.put_nowait(change)

    def close(self) -> None:
        self._subscribers.discard(self)

    def drain(self) -> list[AccountChange]:
        """The changes already queued, without waiting: to act once on a burst."""
        changes = []
        while not self._queue.empty():
            changes.append(self._queue.get_nowait())
        return changes

    def __aiter__(self) -> AsyncIterator[AccountChange]:
        return self

    async def __anext__(self) -> AccountChange:
        return await self._queue.get()


class CredentialRegistry:
    def __init__(
        self,
        directory: Path,
        *,
        resync_interval: float = 30.0,
        step_ms: int = 8,
        debounce_ms: int = 100,
    ) -> None:
        self.directory = Path(os.path.abspath(directory))
        self._resync_interval = resync_interval
        self._step_ms = step_ms
        self.debounce_ms = debounce_ms
        self._accounts: dict[str, Account] = {}
        self._usable = 0
        self.version = 0
        """Counts every change: equal versions, equal rosters."""
        self._sorted: tuple[int, list[str]] = (-1, [])
        self._signatures: dict[str, FileSignature | None] = {}
        self._subscribers: set[Subscription] = set()
        self._lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._reported: set[str] = set()
        self._misnamed: dict[str, Misnamed] = {}
        self._directory_missing = False
        self._unreadable: str | None = None
        """Why the directory could not be read just now, while it cannot; the roster is kept."""
        self._retry: asyncio.Task[None] | None = None
        self._loaded = False

    @property
    def accounts(self) -> Mapping[str, Account]:
        """The current roster, read-only. Do not keep it: ask again next time."""
        return MappingProxyType(self._accounts)

    def reconfigure(self, *, resync_interval: float, step_ms: int) -> None:
        """New timings from a reloaded configuration: the next resync waits the new interval, the
        watch takes the new step when it is next armed."""
        self._resync_interval = resync_interval
        self._step_ms = step_ms

    def sorted_names(self) -> list[str]:
        """The account names in order (sorted once per roster version). Do not keep it either."""
        if self._sorted[0] != self.version:
            self._sorted = (self.version, sorted(self._accounts))
        return self._sorted[1]

    @property
    def misnamed(self) -> dict[str, str]:
        """The files here meant as credential files whose names are not one: file -> the name to
        give it (from the last scan and every event since)."""
        return {filename: found.rename_to for filename, found in sorted(self._misnamed.items())}

    @property
    def usable_count(self) -> int:
        """How many accounts are usable now (kept as changes apply: O(1) at any size)."""
        return self._usable

    def subscribe(self) -> Subscription:
        return Subscription(self._subscribers)

    async def start(self) -> None:
        """Arm the watch, load the directory, then keep watching it until `stop()`."""
        self._tasks = [asyncio.create_task(self._watch(), name="registry-watch")]
        await asyncio.sleep(0)  # the watch task arms inotify in its first step: nothing slips by
        await self.resync()
        self._tasks.append(asyncio.create_task(self._resync_periodically(), name="registry-resync"))

    async def stop(self) -> None:
        self._stop.set()
        if self._retry is not None:
            self._retry.cancel()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def resync(self) -> None:
        """Rescan the whole directory; re-read only files whose `stat` changed."""
        async with self._lock:
            scan = await self._off_loop("a full rescan", _scan, self.directory, dict(self._signatures))
            self._apply_scan(scan)

    async def refresh(self, names: set[str]) -> None:
        """Re-read the named credential files from disk, whatever the event said."""
        async with self._lock:
            try:
                reads = await self._off_loop(", ".join(sorted(names)), self._read_names, names)
            except OSError as exc:  # short of descriptors or memory: these files are unknown for now
                self._cannot_look(_Unknown(os.strerror(exc.errno or 0)))
                return
            for name, read in reads.items():
                self._apply(name, read)

    async def _off_loop(self, what: str, call: Callable[..., T], *args: Any) -> T:
        """Disk work in a thread, so the loop keeps answering; a slow disk is said, not suffered."""
        started = time.monotonic()
        result = await asyncio.to_thread(call, *args)
        if (seconds := time.monotonic() - started) > SLOW_READ:
            log.warning("credentials directory is slow", reading=what, seconds=round(seconds, 1))
        return result

    def _read_names(self, names: set[str]) -> dict[str, _Read | None]:
        return {name: read_account(self.directory / credential_filename(name), name) for name in names}

    def _apply_scan(self, scan: _Scan | str | _Unknown) -> None:
        if isinstance(scan, _Unknown):
            self._cannot_look(scan)
            return
        if self._unreadable is not None:
            log.info("credentials directory readable again", directory=str(self.directory))
            self._unreadable = None
        found = self._note_directory(scan)
        now = time.time()
        for name in list(self._accounts):
            if name not in found:
                self._apply(name, None)
        for name, read in found.items():
            if read is not None:
                self._apply(name, read)
            elif self._accounts[name].expired_by(now):
                self._apply(name, (self._accounts[name].with_state(AccountState.EXPIRED), self._signatures[name]))
        if not self._loaded:
            self._loaded = True
            states = [account.state for account in self._accounts.values()]
            counts = {str(state): states.count(state) for state in AccountState if state in states}
            log.info("credentials loaded", directory=str(self.directory), accounts=len(states), **counts)

    def _cannot_look(self, unknown: _Unknown) -> None:
        """Unknown is not empty: keep the roster as last read, say so loudly once, and look again
        every second until the directory can be read."""
        if self._unreadable is None:
            log.error(
                "credentials directory cannot be read now: keeping the roster as last read",
                directory=str(self.directory),
                error=unknown.reason,
                accounts=len(self._accounts),
            )
        self._unreadable = unknown.reason
        if self._retry is None or self._retry.done():
            self._retry = asyncio.get_running_loop().create_task(self._look_again())

    async def _look_again(self) -> None:
        while self._unreadable is not None and not self._stop.is_set():
            await asyncio.sleep(1.0)
            await self.resync()

    def _note_directory(self, scan: _Scan | str) -> dict[str, _Read | None]:
        """Log the directory's comings and goings and odd names; what the scan found."""
        if isinstance(scan, str):
            if not self._directory_missing:
                log.warning("credentials directory unavailable", directory=str(self.directory), error=scan)
            self._directory_missing = True
            return {}
        if self._directory_missing:
            log.info("credentials directory available", directory=str(self.directory))
        self._directory_missing = False
        self._misnamed = {}
        for filename, found in scan.near_misses.items():
            self._note_misnamed(filename, found)
        return scan.found

    def _note_misnamed(self, filename: str, found: Misnamed | None) -> None:
        """A misnamed file, as a scan or an event found it (None: gone), reported once per content."""
        if found is None:
            self._misnamed.pop(filename, None)
            return
        self._misnamed[filename] = found
        self._report(
            f"name:{filename}:{found.content}",
            "file ignored: not a valid credential name",
            file=os.fsencode(filename).decode("ascii", "backslashreplace"),
            rename_to=found.rename_to,
            expected="credentials-<letters, digits, _ or -; up to 64>.json",
        )

    def _apply(self, name: str, read: _Read | None) -> None:
        previous = self._accounts.get(name)
        if read is None:
            if previous is not None:
                del self._accounts[name]
                del self._signatures[name]
                self._usable -= previous.usable
                self._publish(AccountChange(ChangeKind.REMOVED, name, None, previous))
            return
        account, signature = read
        self._signatures[name] = signature
        if account == previous:
            return
        self._accounts[name] = account
        self._usable += account.usable - (previous.usable if previous else False)
        kind = ChangeKind.ADDED if previous is None else ChangeKind.CHANGED
        self._publish(AccountChange(kind, name, account, previous))

    def _publish(self, change: AccountChange) -> None:
        self.version += 1
        self._log_change(change)
        for subscriber in list(self._subscribers):
            subscriber.put(change)

    def _log_change(self, change: AccountChange) -> None:
        account, previous = change.account, change.previous
        if account is None:
            log.info("account removed", account=change.name)
            return
        fields: dict[str, object] = {"account": change.name, "state": str(account.state)}
        if account.kind:
            fields["kind"] = str(account.kind)
        if previous is not None and previous.state != account.state:
            fields["was"] = str(previous.state)
        if account.reason:
            fields["reason"] = account.reason
        problem = account.state is not AccountState.OK
        again = previous is not None and (previous.state, previous.reason) == (account.state, account.reason)
        if problem and not again:  # the operator's cue: fix the file, or log in again (once per problem)
            fields["change"] = change.kind
            log.warning("account invalid" if account.state is AccountState.INVALID else "account needs login", **fields)
        elif self._loaded:
            log.info(f"account {change.kind}", **fields)
        if account.exposed and not (previous and previous.exposed):
            log.warning(
                "credential readable by group or others",
                account=change.name,
                hint="chmod 0600 the file",
            )

    def _report(self, key: str, event: str, **fields: object) -> None:
        """Log a problem once per process, however many scans see it."""
        if key not in self._reported:
            self._reported.add(key)
            log.warning(event, **fields)

    def _watch_roots(self) -> list[Path]:
        """The directory (if present) and its nearest existing ancestor."""
        anchor = self.directory.parent
        while not anchor.is_dir() and anchor != anchor.parent:
            anchor = anchor.parent
        return [anchor, self.directory] if self.directory.is_dir() else [anchor]

    def _is_root_event(self, path: str) -> bool:
        directory = str(self.directory)
        return path == directory or directory.startswith(path.rstrip(os.sep) + os.sep)

    def _is_relevant(self, _change: watchfiles.Change, path: str) -> bool:
        head, tail = os.path.split(path)
        named = account_name(tail) is not None or near_miss(tail) is not None  # a misnamed one: said at once
        return (head == str(self.directory) and named) or self._is_root_event(path)

    async def _watch(self) -> None:
        while not self._stop.is_set():
            roots = self._watch_roots()
            # On a re-arm: scheduled now, this runs once awatch has armed inotify (it does so
            # before its first await), so whatever landed while the watch was down is found.
            rescan = asyncio.create_task(self.resync()) if self._loaded else None
            watcher = watchfiles.awatch(
                *roots,
                watch_filter=self._is_relevant,
                step=self._step_ms,
                debounce=self.debounce_ms,
                recursive=False,
                stop_event=self._stop,
            )
            try:
                async with contextlib.aclosing(watcher):
                    async for batch in watcher:
                        if any(self._is_root_event(path) for _, path in batch):
                            break  # the directory came or went: re-arm on the new one
                        files = {os.path.basename(path) for _, path in batch}
                        for filename in files:
                            if near_miss(filename) is not None:
                                self._note_misnamed(filename, _misnamed(self.directory / filename))
                        names = {account_name(filename) for filename in files}
                        await self.refresh({name for name in names if name})
            except Exception as exc:  # noqa: BLE001 - any watcher failure: log, rescan, re-arm
                log.error("watch failed, retrying in 1s", directory=str(self.directory), error=str(exc))
                await asyncio.sleep(1)
            if rescan is not None:
                await rescan

    async def _resync_periodically(self) -> None:
        while True:
            await asyncio.sleep(self._resync_interval)
            try:
                await self.resync()
            except Exception:
                log.exception("resync failed", directory=str(self.directory))


def _scan(directory: Path, signatures: Mapping[str, FileSignature | None]) -> _Scan | str | _Unknown:
    """List the directory and read what changed (runs in a thread); or why it is not there (a
    string: it is gone, the roster empties), or that it cannot be read now (`_Unknown`)."""
    try:
        return _scan_entries(directory, signatures)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return os.strerror(exc.errno)
        return _Unknown(os.strerror(exc.errno or 0))


def _scan_entries(directory: Path, signatures: Mapping[str, FileSignature | None]) -> _Scan:
    found: dict[str, _Read | None] = {}
    near_misses: dict[str, Misnamed] = {}
    entries = os.scandir(directory)
    with entries:
        for entry in entries:
            name = account_name(entry.name)
            if name is None:
                if (misnamed := _misnamed(Path(entry.path))) is not None:
                    near_misses[entry.name] = misnamed
                continue
            try:
                signature = FileSignature.of(entry.stat(follow_symlinks=False))
            except FileNotFoundError:
                continue
            if name in signatures and signatures[name] == signature:
                found[name] = None
            elif (read := read_account(entry.path, name)) is not None:
                found[name] = read
    return _Scan(found, near_misses)


def _misnamed(path: Path) -> Misnamed | None:
    """The misnamed file at `path`, or None if its name is no near miss or it is gone."""
    if (better := near_miss(path.name)) is None:
        return None
    try:
        st = path.lstat()
    except OSError:
        return None
    return Misnamed(better, (st.st_ino, st.st_size, st.st_mtime_ns))
