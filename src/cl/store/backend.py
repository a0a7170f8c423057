"""What a backend gives the store's transactions (`cl.store.transactions`), and the SQL helpers
both backends share.

A backend owns its connections, its schema and migrations, and the little SQL that differs
between engines (`Backend.iso_utc`, `Backend.json_rows`). Everything else is written once, with `?` placeholders,
against `Db`: rows come back indexable by position and by column name, and a backend's
operational failures (locked, disk full, connection lost) come out as `StoreUnavailable`.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

from cl.states import RunState
from cl.store.records import Run


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Db(Protocol):
    """A connection inside a transaction (or a plain read)."""

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> Cursor: ...

    def executemany(self, sql: str, parameters: Iterable[Sequence[Any]], /) -> Cursor: ...


class Lookup(Protocol):
    """Reads on an event loop's own thread that never wait: `StoreUnavailable` instead (then ask
    the store's thread)."""

    def capability_run(self, digest: str) -> Run | None: ...

    def close(self) -> None: ...


class Backend(Protocol):
    where: str
    """The file, or the server and database (never a password): for messages."""
    now: str
    """SQL: the database's clock, in epoch seconds (one clock for every host of a fleet)."""

    @staticmethod
    def iso_utc(column: str) -> str:
        """SQL: `column`'s epoch seconds as `2026-12-05T16:46:07Z`."""

    @staticmethod
    def json_rows(fields: str, rows: str) -> str:
        """SQL: a JSON array (text) of an object per row of `rows` (by `id`), `fields` its
        name, value pairs."""

    claiming: str
    """SQL after a SELECT of the rows a transaction is about to write: a row another writer
    holds is skipped, not waited for (PostgreSQL's `FOR UPDATE SKIP LOCKED`); empty where
    writers never interleave."""
    locking: str
    """SQL after a SELECT of a row a transaction is about to write: locked, waiting for another
    writer that holds it (`FOR UPDATE`); empty where writers never interleave."""

    @staticmethod
    def lock_accounts(db: Db, accounts: Sequence[str]) -> None:
        """Hold `accounts` for the rest of the transaction, in one order (no deadlock): whoever
        adds a run to an account holds it while it reads its room. Nothing where writers never
        interleave."""

    def transaction(self, *, write: bool, exclusive: bool = True) -> AbstractContextManager[Db]:
        """With `write`, a writer: `exclusive`, no other writer interleaves; not (PostgreSQL),
        only those that hold the same rows (`claiming`, `locking`) or accounts (`lock_accounts`)
        wait for each other. Without `write`, one consistent snapshot."""

    def reading(self) -> AbstractContextManager[Db]:
        """The open transaction's connection, or one for a read on its own."""

    def changes(self) -> Hashable | None:
        """A key that differs after any commit, anyone's; None if the backend has none (nothing
        read may then be kept)."""

    def schema_version(self) -> int: ...

    def compact(self) -> None:
        """Give back the space a large prune freed, if the engine does not by itself."""

    def lookup(self) -> Lookup | None: ...

    def close(self) -> None: ...


def sql_set(values: Sequence[object]) -> str:
    """`(?, ?, ...)`: placeholders only, the values are always bound."""
    return f"({', '.join('?' * len(values))})"


def inserted(db: Db, sql: str, parameters: Sequence[Any]) -> Any:
    """Run an INSERT; the new row, as inserted (no read after it)."""
    return db.execute(f"{sql} RETURNING *", parameters).fetchall()[0]


def inserted_many(db: Db, sql: str, rows: Sequence[Sequence[Any]]) -> list[Any]:
    """Run an INSERT for each of `rows`; the new rows, in order (pipelined where the backend's
    connection can: `inserted_many` of its own)."""
    many = getattr(db, "inserted_many", None)
    if many is not None:
        return list(many(f"{sql} RETURNING *", rows))
    return [inserted(db, sql, row) for row in rows]


def capability_run(db: Db, digest: str) -> Run | None:
    row = db.execute(
        "SELECT runs.* FROM capabilities JOIN runs ON runs.id = capabilities.run_id"
        " WHERE capabilities.digest = ? AND runs.state = ?",
        (digest, RunState.RUNNING),
    ).fetchone()
    return Run(*row) if row else None


def illegal_transition(transitions: Mapping[Any, Iterable[Any]]) -> str:
    """The condition (on OLD and NEW rows) of a state change `transitions` does not allow: each
    backend's trigger is made from the tables of `cl.states`, so there is one table, not two."""
    allowed = " OR ".join(
        f"(OLD.state = '{source}' AND NEW.state IN ({', '.join(repr(str(t)) for t in sorted(targets))}))"
        for source, targets in transitions.items()
        if targets
    )
    return f"OLD.state <> NEW.state AND NOT ({allowed})"
