"""The live record of a training run, shared by the training thread, the rollout worker, the publisher's callbacks
and the dashboard.

Owns `RunState`: one row per optimizer step (TRL's logged figures: loss, reward, ratio, staleness, queue, timings),
one publish report per version, the run's phase and error, and references to the live peers (replica pool, env
pool, rollout worker) the dashboard reads figures from. Every mutation holds one lock because the publisher reports
from its own thread and the dashboard reads from uvicorn's.
"""

from __future__ import annotations

import copy
import threading
import time
from typing import Any


class RunState:
    def __init__(self, config: dict[str, Any] | None = None) -> None:
        self._lock = threading.Lock()
        self.started = time.time()
        self.phase = "starting"
        self.error: str | None = None
        self.config = config or {}
        self.start_version: int | None = None
        self.steps: list[dict[str, Any]] = []  # one per optimizer step
        self.publishes: list[dict[str, Any]] = []
        self.full_bf16_bytes: int | None = None
        self.tasks: list[str] = []
        self.multi_turn_tasks: list[str] = []
        self.pool = None  # trainer_space.remote.ReplicaPool
        self.envs = None  # trainer_space.remote.EnvPool
        self.worker = None  # trainer_space.worker.RemoteRolloutWorker

    def set(self, **kw: Any) -> None:
        with self._lock:
            for k, v in kw.items():
                setattr(self, k, v)

    def add_step(self, row: dict[str, Any]) -> None:
        with self._lock:
            self.steps.append(row)

    def add_publish(self, report: dict[str, Any]) -> None:
        with self._lock:
            self.publishes.append(report)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            steps = copy.deepcopy(self.steps)
            spm = None
            if len(steps) > 1 and steps[-1]["t"] > steps[0]["t"]:
                spm = 60 * (len(steps) - 1) / (steps[-1]["t"] - steps[0]["t"])
            return {
                "phase": self.phase, "error": self.error, "elapsed_s": round(time.time() - self.started, 1),
                "start_version": self.start_version, "config": copy.deepcopy(self.config), "steps_per_min": spm,
                "steps": steps, "publishes": copy.deepcopy(self.publishes), "full_bf16_bytes": self.full_bf16_bytes,
                "tasks": list(self.tasks), "multi_turn_tasks": list(self.multi_turn_tasks),
                "rollouts": self.worker.snapshot() if self.worker is not None else {},
            }
