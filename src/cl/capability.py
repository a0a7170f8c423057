"""What a CLI holds instead of a credential in gateway mode: a random capability for its run.

The worker makes one per CLI process and gives it to the CLI as the access token of a
`.credentials.json` that never expires (so the CLI keeps to subscription mode and never tries to
refresh it). The store keeps only its SHA-256, naming the run; the gateway takes a request's
capability to that run, and the run to the account the store names for it now. A capability is
worth nothing once its run has stopped running, and nothing at all to the API.
"""

from __future__ import annotations

import hashlib
import json
import secrets

PREFIX = "cl-cap-"
FAR_FUTURE_MS = 4_102_444_800_000
"""2100-01-01: a capability's `expiresAt`, so the CLI never refreshes it."""


def new() -> str:
    """A fresh capability: 256 random bits."""
    return PREFIX + secrets.token_urlsafe(32)


def digest(capability: str) -> str:
    """What the store keeps of a capability, and what the gateway looks it up by."""
    return hashlib.sha256(capability.encode()).hexdigest()


def credential_file(capability: str) -> bytes:
    """The `.credentials.json` a CLI gets: the capability as its OAuth access token."""
    oauth = {
        "accessToken": capability,
        "expiresAt": FAR_FUTURE_MS,
        "scopes": ["user:inference"],
        "subscriptionType": "max",
    }
    return json.dumps({"claudeAiOauth": oauth}).encode()
