"""Fixtures for the rollout suite (runs in .venv/rollout, which has vLLM)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def vllm_available():
    pytest.importorskip("vllm")
    pytest.importorskip("httpx")
    pytest.importorskip("transformers")
