"""A local fake of the Anthropic Messages API, enough for the real Claude Code CLI (docs/claude-code.md).

`python fake_anthropic.py --port-file P --log L.jsonl [--limits JSON] [--reset-in S] [--also-on A,B]`
listens on 127.0.0.1 (an ephemeral port, written to P), and on the same port of each `--also-on`
address; each inference request's log line says which address it came to (`via`). `POST /v1/messages` answers as SSE
when asked to stream, JSON otherwise: `Hi from fake server (n_messages=N, key=...<tail>, count=C).`
After `limits[credential]` counted messages (or `limits["*"]`; a one-token quota check is not
counted), that credential gets the wall:
429 with the `anthropic-ratelimit-unified-*` headers and a `retry-after` over 60 s, so the
real client neither retries nor waits. Each request is logged as one JSON line, with the
credential's last six characters only. `POST /_fake/limit {"key", "limit"}` changes a quota;
`POST /_fake/model-wall {"key", "model", "claim"}` walls that credential's requests for models
whose name holds `model` (claim `seven_day_opus`, say), and only those; `POST /_fake/refuse
{"key", "status", "times"}` answers its next `times` requests 529 (overloaded) or 429 without
the unified headers (the API limiting requests, not the account's usage), `retry-after: 1`;
`POST /_fake/wall {"key", "until"}` walls that credential's 5-hour window until then (its
reset), and answers it after; `POST /_fake/overage {"key"}` answers that credential's requests
as billed overage (`anthropic-ratelimit-unified-overage-in-use: true`: its windows used up,
overage allowed);
`POST /_fake/windows {"key", "five_hour": [utilization, reset], "seven_day": [...], "status"}`
makes that credential's answers carry those windows (and that unified status: `allowed_warning`).
A turn's prompt holding `[[slow: N]]` is answered N seconds late (a turn that takes a while).
A last user message holding `[[bash: COMMAND]]` is answered with a tool call: the CLI's Bash
tool runs COMMAND in the background, and its result comes back as the next request.
With `--watch DIR`, each request's log line says which processes named by `DIR/*.pid` are alive.

With `--budget five_hour=SECONDS:UNITS --budget seven_day=SECONDS:UNITS` (bench/week.py), every
credential has those windows instead of its limit: its 5-hour one opens at its first request and
resets SECONDS later, its 7-day one runs from when `POST /_fake/budget {"key", "elapsed", "used"}`
says it began; a request costs a unit (a one-token quota check nothing), a credential with a
window spent is walled until that window resets, every answer carries its windows' utilization
and resets (`allowed_warning` from 90%), and each answer comes `--latency` seconds late (the
model's time). Its log lines are short:
the credential, walled or not, the prompt cache cold or not, and whether any credential had room.
A turn's prompt holding `[[steps: K]]` is answered with a tool call K-1 times before its answer
(an agent's turn of K requests; the fake CLI runs the calls).

It is also the OAuth token endpoint (`POST /v1/oauth/token`), rotating as the real one does: a
refresh token is good once; its refresh answers a new access token (living `--token-life`
seconds) and a new refresh token, and a refresh token presented again (or revoked with
`POST /_fake/revoke {"refresh"}`) gets 400 `invalid_grant`. A request carrying an access token
this endpoint issued that has expired gets 401. `GET /_fake/tokens` lists every token it issued
(for a test's leak check); its log has their last six characters only.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import socket
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


class FakeAnthropic(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self, log: Path, limits: dict[str, int], reset_in: int, watch: Path | None = None, token_life: float = 28800
    ) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.watch = watch
        self.token_life = token_life
        self.token_delay = 0.0
        self.used_refresh: set[str] = set()
        self.issued: dict[str, float] = {}
        """Access token -> when it expires (epoch s), for every token this server issued."""
        self.issued_refresh: list[str] = []
        self.cached: set[tuple[str, str]] = set()
        self.revoked: set[str] = set()
        """Access tokens answered with 401, as a revoked one is."""
        self.log_path = log
        self.limits = limits
        self.model_walls: dict[str, tuple[str, str]] = {}
        """Credential -> (part of a model's name, the window's claim): that model's requests wall."""
        self.walls_until: dict[str, float] = {}
        """Credential -> when its wall (`/_fake/wall`) resets."""
        self.refusals: dict[str, list[int]] = {}
        """Credential -> the statuses its next requests are answered with (529, or a plain 429)."""
        self.overage: set[str] = set()
        """Credentials whose answers are billed as overage."""
        self.windows: dict[str, dict[str, Any]] = {}
        """Credential -> the windows (and status) its answers' headers say (`/_fake/windows`)."""
        self.reset_in = reset_in
        self.budgets: Budgets | None = None
        self.latency = 0.0
        self.counts: dict[str, int] = {}
        self.lock = threading.Lock()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away (a gateway closing its pooled connections) is no error."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)

    def record(self, entry: dict[str, Any]) -> None:
        with self.lock, self.log_path.open("a") as f:
            f.write(json.dumps(entry) + "\n")


class Handler(BaseHTTPRequestHandler):
    server: FakeAnthropic
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass

    def credential(self) -> str:
        key = self.headers.get("x-api-key")
        if key:
            return key
        return self.headers.get("authorization", "").removeprefix("Bearer ").strip()

    def body(self) -> dict[str, Any]:
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            parsed = json.loads(raw) if raw else {}
        except ValueError:
            return {}
        return parsed if isinstance(parsed, dict) else {}

    def send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        self.send_header("request-id", f"req_{uuid.uuid4().hex[:20]}")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def do_HEAD(self) -> None:
        self.send(200, b"", "text/plain")

    def do_GET(self) -> None:
        body: Any = {}
        if self.path.startswith("/_fake/state"):
            body = self.server.counts
        elif self.path.startswith("/_fake/tokens"):
            body = [*self.server.issued, *self.server.issued_refresh]
        self.send(200, json.dumps(body).encode(), "application/json")

    def token(self, body: dict[str, Any]) -> None:
        """A refresh, rotating: each refresh token is good once."""
        found = body.get("refresh_token")
        presented = found if isinstance(found, str) else ""
        with self.server.lock:
            good = body.get("grant_type") == "refresh_token" and bool(presented)
            good = good and presented not in self.server.used_refresh
            if good:
                self.server.used_refresh.add(presented)
                access = f"sk-ant-oat01-fake-{uuid.uuid4().hex}"
                refresh = f"sk-ant-ort01-fake-{uuid.uuid4().hex}"
                self.server.issued[access] = time.time() + self.server.token_life
                self.server.issued_refresh.append(refresh)
        self.server.record(
            {"t": time.time(), "path": self.path, "grant": body.get("grant_type"), "fields": sorted(body),
             "outcome": "ok" if good else "invalid_grant", "refresh_tail": str(presented)[-6:]}
        )  # fmt: skip
        time.sleep(self.server.token_delay)
        if not good:
            error = {"error": "invalid_grant", "error_description": "Invalid refresh token"}
            self.send(400, json.dumps(error).encode(), "application/json")
            return
        reply = {
            "access_token": access,
            "refresh_token": refresh,
            "expires_in": self.server.token_life,
            "scope": "user:inference",
            "token_type": "Bearer",
        }
        self.send(200, json.dumps(reply).encode(), "application/json")

    def admin(self, path: str, body: dict[str, Any]) -> None:
        """The fake's own controls (not Anthropic paths)."""
        with self.server.lock:
            if path == "/_fake/limit":
                self.server.limits[body["key"]] = body["limit"]
            elif path == "/_fake/wall":
                self.server.walls_until[body["key"]] = body["until"]
            elif path == "/_fake/model-wall":
                self.server.model_walls[body["key"]] = (body["model"], body["claim"])
            elif path == "/_fake/refuse":
                self.server.refusals[body["key"]] = [body["status"]] * body["times"]
            elif path == "/_fake/budget" and self.server.budgets is not None:
                self.server.budgets.begin(body["key"], body.get("elapsed", {}), body.get("used", {}))
            elif path == "/_fake/windows":
                self.server.windows[body["key"]] = body
            elif path == "/_fake/overage":
                self.server.overage.add(body["key"])
            elif path == "/_fake/revoke":
                self.server.used_refresh.add(body.get("refresh", ""))
                self.server.revoked.add(body.get("access", ""))
        self.send(200, b"{}", "application/json")

    def do_POST(self) -> None:
        body = self.body()
        path = self.path.split("?")[0]
        if path.startswith("/_fake/"):
            self.admin(path, body)
        elif path == "/v1/oauth/token":
            self.token(body)
        elif path == "/v1/messages/count_tokens":
            self.send(200, b'{"input_tokens": 10}', "application/json")
        elif path == "/v1/messages":
            self.messages(body)
        else:
            self.send(200, b"{}", "application/json")

    def messages(self, body: dict[str, Any]) -> None:
        credential = self.credential()
        expires = self.server.issued.get(credential)
        if (expires is not None and expires <= time.time()) or credential in self.server.revoked:
            self.server.record({"t": time.time(), "path": self.path, "cred_tail": credential[-6:], "expired": True})
            error = {"type": "error", "error": {"type": "authentication_error", "message": "OAuth token has expired"}}
            self.send(401, json.dumps(error).encode(), "application/json")
            return
        found = body.get("messages")
        messages: list[Any] = found if isinstance(found, list) else []
        if messages and "[[break]]" in _text(messages[-1]):  # an answer that breaks off half way
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", "1000")
            self.end_headers()
            self.wfile.write(b'{"id": "msg_broken", "content": [')
            self.wfile.flush()
            self.close_connection = True
            return
        if messages and "[[echo]]" in _text(messages[-1]):  # an upstream that echoes what it was sent
            echoed = {"type": "error", "error": {"type": "invalid_request_error", "message": dict(self.headers)}}
            self.send(400, json.dumps(echoed).encode(), "application/json", {"x-echo": str(dict(self.headers))})
            return
        if self.refused(credential):
            return
        if self.server.budgets is not None:
            self.budgeted(body, messages, credential)
            return
        with self.server.lock:
            limit = self.server.limits.get(credential, self.server.limits.get("*"))
            used = self.server.counts.get(credential, 0)
            walled = limit is not None and used >= limit
            claim = "five_hour"
            window = self.server.model_walls.get(credential)
            if not walled and window is not None and window[0] in str(body.get("model", "")):
                walled, claim = True, window[1]
            until = self.server.walls_until.get(credential, 0.0)
            walled = walled or until > time.time()
            if not walled and body.get("max_tokens") != 1:  # a one-token quota check uses nothing
                self.server.counts[credential] = used + 1
        reset = math.ceil(until) if until > time.time() else int(time.time()) + self.server.reset_in
        self.server.record(
            {
                "t": time.time(),
                "path": self.path,
                "cred_tail": credential[-6:],
                "via": self.connection.getsockname()[0],
                "walled": walled,
                "n_messages": len(messages),
                "model": body.get("model"),
                "max_tokens": body.get("max_tokens"),
                "messages": [_text(m) for m in messages],
                "user_agent": self.headers.get("user-agent"),
                "session": self.headers.get("x-claude-code-session-id"),
                "auth": "x-api-key" if self.headers.get("x-api-key") else "bearer",
                "beta": self.headers.get("anthropic-beta"),
                "header_names": sorted(name.lower() for name in self.headers),
                "alive": _watched(self.server.watch),
            }
        )
        if walled:
            error = {
                "type": "error",
                "error": {"type": "rate_limit_error", "message": "fake usage wall"},
                "request_id": f"req_{uuid.uuid4().hex[:20]}",
            }
            spent = claim == "five_hour"  # a model's window leaves the 5-hour one as it was
            headers = {
                "anthropic-ratelimit-unified-status": "rejected",
                "anthropic-ratelimit-unified-reset": str(reset),
                "anthropic-ratelimit-unified-representative-claim": claim,
                "anthropic-ratelimit-unified-5h-utilization": "1.0" if spent else "0.1",
                "anthropic-ratelimit-unified-5h-reset": str(reset),
                "anthropic-ratelimit-unified-5h-status": "rejected" if spent else "allowed",
                "retry-after": str(self.server.reset_in),
            }
            self.send(429, json.dumps(error).encode(), "application/json", headers)
            return
        self.answer(body, messages, credential, count=used + 1, reset=reset)

    def budgeted(self, body: dict[str, Any], messages: list[Any], credential: str) -> None:
        """A request under `--budget`: charged to the credential's windows, answered or walled."""
        assert self.server.budgets is not None
        now = time.time()
        with self.server.lock:
            probe = body.get("max_tokens") == 1  # the CLI's own quota check: it costs nothing
            spent, windows = self.server.budgets.charge(credential, now, 0 if probe else 1)
            room = self.server.budgets.room(now)
            cold = (credential, self.headers.get("x-claude-code-session-id") or "") not in self.server.cached
        self.server.record({"t": now, "cred_tail": credential[-6:], "walled": spent is not None, "cold": cold,
                            "room": room, "probe": probe})  # fmt: skip
        headers = Budgets.headers(windows, spent)
        if spent is not None:
            error = {"type": "error", "error": {"type": "rate_limit_error", "message": "fake usage wall"}}
            retry = max(1, int(windows[spent][1] - now))
            self.send(429, json.dumps(error).encode(), "application/json", {**headers, "retry-after": str(retry)})
            return
        time.sleep(self.server.latency)
        self.answer(body, messages, credential, budget_headers=headers)

    def answer(
        self,
        body: dict[str, Any],
        messages: list[Any],
        credential: str,
        *,
        count: int = 0,
        reset: int = 0,
        budget_headers: dict[str, str] | None = None,
    ) -> None:
        """The request allowed: the answer, with the windows' headers."""
        text = f"Hi from fake server (n_messages={len(messages)}, key=...{credential[-6:]}, count={count})."
        headers = budget_headers or {
            "anthropic-ratelimit-unified-status": "allowed",
            "anthropic-ratelimit-unified-reset": str(reset),
            "anthropic-ratelimit-unified-representative-claim": "five_hour",
            "anthropic-ratelimit-unified-5h-utilization": "0.1",
            "anthropic-ratelimit-unified-5h-reset": str(reset),
            "anthropic-ratelimit-unified-5h-status": "allowed",
            "anthropic-ratelimit-unified-7d-utilization": "0.05",
            "anthropic-ratelimit-unified-7d-reset": str(reset + 86400),
            "anthropic-ratelimit-unified-7d-status": "allowed",
        }
        if credential in self.server.overage:  # the 5-hour window used up, paid overage answering
            headers |= {
                "anthropic-ratelimit-unified-5h-utilization": "1.0",
                "anthropic-ratelimit-unified-overage-status": "allowed",
                "anthropic-ratelimit-unified-overage-in-use": "true",
            }
        headers |= _windows(self.server.windows.get(credential, {}))
        if slow := re.search(r"\[\[slow: (\d{1,2})\]\]", " ".join(_text(m) for m in _this_turn(messages))):
            time.sleep(int(slow.group(1)))  # logged already: a test sees the turn begin
        model = body.get("model", "claude-fake")
        command = _bash_asked(messages)
        cache = self.cache(credential)
        if _steps_left(messages) > 0:  # the agent calls a tool (the fake CLI's own), and goes on
            step = {"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:20]}", "name": "Step", "input": {}}
            message = {**_message(text, model, cache), "content": [step], "stop_reason": "tool_use"}
            self.send(200, json.dumps(message).encode(), "application/json", headers)
        elif body.get("stream"):
            self.send(200, _sse(text, model, command, cache), "text/event-stream", headers)
        else:
            message = _message(text, model, cache)
            self.send(200, json.dumps(message).encode(), "application/json", headers)

    def refused(self, credential: str) -> bool:
        """Answered 529 or a plain 429 if one is set for this credential (`/_fake/refuse`)."""
        with self.server.lock:
            pending = self.server.refusals.get(credential)
            refusal = pending.pop() if pending else None
        if refusal is None:
            return False
        self.server.record({"t": time.time(), "path": self.path, "cred_tail": credential[-6:], "refused": refusal})
        kind, said = ("overloaded_error", "Overloaded") if refusal == 529 else ("rate_limit_error", "Too many requests")
        error = {"type": "error", "error": {"type": kind, "message": said}, "request_id": "req_refused"}
        self.send(refusal, json.dumps(error).encode(), "application/json", {"retry-after": "1"})
        return True

    def cache(self, credential: str) -> dict[str, int]:
        """The prompt cache, as an organization's (a credential's here): a session's first request
        there writes 100 tokens to it, every later one reads them."""
        key = (credential, self.headers.get("x-claude-code-session-id") or "")
        with self.server.lock:
            warm = key in self.server.cached
            self.server.cached.add(key)
        return {"cache_read_input_tokens": 100 if warm else 0, "cache_creation_input_tokens": 0 if warm else 100}


def _steps_left(messages: list[Any]) -> int:
    """Tool calls still to make in this turn: `[[steps: K]]` in its prompt asks for K-1."""
    prompts = [i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user"
               and "[tool_result" not in _text(m)]  # fmt: skip
    if not prompts:
        return 0
    found = re.search(r"\[\[steps: (\d{1,3})\]\]", _text(messages[prompts[-1]]))
    done = sum(1 for m in messages[prompts[-1] :] if isinstance(m, dict) and m.get("role") == "assistant")
    return int(found.group(1)) - 1 - done if found else 0


class Budgets:
    """Each credential's windows under `--budget`: (length in seconds, units) per window."""

    WARNING = 0.9

    def __init__(self, spec: dict[str, tuple[float, int]]) -> None:
        self.spec = spec
        self.opened: dict[tuple[str, str], float] = {}
        """(credential, window) -> when its current period began."""
        self.used: dict[tuple[str, str], int] = {}

    def begin(self, credential: str, elapsed: dict[str, float], used: dict[str, int]) -> None:
        """The credential's windows began `elapsed` seconds ago, `used` units spent since."""
        now = time.time()
        for window in self.spec:
            if window in elapsed:
                self.opened[credential, window] = now - elapsed[window]
                self.used[credential, window] = used.get(window, 0)

    def _current(self, credential: str, window: str, now: float) -> tuple[float, int]:
        """When the window's period began and what it used; a period past its length is over."""
        length = self.spec[window][0]
        opened = self.opened.get((credential, window))
        if opened is None:
            return now, 0
        if now >= opened + length:  # the 7-day window rolls on; the 5-hour one opens at the next request
            opened = opened + length * ((now - opened) // length) if window == "seven_day" else now
            self.opened[credential, window], self.used[credential, window] = opened, 0
        return self.opened[credential, window], self.used.get((credential, window), 0)

    def charge(self, credential: str, now: float, cost: int = 1) -> tuple[str | None, dict[str, tuple[float, float]]]:
        """One request: the window that walls it (None: it is answered, and charged `cost`: 0
        for a one-token quota check), and each window's utilization and reset."""
        state = {window: self._current(credential, window, now) for window in self.spec}
        spent = next((w for w, (_, used) in state.items() if used >= self.spec[w][1]), None)
        for window, (opened, used) in state.items():
            self.opened[credential, window] = opened
            self.used[credential, window] = used + (cost if spent is None else 0)
        windows = {
            w: (self.used[credential, w] / self.spec[w][1], self.opened[credential, w] + self.spec[w][0])
            for w in self.spec
        }
        return spent, windows

    def room(self, now: float) -> bool:
        """Whether any credential seen could still be answered now."""
        seen = {credential for credential, _ in self.opened}
        return (
            any(all(self._current(c, w, now)[1] < self.spec[w][1] for w in self.spec) for c in seen) if seen else True
        )

    @classmethod
    def headers(cls, windows: dict[str, tuple[float, float]], spent: str | None) -> dict[str, str]:
        claim = spent or max(windows, key=lambda w: windows[w][0])
        used = max(u for u, _ in windows.values())
        status = "rejected" if spent else "allowed_warning" if used >= cls.WARNING else "allowed"
        short = {"five_hour": "5h", "seven_day": "7d"}
        headers = {
            "anthropic-ratelimit-unified-status": status,
            "anthropic-ratelimit-unified-representative-claim": claim,
            "anthropic-ratelimit-unified-reset": f"{windows[claim][1]:.3f}",
        }
        for window, (utilization, reset) in windows.items():
            headers[f"anthropic-ratelimit-unified-{short[window]}-utilization"] = f"{min(utilization, 1.0):.4f}"
            headers[f"anthropic-ratelimit-unified-{short[window]}-reset"] = f"{reset:.3f}"
        return headers


def _this_turn(messages: list[Any]) -> list[Any]:
    """The messages after the last answer: the prompt of the turn being answered (2.1.x sends
    its environment as a user message of its own after the prompt)."""
    answers = [i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "assistant"]
    return messages[answers[-1] + 1 :] if answers else messages


def _windows(said: dict[str, Any]) -> dict[str, str]:
    """The headers of the windows `/_fake/windows` set for a credential."""
    headers = {f"anthropic-ratelimit-unified-{short}-{field}": str(value)
               for window, short in (("five_hour", "5h"), ("seven_day", "7d")) if window in said
               for field, value in zip(("utilization", "reset"), said[window], strict=True)}  # fmt: skip
    if "status" in said:
        headers["anthropic-ratelimit-unified-status"] = said["status"]
    return headers


def _text(message: Any) -> str:
    """A message's text as logged; a tool call and its result as `[tool_use NAME]`, `[tool_result]`."""
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, str):
        return content[:200]
    if isinstance(content, list):
        parts = []
        for c in content:
            if not isinstance(c, dict):
                continue
            if c.get("type") == "text":
                parts.append(str(c.get("text", ""))[:200])
            elif c.get("type") in ("tool_use", "tool_result"):
                parts.append(f"[{c['type']} {c.get('name', '')}]".replace(" ]", "]"))
        return " | ".join(parts)
    return ""


def _watched(directory: Path | None) -> dict[str, bool]:
    """For each `NAME.pid` in `directory`: whether that process is alive now."""
    alive = {}
    for path in sorted(directory.glob("*.pid")) if directory else []:
        try:
            state = Path(f"/proc/{int(path.read_text())}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, ValueError):
            state = "gone"
        alive[path.stem] = state not in ("gone", "Z")
    return alive


def _bash_asked(messages: list[Any]) -> str | None:
    """The command a user message asks for with `[[bash: COMMAND]]`, if no tool call followed it."""
    command = None
    for message in messages:
        text = _text(message)
        if (
            isinstance(message, dict)
            and message.get("role") == "user"
            and (found := re.search(r"\[\[bash: (.+?)\]\]", text))
        ):
            command = found.group(1)
        elif "[tool_use" in text:
            command = None
    return command


def _message(text: str, model: str, cache: dict[str, int] | None = None) -> dict[str, Any]:
    return {
        "id": f"msg_{uuid.uuid4().hex[:20]}",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 10, "output_tokens": 12, **(cache or {})},
    }


def _sse(text: str, model: str, command: str | None = None, cache: dict[str, int] | None = None) -> bytes:
    start = {
        **_message("", model),
        "content": [],
        "stop_reason": None,
        "usage": {"input_tokens": 10, "output_tokens": 1, **(cache or {})},
    }
    if command is not None:
        return _sse_bash(start, command)
    half = len(text) // 2
    events = [
        ("message_start", {"type": "message_start", "message": start}),
        (
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        ),
        ("ping", {"type": "ping"}),
        (
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text[:half]}},
        ),
        (
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text[half:]}},
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": 12},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]
    return "".join(f"event: {name}\ndata: {json.dumps(data)}\n\n" for name, data in events).encode()


def _sse_bash(start: dict[str, Any], command: str) -> bytes:
    """A turn that is one call of the Bash tool, run in the background."""
    tool = {"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:20]}", "name": "Bash", "input": {}}
    arguments = json.dumps({"command": command, "description": "start it", "run_in_background": True})
    events = [
        ("message_start", {"type": "message_start", "message": start}),
        ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": tool}),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "input_json_delta", "partial_json": arguments},
            },
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                "usage": {"output_tokens": 12},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]
    return "".join(f"event: {name}\ndata: {json.dumps(data)}\n\n" for name, data in events).encode()


def also_on(server: FakeAnthropic, address: str) -> None:
    """The same server on another loopback address, its port the same: each request's log line
    says which address it came to (`via`), so tests tell apart who sent it."""
    listener = socket.create_server((address, server.server_address[1]))

    def accept() -> None:
        while True:
            connection, peer = listener.accept()
            server.process_request(connection, peer)

    threading.Thread(target=accept, daemon=True).start()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port-file", type=Path, required=True)
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("--limits", default="{}", help='JSON: {"<credential>" or "*": messages before the wall}')
    parser.add_argument("--reset-in", type=int, default=3600)
    parser.add_argument("--watch", type=Path, help="a directory of NAME.pid files, each logged alive or not")
    parser.add_argument("--token-life", type=float, default=28800, help="seconds an access token it issues lives")
    parser.add_argument("--token-delay", type=float, default=0.0, help="seconds the token endpoint takes to answer")
    parser.add_argument("--also-on", default="", help="more loopback addresses (comma-separated), the same port")
    parser.add_argument("--budget", action="append", default=[], help="WINDOW=SECONDS:UNITS (five_hour, seven_day)")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds each answer takes under --budget")
    args = parser.parse_args()
    server = FakeAnthropic(args.log, json.loads(args.limits), args.reset_in, args.watch, args.token_life)
    server.token_delay = args.token_delay
    if args.budget:
        spec = {}
        for item in args.budget:
            window, _, amount = item.partition("=")
            seconds, _, units = amount.partition(":")
            spec[window] = (float(seconds), int(units))
        server.budgets, server.latency = Budgets(spec), args.latency
    for address in filter(None, args.also_on.split(",")):
        also_on(server, address)
    tmp = args.port_file.with_suffix(".tmp")
    tmp.write_text(str(server.server_address[1]))
    tmp.replace(args.port_file)
    server.serve_forever()


if __name__ == "__main__":
    main()
