"""The shared daemon lifecycle, watched from a real NOTIFY_SOCKET, as systemd would."""

from __future__ import annotations

import itertools
import signal
import socket
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cl.client import call
from utils import DaemonProcess, Layout, Planted, oauth_credential, wait_until, write_credential

WATCHDOG_USEC = 400_000


class ServiceManager:
    """The service manager's end of sd_notify: a datagram socket that records each message."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))

    def receive(self, timeout: float = 20.0) -> tuple[float, dict[str, str]]:
        self.sock.settimeout(timeout)
        data = self.sock.recv(4096).decode()
        fields = dict(line.split("=", 1) for line in data.splitlines() if "=" in line)
        return time.monotonic(), fields

    def until(self, key: str, timeout: float = 20.0) -> dict[str, str]:
        """Messages up to and including the first that carries `key`."""
        deadline = time.monotonic() + timeout
        while True:
            _, fields = self.receive(max(0.1, deadline - time.monotonic()))
            if key in fields:
                return fields


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[ServiceManager]:
    manager = ServiceManager(tmp_path / "notify.sock")
    yield manager
    manager.sock.close()


def start(layout: Layout, manager: ServiceManager, **env: str) -> DaemonProcess:
    daemon = DaemonProcess("rescue", layout, env=layout.env(NOTIFY_SOCKET=str(manager.path), **env))
    return daemon.start(wait=False)


def test_ready_only_once_the_socket_answers_with_the_loaded_roster(
    layout: Layout, manager: ServiceManager, planted: Planted
) -> None:
    for name in ("a", "b"):
        write_credential(layout.credentials, name, oauth_credential(planted))
    daemon = start(layout, manager)
    ready = manager.until("READY")
    reply = call(daemon.socket, {"request": "accounts"}, timeout=5)  # no retry: it must answer now
    assert [account["name"] for account in reply["accounts"]] == ["a", "b"]
    assert ready["STATUS"].startswith("2 accounts, 2 usable, ")
    assert daemon.stop() == 0


def test_status_follows_the_roster(layout: Layout, manager: ServiceManager, planted: Planted) -> None:
    daemon = start(layout, manager)
    manager.until("READY")
    write_credential(layout.credentials, "a", oauth_credential(planted))
    assert manager.until("STATUS")["STATUS"].startswith("1 account, 1 usable, ")
    write_credential(layout.credentials, "b", "{broken")
    assert manager.until("STATUS")["STATUS"].startswith("2 accounts, 1 usable, ")
    assert daemon.stop() == 0


def test_watchdog_pings_at_half_the_interval(layout: Layout, manager: ServiceManager) -> None:
    daemon = start(layout, manager, WATCHDOG_USEC=str(WATCHDOG_USEC))
    manager.until("READY")
    pings: list[float] = []
    while len(pings) < 8:
        at, fields = manager.receive()
        if "WATCHDOG" in fields:
            pings.append(at)
    gaps = [later - earlier for earlier, later in itertools.pairwise(pings)]
    # Half of WATCHDOG_USEC is 0.2 s; the median tolerates a busy machine's odd late ping.
    assert 0.1 <= statistics.median(gaps) <= 0.3, gaps
    assert daemon.stop() == 0


def test_no_watchdog_pings_for_another_pid(layout: Layout, manager: ServiceManager) -> None:
    daemon = start(layout, manager, WATCHDOG_USEC=str(WATCHDOG_USEC), WATCHDOG_PID="1")
    manager.until("READY")
    daemon.stop()
    seen = []
    while "STOPPING" not in (fields := manager.receive()[1]):
        seen.append(fields)
    assert not any("WATCHDOG" in fields for fields in seen)


def test_a_manager_that_stops_reading_never_freezes_the_daemon(
    layout: Layout, manager: ServiceManager, planted: Planted
) -> None:
    daemon = start(layout, manager)
    manager.until("READY")
    # Nobody reads the notify socket from here on (its queue holds 10 datagrams), while
    # every new account changes STATUS=. Each must still show, one after the other.
    for i in range(40):
        write_credential(layout.credentials, f"a{i}", oauth_credential(planted))
        wait_until(lambda i=i: f"a{i}" in daemon.file_states(), f"account a{i} to show")  # type: ignore[misc]
    assert daemon.stop() == 0


def test_sighup_reloads_and_rescans(layout: Layout, manager: ServiceManager, planted: Planted) -> None:
    daemon = start(layout, manager)
    manager.until("READY")
    (layout.root / "config.toml").write_text("log_level = 'warning'\n")
    daemon.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    reloading = manager.until("RELOADING")
    assert int(reloading["MONOTONIC_USEC"]) > 0
    assert manager.until("READY")["READY"] == "1"  # reloaded, ready again
    # A bad file on reload is refused; the daemon keeps running on the old configuration.
    (layout.root / "config.toml").write_text("log_level = 'loud'\n")
    daemon.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    manager.until("RELOADING")
    manager.until("READY")
    write_credential(layout.credentials, "a", oauth_credential(planted))
    wait_until(lambda: daemon.file_states() == {"a": "ok"}, "the account to show after reloads")
    assert "reload refused" in daemon.log()
    assert daemon.stop() == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_is_clean(layout: Layout, manager: ServiceManager, sig: signal.Signals) -> None:
    daemon = start(layout, manager)
    manager.until("READY")
    daemon.process.send_signal(sig)  # type: ignore[union-attr]
    assert manager.until("STOPPING")["STOPPING"] == "1"
    assert daemon.stop() == 0
    assert not daemon.socket.exists()


def test_stop_is_not_held_up_by_clients_that_never_finish(layout: Layout, manager: ServiceManager) -> None:
    """The drain is bounded: an idle connection and a half-sent request do not keep the daemon up."""
    daemon = start(layout, manager)
    manager.until("READY")
    with socket.socket(socket.AF_UNIX) as idle, socket.socket(socket.AF_UNIX) as half:
        idle.connect(str(daemon.socket))
        half.connect(str(daemon.socket))
        half.sendall(b'{"request": "acco')  # and never the rest of the line
        daemon.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        assert daemon.stop() == 0
    assert "stopped" in daemon.log()


def test_bad_configuration_exits_2_naming_the_key(layout: Layout) -> None:
    daemon = DaemonProcess("balancer", layout, env=layout.env(CL_RESYNC_INTERVAL="soon"))
    daemon.start(wait=False)
    assert daemon.exit_code() == 2
    log = daemon.log()
    assert "CL_RESYNC_INTERVAL" in log
    assert "Traceback" not in log


def test_second_daemon_on_the_same_socket_refuses(layout: Layout) -> None:
    first = DaemonProcess("balancer", layout).start()
    second = DaemonProcess("balancer", layout)
    second.log_path = layout.root / "second.log"
    second.start(wait=False)
    assert second.exit_code() == 1
    assert "already listening" in second.log()
    assert first.answers()
    assert first.stop() == 0
