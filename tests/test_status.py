"""The `status` reply's accounts: rendered once per roster version, facts patched in per request."""

from __future__ import annotations

import json
from pathlib import Path

from cl.registry import CredentialRegistry
from cl.status import StatusView
from cl.store import AccountCounts, AccountSettings, Listing, Snapshot, UsageRow, WallRecord
from utils import Planted, oauth_credential, write_credential


def snapshot(
    walls: dict[str, WallRecord],
    live: dict[str, int],
    usage: dict[str, UsageRow],
    settings: dict[str, AccountSettings] | None = None,
    probation: frozenset[str] = frozenset(),
) -> Snapshot:
    return Snapshot(Listing("[]", "[]", 0), AccountCounts(live, usage), walls, settings or {}, probation=probation)


IDLE = {"state": "ok", "reason": None, "window": None, "walled_until": None, "sessions": 0}


async def test_accounts_follow_the_roster_and_show_only_its_facts(tmp_path: Path, planted: Planted) -> None:
    for name in ("a1", "a2", "a3"):
        write_credential(tmp_path, name, oauth_credential(planted))
    write_credential(tmp_path, "bad", "{")
    registry = CredentialRegistry(tmp_path)
    await registry.resync()
    view = StatusView(registry)
    facts = snapshot(
        walls={
            "a1": WallRecord("a1", "five_hour", 1_900_000_000.0, "result", 0.0),
            "gone": WallRecord("gone", None, None, "text", 0.0),
        },
        live={"a2": 2, "gone": 1},
        usage={"a2": (0.5, None, 7, 0)},
    )

    def accounts(facts: Snapshot = facts) -> dict[str, dict[str, object]]:
        reply = json.loads(view.render(facts))
        assert view.render(facts) is view.render(facts)  # asked again, nothing changed: kept
        assert set(reply) == {"accounts", "sessions", "jobs", "queue", "hidden", "blocked", "ramping"}
        return {account.pop("name"): account for account in reply["accounts"]}

    shown = accounts()
    assert str(shown["bad"].pop("reason")).startswith("malformed JSON")
    walled = {**IDLE, "state": "walled", "window": "five_hour", "walled_until": "2030-03-17T17:46:40Z"}
    assert shown == {
        "a1": walled,
        "a2": {**IDLE, "sessions": 2, "usage": {"five_hour": 0.5, "input_tokens": 7, "output_tokens": 0}},
        "a3": IDLE,
        "bad": {"state": "invalid", "window": None, "walled_until": None, "sessions": 0},
    }
    later = snapshot(walls={}, live={"a2": 1}, usage={"a3": (None, 0.25, 0, 0)})
    shown = accounts(later)  # the wall on a1 ended, a2's usage is gone, a3 has some
    assert shown["a1"] == IDLE
    assert shown["a2"] == {**IDLE, "sessions": 1}
    assert shown["a3"] == {**IDLE, "usage": {"seven_day": 0.25, "input_tokens": 0, "output_tokens": 0}}
    assert accounts(facts)["a1"] == walled  # and back
    on_probation = accounts(snapshot(walls={}, live={}, usage={}, probation=frozenset({"a1", "gone"})))
    assert (on_probation["a1"]["state"], on_probation["a2"]["state"]) == ("probation", "ok")
    assert "gone" not in on_probation
    (tmp_path / "credentials-a3.json").unlink()
    write_credential(tmp_path, "gone", oauth_credential(planted))
    await registry.resync()
    shown = accounts()
    assert sorted(shown) == ["a1", "a2", "bad", "gone"]
    assert shown["gone"] == {**IDLE, "state": "walled", "sessions": 1}  # a wall with no known reset
    paused = AccountSettings("a2", paused_at=1_900_000_000.0, models=("opus",))
    shown = accounts(snapshot(walls={}, live={}, usage={}, settings={"a2": paused, "elsewhere": paused}))
    assert shown["a2"]["settings"] == {
        "account": "a2",
        "paused_since": "2030-03-17T17:46:40Z",
        "max_sessions": None,
        "models": ["opus"],
        "allow_overage": False,
        "pause_at": None,
    }
    assert "elsewhere" not in shown
    assert (shown["a2"]["state"], shown["a2"]["reason"]) == (
        "paused",
        "paused since 2030-03-17T17:46:40Z: cl accounts resume a2",
    )
    assert "settings" not in accounts(snapshot(walls={}, live={}, usage={}))["a2"]  # resumed, unset
