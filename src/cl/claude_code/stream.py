"""Reading `claude -p ... --output-format stream-json --verbose` as it arrives, and writing its
`--input-format stream-json` (each user message a line of standard input: a turn).

Wall signals, strongest first (docs/claude-code.md, fact 5):
1. `rate_limit_event` with `rate_limit_info.status == "rejected"` (subscriptions only),
2. `result` with `is_error` and `api_error_status == 429` (`subtype` stays "success"),
3. the synthetic `assistant` message with `"error": "rate_limit"`,
4. the wall texts of every CLI version, in a `result` or a non-JSON line (fallback).
Key order differs between versions (2.1.197 vs 2.1.332): everything is read as parsed JSON.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import re
from datetime import UTC, datetime
from typing import Any

from cl.claude_code.walls import Wall, reset_from_text, wall_from_text
from cl.moments import from_epoch

_VERSION = re.compile(r"[0-9A-Za-z.+-]{1,40}")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class Outcome(enum.StrEnum):
    DONE = "done"
    FAILED = "failed"
    WALLED = "walled"
    UNAUTHORIZED = "unauthorized"
    """The account's credentials were missing or refused: the session belongs elsewhere."""


WINDOWS = ("five_hour", "seven_day")
"""The usage windows kept, each a fraction from 0 to 1 whatever the output says."""
MAX_TEXTS = 20
"""Non-JSON lines kept (the last ones): what a wall or a failure is told from."""
UNAUTHORIZED_TEXTS = ("Not logged in", "Invalid API key", "Please run /login", "authentication_error")
"""What every CLI version prints when it has no usable credentials (docs/claude-code.md, fact 8)."""


@dataclasses.dataclass
class StreamState:
    """What one CLI run has said so far."""

    session_id: str | None = None
    wall: Wall | None = None
    result: dict[str, Any] | None = None
    usage: dict[str, Any] | None = None
    utilization: dict[str, float] = dataclasses.field(default_factory=dict)
    """Window (`five_hour`, `seven_day`) -> 0..1, from `rate_limit_event`s."""
    texts: list[str] = dataclasses.field(default_factory=list)
    """Non-JSON lines, kept for the wall fallback and error messages."""
    stderr: tuple[str, ...] = ()
    """Its standard error's last lines, scrubbed, once it has exited (the reason of a failure)."""
    answered: bool = False
    """The account let a request through: an assistant turn that is not a wall, or `allowed`."""
    version: str | None = None
    """The CLI's version, from its `init` event (what a live move is measured against)."""
    ended: bool = False
    """A `result` came: the turn is over (with `--input-format stream-json` the CLI waits for the next)."""

    def feed(self, line: str, now: datetime | None = None) -> dict[str, Any] | None:
        """Take one line of output; return it parsed (None for a non-JSON line)."""
        now = now or datetime.now(UTC)
        try:
            event = json.loads(line)
        except ValueError:
            event = None
        if not isinstance(event, dict):
            if line.strip():
                self.texts = [*self.texts[-(MAX_TEXTS - 1) :], line.strip()[:500]]
                if self.wall is None:
                    self.wall = wall_from_text(line, now)
            return None
        self.session_id = self.session_id or _session_id(event.get("session_id"))
        match event.get("type"):
            case "system" if event.get("subtype") == "init":
                self.version = _version(event.get("claude_code_version")) or self.version
            case "rate_limit_event":
                self._rate_limit(event.get("rate_limit_info"))
            case "assistant" if event.get("error") == "rate_limit" or event.get("is_api_error_message"):
                self._assistant_wall(event, now)
            case "assistant" if not event.get("error"):
                self.answered = True
            case "result":
                self._result(event, now)
        return event

    def outcome(self, exit_code: int | None = None) -> tuple[Outcome, str | None]:
        """How the run ended, and why if it did not end well."""
        if self.wall is not None:
            return Outcome.WALLED, self.wall.message
        result = self.result
        if result is not None and not result.get("is_error") and result.get("subtype") == "success":
            return Outcome.DONE, None  # whatever the answer says: it is the model's text, not the CLI's
        # The CLI's own words: its non-JSON output, or the text of a result that is an error.
        said = [*self.texts, str(result.get("result")) if result else ""]
        if any(marker in text for text in said for marker in UNAUTHORIZED_TEXTS) or (
            result is not None and result.get("api_error_status") in (401, 403)
        ):
            return Outcome.UNAUTHORIZED, f"credentials refused: {next((t for t in said if t), 'status 401')}"[:500]
        if result is not None:
            errors = result.get("errors")
            if isinstance(errors, list) and errors:
                return Outcome.FAILED, "; ".join(str(e) for e in errors)[:500]
            return Outcome.FAILED, str(result.get("result") or result.get("subtype") or "error")[:500]
        detail = self.texts[-1] if self.texts else "no output"
        said_on_stderr = f"; its stderr ended: {' | '.join(self.stderr)}" if self.stderr else ""
        return Outcome.FAILED, f"exited with {exit_code} without a result: {detail[:300]}{said_on_stderr}"[:1000]

    def _rate_limit(self, info: Any) -> None:
        if not isinstance(info, dict):
            return
        windows = info.get("unifiedWindows")
        if isinstance(windows, dict):
            for window in WINDOWS:
                data = windows.get(window)
                value = data.get("utilization") if isinstance(data, dict) else None
                if isinstance(value, int | float) and math.isfinite(value):
                    self.utilization[window] = min(1.0, max(0.0, float(value)))
        if info.get("status") == "rejected":
            self.wall = Wall("rate_limit_event", _epoch(info.get("resetsAt")), _str(info.get("rateLimitType")))
        elif info.get("status") in ("allowed", "allowed_warning"):
            self.answered = True

    def _assistant_wall(self, event: dict[str, Any], now: datetime) -> None:
        text = _message_text(event.get("message"))
        params = event.get("api_error_params")
        info = params.get("rate_limit_info") if isinstance(params, dict) else None
        reset = _epoch(info.get("resetsAt")) if isinstance(info, dict) else None
        kind = _str(info.get("rateLimitType")) if isinstance(info, dict) else None
        if event.get("error") != "rate_limit" and wall_from_text(text, now) is None:
            return  # an API error message that is not a wall (1.0.x marks every error this way)
        self._merge(Wall("assistant", reset or reset_from_text(text, now), kind, text[:300] or None))

    def _result(self, event: dict[str, Any], now: datetime) -> None:
        self.result = event
        self.ended = True
        if isinstance(event.get("usage"), dict):
            self.usage = event["usage"]
        text = _str(event.get("result")) or ""
        if event.get("is_error") and event.get("api_error_status") == 429:
            self._merge(Wall("result", reset_from_text(text, now), message=text[:300] or None))
        elif event.get("is_error") and (wall := wall_from_text(text, now)) is not None:
            self._merge(wall)

    def _merge(self, wall: Wall) -> None:
        """Keep the strongest signal; fill in what it lacks from a later one."""
        if self.wall is None:
            self.wall = wall
            return
        self.wall = dataclasses.replace(
            self.wall,
            reset_at=self.wall.reset_at or wall.reset_at,
            kind=self.wall.kind or wall.kind,
            message=self.wall.message or wall.message,
        )


def _session_id(value: Any) -> str | None:
    """A session id as every CLI version makes them (a UUID); anything else is not one. It goes
    into a later run's command line and a path, so the CLI's output must not choose its shape."""
    return value if isinstance(value, str) and _UUID.fullmatch(value) else None


def _version(value: Any) -> str | None:
    """A version as the CLI prints it (`2.1.332`), at most 40 characters of its own alphabet."""
    return value if isinstance(value, str) and _VERSION.fullmatch(value) else None


def user_message(text: str) -> bytes:
    """One user message for `--input-format stream-json`: a line of standard input, a turn."""
    message = {"type": "user", "message": {"role": "user", "content": text}}
    return json.dumps(message, ensure_ascii=False).encode() + b"\n"


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _epoch(value: Any) -> datetime | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        return None
    return from_epoch(value)


def _message_text(message: Any) -> str:
    if not isinstance(message, dict) or not isinstance(message.get("content"), list):
        return ""
    parts = [c.get("text") for c in message["content"] if isinstance(c, dict)]
    return " ".join(p for p in parts if isinstance(p, str))
