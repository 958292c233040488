"""Fixtures for the trainer suite (runs in .venv/trainer).

One env_space server and one rollout gateway (a real CPU vLLM) serve the whole suite: a vLLM start costs ~45 s and
~2-3 GB, so every module shares them. The gateway follows the bucket on a 1 s poll (and every publish nudges it), as
a deployed replica does. They follow one bucket; each training run in the suite restarts on it and
continues its version numbering (the restart path is itself under test) -- test_sharded_trainer.py's 2-rank torchrun
runs included, so the later single-process runs continue a history stored in parts. `run1` is the first run (from an empty
bucket) with its dashboard server, which keeps serving after training, as the Space does.
"""

from __future__ import annotations

import time

import pytest


@pytest.fixture(scope="session", autouse=True)
def _trainer_deps():
    pytest.importorskip("trl")
    pytest.importorskip("gradio")


@pytest.fixture(scope="session")
def services(tmp_path_factory, tiny_model_dir):
    from trainer_helpers import start_env, start_gateway

    root = tmp_path_factory.mktemp("trainer")
    bucket = root / "bucket"
    env = start_env(root)
    gw = None
    try:
        gw = start_gateway(tiny_model_dir, bucket, root)
        yield {"root": root, "bucket": bucket, "model": tiny_model_dir, "env": env, "gw": gw}
    finally:
        if gw is not None:
            gw.stop()
        env.stop()


@pytest.fixture(scope="session")
def run1(services):
    """15 GRPO steps from an empty bucket (AsyncGRPOTrainer, continuous generation), dashboard on a free port."""
    from dws_testing import free_port
    from trainer_helpers import RUN1_STEPS, cfg_for
    from trainer_space.page import serve_in_background
    from trainer_space.state import RunState
    from trainer_space.train import train

    state = RunState()
    port = free_port()
    server = serve_in_background(state, host="127.0.0.1", port=port, bucket=str(services["bucket"]))
    t0 = time.time()
    try:
        run = train(cfg_for(services, steps=RUN1_STEPS), state=state)
        wall = time.time() - t0
        # What a newcomer rebuilds from the bucket, taken now: later runs in the session extend this bucket.
        from shared.follower import Follower

        version, rebuilt = Follower(services["bucket"]).materialize()
        yield {"run": run, "wall": wall, "dash": f"http://127.0.0.1:{port}", "state": state,
               "rebuilt_version": version, "rebuilt": rebuilt}
    finally:
        server.stop()
