"""What TRL's AsyncGRPOTrainer needs to run where there is no CUDA device (a CPU Space, this repo's tests).

trl 1.16's AsyncGRPOTrainer assumes a GPU in exactly two places, both bypassed here and only when CUDA is absent:

1. `get_peak_flops_per_device` (for MFU metrics) calls `torch.cuda.get_device_name`, which raises without CUDA.
   `peak_flops_without_cuda()` swaps the name the trainer module imported for a version that answers None ("peak
   unknown", which TRL already handles by not logging MFU) for a non-CUDA device, for the duration of the trainer's
   construction only.
2. The packed "tree" attention (`tree_fa3`) loads a FlashAttention-3 kernel from the Hub through the `kernels`
   package. `use_torch_tree_attention()` registers, through transformers' public `AttentionInterface`, the same
   function over `varlen_attention`: per segment, `scaled_dot_product_attention` with the bottom-right-aligned causal
   mask FlashAttention uses when a segment has fewer queries than keys, GQA key/value heads repeated. It is
   numerically checked against a reference attention in tests/trainer/test_cpu_shims.py.

On a GPU neither runs: `install_for(trainer)` does nothing when `torch.cuda.is_available()`, so the real kernel and
the real peak-FLOPs table are used.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
import torch.nn.functional as F

log = logging.getLogger("dws.trainer.shims")


def cuda_present() -> bool:
    return torch.cuda.is_available()


@contextlib.contextmanager
def peak_flops_without_cuda() -> Iterator[None]:
    """While the trainer is built, its MFU peak lookup answers None for a non-CUDA device instead of raising."""
    if cuda_present():
        yield
        return
    from trl.experimental.async_grpo import async_grpo_trainer as mod

    original = mod.get_peak_flops_per_device

    def peak_flops(accelerator, dtype):
        # The hazard: torch.cuda.get_device_name raises on a CPU-only build; MFU is simply unknown here.
        if accelerator.device.type != "cuda":
            return None
        return original(accelerator, dtype)

    mod.get_peak_flops_per_device = peak_flops
    try:
        yield
    finally:
        mod.get_peak_flops_per_device = original


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, *, softmax_scale: float | None = None, causal: bool = True,
                     window_size: tuple[int, int] = (-1, -1)) -> torch.Tensor:
    """FlashAttention's `flash_attn_varlen_func` semantics in plain torch.

    q: (total_q, heads, d); k, v: (total_k, kv_heads, d); segment s is q[cu_q[s]:cu_q[s+1]] against
    k[cu_k[s]:cu_k[s+1]]. Causal masking is aligned to the bottom right: query i of a segment with Lq queries and Lk
    keys sees keys j <= i + Lk - Lq (the last query sees every key). Returns (total_q, heads, d).
    """
    heads, kv_heads = q.shape[1], k.shape[1]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} key/value heads")
    rep = heads // kv_heads
    out = torch.empty_like(q)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    left = window_size[0]
    for s in range(len(cq) - 1):
        q0, q1, k0, k1 = cq[s], cq[s + 1], ck[s], ck[s + 1]
        lq, lk = q1 - q0, k1 - k0
        if lq == 0:
            continue
        qs = q[q0:q1].transpose(0, 1)  # (heads, lq, d)
        ks = k[k0:k1].transpose(0, 1).repeat_interleave(rep, dim=0)
        vs = v[k0:k1].transpose(0, 1).repeat_interleave(rep, dim=0)
        mask = None
        if causal or left >= 0:
            i = torch.arange(lq, device=q.device)[:, None] + (lk - lq)  # bottom-right alignment
            j = torch.arange(lk, device=q.device)[None, :]
            mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device)
            if causal:
                mask &= j <= i
            if left >= 0:
                mask &= j >= i - left
        out[q0:q1] = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=softmax_scale).transpose(0, 1)
    return out


def torch_tree_attention(module, query, key, value, attention_mask, *, tree_kv_index, tree_cu_seqlens_q,
                         tree_cu_seqlens_k, tree_max_seqlen_q=None, tree_max_seqlen_k=None, scaling=None,
                         sliding_window=None, softcap=None, **kwargs):
    """TRL's `packing.tree_attention` with `varlen_attention` in place of the FlashAttention-3 kernel: each packed
    segment attends to the keys/values of its root-to-segment path (gathered by `tree_kv_index`)."""
    if softcap:
        raise NotImplementedError("the torch tree attention does not implement logit soft-capping")
    query, key, value = (x.transpose(1, 2)[0] for x in (query, key, value))  # (1, h, N, d) -> (N, h, d)
    out = varlen_attention(query, key.index_select(0, tree_kv_index), value.index_select(0, tree_kv_index),
                           tree_cu_seqlens_q, tree_cu_seqlens_k, softmax_scale=scaling, causal=True,
                           window_size=(sliding_window - 1, 0) if sliding_window else (-1, -1))
    return out.unsqueeze(0), None


def use_torch_tree_attention() -> None:
    """Route TRL's packed attention to `torch_tree_attention` (transformers looks the function up at each forward).
    Call after the trainer is built: its constructor registers the kernel version under the same name."""
    from transformers import AttentionInterface
    from trl.experimental.async_grpo.packing import TREE_ATTENTION

    AttentionInterface.register(TREE_ATTENTION, torch_tree_attention)


def install_after_build() -> bool:
    """Where CUDA is absent, switch the packed attention to torch. Returns whether a shim is active."""
    if cuda_present():
        return False
    use_torch_tree_attention()
    log.info("no CUDA device: packed attention runs in torch (scaled_dot_product_attention per segment), MFU off")
    return True
