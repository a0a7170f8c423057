"""cl: balance Claude Code sessions across accounts and rescue the ones that hit a wall."""

__version__ = "0.1.0"
