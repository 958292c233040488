"""Every encoding round-trips bit-exactly, for any shape, density and bit pattern (property tests)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dws_testing import rice_reference
from shared import codec
from shared.codec import ENCODINGS, StreamedTensor, get_encoding, rice_decode, rice_encode
from shared.errors import FormatError
from shared.formats import TensorChange, bits, encode_delta, read_patch_file

# bf16 bit patterns chosen to hurt: +-0, the smallest/largest subnormals, +-1, max finite, +-inf, NaNs.
ADVERSARIAL = np.array([0x0000, 0x8000, 0x0001, 0x807F, 0x007F, 0x3F80, 0xBF80, 0x7F7F, 0xFF7F, 0x7F80, 0xFF80,
                        0x7FC0, 0xFFFF, 0x7F81], dtype=np.uint16)

shapes = st.one_of(st.just(()), st.just((1,)), st.just((0,)), st.just((0, 4)),
                   st.lists(st.integers(1, 9), min_size=1, max_size=3).map(tuple))


@st.composite
def tensor_changes(draw):
    shape = draw(shapes)
    numel = int(np.prod(shape))
    density = draw(st.sampled_from([0.0, 0.001, 0.05, 0.5, 0.99, 1.0]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    base = rng.choice(ADVERSARIAL, numel) if draw(st.booleans()) else rng.integers(0, 2**16, numel, dtype=np.uint16)
    mask = rng.random(numel) < density
    if density == 1.0:
        mask[:] = True
    positions = np.flatnonzero(mask).astype(np.int64)
    style = draw(st.sampled_from(["ulp", "random", "adversarial", "far"]))
    new = base.copy()
    if style == "far":  # residuals of every magnitude bucket, up to 0x8000 (the one int16 without a positive twin)
        new[positions] = base[positions] + rng.choice(np.array([3, 4, 7, 8, 255, 256, 4097, 32767, 32768, 32769],
                                                               np.uint16), positions.size)
    elif style == "ulp":
        new[positions] = base[positions] + rng.choice(np.array([1, 2, 65535, 65534], np.uint16), positions.size)
    elif style == "random":
        new[positions] = rng.integers(0, 2**16, positions.size, dtype=np.uint16)
    else:
        new[positions] = rng.choice(ADVERSARIAL, positions.size)
    keep = new[positions] != base[positions]  # a "change" that rewrites the same bits is not a change
    return shape, base, new, positions[keep]


@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=tensor_changes())
def test_encoding_roundtrip_is_bit_exact(encoding, case):
    shape, base, new, positions = case
    numel = int(np.prod(shape))
    enc = get_encoding(encoding)
    ctx = base if enc.needs_base_context else None
    out = enc.encode(positions, new[positions], base[positions], numel, base_context=ctx)
    dec = enc.decode(out.arrays, out.params, numel, base_context=ctx)
    assert np.array_equal(dec.positions, positions)
    got = dec.resolve(base[dec.positions] if dec.needs_base else None)
    assert got.dtype == np.uint16 and np.array_equal(got, new[positions])


@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(cases=st.lists(tensor_changes(), min_size=1, max_size=4))
def test_delta_file_roundtrip(tmp_path, encoding, cases):
    changes, bases, news = {}, {}, {}
    for i, (shape, base, new, positions) in enumerate(cases):
        name = f"model.layers.{i}.weight"
        changes[name] = TensorChange(shape, positions, new[positions], base[positions], base=base)
        bases[name], news[name] = base, new
    path = tmp_path / "d.safetensors"
    path.write_bytes(encode_delta(changes, version=7, base=6, total=sum(b.size for b in bases.values()),
                                  encoding=encoding))
    pf = read_patch_file(path)
    assert (pf.kind, pf.version, pf.base, pf.encoding) == ("delta", 7, 6, encoding)
    expected = {n for n, c in changes.items() if c.positions.size}
    assert set(pf.tensors) == expected
    for name in expected:
        dec = pf.tensors[name]
        if dec.needs_base_context:
            dec = dec.decode(bases[name])
        rebuilt = bases[name].copy()
        rebuilt[dec.positions] = dec.resolve(bases[name][dec.positions] if dec.needs_base else None)
        assert np.array_equal(rebuilt, news[name])
        assert pf.shapes[name] == tuple(changes[name].shape)


def test_rice_streams_roundtrip_extremes():
    # (The encoder picks k to minimise size, so the unary stream stays below numel / 2**k bits.)
    for gaps, ks in ((np.zeros(1000, np.uint64), (0, 1, 7)), (np.array([2**40, 0, 5], np.uint64), (36, 41, 62)),
                     (np.arange(300, dtype=np.uint64), (0, 3, 9))):
        for k in ks:
            u, r = rice_encode(gaps, k)
            assert np.array_equal(rice_decode(u, r, gaps.size, k), gaps)


@pytest.mark.parametrize("k", [0, 1, 3, 9, 31, 57, 62])
@pytest.mark.parametrize("n", [0, 1, 7, 64, 65, 1000])
def test_rice_encode_writes_the_rice_code_by_definition(k, n):
    """The word-at-a-time writer against the numpy definition: remainders straddling words, quotients of 64 zeros
    and more (k = 0 with wide gaps), the last partial byte of both streams."""
    rng = np.random.default_rng(n * 100 + k)
    gaps = rng.integers(0, min(1 << min(k + 3, 62), (1 << 62) // max(n, 1)), n)  # their sum stays below 2**62
    if n and k == 0:
        gaps[: n // 2] = rng.integers(0, 300, n // 2)  # unary runs across whole words
    values = np.cumsum(gaps + 1) - 1
    for got, want in zip(rice_encode(values, k, from_sorted=True), rice_reference(values, k)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("positions", [[5, 3, 9], [3, 3, 9], [-1, 3, 9], [3, 9, 100]])
def test_compact_refuses_positions_that_are_not_sorted_unique_and_inside(positions):
    """The Rice writer sizes its streams from the gaps: unsorted, repeated or negative positions would make it write
    outside them, so they are refused (as are positions past the tensor) with a clear error."""
    pos = np.array(positions, np.int64)
    new, base = np.full(3, 0x3C01, np.uint16), np.full(3, 0x3C00, np.uint16)
    with pytest.raises(ValueError, match="sorted"):
        get_encoding("compact").encode(pos, new, base, 100)
    with pytest.raises(ValueError, match="sorted"):
        rice_encode(pos, 2, from_sorted=True) if positions[-1] < 100 else rice_encode(np.array([-1]), 0)


def test_compact_residual_streams_match_their_definition():
    """The compact encoder's one-pass residual kernel writes the streams numpy's expressions defined: sign bits,
    the |residual| > 1 bitmap, |residual| - 2 one byte wide or (any above 255) two, low bytes first."""
    base = np.array([0x3C00, 0x0000, 0x8000, 0x7F80, 0x0001, 0x3C00, 0x1234, 0xFFFF], np.uint16)
    for steps in ([1, -1, 2, -2, 3, 255, 257, -258], [1, -1, 1, 1, -1, 1, -1, 1], [32767, -32768, 1, 2, 5, -9, 1, 1]):
        new = (base.astype(np.int64) + steps).astype(np.uint16)
        pos = np.arange(base.size, dtype=np.int64) * 3
        out = get_encoding("compact").encode(pos, new, base, 100)
        residual = (new - base).view(np.int16).astype(np.int32)
        mag = np.abs(residual)
        extra = (mag[mag > 1] - 2).astype(np.uint16)
        width = 1 if extra.size == 0 or int(extra.max()) < 256 else 2
        extra_bytes = extra.astype(np.uint8) if width == 1 else extra.view(np.uint8).reshape(-1, 2).T.reshape(-1)
        u, r = out.params["u"], out.params["r"]
        blob = out.arrays[""]
        np.testing.assert_array_equal(blob[u + r: u + r + 1], np.packbits(residual < 0))
        tail = zstandard.ZstdDecompressor().decompress(blob[u + r + 1:].tobytes())
        assert tail == np.packbits(mag > 1).tobytes() + extra_bytes.tobytes() and out.params["w"] == width
        dec = get_encoding("compact").decode(out.arrays, out.params, 100)
        np.testing.assert_array_equal(dec.resolve(base), new)
    with pytest.raises(ValueError, match="residual of 0"):
        get_encoding("compact").encode(pos, base, base, 100)
    with pytest.raises(ValueError, match="same length"):
        get_encoding("compact").encode(pos, new[:-1], base, 100)


def test_compact_rejects_out_of_range_positions():
    enc = get_encoding("compact")
    out = enc.encode(np.array([3, 9]), np.array([1, 2], np.uint16), np.array([0, 0], np.uint16), 10)
    with pytest.raises(FormatError, match="out of range"):
        enc.decode(out.arrays, out.params, 9)  # same stream, a smaller tensor: position 9 no longer fits


def test_compact_rejects_truncated_payload():
    enc = get_encoding("compact")
    pos = np.arange(0, 1000, 3)
    out = enc.encode(pos, np.ones(pos.size, np.uint16), np.zeros(pos.size, np.uint16), 1000)
    arrays = {"": out.arrays[""][:-5]}
    with pytest.raises(FormatError):
        enc.decode(arrays, out.params, 1000)


def test_raw_rejects_unsorted_and_wrong_dtype():
    enc = get_encoding("raw")
    with pytest.raises(FormatError, match="increasing"):
        enc.decode({"indices": np.array([5, 2], np.int32), "values": np.zeros(2, np.uint16)}, {}, 10)
    with pytest.raises(FormatError, match="int32"):
        enc.decode({"indices": np.array([1.0, 2.0]), "values": np.zeros(2, np.uint16)}, {}, 10)


def test_unknown_encoding_is_a_clear_error():
    with pytest.raises(FormatError, match="unknown delta encoding 'zip'"):
        get_encoding("zip")


def test_compact_is_much_smaller_than_raw_on_ulp_changes():
    rng = np.random.default_rng(1)
    numel = 200_000
    base = torch.randn(numel).mul(0.02).to(torch.bfloat16)
    pos = np.flatnonzero(rng.random(numel) < 0.01)
    b = bits(base)
    new = b[pos] + rng.choice(np.array([1, 65535], np.uint16), pos.size)
    sizes = {}
    for name in ("raw", "compact", "ctx"):
        out = get_encoding(name).encode(pos, new, b[pos], numel, base_context=b)
        sizes[name] = sum(a.nbytes for a in out.arrays.values()) / pos.size
    assert sizes["raw"] == 6.0
    assert sizes["compact"] < sizes["raw"] / 4
    # Changes drawn uniformly, ignoring the base: context has nothing to find, and ctx pays only its per-class
    # tables (the file writer then keeps compact for such a tensor).
    assert sizes["ctx"] < 1.1 * sizes["compact"]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=tensor_changes())
def test_compact_size_lower_bound_holds(case):
    """The writer skips compact when another encoding is already under this bound: it must never overestimate."""
    shape, base, new, positions = case
    numel = int(np.prod(shape))
    enc = get_encoding("compact")
    out = enc.encode(positions, new[positions], base[positions], numel)
    assert enc.size_lower_bound(positions, numel) <= out.arrays[""].nbytes


@pytest.mark.parametrize("density", [0.01, 0.04, 0.1, 0.5])
def test_compact_size_lower_bound_is_close_for_random_positions(density):
    """The bound is only worth its O(1) if it stays close: for uniformly random positions (geometric gaps) it is
    within 15 % of compact's position streams and sign bits, what a ctx tensor must beat (15-30 % smaller at RL
    densities)."""
    numel = 1 << 20
    positions = np.flatnonzero(np.random.default_rng(7).random(numel) < density)
    k = codec._rice_k(positions, from_sorted=True)
    unary, rem = codec.rice_encode(positions, k, from_sorted=True)
    streams = unary.size + rem.size + (positions.size + 7) // 8
    bound = get_encoding("compact").size_lower_bound(positions, numel)
    assert 0.85 * streams <= bound <= streams


@pytest.mark.parametrize("encoding", ["compact", "raw"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=tensor_changes(), chunk=st.sampled_from([1, 2, 3, 7, 8, 9, 64, 1000, 1 << 19]))
def test_chunked_decode_equals_whole_decode_bit_for_bit(encoding, case, chunk):
    """A replica's gateway decodes slice by slice (StreamedTensor.chunks): every slice boundary -- inside a packed
    byte of the sign/bitmap streams, inside a remainder, after a run of wide residuals -- must resume exactly."""
    shape, base, new, positions = case
    numel = int(np.prod(shape))
    enc = get_encoding(encoding)
    out = enc.encode(positions, new[positions], base[positions], numel)
    whole = enc.decode(out.arrays, out.params, numel)
    parts = list(StreamedTensor(encoding, out.arrays, out.params, numel, positions.size).chunks(chunk))
    assert all(0 < p.count <= chunk for p in parts)
    assert sum(p.count for p in parts) == positions.size
    if not parts:
        return
    got_pos = np.concatenate([p.positions for p in parts])
    assert got_pos.dtype == np.int64 and np.array_equal(got_pos, whole.positions)
    assert np.array_equal(got_pos, positions)
    field = "residual" if whole.needs_base else "values"
    got = np.concatenate([getattr(p, field) for p in parts])
    assert got.dtype == getattr(whole, field).dtype and np.array_equal(got, getattr(whole, field))
    assert np.array_equal(parts[0].resolve(base[parts[0].positions]) if whole.needs_base else parts[0].values,
                          new[parts[0].positions])


@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_chunked_compact_decode_with_wide_gaps(chunk):
    # Rice parameters above 48 take the kernel's bit-by-bit remainder path; positions near 2**52 (numel is an int:
    # nothing of that size is allocated).
    numel = 1 << 53
    positions = np.array([3, 1 << 50, (1 << 50) + 1, 1 << 51, (1 << 52) + 12345, numel - 1], np.int64)
    enc = get_encoding("compact")
    out = enc.encode(positions, np.full(6, 2, np.uint16), np.ones(6, np.uint16), numel)
    assert out.params["k"] > 48
    parts = list(StreamedTensor("compact", out.arrays, out.params, numel, 6).chunks(chunk))
    assert np.array_equal(np.concatenate([p.positions for p in parts]), positions)
    assert np.array_equal(enc.decode(out.arrays, out.params, numel).positions, positions)


def test_chunked_decode_refuses_what_the_whole_decode_refuses():
    enc = get_encoding("compact")
    pos = np.arange(0, 5000, 3)
    out = enc.encode(pos, np.ones(pos.size, np.uint16), np.zeros(pos.size, np.uint16), 5000)
    bad = {"": out.arrays[""][:-5]}
    with pytest.raises(FormatError):
        list(StreamedTensor("compact", bad, out.params, 5000, pos.size).chunks(100))
    with pytest.raises(FormatError, match="out of range"):  # the last slice's position no longer fits
        list(StreamedTensor("compact", out.arrays, out.params, 4998, pos.size).chunks(100))
    with pytest.raises(FormatError, match="header says"):  # a count that does not match the stream
        list(StreamedTensor("compact", out.arrays, out.params, 5000, pos.size + 1).chunks(100))
    raw = get_encoding("raw").encode(pos, np.ones(pos.size, np.uint16), None, 5000)
    unsorted = dict(raw.arrays, indices=raw.arrays["indices"][::-1].copy())
    with pytest.raises(FormatError, match="increasing"):
        list(StreamedTensor("raw", unsorted, {}, 5000, pos.size).chunks(100))
    swapped = dict(raw.arrays, indices=np.concatenate([raw.arrays["indices"][100:200], raw.arrays["indices"][:100]]),
                   values=raw.arrays["values"][:200])
    with pytest.raises(FormatError, match="increasing"):  # each slice sorted, the boundary not
        list(StreamedTensor("raw", swapped, {}, 5000, 200).chunks(100))
