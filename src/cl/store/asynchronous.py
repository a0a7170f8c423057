"""The store for an event loop: `AsyncStore` runs each blocking `Store` call on one dedicated
thread, in order, so that the loop never waits on the database."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar

from cl.store.transactions import Store

P = ParamSpec("P")
R = TypeVar("R")


class _OnStoreThread(Generic[P, R]):
    """A `Store` method as a coroutine method of `AsyncStore`: the same arguments, run on the
    store's thread."""

    def __init__(self, method: Callable[Concatenate[Store, P], R]) -> None:
        self._method = method

    def __get__(self, instance: AsyncStore, owner: type[AsyncStore]) -> Callable[P, Coroutine[Any, Any, R]]:
        method = self._method

        async def on_store_thread(*args: P.args, **kwargs: P.kwargs) -> R:
            return await instance.call(method, *args, **kwargs)

        return on_store_thread


class AsyncStore:
    """`Store` for the event loop: every call runs on one dedicated thread, in order, and SQLite's
    operational errors (locked, disk full, I/O, the server gone) come out as `StoreUnavailable`."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store")

    async def call(self, function: Callable[Concatenate[Store, P], R], *args: P.args, **kwargs: P.kwargs) -> R:
        """`function(store, *args, **kwargs)` on the store's thread (several store calls as one step)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: function(self._store, *args, **kwargs))

    add_job = _OnStoreThread(Store.add_job)
    capability_run = _OnStoreThread(Store.capability_run)
    logged_in = _OnStoreThread(Store.logged_in)
    move_in_flight = _OnStoreThread(Store.move_in_flight)
    needs_login = _OnStoreThread(Store.needs_login)
    record_cache = _OnStoreThread(Store.record_cache)
    record_usage = _OnStoreThread(Store.record_usage)
    record_wall = _OnStoreThread(Store.record_wall)
    walls = _OnStoreThread(Store.walls)
    windows = _OnStoreThread(Store.windows)
    answered_as_wall = _OnStoreThread(Store.answered_as_wall)
    cancel_job = _OnStoreThread(Store.cancel_job)
    cut_off = _OnStoreThread(Store.cut_off)
    facts = _OnStoreThread(Store.facts)
    get_job = _OnStoreThread(Store.get_job)
    get_run = _OnStoreThread(Store.get_run)
    give_up = _OnStoreThread(Store.give_up)
    held_run = _OnStoreThread(Store.held_run)
    history = _OnStoreThread(Store.history)
    events = _OnStoreThread(Store.events)
    homes = _OnStoreThread(Store.homes)
    hosts = _OnStoreThread(Store.hosts)
    job_runs = _OnStoreThread(Store.job_runs)
    jobs_with_session = _OnStoreThread(Store.jobs_with_session)
    lapsed = _OnStoreThread(Store.lapsed)
    latest_run = _OnStoreThread(Store.latest_run)
    let_go = _OnStoreThread(Store.let_go)
    oldest_queued = _OnStoreThread(Store.oldest_queued)
    place = _OnStoreThread(Store.place)
    place_many = _OnStoreThread(Store.place_many)
    send = _OnStoreThread(Store.send)
    served_below = _OnStoreThread(Store.served_below)
    prune = _OnStoreThread(Store.prune)
    publish = _OnStoreThread(Store.publish)
    queue_length = _OnStoreThread(Store.queue_length)
    reached = _OnStoreThread(Store.reached)
    requeue = _OnStoreThread(Store.requeue)
    runs_in = _OnStoreThread(Store.runs_in)
    set_account = _OnStoreThread(Store.set_account)
    settings = _OnStoreThread(Store.settings)
    settle = _OnStoreThread(Store.settle)
    snapshot = _OnStoreThread(Store.snapshot)
    troubles = _OnStoreThread(Store.troubles)
    waited_for_answer = _OnStoreThread(Store.waited_for_answer)

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self._store.close()
