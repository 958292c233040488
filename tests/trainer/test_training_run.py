"""Real end-to-end training on CPU: env_space and one rollout gateway (vLLM) as subprocesses from their venvs, the
trainer in-process with its dashboard server. Run 1 trains from an empty bucket; run 2 restarts on the same bucket
with the replica held back (huge poll interval, no nudge after publish) to exercise the staleness guard."""

from __future__ import annotations

import time

import httpx
import pytest
import torch

from shared.bucket import open_bucket
from shared.follower import Follower
from shared.manifest import read_manifest
from trainer_helpers import TOKEN, start_env, start_gateway
from dws_testing import free_port
from trainer_space.config import TrainerConfig, parse_args
from trainer_space.dashboard import serve_in_background
from trainer_space.grpo import train
from trainer_space.state import RunState

pytestmark = pytest.mark.slow
STEPS = 15


def _cfg(w, **kw) -> TrainerConfig:
    base = dict(model=str(w["model"]), bucket=str(w["bucket"]), rollout_urls=(w["gw"].url,), env_url=w["env"].url,
                task="short", steps=STEPS, lr=1e-2, prompts_per_step=4, group_size=8, max_completion_length=8,
                rollout_token=TOKEN, output_dir=str(w["root"] / "out"), staleness=1, stale_wait_s=60)
    return TrainerConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("trainer")
    bucket = root / "bucket"
    env = start_env(root)
    gw = None
    try:
        gw = start_gateway(tiny_model_dir, bucket, root)
        w = {"root": root, "bucket": bucket, "model": tiny_model_dir, "env": env, "gw": gw}
        state = RunState()
        port = free_port()
        server = serve_in_background(state, host="127.0.0.1", port=port, bucket=str(bucket))
        t0 = time.time()
        w["run1"] = train(_cfg(w), state=state)
        w["run1_wall"] = time.time() - t0
        w["dash"] = f"http://127.0.0.1:{port}"
        yield w
        server.stop()
    finally:
        if gw is not None:
            gw.stop()
        env.stop()


def _sync_replica(gw, version, timeout=90):
    deadline = time.time() + timeout
    while time.time() < deadline:
        httpx.post(f"{gw.url}/sync", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
        st = gw.status()
        if st["served_version"] == version and not st["paused"]:
            return st
        time.sleep(0.5)
    raise AssertionError(f"replica never reached v{version}: {gw.status()}\n{gw.tail()}")


def test_reward_improves(world):
    steps = world["run1"].state.snapshot()["steps"]
    rewards = [s["reward_mean"] for s in steps]
    print("reward curve:", [round(r, 3) for r in rewards], f"wall {world['run1_wall']:.1f}s")
    for key in ("generate_s", "score_s", "step_s", "publish_block_s"):
        print(key, round(sum(s.get(key, 0) for s in steps) / len(steps), 4))
    assert len(rewards) == STEPS
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.05, rewards


def test_every_step_published_and_bit_exact(world):
    run = world["run1"]
    assert run.start_version == 0 and run.final_version == STEPS
    m = read_manifest(open_bucket(world["bucket"]))
    assert m.latest == STEPS
    pubs = [p["version"] for p in run.state.snapshot()["publishes"]]
    assert pubs == list(range(0, STEPS + 1))
    version, sd = Follower(world["bucket"]).materialize()
    assert version == STEPS
    final = run.final_bf16()
    assert set(final) <= set(sd)
    for name, t in final.items():
        assert torch.equal(t.view(torch.int16), sd[name].view(torch.int16)), name


def test_batches_within_bound_run1(world):
    for b in world["run1"].state.snapshot()["batches"]:
        assert b["lag"] <= 1 and None not in b["versions"], b


def test_replica_serves_last_version(world):
    st = _sync_replica(world["gw"], STEPS)
    assert st["digest_match"] is True and st["lag"] == 0


def test_status_and_dashboard(world):
    st = httpx.get(f"{world['dash']}/status", timeout=60).json()
    assert st["phase"] == "done"
    assert st["training"]["step"] == STEPS and st["training"]["reward_mean"] is not None
    assert st["training"]["loss"] is not None and st["training"]["is_ratio_mean"] is not None
    last = st["sync"]["history"][-1]
    for k in ("changed", "sparsity", "bytes", "encode_s", "upload_s", "compression_vs_full"):
        assert last[k] is not None, k
    assert st["replicas"][0]["served_version"] is not None
    assert st["bucket"]["latest"] >= STEPS and st["bucket"]["total_bytes"] > 0
    assert httpx.get(f"{world['dash']}/health", timeout=10).status_code == 200
    page = httpx.get(f"{world['dash']}/", timeout=60, follow_redirects=True)
    assert page.status_code == 200 and "gradio" in page.text.lower()


def test_restart_continues_and_staleness_guard(world):
    """Restart on the same bucket; the replica is never nudged after a publish, so it falls behind and the trainer
    must wait/nudge and regenerate rather than train on a batch beyond the bound."""
    _sync_replica(world["gw"], STEPS)
    run = train(_cfg(world, steps=4, staleness=1), state=RunState(), nudge_after_publish=False)
    assert run.start_version == STEPS and run.final_version == STEPS + 4
    batches = run.state.snapshot()["batches"]
    assert all(b["lag"] <= 1 for b in batches), batches
    assert all(min(b["versions"]) >= b["trainer_version"] - 1 for b in batches), batches
    assert any(b["rejected_lags"] for b in batches), "replica never fell behind: the guard was not exercised"
    assert all(lag > 1 for b in batches for lag in b["rejected_lags"])
    m = read_manifest(open_bucket(world["bucket"]))
    assert m.latest == STEPS + 4


def test_cli_requires_inputs(monkeypatch):
    for k in ("DWS_MODEL", "DWS_BUCKET", "DWS_ROLLOUT_URLS", "DWS_ENV_URL"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(SystemExit):
        parse_args([])
    monkeypatch.setenv("DWS_ROLLOUT_URLS", "http://a:1, http://b:2/")
    monkeypatch.setenv("DWS_API_KEY", "secret-value")
    cfg = parse_args(["--model", "m", "--bucket", "b", "--env-url", "http://e"])
    assert cfg.rollout_urls == ("http://a:1", "http://b:2") and cfg.staleness == 1
    assert "secret-value" not in repr(cfg) and "secret-value" not in str(cfg.describe())
