"""The live record of a training run, shared by the training thread, the prefetch worker, the publisher's callbacks
and the dashboard.

Owns `RunState`: per-step training figures and timings, per-batch version records (what the staleness guard decided,
whether the batch was generated ahead), per-version publish reports and the run's phase; and the summaries derived
from them (`overlap`, `episodes`). Every mutation holds one lock because the publisher reports from its own thread
and the dashboard reads from uvicorn's.
"""

from __future__ import annotations

import copy
import threading
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass(kw_only=True)
class BatchRecord:
    step: int  # the optimizer step this batch trains (1-based, run-local)
    trainer_version: int  # version of the weights when the batch was accepted
    versions: list[int | None]  # model_version of every completion
    lag: int  # trainer_version - oldest completion version
    attempts: int  # 1 = first generation accepted
    rejected_lags: list[int] = field(default_factory=list)  # lags of batches that were thrown away
    waited_s: float = 0.0  # nudging/polling lagging replicas before a regeneration
    generate_s: float = 0.0  # generation the training loop waited for (all of it without overlap)
    replicas: list[str] = field(default_factory=list)
    source: str = "sync"  # the accepted batch: "prefetch" (made during the previous step) or "sync"
    prefetched: bool = False  # a prefetched batch was taken (it may still have been rejected as stale)
    exposed_wait_s: float = 0.0  # waiting for the prefetch to finish
    prefetch_generate_s: float = 0.0  # the prefetch worker generating the accepted batch
    prefetch_replica_wait_s: float = 0.0  # ... and, before that, waiting for a replica to serve the needed version
    hidden_s: float = 0.0  # generation that ran while the previous step trained (never waited for)
    wasted_s: float = 0.0  # prefetch generation thrown away as stale
    tasks: list[str] = field(default_factory=list)
    turns: list[int] = field(default_factory=list)  # multi-turn: turns of each episode
    episode_returns: list[float] = field(default_factory=list)


class RunState:
    def __init__(self, config: dict[str, Any] | None = None) -> None:
        self._lock = threading.Lock()
        self.started = time.time()
        self.phase = "starting"
        self.error: str | None = None
        self.config = config or {}
        self.start_version: int | None = None
        self.steps: list[dict[str, Any]] = []  # one per optimizer step
        self.batches: list[BatchRecord] = []
        self.publishes: list[dict[str, Any]] = []
        self.full_bf16_bytes: int | None = None
        self.overlap: bool | None = None
        self.tasks: list[str] = []
        self.multi_turn_tasks: list[str] = []
        self._pending: dict[str, Any] = {}

    def set(self, **kw: Any) -> None:
        with self._lock:
            for k, v in kw.items():
                setattr(self, k, v)

    def pending(self, **kw: Any) -> None:
        """Figures of the step in progress (generation/scoring time, reward) merged into its row at step end."""
        with self._lock:
            for k, v in kw.items():
                self._pending[k] = self._pending.get(k, 0.0) + v if k.endswith("_s") else v

    def end_step(self, row: dict[str, Any]) -> None:
        with self._lock:
            row = {**self._pending, **row}
            if "step_s" in row:
                row["train_s"] = max(0.0, row["step_s"] - sum(row.get(k, 0.0) for k in
                                                              ("generate_s", "wait_s", "score_s")))
            self.steps.append(row)
            self._pending = {}

    def add_batch(self, rec: BatchRecord) -> None:
        with self._lock:
            self.batches.append(rec)

    def add_publish(self, report: dict[str, Any]) -> None:
        with self._lock:
            self.publishes.append(report)

    def update_step(self, step: int, **kw: Any) -> None:
        with self._lock:
            for row in reversed(self.steps):
                if row.get("step") == step:
                    row.update(kw)
                    return

    def _overlap_summary(self, steps: list[dict]) -> dict[str, Any]:
        b = self.batches
        s_sum = sum(s.get("step_s", 0.0) for s in steps)
        hidden = sum(x.hidden_s for x in b)
        exposed = sum(x.generate_s for x in b)
        later = [s for s in steps if s.get("step", 0) > 1]  # step 1 can never have been generated ahead
        return {
            "enabled": self.overlap, "batches": len(b), "prefetched": sum(x.source == "prefetch" for x in b),
            "sync": sum(x.source == "sync" for x in b), "prefetch_rejected_stale": sum(
                1 for x in b if x.prefetched and x.rejected_lags),
            "generate_hidden_s": round(hidden, 3), "generate_exposed_s": round(exposed, 3),
            "hidden_fraction": round(hidden / (hidden + exposed), 3) if hidden + exposed > 0 else None,
            "wasted_s": round(sum(x.wasted_s for x in b), 3),
            "s_per_step": round(s_sum / len(steps), 4) if steps else None,
            "s_per_step_after_first": (round(sum(s.get("step_s", 0.0) for s in later) / len(later), 4)
                                       if later else None),
        }

    def _episode_summary(self) -> dict[str, Any]:
        turns = [t for x in self.batches for t in x.turns]
        rets = [r for x in self.batches for r in x.episode_returns]
        if not turns:
            return {"episodes": 0}
        return {"episodes": len(turns), "turns_total": sum(turns), "turns_mean": round(sum(turns) / len(turns), 3),
                "turns_max": max(turns), "multi_turn_episodes": sum(t > 1 for t in turns),
                "return_mean": round(sum(rets) / len(rets), 4)}

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            elapsed = time.time() - self.started
            train_steps = [s for s in self.steps if "step" in s]
            first = train_steps[0]["t"] if train_steps else None
            spm = (60 * (len(train_steps) - 1) / (train_steps[-1]["t"] - first)
                   if len(train_steps) > 1 and train_steps[-1]["t"] > first else None)
            return {
                "phase": self.phase, "error": self.error, "elapsed_s": round(elapsed, 1),
                "start_version": self.start_version, "config": copy.deepcopy(self.config),
                "steps_per_min": spm, "steps": copy.deepcopy(self.steps),
                "batches": [vars(b).copy() for b in self.batches],
                "publishes": copy.deepcopy(self.publishes), "full_bf16_bytes": self.full_bf16_bytes,
                "tasks": list(self.tasks), "multi_turn_tasks": list(self.multi_turn_tasks),
                "overlap": self._overlap_summary(train_steps), "episodes": self._episode_summary(),
            }
