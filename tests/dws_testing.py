"""Helpers for every suite (imported as `dws_testing`; `tests/` is on sys.path through the root conftest).

Only the standard library at module level: each suite runs in its own Space's venv, and the env venv has no torch.
"""

from __future__ import annotations

import socket
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
