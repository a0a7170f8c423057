"""Events into the journal through its native protocol, each field a journal field.

Under systemd every event becomes one journal entry: `MESSAGE` (the same `event key=value` text
as elsewhere), `PRIORITY`, `SYSLOG_IDENTIFIER` (`cl-rescue`), one field per key in upper case
(`ACCOUNT=a4`, `JOB=7`, `SESSION=…`, `RUN=12`), and for the events an operator acts on a stable
`MESSAGE_ID`, explained in the catalog (`packaging/systemd/catalog/cl.catalog`). So
`journalctl -u cl-rescue ACCOUNT=a4` and `journalctl MESSAGE_ID=…` find them. If the journal's
socket refuses a message, its line goes to the journal stream (stderr) instead: nothing is lost.
"""

from __future__ import annotations

import re
from typing import Any, TextIO

from logging_journald import JournaldTransport
from structlog.typing import EventDict, WrappedLogger

from cl import redact

PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2, "exception": 3}

MESSAGE_IDS = {
    "account added": "2b0dc17ff7224dcda936aab4a43dc470",
    "account removed": "340f226adea14b4f95ae6b2933eab078",
    "account invalid": "3b97aaf1bf5d421aa62b253e40afffa2",
    "account needs login": "c9a84b2dc3004111aa895eea1713147c",
    "session walled": "003192a12cc64e089c49e2f83f4a81a1",
    "session moved": "ba30130a6c7c4f0cafc59297eb377c03",
    "live move not taken by the CLI, moving by restart": "3df5d5f13c374835b395a24485f1d8fc",
    "session resumed": "2a14ccae4376401a8ef3e106333abba8",
    "session failed": "1bd3a53334b9467392b81cd7e223a3f2",
    "waiting": "568994da6f244d16a9eeb214d136e454",
    "all accounts walled": "a46c9ed4e5c743b8a8cfc74ae57f691d",
}
"""Each event kind an operator acts on, with its journal MESSAGE_ID (never change one)."""

_NOT_IN_A_FIELD = re.compile(r"[^A-Z0-9_]")
_OURS = frozenset({"MESSAGE", "MESSAGE_ID", "PRIORITY", "SYSLOG_IDENTIFIER"})


def field_name(key: str) -> str:
    """A journal field name for an event key: upper case, letters, digits and `_`, never
    starting with `_` (those are the journal's own) or a digit."""
    name = _NOT_IN_A_FIELD.sub("_", key.upper()).lstrip("_")
    return f"X_{name}" if not name or name[0].isdigit() or name in _OURS else name


def logfmt(value: Any) -> str:
    """A bare value if it is one word, else quoted; never more than one line."""
    text = str(value).replace("\n", "\\n")
    if text and not any(c in text for c in ' "='):
        return text
    return '"' + text.replace('"', '\\"') + '"'


def message(event: str, fields: EventDict) -> str:
    """`event key=value ...`: what a person reads, on the journal as anywhere."""
    pairs = " ".join(f"{key}={logfmt(value)}" for key, value in fields.items())
    return f"{event} {pairs}" if pairs else event


class JournalFields:
    """structlog's last processor under the journal: the event as journal fields, every value
    redacted."""

    def __init__(self, identifier: str) -> None:
        self._identifier = identifier

    def __call__(self, _logger: WrappedLogger, method: str, event_dict: EventDict) -> dict[str, Any]:
        event_dict.pop("timestamp", None)
        level = event_dict.pop("level", method)
        event = str(event_dict.pop("event", ""))
        fields = {
            "MESSAGE": redact.scrub(message(event, event_dict)),
            "PRIORITY": PRIORITY.get(level, 6),
            "SYSLOG_IDENTIFIER": self._identifier,
        }
        if event in MESSAGE_IDS:
            fields["MESSAGE_ID"] = MESSAGE_IDS[event]
        for key, value in event_dict.items():
            fields[field_name(key)] = redact.scrub(value if isinstance(value, str) else logfmt(value))
        return fields


class JournalLogger:
    """Sends each entry to journald's socket; on a refusal, writes its line to `fallback`."""

    def __init__(self, socket_path: str, fallback: TextIO) -> None:
        self._transport = JournaldTransport(socket_path, connected=False)  # survives journald restarting
        self._fallback = fallback

    def send(self, **fields: Any) -> None:
        try:
            self._transport.send(fields.items())
        except OSError:
            self._fallback.write(f"<{fields['PRIORITY']}>{fields['MESSAGE']}\n")
            self._fallback.flush()

    def close(self) -> None:
        self._transport.socket.close()

    debug = info = warning = error = critical = exception = msg = send
