"""What the CLI prints reaches the store, `cl` and the logs scrubbed and shown safely, however it
is spelled: a token written with JSON escapes (`\\u0073k-ant-…`, which a scrub of the raw text
cannot see and `cl` would decode), a token in the text of an error, and terminal escape codes."""

from __future__ import annotations

import json
from pathlib import Path

from utils import Layout, Planted, both, cl, job_states, oauth_credential, submit, wait_until, write_credential

ESC = "\x1b"


def escaped(text: str) -> str:
    """Every character of `text` as a JSON `\\uXXXX` escape."""
    return "".join(f"\\u{ord(c):04x}" for c in text)


def test_a_token_in_json_escapes_or_an_error_text_shows_nowhere(layout: Layout, planted: Planted) -> None:
    stolen = planted.token()  # shaped like an Anthropic token, and no account's: only its shape betrays it
    session = "3f1d2c4b-5a69-4788-9abc-def012345678"
    lines = [
        {"type": "system", "subtype": "init", "session_id": session},
        {"type": "assistant", "message": {"role": "assistant", "content": [{"type": "text", "text": "TOKEN"}]}},
        {"type": "result", "subtype": "success", "is_error": True, "result": f"failed: TOKEN {ESC}[31mred{ESC}[0m"},
    ]
    script = layout.root / "leaky"
    printed = "\n".join(json.dumps(line).replace("TOKEN", escaped(stolen)) for line in lines)
    script.write_text(f"#!/bin/sh\nread line\ncat <<'EOF'\n{printed}\nEOF\necho 'plain: {stolen}' >&2\nexit 1\n")
    script.chmod(0o755)
    write_credential(layout.credentials, "a1", oauth_credential(planted))
    with both(layout, env=layout.env(CL_CLAUDE_BIN=str(script))):
        job = submit(layout, "print it")
        wait_until(lambda: job_states(layout).get(job) == "failed", "the run to fail")
        shown = {
            " ".join(args): cl(layout, *args).stdout
            for args in (
                ("job", str(job)),
                ("job", str(job), "--json"),
                ("jobs", "--all"),
                ("jobs", "--all", "--json"),
                ("logs", str(job)),
                ("logs", str(job), "--raw"),
                ("status",),
                ("result", str(job), "--json"),
            )
        }
    leaks = [leak for where, out in shown.items() for leak in planted.leaks(out, f"cl {where}")]
    assert not leaks, leaks
    store = (layout.state / "cl.db").read_bytes() + b"".join(
        p.read_bytes() for p in Path(layout.state).glob("*.db-wal")
    )
    assert stolen.encode() not in store, "the token is in the state store"
    assert not [where for where, out in shown.items() if ESC in out and "--json" not in where], "a raw escape shown"
