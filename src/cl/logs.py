"""structlog set-up: one line per event, for journald, a terminal, or a plain file.

* Under journald (stderr is the stream named by `$JOURNAL_STREAM`): `<N>event key=value`,
  `N` being the syslog priority (journald's SyslogLevelPrefix reads and strips it).
* On a terminal: structlog's console renderer.
* Otherwise: `timestamp level event key=value`.

Whatever the renderer, the finished line goes through `redact.scrub`.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from cl import redact
from cl.config import Config, ConfigError, load_config

PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2, "exception": 3}


def under_journald(stream: TextIO) -> bool:
    """True when `stream` is the very journal stream systemd connected us to."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(part) for part in expected.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (device, inode)


_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f]")


def _printable(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Control characters in a value (what the CLI printed, a file's name) are shown escaped,
    never sent raw to a terminal or the journal; line breaks are the renderers' to show."""
    for key, value in event_dict.items():
        if isinstance(value, str) and _CONTROL.search(value):
            event_dict[key] = _CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", value)
    return event_dict


def _logfmt(value: Any) -> str:
    """A bare value if it is one word, else quoted; never more than one line."""
    text = str(value).replace("\n", "\\n")
    if text and not any(c in text for c in ' "='):
        return text
    return '"' + text.replace('"', '\\"') + '"'


def _fields(event_dict: EventDict) -> str:
    return " ".join(f"{key}={_logfmt(value)}" for key, value in event_dict.items())


def journal_renderer(_logger: WrappedLogger, method: str, event_dict: EventDict) -> str:
    event_dict.pop("timestamp", None)
    level = event_dict.pop("level", method)
    event = event_dict.pop("event", "")
    fields = _fields(event_dict)
    return f"<{PRIORITY.get(level, 6)}>{event}{' ' if fields else ''}{fields}"


def plain_renderer(_logger: WrappedLogger, method: str, event_dict: EventDict) -> str:
    timestamp = event_dict.pop("timestamp", "")
    level = event_dict.pop("level", method)
    event = event_dict.pop("event", "")
    fields = _fields(event_dict)
    return f"{timestamp} {level:<7} {event}{' ' if fields else ''}{fields}"


class _Scrubbed:
    """Wrap a renderer so that its output can never carry a known secret."""

    def __init__(self, renderer: Processor) -> None:
        self._renderer = renderer

    def __call__(self, logger: WrappedLogger, method: str, event_dict: EventDict) -> str:
        return redact.scrub(str(self._renderer(logger, method, event_dict)))


def configure(level: str = "info", stream: TextIO | None = None) -> None:
    stream = sys.stderr if stream is None else stream
    renderer: Processor
    if under_journald(stream):
        renderer = journal_renderer
    elif stream.isatty():
        renderer = structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback)
    else:
        renderer = plain_renderer
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _printable,
            _Scrubbed(renderer),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.WriteLoggerFactory(stream),  # one write per line: no interleaving
        cache_logger_on_first_use=False,
    )


def start_process(name: str) -> Config | None:
    """A process's first steps: the configuration (on error: say why on stderr and return None,
    the caller exits 2), then logging, with `daemon=<name>` on every line (`make run` interleaves)."""
    try:
        config = load_config()
    except ConfigError as exc:
        print(f"cl-{name}: configuration error: {exc}", file=sys.stderr)
        return None
    configure(config.log_level)
    structlog.contextvars.bind_contextvars(daemon=name)
    return config
