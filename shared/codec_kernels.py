"""The codec's compiled loops: every pass over a whole tensor and every per-element bit-stream loop of `shared.codec`.

Owns speed, not format: each kernel computes exactly what the numpy expression it replaced computed (the tests compare
bytes with files written before it existed), so the encodings in `shared.codec` stay defined there.

Why numba: the ``ctx`` encoding needs, for every changed element, its rank among the base elements of the same
exponent class. As numpy that was a per-chunk stable sort of every element's class (8-10 ns per element of the
*model*); here it is one pass over the base's bits that counts classes 64 elements at a time with vector compares and
bit masks (the "vector class blocks" below: 0.5-1.1 ns per element with the ranking or position finding included,
measured 1.2-2.5x faster than one counter increment per element). Every kernel is compiled with ``nogil=True``
and runs serially on one chunk: callers spread chunks over `run_chunks`' thread pool, so the parallelism is plain
Python threads (safe to call from any number of threads at once -- numba's own ``parallel=``
threading layers are not all re-entrant -- and it adds nothing to how many threads a process starts).

``cache=True`` keeps the compiled code on disk (next to this file, or numba's per-user cache directory where that is
not writable): the first process on a machine compiles once (6-6.5 s on this 2-core machine, bench/results.json
``numba_first_use_s``: the vector blocks take LLVM longer than scalar loops), later ones load it in about half a
second, numba's import included. Nothing imports this module before an encoding needs it, so `dws --help` and the
env Space never pay for numba.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils, errors
from numba.extending import intrinsic

_POOL: ThreadPoolExecutor | None = None


def _forget_pool() -> None:
    global _POOL
    _POOL = None  # a forked child has none of the parent's threads: an inherited pool would never run a task


os.register_at_fork(after_in_child=_forget_pool)


def run_chunks(fn: Callable[[int], object], n: int) -> list:
    """`fn(i)` for i in range(n) on the calling thread and a shared pool's threads, one per core in all; returns the
    results in order. Every thread takes the next index from one counter, so calls start in index order (a call may
    wait for an earlier one: that one has started) -- and a model's hundreds of chunks cost a pool task per core, not
    a task, future and hand-off each (~15 us of held GIL apiece; with them one 0.6B detection in three stalled ~150 ms
    before its first chunk started, none in six since). The kernels release the GIL, so chunks run in parallel even
    when called from inside another pool. After a call raises, no index is started; the first exception is raised
    once the running calls have ended."""
    global _POOL
    ways = min(n, os.cpu_count() or 1)
    if ways <= 1:
        return [fn(i) for i in range(n)]
    if _POOL is None:
        _POOL = ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="dws-kernel")
    out: list = [None] * n
    todo = iter(range(n))
    lock = threading.Lock()
    failed: list[BaseException] = []

    def work() -> None:
        while not failed:
            with lock:
                i = next(todo, n)
            if i == n:
                return
            try:
                out[i] = fn(i)
            except BaseException as exc:  # noqa: BLE001 -- re-raised below, in the caller
                failed.append(exc)

    helpers = [_POOL.submit(work) for _ in range(ways - 1)]
    try:
        work()
    finally:
        for h in helpers:
            h.result()
    if failed:
        raise failed[0]
    return out


# A byte's leading zero count (8 for 0): the unary decoder skips to the next one bit with it.
_CLZ8 = np.array([8 - b.bit_length() for b in range(256)], dtype=np.int64)


# ----------------------------------------------------------------------------------------------- vector class blocks
# The ctx kernels' O(numel) work is counting elements per exponent class. One increment per element is a scatter LLVM
# cannot vectorise (measured 1.2-3 ns per element); instead a block of _W elements becomes one vector of class bytes
# and each live class c one bit mask ``movemask(classes == c)``: popcount counts the block's class-c elements, the
# mask's set bits say where they are. Written as LLVM vector IR (`numba.extending.intrinsic`) that LLVM lowers for the
# CPU numba compiles for: vpcmpeqb into a mask register + kmov with AVX-512BW, ymm compares + vpmovmskb with AVX2,
# xmm compares + pmovmskb and a software popcount on plain x86-64 -- the same results on every x86-64
# (tests/shared/test_codec_kernels.py checks them against per-element definitions, also compiled for haswell and
# x86-64).
_W = 64  # elements per block: one uint64 bit mask
_ONE = np.uint64(1)
_I8, _I32, _I64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)


def _address(typ) -> None:
    """The block intrinsics take data addresses (``a.ctypes.data`` of a C-contiguous array), not arrays: an array
    argument makes numba count a reference per call (three atomic increments per block: diff_ranks measured 0.75 ns
    per element with them, 0.55 without)."""
    if not isinstance(typ, types.Integer):
        raise errors.TypingError(f"vector block loads take an address (a.ctypes.data), got {typ}")


def _element_ptr(builder, args, it):
    """A pointer to element ``args[1]`` of type `it` of the array at address ``args[0]``."""
    return builder.gep(builder.inttoptr(args[0], it.as_pointer()), [args[1]])


def _memory(width: int):
    """(load, store) of the `width`-bit integer at index i of the array at an address (`_address`): the hot loops'
    per-class state and flag words, without numba's negative-index wraparound (a shift, an and and an add per access
    on a signed index -- the flag walk measured 0.71 ns per element with them)."""
    it, nbt = ir.IntType(width), getattr(types, f"int{width}")

    @intrinsic
    def load(typingctx, addr, i):
        _address(addr)
        return nbt(addr, types.int64), lambda context, builder, signature, args: builder.load(
            _element_ptr(builder, args, it))

    @intrinsic
    def store(typingctx, addr, i, v):
        _address(addr)

        def codegen(context, builder, signature, args):
            builder.store(context.cast(builder, args[2], signature.args[2], nbt), _element_ptr(builder, args, it))
            return context.get_dummy_value()

        return types.void(addr, types.int64, v), codegen

    return load, store


_ld64, _st64 = _memory(64)
_ld16, _st16 = _memory(16)
_ld8, _st8 = _memory(8)
_ld32, _st32 = _memory(32)


def _streaming(width: int):
    """A non-temporal store of the `width`-bit integer at index i of the array at an address: written around the
    caches (movnti), for outputs written once, far larger than the caches and read only after the pass -- a normal
    store first reads each cache line it fills (measured: 8-byte sequential writes into a 200 MB array 1.3-1.5 ns
    per element that way, 0.34 streaming). Weakly ordered: a kernel that streams ends with `_fence`."""
    it, nbt = ir.IntType(width), getattr(types, f"int{width}")

    @intrinsic
    def store(typingctx, addr, i, v):
        _address(addr)

        def codegen(context, builder, signature, args):
            st = builder.store(context.cast(builder, args[2], signature.args[2], nbt), _element_ptr(builder, args, it))
            st.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(_I32, 1)]))
            return context.get_dummy_value()

        return types.void(addr, types.int64, v), codegen

    return store


_stream64 = _streaming(64)


@intrinsic
def _fence(typingctx):
    """Orders every streaming store before it ahead of what follows, so the thread that takes the result next sees
    it: a sequentially consistent fence (mfence on x86-64, which drains the write-combining buffers; once per call,
    not per store), portable where an x86 sfence intrinsic would not compile."""

    def codegen(context, builder, signature, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.void(), codegen


@intrinsic
def _prefetch(typingctx, addr):
    """Asks for the cache line at `addr` (an address, `_address`) ahead of its use: for reads the hardware prefetcher
    cannot see coming -- short runs spread through a tensor, each on another page. Never faults, whatever the
    address."""
    _address(addr)

    def codegen(context, builder, signature, args):
        ptr = ir.IntType(8).as_pointer()
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [ptr, _I32, _I32, _I32]),
                                            "llvm.prefetch.p0")
        # read, keep in all cache levels, data cache
        builder.call(fn, [builder.inttoptr(args[0], ptr), ir.Constant(_I32, 0), ir.Constant(_I32, 3),
                          ir.Constant(_I32, 1)])
        return context.get_dummy_value()

    return types.void(addr), codegen


def _splat(builder, value, n):
    vt = ir.VectorType(value.type, n)
    v = builder.insert_element(ir.Constant(vt, ir.Undefined), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, ir.Constant(vt, ir.Undefined), ir.Constant(ir.VectorType(_I32, n), [0] * n))


def _block_ptr(builder, address, index, width):
    """A pointer to the <_W x i`width`> block at element `index` of the array at `address`."""
    vt = ir.VectorType(ir.IntType(width), _W)
    base = builder.inttoptr(address, ir.IntType(width).as_pointer())
    return builder.bitcast(builder.gep(base, [index]), vt.as_pointer())


@intrinsic
def _block_classes(typingctx, bits, j, lo, hi, buf):
    """buf[:_W] = the classes ``clamp((bits[j + u] >> 7) & 0xFF, lo, hi)`` of a whole block of uint16 `bits` (both
    given as addresses, `_address`)."""
    _address(bits), _address(buf)

    def codegen(context, builder, signature, args):
        v = builder.load(_block_ptr(builder, args[0], args[1], 16), align=2)
        e = builder.trunc(builder.lshr(v, ir.Constant(v.type, [7] * _W)), ir.VectorType(_I8, _W))  # i8: & 0xFF
        low, high = (_splat(builder, builder.trunc(x, _I8), _W) for x in args[2:4])
        e = builder.select(builder.icmp_unsigned("<", e, low), low, e)
        e = builder.select(builder.icmp_unsigned(">", e, high), high, e)
        builder.store(e, _block_ptr(builder, args[4], ir.Constant(_I64, 0), 8), align=1)
        return context.get_dummy_value()

    return types.void(bits, types.int64, types.int64, types.int64, buf), codegen


@intrinsic
def _class_mask(typingctx, buf, c):
    """Bit u set where buf[u] == c, u < _W (a block's elements of class c; buf an address)."""
    _address(buf)

    def codegen(context, builder, signature, args):
        v = builder.load(_block_ptr(builder, args[0], ir.Constant(_I64, 0), 8), align=1)
        eq = builder.icmp_unsigned("==", v, _splat(builder, builder.trunc(args[1], _I8), _W))
        return builder.bitcast(eq, _I64)

    return types.uint64(buf, types.int64), codegen


def _count_group(width: int):
    """An intrinsic ``(buf, base, counts)``: counts[base + t] += the block's elements of class base + t, t < `width`
    (buf: the block's classes, `counts`: int64 with room up to base + width; both addresses) -- the class vector
    loaded once and compared with `width` constants, each count added in place, no mask kept (a changed element's is
    made again, `_class_mask`): 4-5 instructions a class against ~11 for the per-class loop it replaced, which
    reloaded the classes and kept every mask (measured: diff_ranks 0.35 -> 0.24 ns per element on one chunk in
    cache). The compare constants are bytes, so a class past 255 would
    wrap to a small one; `diff_ranks`' groups never let that meet a real class: a group of 16 ends at or below hi, and
    a group of 4 wraps (to 0-2) only when it starts at 253-255, a multiple of 4 above lo -- so lo is above the
    wrapped classes, and no block holds a class below lo."""

    @intrinsic
    def count(typingctx, buf, base, counts):
        _address(buf), _address(counts)

        def codegen(context, builder, signature, args):
            v = builder.load(_block_ptr(builder, args[0], ir.Constant(_I64, 0), 8), align=1)
            b8 = builder.trunc(args[1], _I8)
            cp = builder.inttoptr(args[2], _I64.as_pointer())
            for t in range(width):
                eq = builder.icmp_unsigned("==", v, _splat(builder, builder.add(b8, ir.Constant(_I8, t)), _W))
                ptr = builder.gep(cp, [builder.add(args[1], ir.Constant(_I64, t))])
                builder.store(builder.add(builder.load(ptr), builder.ctpop(builder.bitcast(eq, _I64))), ptr)
            return context.get_dummy_value()

        return types.void(buf, types.int64, counts), codegen

    return count


_count16, _count4 = _count_group(16), _count_group(4)


@intrinsic
def _diff_mask(typingctx, new, old, j):
    """Bit u set where new[j + u] != old[j + u], u < _W (uint16 arrays given as addresses)."""
    _address(new), _address(old)

    def codegen(context, builder, signature, args):
        a = builder.load(_block_ptr(builder, args[0], args[2], 16), align=2)
        b = builder.load(_block_ptr(builder, args[1], args[2], 16), align=2)
        return builder.bitcast(builder.icmp_unsigned("!=", a, b), _I64)

    return types.uint64(new, old, types.int64), codegen


@intrinsic
def _popcount(typingctx, m):
    """Set bits of a uint64 mask (popcnt where the CPU has it)."""
    return types.int64(types.uint64), lambda context, builder, signature, args: builder.ctpop(args[0])


@intrinsic
def _lowest(typingctx, m):
    """Index of a non-zero uint64 mask's lowest set bit (tzcnt / bsf)."""
    return types.int64(types.uint64), lambda context, builder, signature, args: builder.cttz(
        args[0], ir.Constant(ir.IntType(1), 1))


@intrinsic
def _popcount_from(typingctx, m, i):
    """Set bits of a uint64 mask at bit i (< 64) and above."""
    return types.int64(types.uint64, types.int64), lambda context, builder, signature, args: builder.ctpop(
        builder.lshr(args[0], args[1]))


@intrinsic
def _select(typingctx, m, d):
    """Index of the set bit of uint64 `m` that has `d` (< popcount(m)) set bits below it: a branch-free binary search
    over halves of the word (6 steps of popcount + select), no data-dependent branch to mispredict."""

    def codegen(context, builder, signature, args):
        x, r = args
        pos = ir.Constant(_I64, 0)
        for w in (32, 16, 8, 4, 2, 1):
            low = builder.ctpop(builder.and_(x, ir.Constant(_I64, (1 << w) - 1)))
            up = builder.icmp_unsigned(">=", r, low)
            pos = builder.select(up, builder.add(pos, ir.Constant(_I64, w)), pos)
            r = builder.select(up, builder.sub(r, low), r)
            x = builder.select(up, builder.lshr(x, ir.Constant(_I64, w)), x)
        return pos

    return types.int64(types.uint64, types.int64), codegen


@njit(nogil=True, cache=True)
def _clamp_bounds(table):
    """(lo, hi) of a class table, which must be ``np.clip(np.arange(256), lo, hi)`` (`shared.codec`'s pooling): the
    vector blocks compute classes as that clamp, so any other table would silently give other classes."""
    lo, hi = np.int64(table[0]), np.int64(table[255])
    for e in range(256):
        if table[e] != min(max(e, lo), hi):
            raise ValueError("class table must be np.clip(np.arange(256), lo, hi)")
    return lo, hi


@njit(nogil=True, cache=True, inline="always")
def _classes(bits, bp, j, lo, hi, buf, fp):
    """The classes of the block at j into buf (`bp`, `fp`: the two arrays' addresses); returns the mask of its
    elements: all _W, or those of the last, partial block (classified one by one: a whole-block load would read
    past the array)."""
    t = bits.size - j
    if t >= _W:
        _block_classes(bp, j, lo, hi, fp)
        return ~np.uint64(0)
    for u in range(t):
        buf[u] = min(max((np.int64(bits[j + u]) >> 7) & 0xFF, lo), hi)
    return (_ONE << np.uint64(t)) - _ONE


_WINDOW = 16  # exponents counted by class masks; the rest (a few per million in weights) one by one


@njit(nogil=True, cache=True, inline="always")
def _count_exponents(b, j, e, h):
    """h[exponent] += 1 for the elements b[j:e] (four interleaved tables: runs of one exponent would otherwise
    wait on one counter)."""
    while j + 4 <= e:
        h[0, (b[j] >> 7) & 0xFF] += 1
        h[1, (b[j + 1] >> 7) & 0xFF] += 1
        h[2, (b[j + 2] >> 7) & 0xFF] += 1
        h[3, (b[j + 3] >> 7) & 0xFF] += 1
        j += 4
    while j < e:
        h[0, (b[j] >> 7) & 0xFF] += 1
        j += 1


@njit(nogil=True, cache=True, inline="always")
def _count_changes(new, old, j, e, changed):
    """How many of new[j:e] differ from old[j:e]; changed[exponent of old] += 1 for each."""
    k = 0
    for u in range(j, e):
        if new[u] != old[u]:
            changed[(old[u] >> 7) & 0xFF] += 1
            k += 1
    return k


@njit(nogil=True, cache=True, inline="always")
def _window(spill):
    """(first exponent, count) of the _WINDOW-wide run of exponents holding the most of the counts in `spill` (four
    interleaved tables)."""
    lo, best = 0, -1
    for a in range(256 - _WINDOW + 1):  # (explicit loops: numpy array expressions compile several times slower)
        inside = 0
        for e in range(a, a + _WINDOW):
            inside += spill[0, e] + spill[1, e] + spill[2, e] + spill[3, e]
        if inside > best:
            lo, best = a, inside
    return lo, best


@njit(nogil=True, cache=True, inline="always")
def _window_block(bp, j, lo, buf, fp, h, spill):
    """Counts the exponents of the whole block at j of the uint16 bits at address `bp`: those in the _WINDOW from `lo`
    by class masks into h, the few outside one by one into spill[0] (buf, at address `fp`, takes the block's
    exponents)."""
    _block_classes(bp, j, 0, 255, fp)
    inside = np.uint64(0)
    for e in range(lo, lo + _WINDOW):
        m = _class_mask(fp, e)
        inside |= m
        h[e] += _popcount(m)
    outside = ~inside
    while outside:
        u = _lowest(outside)
        outside &= outside - _ONE
        spill[0, buf[u]] += 1


@njit(nogil=True, cache=True)
def exponent_histogram(b, out):
    """out[e] += number of elements of `b` (uint16 bf16 bits) whose exponent field is e. Block by block with one
    class mask per exponent of a _WINDOW-wide window, placed where a sample of the first elements has the most (a
    weight matrix's exponents sit in ~10 neighbours); elements outside it are counted one by one, and a tensor whose
    sample leaves more than 1/16 outside is counted element by element throughout (measured 0.35 ns per element
    that way, 0.22 with the masks)."""
    b = np.ascontiguousarray(b)
    n = b.size
    spill = np.zeros((4, 256), np.int64)
    head = min(n, 4096)
    _count_exponents(b, 0, head, spill)
    lo, best = _window(spill)
    j = head
    if 16 * (head - best) <= head:
        buf = np.empty(_W, np.uint8)
        bp, fp = b.ctypes.data, buf.ctypes.data  # buf stays alive: the loop reads it
        h = np.zeros(256, np.int64)
        while j + _W <= n:
            _window_block(bp, j, lo, buf, fp, h, spill)
            j += _W
        for e in range(256):
            spill[0, e] += h[e]
    _count_exponents(b, j, n, spill)
    for e in range(256):
        out[e] += spill[0, e] + spill[1, e] + spill[2, e] + spill[3, e]


_SAMPLE_AHEAD = 2  # runs prefetched ahead of the one being counted


@njit(nogil=True, cache=True)
def sample_histogram_changes(new, old, run, stride, out, changed):
    """The detection's look ahead: over the first `run` elements of every `stride` of `old` (all of them with
    ``run == stride``), out[e] += the elements of exponent e and changed[e] += those of them that differ in `new`;
    returns (elements read, how many differ).
    The first run is counted one by one and places a _WINDOW of exponents (as `exponent_histogram`); every later run
    block by block -- one vector compare for its changes, one class mask per exponent of the window, the few outside
    one by one -- with the runs `_SAMPLE_AHEAD` strides on prefetched: each run sits on pages of its own, which the
    hardware prefetcher does not fetch before the run's first misses (measured on the 0.6B embedding, runs of 256
    every 2048-8192 elements: 3.9-4.4 ns per sampled element before, counting one by one without prefetch; 0.6-0.7
    with both)."""
    new, old = np.ascontiguousarray(new), np.ascontiguousarray(old)
    n = min(new.size, old.size)
    if run < 1 or stride < run:
        raise ValueError("sample_histogram_changes: 1 <= run <= stride")
    np_, op = new.ctypes.data, old.ctypes.data
    spill = np.zeros((4, 256), np.int64)
    h = np.zeros(256, np.int64)
    buf = np.empty(_W, np.uint8)
    fp = buf.ctypes.data  # buf stays alive: the loop reads it
    e = min(run, n)
    _count_exponents(old, 0, e, spill)
    k = _count_changes(new, old, 0, e, changed)
    read = e
    lo = _window(spill)[0]
    for j in range(stride, n, stride):
        ahead = j + _SAMPLE_AHEAD * stride
        if ahead < n:
            for b in range(2 * ahead, 2 * min(ahead + run, n), 64):  # bytes: one request per cache line
                _prefetch(np_ + b)
                _prefetch(op + b)
        e = min(j + run, n)
        x = j
        while x + _W <= e:
            d = _diff_mask(np_, op, x)
            k += _popcount(d)
            _window_block(op, x, lo, buf, fp, h, spill)  # leaves the block's exponents in buf
            while d:
                changed[buf[_lowest(d)]] += 1
                d &= d - _ONE
            x += _W
        _count_exponents(old, x, e, spill)
        k += _count_changes(new, old, x, e, changed)
        read += e - j
    for x in range(256):
        out[x] += h[x] + spill[0, x] + spill[1, x] + spill[2, x] + spill[3, x]
    return read, k


@njit(nogil=True, cache=True)
def class_counts(old_at, table, out):
    """out[c] += how many of these changed elements (base values `old_at`) are in class ``table[exponent]``."""
    for i in range(old_at.size):
        out[table[(old_at[i] >> 7) & 0xFF]] += 1


@njit(nogil=True, cache=True, inline="always")
def _symbol(r):
    """A residual's ctx symbol ``2 * (bucket - 1) + negative`` -- buckets 1, 2, 3, then w + 2 for |r| in
    [2**w, 2**(w+1)), whose w low bits go to the extra-bit stream (`pack_low_bits`) -- or -1 for 0."""
    neg = (r >> 63) & 1  # branch-free: signs are coin flips, a branch would mispredict half the time
    m = (r ^ -neg) + neg
    if m < 4:
        if m == 0:
            return -1
        return 2 * (m - 1) + neg
    w = 2
    while (m >> (w + 1)) != 0:
        w += 1
    return 2 * (w + 1) + neg


@njit(nogil=True, cache=True)
def residual_symbols(starts, residual, sym, hist):
    """Every residual, given in class-major order (class c's are ``residual[starts[c]:starts[c+1]]``), as its ctx
    symbol (`_symbol`), with hist[c] counting class c's symbols. Returns 0, or -1 when a residual is 0 (not a
    change)."""
    h = np.zeros((4, hist.shape[1]), np.int64)  # interleaved: runs of one symbol would wait on one counter
    for c in range(starts.size - 1):
        a, b = starts[c], starts[c + 1]
        if a == b:
            continue
        h[:] = 0
        for i in range(a, b):
            v = _symbol(np.int64(residual[i]))
            if v < 0:
                return -1
            sym[i] = v
            h[i & 3, v] += 1
        for v in range(hist.shape[1]):
            hist[c, v] = h[0, v] + h[1, v] + h[2, v] + h[3, v]
    return 0


@njit(nogil=True, cache=True, inline="always")
def _count_block(fp, valid, lo, hi, h):
    """Adds each class's elements in a block (its classes at address fp, `valid` masking a partial one) to h: an
    element at bit i of class c then has rank ``h[c] - _popcount_from(_class_mask(fp, c) & valid, i)`` (the mask
    made again for the few changed elements, not kept for every class). `diff_ranks` counts whole blocks with
    `_count16` / `_count4` instead."""
    for c in range(lo, hi + 1):
        h[c] += _popcount(_class_mask(fp, c) & valid)


@njit(nogil=True, cache=True)
def class_ranks(b, table, start, positions, residual, slot, rank_out, res_out):
    """One chunk of the ctx encoder: for sorted chunk-local `positions` into `b`, each one's rank among the elements
    of its class ``table[exponent]`` (``start[c]`` of them come before this chunk) and its `residual`, written
    straight into class-major order: the next free index of class c is ``slot[c]`` (advanced here), so
    rank_out/res_out fill two sequential streams per class. Reads `b` once, block by block up to the last position."""
    b = np.ascontiguousarray(b)
    lo, hi = _clamp_bounds(table)
    buf = np.empty(_W, np.uint8)
    bp, fp = b.ctypes.data, buf.ctypes.data  # buf stays alive: the loop reads it
    h = np.zeros(256, np.int64)
    n, m = b.size, positions.size
    i = 0
    j = 0
    while i < m:
        first = i
        changed = np.uint64(0)
        while i < m and positions[i] < j + _W:
            changed |= _ONE << np.uint64(positions[i] - j)
            i += 1
        valid = _classes(b, bp, j, lo, hi, buf, fp)
        _count_block(fp, valid, lo, hi, h)
        while changed:
            u = _lowest(changed)
            changed &= changed - _ONE
            c = buf[u]
            o = slot[c]
            slot[c] = o + 1
            rank_out[o] = start[c] + h[c] - _popcount_from(_class_mask(fp, c) & valid, u)
            res_out[o] = residual[first]
            first += 1
        j += _W


# ------------------------------------------------------------------------------------------ decode: class flag maps
# The decoder's O(numel) pass. A ctx tensor codes, per exponent class, which of the class's elements changed (their
# ranks). Decoded into one bit per class element -- class c's "flag map", bit r set when the class's element of rank r
# changed -- the walk needs no per-element search: in a block whose class-c elements are mask m_c and whose first
# class-c element has rank h_c, the changed ones are exactly ``pdep(flags_c >> h_c, m_c)`` (BMI2's parallel bit
# deposit puts the map's next popcount(m_c) bits on m_c's set bits, lowest first). A block costs the same fixed
# handful of instructions per live class whatever it holds; the earlier walk counted each class down to its next
# wanted rank and searched the mask for it, with a data-dependent branch per hit (10-13 ns per changed element).
# Measured on one 3 M-element N(0, 0.02) tensor, 14 live classes, 4 % changed, one thread: walk 1.57 -> 0.58 ns per
# element (0.42 with nothing changed), the whole ctx decode of the tensor 6.7 -> 3.0 ms.
#
# Flag maps live in one uint64 array: class c's map starts at word ``fbase[c]`` and holds ``(n_c >> 6) + 3`` words
# (bits at and above n_c zero: the walk reads up to two words past the word of its bit); classes with no changed
# element, and any read past a map's end (a base with more class-c elements than the delta's header says -- refused
# afterwards by the class-size check, but it must not read outside the array meanwhile), read the three zero words at
# ``zero``.
def _host_has_fast_pdep() -> bool:
    """Whether numba compiles for a CPU with a fast ``pdep``: BMI2, and not AMD Zen 1/2 (there it is microcoded,
    up to ~300 cycles: the software loop below is faster). A named target (``NUMBA_CPU_NAME``, as the tests' reruns
    for other CPUs set) takes the portable loop: its features are not this host's."""
    from llvmlite import binding as ll
    from numba.core import config

    if config.CPU_NAME not in (None, "host"):
        return False
    return "+bmi2" in ll.get_host_cpu_features().flatten() and ll.get_host_cpu_name() not in ("znver1", "znver2")


_FAST_PDEP = _host_has_fast_pdep()


@intrinsic
def _pdep_bmi2(typingctx, src, mask):
    """BMI2 ``pdep``: the low popcount(mask) bits of src, in order, on mask's set bits."""

    def codegen(context, builder, signature, args):
        fn = builder.module.declare_intrinsic("llvm.x86.bmi.pdep.64", fnty=ir.FunctionType(_I64, [_I64, _I64]))
        return builder.call(fn, args)

    return types.uint64(types.uint64, types.uint64), codegen


@njit(nogil=True, cache=True, inline="always")
def _pdep_loop(src, mask):
    """`_pdep_bmi2` without BMI2: one step per set bit of src that lands on mask (flag maps are sparse: a few per
    block)."""
    n = _popcount(mask)
    if n < 64:
        src &= (_ONE << np.uint64(n)) - _ONE
    out = np.uint64(0)
    while src:
        out |= _ONE << np.uint64(_select(mask, _lowest(src)))
        src &= src - _ONE
    return out


_deposit = _pdep_bmi2 if _FAST_PDEP else _pdep_loop


@intrinsic
def _bits_at(typingctx, hi, lo, s):
    """64 bits of the 128-bit ``hi:lo`` from bit s (< 64) on: a flag map read at any bit offset (LLVM's funnel
    shift: s = 0 gives lo, where ``hi << (64 - s)`` would be undefined)."""

    def codegen(context, builder, signature, args):
        fn = builder.module.declare_intrinsic("llvm.fshr.i64", fnty=ir.FunctionType(_I64, [_I64, _I64, _I64]))
        return builder.call(fn, [args[0], args[1], builder.and_(args[2], ir.Constant(_I64, 63))])

    return types.uint64(types.uint64, types.uint64, types.int64), codegen


@intrinsic
def _peek(typingctx, addr, bit):
    """The 64 bits of an MSB-first byte stream (at an address, `_address`) from bit `bit` on, first bit highest; at
    least the top 57 are the stream's (an unaligned 8-byte load: the caller keeps 8 readable bytes past the end)."""
    _address(addr)

    def codegen(context, builder, signature, args):
        byte = builder.inttoptr(builder.add(args[0], builder.lshr(args[1], ir.Constant(_I64, 3))), _I64.as_pointer())
        v = builder.load(byte, align=1)
        v = builder.call(builder.module.declare_intrinsic("llvm.bswap.i64", fnty=ir.FunctionType(_I64, [_I64])), [v])
        return builder.shl(v, builder.and_(args[1], ir.Constant(_I64, 7)))

    return types.uint64(addr, types.int64), codegen


@intrinsic
def _poke(typingctx, addr, byte, v):
    """Stores the uint64 `v` as 8 bytes, most significant first, at byte `byte` of the array at an address
    (`_address`; an unaligned store): a bit writer's full word (`_bits_put`)."""
    _address(addr)

    def codegen(context, builder, signature, args):
        at = builder.inttoptr(builder.add(args[0], args[1]), _I64.as_pointer())
        v = builder.call(builder.module.declare_intrinsic("llvm.bswap.i64", fnty=ir.FunctionType(_I64, [_I64])),
                         [args[2]])
        builder.store(v, at, align=1)
        return context.get_dummy_value()

    return types.void(addr, types.int64, types.uint64), codegen


@intrinsic
def _leading_zeros(typingctx, m):
    """Leading zero bits of a uint64, 64 for 0 (lzcnt)."""
    return types.int64(types.uint64), lambda context, builder, signature, args: builder.ctlz(
        args[0], ir.Constant(ir.IntType(1), 0))


@njit(nogil=True, cache=True, inline="always")
def _rice_flags(addr, ub, rb, k, count, n_c, wp, w0):
    """`class_flags`' reader for one stream with k <= 56: `count` Rice gaps, unary quotients from bit ub (up to bit
    rb, where the k-bit remainders start), each rank's bit flipped in the map at word w0 of the flags at address wp
    (set on zeros for mode 0, cleared on ones for mode 1: ranks are unique, so one xor does both). Returns 0 or a
    `class_flags` status."""
    uend = rb
    prev = np.int64(-1)
    # A 56-bit window of the unary stream, consumed code by code (a leading-zero count and a shift each): a fresh
    # 8-byte load per code would put its latency on the chain from one code's end to the next one's start.
    window = _peek(addr, ub)
    avail = np.int64(56)
    for _ in range(count):
        q = np.int64(0)
        while True:
            z = _leading_zeros(window)
            if z < avail:
                break
            q += avail  # the window holds only zeros: slide past it
            ub += avail
            if ub >= uend:
                return -1
            window = _peek(addr, ub)
            avail = np.int64(56)
        if ub + z >= uend:  # the one bit lies past this stream
            return -1
        q += z
        ub += z + 1
        window <<= np.uint64(z + 1)
        avail -= z + 1
        if k:
            if q >= (np.int64(1) << (62 - k)):
                return -3
            q = (q << k) | np.int64(_peek(addr, rb) >> np.uint64(64 - k))
            rb += k
        prev += q + 1
        if prev >= n_c:
            return -4
        x = w0 + (prev >> 6)
        _st64(wp, x, _ld64(wp, x) ^ np.int64(1 << (prev & 63)))
    return 0


@njit(nogil=True, cache=True)
def class_flags(streams, rows, fbase, flags):
    """Every class's flag map from its Rice-coded rank stream: `rows` (int64, one per class with changes) are the
    ctx header's ``[class, n_c, k_c, mode, rice_k, unary bytes, remainder bytes]``, their streams back to back in
    `streams` followed by 8 zero bytes (the bit reader loads 8 bytes at a time); class c's map at word fbase[c] of
    the zeroed `flags`. Mode 0 codes the changed ranks, 1 the unchanged ones (the map starts all ones), 2 none (all
    changed). One pass per stream, each gap straight into its bit (no rank array): unary quotients found 64 bits at
    a time with a leading-zero count, remainders read as one k-bit field. Returns (status, row): 0, or for that
    row's stream -1 (unary stream ends early), -2 (remainder stream too short), -3 (a gap wider than 62 bits), -4
    (a rank at or past n_c), -5 (mode 2 but k_c is not n_c) -- `rice_positions_chunk`'s codes."""
    addr = streams.ctypes.data
    off = 0
    for r in range(rows.shape[0]):
        c, n_c, k_c, mode, k, ulen, rlen = rows[r, 0], rows[r, 1], rows[r, 2], rows[r, 3], rows[r, 4], \
            rows[r, 5], rows[r, 6]
        w0 = fbase[c]
        u0, r0 = off, off + ulen
        off += ulen + rlen
        if mode != 0:
            for w in range(n_c >> 6):
                flags[w0 + w] = ~np.uint64(0)
            if n_c & 63:
                flags[w0 + (n_c >> 6)] = (_ONE << np.uint64(n_c & 63)) - _ONE
            if mode == 2:
                if n_c != k_c:
                    return -5, r
                continue
        count = k_c if mode == 0 else n_c - k_c
        if k > 56:  # a field wider than one peek: the general reader (never written for real weights)
            gaps = np.empty(count, np.int64)
            status, _, _ = rice_positions_chunk(streams[u0: r0], streams[r0: r0 + rlen], k, _CLZ8, 0, count, 0, -1,
                                                n_c, gaps)
            if status != 0:
                return status, r
            for i in range(count):
                flags[w0 + (gaps[i] >> 6)] ^= _ONE << np.uint64(gaps[i] & 63)
            continue
        if rlen * 8 < count * k:
            return -2, r
        status = _rice_flags(addr, 8 * u0, 8 * r0, k, count, n_c, flags.ctypes.data, w0)
        if status != 0:
            return status, r
    return 0, 0


@njit(nogil=True, cache=True)
def flag_prefix(flags, fbase, cls_ids, bounds, out):
    """out[i, c] = set bits of class c's flag map below bit bounds[i, c], for the classes `cls_ids` (bounds
    non-decreasing along i and at most the map's size): where each chunk's changed elements start in the class's
    stream of values."""
    for c in cls_ids:
        w0 = fbase[c]
        acc = 0
        w = 0
        for i in range(bounds.shape[0]):
            x = bounds[i, c]
            while w < (x >> 6):
                acc += _popcount(flags[w0 + w])
                w += 1
            part = 0
            if x & 63:
                part = _popcount(flags[w0 + w] & ((_ONE << np.uint64(x & 63)) - _ONE))
            out[i, c] = acc + part


@njit(nogil=True, cache=True, inline="always")
def _emit(found, fp, j, offset, bp, pp, vp, op, ov, k, cap):
    """`flag_positions`' output for one block: its changed elements (mask `found`, classes at address fp) in order,
    each position and new bits at k, k + 1, ...; returns the next k, or -1 when one would land at `cap`."""
    while found:
        if k == cap:
            return -1
        u = _lowest(found)
        found &= found - _ONE
        c = np.int64(_ld8(fp, u)) & 0xFF  # (a signed byte load)
        v = _ld64(pp, c)
        _st64(pp, c, v + 1)
        _stream64(op, k, j + u + offset)  # written once, read after the walk: around the caches
        _st16(ov, k, _ld16(bp, j + u) + _ld16(vp, v))  # its low 16 bits: wraps, as encoded
        k += 1
    return k


@njit(nogil=True, cache=True)
def flag_positions(b, lo, hi, flags, state, zero, p, residual, offset, full, out_pos, out_new):
    """The changed elements of `b` (one chunk of a base's uint16 bits; classes ``clamp(exponent, lo, hi)``), in
    position order: positions (chunk-local + `offset`) into out_pos and their new bits (base + residual, wrapping)
    into out_new. Class c's next element is bit ``state[c, 0]`` of `flags` (its flag map's next bit, as a bit
    address; advanced here by the class's elements) -- read from the zero words at `zero` once past ``state[c, 1]``,
    the map's last bit (-1 for a class without a map) -- and its next changed element's residual is
    ``residual[p[c]]`` (16-bit). Stops once out_pos is full unless `full` (then it reads all of `b`: state[c, 0]
    advances by every class's size). Returns how many it wrote; out_pos never overflows: a block that finds more
    returns -1. The base value is in cache as the walk passes it, so the new bits cost an add here where the
    caller's ``base[positions] + residual`` was a second O(changed) pass (a gather and two temporaries)."""
    b = np.ascontiguousarray(b)
    if residual.itemsize != 2 or out_new.itemsize != 2 or state.shape[1] != 2 or not state.flags.c_contiguous:
        raise ValueError("flag_positions: 16-bit residuals and outputs, state of shape (256, 2)")
    buf = np.empty(2 * _W, np.uint8)
    bp, fp = b.ctypes.data, buf.ctypes.data  # buf stays alive: the loop reads it
    wp, sp, pp = flags.ctypes.data, state.ctypes.data, p.ctypes.data
    vp, op, ov = residual.ctypes.data, out_pos.ctypes.data, out_new.ctypes.data
    n, cap = b.size, out_pos.size
    zw = np.int64(zero)
    k = 0
    j = 0
    # Two whole blocks per pass: each class's state is loaded, bounds-checked and stored once per 128 elements
    # (measured ~10 % faster than one block per pass); the second block's map bits start where the first's end, at
    # most one word on -- maps and the zero words have a spare word for it.
    while j + 2 * _W <= n and (full or k < cap):
        _block_classes(bp, j, lo, hi, fp)
        _block_classes(bp, j + _W, lo, hi, fp + _W)
        f1 = np.uint64(0)
        f2 = np.uint64(0)
        for c in range(lo, hi + 1):
            m1 = _class_mask(fp, c)
            m2 = _class_mask(fp + _W, c)
            a = _ld64(sp, 2 * c)
            w = a >> 6
            at = w if a <= _ld64(sp, 2 * c + 1) else zw  # select, not a branch
            a2 = a + _popcount(m1)
            at2 = at + ((a2 >> 6) - w)
            f1 |= _deposit(_bits_at(np.uint64(_ld64(wp, at + 1)), np.uint64(_ld64(wp, at)), a), m1)
            f2 |= _deposit(_bits_at(np.uint64(_ld64(wp, at2 + 1)), np.uint64(_ld64(wp, at2)), a2), m2)
            _st64(sp, 2 * c, a2 + _popcount(m2))
        k = _emit(f1, fp, j, offset, bp, pp, vp, op, ov, k, cap)
        if k >= 0:
            k = _emit(f2, fp + _W, j + _W, offset, bp, pp, vp, op, ov, k, cap)
        if k < 0:
            _fence()
            return -1
        j += 2 * _W
    while j < n and (full or k < cap):  # the last whole block and the partial one
        valid = _classes(b, bp, j, lo, hi, buf, fp)
        found = np.uint64(0)
        for c in range(lo, hi + 1):
            m = _class_mask(fp, c) & valid
            a = _ld64(sp, 2 * c)
            w = a >> 6 if a <= _ld64(sp, 2 * c + 1) else zw
            found |= _deposit(_bits_at(np.uint64(_ld64(wp, w + 1)), np.uint64(_ld64(wp, w)), a), m)
            _st64(sp, 2 * c, a + _popcount(m))
        k = _emit(found, fp, j, offset, bp, pp, vp, op, ov, k, cap)
        if k < 0:
            break
        j += _W
    _fence()  # the streamed positions (`_emit`)
    return k


@njit(nogil=True, cache=True, inline="always")
def _changes(new, old, np_, op, j):
    """The mask of the block at j where `new` and `old` (uint16; `np_`, `op` their addresses) differ: one vector
    compare, or element by element for the last, partial block (a whole-block load would read past the arrays)."""
    if j + _W <= new.size:
        return _diff_mask(np_, op, j)
    changed = np.uint64(0)
    for u in range(new.size - j):
        if new[j + u] != old[j + u]:
            changed |= _ONE << np.uint64(u)
    return changed


@njit(nogil=True, cache=True)
def diff_bits(new, old, offset, pos, new_at, old_at):
    """Where `new` and `old` (uint16) differ: fills pos/new_at/old_at (each len(new) long) with the positions
    (+ `offset`) and both values, returns the count. Block by block: one vector compare gives a block's changes as a
    bit mask, and only its set bits are visited (measured 0.07-0.11 ns per element at 4 % changed, one thread; 0.83
    for a branch-free scalar loop that stored every element and advanced on a change; `torch.ne` alone 0.2-0.4)."""
    new, old = np.ascontiguousarray(new), np.ascontiguousarray(old)
    np_, op = new.ctypes.data, old.ctypes.data
    pp, vp, wp = pos.ctypes.data, new_at.ctypes.data, old_at.ctypes.data
    n = new.size
    if old.size != n or pos.size < n or new_at.size < n or old_at.size < n:
        raise ValueError("diff_bits: inputs of one length, outputs as long")  # raw stores: no bounds checks
    k = 0
    j = 0
    while j < n:
        changed = _changes(new, old, np_, op, j)
        while changed:
            i = j + _lowest(changed)
            changed &= changed - _ONE
            _st64(pp, k, i + offset)
            _st16(vp, k, _ld16(np_, i))
            _st16(wp, k, _ld16(op, i))
            k += 1
        j += _W
    return k


@njit(nogil=True, cache=True)
def diff_ranks(new, old, offset, table, counts, pos, new_at, old_at, cls, rank):
    """`diff_bits` that also gives each changed element its class ``table[exponent of old]`` and its rank among the
    class's elements -- the ctx encoder's whole O(numel) work in the same read, block by block: one vector compare
    finds a block's changes, class-mask popcounts count its classes (`_count16` / `_count4`), and a changed element's
    rank is its class's count after the block less its class mask's set bits from it on. `counts` (int64, 256) holds
    each class's elements before this chunk on entry (the ranks' base: zeros for chunk-local ranks) and after it on
    return. Returns the count, or -1 when there are more changes than `pos` has room for (a block whose changes
    do not all fit is not written, nor anything past the outputs' end)."""
    new, old = np.ascontiguousarray(new), np.ascontiguousarray(old)
    lo, hi = _clamp_bounds(table)
    buf = np.empty(_W, np.uint8)
    np_, op, fp = new.ctypes.data, old.ctypes.data, buf.ctypes.data  # buf stays alive: the loop reads it
    h = np.zeros(256 + 16, np.int64)  # the counts as the loop keeps them: `_count16` may count 15 classes past hi
    # Outputs and per-class state through raw addresses: indexed stores carry numba's negative-index wraparound
    # (measured 0.45 -> 0.42 ns per element at 4 % changed, one thread).
    pp, vp, wp, cp, rp = pos.ctypes.data, new_at.ctypes.data, old_at.ctypes.data, cls.ctypes.data, rank.ctypes.data
    hp = h.ctypes.data
    wide = rank.itemsize == 8
    room = pos.size
    if old.size != new.size or min(new_at.size, old_at.size, cls.size, rank.size) < room:
        raise ValueError("diff_ranks: inputs of one length, outputs as long as pos")  # raw stores: no bounds checks
    if counts.size < 256 or counts.itemsize != 8 or not counts.flags.c_contiguous:
        raise ValueError("diff_ranks: counts must be 256 contiguous int64")
    for c in range(256):
        h[c] = counts[c]
    k = 0
    n = new.size
    j = 0
    while j < n:
        changed = _changes(new, old, np_, op, j)
        valid = ~np.uint64(0)
        if j + _W <= n:
            _block_classes(op, j, lo, hi, fp)
            g = lo
            while g + 16 <= hi + 1:
                _count16(fp, g, hp)
                g += 16
            while g <= hi:  # the rest four by four: a typical weight matrix has 10-14 classes
                _count4(fp, g, hp)
                g += 4
        else:  # the last, partial block: buf holds the previous block's classes past its end
            valid = _classes(old, op, j, lo, hi, buf, fp)
            _count_block(fp, valid, lo, hi, h)
        if k + _popcount(changed) > room:
            for c in range(256):
                counts[c] = h[c]
            return -1
        while changed:
            u = _lowest(changed)
            changed &= changed - _ONE
            c = np.int64(_ld8(fp, u)) & 0xFF  # the load is signed: class 255 would read as -1
            r = _ld64(hp, c) - _popcount_from(_class_mask(fp, c) & valid, u)
            i = j + u
            _st64(pp, k, i + offset)
            _st16(vp, k, _ld16(np_, i))
            _st16(wp, k, _ld16(op, i))
            _st8(cp, k, c)
            if wide:
                _st64(rp, k, r)
            else:
                _st32(rp, k, r)
            k += 1
        j += _W
    for c in range(256):
        counts[c] = h[c]
    return k


@njit(nogil=True, cache=True)
def changes_out(pos_s, new_s, old_s, off, pos, new_at, old_at):
    """One chunk's changes (`diff_bits` / `diff_ranks` into scratch) copied into its slot of the tensor's arrays at
    `off` in streaming stores (`_streaming`; numpy's copy read every destination line first): the positions one by
    one; the two uint16 arrays four elements at a time, packed little-endian (every host numpy and numba run on
    here), from the first index that is a multiple of 4 (8-byte aligned: numpy's buffers are), the few before and
    after in plain stores. Ends with the fence."""
    k = pos_s.size
    if off < 0 or off + k > min(pos.size, new_at.size, old_at.size) or min(new_s.size, old_s.size) < k:
        raise ValueError("changes_out: the chunk does not fit its slot")
    if not (pos.flags.c_contiguous and new_at.flags.c_contiguous and old_at.flags.c_contiguous):
        raise ValueError("changes_out: outputs must be contiguous")  # streamed through their addresses
    pp, np_, op = pos.ctypes.data, new_at.ctypes.data, old_at.ctypes.data
    for i in range(k):
        _stream64(pp, off + i, pos_s[i])
    i = 0
    while i < k and (off + i) & 3:
        new_at[off + i] = new_s[i]
        old_at[off + i] = old_s[i]
        i += 1
    while i + 4 <= k:
        a = np.int64(new_s[i]) | (np.int64(new_s[i + 1]) << 16) | (np.int64(new_s[i + 2]) << 32) | (
            np.int64(new_s[i + 3]) << 48)
        b = np.int64(old_s[i]) | (np.int64(old_s[i + 1]) << 16) | (np.int64(old_s[i + 2]) << 32) | (
            np.int64(old_s[i + 3]) << 48)
        _stream64(np_, (off + i) >> 2, a)
        _stream64(op, (off + i) >> 2, b)
        i += 4
    while i < k:
        new_at[off + i] = new_s[i]
        old_at[off + i] = old_s[i]
        i += 1
    _fence()


@njit(nogil=True, cache=True)
def rice_choices(hist, changed, lo, hi, ks, modes):
    """Per class (exponents pooled to ``[lo, hi]``), from a sample's elements (`hist`) and changes (`changed`) per
    exponent: modes[c] -- code the changed ranks (0) or, where more than half changed, the unchanged ones (1) -- and
    ks[c], the Rice parameter with the fewest expected bits per coded rank were ranks coded independently at the
    class's sampled rate d: ``k + 1 + t / (1 - t)`` with ``t = (1 - d) ** 2**k`` (a gap's expected quotient). What
    the detection codes with before it has seen the whole tensor (`coded_out`): any parameter decodes, the header
    carries it."""
    overall = (changed.sum() + 1.0) / (hist.sum() + 2.0)
    for c in range(lo, hi + 1):
        a = 0 if c == lo else c  # the pooled tails
        b = 256 if c == hi else c + 1
        h = 0.0
        g = 0.0
        for e in range(a, b):
            h += hist[e]
            g += changed[e]
        p = (g + overall) / (h + 1.0)  # a class the sample barely saw leans on the tensor's rate
        modes[c] = 1 if p > 0.5 else 0
        d = min(max(1.0 - p if p > 0.5 else p, 1e-12), 1.0 - 1e-12)
        step = math.log1p(-d)
        best, best_k = np.inf, 0
        for k in range(41):
            x = step * 2.0 ** k  # log t
            cost = k + 1.0 + math.exp(x) / -math.expm1(x)
            if cost < best:
                best, best_k = cost, k
        ks[c] = best_k


# One chunk's piece of one class (`coded_out`'s rows, int64 per class): its changed elements, the values it codes
# (changed ranks, or unchanged ones for a class coded by its complement) with the first and last of them (chunk-local
# ranks), the unary bits of the gaps after the first, and where each stream of the piece starts in the chunk's bytes.
(P_CHANGED, P_CODED, P_FIRST, P_LAST, P_UBITS, P_UNARY, P_REM, P_SIGNS, P_BUCKETS, P_XBITS, P_EXTRA) = range(11)
P_FIELDS = 11


@njit(nogil=True, cache=True)
def coded_out(new_s, old_s, cls_s, rank_s, sizes, ks, modes, rank_l, res_l, spare, meta):
    """One chunk's part of every ctx stream, coded from its changes (`diff_ranks` into scratch: position order,
    classes, chunk-local ranks) while they are in cache: per class c with elements here (``sizes[c]``: the chunk's
    class sizes), the Rice codes of its ranks -- the changed ones (``modes[c] == 0``) or the unchanged ones (1), with
    ``ks[c]`` -- except the first, which only the whole tensor's order can code (`assemble_classes` does), and the
    sign bits, bucket bytes and extra bits of its residuals (`residual_streams`). Needs nothing from the chunks
    before it (the changes' copy into the tensor's arrays, `changes_out`, does: their count). The ranks and
    residuals are sorted class by class in `rank_l` / `res_l` (chunk-sized scratch; `spare` takes the complements).
    meta[c] gets the class's piece (the P_* fields, offsets into the returned bytes); returns the chunk's bytes: five
    regions -- every piece's unary codes, then every piece's remainders, signs, buckets and extra bits, each piece
    starting on a byte -- each with room to spare after its pieces, and 8 readable bytes after the last."""
    k = new_s.size
    if (min(old_s.size, cls_s.size, rank_s.size, rank_l.size, res_l.size) < k
            or min(sizes.size, ks.size, modes.size, meta.shape[0]) < 256 or meta.shape[1] < P_FIELDS):
        raise ValueError("coded_out: the chunk's arrays are shorter than its changes")
    meta[:, :] = 0
    slot = np.zeros(257, np.int64)
    for i in range(k):
        slot[np.int64(cls_s[i]) + 1] += 1
    # Room per stream, from bounds (the unary codes of m ranks below n take at most m + n >> k bits): each stream is
    # written into a region of its own, sized so no piece can overrun it before its offsets are known.
    room = np.zeros(5, np.int64)
    n = 0
    for c in range(256):
        cnt = slot[c + 1]
        meta[c, P_CHANGED] = cnt
        slot[c + 1] += slot[c]
        n_c = sizes[c]
        if n_c:
            n += n_c
            m = cnt if modes[c] == 0 else n_c - cnt
            room[0] += ((m + (n_c >> ks[c])) >> 3) + 9
            room[1] += ((m * ks[c]) >> 3) + 9
            room[2] += (cnt >> 3) + 1
            room[3] += cnt
            room[4] += ((15 * cnt) >> 3) + 5
    if spare.size < n:
        raise ValueError("coded_out: spare must hold the chunk's elements")  # the complements go there unchecked
    for i in range(k):  # a counting sort of a few cache-resident elements: class after class, ranks ascending
        c = cls_s[i]
        o = slot[c]
        slot[c] = o + 1
        rank_l[o] = rank_s[i]
        res_l[o] = (np.int64(new_s[i]) - np.int64(old_s[i])) & 0xFFFF
    start = np.zeros(6, np.int64)
    for s in range(5):
        start[s + 1] = start[s] + room[s]
    # The regions stay where they are, slack and all: `assemble_classes` reads each piece at its offsets (joining
    # them here copied every piece once more). 8 bytes past the last region: its bit readers' and bucket copy's
    # 8-byte loads.
    buf = np.empty(start[5] + 8, np.uint8)
    at = start[:5].copy()
    for c in range(256):
        n_c, cnt = sizes[c], meta[c, P_CHANGED]
        if n_c == 0:
            continue
        a = slot[c] - cnt  # the counting sort left slot[c] at the class's end
        kc = ks[c]
        if modes[c] == 0:
            m = cnt
            vals = rank_l[a: a + cnt]
        else:
            one = np.empty((1, 2), np.int64)
            one[0, 0], one[0, 1] = a, cnt
            m = _complement_into(rank_l, one, n_c, spare)
            vals = spare[:m]
        meta[c, P_CODED] = m
        meta[c, P_UNARY], meta[c, P_REM] = at[0], at[1]
        meta[c, P_SIGNS], meta[c, P_BUCKETS], meta[c, P_EXTRA] = at[2], at[3], at[4]
        unary, rem = buf[at[0]: start[1]], buf[at[1]: start[2]]
        signs, buckets, extra = buf[at[2]: start[3]], buf[at[3]: start[4]], buf[at[4]: start[5]]
        ubits = 0
        if m:
            meta[c, P_FIRST], meta[c, P_LAST] = vals[0], vals[m - 1]
            rest = vals[1:]
            ubits = _rice_write(rest, _whole(rest), kc, unary, rem, vals[0])
        i, o, acc, nacc, sb = _residual_run(res_l[a: a + cnt], -1, 0, np.int64(0), 0, 0, signs, buckets, extra)
        if i == -2:
            raise ValueError("coded_out: a changed element with a residual of 0")
        meta[c, P_UBITS] = ubits
        at[0] += (ubits + 7) >> 3
        at[1] += (max(m - 1, 0) * kc + 7) >> 3
        if cnt:
            meta[c, P_XBITS] = 8 * o + nacc
            at[4] += _residual_end(cnt, o, acc, nacc, sb, signs, extra)
            at[2] += (cnt + 7) >> 3
            at[3] += cnt
    return buf


@njit(nogil=True, cache=True, inline="always")
def _bits_put(addr, o, acc, nacc, value, width):
    """A bit writer's step: appends the low `width` (<= 57) bits of `value` (uint64, no bits above them) to the
    MSB-first stream at the address `addr` whose bits before `8 * o + nacc` are written, `nacc` (< 64) of them
    pending in `acc` (top bits first); a full word is stored whole (`_poke`: the 8 bytes at o must be writable).
    Returns (o, acc, nacc)."""
    if width == 0:
        return o, acc, nacc  # (a shift by 64 below would be undefined)
    free = 64 - nacc
    if width < free:
        return o, acc | (value << np.uint64(free - width)), nacc + width
    spill = width - free
    _poke(addr, o, acc | (value >> np.uint64(spill)))
    if spill == 0:
        return o + 8, np.uint64(0), 0
    return o + 8, value << np.uint64(64 - spill), spill


@njit(nogil=True, cache=True, inline="always")
def _bits_zeros(addr, o, acc, nacc, count):
    """`_bits_put` of `count` zero bits (any number)."""
    while count > 56:
        o, acc, nacc = _bits_put(addr, o, acc, nacc, np.uint64(0), 56)
        count -= 56
    return _bits_put(addr, o, acc, nacc, np.uint64(0), count)


@njit(nogil=True, cache=True, inline="always")
def _bits_stream(addr, o, acc, nacc, src, bit, nbits):
    """`_bits_put` of the `nbits` bits of the MSB-first stream at address `src` from bit `bit` on (8 readable bytes past
    their end: `_peek`)."""
    while nbits > 56:
        o, acc, nacc = _bits_put(addr, o, acc, nacc, _peek(src, bit) >> np.uint64(8), 56)
        bit += 56
        nbits -= 56
    if nbits > 0:
        o, acc, nacc = _bits_put(addr, o, acc, nacc, _peek(src, bit) >> np.uint64(64 - nbits), nbits)
    return o, acc, nacc


@njit(nogil=True, cache=True, inline="always")
def _bits_end(addr, o, acc, nacc):
    """Stores a bit writer's pending bits (the whole word: 8 writable bytes at o)."""
    if nacc:
        _poke(addr, o, acc)


@njit(nogil=True, cache=True)
def assemble_classes(addrs, metas, sizes, ks, modes, present, rows):
    """A ctx tensor's streams from its chunks' pieces (`coded_out`: the bytes of chunk i at the address ``addrs[i]``
    -- the caller keeps them alive -- its rows ``metas[i]``, its class sizes ``sizes[i]``): for every class of
    `present` (those with changes), in order, its unary then its remainder stream -- each piece's first rank coded
    as its gap from the previous piece's last, then the piece's own codes appended -- and then, class after class,
    every change's sign bit, bucket byte and extra bits. A class whose elements all changed codes nothing (mode 2),
    whatever its mode was. rows[j] = (class size, changed, mode, k, unary bytes, remainder bytes) of class
    present[j]. Returns (position streams, signs, buckets, extra)."""
    nch = metas.shape[0]
    npos = 0
    n = 0
    xbits = 0
    for j in range(present.size):
        c = present[j]
        kc = ks[c]
        n_c = 0
        changed = 0
        coded = 0
        ubits = 0
        prev = np.int64(-1)
        for i in range(nch):
            m = metas[i, c, P_CODED]
            if m:
                g = n_c + metas[i, c, P_FIRST] - prev - 1
                ubits += (g >> kc) + 1 + metas[i, c, P_UBITS]
                prev = n_c + metas[i, c, P_LAST]
                coded += m
            n_c += sizes[i, c]
            changed += metas[i, c, P_CHANGED]
            xbits += metas[i, c, P_XBITS]
        mode = modes[c]
        if changed == n_c:
            mode = 2
        rows[j, 0], rows[j, 1], rows[j, 2] = n_c, changed, mode
        rows[j, 3] = kc if mode != 2 else 0
        rows[j, 4] = (ubits + 7) >> 3 if mode != 2 else 0
        rows[j, 5] = (coded * kc + 7) >> 3 if mode != 2 else 0
        npos += rows[j, 4] + rows[j, 5]
        n += changed
    # Each stream is written forward by one bit writer, a class's unary stream and then its remainders: a writer's
    # word stores run up to 8 bytes past its bits, into what the next writer overwrites (and the 8 bytes of room at
    # every stream's end).
    streams = np.empty(npos + 8, np.uint8)
    signs = np.empty(((n + 7) >> 3) + 8, np.uint8)
    buckets = np.empty(n + 8, np.uint8)  # copied 8 bytes at a time: up to 7 past a piece's, overwritten next
    extra = np.empty(((xbits + 7) >> 3) + 8, np.uint8)
    if addrs.size < nch:
        raise ValueError("assemble_classes: an address per chunk")  # read unchecked below
    sa, ga, xa, ba = streams.ctypes.data, signs.ctypes.data, extra.ctypes.data, buckets.ctypes.data
    o = 0
    go, gacc, gn = 0, np.uint64(0), 0
    xo, xacc, xn = 0, np.uint64(0), 0
    bo = 0
    for j in range(present.size):
        c = present[j]
        kc = rows[j, 3]
        for part in range(2 if rows[j, 2] != 2 else 0):  # the unary stream, then the remainders
            w, acc, nacc = o, np.uint64(0), 0
            base = np.int64(0)
            prev = np.int64(-1)
            for i in range(nch):
                m = metas[i, c, P_CODED]
                if m:
                    g = base + metas[i, c, P_FIRST] - prev - 1
                    p = 8 * metas[i, c, P_UNARY if part == 0 else P_REM]
                    if part == 0:
                        w, acc, nacc = _bits_zeros(sa, w, acc, nacc, g >> kc)
                        w, acc, nacc = _bits_put(sa, w, acc, nacc, np.uint64(1), 1)
                        w, acc, nacc = _bits_stream(sa, w, acc, nacc, addrs[i], p, metas[i, c, P_UBITS])
                    elif kc:
                        w, acc, nacc = _bits_put(sa, w, acc, nacc, np.uint64(g & ((np.int64(1) << kc) - 1)), kc)
                        w, acc, nacc = _bits_stream(sa, w, acc, nacc, addrs[i], p, (m - 1) * kc)
                    prev = base + metas[i, c, P_LAST]
                base += sizes[i, c]
            _bits_end(sa, w, acc, nacc)
            o += rows[j, 4 + part]
        for i in range(nch):
            cnt = metas[i, c, P_CHANGED]
            if cnt:
                a = addrs[i]
                go, gacc, gn = _bits_stream(ga, go, gacc, gn, a, 8 * metas[i, c, P_SIGNS], cnt)
                q = a + metas[i, c, P_BUCKETS]
                for w8 in range(0, cnt, 8):  # (a piece's region is followed by readable bytes: see coded_out)
                    _st64(ba + bo + w8, 0, _ld64(q + w8, 0))
                bo += cnt
                xo, xacc, xn = _bits_stream(xa, xo, xacc, xn, a, 8 * metas[i, c, P_EXTRA], metas[i, c, P_XBITS])
    _bits_end(ga, go, gacc, gn)
    _bits_end(xa, xo, xacc, xn)
    return streams[:npos], signs[: (n + 7) >> 3], buckets[:n], extra[: (xbits + 7) >> 3]


@njit(nogil=True, cache=True, inline="always")
def _residual_run(run, i, o, acc, nacc, sb, signs, buckets, extra):
    """`residual_streams` over one run (its own 1-D view: no wraparound in the loads, `_run_sums`) from the state
    (i: elements before it - 1, o: extra bytes written, acc / nacc: pending extra bits, sb: pending sign bits);
    returns the state after it, i = -2 for a residual of 0. Stores through the outputs' addresses, as `_rice_write`
    (1.9 -> 1.2 ns per residual)."""
    sa, ba, xa = signs.ctypes.data, buckets.ctypes.data, extra.ctypes.data
    for x in range(run.size):
        i += 1
        r = np.int64(run[x])
        neg = (r >> 63) & 1  # branch-free: signs are coin flips
        m = (r ^ -neg) + neg
        if m < 4:
            if m == 0:
                return -2, o, acc, nacc, sb
            _st8(ba, i, m - 1)
        else:
            w = 63 - _leading_zeros(np.uint64(m))  # floor(log2(m))
            _st8(ba, i, w + 1)
            acc = (acc << w) | (m - (np.int64(1) << w))
            nacc += w
            if nacc >= 32:  # at most 31 + 15 bits pending: emit four bytes
                nacc -= 32
                v = acc >> nacc
                _st8(xa, o, v >> 24)
                _st8(xa, o + 1, v >> 16)
                _st8(xa, o + 2, v >> 8)
                _st8(xa, o + 3, v)
                o += 4
                acc &= (np.int64(1) << nacc) - 1
        sb = (sb << 1) | neg
        if (i & 7) == 7:
            _st8(sa, i >> 3, sb)
            sb = 0
    return i, o, acc, nacc, sb


@njit(nogil=True, cache=True, inline="always")
def _residual_end(n, o, acc, nacc, sb, signs, extra):
    """The last partial sign byte and extra bytes of `_residual_run`'s state after n residuals; returns extra's
    bytes."""
    if n & 7:
        signs[n >> 3] = sb << (8 - (n & 7))
    while nacc >= 8:
        nacc -= 8
        extra[o] = (acc >> nacc) & 0xFF
        o += 1
    if nacc:
        extra[o] = (acc << (8 - nacc)) & 0xFF
        o += 1
    return o


@njit(nogil=True, cache=True)
def residual_streams(res, runs, signs, buckets, extra):
    """The ctx zstd coder's inputs in one pass over the int16 residuals of `res` in `runs` ((start, length) rows in
    class-major order) -- what `residual_symbols`, `codec_coder.split_symbols` and `pack_low_bits` give, without the
    int32 symbol array between them: signs gets each residual's sign bit (packed MSB first; ``(n + 7) // 8`` bytes),
    buckets its byte ``bucket - 1`` (`_symbol`'s bucket), extra the low ``bucket - 2`` bits of each magnitude of
    bucket >= 4 (MSB first, zero-padded; room for 15 bits per residual). Returns extra's bytes used, or -1 when a
    residual is 0."""
    n = 0
    for t in range(runs.shape[0]):
        n += runs[t, 1]
    if buckets.size < n or signs.size < (n + 7) // 8:
        raise ValueError("residual_streams: outputs too short for the runs")
    i, o, acc, nacc, sb = -1, 0, np.int64(0), 0, 0
    for t in range(runs.shape[0]):
        i, o, acc, nacc, sb = _residual_run(res[runs[t, 0]: runs[t, 0] + runs[t, 1]], i, o, acc, nacc, sb, signs,
                                            buckets, extra)
        if i == -2:
            return -1
    return _residual_end(n, o, acc, nacc, sb, signs, extra)


@njit(nogil=True, cache=True, inline="always")
def _run_sums(v, prev, k_lo, from_sorted):
    """`_rice_sums` over one run, given as its own 1-D view: indices from 0 are known non-negative, so the loads
    carry no negative-index wraparound and the loop vectorizes (measured 0.46 ns per value this way, 1.4-1.6 when
    the runs were index ranges into the whole array). Returns the five sums and the run's last value."""
    s0 = s1 = s2 = s3 = s4 = np.int64(0)
    for i in range(v.size):
        g = np.int64(v[i])
        if from_sorted:  # loop-invariant: LLVM unswitches it
            g, prev = g - prev - 1, g
        g >>= k_lo
        s0 += g
        s1 += g >> 1
        s2 += g >> 2
        s3 += g >> 3
        s4 += g >> 4
    return s0, s1, s2, s3, s4, prev


@njit(nogil=True, cache=True, inline="always")
def _rice_sums(gaps, runs, k_lo, from_sorted):
    """sum(g >> (k_lo + t)) for t = 0..4 over the elements of `gaps` in `runs` ((start, length) rows, in order) in
    one pass (five plain accumulators: the loop vectorizes). With `from_sorted`, they are sorted unique values v whose
    Rice gaps ``v_i - v_{i-1} - 1`` (v_{-1} = -1) are the gaps, computed on the fly across runs: no gap array (a
    page-faulting allocation the size of the changed elements), no joined copy of the runs."""
    s0 = s1 = s2 = s3 = s4 = np.int64(0)
    prev = np.int64(-1)
    for r in range(runs.shape[0]):
        a = runs[r, 0]
        t0, t1, t2, t3, t4, prev = _run_sums(gaps[a: a + runs[r, 1]], prev, k_lo, from_sorted)
        s0 += t0
        s1 += t1
        s2 += t2
        s3 += t3
        s4 += t4
    return s0, s1, s2, s3, s4


@njit(nogil=True, cache=True, inline="always")
def _whole(a):
    """One run over all of `a`."""
    runs = np.empty((1, 2), np.int64)
    runs[0, 0] = 0
    runs[0, 1] = a.size
    return runs


@njit(nogil=True, cache=True, inline="always")
def _cheapest_k(n, k_lo, k_hi, sums):
    """The k in [k_lo, k_hi] (at most 5 values) minimising n*(k+1) + sum(g >> k) (`_rice_sums`), the smallest on
    ties, and that k's sum(g >> k) (the unary stream's zeros)."""
    best_k, best, q = k_lo, -1, np.int64(0)
    for t in range(k_hi - k_lo + 1):
        bits = n * (k_lo + t + 1) + sums[t]
        if best < 0 or bits < best:
            best_k, best, q = k_lo + t, bits, sums[t]
    return best_k, q


@njit(nogil=True, cache=True)
def rice_cost(gaps, k_lo, k_hi, from_sorted):
    """The k in [k_lo, k_hi] (at most 5 values) minimising n*(k+1) + sum(g >> k), the smallest on ties, in one
    pass over `gaps` (or, with `from_sorted`, over the Rice gaps of the sorted unique values it holds)."""
    return _cheapest_k(gaps.size, k_lo, k_hi, _rice_sums(gaps, _whole(gaps), k_lo, from_sorted))[0]


@njit(nogil=True, cache=True, inline="always")
def _word_out(out, o, word, nbytes):
    """The top `nbytes` (<= 8) bytes of a 64-bit word, most significant first, at out[o:]."""
    for t in range(nbytes):
        out[o + t] = (word >> (56 - 8 * t)) & 0xFF


@njit(nogil=True, cache=True, inline="always")
def _rice_write(vals, runs, k, unary, rem, prev):
    """The Rice streams of the sorted unique values of `vals` in `runs` ((start, length) rows, in order: the values
    ascend across them; `rice_encode`), the first coded as its gap from `prev` (-1: from the start), into `unary` and
    `rem` of exactly the right sizes (every byte written; or with 8 bytes of room past the codes, where the last
    words are written whole), both streams filled a 64-bit word at a time in registers: the only chains between
    elements are a bit counter and the word being filled (measured 1.9-2.0 ns per element at k = 1..4, against
    2.3-2.7 for the byte-array writer it replaced, which also zeroed its arrays and or-ed each bit into place).
    Returns the unary stream's bits."""
    cw, word, ubit, rw, rfill, ro = 0, np.int64(0), np.int64(-1), np.int64(0), 0, 0
    mask = (np.int64(1) << k) - 1
    prev = np.int64(prev)
    # Whole words stored through the streams' addresses (`_poke`): indexed byte stores carried numba's wraparound
    # and bounds arithmetic (measured 2.75 -> 1.5 ns per code, one chunk's classes in cache).
    ua, ra = unary.ctypes.data, rem.ctypes.data
    for r in range(runs.shape[0]):
        run = vals[runs[r, 0]: runs[r, 0] + runs[r, 1]]  # a view: indices from 0, no wraparound (`_run_sums`)
        for i in range(run.size):
            v = np.int64(run[i])
            g = v - prev - 1
            prev = v
            ubit += (g >> k) + 1
            w = ubit >> 6
            if w != cw:
                _poke(ua, cw * 8, np.uint64(word))
                for z in range(cw + 1, w):  # a quotient of 64 zeros or more
                    _poke(ua, z * 8, np.uint64(0))
                cw = w
                word = np.int64(0)
            word |= np.int64(1) << (63 - (ubit & 63))
            if k:
                val = g & mask
                if rfill + k <= 64:
                    rw |= val << (64 - rfill - k)
                    rfill += k
                    if rfill == 64:
                        _poke(ra, ro, np.uint64(rw))
                        ro += 8
                        rw = np.int64(0)
                        rfill = 0
                else:  # split across two words (k <= 62: every shift below stays under 64)
                    spill = k - (64 - rfill)
                    rw |= val >> spill
                    _poke(ra, ro, np.uint64(rw))
                    ro += 8
                    rfill = spill
                    rw = val << (64 - spill)
    # Exact sizes end on these words' bytes; a caller with room (`coded_out`) gets whole words.
    _word_out(unary, cw * 8, word, min(8, unary.size - cw * 8))
    _word_out(rem, ro, rw, min(8, rem.size - ro))
    return ubit + 1


@njit(nogil=True, cache=True, inline="always")
def _complement_into(ranks, runs, n, out):
    """out[:k] = 0..n-1 without the sorted, unique, in-range ranks of `ranks` in `runs` (as `complement`); returns k."""
    k = 0
    r = 0
    for t in range(runs.shape[0]):
        run = ranks[runs[t, 0]: runs[t, 0] + runs[t, 1]]  # a view: indices from 0, no wraparound (`_run_sums`)
        for i in range(run.size):
            x = run[i]
            while r < x:
                out[k] = r
                k += 1
                r += 1
            r = x + 1
    while r < n:
        out[k] = r
        k += 1
        r += 1
    return k


@njit(nogil=True, cache=True)
def rice_classes(rank, runs, rs, counts, cls_ids, meta, max_k, spare):
    """Every class's position streams of a ctx tensor in one call -- per class what `complement`, ``codec._rice_k``
    and `rice_encode` gave, without a Python call or an array per class. Class ``c = cls_ids[i]`` has its sorted
    changed ranks in the runs ``runs[rs[i]:rs[i+1]]`` of `rank` ((start, length) rows: the detection leaves each
    chunk's class runs where they are, no joined copy) and ``counts[c]`` elements; it codes nothing when all changed
    (mode 2), its unchanged ranks (the complement, written into `spare`, which must hold the largest one) when more
    than half did (mode 1), else its changed ranks (mode 0), as Rice gaps with the k of ``_rice_k``: the integer
    floor(log2(mean gap + 1)) -- the float expression's value wherever the mean is not within 2**-33 (relative) of a
    power of two minus one, which no mean of integer gaps over fewer than 2**32 elements is -- then the cheapest of
    k0-2..k0+2 from one pass of five sums, which also give the unary stream's length (no quotient pass).
    meta[i] = (mode, k, unary bytes, remainder bytes); returns every class's unary then remainder bytes, class after
    class."""
    total = 0
    one = np.empty((1, 2), np.int64)  # the complement: one run over `spare`
    one[0, 0] = 0
    for i in range(cls_ids.size):
        c = cls_ids[i]
        n_c = counts[c]
        k_c = 0
        last = np.int64(-1)
        for t in range(rs[i], rs[i + 1]):
            k_c += runs[t, 1]
            if runs[t, 1]:
                last = np.int64(rank[runs[t, 0] + runs[t, 1] - 1])
        mode = 2 if k_c == n_c else (1 if 2 * k_c > n_c else 0)
        meta[i, 0] = mode
        if mode == 2:
            meta[i, 1] = meta[i, 2] = meta[i, 3] = 0
            continue
        if mode == 1:
            m = _complement_into(rank, runs[rs[i]: rs[i + 1]], n_c, spare)
            one[0, 1] = m
            vals, vruns, last = spare, one, np.int64(spare[m - 1])
        else:
            m = k_c
            vals, vruns = rank, runs[rs[i]: rs[i + 1]]
        k0 = 0  # the mean gap + 1 of sorted values telescopes to (last + 1) / m
        while (m << (k0 + 1)) <= last + 1:
            k0 += 1
        k_lo, k_hi = max(0, k0 - 2), min(max_k, k0 + 2)
        best_k, q = _cheapest_k(m, k_lo, k_hi, _rice_sums(vals, vruns, k_lo, True))
        meta[i, 1] = best_k
        meta[i, 2] = (m + q + 7) // 8
        meta[i, 3] = (m * best_k + 7) // 8
        total += meta[i, 2] + meta[i, 3]
    out = np.empty(total, np.uint8)  # every byte written
    o = 0
    for i in range(cls_ids.size):
        if meta[i, 0] == 2:
            continue
        if meta[i, 0] == 1:
            one[0, 1] = _complement_into(rank, runs[rs[i]: rs[i + 1]], counts[cls_ids[i]], spare)
            vals, vruns = spare, one
        else:
            vals, vruns = rank, runs[rs[i]: rs[i + 1]]
        u, x = meta[i, 2], meta[i, 3]
        _rice_write(vals, vruns, meta[i, 1], out[o: o + u], out[o + u: o + u + x], -1)
        o += u + x
    return out


@njit(nogil=True, cache=True)
def rice_quotient_bits(values, k):
    """sum(g >> k) over the Rice gaps g of sorted unique `values` (as `rice_cost`): the unary stream's zeros.
    Refuses values that are not sorted, unique and non-negative: a gap below 0 would size a stream too small."""
    s = np.int64(0)
    prev = np.int64(-1)
    for i in range(values.size):
        v = values[i]
        if v <= prev:
            raise ValueError("Rice-coded values must be sorted, unique and not negative")
        s += (v - prev - 1) >> k
        prev = v
    return s


# ------------------------------------------------------------------------------------------------------ bit streams
@njit(nogil=True, cache=True)
def _put(out, o, acc, nacc, value, width):
    """Append `width` (<= 32) low bits of `value`, MSB first, to a byte stream with a pending bit accumulator."""
    acc = (acc << width) | (value & ((1 << width) - 1))
    nacc += width
    while nacc >= 8:
        out[o] = (acc >> (nacc - 8)) & 0xFF
        o += 1
        nacc -= 8
    acc &= (1 << nacc) - 1
    return o, acc, nacc


@njit(nogil=True, cache=True)
def _flush(out, o, acc, nacc):
    if nacc:
        out[o] = (acc << (8 - nacc)) & 0xFF
        o += 1
    return o


@njit(nogil=True, cache=True)
def rice_encode(values, k):
    """The Rice streams of sorted unique `values` (coded as their gaps, ``v[i] - v[i-1] - 1``): unary quotients (q
    zeros then a one) and k-bit remainders, each MSB first and zero-padded to whole bytes -- the bytes ``np.packbits``
    of the two bit sequences gives. Sized by `rice_quotient_bits` (which refuses values the writer would write
    outside its streams for), then written a word at a time (`_rice_write`)."""
    n = values.size
    unary = np.empty((rice_quotient_bits(values, k) + n + 7) // 8, np.uint8)
    rem = np.empty((n * k + 7) // 8, np.uint8)
    _rice_write(values, _whole(values), k, unary, rem, -1)
    return unary, rem


@njit(nogil=True, cache=True, inline="always")
def _compact_byte(np_, op, xp, o, count, m, top, zero):
    """`compact_streams` for the `count` (<= 8) elements from o: (sign byte, big byte, m, top, zero)."""
    sb = 0
    bb = 0
    for t in range(count):
        r = np.int64(np.int16(np.uint16(_ld16(np_, o + t)) - np.uint16(_ld16(op, o + t))))
        mag = abs(r)
        zero |= r == 0
        is_big = mag > 1
        sb |= np.int64(r < 0) << (7 - t)
        bb |= np.int64(is_big) << (7 - t)
        _st16(xp, m, mag - 2)  # overwritten by the next big one unless this one is big
        m += is_big
        top = max(top, (mag - 2) * is_big)
    return sb, bb, m, top, zero


@njit(nogil=True, cache=True)
def compact_streams(new_at, old_at, signs, big, extra):
    """The compact encoding's residual streams in one pass over the changed elements' new and old bits: each residual
    ``new - old`` (int16, wrapping), its sign bit into `signs` and ``|residual| > 1`` into `big` (both bitmaps MSB
    first, as ``np.packbits``), and ``|residual| - 2`` of the big ones, in order, into `extra` (uint16, as long as
    the inputs). Returns (how many big, the largest extra), or (-1, 0) at a residual of 0 (not a change).
    Branch-free, eight elements per byte built in registers: a branch on each random sign bit measured 5 ns per
    element, this 1.8 (the numpy expressions it replaced, with their temporaries, ~3.7)."""
    new_at, old_at = np.ascontiguousarray(new_at), np.ascontiguousarray(old_at)
    np_, op, xp = new_at.ctypes.data, old_at.ctypes.data, extra.ctypes.data
    n = new_at.size
    if old_at.size != n or extra.size < n or signs.size < (n + 7) // 8 or big.size < (n + 7) // 8:
        raise ValueError("compact_streams: inputs of one length, outputs as long")  # raw stores: no bounds checks
    whole = n - n % 8
    m = 0
    top = 0
    zero = False
    for o in range(0, whole, 8):  # a constant 8 per byte: unrolled
        sb, bb, m, top, zero = _compact_byte(np_, op, xp, o, 8, m, top, zero)
        signs[o >> 3] = sb
        big[o >> 3] = bb
    if whole < n:
        sb, bb, m, top, zero = _compact_byte(np_, op, xp, whole, n - whole, m, top, zero)
        signs[whole >> 3] = sb
        big[whole >> 3] = bb
    if zero:
        return -1, 0
    return m, top


@njit(nogil=True, cache=True)
def _unary_quotients(unary, clz8, bit, k, count, out):
    """Reads `count` unary quotients (q zeros then a one) from bit `bit` on, writing out[t] = q << k. Returns
    (status, next bit): status 0, -1 when the stream ends early, -3 when a gap would not fit 62 bits."""
    nbits = unary.size * 8
    for t in range(count):
        q = 0
        while True:
            if bit >= nbits:
                return -1, bit
            off = bit & 7
            rest = (np.int64(unary[bit >> 3]) << off) & 0xFF
            if rest == 0:
                q += 8 - off
                bit += 8 - off
            else:
                z = clz8[rest]
                q += z
                bit += z + 1
                break
        if k and q >= (np.int64(1) << (62 - k)):
            return -3, bit
        out[t] = q << k
    return 0, bit


@njit(nogil=True, cache=True)
def _or_remainders(rem, rbit, k, count, out):
    """ORs `count` fixed-width k-bit remainders (MSB first), the first at bit `rbit` of `rem`, into out[:count]."""
    if k <= 48:  # the accumulator holds at most 7 spare bits + k < 63
        mask = (np.int64(1) << k) - 1
        o = rbit >> 3
        nacc = 8 - (rbit & 7)
        acc = np.int64(rem[o]) & ((np.int64(1) << nacc) - 1)
        o += 1
        for t in range(count):
            while nacc < k:
                acc = (acc << 8) | rem[o]
                o += 1
                nacc += 8
            nacc -= k
            out[t] |= (acc >> nacc) & mask
            acc &= (np.int64(1) << nacc) - 1
    else:
        for t in range(count):
            r = np.int64(0)
            for _ in range(k):
                r = (r << 1) | ((rem[rbit >> 3] >> (7 - (rbit & 7))) & 1)
                rbit += 1
            out[t] |= r


@njit(nogil=True, cache=True)
def rice_decode(unary, rem, n, k, clz8, gaps):
    """Inverse of `rice_encode` into `gaps` (int64, n long). Returns 0, or -1 when the unary stream holds fewer than
    n entries, -2 when the remainder stream is shorter than n*k bits, -3 when a gap would not fit 62 bits."""
    status, _ = _unary_quotients(unary, clz8, 0, k, n, gaps)
    if status != 0:
        return status
    if k == 0 or n == 0:
        return 0
    if rem.size * 8 < n * k:
        return -2
    _or_remainders(rem, 0, k, n, gaps)
    return 0


@njit(nogil=True, cache=True)
def complement(sorted_ranks, n):
    """0..n-1 without the (sorted, unique, in-range) `sorted_ranks`."""
    out = np.empty(n - sorted_ranks.size, np.int64)
    _complement_into(sorted_ranks, _whole(sorted_ranks), n, out)
    return out


@njit(nogil=True, cache=True)
def pack_low_bits(sym, residual):
    """The extra-bit stream: for each symbol of bucket b >= 4 (in order), the low b - 2 bits of its residual's
    magnitude, MSB first, concatenated and zero-padded to whole bytes."""
    total = 0
    for i in range(sym.size):
        b = sym[i] // 2 + 1
        if b >= 4:
            total += b - 2
    out = np.zeros((total + 7) // 8, np.uint8)
    o, acc, nacc = 0, 0, 0
    for i in range(sym.size):
        b = sym[i] // 2 + 1
        if b >= 4:
            r = np.int64(residual[i])
            m = -r if r < 0 else r
            o, acc, nacc = _put(out, o, acc, nacc, m - (np.int64(1) << (b - 2)), b - 2)
    _flush(out, o, acc, nacc)
    return out


# ----------------------------------------------------------------------------------------------- chunked decode
@njit(nogil=True, cache=True)
def rice_positions_chunk(unary, rem, k, clz8, i0, count, ubit, prev, limit, out):
    """Entries i0 .. i0+count-1 of a Rice gap stream as positions, resumable: `ubit` is where entry i0's unary
    quotient starts, `prev` the position before it (-1 at the start); entry i's k-bit remainder starts at bit i*k
    (fixed width). Writes out[:count] and returns (status, next ubit, last position); status 0, or -1 when the
    unary stream ends early, -2 when the remainder stream is shorter than (i0 + count) * k bits, -3 when a gap would
    not fit 62 bits, -4 when a position reaches `limit` -- the same checks, in the same order of entries, as
    `rice_decode` followed by a check that every position lies below `limit`."""
    status, bit = _unary_quotients(unary, clz8, ubit, k, count, out)
    if status != 0:
        return status, bit, prev
    if k and count > 0:
        if rem.size * 8 < (i0 + count) * k:
            return -2, bit, prev  # after the unary checks, as rice_decode orders them
        _or_remainders(rem, i0 * k, k, count, out)
    p = prev
    for t in range(count):
        g = out[t]
        if g < 0 or g >= limit or p + g + 1 >= limit:
            return -4, bit, p
        p += g + 1
        out[t] = p
    return 0, bit, p


@njit(nogil=True, cache=True)
def compact_residuals(signs, big, extra, n_big, width, i0, count, j, out):
    """Residuals i0 .. i0+count-1 of a compact tensor into `out` (uint16 view of the int16 residuals): sign bit i
    of `signs`, "moved more than one ulp" bit i of `big` (both packed MSB first), and for those the next extra
    magnitude ``|r| - 2`` -- entry j of `extra` (width 1), or low byte ``extra[j]`` and high byte
    ``extra[n_big + j]`` (width 2: two byte planes). Returns the next j, or -1 when `extra` runs out."""
    for t in range(count):
        i = i0 + t
        shift = 7 - (i & 7)
        neg = (signs[i >> 3] >> shift) & 1
        if (big[i >> 3] >> shift) & 1:
            if j >= n_big:
                return -1
            m = np.int64(extra[j]) + 2
            if width == 2:
                m += np.int64(extra[n_big + j]) << 8
            j += 1
        else:
            m = np.int64(1)
        out[t] = ((m ^ -neg) + neg) & 0xFFFF  # -m when negative, wrapping to 16 bits as the encoder's int16 view
    return j
