"""Change detection (`codec.diff_many` / `diff_bits`): one read of both versions, every tensor's chunks on one queue,
each chunk copied into its slot in chunk order -- against numpy's definitions, across many chunks and tensors, when
the sample's room estimate is too small (the pass runs again), and with the ctx encoding it codes on the way."""

from __future__ import annotations

import numpy as np
import pytest

from shared import codec
from shared.codec import BaseBits, diff_bits, diff_many, get_encoding


def _weights(n: int, seed: int) -> np.ndarray:
    w = (np.random.default_rng(seed).standard_normal(n) * 0.02).astype(np.float32)
    return (w.view(np.uint32) >> 16).astype(np.uint16)


def _expected(new: np.ndarray, old: np.ndarray):
    pos = np.flatnonzero(new != old)
    return pos, new[pos], old[pos]


@pytest.mark.parametrize("context", [False, True])
def test_many_tensors_of_many_chunks_match_the_definition(monkeypatch, context):
    """Tensors of one to several chunks (and one unchanged), all diffed on one queue: each gets exactly its own
    changes, and with ctx each changed element's rank among its class's elements of the whole tensor."""
    monkeypatch.setattr(codec._BaseClasses, "chunk", 1000)
    pairs = []
    for i, (n, density) in enumerate([(5000, 0.05), (999, 0.5), (1, 1.0), (3000, 0.0), (12_345, 0.01)]):
        old = _weights(n, i)
        new = old.copy()
        new[np.random.default_rng(50 + i).random(n) < density] += np.uint16(1)
        pairs.append((new, old))
    for (new, old), (pos, new_at, old_at, base) in zip(pairs, diff_many(pairs, context=context)):
        want = _expected(new, old)
        for got, ref in zip((pos, new_at, old_at), want):
            np.testing.assert_array_equal(got, ref)
        if not context or pos.size == 0:
            assert np.shares_memory(base, old) and np.array_equal(base, old)  # the base itself, no copy
            continue
        assert isinstance(base, BaseBits)
        # Encoded on the way (each chunk's pieces, joined by the last): it decodes onto the base to these changes.
        coded = base.precoded.tensor
        lo, hi = coded.params["p"]
        dec = get_encoding("ctx").decode(coded.arrays, coded.params, old.size, base_context=old)
        np.testing.assert_array_equal(dec.positions, pos)
        np.testing.assert_array_equal(dec.resolve(old_at), new_at)
        # Class sizes per chunk: what the encoder's header says (n_c) comes from them.
        sizes = np.bincount(np.clip((old >> 7) & 0xFF, lo, hi), minlength=256)
        assert all(n_c == sizes[c] for c, n_c, *_ in coded.params["c"])
        np.testing.assert_array_equal(base.histogram.sum(axis=0), sizes)


@pytest.mark.parametrize("context", [False, True])
def test_changes_the_sample_misses_run_the_pass_again_with_the_exact_room(monkeypatch, context):
    """The outputs are sized from a sample (here runs of 256 elements of every 4096: at least 32 Ki of the tensor's
    2**19): changes only outside the runs leave it expecting none. The pass notices it counted more than it had room
    for and runs again with the exact count -- same result as a tensor the sample saw."""
    monkeypatch.setattr(codec._BaseClasses, "chunk", 1 << 16)
    n = 1 << 19
    old = _weights(n, 3)
    new = old.copy()
    hidden = np.flatnonzero((np.arange(n) % 4096 >= 256) & (np.random.default_rng(4).random(n) < 0.05))
    new[hidden] += np.uint16(1)
    reruns = []
    allocate = codec._Diff.allocate

    def spy(self, *, exact=False):
        reruns.append(exact)
        return allocate(self, exact=exact)

    monkeypatch.setattr(codec._Diff, "allocate", spy)
    pos, new_at, old_at, base = diff_bits(new, old, context=context)
    assert reruns == [False, True] and hidden.size > 4096
    for got, ref in zip((pos, new_at, old_at), _expected(new, old)):
        np.testing.assert_array_equal(got, ref)
    enc = get_encoding("ctx" if context else "compact")
    out = enc.encode(pos, new_at, old_at, n, base_context=base if context else None)
    dec = enc.decode(out.arrays, out.params, n, base_context=old if context else None)
    np.testing.assert_array_equal(dec.positions, pos)
    np.testing.assert_array_equal(dec.resolve(old[dec.positions]), new_at)


def test_pooling_bounds_of_a_large_tensor_come_from_its_sample_and_still_decode(monkeypatch):
    """Above 2**18 elements the ctx pooling bounds are estimated from the sample (1/256 of the tensor): whatever
    they are, the header carries them, the ranks follow them, and the file decodes bit-exactly onto the base."""
    monkeypatch.setattr(codec._BaseClasses, "chunk", 1 << 17)
    n = 600_000
    old = _weights(n, 8)
    old[::997] = 0x0001  # a thin tail of subnormals, spread: pooled or not depending on the estimate
    new = old.copy()
    new[np.random.default_rng(9).random(n) < 0.03] += np.uint16(1)
    pos, new_at, old_at, base = diff_bits(new, old, context=True)
    lo, hi = base.precoded.tensor.params["p"]
    counts = np.bincount((old >> 7) & 0xFF, minlength=256)
    exact = codec._pooling_bounds(counts, n)
    assert abs(lo - exact[0]) <= 1 and abs(hi - exact[1]) <= 1  # a 1/256 sample lands at or next to them
    enc = get_encoding("ctx")
    out = enc.encode(pos, new_at, old_at, n, base_context=base)
    assert out.params["p"] == [lo, hi]
    dec = enc.decode(out.arrays, out.params, n, base_context=old)
    np.testing.assert_array_equal(dec.positions, pos)
    np.testing.assert_array_equal(dec.resolve(old[dec.positions]), new_at)


def test_a_failing_chunk_does_not_leave_the_others_waiting(monkeypatch):
    """Each chunk waits for its predecessor's slot: one whose kernel fails must still take its turn, or the later
    chunks already running would wait forever (those not started are cancelled). The failure surfaces; the call
    returns."""
    monkeypatch.setattr(codec._BaseClasses, "chunk", 1000)
    old = _weights(8000, 1)
    new = old ^ np.uint16(1)
    kernels = codec._kernels()
    real = kernels.diff_bits
    calls = []

    def failing(new_c, old_c, offset, *out):
        calls.append(offset)
        if offset == 3000:
            raise RuntimeError("kernel failed")
        return real(new_c, old_c, offset, *out)

    monkeypatch.setattr(kernels, "diff_bits", failing)
    with pytest.raises(RuntimeError, match="kernel failed"):
        diff_bits(new, old)
    assert 3000 in calls
    monkeypatch.setattr(kernels, "diff_bits", real)
    pos, *_ = diff_bits(new, old)  # the pool is not left waiting: the next call runs
    assert pos.size > 0
