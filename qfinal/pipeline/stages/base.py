from __future__ import annotations

from qfinal.config import RunConfig


class BaseStage:
    name = "stage"

    def check(self, config: RunConfig) -> None:
        """Static checks that need no weights; raise ConfigError."""


def unwrap(model):
    """The transformers model under a PEFT wrapper (whose parameter names carry a prefix)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) and hasattr(model, "peft_config") else model
