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
