"""The ctx encoder's fused passes write exactly the files of the per-class passes they replaced.

Two paths write a ctx tensor. Given the base alone, `ContextEncoding.encode` ranks the changed elements class-major
(`class_ranks`), makes the sign bits, bucket bytes and extra bits in one pass (`residual_streams`) and codes every
class's positions in one call (`rice_classes`). Given the detection's `BaseBits`, the tensor was already encoded
while it was read: each chunk coded its part of every stream (`coded_out`) with Rice parameters and modes chosen
from the detection's sample, and the last chunk joined them (`assemble_classes`). These tests rebuild each tensor's
payload and params from the *definitions* -- ranks counted per element with numpy, the class-major order a stable
argsort, then the kernels the old encoder called one class at a time (`complement`, `_rice_k`'s float formula or
the detection's choices from the header, the Rice code's definition (`rice_reference`), `residual_symbols`,
`split_symbols`, `pack_low_bits`) -- and require the same bytes through both paths, for adversarial bit patterns,
every residual bucket, one element, all changed and several chunks. Also: a delta file does not depend on how many
threads wrote it, and tensors coded on several threads at once each get their own result.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dws_testing import rice_reference
from shared import codec, codec_coder
from shared import codec_kernels as K
from shared.codec import BaseBits, _BaseClasses, _rice_k, diff_bits, get_encoding
from shared.formats import TensorChange, diff_state, encode_delta

# bf16 bit patterns chosen to hurt: +-0, subnormals, +-1, max finite, +-inf, NaNs.
ADVERSARIAL = np.array([0x0000, 0x8000, 0x0001, 0x807F, 0x007F, 0x3F80, 0xBF80, 0x7F7F, 0xFF7F, 0x7F80, 0xFF80,
                        0x7FC0, 0xFFFF, 0x7F81], dtype=np.uint16)
# Residuals of every magnitude bucket (1, 2, 3, then [2**w, 2**(w+1)) up to 0x8000) and both signs.
STEPS = np.array([1, 2, 3, 4, 7, 8, 255, 256, 4097, 32767, 32768, 32769, 65535, 65534, 65533, 65532], np.uint16)


def _weights(n: int, rng: np.random.Generator, std: float) -> np.ndarray:
    x = rng.normal(0, std, n).astype(np.float32)
    return (x.view(np.uint32) >> 16).astype(np.uint16)


@st.composite
def changes(draw):
    n = draw(st.sampled_from([1, 2, 63, 64, 65, 1000, 4096 + 37, 20_000]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["weights", "tiny-weights", "adversarial", "random"]))
    if kind == "weights":
        base = _weights(n, rng, 0.02)
    elif kind == "tiny-weights":  # subnormal-heavy: many exponent classes, pooled tails on both sides
        base = _weights(n, rng, 1e-38)
    elif kind == "adversarial":
        base = rng.choice(ADVERSARIAL, n)
    else:
        base = rng.integers(0, 2**16, n, dtype=np.uint16)
    density = draw(st.sampled_from([0.001, 0.04, 0.3, 0.6, 0.99, 1.0]))
    mask = rng.random(n) < density
    mask[rng.integers(0, n)] = True  # at least one change
    if density == 1.0:
        mask[:] = True
    pos = np.flatnonzero(mask)
    steps = STEPS if draw(st.booleans()) else STEPS[[0, 12]]  # every bucket, or one-ulp moves only
    new = base.copy()
    new[pos] = base[pos] + rng.choice(steps, pos.size)
    return base, new


def reference_encode(positions: np.ndarray, new_at: np.ndarray, base_at: np.ndarray, base: np.ndarray, *,
                     bounds: tuple[int, int] | None = None, choices: dict[int, tuple[int, int]] | None = None):
    """(payload, params) of a ctx tensor from the definitions, through the per-class kernels the encoder used to
    call (residual coder "zstd"). `bounds` and `choices` (class -> (mode, k)) stand for the encoder's own pooling
    and Rice choices (the detection makes them from its sample); by default the base's bounds, and per class the
    rarer of changed and unchanged ranks with `_rice_k`'s parameter."""
    numel = base.size
    classes = _BaseClasses(base, numel)
    lo, hi = bounds or classes.pooling_bounds(numel)
    classes.pool(lo, hi)
    cls_all = np.clip((base.astype(np.int64) >> 7) & 0xFF, lo, hi)
    rank_all = np.empty(numel, np.int64)
    for c in np.unique(cls_all):
        at = np.flatnonzero(cls_all == c)
        rank_all[at] = np.arange(at.size)
    cls, rank = cls_all[positions], rank_all[positions]
    residual = (new_at - base_at).view(np.int16)
    order = np.argsort(cls, kind="stable")
    rank_cm, res_cm = rank[order], residual[order]
    starts = np.concatenate([[0], np.cumsum(np.bincount(cls, minlength=256))])
    sym, hist = np.empty(positions.size, np.int32), np.zeros((256, 34), np.int64)
    assert K.residual_symbols(starts, res_cm, sym, hist) == 0
    extra = K.pack_low_bits(sym, res_cm)
    rows, streams = [], []
    for c in np.flatnonzero(np.diff(starts)):
        a, b = starts[c], starts[c + 1]
        n_c, k_c = int(classes.counts[c]), int(b - a)
        if k_c == n_c:
            rows.append([int(c), n_c, k_c, 2, 0, 0, 0])
            continue
        mode = (1 if 2 * k_c > n_c else 0) if choices is None else choices[int(c)][0]
        coded = K.complement(rank_cm[a:b], n_c) if mode == 1 else rank_cm[a:b]
        k = _rice_k(coded, from_sorted=True) if choices is None else choices[int(c)][1]
        unary, rem = rice_reference(coded, k)
        rows.append([int(c), n_c, k_c, mode, k, int(unary.size), int(rem.size)])
        streams += [unary, rem]
    signs, buckets = np.zeros((sym.size + 7) // 8, np.uint8), np.empty(sym.size, np.uint8)
    codec_coder.split_symbols(sym, signs, buckets)
    frame = zstandard.ZstdCompressor(level=1, write_content_size=False, write_checksum=False).compress(buckets.data)
    params = {"n": int(positions.size), "x": int(extra.size), "p": [lo, hi], "c": rows, "r": "zstd",
              "z": len(frame)}
    return np.concatenate([*streams, signs, np.frombuffer(frame, np.uint8), extra]), params


def _same_as_detected(out, positions, new_at, base_at, base) -> None:
    """`out` (a tensor the detection encoded) is the definitions' tensor under its own header's bounds, per-class
    modes and Rice parameters."""
    choices = {c: (mode, k) for c, n_c, k_c, mode, k, *_ in out.params["c"] if mode != 2}
    _same(out, reference_encode(positions, new_at, base_at, base, bounds=tuple(out.params["p"]), choices=choices))


def _same(out, ref) -> None:
    payload, params = ref
    # The key order too: params go into the file header as JSON.
    assert json.dumps(out.params) == json.dumps(params)
    np.testing.assert_array_equal(out.arrays[""], payload)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=changes(), chunk=st.sampled_from([1 << 20, 64, 1000]))
def test_fused_encoder_writes_the_bytes_of_the_per_class_passes(case, chunk):
    base, new = case
    saved = _BaseClasses.chunk
    _BaseClasses.chunk = chunk  # several chunks: ranks that continue across them
    try:
        enc = get_encoding("ctx")
        positions, new_at, old_at, ctx = diff_bits(new, base, context=True)  # the detection coded them
        # The base alone (no pieces from the detection): the chunked class_ranks path, positions checked.
        _same(enc.encode(positions.copy(), new_at, old_at, base.size, base_context=base),
              reference_encode(positions, new_at, old_at, base))
        # The detection's pieces, joined: the same definitions under the bounds, modes and Rice parameters its
        # sample chose (in its header).
        out = enc.encode(positions, new_at, old_at, base.size, base_context=ctx)
        assert isinstance(ctx, BaseBits) and out is ctx.precoded.tensor
        _same_as_detected(out, positions, new_at, old_at, base)
    finally:
        _BaseClasses.chunk = saved


def test_ranks_of_other_positions_are_not_trusted():
    """Positions that are not the detection's own array are checked (and re-ranked), even with its ranks at hand."""
    rng = np.random.default_rng(4)
    base = _weights(5000, rng, 0.02)
    new = base.copy()
    new[::7] += 1
    positions, new_at, old_at, ctx = diff_bits(new, base, context=True)
    enc = get_encoding("ctx")
    with pytest.raises(ValueError, match="sorted, unique"):
        enc.encode(positions[::-1].copy(), new_at, old_at, base.size, base_context=ctx)
    with pytest.raises(ValueError, match="residual of 0"):
        enc.encode(positions, old_at, old_at, base.size, base_context=ctx)


def test_tensors_coded_on_several_threads_at_once_each_get_their_own_result():
    """The kernels run without the GIL on the encode pool's threads: no state may be shared between two encodes,
    and a returned payload must not change when later tensors are coded."""
    rng = np.random.default_rng(9)
    enc = get_encoding("ctx")
    tensors = []
    for n, density in ((200_000, 0.1), (5000, 0.5), (70_000, 0.02), (100, 1.0)):
        base = _weights(n, rng, 0.02)
        new = base.copy()
        at = np.flatnonzero(rng.random(n) < density)
        new[at] += rng.choice(STEPS, at.size)
        tensors.append((base, new))

    def encode(t):
        base, new = t
        positions, new_at, old_at, ctx = diff_bits(new, base, context=True)
        return enc.encode(positions, new_at, old_at, base.size, base_context=ctx)

    first = [encode(t) for t in tensors]
    kept = [o.arrays[""].copy() for o in first]
    with ThreadPoolExecutor(3) as pool:
        again = list(pool.map(encode, tensors * 3))
    for i, out in enumerate(again):
        np.testing.assert_array_equal(out.arrays[""], kept[i % len(tensors)])
    for out, payload in zip(first, kept):
        np.testing.assert_array_equal(out.arrays[""], payload)


def _parts(blob: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8: 8 + n]), blob[8 + n:]  # (safetensors orders the metadata keys at random)


@pytest.mark.parametrize("encoding", ["ctx", "compact"])
def test_delta_file_does_not_depend_on_the_number_of_threads(encoding):
    """Tensors are detected and coded largest first on a pool; the file keeps their sorted order."""
    rng = np.random.default_rng(2)
    new, old = {}, {}
    for name, n in (("a.small", 300), ("b.big", 300_000), ("c.mid", 40_000), ("d.same", 500), ("z.embed", 600_000)):
        old[name] = _weights(n, rng, 0.02)
        new[name] = old[name].copy()
        if name != "d.same":
            at = np.flatnonzero(rng.random(n) < 0.05)
            new[name][at] += rng.choice(STEPS[:3], at.size)
    total = sum(t.size for t in new.values())
    files = []
    for workers in (1, 2, 4):
        ch = diff_state(new, old, encoding=encoding)
        assert list(ch) == ["a.small", "b.big", "c.mid", "z.embed"]  # new's order, unchanged tensors left out
        files.append(_parts(encode_delta(ch, version=2, base=1, total=total, encoding=encoding, workers=workers)))
    assert files[0] == files[1] == files[2]
    assert list(json.loads(files[0][0]["__metadata__"]["tensors"])) == ["a.small", "b.big", "c.mid", "z.embed"]


def test_one_changed_element_and_a_whole_changed_tensor():
    rng = np.random.default_rng(5)
    enc = get_encoding("ctx")
    for n in (1, 64, 4096):
        base = _weights(n, rng, 0.02)
        for new in (base + np.uint16(1), np.where(np.arange(n) == n - 1, base + np.uint16(3), base).astype(np.uint16)):
            ch = TensorChange.between((n,), new, base, encoding="ctx")
            out = enc.encode(ch.positions, ch.new_bits, ch.base_bits, n, base_context=ch.base)
            _same_as_detected(out, ch.positions, ch.new_bits, ch.base_bits, base)
            dec = enc.decode(out.arrays, out.params, n, base_context=base)
            np.testing.assert_array_equal(dec.positions, ch.positions)
            np.testing.assert_array_equal(dec.resolve(ch.base_bits), ch.new_bits)


def test_every_residual_coder_still_round_trips(monkeypatch):
    """The first coder ("range") now computes its own symbols from the class-major residuals."""
    monkeypatch.setattr(codec.ContextEncoding, "coder", "range")
    rng = np.random.default_rng(6)
    base = _weights(30_000, rng, 0.02)
    new = base.copy()
    at = np.flatnonzero(rng.random(base.size) < 0.1)
    new[at] += rng.choice(STEPS, at.size)
    ch = TensorChange.between((base.size,), new, base, encoding="ctx")
    enc = get_encoding("ctx")
    out = enc.encode(ch.positions, ch.new_bits, ch.base_bits, base.size, base_context=ch.base)
    assert "r" not in out.params and len(out.params["c"][0]) == 9
    dec = enc.decode(out.arrays, out.params, base.size, base_context=base)
    np.testing.assert_array_equal(dec.positions, ch.positions)
    np.testing.assert_array_equal(dec.resolve(ch.base_bits), ch.new_bits)
