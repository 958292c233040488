"""The RPCs the gateway calls on every vLLM worker: ``--worker-extension-cls rollout_space.extension.DwsWorkerExtension``.

Owns the control plane between the gateway and the workers, through vLLM's one public route for it,
``POST /collective_rpc {"method": ..., "args": [...]}`` (one result per worker / TP rank; arguments are strings,
JSON where structured). Why its own RPCs rather than vLLM's start/update/finish routes: a sync is *one* round trip
(``dws_apply``, every file of the version) instead of three, and the full digest can run after resume in chunks
(``dws_digest_start`` / ``dws_digest_step``) that vLLM executes between engine steps, so inference continues.

* ``dws_apply(steps_json)`` -- apply files in order (see rollout_space/updates.py ``DwsUpdateInfo``);
* ``dws_prepare(path[, budget])`` -- before the pause, in budgeted steps: validate a prepared file and turn it into
  this rank's plan (storage offsets + new bits; base-context tensors decoded, residuals resolved), so that the
  pause only writes;
* ``dws_digest()`` / ``dws_digest_start()`` / ``dws_digest_step(budget_bytes)`` -- the served weights digest;
* ``dws_status()``, ``dws_names()``, ``dws_gather(name, positions_json)`` -- read-back for tests and tools.
"""

from __future__ import annotations

import json
import time
from typing import Any


class DwsWorkerExtension:
    """Mixed into vLLM's worker class."""

    def _dws_engine(self):
        engine = getattr(self, "weight_transfer_engine", None)
        if not getattr(engine, "dws_backend", False):
            raise RuntimeError("the dws weight-transfer backend is not selected "
                               "(--weight-transfer-config '{\"backend\": \"dws\"}')")
        return engine

    def dws_apply(self, steps: str) -> dict[str, Any]:
        parsed = json.loads(steps) if isinstance(steps, str) else steps
        if not isinstance(parsed, list):
            raise ValueError("dws_apply takes a JSON list of update descriptions")
        return self._dws_engine().apply(parsed)

    def dws_prepare(self, path: str, budget: str | int | None = None) -> dict[str, Any]:
        """Validate a prepared file and make this rank's plan for it (between engine steps, before the pause);
        ``budget``: about that many changed elements per call -- call again until ``done``."""
        return self._dws_engine().prepare(path, None if budget in (None, "") else int(budget))

    def dws_digest(self) -> dict[str, Any]:
        t = time.perf_counter()
        digest = self._dws_engine().map.digest()
        return {"digest": digest, "ms": round((time.perf_counter() - t) * 1e3, 3)}

    def dws_digest_start(self) -> dict[str, Any]:
        return self._dws_engine().digest_start()

    def dws_digest_step(self, budget_bytes: str | int) -> dict[str, Any]:
        return self._dws_engine().digest_step(int(budget_bytes))

    def dws_status(self) -> dict[str, Any]:
        return self._dws_engine().status()

    def dws_names(self) -> dict[str, list[int]]:
        return {n: list(s) for n, s in self._dws_engine().map.shapes().items()}

    def dws_gather(self, name: str, positions: str | list[int]) -> dict[str, Any]:
        """Served values at flat checkpoint positions (a JSON list, or a JSON string of one), as bf16 bit patterns."""
        import torch

        if isinstance(positions, str):
            positions = json.loads(positions)
        vals = self._dws_engine().map.gather(name, torch.tensor(positions, dtype=torch.int64))
        bits = vals.view(torch.int16).to(torch.int32) & 0xFFFF
        return {"name": name, "dtype": "bfloat16", "bits": bits.tolist()}


__all__ = ["DwsWorkerExtension"]
