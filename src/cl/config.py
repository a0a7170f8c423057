"""Configuration: one TOML file, every key overridable by `CL_<KEY>`, no file needed.

The file is `$CL_CONFIG`, else `/etc/cl/config.toml` (absent is fine). Relative paths in a
file are relative to the file's folder. Unknown keys and bad values raise `ConfigError`
naming the key.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import shlex
import socket
import tomllib
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

DEFAULT_PATH = Path("/etc/cl/config.toml")
ENV_PREFIX = "CL_"
LOG_LEVELS = ("debug", "info", "warning", "error")
PLACEMENTS = ("headroom", "fill-first", "round-robin", "pace")
MOVE_AT = 0.95
"""The utilization of a window past which a session there moves early, if another account has clearly more room."""
GATEWAY_OWNS = frozenset(
    {"ANTHROPIC_BASE_URL", "ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "CLAUDE_CODE_OAUTH_TOKEN", "CLAUDE_CONFIG_DIR"}
)
"""What a `[worker.env]` may not set in gateway mode: where the CLI's requests go, and any credential."""


class ConfigError(Exception):
    """A configuration problem an operator can fix; the message names the key."""


BURN_STEP = 60.0
"""Seconds between two readings of a window that measure its burn rate (`burn_step`)."""
LEASE = 30.0
"""Seconds a running run's lease lasts unless renewed (`run_lease`)."""
MIN_LEASE = 3.0
"""The shortest lease a worker can keep: it renews every third of it."""


@dataclasses.dataclass(frozen=True, slots=True)
class Config:
    credentials_dir: Path = Path("/opt/claude")
    """The roster: every `credentials-<name>.json` here is one account."""
    state_dir: Path = Path("/var/lib/cl")
    sessions_dir: Path = Path("/var/lib/cl-sessions")
    """Each job's Claude Code config dir (`job-N`): the CLI's own tree, owned by the pool user its run has."""
    runtime_dir: Path = Path("/run/cl")
    """Where the daemons' control sockets live."""
    resync_interval: float = 30.0
    """Seconds between full rescans of the credentials dir behind inotify."""
    watch_step_ms: int = 8
    """watchfiles' polling step: latency is one to two steps; idle CPU grows as it shrinks."""
    log_level: str = "info"
    max_sessions_per_account: int = 4
    placement: str = "pace"
    """`pace`: by the use each account's windows are projected to reach (`headroom`'s order where
    they say nothing apart); `headroom`: the account with the most room; `fill-first`: fill one
    account before the next; `round-robin`: each in turn."""
    probe_interval: float = 1800.0
    """Seconds after which the gateway reads the windows of an account no session used meanwhile,
    with the CLI's own quota check (one token); 0: never."""
    burn_step: float = BURN_STEP
    """Seconds at least between two readings of a window that measure its burn rate."""
    move_at: float = MOVE_AT
    """A window's utilization past which its sessions move early, at their next request, to an account
    with clearly more room (gateway mode); 1: never before a wall."""
    ramp_after_wall: bool = False
    """After a wall, an account takes only as much new work as its 5-hour window sustains to its
    reset at the measured burn rate (one session until a rate is known), so that work waiting for
    it cannot use it up at once; a session moving in flight at a wall is never held back by it."""
    max_wait_for_reset: float = 0.0
    """Seconds at most a request waits at the gateway for its account's reset, where that costs the
    session less than a move (300, say: well inside the CLI's ten minutes for an answer); 0: never."""
    claude_bin: str = "claude"
    claude_args: tuple[str, ...] = ()
    """Extra arguments for every CLI run (permission mode, allowed tools, ...)."""
    wall_retry: float = 300.0
    """Seconds a wall stands when the CLI named no reset time (API-key walls)."""
    resume_prompt: str = "continue"
    """The prompt a moved session is resumed with."""
    live_wait: float = 3600.0
    """Seconds a walled session's CLI is kept alive, idle, for a move in place; 0: always restart."""
    reset_jitter: float = 1.0
    """Up to this many seconds are added at random to a wall's reset before trying the account."""
    session_lock_wait: float = 60.0
    """Seconds a worker waits for a session's previous process to let go before its run fails."""
    max_moves_per_hour: int = 6
    """A job whose session moved this many times in an hour fails (with that reason) instead of moving again."""
    max_orphanings: int = 3
    """A job whose worker vanished this many times fails (with that reason) instead of resuming again."""
    retention_days: float = 30.0
    """Finished jobs, their runs and ledger rows are forgotten this many days after they ended."""
    reconcile_interval: float = 60.0
    """Seconds between the rescuer's checks for workers that vanished unseen (a safety net)."""
    run_lease: float = LEASE
    """Seconds a running run's lease lasts: its worker renews it every third of that, and stops its
    CLI when it could not for two thirds (the store out of reach); a run whose lease lapsed is
    orphaned and resumed, and its worker's writes are refused from then on."""
    confinement: str = "sandbox"
    """"sandbox": each live job's CLI runs as its own pool user, in a view of its own (`cl.sandbox`),
    or not at all; "none": as the worker's own user, seeing all the worker sees (said at every start)."""
    cli_pool: str = "cl-cli"
    """The CLI's users: `cli_pool`-1 ... `cli_pool`-N, all in group `cli_pool`."""
    cli_pool_size: int = 16
    """N: how many jobs' CLIs may run at once (a job waits for a free user)."""
    cli_network: str = "filtered"
    """"filtered": the host's network as the `cl-cli@` unit narrows it (on loopback the gateway's
    address only, no link-local), checked before each CLI starts, where it will run: where the narrowing
    does not hold (no such unit, cgroups where systemd cannot apply it), the run fails and says so;
    "host": the host's network as it is (said at every start); "gateway": the view has a network of
    its own, loopback only, where a relay takes its requests to the gateway: nothing else, the
    internet included."""
    cli_starter: Path | None = None
    """The socket of `cl-cli.socket`: each job's CLI is started by a `cl-cli@` unit of its own
    (`cl.cli_start`), never by the worker, whose unit may then build no namespace and reach no
    network. Unset: the worker starts it itself (`make run`)."""
    cli_processes_max: int = 1024
    """Processes a sandboxed job's CLI user may have at once, its tools' included (RLIMIT_NPROC:
    each job has a user of its own, so this is per job)."""
    cli_readable: tuple[str, ...] = ()
    """Existing paths the CLI may read besides the system (/usr, /etc, /opt, /var)."""
    cli_writable: tuple[str, ...] = ()
    """Existing paths the CLI may write besides the job's cwd and its config dir."""
    store_busy_timeout: float = 10.0
    """Seconds a store write waits for another writer before the store counts as unavailable."""
    store: str = ""
    """`postgresql://…`: the fleet's shared PostgreSQL database (a password belongs in a
    passfile, not here); empty: the SQLite file `cl.db` in `state_dir`."""
    host: str = ""
    """This host's name in the fleet (`cl.fleet`); empty: the machine's host name."""
    heartbeat_interval: float = 5.0
    """Seconds between this host's heartbeats in the store; a host 3 heartbeats late drops out of the fleet."""
    admin_group: str = "cl-admin"
    """Members see and act on every operator's jobs (root and the daemons' own user always do)."""
    journal_socket: str = "/run/systemd/journal/socket"
    """journald's native socket, used under systemd; '' writes `<N>`-prefixed lines to stderr instead."""
    cli_env_keep: tuple[str, ...] = ()
    """Variables of the daemons' environment passed to the CLI (`NAME` or `PREFIX*`), besides PATH,
    the locale, TZ, TERM and the proxies; `[worker.env]` sets variables outright."""
    worker_env: dict[str, str] = dataclasses.field(default_factory=dict)
    """`[worker.env]`: variables added to every CLI run's environment."""
    gateway: bool = True
    """The CLI talks to the API through `cl-gateway` holding a capability, never a real token;
    false: each CLI holds its account's credential and talks to the API directly."""
    gateway_listen: str = "127.0.0.2:8479"
    """Where `cl-gateway` listens (loopback only) and where every CLI sends its requests: an address of its
    own, the one loopback address a `cl-cli@` unit may reach (IPAddressAllow=)."""
    gateway_upstream: str = "https://api.anthropic.com"
    """The API the gateway forwards to."""
    oauth_token_url: str = "https://platform.claude.com/v1/oauth/token"  # noqa: S105 - a URL, not a secret
    """Where the gateway refreshes OAuth accounts' tokens."""
    oauth_client_id: str = "9d1c250a-e61b-44d9-88ed-5944d1962f5e"
    """The OAuth client a refresh names: Claude Code's own, whose tokens the credential files hold."""
    refresh_margin: float = 300.0
    """Seconds before an OAuth access token expires that the gateway refreshes it."""
    fleet_listen: str = ""
    """HOST:PORT where this host's gateway takes the other hosts' requests for its accounts, over
    TLS with certificates both ways (`fleet_cert`, `fleet_key`, `fleet_ca`); published as this
    host's address in the fleet. Empty: this host's jobs use its own accounts only."""
    fleet_cert: Path | None = None
    """This host's certificate (PEM), naming the host (`host`) as a DNS subjectAltName."""
    fleet_key: Path | None = None
    fleet_ca: Path | None = None
    """The fleet's certificate authority: only a peer whose certificate it signed is spoken to."""
    fleet_answer_timeout: float = 60.0
    """Seconds another host's gateway has to begin its answer to a request forwarded to it (the
    API's headers: a streamed answer begins at once) before that host counts as unreachable: a
    link that went silent (black-holed) is found this way, not only a refused connection."""
    config_file: Path = DEFAULT_PATH
    """Where this configuration was read from, or would have been (not a key)."""

    @property
    def host_name(self) -> str:
        return self.host or socket.gethostname()

    @property
    def reaches_fleet(self) -> bool:
        """This host's jobs may run on any live host's accounts, through that host's gateway."""
        return bool(self.fleet_listen)

    @property
    def database(self) -> Path | str:
        """Where the state store is (`cl.store.Store` takes it)."""
        return self.store or self.state_dir / "cl.db"

    def socket_path(self, daemon: str) -> Path:
        return self.runtime_dir / f"{daemon}.sock"

    @property
    def starter_socket(self) -> Path | None:
        """Where each CLI is started (`cl-cli.socket`) if not by its worker: `cli_starter`, when
        the CLI runs sandboxed (unconfined, the worker starts it itself)."""
        return self.cli_starter if self.confinement == "sandbox" else None

    @property
    def gateway_socket(self) -> Path:
        """Where cl-gateway also takes the CLIs' requests: the relay's way out of a view with a
        network of its own (`cli_network = "gateway"`). A directory of its own, which the view binds."""
        return self.runtime_dir / "cli" / "gateway.sock"


def _path(value: Any, base: Path) -> Path:
    if not isinstance(value, str) or not value:
        raise TypeError("must be a non-empty path")
    return base / Path(value).expanduser()


def _optional_path(value: Any, base: Path) -> Path | None:
    return None if value == "" else _path(value, base)


def _number(value: Any, kind: type[int | float], error: str) -> float:
    """A TOML number of the right kind, or (from the environment) its text."""
    if isinstance(value, str):
        try:
            value = kind(value)
        except ValueError:
            raise ValueError(error) from None
    allowed = (int,) if kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, allowed):
        raise TypeError(error)
    return float(value) if kind is float else value


def _positive_float(value: Any, _base: Path) -> float:
    error = "must be a positive number"
    number = _number(value, float, error)
    if not 0 < number < float("inf"):
        raise ValueError(error)
    return float(number)


def _fraction(value: Any, _base: Path) -> float:
    error = "must be a utilization above 0 and at most 1 (0.95: 95%)"
    number = _number(value, float, error)
    if not 0 < number <= 1:
        raise ValueError(error)
    return float(number)


def _whole(low: int, high: int, unit: str = "") -> Callable[[Any, Path], int]:
    error = f"must be a whole number{unit} from {low} to {high}"

    def parse(value: Any, _base: Path) -> int:
        number = _number(value, int, error)
        if not low <= number <= high:
            raise ValueError(error)
        return int(number)

    return parse


def _log_level(value: Any, _base: Path) -> str:
    if not isinstance(value, str) or value.lower() not in LOG_LEVELS:
        raise TypeError(f"must be one of {', '.join(LOG_LEVELS)}")
    return value.lower()


def _one_of(*choices: str) -> Callable[[Any, Path], str]:
    def parse(value: Any, _base: Path) -> str:
        if value not in choices:
            raise TypeError(f"must be one of {', '.join(choices)}")
        return str(value)

    return parse


def _claude_bin(value: Any, base: Path) -> str:
    """A command name (looked up on PATH), or a path: a relative one is the config file's
    folder's (the environment's: the current directory's), never the job's."""
    if not isinstance(value, str) or not value:
        raise TypeError("must be a command name or path")
    return str(_path(value, base)) if "/" in value else value


def _prompt(value: Any, _base: Path) -> str:
    if not isinstance(value, str) or not value.strip():
        raise TypeError("must be a non-empty string")
    return value


def _seconds(low: float) -> Callable[[Any, Path], float]:
    error = f"must be a number of seconds, {low:g} or more"

    def parse(value: Any, _base: Path) -> float:
        number = _number(value, float, error)
        if not low <= number < float("inf"):
            raise ValueError(error)
        return float(number)

    return parse


_seconds_or_zero = _seconds(0.0)


def _claude_args(value: Any, _base: Path) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(shlex.split(value))
    if not isinstance(value, list) or not all(isinstance(arg, str) for arg in value):
        raise TypeError("must be a list of strings")
    return tuple(value)


def _paths(value: Any, base: Path) -> tuple[str, ...]:
    return tuple(str(_path(item, base)) for item in _claude_args(value, base))


def _socket(value: Any, _base: Path) -> str:
    if not isinstance(value, str) or not (value == "" or value.startswith("/")):
        raise TypeError("must be an absolute path, or empty")
    return value


def _name(value: Any, _base: Path) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}|", value):
        raise TypeError("must be a user or group name")
    return value


def _bool(value: Any, _base: Path) -> bool:
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    if not isinstance(value, bool):
        raise TypeError("must be true or false")
    return value


def _loopback(value: Any, _base: Path) -> str:
    error = "must be HOST:PORT on loopback (127.0.0.0/8 or [::1])"
    if not isinstance(value, str):
        raise TypeError(error)
    host, _, port = value.rpartition(":")
    try:
        address = ipaddress.ip_address(host.strip("[]"))
        number = int(port)
    except ValueError:
        raise ValueError(error) from None
    if not address.is_loopback or not 0 < number < 65536:
        raise ValueError(error)
    return value


def _address(value: Any, _base: Path) -> str:
    error = "must be HOST:PORT, a specific address or name (the other hosts dial it), or empty"
    if not isinstance(value, str):
        raise TypeError(error)
    if not value:
        return value
    host, _, port = value.rpartition(":")
    if not re.fullmatch(r"\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.-]{0,252}", host) or not port.isdigit():
        raise ValueError(error)
    if not 0 < int(port) < 65536 or host.strip("[]") in ("0.0.0.0", "::"):  # noqa: S104 - refused here
        raise ValueError(error)
    return value


def _url(value: Any, _base: Path) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", value):
        raise TypeError("must be an http:// or https:// URL")
    return value.rstrip("/")


def _worker(value: Any, _base: Path) -> dict[str, str]:
    if not isinstance(value, dict) or set(value) - {"env"}:
        raise TypeError("must be a table with one sub-table, [worker.env]")
    env = value.get("env", {})
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise TypeError("[worker.env] must map names to strings")
    return dict(env)


def _host(value: Any, _base: Path) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9_.-]{0,62})?", value):
        raise TypeError('must be a host name (letters, digits, ".", "-", "_"), or "" for the machine\'s own')
    return value


def _store(value: Any, _base: Path) -> str:
    if not isinstance(value, str) or (value and not value.startswith(("postgresql://", "postgres://"))):
        raise TypeError('must be a postgresql:// URL, or "" for the SQLite file in state_dir')
    return value


_PARSERS: dict[str, Callable[[Any, Path], Any]] = {
    "credentials_dir": _path,
    "state_dir": _path,
    "sessions_dir": _path,
    "runtime_dir": _path,
    "resync_interval": _positive_float,
    "watch_step_ms": _whole(1, 1000, " of milliseconds"),
    "log_level": _log_level,
    "max_sessions_per_account": _whole(1, 1000),
    "placement": _one_of(*PLACEMENTS),
    "move_at": _fraction,
    "burn_step": _positive_float,
    "probe_interval": _seconds_or_zero,
    "claude_bin": _claude_bin,
    "claude_args": _claude_args,
    "worker": _worker,
    "wall_retry": _positive_float,
    "max_wait_for_reset": _seconds_or_zero,
    "ramp_after_wall": _bool,
    "resume_prompt": _prompt,
    "live_wait": _seconds_or_zero,
    "reset_jitter": _seconds_or_zero,
    "reconcile_interval": _positive_float,
    "run_lease": _seconds(MIN_LEASE),
    "retention_days": _positive_float,
    "max_moves_per_hour": _whole(1, 1000),
    "max_orphanings": _whole(1, 1000),
    "session_lock_wait": _positive_float,
    "store_busy_timeout": _positive_float,
    "store": _store,
    "host": _host,
    "heartbeat_interval": _positive_float,
    "confinement": _one_of("sandbox", "none"),
    "cli_pool": _name,
    "cli_pool_size": _whole(1, 1000),
    "cli_network": _one_of("filtered", "host", "gateway"),
    "cli_starter": _optional_path,
    "cli_processes_max": _whole(8, 1_000_000),
    "cli_readable": _paths,
    "cli_writable": _paths,
    "cli_env_keep": _claude_args,
    "admin_group": _name,
    "journal_socket": _socket,
    "gateway": _bool,
    "gateway_listen": _loopback,
    "gateway_upstream": _url,
    "oauth_token_url": _url,
    "oauth_client_id": _prompt,
    "refresh_margin": _positive_float,
    "fleet_listen": _address,
    "fleet_cert": _optional_path,
    "fleet_key": _optional_path,
    "fleet_ca": _optional_path,
    "fleet_answer_timeout": _positive_float,
}
_FIELD = {"worker": "worker_env"}


def load_config(env: Mapping[str, str] | None = None, keys: Collection[str] | None = None) -> Config:
    """Defaults, then the file, then `CL_*` variables. With `keys`, only those are read: the rest
    (a daemon's setting, a stray `CL_*` variable) can neither break nor steer the caller."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    if state_directory := env.get("STATE_DIRECTORY"):  # set by systemd's StateDirectory=
        values["state_dir"] = Path(state_directory.split(":")[0])
    explicit = env.get(f"{ENV_PREFIX}CONFIG")
    path = Path(explicit) if explicit else DEFAULT_PATH
    values.update(_from_file(path, keys, required=bool(explicit)))
    values.update(_from_env(env, keys))
    config = Config(**values, config_file=path.absolute())
    if config.cli_network == "gateway" and not (config.gateway and config.confinement == "sandbox"):
        raise ConfigError(f'{path}: cli_network = "gateway" needs gateway = true and confinement = "sandbox"')
    if config.gateway and (steered := sorted(set(config.worker_env) & GATEWAY_OWNS)):
        raise ConfigError(
            f"{path}: [worker.env] sets {', '.join(steered)}: with gateway = true the gateway is the CLI's API and"
            " holds every credential (set gateway_upstream instead, or gateway = false)"
        )
    _check_fleet(config, path)
    return config


def _check_fleet(config: Config, path: Path) -> None:
    """What reaching the fleet's accounts needs: a shared store, the gateway, and the three TLS files."""
    if not config.fleet_listen:
        return
    if not (config.store and config.gateway):
        raise ConfigError(f'{path}: fleet_listen needs store = "postgresql://..." and gateway = true')
    missing = [key for key in ("fleet_cert", "fleet_key", "fleet_ca") if getattr(config, key) is None]
    if missing:
        raise ConfigError(f"{path}: fleet_listen needs {', '.join(missing)}: the hosts speak TLS both ways")


def _from_file(path: Path, keys: Collection[str] | None, *, required: bool) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        if required:
            raise ConfigError(f"{path}: no such file (named by {ENV_PREFIX}CONFIG)") from None
        return {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    base = path.parent.absolute()
    return {
        _FIELD.get(key, key): _parse(key, value, base, f"{path}: key {key!r}")
        for key, value in doc.items()
        if keys is None or key in keys
    }


def _from_env(env: Mapping[str, str], keys: Collection[str] | None) -> dict[str, Any]:
    values = {}
    for var, value in env.items():
        if not var.startswith(ENV_PREFIX) or var == f"{ENV_PREFIX}CONFIG":
            continue
        key = var.removeprefix(ENV_PREFIX).lower()
        if keys is None or key in keys:
            values[_FIELD.get(key, key)] = _parse(key, value, Path.cwd(), f"environment variable {var}")
    return values


def _parse(key: str, value: Any, base: Path, where: str) -> Any:
    parser = _PARSERS.get(key)
    if parser is None:
        raise ConfigError(f"{where}: unknown key (known: {', '.join(_PARSERS)})")
    try:
        return parser(value, base)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: {exc}, got {value!r}") from None
