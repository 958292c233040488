"""Fixtures for the rollout suite (runs in .venv/rollout, which has vLLM)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def vllm_available():
    """The rollout venv must have a working vLLM: a broken install fails these tests instead of skipping them (a
    skipped plugin suite would let `make test` pass with the replica untested)."""
    try:
        import httpx  # noqa: F401
        import transformers  # noqa: F401
        import vllm  # noqa: F401
        from vllm.distributed.weight_transfer import WeightTransferEngineFactory  # noqa: F401
    except Exception as exc:  # noqa: BLE001 -- any import failure is a broken install
        pytest.fail(f"vLLM is not usable in this venv ({type(exc).__name__}: {exc}); run tools/mkvenv.sh rollout",
                    pytrace=False)
