"""What the real Claude Code CLI prints, writes and does, as code (docs/claude-code.md lists each fact and its test)."""
