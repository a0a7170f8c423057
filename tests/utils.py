"""Helpers that start real things: credential files, daemon processes, waits on events."""

from __future__ import annotations

import contextlib
import fcntl
import grp
import json
import os
import pty
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from cl.client import DaemonUnreachable, call
from cl.store import Run, Store

BIN = Path(sys.executable).parent
FAKE_CLAUDE = Path(__file__).resolve().parent / "fakes" / "claude"
CLI_STARTER = Path(sys.executable).with_name("cl-cli-starter")
"""What `cl-cli@` runs: one CLI for the worker connected on its standard input (`cli_socket`)."""
WORKER = Path(sys.executable).with_name("cl-worker")
"""What `cl-worker@` runs: the worker for the run its launcher names on its standard input (`worker_socket`)."""
POOL = "cl-cli"
"""The CLI's users' group (`cli_pool`), made by packaging/systemd/sysusers.d."""
FAKE_API = Path(__file__).resolve().parent / "fakes" / "fake_anthropic.py"
FAR_FUTURE_MS = 4_102_444_800_000  # 2100-01-01


class Planted:
    """Unique token strings for one test; the `planted` fixture fails the test if one leaks."""

    everywhere: ClassVar[list[str]] = []
    """Every token planted in this session: the end-of-session scan looks for all of them."""

    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.watched_files: list[Path] = []

    def token(self, prefix: str = "sk-ant-oat01-") -> str:
        token = f"{prefix}{uuid.uuid4().hex}{uuid.uuid4().hex[:8]}"
        self.tokens.append(token)
        Planted.everywhere.append(token)
        return token

    def name_of(self, token: str) -> str:
        """What a test may print instead of a token: its number, never the token."""
        return f"planted token #{self.tokens.index(token)}" if token in self.tokens else "a token not planted here"

    def tokens_in(self, credential_file: Path) -> tuple[str, str]:
        """The names (`name_of`) of an OAuth credential file's access and refresh tokens."""
        oauth = json.loads(credential_file.read_bytes())["claudeAiOauth"]
        return self.name_of(oauth["accessToken"]), self.name_of(oauth["refreshToken"])

    def leaks(self, text: str, where: str) -> list[str]:
        """Where planted tokens appear; the message names the token's number, not the token."""
        return [f"planted token #{i} appears in {where}" for i, token in enumerate(self.tokens) if token in text]


OUTPUT_SUFFIXES = (".log", ".jsonl", ".db", ".db-wal", ".out")
"""What the daemons, workers and fakes write: logs, run output, transcripts, the state store."""


def tokens_in_output(root: Path) -> list[str]:
    """Where, beneath `root`, a token planted in this session shows in what the system wrote (the
    tests' own inputs, credential files and the jobs' own copies of them, are not output)."""
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
    return hits


def oauth_credential(planted: Planted, *, token: str | None = None, expires_at_ms: int = FAR_FUTURE_MS) -> str:
    access = planted.token() if token is None else token
    return json.dumps(
        {
            "claudeAiOauth": {
                "accessToken": access,
                "refreshToken": planted.token("sk-ant-ort01-") if access else "",
                "expiresAt": expires_at_ms,
                "scopes": ["user:inference"],
                "subscriptionType": "max",
            }
        }
    )


def api_key_credential(planted: Planted) -> str:
    # Not shaped like an Anthropic key: only the registry's memory of it can redact it.
    return json.dumps({"apiKey": planted.token("plainkey-")})


def write_credential(directory: Path, name: str, content: str, mode: int = 0o600) -> Path:
    """Drop a credential in atomically, as an operator's `install`/`cp`+`mv` would."""
    path = directory / f"credentials-{name}.json"
    tmp = directory / f".credentials-{name}.json.{uuid.uuid4().hex[:6]}.tmp"
    tmp.write_text(content)
    tmp.chmod(mode)
    tmp.replace(path)
    return path


def wait_until(predicate: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    """Poll `predicate` until truthy (it is an event we wait for, not a speed we assert)."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.005)


@dataclass
class Layout:
    """A local layout for the daemons: credentials, state and runtime dirs under one root."""

    root: Path
    credentials: Path = field(init=False)
    state: Path = field(init=False)
    sessions: Path = field(init=False)
    """Each job's config dir (`job-N`)."""
    runtime: Path = field(init=False)
    work: Path = field(init=False)
    """A job's working directory."""
    fakes: Path = field(init=False)
    """The fake CLI's own files (its log, the quota), which it writes."""

    store: str = ""
    """A PostgreSQL database's URL (`store`), or the SQLite file in the state dir."""
    sandboxed: bool = False
    """Each job's CLI runs as a user of the pool, in its own view (`confinement = "sandbox"`), laid
    out as `make run` as root would have it (see `separated`); otherwise as the daemons' own user,
    unconfined (root in CI)."""

    made: ClassVar[list[Layout]] = []
    """Every layout of the running test (what `end_workers` looks for)."""

    def __post_init__(self) -> None:
        Layout.made.append(self)
        self.credentials = self.root / "claude"
        self.state = self.root / "state"
        self.sessions = self.root / "sessions"
        self.runtime = self.root / "run"
        self.work = self.root / "work"
        self.fakes = self.root / "fake"
        for path in (self.credentials, self.state, self.runtime, self.work, self.fakes):
            path.mkdir(parents=True, exist_ok=True)
        if self.sandboxed:
            pool = grp.getgrnam(POOL).gr_gid
            self.root.chmod(0o755)
            for private in (self.credentials, self.state):
                private.chmod(0o700)
            self.runtime.chmod(0o751)  # as the units make it: the CLIs' users pass to the gateway's cli/
            for theirs in (self.work, self.fakes):  # as an operator makes a job's directory
                os.chown(theirs, -1, pool)
                theirs.chmod(0o2770)
            (self.fakes / "fake-claude.jsonl").touch()  # every member of the pool appends to it
            (self.fakes / "fake-claude.jsonl").chmod(0o666)

    @property
    def database(self) -> Path | str:
        """Where the state store is (`Store` takes it)."""
        return self.store or self.state / "cl.db"

    def quota(self, turns: dict[str, int]) -> None:
        """Turns left per token for the fake claude ("*": everyone else); a wall when 0."""
        path = self.fakes / "quota.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(turns))
        tmp.chmod(0o666)  # the fake CLI counts the turns down, as whichever user it runs as
        tmp.replace(path)

    @property
    def hold(self) -> Path:
        """While this file exists, the fake claude waits before its request (every daemon's env names it)."""
        return self.fakes / "hold"

    @contextlib.contextmanager
    def started_together(self, calls: int) -> Iterator[None]:
        """CLI runs started inside wait until `calls` runs have started, then all go at once:
        sessions that wall "at once" do, however slowly this machine starts them."""
        self.hold.touch()
        yield
        wait_until(lambda: len(self.claude_calls()) >= calls, f"{calls} CLI runs to start")
        self.hold.unlink()

    def claude_calls(self) -> list[dict[str, Any]]:
        """Every run of the fake claude, in order."""
        return json_lines(self.fakes / "fake-claude.jsonl")

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CL_", "NOTIFY_SOCKET", "WATCHDOG_"))}
        env.pop("JOURNAL_STREAM", None)
        env.update(
            CL_CREDENTIALS_DIR=str(self.credentials),
            CL_STATE_DIR=str(self.state),
            CL_SESSIONS_DIR=str(self.sessions),
            CL_CONFINEMENT="sandbox" if self.sandboxed else "none",
            CL_CLI_NETWORK="host",  # no unit narrows it (a test asks for "filtered" or "gateway")
            CL_CLI_ENV_KEEP="FAKE_CLAUDE_* ANTHROPIC_BASE_URL NODE_EXTRA_CA_CERTS",  # what the fakes are steered by
            CL_CLI_READABLE=str(FAKE_CLAUDE.parent),  # the fake CLI (its interpreter: /usr/bin/python3)
            CL_RUNTIME_DIR=str(self.runtime),
            CL_LOG_LEVEL="debug",
            CL_CONFIG=str(self.root / "config.toml"),
            CL_CLAUDE_BIN=str(FAKE_CLAUDE),
            CL_CLI_WRITABLE=str(self.fakes),
            CL_GATEWAY="false",  # direct mode, unless a test (tests/test_gateway.py) asks for the gateway
            CL_PROBE_INTERVAL="0",  # the gateway reads no idle account's windows, unless a test asks
            FAKE_CLAUDE_LOG=str(self.fakes / "fake-claude.jsonl"),
            FAKE_CLAUDE_QUOTA=str(self.fakes / "quota.json"),
            FAKE_CLAUDE_HOLD=str(self.hold),
        )
        if self.store:
            env["CL_STORE"] = self.store
        (self.root / "config.toml").touch()
        env.update(extra)
        return env


def end_workers(layout: Layout) -> list[int]:
    """Kill the workers this layout's daemons launched that are still there (a session held for a
    live move waits up to `live_wait`, outliving the daemons), found by the state dir their
    environment names; their CLIs go with them (PDEATHSIG). The pids killed."""
    mark = f"CL_STATE_DIR={layout.state}".encode()
    killed = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if mark in (entry / "environ").read_bytes().split(b"\0"):
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
        except (OSError, ValueError):
            continue
    return killed


@dataclass
class FakeApi:
    """The fake Anthropic API (and OAuth token endpoint) on 127.0.0.1, in a process of its own."""

    url: str
    log: Path
    watch: Path
    """Each `NAME.pid` here is logged alive or not with every request."""

    def post(self, path: str, body: dict[str, Any]) -> Any:
        request = urllib.request.Request(f"{self.url}{path}", json.dumps(body).encode(), method="POST")  # noqa: S310
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - loopback
            return json.loads(response.read() or b"null")

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=10) as response:  # noqa: S310 - loopback
            return json.loads(response.read())

    def limit(self, credential: str, messages: int) -> None:
        self.post("/_fake/limit", {"key": credential, "limit": messages})

    def refuse(self, credential: str, status: int, times: int = 1) -> None:
        """The credential's next `times` requests are answered `status`: 529, or a 429 without the
        unified headers (not a usage wall)."""
        self.post("/_fake/refuse", {"key": credential, "status": status, "times": times})

    def overage(self, credential: str) -> None:
        """The credential's answers are billed as paid overage from now on."""
        self.post("/_fake/overage", {"key": credential})

    def wall(self, credential: str, until: float) -> None:
        """The credential's 5-hour window is spent until `until`, its reset; answered after."""
        self.post("/_fake/wall", {"key": credential, "until": until})

    def model_wall(self, credential: str, model: str, claim: str) -> None:
        """The credential's requests for models whose name holds `model` meet `claim`'s wall."""
        self.post("/_fake/model-wall", {"key": credential, "model": model, "claim": claim})

    def windows(self, credential: str, status: str | None = None, **windows: tuple[float, float]) -> None:
        """The credential's answers say these windows (`five_hour=(utilization, reset)`) from now on."""
        self.post("/_fake/windows", {"key": credential, **windows, **({"status": status} if status else {})})

    def requests(self) -> list[dict[str, Any]]:
        return json_lines(self.log)

    def messages(self) -> list[dict[str, Any]]:
        """The requests for inference (not the token endpoint's)."""
        return [r for r in self.requests() if r.get("path", "").startswith("/v1/messages") and "cred_tail" in r]


@contextlib.contextmanager
def fake_api_running(root: Path, *args: str) -> Iterator[FakeApi]:
    port_file = root / "api.port"
    watch = root / "watch"
    watch.mkdir(exist_ok=True)
    log = root / "api.jsonl"
    command = [sys.executable, str(FAKE_API), "--port-file", str(port_file), "--log", str(log), "--watch", str(watch)]
    server = subprocess.Popen([*command, *args])
    try:
        wait_until(port_file.exists, "the fake API to listen")
        yield FakeApi(f"http://127.0.0.1:{port_file.read_text()}", log, watch)
    finally:
        server.terminate()
        server.wait(10)


def free_port() -> int:
    """A loopback port nothing listens on now (for a daemon told where to listen)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class DaemonProcess:
    """One real `cl-balancer` or `cl-rescue` process; its stderr goes to a log file."""

    started: ClassVar[list[DaemonProcess]] = []
    """Every one started, so that a failed test leaves none running (see conftest)."""

    def __init__(
        self, name: str, layout: Layout, env: dict[str, str] | None = None, wrap: list[str] | None = None
    ) -> None:
        self.name = name
        self.layout = layout
        self.socket = layout.runtime / f"{name}.sock"
        self.log_path = layout.root / f"{name}.log"
        self._env = layout.env() if env is None else env
        self._wrap = wrap or []
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True) -> DaemonProcess:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [*self._wrap, str(BIN / f"cl-{self.name}")],
                env=self._env,
                stderr=log,
                stdin=subprocess.DEVNULL,
                preexec_fn=interruptible,  # noqa: PLW1509 - no threads in that child
            )
        DaemonProcess.started.append(self)
        if wait:
            wait_until(self.answers, f"cl-{self.name} to answer on its socket")
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"cl-{self.name} exited with {self.process.returncode}; log:\n{self.log()}")
        try:
            return bool(call(self.socket, {"request": "accounts", "names": []}, timeout=5).get("ok"))
        except DaemonUnreachable:
            return False

    def request(self, request: dict[str, Any]) -> dict[str, Any]:
        return call(self.socket, request, timeout=10)

    def file_states(self) -> dict[str, str]:
        """Each account's credential file's state, as this daemon's registry reads it."""
        reply = self.request({"request": "accounts"})
        assert reply["ok"], reply
        return {account["name"]: account["file"] for account in reply["accounts"]}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def exit_code(self, timeout: float = 20) -> int:
        """Wait for the process to end by itself."""
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"cl-{self.name} did not stop within {timeout}s") from None


REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def cli_socket(
    address: str, env: dict[str, str], log: Path, peers: list[int] | None = None
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """`cl-cli.socket` as systemd plays it: a listener at `address`, each connection handed to a
    `cl-cli-starter` of its own (its standard input), its log appended to `log`, the pid of the
    process that connected appended to `peers`. The starters."""
    with socket_activated(address, [str(CLI_STARTER)], env, log, peers=peers) as started:
        yield started


@contextlib.contextmanager
def worker_socket(address: str, env: dict[str, str], log: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    """`cl-worker.socket` as systemd plays it: each connection starts `cl-worker --from-socket` with
    it as standard input and output (the launcher reads the worker's pid there). The workers."""
    with socket_activated(address, [str(WORKER), "--from-socket"], env, log, stream=True) as started:
        yield started


@contextlib.contextmanager
def socket_activated(
    address: str,
    command: list[str],
    env: dict[str, str],
    log: Path,
    *,
    stream: bool = False,
    peers: list[int] | None = None,
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """A socket unit with Accept=yes: a listener at `address` (sequential packets; `stream`: a
    stream, whose connection is also the command's output), each connection the standard input of
    a `command` of its own, its log appended to `log`, its peer's pid to `peers`. What it started."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM if stream else socket.SOCK_SEQPACKET)
    listener.bind(address)
    listener.listen()
    started: list[subprocess.Popen[bytes]] = []

    def accept() -> None:
        with log.open("ab") as out:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                with conn:
                    if peers is not None:
                        peers.append(struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0])
                    output = conn.fileno() if stream else out
                    started.append(subprocess.Popen(command, stdin=conn.fileno(), stdout=output, stderr=out, env=env))

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield started
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(10)
        for process in started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(20)


def interruptible() -> None:
    """In a child about to run a command a test will interrupt: SIGINT handled by default again,
    as a shell's foreground job has it. A test run started with SIGINT ignored (a shell's
    background job) passes the ignoring on to every child, and Ctrl-C would do nothing there."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def make_run(var: Path) -> subprocess.Popen[str]:
    """`make run VAR=var` as a person starts it at a shell: its own process group (a foreground
    job: Ctrl-C is SIGINT to the group), output on one pipe."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CL_", "NOTIFY_SOCKET", "WATCHDOG_", "JOURNAL_"))}
    env["CL_PROBE_INTERVAL"] = "0"  # its gateway's upstream may be the real API: nothing leaves the machine
    return subprocess.Popen(
        ["make", "--no-print-directory", "-C", str(REPO), "run", f"VAR={var}"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=interruptible,  # noqa: PLW1509 - no threads in that child
    )


def cl(layout: Layout, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The `cl` command line, as a user runs it."""
    return subprocess.run(
        [str(BIN / "cl"), *args], env=layout.env(**env), capture_output=True, text=True, check=False, timeout=60
    )


def status(layout: Layout) -> dict[str, Any]:
    """`cl status --json`, which must succeed."""
    result = cl(layout, "status", "--json")
    assert result.returncode == 0, result.stderr
    reply: dict[str, Any] = json.loads(result.stdout)
    return reply


def history(layout: Layout) -> dict[str, Any]:
    """Every job and session kept, finished ones too (`cl jobs --all --json`, `cl sessions --all --json`);
    `status` shows live work only."""
    found = {}
    for what in ("jobs", "sessions"):
        result = cl(layout, what, "--all", "--json")
        assert result.returncode == 0, result.stderr
        found[what] = json.loads(result.stdout)
    return found


def job_view(layout: Layout, job_id: int) -> dict[str, Any]:
    """The job as `cl jobs --all --json` lists it."""
    return next(job for job in json.loads(cl(layout, "jobs", "--all", "--json").stdout) if job["id"] == job_id)


def proc_status(pid: int) -> dict[str, str]:
    """/proc/PID/status, field by field."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def job_states(layout: Layout) -> dict[int, str]:
    """Job id -> state, from `cl jobs --all --json`."""
    result = cl(layout, "jobs", "--all", "--json")
    assert result.returncode == 0, result.stderr
    return {job["id"]: job["state"] for job in json.loads(result.stdout)}


def job_state_set(layout: Layout) -> set[str]:
    """The states the jobs are in, from `cl jobs --all --json`."""
    return set(job_states(layout).values())


def all_in(layout: Layout, state: str, count: int) -> bool:
    """Exactly `count` jobs, every one in `state`."""
    states = job_states(layout)
    return len(states) == count and set(states.values()) == {state}


def json_lines(path: Path) -> list[dict[str, Any]]:
    """The complete lines of a JSON-lines log that other processes append to (a line still
    being written is left for the next read)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.split("\n")[:-1]]


T = TypeVar("T")


def stored(layout: Layout, read: Callable[[Store], T]) -> T:
    """`read(store)` on the layout's state store, opened for it and closed after."""
    store = Store(layout.database)
    try:
        return read(store)
    finally:
        store.close()


def live_runs(layout: Layout) -> list[Run]:
    """The runs in the store that are live now."""
    store = Store(layout.database)
    try:
        return store.runs_in()
    finally:
        store.close()


def submit(layout: Layout, prompt: str) -> int:
    """`cl submit` in the layout's work dir, which must succeed; the job id."""
    result = cl(layout, "submit", "--cwd", str(layout.work), "--prompt", prompt, "--json")
    assert result.returncode == 0, result.stderr
    job: int = json.loads(result.stdout)["job"]
    return job


@contextlib.contextmanager
def both(layout: Layout, **kwargs: Any) -> Iterator[tuple[DaemonProcess, DaemonProcess]]:
    """Run cl-balancer and cl-rescue side by side; stop both after. A test that fails inside shows
    the end of each daemon's log (its workers' lines are there too)."""
    daemons = (DaemonProcess("balancer", layout, **kwargs), DaemonProcess("rescue", layout, **kwargs))
    try:
        for daemon in daemons:
            daemon.start()
        yield daemons
    except BaseException:
        for daemon in daemons:
            print(f"--- the end of cl-{daemon.name}'s log:\n{daemon.log()[-6000:]}")
        raise
    finally:
        for daemon in daemons:
            if daemon.process is not None:
                daemon.stop()


def _controlling_terminal() -> None:
    """In the child: standard input (the pty) is its controlling terminal, and Ctrl-C interrupts."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    interruptible()


class Terminal:
    """A command on a real pseudo-terminal, as its controlling terminal (a session of its own):
    what it prints is read as it comes; Ctrl-C is a byte typed at the terminal."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self._terminal, their_side = pty.openpty()
        self.process = subprocess.Popen(
            argv,
            stdin=their_side,
            stdout=their_side,
            stderr=their_side,
            env=env,
            start_new_session=True,
            preexec_fn=_controlling_terminal,  # noqa: PLW1509 - no threads in that child
        )
        os.close(their_side)
        self.shown = bytearray()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        with contextlib.suppress(OSError):  # EIO once every process closed its side
            while chunk := os.read(self._terminal, 65536):
                self.shown.extend(chunk)

    def text(self) -> str:
        return self.shown.decode(errors="replace").replace("\r\n", "\n")

    def ctrl_c(self) -> None:
        os.write(self._terminal, b"\x03")  # the line discipline signals the foreground process group

    def wait(self, timeout: float = 60) -> int:
        code = self.process.wait(timeout)
        self._reader.join(timeout)
        os.close(self._terminal)
        return code


def exchange_raw(path: Path, payload: bytes, timeout: float = 20) -> list[dict[str, Any]]:
    """Send `payload` as it is on a control socket, close our side, and read every reply line."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(1 << 16):
            data += chunk
    return [json.loads(line) for line in data.splitlines()]
