"""Where a job's session keeps its files: the CLI's own config dir, and what cl keeps beside it
out of the CLI's reach (its run logs, its lock, the digest of its credential copy)."""

from __future__ import annotations

from pathlib import Path

from cl.config import Config


def session_config_dir(config: Config, job_id: int) -> Path:
    """The job's own Claude Code config dir: its transcript lives here whatever the account."""
    return config.sessions_dir / f"job-{job_id}"


def log_path(config: Config, job_id: int, run_id: int) -> Path:
    return config.state_dir / "logs" / f"job-{job_id}-run-{run_id}.log"


def lock_path(config: Config, job_id: int) -> Path:
    """The session's lock: in the state dir, out of the CLI's reach."""
    return config.state_dir / "jobs" / f"job-{job_id}.lock"


def credential_mark_path(config: Config, job_id: int) -> Path:
    """A digest of what a worker last put in the job's credential copy (see `cl.job_credential`)."""
    return config.state_dir / "jobs" / f"job-{job_id}.credential"
