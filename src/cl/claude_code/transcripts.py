"""Where the CLI keeps a session's conversation, and what its last turn says.

`$CLAUDE_CONFIG_DIR/projects/<enc(realpath(cwd))>/<session-id>.jsonl` (docs/claude-code.md, fact 9):
`enc` turns every UTF-16 unit outside `[A-Za-z0-9]` into `-`; a name over 200 characters is
cut to 200, then `-` and the base-36 of abs(Java `String.hashCode`) of the full name.
"""

from __future__ import annotations

import os
from pathlib import Path

MAX_PROJECT_NAME = 200
_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"


def _utf16_units(text: str) -> list[int]:
    data = text.encode("utf-16-le", "surrogatepass")
    return [int.from_bytes(data[i : i + 2], "little") for i in range(0, len(data), 2)]


def _java_hash(units: list[int]) -> int:
    h = 0
    for unit in units:
        h = (31 * h + unit) & 0xFFFFFFFF
    return h - (1 << 32) if h >= 1 << 31 else h


def _base36(number: int) -> str:
    digits = ""
    while True:
        number, rest = divmod(number, 36)
        digits = _DIGITS[rest] + digits
        if number == 0:
            return digits


def project_dir_name(cwd: str) -> str:
    """The directory name the CLI gives a working directory (already resolved)."""
    units = _utf16_units(cwd)
    name = "".join(chr(u) if u < 128 and chr(u).isalnum() else "-" for u in units)
    if len(name) <= MAX_PROJECT_NAME:
        return name
    return f"{name[:MAX_PROJECT_NAME]}-{_base36(abs(_java_hash(units)))}"


def transcript_path(config_dir: Path, cwd: str, session_id: str) -> Path:
    return config_dir / "projects" / project_dir_name(os.path.realpath(cwd)) / f"{session_id}.jsonl"
