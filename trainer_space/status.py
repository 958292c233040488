"""The trainer's status model: one JSON document (`GET /status`) that the dashboard page is drawn from, so the page
and `/status` cannot disagree.

Owns `build_status`: training (per-step history from TRL's logs, reward, loss, ratio, staleness), timings, rollouts
(queue, staleness mean/max, samples dropped as stale, rollout wait, per-replica throughput, episodes), sync (publish
reports per version), replicas (each replica's own `/status`) and bucket (the manifest). Nothing here can block
training: every remote read has a short timeout and failures become fields.
"""

from __future__ import annotations

import math
from typing import Any

from trainer_space.state import RunState

# Step-time parts, in stacking order: (status key, label, colour).
TIME_PARTS = (("rollout_wait_s", "waiting for rollouts", "#e4572e"), ("train_s", "train (fwd/bwd + optimizer)",
                                                                      "#4c86a8"),
              ("publish_block_s", "publish (blocking snapshot)", "#7d5ba6"), ("other_s", "other", "#bbbbbb"))


def bucket_view(bucket: str | None) -> dict[str, Any]:
    if not bucket:
        return {}
    try:
        from shared.bucket import open_bucket
        from shared.manifest import read_manifest

        m = read_manifest(open_bucket(bucket))
    except Exception as e:  # an unreadable bucket is shown, not raised
        return {"error": f"{type(e).__name__}: {e}"[:300]}
    if m is None:
        return {"latest": None, "anchors": 0, "deltas": 0, "total_bytes": 0}
    return {"latest": m.latest, "anchors": len(m.anchors), "deltas": len(m.deltas),
            "anchor_versions": [a.version for a in m.anchors], "delta_versions": [d.version for d in m.deltas],
            "anchor_bytes": sum(a.bytes for a in m.anchors), "delta_bytes": sum(d.bytes for d in m.deltas),
            "total_bytes": sum(e.bytes for e in (*m.anchors, *m.deltas))}


def mean(xs: list) -> float | None:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else None


def median(xs: list) -> float | None:
    xs = sorted(x for x in xs if x is not None)
    return None if not xs else (xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2)


def _rollouts(snap: dict, steps: list[dict]) -> dict[str, Any]:
    w = snap.get("rollouts") or {}
    step_total = sum(s.get("step_s") or 0.0 for s in steps)
    wait_total = sum(s.get("rollout_wait_s") or 0.0 for s in steps)
    stal = [s.get("staleness_mean") for s in steps]
    turns, rets = w.get("turns") or [], w.get("episode_returns") or []
    episodes = {"episodes": 0}
    if turns:
        episodes = {"episodes": len(turns), "turns_total": sum(turns), "turns_mean": round(sum(turns) / len(turns), 3),
                    "turns_max": max(turns), "multi_turn_episodes": sum(t > 1 for t in turns),
                    "return_mean": round(sum(rets) / len(rets), 4)}
    return {
        "queue_size": w.get("queue_size"), "max_inflight": w.get("max_inflight"), "groups": w.get("groups", 0),
        "samples_produced": w.get("samples", 0),
        "samples_dropped_stale": int(sum(s.get("dropped_stale") or 0 for s in steps)),
        "staleness_mean": mean(stal), "staleness_max": max((s.get("staleness_max") or 0 for s in steps), default=None),
        "rollout_wait_s_total": round(wait_total, 3),
        "rollout_wait_share": round(wait_total / step_total, 4) if step_total > 0 else None,
        "waiting_for_fresh_replica_s": w.get("waiting_for_fresh_s"), "backpressure_s": w.get("backpressure_s"),
        "versions": w.get("versions", {}), "untagged_groups": w.get("untagged_groups", 0),
        "request_errors": w.get("request_errors", 0), "last_error": w.get("last_error"), "episodes": episodes,
    }


def build_status(state: RunState, *, bucket: str | None, refresh_replicas: bool = True) -> dict[str, Any]:
    snap = state.snapshot()
    steps = snap.pop("steps")
    pubs = snap.pop("publishes")
    pool = state.pool
    replicas = []
    if pool is not None:
        replicas = pool.refresh_status() if refresh_replicas else pool.views()
    envs = [p.view(state.envs.started) | {"kind": "env"} for p in state.envs.peers] if state.envs is not None else []
    for s in steps:
        parts = sum(s.get(k) or 0.0 for k, _, _ in TIME_PARTS if k != "other_s")
        s["other_s"] = max(0.0, (s.get("step_s") or 0.0) - parts)
    full = snap.get("full_bf16_bytes")
    last = steps[-1] if steps else {}
    training = {
        "step": last.get("step", 0), "version": last.get("version", snap.get("start_version")),
        "reward_mean": last.get("reward_mean"), "reward_by_task": last.get("reward_by_task"),
        "loss": last.get("loss"), "kl": last.get("kl"), "ratio_mean": last.get("ratio_mean"),
        "staleness_mean": last.get("staleness_mean"), "steps_per_min": snap.pop("steps_per_min"), "history": steps,
    }
    timings = {k: mean([s.get(k) for s in steps]) for k, _, _ in TIME_PARTS}
    timings.update(step_s=mean([s.get("step_s") for s in steps]))
    # What a following replica downloads for a version is its delta (an anchor is for newcomers), so compression is
    # full bf16 over the delta where there is one, over the anchor otherwise.
    hist = [{**p, "compression_vs_full": (full / (p.get("delta_bytes") or p["bytes"])) if full and p.get("bytes")
             else None} for p in pubs]
    sync = {
        "published": len(pubs), "latest_published": pubs[-1]["version"] if pubs else None,
        "full_bf16_bytes": full, "history": hist,
        "delta_bytes_median": median([p.get("delta_bytes") for p in pubs]),
        "compression_vs_full_median": median([h["compression_vs_full"] for h in hist if h.get("delta_bytes")]),
    }
    rollouts = _rollouts({**snap}, steps)
    snap.pop("rollouts", None)
    return {**snap, "training": training, "timings_mean_s": timings, "rollouts": rollouts, "sync": sync,
            "replicas": replicas, "envs": envs, "bucket": bucket_view(bucket)}
