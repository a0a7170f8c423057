"""`make demo` plays the seed's afternoon to the end (the same module, in a temp dir)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from utils import FAKE_CLAUDE


def test_the_demo_plays_to_the_end(tmp_path: Path) -> None:
    demo = subprocess.run(
        [sys.executable, "-m", "cl.demo", "--claude", str(FAKE_CLAUDE), "--root", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert demo.returncode == 0, demo.stdout + demo.stderr
    out = demo.stdout
    for line in (
        "wall from the API account=",  # the walls came from the API's answers, at the gateway
        "waiting sessions=3 reason=no-eligible-account",
        "account added account=a4",
        "session resumed",
    ):
        assert line in out, line
    assert "6 of 6 jobs done" in out
    assert out.count(" -> a4") == 3  # the three walled sessions, each moved to the new account
    live = re.search(r"(\d+) of them in the process that walled \(a live move\)", out)
    assert live is not None
    assert int(live[1]) >= 3  # each walled session went on to a4 in its own process
