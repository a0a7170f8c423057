from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import postgres
from cl.store import Store
from real_cli import install
from utils import DaemonProcess, FakeApi, Layout, Planted, both, end_workers, fake_api_running, tokens_in_output


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


@pytest.fixture(scope="session", autouse=True)
def no_token_anywhere_after_the_suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """After the whole suite: everything the system wrote (logs, journals, run output, transcripts,
    the state store) is searched for every token planted in the session."""
    yield
    hits = tokens_in_output(tmp_path_factory.getbasetemp())
    assert not hits, "secrets leaked: " + "; ".join(hits[:20])


@pytest.fixture
def separated() -> Iterator[Layout]:
    """A layout where each job's CLI runs as a user of the pool in its own view, laid out as `make
    run` as root lays it out, outside pytest's 0700 tmp dir; searched for planted tokens before it goes."""
    if os.getuid() != 0:
        pytest.skip("the CLI gets a user of its own only when cl runs as root")
    sysusers = Path(__file__).resolve().parents[1] / "packaging" / "systemd" / "sysusers.d" / "cl.conf"
    subprocess.run(["systemd-sysusers", str(sysusers)], check=True, capture_output=True)
    root = Path(tempfile.mkdtemp(prefix="cl-separated-", dir="/var/tmp"))
    try:
        yield Layout(root, sandboxed=True)
        hits = tokens_in_output(root)
        assert not hits, "secrets leaked: " + "; ".join(hits[:20])
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def layout(request: pytest.FixtureRequest, tmp_path: Path) -> Layout:
    """A layout under the test's tmp dir; as installed (`separated`) for a test marked `as_installed`
    when the tests run as root, as CI does. A test that names `store_at` runs once per backend."""
    if request.node.get_closest_marker("as_installed") and os.getuid() == 0:
        return request.getfixturevalue("separated")  # type: ignore[no-any-return]
    where = request.getfixturevalue("store_at") if "store_at" in request.fixturenames else None
    return Layout(tmp_path, store=where if isinstance(where, str) else "")


@pytest.fixture(scope="session")
def postgresql() -> Iterator[postgres.Server]:
    """The suite's PostgreSQL server, or the test is skipped with the reason (failed, where
    `REQUIRE_POSTGRESQL=required`: CI always runs these tests)."""
    try:
        server = postgres.Server()
    except postgres.Unavailable as exc:
        if os.environ.get(postgres.REQUIRED) == "required":
            pytest.fail(f"PostgreSQL is required here and cannot start: {exc}", pytrace=False)
        pytest.skip(f"no PostgreSQL server: {exc}")
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_at(request: pytest.FixtureRequest, tmp_path: Path) -> Path | str:
    """Where a fresh state store lives, once per backend: an SQLite file, a PostgreSQL database."""
    if request.param == "sqlite":
        return tmp_path / "cl.db"
    server: postgres.Server = request.getfixturevalue("postgresql")
    return server.database()


@pytest.fixture
def store(store_at: Path | str) -> Iterator[Store]:
    """A fresh state store, once per backend."""
    store = Store(store_at)
    yield store
    store.close()


@pytest.fixture(scope="session")
def claude_bin() -> Path:
    """The real Claude Code CLI, pinned (tests/real_cli.py), or the test is skipped with the reason."""
    path, why = install()
    if path is None:
        pytest.skip(f"the real Claude Code CLI is not available: {why}")
    return path


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
    while Layout.made:
        end_workers(Layout.made.pop())


@pytest.fixture
def fake_api(tmp_path: Path) -> Iterator[FakeApi]:
    with fake_api_running(tmp_path) as api:
        yield api


@pytest.fixture
def reachable() -> Iterator[Path]:
    """A temporary directory every user may reach (pytest's own are under a 0700 one of root's)."""
    path = Path(tempfile.mkdtemp(dir="/var/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)
