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


OUTPUT_SUFFIXES = (".log", ".jsonl", ".db", ".db-wal", ".out")
"""What the daemons, workers and fakes write: logs, run output, transcripts, the state store."""


@pytest.fixture(scope="session", autouse=True)
def no_token_anywhere_after_the_suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """After the whole suite: everything the system wrote (logs, journals, run output, transcripts,
    the state store, each job's config dir) is searched for every token planted in the session.
    The tests' own inputs (credential files, swap files with credential content) are not output."""
    yield
    root = tmp_path_factory.getbasetemp()
    hits = []
    for path in root.rglob("*"):
        if path.is_symlink() or not path.is_file():
            continue
        if not (path.name.endswith(OUTPUT_SUFFIXES) or "state" in path.relative_to(root).parts[:-1]):
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
