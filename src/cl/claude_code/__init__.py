"""What the real Claude Code CLI prints, writes and does, as code (docs/claude-code.md lists each fact and its test)."""

TESTED_VERSIONS = ("2.1.332", "2.0.77", "1.0.128")
"""The CLI's versions the tests run (the first pinned, the others for the facts measured on them
too): `cl doctor` warns about any other."""
