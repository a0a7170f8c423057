"""cl-balancer: hands new work to the account with the most room."""

from __future__ import annotations

import sys
from collections.abc import Mapping

from cl import daemon
from cl.config import Config
from cl.protocol import Handler
from cl.registry import CredentialRegistry


class Balancer:
    def __init__(self, config: Config, registry: CredentialRegistry) -> None:
        self.config = config
        self.registry = registry

    def handlers(self) -> Mapping[str, Handler]:
        return {}

    async def run(self) -> None:
        """Placement of queued jobs comes with the state store (issue 2/4)."""

    def status(self) -> str:
        return ""


def main() -> None:
    sys.exit(daemon.run("balancer", Balancer))
