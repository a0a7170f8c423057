"""Every wall message the CLI's versions print (docs/claude-code.md, fact 6), and when each one lifts."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from cl.claude_code.walls import is_wall_text, reset_from_text, wall_from_text

NOW = datetime(2026, 11, 27, 20, 0, tzinfo=UTC)  # a Friday evening, UTC
SEOUL = ZoneInfo("Asia/Seoul")


@pytest.mark.parametrize(
    ("text", "reset"),
    [
        ("Claude AI usage limit reached|1795814658", datetime.fromtimestamp(1795814658, UTC)),
        ("Claude AI usage limit reached|1749924000", datetime.fromtimestamp(1749924000, UTC)),
        ("5-hour limit reached ∙ resets 9pm", datetime(2026, 11, 27, 21, 0, tzinfo=UTC)),
        ("Session limit reached ∙ resets 9:24pm", datetime(2026, 11, 27, 21, 24, tzinfo=UTC)),
        ("Weekly limit reached ∙ resets 9:24pm", datetime(2026, 11, 27, 21, 24, tzinfo=UTC)),
        ("Usage limit reached ∙ resets 9:24pm", datetime(2026, 11, 27, 21, 24, tzinfo=UTC)),
        ("Spending cap reached resets 9:24pm", datetime(2026, 11, 27, 21, 24, tzinfo=UTC)),
        ("Weekly limit reached · resets 10am (Asia/Seoul)", datetime(2026, 11, 28, 1, 0, tzinfo=UTC)),
        ("You've hit your limit · resets 11pm (America/Anchorage)", datetime(2026, 11, 28, 8, 0, tzinfo=UTC)),
        ("You've hit your session limit · resets 9pm (UTC)", datetime(2026, 11, 27, 21, 0, tzinfo=UTC)),
        ("You’ve hit your session limit · resets 9:33pm (UTC)", datetime(2026, 11, 27, 21, 33, tzinfo=UTC)),
        ("You've hit your 5-hour limit · resets 9:15pm (UTC)", datetime(2026, 11, 27, 21, 15, tzinfo=UTC)),
        ("You've hit your weekly limit · resets Jul 31, 2am (UTC)", datetime(2027, 7, 31, 2, 0, tzinfo=UTC)),
        ("You've hit your Opus limit · resets Nov 30, 3:33am (UTC)", datetime(2026, 11, 30, 3, 33, tzinfo=UTC)),
        ("You've hit your Sonnet limit · resets Nov 30, 8:33pm (UTC)", datetime(2026, 11, 30, 20, 33, tzinfo=UTC)),
        ("You've hit your session limit · resets 7pm (UTC)", datetime(2026, 11, 28, 19, 0, tzinfo=UTC)),  # tomorrow
        ("Session limit reached ∙ resets Nov 30, 8:24pm", datetime(2026, 11, 30, 20, 24, tzinfo=UTC)),
        ("You've hit your limit · resets 9:29pm (UTC)", datetime(2026, 11, 27, 21, 29, tzinfo=UTC)),
    ],
)
def test_every_wall_text_and_its_reset(text: str, reset: datetime) -> None:
    assert is_wall_text(text)
    assert reset_from_text(text, NOW, local=UTC) == reset
    wall = wall_from_text(text, NOW, local=UTC)
    assert wall is not None
    assert (wall.source, wall.reset_at) == ("text", reset)


@pytest.mark.parametrize(
    "text",
    [
        "Context limit reached · /compact or /clear to continue",
        "API Error: Server is temporarily limiting requests (not your usage limit) · Rate limited",
        "Hi from fake server (n_messages=2, key=...t-keyA, count=1).",
        "Not logged in · Please run /login",
        "No conversation found with session ID: 8a6fec7c-0000-0000-0000-000000000000",
    ],
)
def test_texts_that_are_not_walls(text: str) -> None:
    assert not is_wall_text(text)
    assert wall_from_text(text, NOW) is None


def test_a_zone_less_clock_time_is_the_machines_zone() -> None:
    assert reset_from_text("Session limit reached ∙ resets 9:24pm", NOW, local=SEOUL) == datetime(
        2026, 11, 28, 12, 24, tzinfo=UTC
    )


def test_a_message_without_a_time_has_no_reset() -> None:
    wall = wall_from_text("You've hit your weekly limit", NOW)
    assert wall is not None
    assert wall.reset_at is None
