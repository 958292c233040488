"""Fixtures for the trainer suite (runs in .venv/trainer)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def _trainer_deps():
    pytest.importorskip("trl")
    pytest.importorskip("gradio")
