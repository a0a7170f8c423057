"""The real Claude Code CLI, pinned, installed from the npm registry into a cache once."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

CLAUDE_CODE_VERSION = "2.1.332"
CACHE = (
    (Path("/var/cache") if os.getuid() == 0 else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")))
    / "cl-tests"
    / f"claude-code-{CLAUDE_CODE_VERSION}"
)
"""As root, where the CLI's own user can run it (root's home is closed to it)."""


def install() -> tuple[Path | None, str]:
    """The `claude` binary, or None and why not."""
    binary = CACHE / "node_modules" / ".bin" / "claude"
    if binary.exists():
        return binary, ""
    npm = shutil.which("npm")
    if npm is None:
        return None, "npm is not installed"
    CACHE.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [
            npm,
            "install",
            "--prefix",
            str(CACHE),
            "--no-audit",
            "--no-fund",
            "--loglevel=error",
            f"@anthropic-ai/claude-code@{CLAUDE_CODE_VERSION}",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    if result.returncode or not binary.exists():
        return None, f"npm install @anthropic-ai/claude-code@{CLAUDE_CODE_VERSION} failed: {result.stderr[-500:]}"
    return binary, ""


if __name__ == "__main__":  # .ci/run warms the cache with this
    path, why = install()
    print(path or why)
    raise SystemExit(0 if path else 1)
