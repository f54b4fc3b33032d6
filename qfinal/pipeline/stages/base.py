from __future__ import annotations

from qfinal.config import RunConfig


class BaseStage:
    name = "stage"

    def check(self, config: RunConfig) -> None:
        """Static checks that need no weights; raise ConfigError."""
