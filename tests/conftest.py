"""Shared fixtures. Every test runs with no P2PFLEET_* variables from the caller's
environment and with XDG_DATA_HOME pointing into a temporary directory, so no test ever
reads or writes the real ~/.local/share/p2pfleet."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _hermetic_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    for var in list(os.environ):
        if var.startswith("P2PFLEET_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path_factory.getbasetemp() / "xdg-data"))


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A path for a data dir that does not exist yet."""
    return tmp_path / "data"


# Hypothesis: the same examples on every run, so CI cannot turn red by the luck of a
# fresh example database. Explore new examples with P2PFLEET_HYPOTHESIS_EXPLORE=1.
from hypothesis import settings as _hypothesis_settings  # noqa: E402

_hypothesis_settings.register_profile("p2pfleet", derandomize=True)
_hypothesis_settings.register_profile("explore", derandomize=False)
_hypothesis_settings.load_profile(
    "explore" if os.environ.get("P2PFLEET_HYPOTHESIS_EXPLORE") else "p2pfleet")
