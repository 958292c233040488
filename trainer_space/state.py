"""The live record of a training run, shared by the training thread, the publisher's callbacks and the dashboard.

Owns `RunState`: per-step training figures, per-batch version records (what the staleness guard decided), per-version
publish reports and the run's phase. Every mutation holds one lock because the publisher reports from its own thread
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
    waited_s: float = 0.0
    generate_s: float = 0.0
    replicas: list[str] = field(default_factory=list)


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
            self.steps.append({**self._pending, **row})
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
            }
