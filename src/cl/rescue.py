"""cl-rescue: moves sessions whose account walled onto a healthy account."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping

from cl import daemon
from cl.config import Config
from cl.protocol import Handler
from cl.registry import CredentialRegistry


class Rescuer:
    def __init__(self, config: Config, registry: CredentialRegistry, status_changed: Callable[[], None]) -> None:
        self.config = config
        self.registry = registry
        self._status_changed = status_changed

    def handlers(self) -> Mapping[str, Handler]:
        return {}

    async def run(self) -> None:
        """Finding and moving walled sessions comes with the state store (issue 3/4)."""

    def status(self) -> str:
        return ""


def main() -> None:
    sys.exit(daemon.run("rescue", Rescuer))
