"""Real end-to-end training on CPU: env_space and one rollout gateway (vLLM) as subprocesses from their venvs (shared
by the suite, see conftest), the trainer in-process with its dashboard server. `run1` trains from an empty bucket with
generation overlapping training; later runs restart on the same bucket: one pair compares seconds per step with and
without overlap, one holds the replica back (no nudge after publishing, prefetch not allowed to wait) so prefetched
batches are stale when consumed and the guard must regenerate them."""

from __future__ import annotations

import httpx
import pytest
import torch

from trainer_helpers import RUN1_STEPS
from trainer_helpers import bucket_latest, cfg_for, sync_replica
from trainer_space.config import parse_args
from trainer_space.grpo import train
from trainer_space.state import RunState

pytestmark = pytest.mark.slow


def test_reward_improves(run1):
    steps = run1["run"].state.snapshot()["steps"]
    rewards = [s["reward_mean"] for s in steps]
    print("reward curve:", [round(r, 3) for r in rewards], f"wall {run1['wall']:.1f}s")
    for key in ("step_s", "generate_s", "hidden_generate_s", "score_s", "train_s", "publish_block_s"):
        print(key, round(sum(s.get(key, 0) for s in steps) / len(steps), 4))
    assert len(rewards) == RUN1_STEPS
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.05, rewards


def test_every_step_published_and_bit_exact(run1, services):
    run = run1["run"]
    assert run.start_version == 0 and run.final_version == RUN1_STEPS
    pubs = [p["version"] for p in run.state.snapshot()["publishes"]]
    assert pubs == list(range(0, RUN1_STEPS + 1))
    assert bucket_latest(services["bucket"]) >= RUN1_STEPS
    # The follower's rebuild (newest anchor + deltas, taken right after the run) equals the trainer's bf16 weights.
    sd, final = run1["rebuilt"], run.final_bf16()
    assert run1["rebuilt_version"] == RUN1_STEPS and set(final) <= set(sd)
    for name, t in final.items():
        assert torch.equal(t.view(torch.int16), sd[name].view(torch.int16)), name


def test_batches_within_bound_and_generated_ahead(run1):
    batches = run1["run"].state.snapshot()["batches"]
    assert [b["step"] for b in batches] == list(range(1, RUN1_STEPS + 1))
    for b in batches:
        assert b["lag"] <= 1 and None not in b["versions"], b
        assert min(b["versions"]) >= b["trainer_version"] - 1, b
    # Step 1 has nothing before it to overlap with; every later batch was made while the previous step trained.
    assert batches[0]["source"] == "sync"
    ahead = [b for b in batches[1:] if b["source"] == "prefetch"]
    assert len(ahead) >= RUN1_STEPS - 2, [(b["step"], b["source"], b["rejected_lags"]) for b in batches]
    assert sum(b["hidden_s"] for b in ahead) > 0


def test_replica_serves_last_version(run1, services):
    st = sync_replica(services["gw"], bucket_latest(services["bucket"]))
    assert st["digest_match"] is True and st["lag"] == 0


def test_status_json(run1):
    st = httpx.get(f"{run1['dash']}/status", timeout=60).json()
    assert st["phase"] == "done"
    t = st["training"]
    assert t["step"] == RUN1_STEPS and t["reward_mean"] is not None and t["reward_by_task"].keys() == {"short"}
    assert t["loss"] is not None and t["is_ratio_mean"] is not None and t["steps_per_min"] > 0
    assert "kl" in t  # beta 0: TRL logs no KL, the field is there and null
    last = st["sync"]["history"][-1]
    for k in ("changed", "sparsity", "bytes", "encode_s", "upload_s", "compression_vs_full"):
        assert last[k] is not None, k
    assert st["sync"]["compression_vs_full_median"] > 1
    for k in ("generate_s", "score_s", "train_s", "publish_block_s", "step_s", "hidden_generate_s"):
        assert st["timings_mean_s"][k] is not None, k
    ov = st["overlap"]
    assert ov["enabled"] is True and ov["prefetched"] >= RUN1_STEPS - 2 and ov["generate_hidden_s"] > 0
    r = st["replicas"][0]
    for k in ("url", "served_version", "lag", "digest_match", "last_pause_ms", "healthy"):
        assert k in r, k
    assert r["served_version"] is not None and r["healthy"] is True
    b = st["bucket"]
    assert b["latest"] >= RUN1_STEPS and b["total_bytes"] > 0 and b["anchors"] >= 1 and b["deltas"] >= 1
    assert httpx.get(f"{run1['dash']}/health", timeout=10).status_code == 200
    page = httpx.get(f"{run1['dash']}/", timeout=60, follow_redirects=True)
    assert page.status_code == 200 and "gradio" in page.text.lower()


def _restart(services, *, nudge: bool = True, **kw):
    latest = bucket_latest(services["bucket"])
    sync_replica(services["gw"], latest)
    run = train(cfg_for(services, **kw), state=RunState(), nudge_after_publish=nudge)
    assert run.start_version == latest and run.final_version == latest + kw["steps"]
    assert bucket_latest(services["bucket"]) == latest + kw["steps"]
    return run


def test_seconds_per_step_with_and_without_overlap(run1, services):
    """Same bucket, same settings, back to back: generation ahead vs generation on demand. Figures are printed for
    the README; no speed is asserted (timings belong in benchmarks), only that each mode did what it says."""
    figures = {}
    for overlap in (True, False):
        run = _restart(services, steps=6, overlap=overlap)
        snap = run.state.snapshot()
        later = snap["steps"][1:]
        figures[overlap] = {k: round(sum(s.get(k, 0.0) for s in later) / len(later), 3)
                            for k in ("step_s", "generate_s", "hidden_generate_s", "train_s", "score_s")}
        sources = [b["source"] for b in snap["batches"]]
        if overlap:
            assert sources.count("prefetch") >= 4 and snap["overlap"]["generate_hidden_s"] > 0, snap["batches"]
        else:
            assert set(sources) == {"sync"} and snap["overlap"]["generate_hidden_s"] == 0
            assert snap["overlap"]["enabled"] is False
    print(f"seconds per step (steps 2-6): overlap {figures[True]} | no overlap {figures[False]}")


def test_restart_continues_and_staleness_guard(run1, services):
    """Restart on the same bucket; the replica is never nudged after a publish and the prefetcher may not wait for
    it, so every prefetched batch is one version too old when consumed: the guard must reject it at that moment,
    wait/nudge and regenerate rather than train on a batch beyond the bound."""
    run = _restart(services, steps=4, staleness=1, prefetch_wait_s=0.0, nudge=False)
    batches = run.state.snapshot()["batches"]
    assert all(b["lag"] <= 1 for b in batches), batches
    assert all(min(b["versions"]) >= b["trainer_version"] - 1 for b in batches), batches
    stale_prefetches = [b for b in batches if b["prefetched"] and b["rejected_lags"]]
    assert stale_prefetches, "no prefetched batch was stale: the guard at consumption was not exercised"
    assert all(lag > 1 for b in batches for lag in b["rejected_lags"])
    assert all(b["source"] == "sync" for b in stale_prefetches)  # the regenerated batch is what trained


def test_cli_requires_inputs(monkeypatch):
    for k in ("DWS_MODEL", "DWS_BUCKET", "DWS_ROLLOUT_URLS", "DWS_ENV_URL", "DWS_OVERLAP"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(SystemExit):
        parse_args([])
    monkeypatch.setenv("DWS_ROLLOUT_URLS", "http://a:1, http://b:2/")
    monkeypatch.setenv("DWS_API_KEY", "secret-value")
    cfg = parse_args(["--model", "m", "--bucket", "b", "--env-url", "http://e"])
    assert cfg.rollout_urls == ("http://a:1", "http://b:2") and cfg.staleness == 1 and cfg.overlap is True
    assert "secret-value" not in repr(cfg) and "secret-value" not in str(cfg.describe())
    assert parse_args(["--model", "m", "--bucket", "b", "--env-url", "e", "--no-overlap"]).overlap is False
    monkeypatch.setenv("DWS_OVERLAP", "false")
    assert parse_args(["--model", "m", "--bucket", "b", "--env-url", "e"]).overlap is False
    cfg = parse_args(["--model", "m", "--bucket", "b", "--env-url", "e", "--task", "short, wordle"])
    assert cfg.tasks == ("short", "wordle")
