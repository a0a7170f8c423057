"""`make run`, as a person uses it: the daemons (the gateway too) in the foreground, a file dropped in, Ctrl-C."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from cl.client import DaemonUnreachable, call
from utils import Planted, make_run, oauth_credential, wait_until, write_credential


def test_make_run_serves_a_dropped_file_and_ctrl_c_stops_both(tmp_path: Path, planted: Planted) -> None:
    var = tmp_path / "var"
    make = make_run(var)
    sockets = [var / "run" / f"{name}.sock" for name in ("balancer", "rescue", "gateway")]

    def views() -> list[dict[str, str]] | None:
        try:
            return [{a["name"]: a["file"] for a in call(path, {"request": "accounts"})["accounts"]} for path in sockets]
        except DaemonUnreachable:
            return None

    try:
        wait_until(lambda: views() == [{}, {}, {}], "the three daemons to answer with no accounts", timeout=120)
        write_credential(var / "claude", "a1", oauth_credential(planted))
        wait_until(lambda: views() == [{"a1": "ok"}] * 3, "the three daemons to see the dropped file")
    finally:
        os.killpg(make.pid, signal.SIGINT)  # what Ctrl-C at the terminal sends to the foreground job
        out, _ = make.communicate(timeout=60)
    assert out.count("stopped") == 3, out
    assert "Traceback" not in out, out
    assert not any(path.exists() for path in sockets)  # both removed their sockets on the way out
    assert f"CL_CONFIG={var}/config.toml" in out  # it told the user how to reach them
    if os.getuid() == 0:  # it says that it makes system users, and which (none here: made already)
        assert "as root: making the system users and groups of packaging/systemd/sysusers.d/cl.conf" in out
