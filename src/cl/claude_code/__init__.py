"""What the real Claude Code CLI prints, writes and does, as code (see CLAUDE_CODE.md)."""
