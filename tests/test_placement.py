"""Placement properties: never on a walled, removed, invalid or full account; the policy's choice."""

from __future__ import annotations

import asyncio
import dataclasses
import fnmatch
import functools
import time

import hypothesis
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from cl.config import PLACEMENTS, Config
from cl.credentials import Account, AccountState
from cl.pacing import Outlook, clearly_emptier, early_move, move_cost, worth_waiting
from cl.placement import Placer, at_once, choose, eligible, limit, serving
from cl.states import RESCUABLE, RunState
from cl.store import AccountSettings, Facts, NoRoom, Store, WallRecord, Window

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


@given(worlds(), st.sampled_from(PLACEMENTS))
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
def test_pace_where_no_window_was_read_orders_as_headroom(world: tuple) -> None:  # type: ignore[type-arg]
    """Direct mode reads no window: the default policy is then `headroom`, not the names' order."""
    roster, walled, live, usage, max_sessions = world
    candidates = eligible(usable(roster), walled, live, max_sessions)
    assert choose(candidates, live, usage, "pace") == choose(candidates, live, usage, "headroom")
    assert Config().placement == "pace"


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


@given(
    worlds(),
    st.dictionaries(NAMES, SETTINGS),
    st.none() | st.sampled_from(["opus", "claude-sonnet-4", "gpt"]),
    st.sampled_from(PLACEMENTS),
)
def test_never_on_a_paused_or_own_limit_full_account_or_one_that_may_not_serve_the_model(
    world: tuple,  # type: ignore[type-arg]
    settings: dict[str, AccountSettings],
    model: str | None,
    policy: str,
) -> None:
    roster, walled, live, usage, max_sessions = world
    candidates = serving(eligible(usable(roster), walled, live, max_sessions, settings=settings), model, settings)
    chosen = choose(candidates, live, usage, policy)
    if chosen is None:
        return
    own = settings.get(chosen, AccountSettings(chosen))
    assert own.paused_at is None
    assert live.get(chosen, 0) < (own.max_sessions or max_sessions)
    assert model is None or own.models is None or any(fnmatch.fnmatchcase(model, p) for p in own.models)


@given(worlds(), st.sets(NAMES))
def test_never_on_an_account_another_host_of_the_fleet_serves(world: tuple, aside: set[str]) -> None:  # type: ignore[type-arg]
    roster, walled, live, _usage, max_sessions = world
    facts = Facts(
        [], {name: WallRecord(name, None, None, "cli", 0.0) for name in walled}, frozenset(), live, {}, aside=aside
    )
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
    facts = Facts(
        [], {name: WallRecord(name, None, None, "test", 0.0) for name in walled}, frozenset(), dict(live), usage
    )
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
    placer = Placer(usable(roster), Facts([], {}, frozenset(), {"a1": 1}, {}), 4, "headroom", at_once=3)

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


NOW = time.time()  # as a Placer reads the clock
HOUR = 3600.0


def windows(**accounts: tuple[float, float, float | None]) -> dict[str, dict[str, Window]]:
    """Each account's 5-hour window: (utilization, hours to its reset, burn per hour)."""
    return {
        name: {"five_hour": Window(used, NOW + hours * HOUR, rate)} for name, (used, hours, rate) in accounts.items()
    }


def placed(policy: str, facts: Facts, count: int, usable: list[str]) -> list[str]:
    """Where a pass puts `count` new sessions."""
    placer = Placer(usable, facts, 10, policy)
    return [choice[0] for _ in range(count) if (choice := placer.assign()) is not None]


def test_pace_spreads_a_herd_by_projection_where_headroom_fills_the_emptiest() -> None:
    """a1 is empty, a2 30% used with one session burning 5% an hour (a1's rate unmeasured: the
    fleet's per session), 5 hours to both resets: each session placed counts at once (25% by the
    reset), so the herd goes to a1 until it is projected past move_at, then to a2, then to the
    lower projection."""
    shape = windows(a1=(0.0, 5, None), a2=(0.3, 5, 0.05))
    facts = Facts([], {}, frozenset(), {"a2": 1}, {"a2": {"five_hour": 0.3}}, windows=shape)
    assert placed("headroom", dataclasses.replace(facts, live={"a2": 1}), 6, ["a1", "a2"]) == ["a1"] * 6
    went = placed("pace", dataclasses.replace(facts, live={"a2": 1}), 6, ["a1", "a2"])
    assert went == ["a1", "a1", "a1", "a2", "a1", "a2"]


def test_pace_drains_the_account_whose_weekly_window_resets_soonest() -> None:
    weekly = {
        "a1": {"seven_day": Window(0.5, NOW + 100 * HOUR, None)},
        "a2": {"seven_day": Window(0.7, NOW + 10 * HOUR, None)},
    }
    facts = Facts([], {}, frozenset(), {}, {}, windows=weekly)
    outlook = Outlook(weekly, {}, NOW)
    assert choose(["a1", "a2"], {}, {}, "pace", outlook=outlook) == "a2"  # its unused 30% is lost in 10 h
    assert choose(["a1", "a2"], {}, {}, "headroom") == "a1"
    assert placed("pace", facts, 1, ["a1", "a2"]) in (["a1"], ["a2"])  # (the Placer reads the clock)


def test_pace_leaves_a_week_nearly_used_for_one_with_more_left_per_hour_to_its_reset() -> None:
    """a1's week resets in 40 hours with 10% left (0.25% an hour to use it all), a2's in 100 hours
    with 80% left (0.8% an hour): a2 goes first, though a1 resets sooner. Drained to the last unit
    one after the other, the weeks would leave a single account with budget before a reset, and
    its 5-hour window cannot carry a fleet's sessions alone; used alongside, they can."""
    weekly = {
        "a1": {"seven_day": Window(0.9, NOW + 40 * HOUR, None)},
        "a2": {"seven_day": Window(0.2, NOW + 100 * HOUR, None)},
    }
    outlook = Outlook(weekly, {}, NOW)
    assert outlook.weekly_left_per_hour("a1") == pytest.approx(0.1 / 40)
    assert choose(["a1", "a2"], {}, {}, "pace", outlook=outlook) == "a2"
    weekly["a1"]["seven_day"] = Window(0.5, NOW + 40 * HOUR, None)  # 1.25% an hour: a1 first
    assert choose(["a1", "a2"], {}, {}, "pace", outlook=Outlook(weekly, {}, NOW)) == "a1"


def test_pace_drains_the_soonest_weekly_reset_even_if_its_week_is_projected_past_full() -> None:
    """a1's week resets in 10 hours and, at its pace, would be used up before: it still goes
    first (what is left of it at the reset is lost; if it walls, its sessions move). a2's week
    has 100 hours to go."""
    weekly = {
        "a1": {"seven_day": Window(0.6, NOW + 10 * HOUR, 0.1)},
        "a2": {"seven_day": Window(0.3, NOW + 100 * HOUR, 0.001)},
    }
    live = {"a1": 1, "a2": 1}
    outlook = Outlook(weekly, live, NOW)
    assert outlook.projected("a1", 2) > 1
    assert choose(["a1", "a2"], live, {}, "pace", outlook=outlook) == "a1"


def test_pace_keeps_off_an_account_projected_past_move_at() -> None:
    shape = windows(a1=(0.9, 4, 0.1), a2=(0.5, 1, 0.1))  # a1: 0.9 + 0.1 x 4 h = 1.3 with one more
    shape["a1"]["seven_day"] = Window(0.5, NOW + 5 * HOUR, None)  # and its week resets first: no matter
    shape["a2"]["seven_day"] = Window(0.5, NOW + 50 * HOUR, None)
    outlook = Outlook(shape, {"a1": 1, "a2": 1}, NOW)
    assert choose(["a1", "a2"], {"a1": 1, "a2": 1}, {}, "pace", outlook=outlook) == "a2"
    assert outlook.projected("a1", 2) == pytest.approx(0.9 + 0.1 * 2 * 4)


def test_a_window_past_its_reset_is_empty_again() -> None:
    outlook = Outlook(windows(a1=(0.99, -1, 0.1)), {}, NOW)
    assert outlook.used("a1") == 0.0
    assert outlook.standing("a1", "five_hour") is None


def test_an_account_is_after_a_wall_in_the_period_that_follows_one_used_up() -> None:
    def after_wall(**periods: Window) -> bool:
        return Outlook({"a1": periods}, {}, NOW).after_wall("a1")

    assert after_wall(five_hour=Window(0.1, NOW + HOUR, None, after_wall=True))
    assert not after_wall(five_hour=Window(0.1, NOW + HOUR, None))
    assert after_wall(five_hour=Window(1.0, NOW - 1, None))  # reset since it was read used up
    assert not after_wall(five_hour=Window(0.9, NOW - 1, None))
    assert after_wall(five_hour=Window(0.3, NOW - 1, None), seven_day=Window(1.0, NOW - 1, None))
    assert not after_wall(five_hour=Window(1.0, NOW + HOUR, None))  # still walled: not after
    assert not after_wall()


def test_a_window_sustains_the_sessions_its_budget_lasts_to_its_reset() -> None:
    """Half left, 2 hours to go, 0.125 an hour per session (its own rate shared by its 2, or the
    fleet's per session where it has none): 2 sessions; one while no rate is known."""
    own = Outlook(windows(a1=(0.5, 2, 0.25)), {"a1": 2}, NOW)
    assert own.sustains("a1") == 2
    fleet = Outlook(windows(a1=(0.5, 2, None), a2=(0.2, 2, 0.125)), {"a1": 0, "a2": 1}, NOW)
    assert fleet.sustains("a1") == 2
    assert Outlook(windows(a1=(0.5, 2, None)), {}, NOW).sustains("a1") == 1
    assert Outlook(windows(a1=(0.99, 2, 0.25)), {"a1": 2}, NOW).sustains("a1") == 1  # at least one


@pytest.mark.parametrize("policy", ["pace", "headroom"])
def test_after_a_wall_an_account_takes_only_the_sessions_its_window_sustains(policy: str) -> None:
    """a1's 5-hour window reset after a wall (read used up, not since); the fleet's sessions burn
    0.125 an hour each and a 5-hour window has 4 hours to go: a fresh one sustains 2. With the
    ramp, a herd of 5 puts 2 on it, and the ramp is what holds it (`ramping`); without, 5."""
    shape = windows(a2=(0.9, 4, 0.125))
    shape["a1"] = {"five_hour": Window(1.0, NOW - 60, 0.5)}

    def herd(ramp: bool, max_sessions: int = 10) -> tuple[list[str], tuple[str, ...]]:
        facts = Facts([], {}, frozenset(), {"a2": 1}, {}, windows=shape)  # its own: a Placer counts in its live
        placer = Placer(["a1"], facts, max_sessions, policy, ramp=ramp)
        return [choice[0] for _ in range(5) if (choice := placer.assign()) is not None], placer.ramping

    assert herd(ramp=True) == (["a1", "a1"], ("a1",))
    assert herd(ramp=False) == (["a1"] * 5, ())
    assert herd(ramp=True, max_sessions=2) == (["a1", "a1"], ())  # its own limit holds it, not the ramp


def test_pace_charges_a_session_its_own_rate_not_the_accounts_rate_over_those_left() -> None:
    """a1's 5-hour window burned 0.2 an hour with four sessions on it, 0.05 each; three moved
    away. Each session's own rate says a1 takes three more before its window (4 hours to go) is
    projected past `move_at`, and it goes first (its week resets sooner). The account's rate
    shared among the one left would charge each new session 0.2 an hour: none would fit."""
    week = {"a1": NOW + 24 * HOUR, "a2": NOW + 100 * HOUR}
    shape = {
        name: {
            "five_hour": Window(0.05, NOW + 4 * HOUR, 0.2 if name == "a1" else None, per_session=per_session),
            "seven_day": Window(0.3, week[name], None),
        }
        for name, per_session in (("a1", 0.05), ("a2", None))
    }
    facts = Facts([], {}, frozenset(), {"a1": 1}, {}, windows=shape)
    assert placed("pace", facts, 4, ["a1", "a2"]) == ["a1", "a1", "a1", "a2"]


def test_round_robin_takes_each_account_in_turn() -> None:
    usage: dict[str, dict[str, float | None]] = {"a1": {"last_used_at": 30.0}, "a2": {"last_used_at": 10.0}}
    facts = Facts([], {}, frozenset(), {}, usage)
    assert placed("round-robin", facts, 5, ["a1", "a2", "a3"]) == ["a3", "a2", "a1", "a3", "a2"]


def test_pause_at_keeps_new_work_off_an_account_that_full() -> None:
    shape = {"a1": {"seven_day": Window(0.91, time.time() + HOUR, None)}, "a2": {}}
    settings = {"a1": AccountSettings("a1", pause_at=0.9), "a2": AccountSettings("a2", pause_at=0.9)}
    facts = Facts([], {}, frozenset(), {}, {}, settings=settings, windows=shape)
    assert placed("headroom", facts, 2, ["a1", "a2"]) == ["a2", "a2"]
    lower = dataclasses.replace(facts, settings={"a1": AccountSettings("a1", pause_at=0.95)})
    assert "a1" in placed("fill-first", lower, 2, ["a1"])


class TestEarlyMoves:
    """`pacing.early_move`: the hold-or-move choice at a turn's start."""

    def test_a_window_past_move_at_that_would_be_used_up_before_its_reset_moves(self) -> None:
        outlook = Outlook(windows(a1=(0.96, 2 + 10 / 60, 0.1)), {"a1": 1}, NOW)  # used up in 24 min
        assert early_move(outlook, "a1", 0.95) == (True, "moved early: a1 at 96% of 5h, resets in 2h10m")

    def test_a_window_that_resets_before_it_would_be_used_up_holds(self) -> None:
        outlook = Outlook(windows(a1=(0.96, 0.1, 0.1)), {"a1": 1}, NOW)  # resets in 6 min, used up in 24
        move, reason = early_move(outlook, "a1", 0.95)
        assert not move
        assert reason == "held: a1 at 96% of 5h, resets in 6m00s, before it would be used up (in 24m00s)"

    def test_an_unmeasured_rate_moves_and_a_window_under_move_at_holds(self) -> None:
        assert early_move(Outlook(windows(a1=(0.97, 0.1, None)), {}, NOW), "a1", 0.95)[0]
        assert early_move(Outlook(windows(a1=(0.5, 3, 1.0)), {}, NOW), "a1", 0.95) == (
            False,
            "a1 is under move_at (95%)",
        )

    def test_a_wall_that_resets_sooner_than_a_move_repays_holds(self) -> None:
        """a1 at 96%, used up in 2 minutes, resets in 6: the 4 minutes at the wall cost the session
        less than a move that costs it 5 minutes of its work, more than one that costs 3."""
        outlook = Outlook(windows(a1=(0.96, 0.1, 1.2)), {"a1": 1}, NOW)
        move, reason = early_move(outlook, "a1", 0.95, cost=300.0, most=300.0)
        assert not move
        assert reason.startswith("held: a1 at 96% of 5h, resets in 6m00s, ")  # 4 minutes, give or take a float's
        assert reason.endswith(" after it would be used up, less than a move costs (5m00s)")
        assert early_move(outlook, "a1", 0.95, cost=180.0, most=300.0)[0]
        assert early_move(outlook, "a1", 0.95, cost=300.0)[0]  # max_wait_for_reset = 0, the default: never
        assert early_move(outlook, "a1", 0.95)[0]  # a cost not measured: it moves

    def test_a_moves_cost_is_the_sessions_context_written_cold_at_the_rate_it_spends(self) -> None:
        # 1,000 tokens of context; 9,000 read and 1,000 written in 100 s: 2,150 tokens' worth, so
        # the 1,150 more its context costs cold than warm are 53.5 s of its work
        assert move_cost(1000, 9000, 1000, 100.0) == pytest.approx(1150 * 100 / 2150)
        assert move_cost(None, 9000, 1000, 100.0) is None  # no answer measured yet
        assert move_cost(1000, 0, 0, 100.0) is None
        assert worth_waiting(50.0, 60.0, 300.0)
        assert not worth_waiting(70.0, 60.0, 300.0)
        assert not worth_waiting(50.0, None, 300.0)
        assert not worth_waiting(301.0, 10_000.0, 300.0)  # within max_wait_for_reset
        assert not worth_waiting(50.0, 60.0, 0.0)  # the default: never

    def test_the_apis_warning_counts_as_crossing(self) -> None:
        outlook = Outlook(windows(a1=(0.8, 3, 1.0)), {"a1": 1}, NOW)
        assert early_move(outlook, "a1", 0.95, warned="five_hour")[0]

    def test_only_an_account_with_clearly_more_room_takes_it(self) -> None:
        shape = windows(a1=(0.96, 3, 0.1), a2=(0.8, 3, 0.01), a3=(0.3, 3, 0.05))
        live = {"a1": 1, "a2": 1, "a3": 1}
        outlook = Outlook(shape, live, NOW)
        assert [n for n in ("a2", "a3") if clearly_emptier(outlook, live, "a1", 0.95, n)] == ["a3"]
