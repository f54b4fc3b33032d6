"""Shared fixtures: tiny real checkpoints built once per session, and an isolated environment."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import builders  # noqa: E402


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch, tmp_path_factory):
    """No test reads the user's HF cache or qfinal cache, and nothing reaches a hub."""
    home = tmp_path_factory.getbasetemp() / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("QFINAL_CACHE", str(tmp_path_factory.getbasetemp() / "qfinal_cache"))
    monkeypatch.delenv("QFINAL_DEBUG", raising=False)


class _Lazy:
    """Build each checkpoint on first use, once per session."""

    def __init__(self, root: Path):
        self.root = root
        self.cache: dict = {}

    def __getitem__(self, name: str) -> Path:
        if name not in self.cache:
            self.cache[name] = builders.BUILDERS[name](self.root / name)
        return self.cache[name]

    def quantized(self, name: str, method: str) -> Path:
        key = (name, method)
        if key not in self.cache:
            self.cache[key] = builders.bnb_checkpoint(self[name], self.root / f"{name}-{method}", method)
        return self.cache[key]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> _Lazy:
    return _Lazy(tmp_path_factory.mktemp("checkpoints"))
