from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from utils import DaemonProcess, Layout, Planted, both


@pytest.fixture
def planted(capfd: pytest.CaptureFixture[str], tmp_path: Path) -> Iterator[Planted]:
    """Unique tokens for this test. Fails the test if any of them shows in its output or logs."""
    planted = Planted()
    yield planted
    out, err = capfd.readouterr()
    sys.stdout.write(out)
    sys.stderr.write(err)
    leaks = planted.leaks(out, "stdout") + planted.leaks(err, "stderr")
    for log in sorted(tmp_path.rglob("*.log")):
        leaks += planted.leaks(log.read_text(errors="replace"), str(log.relative_to(tmp_path)))
    if leaks:
        pytest.fail("secret leaked: " + "; ".join(leaks), pytrace=False)


WHERE_TOKENS_BELONG = ("credentials-*.json", ".credentials-*.tmp", ".incoming", "quota.json", "elsewhere.json")
"""Files the tests write tokens into on purpose: credentials, and the fake CLI's quota keyed by token."""


@pytest.fixture(scope="session", autouse=True)
def no_token_anywhere_after_the_suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """After the whole suite: every file any test or daemon left behind (logs, journals, run output,
    transcripts, the state store) is searched for every token planted in the session."""
    yield
    root = tmp_path_factory.getbasetemp()
    hits = []
    for path in root.rglob("*"):
        if path.is_symlink() or not path.is_file() or any(path.match(p) for p in WHERE_TOKENS_BELONG):
            continue
        data = path.read_bytes()
        hits += [
            f"planted token #{i} in {path.relative_to(root)}"
            for i, t in enumerate(Planted.everywhere)
            if t.encode() in data
        ]
    assert not hits, "secrets leaked: " + "; ".join(hits[:20])


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    return Layout(tmp_path)


@pytest.fixture
def daemons(layout: Layout) -> Iterator[tuple[DaemonProcess, DaemonProcess]]:
    with both(layout) as pair:
        yield pair


@pytest.fixture(autouse=True)
def no_daemon_outlives_its_test() -> Iterator[None]:
    yield
    while DaemonProcess.started:
        process = DaemonProcess.started.pop().process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
