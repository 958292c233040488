"""Subprocess helpers for the trainer suite: a real env_space server and a real rollout gateway (vLLM on CPU), each
started from its own Space's venv exactly as its image would run it (docs/design.md §2). Nothing is mocked. `cfg_for`
builds the suite's small training configuration against them."""

from __future__ import annotations

import time
from pathlib import Path

from dws_testing import REPO, Service

TOKEN = "test-token-trainer"
RUN1_STEPS = 15  # the suite's first training run (conftest `run1`)
ROLLOUT_PY = REPO / ".venv" / "rollout" / "bin" / "python"
ENV_PY = REPO / ".venv" / "env" / "bin" / "python"


def start_env(logdir: Path) -> Service:
    return Service([str(ENV_PY), "-m", "env_space", "--host", "127.0.0.1", "--port", "{PORT}"],
                   log=logdir / "env.log", env={"DWS_UI": "false"})


def start_gateway(model: Path, bucket: Path, logdir: Path, *, poll_interval: float = 1) -> Service:
    """A replica following the bucket (1 s poll, and the trainer nudges it after every publish). 1024 tokens of
    context: a multi-turn Wordle episode (≈400 prompt tokens + turns + feedback) must fit."""
    return Service([str(ROLLOUT_PY), "-m", "rollout_space", "--model", str(model), "--bucket", str(bucket),
                    "--host", "127.0.0.1", "--port", "{PORT}", "--poll-interval", str(poll_interval),
                    "--max-model-len", "1024", "--no-ui", "--vllm-log", str(logdir / "vllm.log"),
                    "--vllm-args=--enforce-eager"],
                   log=logdir / "gateway.log",
                   env={"DWS_API_KEY": TOKEN, "VLLM_CACHE_ROOT": str(logdir / "vllm-cache")})


def cfg_for(services: dict, **kw):
    """The suite's training configuration: task `short` (learnable by the tiny model), lr 1e-2, 4 prompts x 8."""
    from trainer_space.config import TrainerConfig

    base = dict(model=str(services["model"]), bucket=str(services["bucket"]), rollout_urls=(services["gw"].url,),
                env_urls=(services["env"].url,), task="short", steps=15, lr=1e-2, prompts_per_step=4, group_size=8,
                max_completion_length=8, rollout_token=TOKEN, output_dir=str(services["root"] / "out"),
                max_staleness=1, retry_after_s=2.0)
    return TrainerConfig(**{**base, **kw})


def sync_replica(gw, version: int, timeout: float = 90) -> dict:
    """Nudge the replica until it serves `version`."""
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        httpx.post(f"{gw.url}/sync", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
        st = gw.status()
        if st["served_version"] == version and not st["paused"]:
            return st
        time.sleep(0.3)
    raise AssertionError(f"replica never reached v{version}: {gw.status()}\n{gw.tail()}")


def bucket_latest(bucket) -> int | None:
    from shared.bucket import open_bucket
    from shared.manifest import read_manifest

    m = read_manifest(open_bucket(bucket))
    return None if m is None else m.latest
