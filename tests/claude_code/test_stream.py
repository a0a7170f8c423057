"""stream-json as 2.1.197 and 2.1.332 print it, and the outcome. (Key order differs between the
two; every event is read as parsed JSON, so no test of order is needed.)"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from cl.claude_code.stream import Outcome, StreamState

NOW = datetime(2026, 11, 27, 20, 0, tzinfo=UTC)
SID = "8a6fec7c-1b7e-4b43-9a55-0c1f3d2e9a10"
RESET = 1795813218


def line(**event: Any) -> str:
    return json.dumps(event)


INIT = {"type": "system", "subtype": "init", "session_id": SID, "claude_code_version": "2.1.197", "model": "x"}
ASSISTANT = {"type": "assistant", "message": {"content": [{"type": "text", "text": "Hi"}]}, "session_id": SID}
ALLOWED = {
    "type": "rate_limit_event",
    "rate_limit_info": {
        "status": "allowed",
        "resetsAt": RESET,
        "rateLimitType": "five_hour",
        "unifiedWindows": {"five_hour": {"utilization": 0.1, "resetsAt": RESET}, "seven_day": {"utilization": 0.4}},
    },
    "session_id": SID,
}
DONE = {
    "type": "result",
    "subtype": "success",
    "is_error": False,
    "api_error_status": None,
    "result": "Hi from fake server",
    "session_id": SID,
    "usage": {"input_tokens": 1667, "output_tokens": 14},
}
REJECTED = {
    "type": "rate_limit_event",
    "rate_limit_info": {"status": "rejected", "resetsAt": RESET, "rateLimitType": "five_hour", "isUsingOverage": False},
    "session_id": SID,
}
SYNTHETIC = {
    "type": "assistant",
    "message": {
        "model": "<synthetic>",
        "content": [{"type": "text", "text": "You've hit your session limit · resets 9pm (UTC)"}],
    },
    "session_id": SID,
    "error": "rate_limit",
}
WALLED_RESULT = {
    "type": "result",
    "subtype": "success",
    "is_error": True,
    "api_error_status": 429,
    "result": "You've hit your session limit · resets 9pm (UTC)",
    "terminal_reason": "completed",
    "session_id": SID,
}
API_KEY_WALL = {
    **WALLED_RESULT,
    "result": "API Error: Request rejected (429) · Number of request tokens has exceeded your per-minute rate limit",
    "api_error_type": "rate_limit_error",
    "terminal_reason": "api_error",
}
SYNTHETIC_332 = {
    **SYNTHETIC,
    "message": {
        "model": "<synthetic>",
        "content": [{"type": "text", "text": "You've hit your 5-hour limit · resets 9:15pm (UTC)"}],
    },
    "is_api_error_message": True,
    "api_error_status": 429,
    "api_error": "usage_limit_reached",
    "api_error_params": {"rate_limit_info": {"status": "rejected", "resetsAt": RESET, "rateLimitType": "five_hour"}},
}


def run(*events: dict[str, Any]) -> StreamState:
    state = StreamState()
    for event in events:
        state.feed(json.dumps(event), NOW)
    return state


def test_a_normal_session() -> None:
    state = run(INIT, ASSISTANT, ALLOWED, DONE)
    assert state.session_id == SID
    assert state.outcome(0) == (Outcome.DONE, None)
    assert state.usage == {"input_tokens": 1667, "output_tokens": 14}
    assert state.utilization == {"five_hour": 0.1, "seven_day": 0.4}


def test_subscription_wall_from_the_rate_limit_event() -> None:
    state = run(INIT, REJECTED, SYNTHETIC, WALLED_RESULT)
    assert state.wall is not None
    assert (state.wall.source, state.wall.kind) == ("rate_limit_event", "five_hour")
    assert state.wall.reset_at == datetime.fromtimestamp(RESET, UTC)
    assert state.wall.message == "You've hit your session limit · resets 9pm (UTC)"
    assert state.outcome(1)[0] is Outcome.WALLED


def test_2_1_332_synthetic_message_carries_the_reset() -> None:
    state = run(INIT, SYNTHETIC_332, {**WALLED_RESULT, "api_error": "usage_limit_reached"})
    assert state.wall is not None
    assert (state.wall.source, state.wall.kind) == ("assistant", "five_hour")
    assert state.wall.reset_at == datetime.fromtimestamp(RESET, UTC)


def test_api_key_wall_has_no_rate_limit_event() -> None:
    state = run(
        INIT, {**SYNTHETIC, "message": {"content": [{"type": "text", "text": API_KEY_WALL["result"]}]}}, API_KEY_WALL
    )
    assert state.wall is not None
    assert state.wall.source == "assistant"
    assert state.outcome(1)[0] is Outcome.WALLED


def test_result_alone_is_enough() -> None:
    state = run(INIT, WALLED_RESULT)
    assert state.wall is not None
    assert (state.wall.source, state.wall.reset_at) == ("result", datetime(2026, 11, 27, 21, 0, tzinfo=UTC))


def test_text_output_fallback_of_old_clis() -> None:
    state = StreamState()
    state.feed("Claude AI usage limit reached|1795814658", NOW)
    assert state.wall is not None
    assert state.wall.source == "text"
    assert state.outcome(1)[0] is Outcome.WALLED


def test_failures_that_are_not_walls() -> None:
    missing = run(
        {
            "type": "result",
            "subtype": "error_during_execution",
            "is_error": True,
            "errors": [f"No conversation found with session ID: {SID}"],
            "session_id": SID,
        }
    )
    assert missing.outcome(1) == (Outcome.FAILED, f"No conversation found with session ID: {SID}")
    server = run({**WALLED_RESULT, "api_error_status": 529, "result": "API Error: Overloaded"})
    assert server.outcome(1) == (Outcome.FAILED, "API Error: Overloaded")


@pytest.mark.parametrize(
    "said",
    [
        "Not logged in · Please run /login",  # 2.1.x, no credentials at all
        "Invalid API key · Please run /login",  # 1.x and 2.0
    ],
)
def test_refused_credentials_are_not_the_sessions_fault(said: str) -> None:
    state = StreamState()
    state.feed(said, NOW)
    assert state.outcome(1) == (Outcome.UNAUTHORIZED, f"credentials refused: {said}")
    revoked = run({**WALLED_RESULT, "api_error_status": 401, "result": "API Error: 401 authentication_error"})
    assert revoked.outcome(1)[0] is Outcome.UNAUTHORIZED


@pytest.mark.parametrize("said", ["../../../etc/passwd", "a\x00b", "--dangerously-skip-permissions", 7, None])
def test_a_session_id_is_taken_only_in_the_shape_the_cli_makes_them(said: Any) -> None:
    """It goes into a later run's `--resume` and a transcript's path: the CLI's output cannot shape it."""
    state = StreamState()
    state.feed(json.dumps({"type": "system", "subtype": "init", "session_id": said}))
    assert state.session_id is None
    state.feed(json.dumps({"type": "system", "subtype": "init", "session_id": "8a6fec7c-1d2e-4f00-9abc-0123456789ab"}))
    assert state.session_id == "8a6fec7c-1d2e-4f00-9abc-0123456789ab"


def test_an_answer_that_talks_about_authentication_is_an_answer() -> None:
    """The model's text is not the CLI's: a successful result mentioning a 401 benches nothing."""
    state = StreamState()
    answer = "Done: the handler now maps a 401 to authentication_error and says Please run /login."
    state.feed(json.dumps({"type": "result", "subtype": "success", "is_error": False, "result": answer}))
    assert state.outcome(0) == (Outcome.DONE, None)


def test_what_the_cli_prints_is_kept_bounded() -> None:
    """Utilization is a fraction of the two known windows; only the last non-JSON lines are kept."""
    state = StreamState()
    windows = {
        "five_hour": {"utilization": 1e308 * 10},
        "seven_day": {"utilization": 7},
        "x" * 50: {"utilization": 0.5},
    }
    state.feed(
        json.dumps({"type": "rate_limit_event", "rate_limit_info": {"status": "allowed", "unifiedWindows": windows}})
    )
    assert state.utilization == {"seven_day": 1.0}
    for i in range(1000):
        state.feed(f"noise {i}")
    assert len(state.texts) == 20
    assert state.texts[-1] == "noise 999"
