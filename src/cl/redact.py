"""The last line of defence: scrub every known token from text on its way out.

Every `Secret` made from a credential file is remembered here; `scrub` replaces any of
them, and anything shaped like an Anthropic token, with `***`. Cost is one regex pass and
one set lookup per word-like run, whatever the number of accounts.
"""

from __future__ import annotations

import json
import re
from typing import Any

_known: set[str] = set()
_MIN_SECRET = 8
_RUN = re.compile(rf"[A-Za-z0-9_\-.+/=]{{{_MIN_SECRET},}}")
_ANTHROPIC = re.compile(r"sk-ant-[A-Za-z0-9_\-]+")
MASK = "***"


def remember(secret: str) -> None:
    if len(secret) >= _MIN_SECRET:
        _known.add(secret)


def scrub(text: str) -> str:
    text = _ANTHROPIC.sub(MASK, text)
    if _known:
        text = _RUN.sub(_mask_known, text)
    return text


def _mask_known(match: re.Match[str]) -> str:
    run = match.group(0)
    if run in _known:
        return MASK
    # A secret glued to other word characters (`key=<secret>.`): try the run's pieces.
    for piece in re.split(r"[=.+/]", run):
        if piece in _known:
            run = run.replace(piece, MASK)
    return run


def scrub_line(line: str) -> str:
    """A line of output scrubbed as it will be read: a JSON line is decoded first (a token written
    with escapes, `\\u0073k-ant-…`, is one once decoded), its strings scrubbed, and written again
    only if one changed; any other line as text."""
    try:
        value = json.loads(line)
    except (ValueError, RecursionError):
        return scrub(line)
    scrubbed = _scrub_value(value)
    if scrubbed == value:
        return scrub(line)
    return json.dumps(scrubbed, ensure_ascii=False) + ("\n" if line.endswith("\n") else "")


def _scrub_value(value: Any) -> Any:
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, list):
        return [_scrub_value(item) for item in value]
    if isinstance(value, dict):
        return {scrub(key): _scrub_value(item) for key, item in value.items()}
    return value
