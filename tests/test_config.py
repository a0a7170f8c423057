"""Configuration: defaults without a file, the file, CL_* overrides, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from cl.config import Config, ConfigError, load_config


def test_defaults_need_no_file() -> None:
    config = load_config({"CL_CONFIG": ""})
    assert config == Config()
    assert config.credentials_dir == Path("/opt/claude")
    assert config.socket_path("rescue") == Path("/run/cl/rescue.sock")


def test_state_directory_from_systemd() -> None:
    assert load_config({"STATE_DIRECTORY": "/var/lib/cl:/other"}).state_dir == Path("/var/lib/cl")


def test_file_then_environment(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('credentials_dir = "creds"\nresync_interval = 5\nlog_level = "DEBUG"\n')
    config = load_config({"CL_CONFIG": str(path), "CL_RESYNC_INTERVAL": "2.5", "CL_RUNTIME_DIR": "/run/x"})
    assert config.credentials_dir == tmp_path / "creds"  # relative to the file
    assert (config.resync_interval, config.log_level, config.runtime_dir) == (2.5, "debug", Path("/run/x"))


def test_a_relative_claude_bin_is_the_config_files_and_a_name_is_looked_up_on_path(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('claude_bin = "bin/claude"\n')
    assert load_config({"CL_CONFIG": str(path)}).claude_bin == str(tmp_path / "bin" / "claude")
    path.write_text('claude_bin = "claude"\n')
    assert load_config({"CL_CONFIG": str(path)}).claude_bin == "claude"


@pytest.mark.parametrize(
    ("content", "env", "message"),
    [
        ("colour = 'blue'\n", {}, "key 'colour': unknown key"),
        ("resync_interval = -1\n", {}, "key 'resync_interval': must be a positive number, got -1"),
        ("resync_interval = 'often'\n", {}, "must be a positive number, got 'often'"),
        ("watch_step_ms = 2.5\n", {}, "key 'watch_step_ms': must be a whole number"),
        ("credentials_dir = 7\n", {}, "key 'credentials_dir': must be a non-empty path"),
        ("log_level = 'loud'\n", {}, "must be one of debug, info, warning, error"),
        ("store = 'mysql://db/cl'\n", {}, "key 'store': must be a postgresql:// URL, or \"\" for the SQLite file"),
        ("not toml [\n", {}, "not valid TOML"),
        ("", {"CL_RESYNC_INTERVAL": "nan"}, "environment variable CL_RESYNC_INTERVAL: must be a positive number"),
        ("", {"CL_WATCH_STEP_MS": "0"}, "environment variable CL_WATCH_STEP_MS"),
        ("", {"CL_COLOUR": "blue"}, "environment variable CL_COLOUR: unknown key"),
        ("confinement = 'some'\n", {}, "key 'confinement': must be one of sandbox, none"),
        ("cli_network = 'gateway'\ngateway = false\n", {}, 'cli_network = "gateway" needs gateway = true'),
        ("cli_network = 'gateway'\nconfinement = 'none'\n", {}, 'needs gateway = true and confinement = "sandbox"'),
        ("fleet_listen = '0.0.0.0:8480'\n", {}, "key 'fleet_listen': must be HOST:PORT, a specific address"),
        ("fleet_listen = 'gamma'\n", {}, "key 'fleet_listen': must be HOST:PORT"),
        ("fleet_listen = 'gamma:8480'\n", {}, 'fleet_listen needs store = "postgresql://..." and gateway = true'),
        (
            "fleet_listen = 'gamma:8480'\nstore = 'postgresql:///cl'\nfleet_ca = 'ca.pem'\n",
            {},
            "fleet_listen needs fleet_cert, fleet_key: the hosts speak TLS both ways",
        ),
    ],
)
def test_errors_name_the_key(tmp_path: Path, content: str, env: dict[str, str], message: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=None) as excinfo:
        load_config({"CL_CONFIG": str(path), **env})
    assert message in str(excinfo.value)


def test_a_named_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config({"CL_CONFIG": str(tmp_path / "missing.toml")})
