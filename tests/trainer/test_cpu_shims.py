"""The CPU shims of trainer_space.cpu_shims, numerically: the torch varlen attention against a reference attention
written out element by element (float64, explicit softmax) on random inputs with grouped-query heads, segments of
unequal length and a segment with fewer queries than keys (the case where FlashAttention aligns the causal mask to
the bottom right). No services."""

from __future__ import annotations

import math

import pytest
import torch

from trainer_space.cpu_shims import torch_tree_attention, varlen_attention


def _reference(q, k, v, cu_q, cu_k, scale, window_left=-1):
    heads, kv_heads = q.shape[1], k.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for s in range(len(cu_q) - 1):
        q0, q1, k0, k1 = cu_q[s], cu_q[s + 1], cu_k[s], cu_k[s + 1]
        lq, lk = q1 - q0, k1 - k0
        for h in range(heads):
            hk = h // (heads // kv_heads)  # GQA: consecutive query heads share one key/value head
            for i in range(lq):
                last = i + lk - lq  # bottom-right aligned: the last query sees every key
                first = 0 if window_left < 0 else max(0, last - window_left)
                keys = range(first, last + 1)
                logits = [scale * float(q[q0 + i, h].double() @ k[k0 + j, hk].double()) for j in keys]
                m = max(logits)
                w = [math.exp(x - m) for x in logits]
                z = sum(w)
                for wi, j in zip(w, keys):
                    out[q0 + i, h] += (wi / z) * v[k0 + j, hk].double()
    return out


@pytest.mark.parametrize("window_left", [-1, 2])
def test_varlen_attention_matches_reference(window_left):
    g = torch.Generator().manual_seed(0)
    heads, kv_heads, d = 4, 2, 8
    lens_q, lens_k = [5, 3, 1, 4], [5, 7, 6, 4]  # segments 2 and 3 have fewer queries than keys
    cu_q = [0, *torch.tensor(lens_q).cumsum(0).tolist()]
    cu_k = [0, *torch.tensor(lens_k).cumsum(0).tolist()]
    q = torch.randn(cu_q[-1], heads, d, generator=g)
    k = torch.randn(cu_k[-1], kv_heads, d, generator=g)
    v = torch.randn(cu_k[-1], kv_heads, d, generator=g)
    scale = d ** -0.5
    got = varlen_attention(q, k, v, torch.tensor(cu_q, dtype=torch.int32), torch.tensor(cu_k, dtype=torch.int32),
                           softmax_scale=scale, causal=True, window_size=(window_left, 0))
    want = _reference(q, k, v, cu_q, cu_k, scale, window_left)
    assert got.shape == q.shape
    assert torch.allclose(got.double(), want, atol=1e-5), (got.double() - want).abs().max()


def test_tree_attention_shares_a_prefix_exactly_like_two_full_sequences():
    """A packed trie of two sequences sharing a 3-token prefix (segments: prefix, branch A, branch B) gives each
    branch the outputs that plain causal attention over its whole sequence gives."""
    g = torch.Generator().manual_seed(1)
    heads, kv_heads, d = 2, 1, 4
    n = 3 + 2 + 2  # prefix, branch A, branch B laid out in DFS order
    q = torch.randn(1, heads, n, d, generator=g)
    k = torch.randn(1, kv_heads, n, d, generator=g)
    v = torch.randn(1, kv_heads, n, d, generator=g)
    kv_index = torch.tensor([0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 2, 5, 6])
    cu_q = torch.tensor([0, 3, 5, 7], dtype=torch.int32)
    cu_k = torch.tensor([0, 3, 8, 13], dtype=torch.int32)
    out, _ = torch_tree_attention(None, q, k, v, None, tree_kv_index=kv_index, tree_cu_seqlens_q=cu_q,
                                  tree_cu_seqlens_k=cu_k, scaling=d ** -0.5)
    for branch in ([0, 1, 2, 3, 4], [0, 1, 2, 5, 6]):
        idx = torch.tensor(branch)
        full = torch.nn.functional.scaled_dot_product_attention(
            q[0][:, idx], k[0][:, idx].repeat_interleave(2, 0), v[0][:, idx].repeat_interleave(2, 0),
            is_causal=True, scale=d ** -0.5).transpose(0, 1)
        assert torch.allclose(out[0][idx], full, atol=1e-6)
