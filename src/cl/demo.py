"""`make demo`: the afternoon this project exists for, played on a local layout with a fake CLI.

Three accounts, work on each, all three wall; the rescuer waits; a fourth credential file is
dropped in; every walled session moves to it, conversation intact, and finishes. The three
daemons run for real (their own processes, sockets, SQLite, inotify), in gateway mode: the CLIs
hold capabilities and cl-gateway forwards their requests with the accounts' tokens. Only `claude`
and the API are stand-ins (`--claude`, tests/fakes/claude; `--api`, tests/fakes/fake_anthropic.py
on 127.0.0.1, each account's quota one request), so it needs no account and no network.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from cl.store import Store

STORY = {
    "balancer": ("account added", "job placed", "session done"),
    "rescue": ("account added", "session walled", "waiting", "session moved", "session resumed", "session done"),
    "gateway": ("wall from the API", "request moved in flight"),
}
"""The events worth a line on screen, per daemon; their full logs stay in <root>/*.log."""


class Demo:
    def __init__(self, root: Path, claude: Path, api: Path) -> None:
        self.root = root
        self.api = api
        self.api_url = ""
        self.bin = Path(sys.executable).parent
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("CL_", "NOTIFY_SOCKET", "JOURNAL_STREAM"))},
            "CL_CONFIG": str(root / "config.toml"),
            "CL_CREDENTIALS_DIR": str(root / "claude"),
            "CL_STATE_DIR": str(root / "state"),
            "CL_SESSIONS_DIR": str(root / "sessions"),
            "CL_CONFINEMENT": "none",  # the fake CLI as the demo's own user: a show of rescue, not of separation
            "CL_CLI_NETWORK": "host",  # nor of the network a cl-cli@ unit narrows
            "CL_CLI_ENV_KEEP": "FAKE_CLAUDE_*",  # what steers the fake CLI
            "CL_RUNTIME_DIR": str(root / "run"),
            "CL_CLAUDE_BIN": str(claude),
            "CL_GATEWAY_LISTEN": f"127.0.0.1:{_free_port()}",
            "FAKE_CLAUDE_LOG": str(root / "claude-calls.jsonl"),
            "FAKE_CLAUDE_HOLD": str(root / "hold"),
        }
        self.daemons: list[subprocess.Popen[bytes]] = []
        self.started = time.monotonic()
        self._saying = threading.Lock()

    def say(self, text: str) -> None:
        with self._saying:  # one line at a time, whichever daemon's log it comes from
            print(f"{time.monotonic() - self.started:6.2f}s  {text}", flush=True)

    def setup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        for name in ("claude", "state", "run", "work"):
            (self.root / name).mkdir(parents=True)
        (self.root / "config.toml").write_text("")
        port = self.root / "api.port"
        log = self.root / "api.jsonl"
        self.daemons.append(
            subprocess.Popen([sys.executable, str(self.api), "--port-file", str(port), "--log", str(log)])
        )
        self.wait(port.exists)
        self.api_url = f"http://127.0.0.1:{port.read_text()}"
        self.env["CL_GATEWAY_UPSTREAM"] = self.api_url

    def start_daemons(self) -> None:
        for name in ("gateway", "balancer", "rescue"):
            log = (self.root / f"{name}.log").open("wb")
            self.daemons.append(subprocess.Popen([str(self.bin / f"cl-{name}")], env=self.env, stderr=log))
            threading.Thread(target=self._tell, args=(name,), daemon=True).start()
        self.wait(lambda: all(self.cl("accounts", "--from", d).returncode == 0 for d in ("balancer", "rescue")))
        self.wait((self.root / "run" / "gateway.sock").exists)

    def _tell(self, name: str) -> None:
        """Print the story lines of one daemon's log as they are written."""
        with (self.root / f"{name}.log").open() as log:
            while True:
                line = log.readline()
                if not line:
                    time.sleep(0.02)
                    continue
                if "daemon=worker" in line:
                    continue  # the daemons report what their workers did
                words = line.split(None, 2)
                if len(words) == 3 and words[2].startswith(STORY[name]):
                    event = words[2].replace(f" daemon={name}", "").rstrip()
                    self.say(f"cl-{name:<8}  {event}")

    def stop_daemons(self) -> None:
        for process in self.daemons:
            process.terminate()
        for process in self.daemons:
            process.wait(30)

    def cl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.bin / "cl", *args], env=self.env, capture_output=True, text=True, check=False)

    def credential(self, name: str, requests: int | None = None) -> str:
        """A credential file like the real one (a made-up token), allowed `requests` by the fake API."""
        token = f"sk-ant-oat01-demo-{uuid.uuid4().hex}"
        doc = {"claudeAiOauth": {"accessToken": token, "expiresAt": 4_102_444_800_000, "subscriptionType": "max"}}
        incoming = self.root / "claude" / f".{name}.tmp"
        incoming.write_text(json.dumps(doc))
        incoming.chmod(0o600)
        if requests is not None:
            limit = json.dumps({"key": token, "limit": requests}).encode()
            urllib.request.urlopen(f"{self.api_url}/_fake/limit", limit, timeout=10).close()  # noqa: S310 - loopback
        incoming.rename(self.root / "claude" / f"credentials-{name}.json")
        return token

    def jobs(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = json.loads(self.cl("jobs", "--all", "--json").stdout)
        return result

    def calls(self) -> list[dict[str, Any]]:
        """Every turn of the fake CLI so far: the complete lines of its log (it may be writing one)."""
        path = self.root / "claude-calls.jsonl"
        *complete, _partial = path.read_text().split("\n") if path.exists() else [""]
        return [json.loads(line) for line in complete]

    def wait(self, condition: Callable[[], bool], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise SystemExit(f"the demo got stuck; the daemons' logs are in {self.root}")
            time.sleep(0.05)

    def play(self) -> None:
        self.say("three accounts, each with one request left before its usage wall")
        for name in ("a1", "a2", "a3"):
            self.credential(name, requests=1)
        self.start_daemons()
        self.say("six jobs submitted: two on each account")
        hold = self.root / "hold"
        hold.touch()  # the fake CLI works until this goes: all six start before any of them ends
        for i in range(6):
            self.cl("submit", "--cwd", str(self.root / "work"), "--prompt", f"task {i}: step one")
        self.wait(lambda: len(self.calls()) == 6)
        hold.unlink()
        rescue_log = self.root / "rescue.log"
        self.wait(lambda: "waiting sessions=3" in rescue_log.read_text())
        time.sleep(1)  # let the waiting be seen
        self.say("an operator drops a fourth credential file in: credentials-a4.json")
        self.credential("a4")
        self.wait(lambda: {job["state"] for job in self.jobs()} == {"done"})
        time.sleep(0.3)  # the last story lines
        self.summary(sys.stdout)

    def summary(self, out: TextIO) -> None:
        store = Store(self.root / "state" / "cl.db")
        ledger = store.ledger(100_000)
        store.close()
        moves: dict[int, list[str]] = {}
        for entry in ledger:
            if entry["event"] in ("job placed", "move started"):
                moves.setdefault(entry["job_id"], []).append(entry["account"])
        print("\n" + "-" * 72, file=out)
        print(f"{'JOB':<4} {'SESSION':<38} {'STATE':<6} ACCOUNTS (placed, then each move)", file=out)
        for job in self.jobs():
            print(f"{job['id']:<4} {job['session_id']:<38} {job['state']:<6} {' -> '.join(moves[job['id']])}", file=out)
        calls = self.calls()
        resumed = [call for call in calls if call["prompt"] == "continue" and call["history"] >= 1]
        previous: dict[str, int] = {}  # session -> the pid of its latest turn so far
        live = 0
        for call in calls:
            live += call in resumed and previous.get(call["session_id"]) == call["pid"]
            previous[call["session_id"]] = call["pid"]
        done = sum(job["state"] == "done" for job in self.jobs())
        print(
            f"\n{done} of {len(self.jobs())} jobs done in {len(calls)} turns of {len({c['pid'] for c in calls})}"
            f" CLI processes; {len(resumed)} turns resumed a session with its earlier conversation,"
            f" {live} of them in the process that walled (a live move).\n"
            f"Full logs: {self.root}/gateway.log, balancer.log and rescue.log",
            file=out,
        )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--claude", type=Path, required=True, help="the fake CLI (tests/fakes/claude)")
    parser.add_argument("--api", type=Path, help="the fake API (default: fake_anthropic.py beside the fake CLI)")
    parser.add_argument("--root", type=Path, default=Path("var/demo"), help="where the demo lays itself out")
    args = parser.parse_args()
    api = args.api or args.claude.parent / "fake_anthropic.py"
    demo = Demo(args.root.absolute(), args.claude.absolute(), api.absolute())
    demo.setup()
    try:
        demo.play()
    finally:
        demo.stop_daemons()


if __name__ == "__main__":
    main()
