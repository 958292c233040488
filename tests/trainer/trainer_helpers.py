"""Subprocess helpers for the trainer suite: a real env_space server and a real rollout gateway (vLLM on CPU), each
started from its own Space's venv exactly as its image would run it (DESIGN.md §2). Nothing is mocked."""

from __future__ import annotations

from pathlib import Path

from dws_testing import REPO, Service

TOKEN = "test-token-trainer"
ROLLOUT_PY = REPO / ".venv" / "rollout" / "bin" / "python"
ENV_PY = REPO / ".venv" / "env" / "bin" / "python"


def start_env(logdir: Path) -> Service:
    return Service([str(ENV_PY), "-m", "env_space", "--host", "127.0.0.1", "--port", "{PORT}"],
                   log=logdir / "env.log", env={"DWS_UI": "false"})


def start_gateway(model: Path, bucket: Path, logdir: Path, *, poll_interval: float = 600) -> Service:
    """A replica that only moves when nudged (huge poll interval), so tests control its lag."""
    return Service([str(ROLLOUT_PY), "-m", "rollout_space", "--model", str(model), "--bucket", str(bucket),
                    "--host", "127.0.0.1", "--port", "{PORT}", "--poll-interval", str(poll_interval),
                    "--max-model-len", "512", "--no-ui", "--vllm-log", str(logdir / "vllm.log"),
                    "--vllm-args=--enforce-eager"],
                   log=logdir / "gateway.log",
                   env={"DWS_API_KEY": TOKEN, "VLLM_CACHE_ROOT": str(logdir / "vllm-cache")})
