"""structlog set-up: one entry per event, for journald, a terminal, or a plain file.

* Under systemd (stderr is the stream named by `$JOURNAL_STREAM`): into the journal through its
  native protocol, every field a journal field (`cl.journal`); with no journal socket
  (`journal_socket = ""`), `<N>event key=value` lines on stderr, `N` being the syslog priority
  (journald's SyslogLevelPrefix reads and strips it).
* On a terminal: structlog's console renderer, in colour unless `NO_COLOR` is set.
* Otherwise: `timestamp level event key=value`.

Whatever the renderer, what it makes goes through `redact.scrub`.
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
from cl.journal import PRIORITY, JournalFields, JournalLogger, message


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
    never sent raw to a terminal or the journal; line breaks are the renderers' to show. A field
    with no value is left out: a line never says `session=None`."""
    for key, value in list(event_dict.items()):
        if value is None:
            del event_dict[key]
        elif isinstance(value, str) and _CONTROL.search(value):
            event_dict[key] = _CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", value)
    return event_dict


def journal_renderer(_logger: WrappedLogger, method: str, event_dict: EventDict) -> str:
    event_dict.pop("timestamp", None)
    level = event_dict.pop("level", method)
    return f"<{PRIORITY.get(level, 6)}>{message(str(event_dict.pop('event', '')), event_dict)}"


def plain_renderer(_logger: WrappedLogger, method: str, event_dict: EventDict) -> str:
    timestamp = event_dict.pop("timestamp", "")
    level = event_dict.pop("level", method)
    return f"{timestamp} {level:<7} {message(str(event_dict.pop('event', '')), event_dict)}"


class _Scrubbed:
    """Wrap a renderer so that its output can never carry a known secret."""

    def __init__(self, renderer: Processor) -> None:
        self._renderer = renderer

    def __call__(self, logger: WrappedLogger, method: str, event_dict: EventDict) -> str:
        return redact.scrub(str(self._renderer(logger, method, event_dict)))


_journal: JournalLogger | None = None


def configure(
    level: str = "info", stream: TextIO | None = None, *, journal_socket: str = "", identifier: str = "cl"
) -> None:
    """Log at `level` and above to `stream` (stderr), or natively to the journal at `journal_socket`
    when `stream` is the journal's own (under systemd), as `identifier`."""
    global _journal  # noqa: PLW0603 - one journal connection per process, replaced on reconfiguring
    if _journal is not None:
        _journal.close()
        _journal = None
    stream = sys.stderr if stream is None else stream
    last: Processor
    factory: Any = structlog.WriteLoggerFactory(stream)  # one write per line: no interleaving
    if under_journald(stream) and journal_socket and os.path.exists(journal_socket):
        last = JournalFields(identifier)
        journal = _journal = JournalLogger(journal_socket, stream)
        factory = lambda *_args: journal  # noqa: E731 - structlog wants a factory; there is one logger
    elif under_journald(stream):
        last = _Scrubbed(journal_renderer)
    elif stream.isatty():
        colours = not os.environ.get("NO_COLOR")  # https://no-color.org: set and not empty
        last = _Scrubbed(
            structlog.dev.ConsoleRenderer(colors=colours, exception_formatter=structlog.dev.plain_traceback)
        )
    else:
        last = _Scrubbed(plain_renderer)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _printable,
            last,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=factory,
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
    configure_for(config, name)
    structlog.contextvars.bind_contextvars(daemon=name)
    return config


def configure_for(config: Config, name: str) -> None:
    """Logging as `config` says, for process `cl-<name>` (at start and on every reload)."""
    configure(config.log_level, journal_socket=config.journal_socket, identifier=f"cl-{name}")
