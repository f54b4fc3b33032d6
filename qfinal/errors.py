"""User-facing errors: each becomes one line on stderr and a fixed exit code.

Anything that is not a QfinalError is a bug in qfinal and keeps its traceback.
"""

from __future__ import annotations


class QfinalError(Exception):
    """Bad or unsafe input. The message says what is wrong, where, and what to do."""

    exit_code = 2

    def __init__(self, what: str, *, where: str | None = None, hint: str | None = None):
        self.what = what
        self.where = where
        self.hint = hint
        super().__init__(self.line())

    def line(self) -> str:
        parts = [f"{self.where}: {self.what}" if self.where else self.what]
        if self.hint:
            parts.append(self.hint)
        return " — ".join(parts)


class ConfigError(QfinalError):
    """The YAML config or a CLI option is wrong."""


class SourceError(QfinalError):
    """The model source cannot be found or read (path, cache, config.json)."""


class CheckpointError(QfinalError):
    """A checkpoint file is malformed or unsafe (header, index, confinement, pickle)."""


class OutputError(QfinalError):
    """An output location cannot be used (exists, not writable)."""
