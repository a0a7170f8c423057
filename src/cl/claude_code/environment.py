"""The environment a worker's `claude` runs with (docs/claude-code.md, facts 2 and 3).

Credentials in the environment beat `.credentials.json`, so every credential variable is
scrubbed and only the account's own is set back. `CLAUDE_CODE_RETRY_WATCHDOG` is never
passed: it turns a wall into an hours-long silent wait. The daemon's own systemd variables
are not the worker's.
"""

from __future__ import annotations

from collections.abc import Mapping

from cl.credentials import Account, CredentialKind

CREDENTIAL_VARIABLES = ("ANTHROPIC_API_KEY", "CLAUDE_CODE_OAUTH_TOKEN", "ANTHROPIC_AUTH_TOKEN")
NEVER_PASSED = (
    *CREDENTIAL_VARIABLES,
    "CLAUDE_CODE_RETRY_WATCHDOG",
    "CLAUDE_CONFIG_DIR",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
)
QUIET = {
    "DISABLE_TELEMETRY": "1",
    "DISABLE_ERROR_REPORTING": "1",
    "DISABLE_AUTOUPDATER": "1",
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
}
_ENV_VARIABLE = {CredentialKind.OAUTH_TOKEN: "CLAUDE_CODE_OAUTH_TOKEN", CredentialKind.API_KEY: "ANTHROPIC_API_KEY"}


def worker_environment(
    base: Mapping[str, str], account: Account | None, config_dir: str, extra: Mapping[str, str] = {}
) -> dict[str, str]:
    """`base` (the daemon's environment) plus `extra` (config), scrubbed, for one account (None:
    no credential variable at all, as in gateway mode)."""
    env = {k: v for k, v in {**QUIET, **base, **extra}.items() if k not in NEVER_PASSED}
    env["CLAUDE_CONFIG_DIR"] = config_dir
    variable = _ENV_VARIABLE.get(account.kind) if account is not None and account.kind else None
    if variable and account is not None and account.secrets:
        env[variable] = account.secrets[0].reveal()
    return env


PASSED = ("PATH", "LANG", "LANGUAGE", "TZ", "TERM", *(f"{name}_proxy" for name in ("http", "https", "no", "all")))
"""What of the daemon's environment reaches the CLI, besides `LC_*` and `cli_env_keep` (and the
upper-case proxies): under `make run` that environment is the launching user's."""


def passed(name: str, extra: tuple[str, ...]) -> bool:
    """Whether the daemon's variable `name` reaches the CLI: it is on the allow list (`PASSED`,
    `LC_*`), or named in `cli_env_keep` (`NAME`, or `PREFIX*`)."""
    if name in PASSED or name.lower() in PASSED or name.startswith("LC_"):
        return True
    return any(name == allowed or (allowed.endswith("*") and name.startswith(allowed[:-1])) for allowed in extra)
