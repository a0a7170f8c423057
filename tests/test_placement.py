"""Placement properties: never on a walled, removed, invalid or full account; the policy's choice."""

from __future__ import annotations

import asyncio
import dataclasses
import fnmatch
import functools

import hypothesis
from hypothesis import example, given
from hypothesis import strategies as st

from cl.config import Config
from cl.credentials import Account, AccountState
from cl.placement import Placer, at_once, choose, eligible, limit, serving
from cl.states import RESCUABLE, RunState
from cl.store import AccountSettings, Facts, NoRoom, Store, WallRecord

NAMES = st.sampled_from([f"a{i}" for i in range(8)])
STATES = st.sampled_from(list(AccountState))
UTILIZATION = st.none() | st.floats(0, 1)


def usable(roster: dict[str, Account]) -> list[str]:
    """The accounts of a roster work may go to, walls and room aside (`Service.usable`)."""
    return [name for name, account in roster.items() if account.usable]


@st.composite
def worlds(
    draw: st.DrawFn,
) -> tuple[dict[str, Account], set[str], dict[str, int], dict[str, dict[str, float | None]], int]:
    roster = {name: Account(name, draw(STATES)) for name in draw(st.sets(NAMES))}
    known = sorted(set(roster) | draw(st.sets(NAMES)))  # the store may hold facts about removed accounts
    walled = draw(st.sets(st.sampled_from(known))) if known else set()
    live = {name: draw(st.integers(0, 5)) for name in known}
    usage = {
        name: {
            "five_hour": draw(UTILIZATION),
            "seven_day": draw(UTILIZATION),
            "last_used_at": draw(st.none() | st.floats(0, 1e9)),
        }
        for name in known
    }
    return roster, walled, live, usage, draw(st.integers(1, 4))


@given(worlds(), st.sampled_from(["headroom", "fill-first"]))
def test_never_on_an_ineligible_account(world: tuple, policy: str) -> None:  # type: ignore[type-arg]
    roster, walled, live, usage, max_sessions = world
    candidates = eligible(usable(roster), walled, live, max_sessions)
    chosen = choose(candidates, live, usage, policy)
    if chosen is None:
        assert not any(
            a.state is AccountState.OK and a.name not in walled and live.get(a.name, 0) < max_sessions
            for a in roster.values()
        )
        return
    assert chosen in roster  # its file exists: removed accounts are never chosen
    assert roster[chosen].state is AccountState.OK
    assert chosen not in walled
    assert live.get(chosen, 0) < max_sessions


@given(worlds())
def test_headroom_takes_the_lowest_utilization(world: tuple) -> None:  # type: ignore[type-arg]
    roster, walled, live, usage, max_sessions = world
    candidates = eligible(usable(roster), walled, live, max_sessions)
    chosen = choose(candidates, live, usage, "headroom")
    if chosen is None:
        return

    def used(name: str) -> float:
        return max(usage[name]["five_hour"] or 0.0, usage[name]["seven_day"] or 0.0)

    assert used(chosen) == min(used(name) for name in candidates)


@given(worlds())
def test_fill_first_packs_the_busiest_account_with_room(world: tuple) -> None:  # type: ignore[type-arg]
    roster, walled, live, usage, max_sessions = world
    candidates = eligible(usable(roster), walled, live, max_sessions)
    chosen = choose(candidates, live, usage, "fill-first")
    if chosen is None:
        return
    assert live.get(chosen, 0) == max(live.get(name, 0) for name in candidates)


def test_an_account_on_probation_takes_one_session_at_a_time() -> None:
    roster = {name: Account(name, AccountState.OK) for name in ("a1", "a2")}
    assert eligible(usable(roster), set(), {"a2": 1}, 4, probation={"a1"}) == ["a1", "a2"]
    assert eligible(usable(roster), set(), {"a1": 1, "a2": 1}, 4, probation={"a1"}) == ["a2"]
    assert limit("a1", 4, {"a1"}) == 1
    assert limit("a2", 4, {"a1"}) == 4


SETTINGS = st.builds(
    AccountSettings,
    account=st.just(""),
    paused_at=st.none() | st.just(1.0),
    max_sessions=st.none() | st.integers(1, 6),
    models=st.none() | st.lists(st.sampled_from(["opus", "claude-sonnet-*", "haiku"]), min_size=1).map(tuple),
)


@given(worlds(), st.dictionaries(NAMES, SETTINGS), st.none() | st.sampled_from(["opus", "claude-sonnet-4", "gpt"]))
def test_never_on_a_paused_or_own_limit_full_account_or_one_that_may_not_serve_the_model(
    world: tuple,  # type: ignore[type-arg]
    settings: dict[str, AccountSettings],
    model: str | None,
) -> None:
    roster, walled, live, usage, max_sessions = world
    candidates = serving(eligible(usable(roster), walled, live, max_sessions, settings=settings), model, settings)
    chosen = choose(candidates, live, usage)
    if chosen is None:
        return
    own = settings.get(chosen, AccountSettings(chosen))
    assert own.paused_at is None
    assert live.get(chosen, 0) < (own.max_sessions or max_sessions)
    assert model is None or own.models is None or any(fnmatch.fnmatchcase(model, p) for p in own.models)


@given(worlds(), st.sets(NAMES))
def test_never_on_an_account_another_host_of_the_fleet_serves(world: tuple, aside: set[str]) -> None:  # type: ignore[type-arg]
    roster, walled, live, _usage, max_sessions = world
    facts = Facts([], {name: WallRecord(name, None, None, "cli", 0.0) for name in walled}, set(), live, {}, aside=aside)
    expected = set(eligible(usable(roster), walled, live, max_sessions)) - aside
    placer = Placer(usable(roster), facts, max_sessions, "headroom")
    taken: list[str] = []

    async def attempt(account: str, _limit: int) -> bool:
        taken.append(account)
        return True

    while asyncio.run(placer.take(attempt)):
        pass
    assert set(taken) == expected  # every other eligible account took work, none set aside did


@given(
    worlds(),
    st.dictionaries(NAMES, SETTINGS),
    st.sets(NAMES),
    st.lists(st.none() | st.sampled_from(["opus", "claude-sonnet-4", "gpt"]), max_size=12),
    st.sampled_from(["headroom", "fill-first"]),
)
@example(  # always tried: a model only the second account serves, the first of them full elsewhere
    world=({n: Account(n, AccountState.OK) for n in ("a0", "a1", "a2")}, set(), {}, {}, 1),
    settings={"a0": AccountSettings("", models=("opus",)), "a2": AccountSettings("", paused_at=1.0)},
    full_elsewhere={"a1"},
    models=["gpt", "opus", "opus", None],
    policy="headroom",
)
@hypothesis.settings(max_examples=300)
def test_a_placer_fills_accounts_up_to_their_limits_and_skips_those_full_elsewhere(
    world: tuple,  # type: ignore[type-arg]
    settings: dict[str, AccountSettings],
    full_elsewhere: set[str],
    models: list[str | None],
    policy: str,
) -> None:
    """A pass's `Placer` over many pieces of work: each goes to an account that may take it (room
    under its own limit, counting what this pass placed; not paused; serving its model); an account
    that turns out full inside its transaction (the other daemon got there first) is never tried
    again; a piece is left waiting only when no account may take it."""
    roster, walled, live, usage, max_sessions = world
    facts = Facts([], {name: WallRecord(name, None, None, "test", 0.0) for name in walled}, set(), dict(live), usage)
    facts = dataclasses.replace(facts, settings=settings)
    placer = Placer(usable(roster), facts, max_sessions, policy)
    placed: dict[str, int] = {}
    tried_full: list[str] = []

    async def attempt(model: str | None, account: str, room: int) -> bool:
        if account in full_elsewhere:
            tried_full.append(account)
            raise NoRoom(account)
        assert room == limit(account, max_sessions, set(), settings)
        assert settings.get(account, AccountSettings(account)).serves(model)
        placed[account] = placed.get(account, 0) + 1
        return True

    async def place_all() -> list[bool]:
        return [await placer.take(functools.partial(attempt, model), model) for model in models]

    taken = asyncio.run(place_all())
    assert len(tried_full) == len(set(tried_full))  # found full once, never tried again
    for name, count in placed.items():
        own = settings.get(name, AccountSettings(name))
        assert roster[name].state is AccountState.OK
        assert name not in walled
        assert own.paused_at is None
        assert live.get(name, 0) + count <= limit(name, max_sessions, set(), settings)
    for model, went in zip(models, taken, strict=True):
        open_now = [
            name
            for name in roster
            if roster[name].state is AccountState.OK
            and name not in walled
            and name not in full_elsewhere
            and settings.get(name, AccountSettings(name)).paused_at is None
            and settings.get(name, AccountSettings(name)).serves(model)
            and live.get(name, 0) + placed.get(name, 0) < limit(name, max_sessions, set(), settings)
        ]
        if not went:  # it waits only if, even at the end of the pass, nothing could take it
            assert not open_now, (model, open_now)


def test_a_placer_places_no_more_live_runs_in_all_than_the_cli_has_users() -> None:
    roster = {name: Account(name, AccountState.OK) for name in ("a1", "a2")}
    placer = Placer(usable(roster), Facts([], {}, set(), {"a1": 1}, {}), 4, "headroom", at_once=3)

    async def attempt(_account: str, _room: int) -> bool:
        return True

    async def offer(count: int) -> list[bool]:
        return [await placer.take(attempt) for _ in range(count)]

    assert asyncio.run(offer(4)) == [True, True, False, False]  # one was live already
    assert placer.exhausted


def test_new_jobs_get_what_the_cli_pool_has_left_after_held_sessions(store: Store) -> None:
    """A held session's worker keeps its CLI's user: the balancer counts it, the store tells it."""
    job = store.add_job("/tmp", "p")
    run = store.place(job.id, "a1", 4)
    assert run is not None
    store.claim(run.id, 1, "", "/dev/null")
    store.settle(run.id, RunState.WALLED, "walled", held_until=4102444800.0)
    held = store.facts(RESCUABLE, 10).held
    assert held == 1
    sandboxed = Config(confinement="sandbox", cli_pool_size=16)
    assert (at_once(sandboxed, held), at_once(sandboxed), at_once(Config(confinement="none"), held)) == (15, 16, None)
