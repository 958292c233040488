"""Helpers for every suite (imported as `dws_testing`; `tests/` is on sys.path through the root conftest).

Only the standard library and `shared.proc` (stdlib + httpx) at module level: each suite runs in its own Space's
venv, and the env venv has no torch. Ports, process groups and the `/health` wait are the product's own
(`shared.proc`), which the replica's gateway and `make demo` use too. `Service` starts a Space's production command as a child on 127.0.0.1 and stops its whole process group.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from shared.proc import NotHealthy, free_port, stop_process_group, wait_healthy  # noqa: F401 -- re-exported

REPO = Path(__file__).resolve().parents[1]


class TinyTrainer:
    """fp32 master weights + AdamW with real forward/backward passes on random token batches (tiny model)."""

    def __init__(self, model_dir, *, lr=3e-6, seed=0):
        import torch
        from transformers import AutoModelForCausalLM

        torch.manual_seed(seed)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr)
        self.gen = torch.Generator().manual_seed(seed)

    def step(self, n=1):
        for _ in range(n):
            ids = self.torch.randint(0, 256, (2, 24), generator=self.gen)
            self.model(input_ids=ids, labels=ids).loss.backward()
            self.opt.step()
            self.opt.zero_grad()

    def params(self):
        return dict(self.model.named_parameters())

    def bf16(self):
        return {n: p.detach().to(self.torch.bfloat16).clone() for n, p in self.model.named_parameters()}


class Service:
    """A child process serving HTTP on 127.0.0.1; waits for GET /health, stops by process group."""

    def __init__(self, cmd: list[str], *, log: Path, env: dict | None = None, timeout: float = 600) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [c.replace("{PORT}", str(self.port)) for c in cmd]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})),
                                     stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_healthy(self.url, proc=self.proc, timeout=timeout, what=cmd[2] if len(cmd) > 2 else cmd[0],
                         interval=1.0, log_tail=self.tail)
        except NotHealthy as exc:
            self.stop()
            raise AssertionError(str(exc)) from None

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def status(self) -> dict:
        import httpx

        return httpx.get(f"{self.url}/status", timeout=30).json()

    def stop(self) -> None:
        stop_process_group(self.proc, timeout=30)


def rice_reference(values, k: int):
    """The Rice streams of sorted unique `values` by definition, in numpy (what `shared.codec.rice_encode` must
    write): each gap ``v[i] - v[i-1] - 1`` as ``gap >> k`` zeros and a one, and its low k bits MSB first, each
    stream packed MSB first and zero-padded to whole bytes."""
    import numpy as np

    v = np.asarray(values, np.int64)
    gaps = np.diff(v, prepend=-1) - 1
    q = gaps >> k
    unary = np.zeros(int(q.sum()) + v.size, np.uint8)
    unary[np.cumsum(q + 1) - 1] = 1
    rem = ((gaps[:, None] >> np.arange(k - 1, -1, -1, dtype=np.int64)) & 1).astype(np.uint8).reshape(-1)
    return np.packbits(unary), np.packbits(rem)
