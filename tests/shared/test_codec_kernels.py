"""The ctx kernels' vector blocks (shared.codec_kernels) against plain numpy definitions of what they compute.

The kernels count exponent classes 64 elements at a time (class masks, popcounts, a per-element tail for the last
partial block); these tests pin their outputs to the obvious per-element definitions on inputs built to hit the block
machinery's edges: sizes that are not a multiple of 64, changes and wanted elements at block boundaries, one class
holding everything, empty inputs, ranks that do not fit the base, and a class table that is not the pooling clamp.
The last test reruns this file in a fresh process with numba compiling for CPUs without AVX-512 (AVX2: haswell) and
without AVX at all (plain x86-64), where LLVM lowers the same vector IR to other instructions.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import pytest

from dws_testing import rice_reference
from shared import codec
from shared import codec_kernels as K

W = 64  # the kernels' block


def weights(n: int, seed: int, *, std: float = 0.02) -> np.ndarray:
    """bf16 bit patterns of N(0, std) weights (what the codec sees), as uint16."""
    x = np.random.default_rng(seed).normal(0, std, n).astype(np.float32)
    return (x.view(np.uint32) >> 16).astype(np.uint16)


def clamp_table(lo: int, hi: int) -> np.ndarray:
    return np.clip(np.arange(256), lo, hi).astype(np.uint8)


def classes(b: np.ndarray, lo: int, hi: int) -> np.ndarray:
    return np.clip((b.astype(np.int64) >> 7) & 0xFF, lo, hi)


def ranks_in_class(cls: np.ndarray) -> np.ndarray:
    """Each element's rank among the elements of its class before it (the definition the ctx encoding uses)."""
    rank = np.empty(cls.size, np.int64)
    for c in np.unique(cls):
        at = np.flatnonzero(cls == c)
        rank[at] = np.arange(at.size)
    return rank


def bases() -> list[tuple[str, np.ndarray, int, int]]:
    """(name, base bits, lo, hi): sizes around whole blocks, one class only, a wide pooled range, raw exponents."""
    out = []
    for n in (0, 1, 63, 64, 65, 127, 128, 1000, 4096 + 37):
        b = weights(n, n)
        out.append((f"weights{n}", b, 112, 121))
    b = weights(3001, 7)
    out.append(("one-class", b, 0, 0))  # lo == hi: every element in class 0
    out.append(("one-class-hi", b, 255, 255))
    out.append(("unpooled", b, 0, 255))
    out.append(("wide", np.random.default_rng(3).integers(0, 1 << 16, 2 * W * 9 + 5).astype(np.uint16), 40, 200))
    # The top classes: block counting runs past class 255 (its compare constants wrap to small classes, never present)
    out.append(("top", np.random.default_rng(4).integers(0, 1 << 16, 2 * W * 9 + 5).astype(np.uint16), 245, 255))
    return out


BASES = bases()
IDS = [name for name, *_ in BASES]


def changed_at(n: int, seed: int, density: float) -> np.ndarray:
    """Sorted unique positions: random ones plus every block edge (0, 63, 64, 127, ...) that exists."""
    rng = np.random.default_rng(seed)
    edges = np.array([e for s in range(0, n, W) for e in (s, s + W - 1)], np.int64)
    pos = np.concatenate([np.flatnonzero(rng.random(n) < density), edges[edges < n]])
    return np.unique(pos)


# ------------------------------------------------------------------------------------------------------ encode side
@pytest.mark.parametrize("name,b,lo,hi", BASES, ids=IDS)
@pytest.mark.parametrize("density", [0.0, 0.04, 1.0])
@pytest.mark.parametrize("rank_dtype", [np.int64, np.int32])  # int32: what codec's detection passes below 2**31
def test_diff_ranks_matches_per_element_definition(name, b, lo, hi, density, rank_dtype):
    n = b.size
    pos = changed_at(n, 11, density) if density < 1 else np.arange(n)
    new = b.copy()
    new[pos] ^= np.uint16(1)  # flip the low mantissa bit: always a change
    start = np.random.default_rng(5).integers(0, 1000, 256)  # class elements in earlier chunks
    counts = start.copy()  # in: the ranks' base; out: plus this chunk's class sizes
    cls = classes(b, lo, hi)
    out = [np.full(n, -7, np.int64), np.zeros(n, np.uint16), np.zeros(n, np.uint16), np.zeros(n, np.uint8),
           np.full(n, -7, rank_dtype)]
    k = K.diff_ranks(new, b, 1000, clamp_table(lo, hi), counts, *out)
    assert k == pos.size
    np.testing.assert_array_equal(out[0][:k], pos + 1000)
    np.testing.assert_array_equal(out[1][:k], new[pos])
    np.testing.assert_array_equal(out[2][:k], b[pos])
    np.testing.assert_array_equal(out[3][:k], cls[pos])
    np.testing.assert_array_equal(out[4][:k], start[cls[pos]] + ranks_in_class(cls)[pos])
    np.testing.assert_array_equal(counts, start + np.bincount(cls, minlength=256))


def test_diff_ranks_refuses_counts_it_cannot_store_into():
    """The class counts are a detection chunk's row of 256 int64: anything else is refused, not half-read."""
    b = weights(300, 3)
    outs = [np.zeros(300, t) for t in (np.int64, np.uint16, np.uint16, np.uint8, np.int32)]
    for counts in (np.zeros(256, np.int32), np.zeros(255, np.int64), np.zeros(512, np.int64)[::2]):
        with pytest.raises(ValueError, match="256 contiguous int64"):
            K.diff_ranks(b ^ np.uint16(1), b, 0, clamp_table(110, 125), counts, *outs)


@pytest.mark.parametrize("off", [0, 1, 2, 3, 4, 5])
@pytest.mark.parametrize("k", [0, 1, 3, 4, 5, 8, 9, 103])
def test_changes_out_streams_every_element_into_its_slot(off, k):
    """The detection's copy-out (both encodings) in streaming stores: positions one by one, the uint16 arrays four at
    a time from the first multiple of 4 -- every offset and length around those edges, nothing written outside the
    slot; a slot past the outputs' end, or a strided output (streamed stores would land between its elements), is
    refused."""
    rng = np.random.default_rng(off * 100 + k)
    src = [rng.integers(0, 2**40, k), rng.integers(0, 2**16, k).astype(np.uint16),
           rng.integers(0, 2**16, k).astype(np.uint16)]
    n = off + k + 7
    out = [np.full(n, -5, np.int64), np.full(n, 0xBEEF, np.uint16), np.full(n, 0xCAFE, np.uint16)]
    K.changes_out(*src, off, *out)
    for got, want, fill in zip(out, src, (-5, 0xBEEF, 0xCAFE)):
        np.testing.assert_array_equal(got[off: off + k], want)
        assert (got[:off] == fill).all() and (got[off + k:] == fill).all()
    with pytest.raises(ValueError, match="does not fit its slot"):
        K.changes_out(*src, n - k + 1, *out)
    with pytest.raises(ValueError, match="contiguous"):
        K.changes_out(*src, 0, np.zeros(2 * n, np.int64)[::2], *out[1:])


def coded_reference(b: np.ndarray, new: np.ndarray, lo: int, hi: int, ks: np.ndarray, modes: np.ndarray):
    """A ctx tensor's (rows, position streams, signs, buckets, extra) from the definitions: ranks per element, the
    class-major order a stable argsort, each class's changed ranks (mode 0) or the others (mode 1; nothing when all
    changed) Rice-coded with ks[c] (`rice_reference`), the residual streams of the class-major residuals."""
    cls = classes(b, lo, hi)
    pos = np.flatnonzero(new != b)
    rank = ranks_in_class(cls)
    rows, streams = [], []
    for c in np.unique(cls[pos]):
        members = np.flatnonzero(cls == c)
        changed = rank[pos[cls[pos] == c]]
        mode = 2 if changed.size == members.size else int(modes[c])
        coded = changed if mode == 0 else np.setdiff1d(np.arange(members.size), changed)
        k = int(ks[c]) if mode != 2 else 0
        unary, rem = rice_reference(coded, k) if mode != 2 else (np.zeros(0, np.uint8), np.zeros(0, np.uint8))
        rows.append([int(c), members.size, changed.size, mode, k, unary.size, rem.size])
        streams += [unary, rem]
    order = np.argsort(cls[pos], kind="stable")
    res = (new[pos] - b[pos]).view(np.int16)[order]
    n = pos.size
    signs, buckets, extra = np.zeros((n + 7) // 8, np.uint8), np.zeros(n, np.uint8), np.zeros(2 * n + 8, np.uint8)
    x = K.residual_streams(res, np.array([[0, n]], np.int64), signs, buckets, extra)
    return rows, np.concatenate([np.zeros(0, np.uint8), *streams]), signs, buckets, extra[:x]


@pytest.mark.parametrize("name,b,lo,hi", BASES, ids=IDS)
@pytest.mark.parametrize("density", [0.0, 0.2, 0.7, 1.0])
def test_coded_chunks_assemble_into_the_whole_tensors_streams(name, b, lo, hi, density):
    """The ctx detection's one pass, cut in chunks: each chunk ranked locally (`diff_ranks` from zero counts), copied
    to its slot and coded class by class into pieces (`coded_out`: the Rice codes after each piece's first rank,
    its residuals' streams), the pieces joined (`assemble_classes`) -- the changes in position order, and exactly the
    streams of the whole tensor's definitions, for either mode and any Rice parameter, in classes cut anywhere."""
    n = b.size
    pos = changed_at(n, 21, density) if density < 1 else np.arange(n)
    new = b.copy()
    new[pos] += np.uint16(3)  # wraps at 0xFFFF ("wide"): residual 3 either way
    new[pos[::5]] -= np.uint16(700)
    table = clamp_table(lo, hi)
    rng = np.random.default_rng(n)
    ks, modes = rng.integers(0, 12, 256), rng.integers(0, 2, 256)
    cuts = sorted({0, min(64, n), min(65, n), max(65, n // 2) if n > 65 else n, n})  # one element, uneven ones
    m = pos.size
    outs = [np.full(m, -1, np.int64), np.zeros(m, np.uint16), np.zeros(m, np.uint16)]
    metas = np.zeros((len(cuts) - 1, 256, K.P_FIELDS), np.int64)
    sizes = np.zeros((len(cuts) - 1, 256), np.int64)
    pieces, off = [], 0
    for i, (s, e) in enumerate(zip(cuts[:-1], cuts[1:])):
        scratch = [np.zeros(e - s, t) for t in (np.int64, np.uint16, np.uint16, np.uint8, np.int32, np.int32,
                                                  np.int16, np.int32)]
        k = K.diff_ranks(new[s:e], b[s:e], s, table, sizes[i], *scratch[:5])
        pieces.append(K.coded_out(*(a[:k] for a in scratch[1:5]), sizes[i], ks, modes, *scratch[5:], metas[i]))
        K.changes_out(*(a[:k] for a in scratch[:3]), off, *outs)
        off += k
    assert off == m
    np.testing.assert_array_equal(outs[0], pos)
    np.testing.assert_array_equal(outs[1], new[pos])
    np.testing.assert_array_equal(outs[2], b[pos])
    present = np.flatnonzero(metas[:, :, K.P_CHANGED].sum(axis=0))
    rows = np.empty((present.size, 6), np.int64)
    got = K.assemble_classes(np.array([p.ctypes.data for p in pieces], np.int64), metas, sizes, ks, modes, present,
                             rows)
    want = coded_reference(b, new, lo, hi, ks, modes)
    assert np.column_stack([present, rows]).tolist() == want[0]
    for g, w in zip(got, want[1:]):
        np.testing.assert_array_equal(g, w)


def test_coded_out_refuses_scratch_shorter_than_the_chunk_or_its_complements():
    """It writes its sorted ranks, residuals and complements without bounds checks: arrays shorter than the chunk's
    changes, or a `spare` shorter than a class's elements, are refused before anything is written."""
    scratch = [np.zeros(10, t) for t in (np.uint16, np.uint16, np.uint8, np.int32)]
    sorts = [np.zeros(10, t) for t in (np.int32, np.int16, np.int32)]
    row, meta = np.zeros(256, np.int64), np.zeros((256, K.P_FIELDS), np.int64)
    with pytest.raises(ValueError, match="shorter than its changes"):
        K.coded_out(*scratch[:3], scratch[3][:9], row, row, row, *sorts, meta)
    with pytest.raises(ValueError, match="shorter than its changes"):
        K.coded_out(*scratch, row, row, row, sorts[0][:9], *sorts[1:], meta)
    sizes = row.copy()
    sizes[3] = 11  # more elements than the complements' scratch holds
    with pytest.raises(ValueError, match="spare"):
        K.coded_out(*(a[:0] for a in scratch), sizes, row, row, *sorts, meta)


@pytest.mark.parametrize("density", [0.0, 0.01, 0.3, 0.7, 1.0])
def test_rice_choices_follow_the_sampled_rates(density):
    """Per class: the mode codes the rarer of changed and unchanged ranks, and the Rice parameter is the cheapest
    for geometric gaps at the class's rate -- measured here against the exact Rice size of such gaps."""
    hist, changed = np.zeros(256, np.int64), np.zeros(256, np.int64)
    hist[100:110] = 100_000
    changed[100:110] = (np.linspace(0.2, 1.8, 10) * density * 100_000).clip(0, 100_000).astype(np.int64)
    hist[90], changed[90] = 50, 50  # a pooled tail: counted in class lo
    ks, modes = np.zeros((2, 256), np.int64)
    K.rice_choices(hist, changed, 101, 108, ks, modes)
    assert not ks[:101].any() and not ks[109:].any() and not modes[:101].any() and not modes[109:].any()
    rng = np.random.default_rng(1)
    for c in range(101, 109):
        lo_part = slice(0, 102) if c == 101 else slice(c, c + 1)
        hi_part = slice(108, 256) if c == 108 else slice(c, c + 1)
        part = lo_part if c == 101 else hi_part
        p = (changed[part].sum() + 0.5) / (hist[part].sum() + 1)
        assert modes[c] == (p > 0.5)
        d = min(p, 1 - p)
        if d < 1e-3:
            continue
        flags = rng.random(200_000) < d
        coded = np.flatnonzero(flags)
        size = {k: sum(a.size for a in rice_reference(coded, k)) for k in range(0, 16)}
        assert size[int(ks[c])] <= 1.01 * min(size.values())


@pytest.mark.parametrize("run,stride", [(64, 64), (64, 4096), (1000, 4096), (100, 333), (256, 2048), (1, 7),
                                        (20000, 20000)])
@pytest.mark.parametrize("spread", [False, True], ids=["weights", "any-exponent"])
def test_sample_histogram_changes_reads_a_run_of_every_stride(run, stride, spread):
    """Every run (partial blocks, the partial last run, a run longer than the tensor) counted exactly, exponents
    outside the window placed by the first run included (`spread`: bit patterns with any exponent)."""
    b = weights(3 * 4096 + 100, 5)
    if spread:
        b = np.random.default_rng(3).integers(0, 1 << 16, b.size, dtype=np.uint16)
    new = b.copy()
    new[::3] ^= np.uint16(1)
    idx = np.concatenate([np.arange(j, min(j + run, b.size)) for j in range(0, b.size, stride)])
    out, changed = np.zeros((2, 256), np.int64)
    assert K.sample_histogram_changes(new, b, run, stride, out, changed) == (idx.size,
                                                                             int((new[idx] != b[idx]).sum()))
    np.testing.assert_array_equal(out, np.bincount((b[idx] >> 7) & 0xFF, minlength=256))
    moved = idx[new[idx] != b[idx]]
    np.testing.assert_array_equal(changed, np.bincount((b[moved] >> 7) & 0xFF, minlength=256))


def test_sample_histogram_changes_refuses_a_run_longer_than_its_stride():
    b = weights(1000, 1)
    with pytest.raises(ValueError, match="run <= stride"):
        K.sample_histogram_changes(b, b, 64, 32, np.zeros(256, np.int64), np.zeros(256, np.int64))


@pytest.mark.parametrize("name,b,lo,hi", BASES, ids=IDS)
@pytest.mark.parametrize("density", [0.0, 0.04, 0.5, 1.0])
def test_diff_bits_matches_per_element_definition(name, b, lo, hi, density):
    """The compact detection's block walk: every change (block edges, the partial last block), nothing written past
    the count."""
    n = b.size
    pos = changed_at(n, 12, density) if density < 1 else np.arange(n)
    new = b.copy()
    new[pos] ^= np.uint16(0x8000)  # a sign flip: a change in the top bit of the element
    out = [np.full(n + 1, -7, np.int64), np.full(n + 1, 7, np.uint16), np.full(n + 1, 7, np.uint16)]
    k = K.diff_bits(new, b, 1000, *out)
    assert k == pos.size
    np.testing.assert_array_equal(out[0][:k], pos + 1000)
    np.testing.assert_array_equal(out[1][:k], new[pos])
    np.testing.assert_array_equal(out[2][:k], b[pos])
    assert out[0][k] == -7 and out[1][k] == 7 and out[2][k] == 7


def test_kernels_with_raw_stores_refuse_outputs_shorter_than_their_inputs():
    """diff_bits, diff_ranks and compact_streams store through raw addresses (no bounds checks): they check sizes
    first."""
    b = weights(200, 3)
    new = b ^ np.uint16(1)
    short = [np.zeros(100, t) for t in (np.int64, np.uint16, np.uint16)]
    with pytest.raises(ValueError, match="as long"):
        K.diff_bits(new, b, 0, *short)
    with pytest.raises(ValueError, match="one length"):
        K.diff_bits(new, b[:100], 0, *[np.zeros(200, t) for t in (np.int64, np.uint16, np.uint16)])
    outs = [np.zeros(200, t) for t in (np.int64, np.uint16, np.uint16, np.uint8, np.int64)]
    outs[3] = outs[3][:50]
    with pytest.raises(ValueError, match="as long as pos"):
        K.diff_ranks(new, b, 0, clamp_table(110, 125), np.zeros(256, np.int64), *outs)
    with pytest.raises(ValueError, match="as long"):
        K.compact_streams(new, b, np.zeros(25, np.uint8), np.zeros(25, np.uint8), np.zeros(199, np.uint16))


def test_diff_ranks_with_too_little_room_stops_at_the_end_of_its_outputs():
    b = weights(1000, 1)
    new = b ^ np.uint16(1)  # all 1000 changed
    room = 130  # past two whole blocks
    out = [np.zeros(room + 1, np.int64), np.zeros(room + 1, np.uint16), np.zeros(room + 1, np.uint16),
           np.zeros(room + 1, np.uint8), np.zeros(room + 1, np.int64)]
    guard = [a[room] for a in out]
    assert K.diff_ranks(new, b, 0, clamp_table(110, 125), np.zeros(256, np.int64), *(a[:room] for a in out)) == -1
    # The whole blocks whose changes fit (128), then nothing past the outputs' end.
    np.testing.assert_array_equal(out[0][:128], np.arange(128))
    assert [a[room] for a in out] == guard


@pytest.mark.parametrize("name,b,lo,hi", BASES, ids=IDS)
def test_class_ranks_matches_per_element_definition(name, b, lo, hi):
    n = b.size
    pos = changed_at(n, 12, 0.05)
    residual = np.random.default_rng(1).integers(-300, 300, pos.size).astype(np.int16)
    cls = classes(b, lo, hi)
    start = np.arange(256, dtype=np.int64) * 3
    # class-major slots: class c's changed elements fill slot[c], slot[c] + 1, ... in position order
    counts = np.bincount(cls[pos], minlength=256)
    slot = np.cumsum(counts) - counts + 5
    rank_out, res_out = np.full(pos.size + 5, -1, np.int64), np.zeros(pos.size + 5, np.int16)
    K.class_ranks(b, clamp_table(lo, hi), start, pos, residual, slot.copy(), rank_out, res_out)
    order = np.argsort(cls[pos], kind="stable")
    np.testing.assert_array_equal(rank_out[5:], (start[cls] + ranks_in_class(cls))[pos][order])
    np.testing.assert_array_equal(res_out[5:], residual[order])


@pytest.mark.parametrize("n", [0, 5, 64, 4095, 4096, 4096 + 64 * 3 + 9, 50_000])
@pytest.mark.parametrize("kind", ["weights", "one-exponent", "with-zeros", "wide", "narrow-then-wide"])
def test_exponent_histogram_matches_bincount(n, kind):
    rng = np.random.default_rng(n)
    b = weights(n, n)
    if kind == "one-exponent":
        b = np.full(n, 0x3F80, np.uint16)  # 1.0: a norm's weights
    elif kind == "with-zeros":
        b[rng.random(n) < 0.01] = 0  # exponent 0, far outside the weights' window
    elif kind == "wide":
        b = rng.integers(0, 1 << 16, n).astype(np.uint16)  # every exponent: the per-element path
    elif kind == "narrow-then-wide":
        b[4096:] = rng.integers(0, 1 << 16, max(n - 4096, 0))  # the window fits the sample, not the rest
    out = np.arange(256, dtype=np.int64)  # adds to what is there
    K.exponent_histogram(b, out)
    np.testing.assert_array_equal(out, np.arange(256) + np.bincount((b >> 7) & 0xFF, minlength=256))


# ------------------------------------------------------------------------------------------------------ decode side
def flag_maps(sizes: dict[int, int], ranks: dict[int, np.ndarray]):
    """Flag maps built with numpy (bit r of class c's map set for each r in ranks[c]) in the kernels' layout: class
    after class, (n_c >> 6) + 3 words each, then three zero words. Returns (flags, fbase, end, zero)."""
    fbase, end = np.zeros(256, np.int64), np.full(256, -1, np.int64)
    words = []
    at = 0
    for c, n_c in sizes.items():
        bits = np.zeros(((n_c >> 6) + 3) * 64, np.uint8)
        bits[ranks[c]] = 1
        words.append(np.packbits(bits, bitorder="little").view(np.uint64))
        fbase[c], end[c] = at, 64 * at + n_c
        at += words[-1].size
    flags = np.concatenate([*words, np.zeros(3, np.uint64)])
    return flags, fbase, end, at


def walk(b, lo, hi, start, pos, residual, *, full, offset=100, room=None, sizes=None):
    """flag_positions over part `b` whose class c starts at rank start[c]; changed part positions `pos` (each
    class's maps sized `sizes`, default: start + the part's class sizes); residuals class-major. Returns (count,
    positions, new bits, every class's rank after the walk)."""
    cls = classes(b, lo, hi)
    part_sizes = np.bincount(cls, minlength=256)
    sizes = sizes or {c: int(start[c] + part_sizes[c]) for c in np.unique(cls[pos])}
    ranks = {c: start[c] + ranks_in_class(cls)[pos[cls[pos] == c]] for c in sizes}
    ranks = {c: r[r < sizes[c]] for c, r in ranks.items()}
    flags, fbase, end, zero = flag_maps(sizes, ranks)
    state = np.stack([64 * fbase + start, end], axis=1)
    vstart = np.zeros(256, np.int64)
    counts = np.bincount(cls[pos], minlength=256)
    vstart[:] = np.cumsum(counts) - counts
    m = pos.size if room is None else room
    out_pos, out_new = np.full(m, -1, np.int64), np.zeros(m, np.uint16)
    k = K.flag_positions(b, lo, hi, flags, state, zero, vstart, residual, offset, full, out_pos, out_new)
    return k, out_pos, out_new, state[:, 0] - 64 * fbase


def class_major(b, lo, hi, pos, seed=2):
    """Random residuals for the changed elements, class-major (as the decoder gets them), and the new bits they give
    in position order (base + residual, wrapping in 16 bits: the "wide" base has bit patterns near 0 and 0xFFFF)."""
    cls = classes(b, lo, hi)
    by_position = np.random.default_rng(seed).integers(-1000, 1000, pos.size).astype(np.int16)
    return by_position[np.argsort(cls[pos], kind="stable")], (b[pos] + by_position.view(np.uint16)).astype(np.uint16)


@pytest.mark.parametrize("name,b,lo,hi", BASES, ids=IDS)
@pytest.mark.parametrize("density", [0.0, 0.04, 0.5, 1.0])
@pytest.mark.parametrize("full", [False, True])
def test_flag_walk_finds_the_changed_elements(name, b, lo, hi, density, full):
    pos = changed_at(b.size, 13, density) if density < 1 else np.arange(b.size)
    start = np.random.default_rng(4).integers(0, 130, 256)  # ranks in earlier parts: maps read from any bit
    values, by_position = class_major(b, lo, hi, pos)
    k, got, vals, after = walk(b, lo, hi, start, pos, values, full=full)
    assert k == pos.size
    np.testing.assert_array_equal(got, pos + 100)
    np.testing.assert_array_equal(vals, by_position)
    if full:  # every class advanced by its size in this part, mapped or not
        np.testing.assert_array_equal(after - start, np.bincount(classes(b, lo, hi), minlength=256))


@pytest.mark.parametrize("case", ["map-too-short", "map-too-long", "no-room"])
def test_flag_walk_stays_inside_maps_and_outputs_when_they_do_not_fit(case):
    b, lo, hi = weights(5000, 9), 112, 121
    cls = classes(b, lo, hi)
    pos = changed_at(b.size, 14, 0.03)
    start = np.zeros(256, np.int64)
    values, by_position = class_major(b, lo, hi, pos)
    big = int(np.argmax(np.bincount(cls, minlength=256)))
    sizes = {int(c): int((cls == c).sum()) for c in np.unique(cls[pos])}
    if case == "map-too-short":  # the base has more class elements than the header said: past the map reads zeros
        sizes[big] -= 200
        lost = (cls[pos] == big) & (ranks_in_class(cls)[pos] >= sizes[big])
        k, got, vals, _ = walk(b, lo, hi, start, pos, values, full=True, sizes=sizes)
        assert 0 < k == pos.size - int(lost.sum())
        np.testing.assert_array_equal(got[:k], pos[~lost] + 100)
    elif case == "map-too-long":  # fewer class elements than the header said: the map's last ranks are never met
        sizes[big] += 500
        k, got, _, _ = walk(b, lo, hi, start, pos, values, full=True, sizes=sizes)
        assert k == pos.size  # every changed element is found; the caller's class-size check refuses the base
    else:
        room = pos.size // 2
        k, got, vals, _ = walk(b, lo, hi, start, pos, values, full=True, room=room)
        assert k == -1
        np.testing.assert_array_equal(got, pos[:room] + 100)


def test_flag_walk_stops_once_its_outputs_are_full_unless_counting():
    b, lo, hi = weights(4096 + 37, 3), 112, 121
    pos = np.array([5, 70, 200], np.int64)  # all in the first blocks
    values, _ = class_major(b, lo, hi, pos)
    start = np.zeros(256, np.int64)
    _, _, _, early = walk(b, lo, hi, start, pos, values, full=False)
    _, _, _, counted = walk(b, lo, hi, start, pos, values, full=True)
    assert early.sum() < counted.sum() == b.size


def rice_rows(sizes: dict[int, int], ranks: dict[int, np.ndarray], *, k=None):
    """Header rows + streams as the ctx encoder writes them (the mode picked the same way)."""
    from shared.codec import _rice_k

    rows, streams = [], []
    for c, n_c in sizes.items():
        r = np.asarray(ranks[c], np.int64)
        if r.size == n_c:
            mode, coded = 2, None
        elif 2 * r.size > n_c:
            mode, coded = 1, np.setdiff1d(np.arange(n_c), r)
        else:
            mode, coded = 0, r
        if coded is None:
            rk, un, rem = 0, np.zeros(0, np.uint8), np.zeros(0, np.uint8)
        else:
            rk = _rice_k(coded, from_sorted=True) if k is None else k
            un, rem = rice_reference(coded, rk)
        rows.append([c, n_c, r.size, mode, rk, un.size, rem.size])
        streams += [un, rem]
    return np.array(rows, np.int64).reshape(-1, 7), np.concatenate([*streams, np.zeros(8, np.uint8)])


@pytest.mark.parametrize("k", [None, 0, 1, 20, 57, 62])
def test_class_flags_decode_every_mode(k):
    rng = np.random.default_rng(6)
    sizes = {100: 1, 101: 63, 102: 64, 103: 65, 104: 5000, 105: 5000, 106: 777, 107: 3000}
    ranks = {100: np.array([0]), 101: np.array([0, 62]), 102: np.arange(64), 103: np.array([64]),
             104: np.flatnonzero(rng.random(5000) < 0.03), 105: np.flatnonzero(rng.random(5000) < 0.9),
             106: np.arange(777), 107: np.array([0, 1, 2, 2999])}
    rows, streams = rice_rows(sizes, ranks, k=k)
    assert {0, 1, 2} <= set(rows[:, 3])
    flags, fbase, _, _ = flag_maps(sizes, {c: np.zeros(0, np.int64) for c in sizes})
    assert K.class_flags(streams, rows, fbase, flags) == (0, 0)
    want, _, _, _ = flag_maps(sizes, ranks)
    np.testing.assert_array_equal(flags, want)


@pytest.mark.parametrize("case,status,row", [("unary-cut", -1, 1), ("remainder-cut", -2, 1), ("wide-gap", -3, 1),
                                             ("wide-field-gap", -3, 1), ("past-class", -4, 1), ("all-but-not", -5, 0)])
def test_class_flags_report_broken_streams(case, status, row):
    sizes = {110: 1000, 111: 1000}
    rows, streams = rice_rows(sizes, {110: np.array([3, 500, 900]), 111: np.array([1, 2, 999])}, k=4)
    if case == "unary-cut":  # the unary stream's last byte (its last one bit) read as a remainder byte instead
        rows[1, 5] -= 1
        rows[1, 6] += 1
    elif case == "remainder-cut":  # the other way: 8 bits of remainders for 3 x 4
        rows[1, 5] += 1
        rows[1, 6] -= 1
    elif case in ("wide-gap", "wide-field-gap"):  # a quotient of 64 with 56-bit fields (the fast reader) or 60-bit
        k = 56 if case == "wide-gap" else 60     # ones (the general one): a gap past 62 bits
        rows = np.array([[110, 1000, 1000, 2, 0, 0, 0], [111, 1000, 3, 0, k, 9, 3 * k // 8 + 1]], np.int64)
        streams = np.concatenate([np.zeros(8, np.uint8), [0x80], np.zeros(rows[1, 6] + 8, np.uint8)]).astype(np.uint8)
    elif case == "past-class":
        rows[1, 1] = 999  # rank 999 of a class of 999
    else:
        rows[0, 3] = 2  # "all changed", with 3 of 1000
    flags, fbase, _, _ = flag_maps({int(c): int(n) for c, n in zip(rows[:, 0], rows[:, 1])},
                                   {int(c): np.zeros(0, np.int64) for c in rows[:, 0]})
    assert K.class_flags(streams, rows, fbase, flags) == (status, row)


def test_flag_prefix_counts_set_bits_below_each_bound():
    rng = np.random.default_rng(8)
    sizes = {50: 3000, 51: 64, 52: 700}
    ranks = {c: np.flatnonzero(rng.random(n) < 0.2) for c, n in sizes.items()}
    flags, fbase, _, _ = flag_maps(sizes, ranks)
    bounds = np.zeros((5, 256), np.int64)
    for c, n in sizes.items():
        bounds[:, c] = np.sort(np.concatenate([[0, n], rng.integers(0, n + 1, 3)]))
    out = np.zeros((5, 256), np.int64)
    K.flag_prefix(flags, fbase, np.array(list(sizes), np.int64), bounds, out)
    for c in sizes:
        np.testing.assert_array_equal(out[:, c], np.searchsorted(ranks[c], bounds[:, c]))


@numba.njit
def deposits(srcs, masks, out):
    for i in range(srcs.size):
        out[0, i] = K._deposit(srcs[i], masks[i])  # what the walk uses here (BMI2's pdep on this CPU)
        out[1, i] = K._pdep_loop(srcs[i], masks[i])  # the loop for CPUs without a fast one


def test_both_bit_deposits_agree_with_the_definition():
    rng = np.random.default_rng(9)
    masks = np.concatenate([rng.integers(0, 1 << 62, 300, dtype=np.uint64) * np.uint64(3),
                            np.array([0, 1, 1 << 63, (1 << 64) - 1], np.uint64)])
    srcs = rng.integers(0, 1 << 62, masks.size, dtype=np.uint64) * np.uint64(3)

    def pdep(src, mask):  # the definition: src's low bits, in order, onto mask's set bits
        out, t = 0, 0
        for bit in range(64):
            if mask >> bit & 1:
                out |= (src >> t & 1) << bit
                t += 1
        return out

    out = np.zeros((2, masks.size), np.uint64)
    deposits(srcs, masks, out)
    want = [pdep(int(s), int(m)) for s, m in zip(srcs, masks)]
    assert out[0].tolist() == want and out[1].tolist() == want


# ------------------------------------------------------------------------------------------------------ contracts
def test_non_contiguous_inputs_give_the_same_results():
    b = weights(2 * 3000, 2)
    strided = b[::2]
    out, out2 = np.zeros(256, np.int64), np.zeros(256, np.int64)
    K.exponent_histogram(strided, out)
    K.exponent_histogram(strided.copy(), out2)
    np.testing.assert_array_equal(out, out2)
    new = strided.copy()
    new[::7] ^= np.uint16(1)
    res = [[np.zeros(3000, t) for t in (np.int64, np.uint16, np.uint16, np.uint8, np.int64)] for _ in range(2)]
    for base, r in zip((strided, strided.copy()), res):
        assert K.diff_ranks(new, base, 0, clamp_table(112, 121), np.zeros(256, np.int64), *r) == len(new[::7])
    for x, y in zip(*res):
        np.testing.assert_array_equal(x, y)


def test_a_table_that_is_not_the_pooling_clamp_is_refused():
    table = clamp_table(112, 121)
    table[115] = 119  # classes are computed as the clamp: any other table would silently give other ones
    b = weights(100, 1)
    with pytest.raises(ValueError, match="class table"):
        K.diff_ranks(b, b, 0, table, np.zeros(256, np.int64), *(np.zeros(100, t) for t in
                                                                    (np.int64, np.uint16, np.uint16, np.uint8, np.int64)))


# ------------------------------------------------------------------------------- the ctx encoder's O(changed) passes
def _old_symbols(res: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(signs, buckets, extra) as the three passes that `residual_streams` replaced computed them."""
    from shared import codec_coder

    sym, hist = np.empty(res.size, np.int32), np.zeros((1, 34), np.int64)
    assert K.residual_symbols(np.array([0, res.size], np.int64), res, sym, hist) == 0
    signs, buckets = np.zeros((res.size + 7) // 8, np.uint8), np.empty(res.size, np.uint8)
    codec_coder.split_symbols(sym, signs, buckets)
    return signs, buckets, K.pack_low_bits(sym, res)


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 65535, 65535 + 5])
def test_residual_streams_match_the_passes_they_replaced(n):
    """Every nonzero int16 residual (all magnitude buckets, both signs, -32768) in a shuffled order, at lengths that
    end mid-byte and mid-word of the sign and extra-bit streams."""
    rng = np.random.default_rng(n)
    every = np.concatenate([np.arange(-32768, 0), np.arange(1, 32768)]).astype(np.int16)
    res = rng.permutation(np.resize(every, n)).astype(np.int16)
    signs = np.full((n + 7) // 8, 0xAA, np.uint8)  # garbage: every byte must be written
    buckets, extra = np.full(n, 0xAA, np.uint8), np.full((15 * n + 7) // 8 + 1, 0xAA, np.uint8)
    x = K.residual_streams(res, one_run(res), signs, buckets, extra)
    want = _old_symbols(res)
    np.testing.assert_array_equal(signs, want[0])
    np.testing.assert_array_equal(buckets, want[1])
    np.testing.assert_array_equal(extra[:x], want[2])


def test_residual_streams_refuse_a_zero_residual():
    res = np.array([1, -3, 0, 5], np.int16)
    assert K.residual_streams(res, one_run(res), np.zeros(1, np.uint8), np.zeros(4, np.uint8),
                              np.zeros(8, np.uint8)) == -1


def test_residual_streams_read_runs_where_they_are():
    """Runs scattered through the array, in any order: the same streams as the residuals joined in run order; the
    outputs must hold the runs' total."""
    rng = np.random.default_rng(3)
    res = rng.integers(1, 3000, 5000).astype(np.int16) * rng.choice(np.array([-1, 1], np.int16), 5000)
    runs = np.array([[4000, 700], [10, 0], [0, 1], [1200, 2500], [3900, 100]], np.int64)
    joined = np.concatenate([res[a: a + n] for a, n in runs])
    outs = [np.zeros((joined.size + 7) // 8, np.uint8), np.zeros(joined.size, np.uint8), np.zeros(2 * joined.size,
                                                                                                     np.uint8)]
    ref = [np.zeros_like(o) for o in outs]
    assert K.residual_streams(res, runs, *outs) == K.residual_streams(joined, one_run(joined), *ref)
    for a, b in zip(outs, ref):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="too short"):
        K.residual_streams(res, runs, outs[0], outs[1][:-1], outs[2])


def _old_position_streams(rank, starts, counts, cls_ids):
    """What `rice_classes` replaced: per class `complement`, `codec._rice_k` (numpy's float log2) and the Rice code
    (here its definition, `rice_reference`)."""
    from shared.codec import _rice_k

    meta, out = [], []
    for c in cls_ids:
        a, b = starts[c], starts[c + 1]
        n_c, k_c = counts[c], b - a
        if k_c == n_c:
            meta.append([2, 0, 0, 0])
            continue
        mode, coded = (1, K.complement(rank[a:b], n_c)) if 2 * k_c > n_c else (0, rank[a:b])
        k = _rice_k(coded, from_sorted=True)
        unary, rem = rice_reference(coded, k)
        meta.append([mode, k, unary.size, rem.size])
        out += [unary, rem]
    return np.array(meta, np.int64).reshape(-1, 4), np.concatenate([np.zeros(0, np.uint8), *out])


def one_run(a: np.ndarray) -> np.ndarray:
    return np.array([[0, a.size]], np.int64)


def class_runs(starts: np.ndarray, cls_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One run per class (its contiguous ranks), as `rice_classes` takes them."""
    runs = np.array([[starts[c], starts[c + 1] - starts[c]] for c in cls_ids], np.int64).reshape(-1, 2)
    return runs, np.arange(cls_ids.size + 1, dtype=np.int64)


def _classes_of(sizes: list[int], picks: list[np.ndarray]):
    """(rank, starts, counts, cls_ids) for classes 0.. of the given sizes whose changed ranks are `picks`."""
    counts = np.zeros(256, np.int64)
    counts[: len(sizes)] = sizes
    lens = np.zeros(256, np.int64)
    lens[: len(picks)] = [p.size for p in picks]
    starts = np.concatenate([[0], np.cumsum(lens)])
    rank = np.concatenate([np.zeros(0, np.int64), *[np.asarray(p, np.int64) for p in picks]])
    return rank, starts, counts, np.flatnonzero(lens)


@pytest.mark.parametrize("seed", range(40))
def test_rice_classes_match_the_per_class_calls(seed):
    """Random classes of every mode (changed ranks, their complement, all changed), gap scales from dense to sparse,
    runs that end mid-byte and mid-word."""
    rng = np.random.default_rng(seed)
    sizes, picks = [], []
    for _ in range(int(rng.integers(1, 12))):
        n_c = int(rng.choice([1, 2, 3, 63, 64, 65, 500, 5000, 100_000]))
        frac = float(rng.choice([0.001, 0.01, 0.2, 0.49, 0.5, 0.51, 0.9, 1.0]))
        pick = np.flatnonzero(rng.random(n_c) < frac)
        if frac == 1.0:
            pick = np.arange(n_c)
        sizes.append(n_c)
        picks.append(pick)
    rank, starts, counts, cls_ids = _classes_of(sizes, picks)
    meta = np.full((cls_ids.size, 4), -9, np.int64)
    got = K.rice_classes(rank, *class_runs(starts, cls_ids), counts, cls_ids, meta, 62, np.empty(max(sizes), np.int64))
    want_meta, want = _old_position_streams(rank, starts, counts, cls_ids)
    np.testing.assert_array_equal(meta, want_meta)
    np.testing.assert_array_equal(got, want)
    # Each class cut into runs laid out anywhere (the detection's per-chunk runs): the same streams.
    pieces, runs, rs = [], [], [0]
    at = 0
    for c in cls_ids:
        cuts = np.unique(np.concatenate([[starts[c], starts[c + 1]], rng.integers(starts[c], starts[c + 1] + 1, 3)]))
        for a, b in zip(cuts[:-1], cuts[1:]):
            pieces.append(rank[a:b])
        rs.append(rs[-1] + cuts.size - 1)
    order = rng.permutation(len(pieces))  # stored in a shuffled order, listed in class-major order
    offsets = np.zeros(len(pieces), np.int64)
    stored = []
    for i in order:
        offsets[i] = at
        stored.append(pieces[i])
        at += pieces[i].size
    runs = np.array([[offsets[i], pieces[i].size] for i in range(len(pieces))], np.int64).reshape(-1, 2)
    meta2 = np.full_like(meta, -9)
    got2 = K.rice_classes(np.concatenate([np.zeros(0, np.int64), *stored]), runs, np.array(rs, np.int64), counts,
                          cls_ids, meta2, 62, np.empty(max(sizes), np.int64))
    np.testing.assert_array_equal(meta2, want_meta)
    np.testing.assert_array_equal(got2, want)


def test_rice_classes_long_quotients_and_wide_remainders():
    """Quotients of 32 zeros and more (a far outlier among dense ranks: the unary stream's run loop), and k above
    32 (gaps near 2**40 in a class too large to build: only its size is given) -- the two paths past the fast ones."""
    dense = np.concatenate([np.arange(0, 3000, 3), [10**7, 10**7 + 1, 3 * 10**8]])
    wide = np.array([0, 2**40 - 5, 2**41, 2**41 + 2**39, 2**43 - 1], np.int64)
    rank, starts, counts, cls_ids = _classes_of([4 * 10**8, 2**44], [dense, wide])
    meta = np.zeros((2, 4), np.int64)
    got = K.rice_classes(rank, *class_runs(starts, cls_ids), counts, cls_ids, meta, 62, np.empty(1, np.int64))
    want_meta, want = _old_position_streams(rank, starts, counts, cls_ids)
    assert meta[1, 1] > 32
    np.testing.assert_array_equal(meta, want_meta)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("m", [1, 2, 3, 5, 7, 100, 1023, 1024, 1025])
def test_rice_classes_pick_the_k_of_the_float_formula_at_power_of_two_means(m):
    """k0 is computed with integers; the old code took floor(log2(mean + 1.0)) in floats. Means right at and one
    step either side of 2**j - 1 (where the two could disagree) pick the same k."""
    for j in range(0, 20):
        for last in ((m << j) - 2, (m << j) - 1, m << j):
            if last < m - 1:
                continue
            vals = np.concatenate([np.arange(m - 1), [last]]).astype(np.int64)  # mean gap + 1 = (last + 1) / m
            rank, starts, counts, cls_ids = _classes_of([4 * (last + 1)], [vals])
            meta = np.zeros((1, 4), np.int64)
            got = K.rice_classes(rank, *class_runs(starts, cls_ids), counts, cls_ids, meta, 62, np.empty(1, np.int64))
            want_meta, want = _old_position_streams(rank, starts, counts, cls_ids)
            assert meta.tolist() == want_meta.tolist(), (m, j, last)
            np.testing.assert_array_equal(got, want)


@pytest.mark.skipif(os.environ.get("DWS_KERNELS_CPU") is not None, reason="already the re-run")
@pytest.mark.parametrize("cpu", ["haswell", "x86-64"])
def test_same_results_when_compiled_for_cpus_without_avx512(cpu, tmp_path):
    """numba compiles for the host CPU; a Space may have AVX2 only (or less). A fresh process compiling for `cpu`
    (its own cache directory, so nothing compiled for this host is loaded) must pass this file too."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86-64 CPU names")
    env = dict(os.environ, NUMBA_CPU_NAME=cpu, NUMBA_CPU_FEATURES="", NUMBA_CACHE_DIR=str(tmp_path),
               DWS_KERNELS_CPU=cpu)
    root = Path(__file__).resolve().parents[2]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__],
                         cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


def test_run_chunks_starts_calls_in_order_and_stops_after_a_failure():
    """The detection's chunks wait for their predecessor's slot, so `run_chunks` must start calls in index order
    (on the caller and the pool's threads); results come back in order; after a call raises no further index is
    started, the running ones finish, and the first exception reaches the caller -- then the pool still serves."""
    import threading
    import time

    started, lock = [], threading.Lock()

    def record(i):
        with lock:
            started.append(i)
        time.sleep(0.001 * (i % 3))  # uneven calls: a later one may finish first
        return i * i

    assert K.run_chunks(record, 40) == [i * i for i in range(40)]
    assert started == sorted(started) and len(started) == 40
    started.clear()

    def failing(i):
        if i == 5:
            with lock:
                started.append(i)
            raise RuntimeError("chunk 5 failed")
        record(i)
        if i > 5:  # long enough for the failure to be recorded while it runs, even on a loaded machine
            time.sleep(0.05)
        return i

    with pytest.raises(RuntimeError, match="chunk 5 failed"):
        K.run_chunks(failing, 200)
    assert 5 in started and max(started) < 5 + 2 * (os.cpu_count() or 1)  # no index handed out after the failure
    assert K.run_chunks(lambda i: -i, 3) == [0, -1, -2]
    assert K.run_chunks(lambda i: i, 1) == [0] and K.run_chunks(lambda i: i, 0) == []
