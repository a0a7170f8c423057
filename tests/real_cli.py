"""The real Claude Code CLI, pinned, installed from the npm registry into a cache once."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from cl.claude_code import TESTED_VERSIONS

CLAUDE_CODE_VERSION, *_older = TESTED_VERSIONS
OLDER = tuple(_older)
"""Older versions some facts are measured on too (pure JavaScript, about 10 MB each)."""
CACHES = (
    Path("/var/cache") if os.getuid() == 0 else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
) / "cl-tests"
"""As root, where the CLI's own user can run it (root's home is closed to it)."""


def install(version: str = CLAUDE_CODE_VERSION) -> tuple[Path | None, str]:
    """The `claude` binary of `version` (the pinned one by default), or None and why not."""
    cache = CACHES / f"claude-code-{version}"
    binary = cache / "node_modules" / ".bin" / "claude"
    if binary.exists():
        return binary, ""
    npm = shutil.which("npm")
    if npm is None:
        return None, "npm is not installed"
    cache.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [
            npm,
            "install",
            "--prefix",
            str(cache),
            "--no-audit",
            "--no-fund",
            "--loglevel=error",
            f"@anthropic-ai/claude-code@{version}",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    if result.returncode or not binary.exists():
        return None, f"npm install @anthropic-ai/claude-code@{version} failed: {result.stderr[-500:]}"
    return binary, ""


if __name__ == "__main__":  # .ci/run warms the cache with this
    found = [install(version) for version in (CLAUDE_CODE_VERSION, *OLDER)]
    for path, why in found:
        print(path or why)
    raise SystemExit(0 if all(path for path, _ in found) else 1)
