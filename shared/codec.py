"""Sparse encodings of one changed tensor: which flat positions changed, and their new bf16 bit patterns.

Everything here works on numpy arrays of bf16 *bit patterns* (uint16), never on floats, so encode/decode is lossless
by construction and independent of torch.

Encodings (a registry, like vLLM's weight-transfer backends; the name is stored in each delta file's header):

* ``raw`` -- positions as int32 (int64 for tensors of 2**31 elements or more) and the new values as bf16: the layout
  TRL's delta-sync branch writes. 6 bytes per changed element. Needs nothing from the base.

* ``compact`` (default) -- about 1.1-1.3 bytes per changed element at RL densities (0.5-5 %):
    - positions: sorted gaps ``g_i = p_i - p_{i-1} - 1`` Rice-coded with one parameter ``k`` per tensor chosen to
      minimise the size, written as two separate bit streams -- the unary quotients (``g >> k`` zeros, then a one)
      and the fixed-width ``k``-bit remainders (packed and unpacked by compiled loops, `codec_kernels`). For
      geometric gaps Rice coding is within a few percent of the entropy floor.
    - values: the residual against the base in bit-pattern space, ``(new_bits - base_bits) mod 2**16`` read as int16
      (never 0: only changed elements are stored). An RL step moves most changed weights by exactly one ulp, so the
      residual is stored as three parts: the signs as raw packed bits (they are coin flips), a packed bitmap of
      "moved more than one ulp" and the extra magnitudes ``|r| - 2`` of those few (1 or 2 byte planes); bitmap and
      extras are zstd-compressed, where the skewed bitmap bytes entropy-code to well under a bit per element.
  Decoding values therefore needs the base values at the changed positions, which every reader has: a delta is only
  ever applied onto exactly its base (docs/design.md §3.4 rule 1).

* ``ctx`` (v2, selectable; not yet the publisher's default because the vLLM replica must first pass the base) -- codes
  only what a replica holding the exact base cannot predict. The *context* of an element is its base value's bf16
  exponent field (``(bits >> 7) & 0xFF``): a weight's exponent sets its rounding step, so under the same optimizer
  step small weights cross a bf16 rounding boundary far more often (measured: P(change) halves with every binade).
    - positions: per exponent class ``c`` the ranks of the changed elements *among the class's elements* (in position
      order), Rice-coded gaps with a per-class parameter; a class where most elements changed codes its unchanged
      ranks instead, a class that changed entirely codes nothing. The class sizes ``n_c`` are in the header, so a
      wrong base is usually refused (FormatError) before anything is decoded.
    - residuals: a symbol ``(magnitude bucket, sign)`` per changed element -- buckets 1, 2, 3, then
      ``[2**b, 2**(b+1))`` with ``b`` raw low bits -- in class-major order: large weights move by one ulp, tiny ones
      by many, so inside its class a bucket carries only 0.1-0.4 bits. The signs are coin flips, stored as raw bits;
      the buckets as one zstd frame of one byte each (residual coder ``"zstd"``, `codec_coder`: zstd and its loops
      release the GIL, 2-3 ns per element each way). Files of the first coder (``"range"``: whole symbols
      range-coded with ``constriction`` under a frequency table per class, ~0.1-0.2 bits per element smaller but
      12-21 ns per element to decode, holding the GIL) still decode.
  Encoding and decoding read the *whole* base tensor (its exponents), O(numel) per changed tensor: compiled passes
  (`codec_kernels`) that count every element's class, chunk by chunk on every core. The encoder's pass can be the
  change detection itself: `diff_bits(new, old, context=True)` (`diff_many` for a model) ranks each changed element
  while it finds it, in the same single read of both versions, and each chunk codes its part of every stream while
  it is in cache (per class: the Rice codes of its ranks, its residuals' streams; with the mode and Rice parameter
  each class's rate in the detection's sample calls for) -- the last chunk of a tensor joins the parts. The encoder
  gets a `BaseBits` (base bits + class sizes + the finished tensor) and has nothing left to do.
  ``warm_up()`` loads the compiled code (numba's on-disk cache) before a process's first publish or sync.

Base-context decode API (what a replica calls):

    enc = get_encoding(name)                      # name: the tensor's entry in the file header (formats.py)
    if enc.needs_base_context:
        dec = enc.decode(arrays, params, numel, base_context=base)   # base: the tensor's current weights, flat
    else:
        dec = enc.decode(arrays, params, numel)
    new_bits = dec.resolve(base_bits_at(dec.positions) if dec.needs_base else None)

``base`` is the full base tensor: a bf16 torch tensor on any device (CUDA keeps the O(numel) exponent sort on the
GPU; only sparse ranks/positions reach the host), its uint16/int16 bit patterns as numpy/torch, or a `BaseBits`,
``numel`` long.
`formats.read_patch_file` does not have the base, so it returns a `ContextTensor` for such tensors (``.count`` is
known from the header); call ``ctx.decode(base)`` -> `DecodedTensor` (validated, positions sorted) before applying,
or ``formats.resolve_context(pf, {name: base})`` to decode all of a file's on a thread pool. A base that is not the
delta's base is usually refused (FormatError: class sizes differ); when it is not, the weights digest after applying
catches it. Decoding never writes: the caller applies, as for every other encoding.
Encodings that need no base decode in slices too (``decode_chunks``; `StreamedTensor`, what
``formats.DeltaReader.streamed`` yields): a replica's gateway holds one slice of a tensor, never all of its positions.
``bf16_bits`` below is the one helper that views bf16 weights as uint16 bit patterns.
"""

from __future__ import annotations

import functools
import os
import threading
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import zstandard

from shared import codec_buffers as _buffers
from shared.errors import FormatError

ZSTD_LEVEL = 3
_MAX_K = 62


def bf16_bits(t: Any) -> np.ndarray:
    """Zero-copy uint16 view of bf16 weights: a CPU bf16 torch tensor (a GPU one is copied to the host), or a
    numpy uint16/int16 array of bf16 bit patterns. Writes into the view of a contiguous CPU tensor reach the tensor.
    """
    if isinstance(t, np.ndarray):
        if t.dtype != np.uint16 and t.dtype != np.int16:
            raise TypeError(f"expected bf16 bit patterns (uint16), got numpy {t.dtype}")
        return np.ascontiguousarray(t).view(np.uint16)
    import torch  # here, not at import time: the protocol core must import without torch (pyproject.toml)

    if t.dtype != torch.bfloat16:
        raise TypeError(f"expected bf16, got {t.dtype}")
    # .contiguous() copies only a non-contiguous tensor; callers that write through the view must pass a
    # contiguous one, or their writes land in that copy.
    return t.detach().to("cpu").contiguous().view(torch.int16).numpy().view(np.uint16)


def bf16_from_bits(a: np.ndarray):
    """The inverse view: a bf16 torch tensor sharing memory with uint16 bit patterns."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)


@dataclass(frozen=True)
class Precoded:
    """A ctx tensor `diff_bits(context=True)` encoded while it read the base (each chunk coded its part of every
    stream while the chunk was in cache, `codec_kernels.coded_out`; the chunk that finished last joined them,
    `codec_kernels.assemble_classes`), so the encoder has nothing left to read or code. Valid only with the very
    arrays the detection returned."""

    positions: np.ndarray
    new_at: np.ndarray
    old_at: np.ndarray
    tensor: "EncodedTensor"


@dataclass(frozen=True)
class BaseBits:
    """A base tensor's flat uint16 bits with what `diff_bits(context=True)` counted while reading them: the class
    sizes per `_BaseClasses.chunk` elements (exponents pooled to the ctx header's ``[lo, hi]``) and the changes
    already ctx-encoded."""

    bits: np.ndarray
    histogram: np.ndarray  # int64 [chunks, 256]: class sizes (exponents, or classes once pooled)
    chunk: int
    precoded: Precoded | None = None

    def reshape(self, *shape) -> np.ndarray:
        return self.bits.reshape(*shape)


_SCRATCH = threading.local()
# The detection's sample (`_Diff`): runs of _SAMPLE_RUN elements spread through the tensor (not a prefix: a matrix's
# rows differ in scale), at least _SAMPLE_MIN elements of it and at most one run per _SAMPLE_STRIDE; all of a tensor
# under _SAMPLE_ALL_BELOW elements.
_SAMPLE_RUN = 256
_SAMPLE_STRIDE = 1 << 16
_SAMPLE_MIN = 1 << 15
_SAMPLE_ALL_BELOW = 1 << 18


def _scratch(n: int, *, coded: bool = False) -> tuple[np.ndarray, ...]:
    """This thread's chunk-sized buffers for one chunk of `diff_bits` (positions, new, old; `coded` adds classes,
    chunk-local ranks, and the ranks, residuals and complements `coded_out` sorts class by class), reused: a chunk
    writes only its few changed elements, and fresh model-sized buffers would fault in (and zero) a whole huge page
    per chunk and array for them -- measured up to seconds per 0.6B model when memory is fragmented."""
    bufs = getattr(_SCRATCH, "bufs", None)
    if bufs is None or bufs[0].size < n:
        # Ranks are chunk-local: below the chunk size.
        bufs = (np.empty(n, np.int64), np.empty(n, np.uint16), np.empty(n, np.uint16), np.empty(n, np.uint8),
                np.empty(n, np.int32), np.empty(n, np.int32), np.empty(n, np.int16), np.empty(n, np.int32))
        _SCRATCH.bufs = bufs
    return tuple(a[:n] for a in bufs[: 8 if coded else 3])


def diff_bits(new: np.ndarray, old: np.ndarray, *,
              context: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, BaseBits | np.ndarray]:
    """Change detection in one parallel read of both tensors (flat uint16 bits, same length): the positions (int64,
    sorted) where they differ, the new and old values there, and the base to hand the encoders. With `context`
    (the encoding reads the base: ctx) every changed element is also ranked in its class on the way, returned inside
    a `BaseBits`; without (or when nothing changed), the base is `old` itself. `diff_many` for a whole model."""
    return diff_many([(new, old)], context=context)[0]


def diff_many(pairs: list[tuple[Any, Any]], *, context: bool = False) -> list[tuple]:
    """`diff_bits` of every (new, old) pair, their chunks as one queue on the kernel pool: a model's tensors are one
    to a few chunks each (the embedding ~150), so a pool per tensor left cores idle between tensors -- measured at
    0.6B, the kernels busy 40 % (compact) to 65 % (ctx) of the detection's wall time when tensors were diffed on a
    pool of their own and their chunks on another."""
    diffs = [_Diff(new, old, context=context) for new, old in pairs]
    todo = [(d, i) for d in diffs for i in range(len(d.bounds))]  # each tensor's chunks in order: see `_Diff.chunk`
    K = _kernels()
    # The samples as one task per core: a task per chunk (682 at 0.6B) cost more in the pool's hand-offs (~15 us
    # each) than most of the samples themselves.
    ways = min(len(diffs), os.cpu_count() or 1)
    K.run_chunks(lambda g: [d.sample() for d in diffs[g::ways]], ways)
    for d in diffs:
        d.allocate()
    K.run_chunks(lambda j: todo[j][0].chunk(todo[j][1]), len(todo))
    out = []
    for d in diffs:
        if d.overflowed():  # more changes than the sample promised room for: again, with the exact room
            d.allocate(exact=True)
            K.run_chunks(d.chunk, len(d.bounds))
            if d.overflowed():
                raise ValueError("the tensors changed while they were being compared")
        out.append(d.result())
    return out


class _Diff:
    """One tensor's change detection, chunk by chunk, in one read of both versions.

    Each chunk is diffed (with `context`: and ranked *locally*, among its own class elements) into this thread's
    scratch -- for ctx it then codes its part of every stream while the scratch is still in cache
    (`codec_kernels.coded_out`; the encoder only joins the parts) -- and then, in chunk order, it takes its slot in
    the tensor's outputs and copies its changes there (`codec_kernels.changes_out`). No pass counts first -- the ctx
    detection's counting pass cost a full read of both versions, 90 of 230 ms of kernel time at 0.6B. What a chunk
    cannot know ahead comes from a sample read before (`sample`: 1/256 of a large tensor, at least 32 Ki elements,
    all of a tensor under 2**18): the outputs' size, with room to spare (a tensor that outgrows it runs again with
    the exact size it counted), and for ctx the pooling bounds and each class's Rice parameter and mode
    (`_rice_choices`) -- any of them decode, the header carries them; a sample only risks a slightly larger file.

    Chunks of one tensor wait for their predecessor's slot (`chunk`), never for anything started after them:
    `codec_kernels.run_chunks` starts calls in index order, so a chunk's predecessor is always already running or
    done."""

    def __init__(self, new: Any, old: Any, *, context: bool):
        self.new, self.old = bf16_bits(new).reshape(-1), bf16_bits(old).reshape(-1)
        if self.new.size != self.old.size:
            raise ValueError(f"cannot diff {self.new.size} elements against {self.old.size}")
        self.context = context
        self.numel = numel = self.new.size
        chunk = _BaseClasses.chunk
        self.bounds = [(s, min(s + chunk, numel)) for s in range(0, numel, chunk)]
        self.shist, self.schanged = np.zeros((2, _N_CLASSES), np.int64)
        self.sampled = (0, 0)  # elements read, changes among them

    def sample(self) -> None:
        # Runs of 256 elements, the next two prefetched (`sample_histogram_changes`: without the prefetch each run
        # paid its pages' misses, 4 ns per sampled element): at least 32 Ki elements of a tensor (its pooling tails
        # are numel / 512: ~64 of them sampled), at most 1 / 256 of a large one.
        stride = _SAMPLE_RUN
        if self.numel >= _SAMPLE_ALL_BELOW:
            stride = min(_SAMPLE_STRIDE, self.numel * _SAMPLE_RUN // _SAMPLE_MIN // _SAMPLE_RUN * _SAMPLE_RUN)
        self.sampled = _kernels().sample_histogram_changes(self.new, self.old, _SAMPLE_RUN, stride, self.shist,
                                                           self.schanged)

    def allocate(self, *, exact: bool = False) -> None:
        nch, numel = len(self.bounds), self.numel
        if exact:
            self.room = int(self.turn["off"])
        else:
            read, seen = self.sampled
            self.room = min(numel, int(1.25 * seen * numel / max(read, 1)) + 4096)
            if self.context:
                self.lo, self.hi = _pooling_bounds(self.shist * numel // max(read, 1), numel)
                self.table = _class_table(self.lo, self.hi)
                self.ks, self.modes = _rice_choices(self.shist, self.schanged, self.lo, self.hi)
        if self.context:
            self.hist = np.zeros((nch, _N_CLASSES), np.int64)
            self.rows = np.empty((nch, _N_CLASSES, _kernels().P_FIELDS), np.int64)  # coded_out sets every row
            self.pieces = [None] * nch
            self.done, self.encoded = 0, None
        self.pos, self.new_at, self.old_at = _buffers.empty_many(self.room, [np.int64, np.uint16, np.uint16])
        self.turn = {"next": 0, "off": 0}
        self.ordered = threading.Condition()

    def chunk(self, i: int) -> None:
        K = _kernels()
        s, e = self.bounds[i]
        scratch = _scratch(_BaseClasses.chunk, coded=self.context)
        k = 0
        try:
            if self.context:
                k = K.diff_ranks(self.new[s:e], self.old[s:e], s, self.table, self.hist[i], *scratch[:5])
                # Coded before the chunk's turn: it needs nothing from the chunks before it, which meanwhile finish
                # their own detection -- taken straight after diff_ranks, the turn cost 20-65 ms of waiting per 0.6B
                # detection (two threads on consecutive chunks of one tensor).
                if k >= 0:  # even without a change: a class coded by its unchanged ranks has some in every chunk
                    self.pieces[i] = K.coded_out(*(a[:k] for a in scratch[1:5]), self.hist[i], self.ks, self.modes,
                                                 *scratch[5:], self.rows[i])
            else:
                k = K.diff_bits(self.new[s:e], self.old[s:e], s, *scratch)
        finally:
            # Every chunk takes its turn, even one that failed: the chunks after it wait for it.
            with self.ordered:
                self.ordered.wait_for(lambda: self.turn["next"] == i)
                off = self.turn["off"]
                self.turn["off"] += max(k, 0)
                self.turn["next"] = i + 1
                self.ordered.notify_all()
        if k < 0:  # more changes than the chunk has elements: only if it changed meanwhile
            raise ValueError("the tensors changed while they were being compared")
        if off + k > self.room:
            return
        if k:
            K.changes_out(*(a[:k] for a in scratch[:3]), off, self.pos, self.new_at, self.old_at)
        if self.context:
            with self.ordered:
                self.done += 1
                last = self.done == len(self.bounds)
            # The tensor's last chunk joins the pieces here, among the other tensors' chunks on the kernel pool, not
            # in the encoder afterwards: the join's zstd and Python steps fill the cores' gaps between kernels.
            if last and self.turn["off"] <= self.room and self.turn["off"]:
                self.encoded = _join_pieces(self)

    def overflowed(self) -> bool:
        return self.turn["off"] > self.room

    def result(self) -> tuple:
        m = int(self.turn["off"])
        if m == 0:  # nothing changed (a model's norms, often)
            return np.zeros(0, np.int64), np.zeros(0, np.uint16), np.zeros(0, np.uint16), self.old
        pos, new_at, old_at = self.pos[:m], self.new_at[:m], self.old_at[:m]
        if not self.context:
            return pos, new_at, old_at, self.old
        return pos, new_at, old_at, BaseBits(self.old, self.hist, _BaseClasses.chunk,
                                             Precoded(pos, new_at, old_at, self.encoded))


def warm_up() -> float:
    """Load the codec's compiled passes now (from numba's on-disk cache; compiling them the first time on a machine)
    instead of inside the first publish or sync: detects, encodes and decodes a small tensor with every encoding
    that codes positions, through both ctx paths. Returns the seconds it took; raises if a round trip is not exact."""
    import time

    t0 = time.perf_counter()
    base = (np.arange(4096, dtype=np.uint16) * 7919 % 1024 + 0x3800).astype(np.uint16)
    new = base.copy()
    new[::5] += 1
    new[1::9] -= 300  # wide residuals: the extra-bit streams
    new[base >> 7 == base[0] >> 7] += 2  # one class changes entirely ...
    new[(base >> 7 == base[1] >> 7) & (np.arange(4096) % 3 > 0)] += 1  # ... and one mostly
    for name, context in (("compact", False), ("ctx", True), ("ctx", False)):
        positions, new_at, old_at, ctx = diff_bits(new, base, context=context)
        enc = get_encoding(name)
        out = enc.encode(positions, new_at, old_at, base.size, base_context=ctx)
        dec = enc.decode(out.arrays, out.params, base.size, base_context=base)
        if not (np.array_equal(dec.positions, positions) and np.array_equal(dec.resolve(old_at), new_at)):
            raise AssertionError(f"{name} does not round-trip its warm-up tensor")  # a codec bug, never data
        if name == "compact":  # the chunked decode's kernels too (a replica's gateway decodes compact slice by slice)
            parts = list(StreamedTensor(name, out.arrays, out.params, base.size, positions.size).chunks(1000))
            if not np.array_equal(np.concatenate([p.positions for p in parts]), positions):
                raise AssertionError(f"{name}'s chunked decode differs from its warm-up tensor")
    return time.perf_counter() - t0


@dataclass(frozen=True)
class EncodedTensor:
    """What an encoding stores for one tensor: named arrays (safetensors tensors) and small JSON-able params."""

    arrays: dict[str, np.ndarray]
    params: dict


@dataclass(frozen=True)
class DecodedTensor:
    """Positions (int64, sorted, unique) plus either absolute new bit patterns or residuals against the base."""

    positions: np.ndarray
    values: np.ndarray | None = None  # uint16 bf16 bit patterns
    residual: np.ndarray | None = None  # int16, wrapping: new = base + residual (mod 2**16)

    needs_base_context = False  # already decoded: see ContextTensor for the other kind

    @property
    def needs_base(self) -> bool:
        return self.values is None

    def resolve(self, base_at_positions: np.ndarray | None) -> np.ndarray:
        """The new uint16 bit patterns at `positions`."""
        if self.values is not None:
            return self.values
        if base_at_positions is None:
            raise FormatError("this delta stores residuals: decoding needs the base values")
        base = np.asarray(base_at_positions).view(np.uint16)
        if base.shape != self.residual.shape:
            raise FormatError(f"base values {base.shape} do not match {self.residual.shape} changed positions")
        return (base + self.residual.view(np.uint16)).astype(np.uint16)  # uint16 arithmetic wraps, as encoded


    @property
    def count(self) -> int:
        return int(self.positions.size)


class Encoding(Protocol):
    """`needs_base_context`: encode and decode need the whole base tensor (`base_context=`, flat, numel long)."""

    name: str
    needs_base_context: bool

    def encode(self, positions: np.ndarray, new_bits: np.ndarray, base_bits: np.ndarray, numel: int, *,
               base_context: Any = None) -> EncodedTensor:
        ...

    def decode(self, arrays: dict[str, np.ndarray], params: dict, numel: int, *,
               base_context: Any = None) -> DecodedTensor:
        ...


@dataclass(frozen=True)
class ContextTensor:
    """A tensor whose encoding needs the base to decode (read before the base is at hand): `decode(base)`."""

    encoding: str
    arrays: dict[str, np.ndarray]
    params: dict
    numel: int

    needs_base_context = True

    @property
    def count(self) -> int:
        """Changed elements, from the header (known before decoding)."""
        try:
            return int(self.params["n"])
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"{self.encoding} delta tensor lacks its element count") from None

    def decode(self, base: Any) -> DecodedTensor:
        return get_encoding(self.encoding).decode(self.arrays, self.params, self.numel, base_context=base)


DECODE_CHUNK = 1 << 19  # changed elements per slice of a chunked decode: int64 positions + residuals of ~5 MB


@dataclass(frozen=True)
class StreamedTensor:
    """A tensor read but not yet decoded, decoded slice by slice: ``chunks()`` yields `DecodedTensor` slices of at
    most `chunk` changed elements (positions ascending across slices, each slice either ``values`` or ``residual``)
    whose concatenation is bit for bit what the encoding's whole ``decode`` returns. Memory is the encoded arrays
    plus one slice, never int64 positions of the whole tensor: what lets a replica's gateway decode the largest
    tensor of a model (the 0.6B tied embedding: ~7 M changed positions) without a tensor-sized peak. Encodings
    without a ``decode_chunks`` are decoded whole and sliced. Errors (FormatError) may surface at any slice: a
    consumer must not treat earlier slices as applied."""

    encoding: str
    arrays: dict[str, np.ndarray]
    params: dict
    numel: int
    count: int  # changed elements, known before decoding; the slices hold exactly this many (checked)

    needs_base_context = False

    def chunks(self, chunk: int = DECODE_CHUNK):
        enc = get_encoding(self.encoding)
        if hasattr(enc, "decode_chunks"):
            parts = enc.decode_chunks(self.arrays, self.params, self.numel, chunk=chunk)
        else:
            parts = _slices(enc.decode(self.arrays, self.params, self.numel), chunk)
        got = 0
        for part in parts:
            got += part.count
            if got > self.count:
                break
            yield part
        if got != self.count:
            raise FormatError(f"{self.encoding} delta tensor decodes to {got} elements, its header says {self.count}")

    def decode(self) -> DecodedTensor:
        """The whole tensor at once (what ``Encoding.decode`` returns)."""
        return get_encoding(self.encoding).decode(self.arrays, self.params, self.numel)


def _slices(dec: DecodedTensor, chunk: int):
    for lo in range(0, dec.count, chunk):
        yield DecodedTensor(positions=dec.positions[lo:lo + chunk],
                            values=None if dec.values is None else dec.values[lo:lo + chunk],
                            residual=None if dec.residual is None else dec.residual[lo:lo + chunk])


ENCODINGS: dict[str, Encoding] = {}


def register_encoding(cls: type) -> type:
    ENCODINGS[cls.name] = cls()
    return cls


def get_encoding(name: str) -> Encoding:
    try:
        return ENCODINGS[name]
    except KeyError:
        raise FormatError(f"unknown delta encoding {name!r} (known: {', '.join(sorted(ENCODINGS))})") from None


def check_positions(positions: np.ndarray, numel: int, *, what: str = "positions") -> None:
    """Positions must be sorted, unique and inside the tensor: anything else is a hostile or corrupt file."""
    if positions.ndim != 1:
        raise FormatError(f"{what} must be one-dimensional")
    if positions.size == 0:
        return
    if int(positions[0]) < 0 or int(positions[-1]) >= numel:
        raise FormatError(f"{what} out of range for a tensor of {numel} elements "
                          f"(min {int(positions.min())}, max {int(positions.max())})")
    if positions.size > 1 and not bool(np.all(positions[1:] > positions[:-1])):
        raise FormatError(f"{what} must be strictly increasing")


@register_encoding
class RawEncoding:
    """TRL's layout: `indices` int32 and `values` bf16 bit patterns (the file writer stores them as BF16)."""

    name = "raw"
    needs_base_context = False

    def encode(self, positions, new_bits, base_bits, numel, *, base_context=None):
        idx_dtype = np.int32 if numel < 2**31 else np.int64
        return EncodedTensor({"indices": positions.astype(idx_dtype), "values": new_bits.astype(np.uint16)}, {})

    def decode(self, arrays, params, numel, *, base_context=None):
        try:
            idx, vals = arrays["indices"], arrays["values"]
        except KeyError as exc:
            raise FormatError(f"raw delta tensor lacks {exc.args[0]!r}") from None
        if idx.dtype not in (np.int32, np.int64):
            raise FormatError(f"raw delta indices must be int32/int64, got {idx.dtype}")
        if vals.dtype != np.uint16:
            raise FormatError("raw delta values must be bf16")
        if idx.shape != vals.shape or idx.ndim != 1:
            raise FormatError(f"raw delta indices {idx.shape} and values {vals.shape} differ")
        positions = idx.astype(np.int64)
        check_positions(positions, numel)
        return DecodedTensor(positions=positions, values=vals)

    def decode_chunks(self, arrays, params, numel, *, chunk=DECODE_CHUNK, base_context=None):
        """`decode` in slices of `chunk`: positions widened to int64 one slice at a time."""
        idx, vals = arrays.get("indices"), arrays.get("values")
        if idx is None or vals is None or idx.dtype not in (np.int32, np.int64) or vals.dtype != np.uint16 \
                or idx.shape != vals.shape or idx.ndim != 1:
            self.decode(arrays, params, numel)  # raises the whole decode's FormatError for the same input
        prev = -1
        for lo in range(0, idx.size, chunk):
            positions = idx[lo:lo + chunk].astype(np.int64)
            check_positions(positions, numel)
            if int(positions[0]) <= prev:
                raise FormatError("positions must be strictly increasing")
            prev = int(positions[-1])
            yield DecodedTensor(positions=positions, values=vals[lo:lo + chunk])


def _kernels():
    """The compiled loops (shared.codec_kernels), imported on first use: numba's import and cache load must not
    land in every `dws` command, only in those that encode or decode."""
    from shared import codec_kernels

    return codec_kernels


def _rice_k(gaps: np.ndarray, *, from_sorted: bool = False) -> int:
    """The Rice parameter that minimises n*(k+1) + sum(g >> k), searched around log2 of the mean gap. With
    `from_sorted`, `gaps` holds sorted unique values v coded as their gaps ``v_i - v_{i-1} - 1``: no gap array."""
    gaps = np.ascontiguousarray(gaps, dtype=np.int64)
    # The exact integer sum over n: the same float as gaps.mean() (every partial sum is an integer below 2**53, so
    # numpy's float summation is exact too), without its float pass. Gaps of sorted values telescope to
    # last + 1 - n.
    if from_sorted:
        total = int(gaps[-1]) + 1 - gaps.size if gaps.size else 0
    else:
        total = int(gaps.sum())
    mean = float(total) / gaps.size if gaps.size else 0.0
    k0 = max(0, int(np.floor(np.log2(mean + 1.0))))
    k_lo, k_hi = max(0, k0 - 2), min(_MAX_K, k0 + 2)
    if k_lo > k_hi:
        return 0
    return int(_kernels().rice_cost(gaps, k_lo, k_hi, from_sorted))


def rice_encode(gaps: np.ndarray, k: int, *, from_sorted: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Two packed bit streams: unary quotients (q zeros then a one) and k-bit remainders (MSB first). With
    `from_sorted`, `gaps` holds sorted unique values, coded as their gaps."""
    values = np.ascontiguousarray(gaps, dtype=np.int64)
    if not from_sorted:  # the values whose gaps these are
        values = np.cumsum(values + 1) - 1
    return _kernels().rice_encode(values, int(k))


def rice_decode(unary: np.ndarray, rem: np.ndarray, n: int, k: int) -> np.ndarray:
    """Inverse of `rice_encode`: n gaps (uint64). FormatError when the streams hold fewer than n entries."""
    K = _kernels()
    gaps = np.empty(n, np.int64)
    _check_rice_status(K.rice_decode(np.ascontiguousarray(unary, np.uint8), np.ascontiguousarray(rem, np.uint8),
                                     int(n), int(k), K._CLZ8, gaps), n, k, rem)
    return gaps.view(np.uint64)


def _check_rice_status(status: int, n: int, k: int, rem: np.ndarray) -> int:
    """The Rice kernels' error codes (`codec_kernels.rice_decode`, `rice_positions_chunk`) as FormatErrors; any other
    status is returned for the caller to judge."""
    if status == -1:
        raise FormatError(f"position stream holds fewer than the {n} entries the header says")
    if status == -2:
        raise FormatError(f"remainder stream too short: {rem.size * 8} bits for {n}x{k}")
    if status == -3:
        raise FormatError("position stream holds a gap wider than 62 bits")
    return status


def rice_positions(unary: np.ndarray, rem: np.ndarray, n: int, k: int, limit: int, *, what: str,
                   out: np.ndarray | None = None) -> np.ndarray:
    """Sorted, unique positions below `limit` from their Rice-coded gaps; FormatError for anything else. One
    compiled pass writes the positions straight from the streams (no gap array): the checks and their order are
    `rice_decode`'s, then the range check. `out` (n int64, optional) receives them instead of a new array."""
    if n == 0:
        return np.zeros(0, np.int64)
    K = _kernels()
    unary, rem = np.ascontiguousarray(unary, np.uint8), np.ascontiguousarray(rem, np.uint8)
    out = np.empty(n, np.int64) if out is None else out
    status, _, _ = K.rice_positions_chunk(unary, rem, int(k), K._CLZ8, 0, int(n), 0, -1, int(limit), out)
    if _check_rice_status(status, n, k, rem) != 0:
        raise FormatError(f"{what} out of range for {limit} elements")
    return out


@register_encoding
class CompactEncoding:
    name = "compact"
    needs_base_context = False

    def size_lower_bound(self, positions: np.ndarray, numel: int) -> int:
        """Bytes this encoding needs at least for these sorted positions -- its Rice streams under any k, plus one
        sign bit each -- from their count and the last one alone: a writer choosing the smallest encoding skips
        compact when another one already fits under this, without a pass over the positions (the exact streams'
        size cost one: ~25 ms of thread time per 0.6B delta, to learn that ctx had won by 15-25 %).

        The m gaps of sorted unique positions sum to G = last + 1 - m, and ``g >> k >= (g - 2**k + 1) / 2**k``, so
        the streams take at least ``f(k) = m * (k + 1) + max(0, ceil((G - m * (2**k - 1)) / 2**k))`` bits; f is
        convex in k (its steps ``m - (G - m) / 2**(k+1)`` grow), and bytes round up per stream."""
        m = int(positions.size)
        if m == 0:
            return 0
        total = int(positions[-1]) + 1 - m
        best = None
        for k in range(min(_MAX_K, max(total, 1).bit_length() + 1) + 1):
            quotients = max(0, -(-(total - m * ((1 << k) - 1)) >> k))
            size = (m + quotients + 7) // 8 + (m * k + 7) // 8
            best = size if best is None else min(best, size)
        return best + (m + 7) // 8

    def encode(self, positions, new_bits, base_bits, numel, *, base_context=None):
        positions = np.ascontiguousarray(positions, dtype=np.int64)
        k = _rice_k(positions, from_sorted=True)
        n = positions.size
        if np.shape(new_bits) != (n,) or np.shape(base_bits) != (n,):
            raise ValueError("positions, new and base values must have the same length")
        if n and int(positions[-1]) >= numel:  # (sorted and unique: rice_encode checks that on its way)
            raise ValueError("positions must be sorted, unique and inside the tensor")
        unary, rem = rice_encode(positions, k, from_sorted=True)
        signs, big = np.empty((n + 7) // 8, np.uint8), np.empty((n + 7) // 8, np.uint8)
        extra = np.empty(n, np.uint16)
        m, top = _kernels().compact_streams(np.ascontiguousarray(new_bits, np.uint16),
                                            np.ascontiguousarray(base_bits, np.uint16), signs, big, extra)
        if m < 0:
            raise ValueError("compact encoding stores changed elements only; a residual of 0 is not a change")
        extra = extra[:m]  # |residual| - 2, only where it exceeds one ulp
        width = 1 if top < 256 else 2
        extra_bytes = extra.astype(np.uint8) if width == 1 else extra.view(np.uint8).reshape(-1, 2).T.reshape(-1)
        ztail = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(big.tobytes() + extra_bytes.tobytes())
        blob = np.concatenate([unary, rem, signs, np.frombuffer(ztail, dtype=np.uint8)])
        return EncodedTensor({"": blob}, {"n": int(positions.size), "k": k, "u": int(unary.size), "r": int(rem.size),
                                          "w": width})

    @staticmethod
    def _layout(arrays, params, numel) -> tuple[np.ndarray, int, int, int, int, int]:
        """(payload, n, k, unary bytes, remainder bytes, extra width), checked against the payload's size."""
        try:
            blob = arrays[""]
            n, k, ulen, rlen, width = (int(params[x]) for x in ("n", "k", "u", "r", "w"))
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError(f"compact delta tensor has incomplete parameters ({exc})") from None
        if blob.dtype != np.uint8 or blob.ndim != 1:
            raise FormatError("compact delta payload must be a 1-D uint8 tensor")
        nbytes = (n + 7) // 8
        if not (0 <= n <= numel and 0 <= k <= _MAX_K and width in (1, 2) and 0 <= ulen and 0 <= rlen
                and ulen + rlen + nbytes <= blob.size):
            raise FormatError(f"compact delta parameters out of range: n={n} k={k} u={ulen} r={rlen} w={width}")
        return blob, n, k, ulen, rlen, width

    def decode(self, arrays, params, numel, *, base_context=None):
        """The whole tensor: `decode_chunks` in one slice (one int64 position array, no gap array or temporaries)."""
        n = int(params.get("n", 0)) if isinstance(params, dict) and str(params.get("n", "")).isdigit() else 0
        for part in self.decode_chunks(arrays, params, numel, chunk=max(n, 1)):
            return part
        return DecodedTensor(positions=np.zeros(0, np.int64), residual=np.zeros(0, np.int16))

    def decode_chunks(self, arrays, params, numel, *, chunk=DECODE_CHUNK, base_context=None):
        """`decode` in slices of `chunk` changed elements, bit for bit the same: the Rice gap stream and the residual
        streams are sequential, so each slice resumes where the last one stopped (`codec_kernels`). Memory: the
        decompressed residual tail (a bit per element + the few extra magnitudes) and one slice (10 bytes per
        element) -- the numpy decode this replaced held int64 gaps + positions + int32 temporaries, ~40 bytes per
        changed element of the whole tensor. The residual streams are checked whole before the first slice; a bad
        position surfaces at its slice."""
        blob, n, k, ulen, rlen, width = self._layout(arrays, params, numel)
        K = _kernels()
        nbytes = (n + 7) // 8
        unary = np.ascontiguousarray(blob[:ulen])
        rem = np.ascontiguousarray(blob[ulen: ulen + rlen])
        signs = np.ascontiguousarray(blob[ulen + rlen: ulen + rlen + nbytes])
        if k and rem.size * 8 < n * k:
            raise FormatError(f"remainder stream too short: {rem.size * 8} bits for {n}x{k}")
        try:
            tail = zstandard.ZstdDecompressor().decompress(blob[ulen + rlen + nbytes:].tobytes(),
                                                           max_output_size=nbytes + n * width)
        except zstandard.ZstdError as exc:
            raise FormatError(f"compact delta residuals do not decompress: {exc}") from None
        if len(tail) < nbytes:
            raise FormatError("compact delta residual stream is truncated")
        tail = np.frombuffer(tail, dtype=np.uint8)
        big, extra = tail[:nbytes], tail[nbytes:]
        # Bits past n in the bitmap's last byte are padding: the whole decode ignores them, so must the count.
        n_big = int(np.bitwise_count(big[: n // 8]).sum())
        if n % 8:
            n_big += int(np.bitwise_count(big[n // 8] >> (8 - n % 8)))
        if extra.size != n_big * width:
            raise FormatError(f"compact delta holds {extra.size} residual bytes, expected {n_big * width}")
        if n == 0:
            return
        ubit, prev, j = 0, -1, 0
        for lo in range(0, n, chunk):
            count = min(chunk, n - lo)
            positions = np.empty(count, np.int64)
            status, ubit, prev = K.rice_positions_chunk(unary, rem, k, K._CLZ8, lo, count, ubit, prev, numel,
                                                        positions)
            if _check_rice_status(status, n, k, rem) != 0:
                raise FormatError(f"positions out of range for {numel} elements")
            residual = np.empty(count, np.int16)
            j = K.compact_residuals(signs, big, extra, n_big, width, lo, count, j, residual.view(np.uint16))
            yield DecodedTensor(positions=positions, residual=residual)


# ----------------------------------------------------------------------------------------------------------- ctx
_N_CLASSES = 256  # the bf16 exponent field
_MODE_CHANGED, _MODE_UNCHANGED, _MODE_ALL = 0, 1, 2
_MAX_MSYM = 17  # magnitude buckets: 1, 2, 3 exact, then [2**b, 2**(b+1)) for b = 2..15 (|residual| <= 32768)
_FREQ_SCALE = 65535


_ZERO_RESIDUAL = "ctx encoding stores changed elements only; a residual of 0 is not a change"


def _pooling_bounds(counts: np.ndarray, numel: int) -> tuple[int, int]:
    """The classes to keep apart: pool each tail of exponents holding at most max(64, numel / 512) elements.

    Every kept class costs both O(numel) passes a vector compare per 64 elements, whatever it holds. Measured on
    real AdamW deltas (86 M-parameter model; lr 1e-6, 3e-6, warm): tails of numel / 2048 kept 14 classes per
    matrix, numel / 512 keeps 11 -- 0.2 % more bytes, decode 25-32 % faster; numel / 256 cost 0.6-1.2 % bytes
    for one class less, numel / 128 2-5 %. On the 0.6B bench's deltas numel / 512 cost 1.9 % at lr 1e-6 (a
    freshly initialised model's many tiny weights), 0.3-0.7 % at 3e-6 and 0.03 % warm."""
    tail = max(64, numel >> 9)
    low = np.cumsum(counts)  # elements at or below each exponent
    # lo: the first exponent with more than `tail` at or below it; hi: the last with more than `tail` at or above it
    # (fewer than total - tail below it). Two binary searches: called per tensor per version, hundreds of times.
    lo = int(np.searchsorted(low, tail, side="right"))
    hi = int(np.searchsorted(low - counts, int(low[-1]) - tail, side="left")) - 1
    if lo < _N_CLASSES and 0 <= hi and lo <= hi:
        return lo, hi
    nz = np.flatnonzero(counts)  # a tensor (nearly) all in its tails
    if nz.size == 0:
        return 0, _N_CLASSES - 1
    lo = lo if lo < _N_CLASSES else int(nz[-1])
    hi = hi if hi >= 0 else int(nz[0])
    return (lo, hi) if lo <= hi else (int(nz[0]), int(nz[-1]))


@functools.lru_cache(maxsize=None)
def _class_table(lo: int, hi: int) -> np.ndarray:
    """exponent -> class: ``clip(e, lo, hi)``, one array per bounds shared by every caller (never written: left
    writeable only because numba compiles every kernel again for read-only arrays)."""
    return np.clip(np.arange(_N_CLASSES), lo, hi).astype(np.uint8)


def _rice_choices(hist: np.ndarray, changed: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class, from a sample's elements and changes per exponent: the Rice parameter and mode the detection codes
    with before it has seen the whole tensor (`codec_kernels.rice_choices`)."""
    ks, modes = np.zeros((2, _N_CLASSES), np.int64)
    _kernels().rice_choices(hist, changed, lo, hi, ks, modes)
    return ks, modes


class _BaseClasses:
    """The exponent classes of one base tensor: class sizes, and ranks of elements inside their class.

    An element's class is its base exponent clamped to ``[lo, hi]`` (the pooled tails). Its rank is the number of
    elements of the same class before it in the tensor -- a definition that does not depend on how the work is cut:
    the host path counts classes chunk by chunk on `codec_kernels.run_chunks`' threads (one read of the base per pass:
    a histogram, then a walk that stops at the last changed element; the decoder of a tensor of at most `walk_max`
    elements counts its classes while it walks it, `walk`), the device path (a CUDA base) sorts the whole tensor on
    its device and moves only sparse indices to the host.
    """

    # Host tensors take the compiled path; tests set this to run the device path on the CPU.
    torch_on_cpu = False
    # Host path: elements per kernel call, the unit of parallelism inside one tensor -- small enough that a model's
    # typical matrices (1-3 M elements at 0.6B) span several, large enough that a call (~1 ms) dwarfs its dispatch.
    chunk = 1 << 20
    # Decoding a host tensor of at most this many elements needs no histogram pass: its walk counts the classes as it
    # goes (`walk`). Every size by default: with the flag-map walk the histogram and the per-chunk set-up cost more
    # than a whole walk saves by running chunks in parallel -- the 0.6B tied embedding (155 M elements) took 226 ms of
    # CPU as histogram + chunked walks, 144 ms as one walk -- and model-wide decodes (`formats.resolve_context`) keep
    # the cores busy with other tensors meanwhile. A caller decoding one huge tensor on idle cores may lower it ...
    walk_max = 1 << 62
    # ... and walks it in two halves on two threads (only the first counted beforehand) from this size on. Off by
    # default: model-wide decodes (`formats.resolve_context`) already fill the cores with tensors, and there the
    # one-thread walk measured ~9 % faster (1.69 s vs 1.84 s median at 0.6B) and does the least CPU work -- what a
    # replica decoding next to inference wants. A caller decoding one tensor at a time on idle cores may lower it.
    walk_split_min = 1 << 62

    def __init__(self, base: Any, numel: int, *, count_now: bool = True):
        """`count_now=False` (the decoder): a host tensor of at most `walk_max` elements is not counted here; its
        `counts` stay None until `walk` returns them. Classes exist once the caller has set the pooling bounds
        (`pool`): every caller does so next, so none is pooled twice."""
        self._torch = None
        device = getattr(getattr(base, "device", None), "type", None)
        if device is not None and (device != "cpu" or self.torch_on_cpu):
            import torch

            t = base.reshape(-1)
            t = t.view(torch.int16) if t.dtype in (torch.bfloat16, torch.uint16) else t
            if t.dtype != torch.int16:
                raise TypeError(f"base context must be bf16 or 16-bit bit patterns, got {t.dtype}")
            self._check_size(t.numel(), numel)
            self._torch, self._t = torch, t
            self._bounds = [(0, numel)] if numel else []
            raw = [torch.bincount(self._exps(0).to(torch.int32), minlength=_N_CLASSES).cpu().numpy()] if numel else []
            raw = np.array(raw, dtype=np.int64).reshape(-1, _N_CLASSES)
        elif isinstance(base, BaseBits) and base.chunk == self.chunk:
            self._b = bf16_bits(base.bits.reshape(-1))
            self._check_size(self._b.size, numel)
            self._bounds = [(s, min(s + self.chunk, numel)) for s in range(0, numel, self.chunk)]
            raw = base.histogram
        else:
            if isinstance(base, BaseBits):
                base = base.bits
            if not isinstance(base, np.ndarray):
                import torch

                base = base.reshape(-1)
                base = base.view(torch.int16) if base.dtype == torch.bfloat16 else base
                base = base.numpy()
            self._b = bf16_bits(np.asarray(base).reshape(-1))
            self._check_size(self._b.size, numel)
            if not count_now and numel <= self.walk_max:
                self._bounds, self._chunk_raw, self.counts = [(0, numel)], None, None
                return
            self._bounds = [(s, min(s + self.chunk, numel)) for s in range(0, numel, self.chunk)]
            raw = np.zeros((len(self._bounds), _N_CLASSES), np.int64)
            hist = _kernels().exponent_histogram
            _kernels().run_chunks(lambda i: hist(self._b[slice(*self._bounds[i])], raw[i]), len(self._bounds))
        self._chunk_raw = raw
        self.raw_counts = self._chunk_raw.sum(axis=0)  # classes and counts exist once `pool` has set the bounds

    def _exps(self, i: int):
        s, e = self._bounds[i]
        return ((self._t[s:e] >> 7) & 0xFF).to(self._torch.uint8)

    def _keys(self, i: int):
        return self._torch.clamp(self._exps(i), self.lo, self.hi)

    def pool(self, lo: int, hi: int) -> None:
        """Pool the exponents below `lo` into class `lo` and those above `hi` into `hi`: a class of a handful of
        elements costs more in header and frequency table than its context saves."""
        self.lo, self.hi = lo, hi
        self._table = _class_table(lo, hi)  # exponent -> class
        if self._chunk_raw is None:
            return  # not counted yet: `walk` counts
        raw, m = self._chunk_raw, self._chunk_raw.copy()
        m[:, lo] = raw[:, : lo + 1].sum(axis=1)
        m[:, :lo] = 0
        m[:, hi] = raw[:, hi:].sum(axis=1) if hi > lo else raw.sum(axis=1)  # lo == hi: one class holds all
        m[:, hi + 1:] = 0
        self._counts = m
        self._before = np.cumsum(m, axis=0) - m  # per chunk: the class's elements in earlier chunks
        self.counts = m.sum(axis=0)

    def pooling_bounds(self, numel: int) -> tuple[int, int]:
        """`_pooling_bounds` of this base's exponent counts."""
        return _pooling_bounds(self.raw_counts, numel)

    @staticmethod
    def _check_size(got: int, numel: int) -> None:
        if got != numel:
            raise FormatError(f"base context has {got} elements, the tensor has {numel}")

    def ranks(self, positions: np.ndarray, base_at: np.ndarray, new_at: np.ndarray,
              numel: int) -> tuple[np.ndarray, ...]:
        """For sorted, unique, in-range `positions` (base values `base_at`, new values `new_at` there): each changed
        element's rank in its class and its int16 residual ``new - base`` (wrapping), class-major in runs -- returns
        (rank, res, seg, cnt): part i's class c is ``rank[seg[i, c]: seg[i, c] + cnt[i, c]]`` (res likewise), the
        parts in position order (`_class_runs` lists them class by class); here one part (``seg``/``cnt`` one
        row)."""
        # int32 ranks below 2**31 elements: 4 bytes per changed element less to write and read.
        rank = _buffers.empty(positions.size, np.int32 if numel < 2**31 else np.int64)
        res = _buffers.empty(positions.size, np.int16)
        starts = self._class_major(positions, base_at, new_at, rank, res)
        return rank, res, starts[None, :-1], np.diff(starts)[None, :]

    def _class_major(self, positions: np.ndarray, base_at: np.ndarray, new_at: np.ndarray, rank: np.ndarray,
                     res: np.ndarray) -> np.ndarray:
        """`ranks` found from the base: written class-major into `rank` and `res`; returns `starts` (class c's are
        ``starts[c]:starts[c+1]``)."""
        K = _kernels()
        residual = (new_at - base_at).view(np.int16)  # uint16 wraps
        if self._torch is not None:
            cls, rank_pos = self._ranks_device(positions)
            order = np.argsort(cls, kind="stable")
            rank[:], res[:] = rank_pos[order], residual[order]
            return np.concatenate([[0], np.cumsum(np.bincount(cls, minlength=_N_CLASSES))])
        edges = [s for s, _ in self._bounds] + [self._bounds[-1][1] if self._bounds else 0]
        cuts = np.searchsorted(positions, edges)
        # Where each chunk's changed elements of each class go: class after class, chunk after chunk inside one.
        k = np.zeros((len(self._bounds), _N_CLASSES), np.int64)
        for i in range(len(self._bounds)):
            K.class_counts(base_at[cuts[i]: cuts[i + 1]], self._table, k[i])
        starts = np.concatenate([[0], np.cumsum(k.sum(axis=0))])
        slots = starts[:-1] + np.cumsum(k, axis=0) - k

        def one(i: int) -> None:
            (s, e), a, b = self._bounds[i], cuts[i], cuts[i + 1]
            if a < b:
                K.class_ranks(self._b[s:e], self._table, self._before[i], positions[a:b] - s, residual[a:b],
                              slots[i], rank, res)

        K.run_chunks(one, len(self._bounds))
        return starts

    def positions(self, fl: "_ClassFlags", residual: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The changed elements of a counted host tensor (class sizes checked against the delta's header) from their
        class flag maps (`fl`) and their int16 residuals in class-major order: (sorted positions, their new uint16
        bits). Chunks walk in parallel, each starting at its classes' ranks (`_before`) in the maps."""
        K = _kernels()
        nchunks = len(self._bounds)
        pre = fl.prefix(np.vstack([self._before, self.counts[None, :]]))
        offsets = np.concatenate([[0], np.cumsum((pre[1:] - pre[:-1]).sum(axis=1))])
        pos = _buffers.empty(residual.size, np.int64)
        out = _buffers.empty(residual.size, np.uint16)

        def one(i: int) -> bool:
            (s, e), a, b = self._bounds[i], offsets[i], offsets[i + 1]
            return a == b or K.flag_positions(self._b[s:e], self.lo, self.hi, fl.flags, fl.state(self._before[i]),
                                              fl.zero, fl.vstart + pre[i], residual, s, False,
                                              pos[a:b], out[a:b]) == b - a

        if offsets[-1] != residual.size or not all(K.run_chunks(one, nchunks)):
            raise FormatError("ctx delta ranks do not fit this base's exponent classes")
        return pos, out

    def walk(self, fl: "_ClassFlags", residual: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`positions` for an uncounted tensor (``count_now=False``) that counts its classes on the way: (positions,
        new bits, class sizes); fewer positions than residuals when the maps do not fit this base (the caller then checks
        the class sizes against the header). From `walk_split_min` elements on, two parts on two threads: only the
        first half is counted beforehand (its histogram says where the second half starts in every map)."""
        K = _kernels()
        numel = self._b.size
        half = numel // 2 if numel >= self.walk_split_min else 0
        before = np.zeros(_N_CLASSES, np.int64)  # pooled class sizes of the first half
        if half:
            raw = np.zeros(_N_CLASSES, np.int64)
            K.exponent_histogram(self._b[:half], raw)
            np.add.at(before, self._table, raw)
        # A base that does not fit may have more class elements than a map has bits: stay inside the maps (the
        # class-size check refuses such a base afterwards).
        pre = fl.prefix(np.minimum(before, fl.size)[None, :])[0]
        first = int(pre.sum())
        pos = _buffers.empty(residual.size, np.int64)
        out = _buffers.empty(residual.size, np.uint16)
        state = fl.state(before)

        def part(i: int) -> bool:
            if i == 0:
                return K.flag_positions(self._b[:half], self.lo, self.hi, fl.flags, fl.state(np.zeros_like(before)), fl.zero,
                                        fl.vstart.copy(), residual, 0, False, pos[:first], out[:first]) == first
            return K.flag_positions(self._b[half:], self.lo, self.hi, fl.flags, state, fl.zero, fl.vstart + pre,
                                    residual, half, True, pos[first:], out[first:]) == residual.size - first

        fits = all(K.run_chunks(part, 2)) if half else part(1)
        self.counts = fl.ranks(state)
        return (pos, out, self.counts) if fits else (pos[:0], out[:0], self.counts)

    # -- the device path (a CUDA base): sorts on the device, only sparse indices reach the host ------------------
    def _to_host(self, x) -> np.ndarray:
        return x.cpu().numpy()

    def _from_host(self, x: np.ndarray):
        return self._torch.from_numpy(x).to(self._t.device)

    def _argsort(self, keys):
        return self._torch.sort(keys, stable=True).indices

    def _ranks_device(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not self._bounds or positions.size == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        keys = self._keys(0)
        order = self._argsort(keys)
        mask = self._torch.zeros(self._bounds[0][1], dtype=self._torch.bool, device=self._t.device)
        mask[self._from_host(positions)] = True
        idx = self._to_host(mask[order].nonzero().squeeze(1))  # sorted-order indices of the changed elements
        key_at = self._to_host(keys[self._from_host(positions)])
        counts = self._counts[0]
        starts = np.cumsum(counts) - counts
        cls = np.searchsorted(starts + counts, idx, side="right")
        perm = np.argsort(key_at, kind="stable")  # the same class-major order, as indices into `positions`
        cls_pos, rank_pos = np.empty_like(cls), np.empty_like(cls)
        cls_pos[perm], rank_pos[perm] = cls, idx - starts[cls]
        return cls_pos, rank_pos

    def _positions_device(self, cls: np.ndarray, rank: np.ndarray,
                          values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not self._bounds or cls.size == 0:
            return np.zeros(0, np.int64), values[:0]
        numel = self._bounds[0][1]
        counts = self._counts[0]
        idx = (np.cumsum(counts) - counts)[cls] + rank
        local = self._to_host(self._argsort(self._keys(0))[self._from_host(idx)])
        # Sort by position: scatter and scan, O(numel) instead of a comparison sort.
        mask = np.zeros(numel, dtype=bool)
        mask[local] = True
        inv = np.empty(numel, dtype=np.int64)
        inv[local] = np.arange(cls.size)
        sorted_local = np.flatnonzero(mask)
        return sorted_local, values[inv[sorted_local]]


@dataclass(frozen=True)
class _ClassFlags:
    """One ctx tensor's changed elements as per-class flag maps (`codec_kernels.class_flags`): bit r of class c's map
    is set when the class's element of rank r changed. What the host walk reads (`codec_kernels.flag_positions`):
    decoding the rank streams into maps costs O(changed) plus a bit per base element, and lets the walk find a
    block's changed elements with one bit deposit per class instead of a search per changed element."""

    flags: np.ndarray  # uint64 words: every map, then three zero words at `zero`
    fbase: np.ndarray  # per class: the word its map starts at (0: no map)
    end: np.ndarray  # per class: the bit address of its map's end (-1: no map)
    zero: int
    size: np.ndarray  # per class: its size in the header (0: no map)
    vstart: np.ndarray  # per class: where its values start in the class-major value stream
    cls_ids: np.ndarray  # the classes with a map

    @classmethod
    def decode(cls, blob: np.ndarray, rows: list[list[int]]) -> "_ClassFlags":
        """From the header's class rows and the rank streams at the start of `blob`; FormatError for a stream that
        does not decode to the header's counts inside the class."""
        K = _kernels()
        r = np.array([row[:7] for row in rows], np.int64).reshape(-1, 7)
        c, n_c, k_c = r[:, 0], r[:, 1], r[:, 2]
        words = np.concatenate([[0], np.cumsum((n_c >> 6) + 3)])
        fbase, end = np.zeros(_N_CLASSES, np.int64), np.full(_N_CLASSES, -1, np.int64)
        size, vstart = np.zeros(_N_CLASSES, np.int64), np.zeros(_N_CLASSES, np.int64)
        fbase[c], end[c], size[c], vstart[c] = words[:-1], 64 * words[:-1] + n_c, n_c, np.cumsum(k_c) - k_c
        zero = int(words[-1])
        flags = np.zeros(zero + 3, np.uint64)
        coded = np.where(r[:, 3] == _MODE_CHANGED, k_c, n_c - k_c)
        # The streams and 8 readable bytes past their end: the bit reader loads 8 bytes at a time.
        streams = np.concatenate([blob[: int(r[:, 5:7].sum())], np.zeros(8, np.uint8)])
        status, i = K.class_flags(streams, r, fbase, flags)
        if status == -5:
            raise FormatError(f"ctx delta class {c[i]}: {n_c[i]} positions decoded, header says {k_c[i]}")
        if status != 0:
            off = int(r[:i, 5:7].sum() + r[i, 5])
            _check_rice_status(status, int(coded[i]), int(r[i, 4]), blob[off: off + int(r[i, 6])])
            raise FormatError(f"class {c[i]} ranks out of range for {n_c[i]} elements")
        return cls(flags, fbase, end, zero, size, vstart, c)

    def state(self, ranks: np.ndarray) -> np.ndarray:
        """The walk's per-class state (`codec_kernels.flag_positions`) for a part whose first element of class c
        has rank ranks[c]: [bit address of that rank in c's map, the map's end]."""
        return np.ascontiguousarray(np.stack([64 * self.fbase + ranks, self.end], axis=1))

    def ranks(self, state: np.ndarray) -> np.ndarray:
        """Inverse of `state`: per class, the rank after the walk's last element (its class size when walked from
        rank 0 to the end of the tensor)."""
        return state[:, 0] - 64 * self.fbase

    def prefix(self, bounds: np.ndarray) -> np.ndarray:
        """[i, c]: the set bits of class c's map below bit bounds[i, c] (rows non-decreasing, within the map)."""
        out = np.zeros(bounds.shape, np.int64)
        _kernels().flag_prefix(self.flags, self.fbase, self.cls_ids, np.ascontiguousarray(bounds, np.int64), out)
        return out


def _categorical(freq: np.ndarray):
    import constriction

    p = freq.astype(np.float64)
    # perfect=False: the fast quantization; deterministic for the same input, which both sides build from `freq`.
    return constriction.stream.model.Categorical(p / p.sum(), perfect=False)


def _quantize(counts: np.ndarray) -> np.ndarray:
    scaled = np.rint(counts * (_FREQ_SCALE / max(int(counts.sum()), 1)))
    return np.where(counts > 0, np.clip(scaled, 1, _FREQ_SCALE), 0).astype(np.uint16)


class _RangeCoder:
    """The first ctx residual coder (files without a ``"r"`` param): per class, whole symbols range-coded
    (constriction) under the class's quantized frequency table. Each class row ends with ``[alphabet size, coder
    bytes]``; its section is every class's table (uint16 LE), then every class's coder words (uint32 LE). Still read;
    written only on request (`ContextEncoding.coder`): constriction holds the GIL, 16-21 ns per symbol to decode."""

    name = "range"
    row_cols = 2

    def encode(self, res: np.ndarray, runs: np.ndarray, rs: np.ndarray, classes: list[int]):
        import constriction

        K = _kernels()
        # Written only on request (tests reproducing the first files): the class runs joined, one span per class.
        res = np.concatenate([res[a: a + n] for a, n in runs]) if len(runs) else res[:0]
        ends = np.cumsum([int(runs[rs[i]: rs[i + 1], 1].sum()) for i in range(len(classes))], dtype=np.int64)
        spans = list(zip([0, *ends[:-1].tolist()], ends.tolist()))
        starts = np.zeros(_N_CLASSES + 1, np.int64)
        for c, (a, b) in zip(classes, spans):
            starts[c + 1:] += b - a
        sym = np.empty(res.size, np.int32)
        hist = np.zeros((_N_CLASSES, 2 * _MAX_MSYM), np.int64)
        if K.residual_symbols(starts, res, sym, hist) < 0:
            raise ValueError(_ZERO_RESIDUAL)
        cols, tables, words = [], [], []
        for c, (a, b) in zip(classes, spans):
            counts = hist[c]
            freq = _quantize(counts[: 2 * (int(np.flatnonzero(counts)[-1]) // 2 + 1)])
            if np.count_nonzero(freq) > 1:
                coder = constriction.stream.queue.RangeEncoder()
                coder.encode(sym[a:b], _categorical(freq))
                w = coder.get_compressed().astype("<u4").view(np.uint8)
            else:  # one symbol only: it is implied by the table
                w = np.zeros(0, np.uint8)
            cols.append([int(freq.size), int(w.size)])
            tables.append(freq.astype("<u2").view(np.uint8))
            words.append(w)
        return cols, [*tables, *words], {}, K.pack_low_bits(sym, res)

    def section_bytes(self, rows: list[list[int]], n: int, params: dict) -> int:
        if not all(2 <= r[7] <= 2 * _MAX_MSYM and r[7] % 2 == 0 and r[8] >= 0 for r in rows):
            raise FormatError("ctx delta frequency tables out of range")
        return sum(2 * r[7] + r[8] for r in rows)

    def decode(self, section: np.ndarray, extra: np.ndarray, rows: list[list[int]], n: int, params: dict) -> np.ndarray:
        import constriction

        off, tables, sym_parts = 0, [], []
        for *_, alpha, _ in rows:
            tables.append(section[off: off + 2 * alpha].view("<u2").astype(np.uint16))
            off += 2 * alpha
        for (c, _, k_c, *_, wlen), freq in zip(rows, tables):
            w = section[off: off + wlen]
            off += wlen
            nz = np.flatnonzero(freq)
            if nz.size == 0:
                raise FormatError(f"ctx delta class {c}: empty frequency table")
            if nz.size == 1:
                sym_parts.append(np.full(k_c, nz[0], np.int32))
                continue
            if wlen % 4:
                raise FormatError(f"ctx delta class {c}: coder stream of {wlen} bytes is not whole words")
            try:
                dec = constriction.stream.queue.RangeDecoder(w.view("<u4").astype(np.uint32))
                sym_parts.append(dec.decode(_categorical(freq), k_c).astype(np.int32))
            except (ValueError, RuntimeError) as exc:
                raise FormatError(f"ctx delta class {c}: residual stream does not decode ({exc})") from None
        from shared import codec_coder

        sym = np.concatenate(sym_parts)
        signs, buckets = np.zeros((sym.size + 7) // 8, np.uint8), np.empty(sym.size, np.uint8)
        codec_coder.split_symbols(sym, signs, buckets)
        return _join_residuals(buckets, signs, extra, n)


class _ZstdCoder:
    """The ctx residual coder ``"zstd"`` (what `encode` writes): every changed element's sign as one raw bit
    (``(n + 7) // 8`` bytes, MSB first, in the class-major order of the rows), then one zstd frame (param ``"z"``:
    its bytes; no content size, no checksum: the header knows n, the weights digest checks the result) of one byte
    per element, ``bucket - 1``. Signs are coin flips and a bucket carries 0.1-0.4 bits inside its class, so this is
    within +0.1-0.2 bits per changed element of range-coding whole symbols, 6-8x faster to decode and 3-7x to
    encode, and zstd and the split / join loops (`codec_coder`) release the GIL: tensors code in parallel
    (measured: shared/codec_coder.py)."""

    name = "zstd"
    row_cols = 0
    level = 1  # measured on real 0.6B symbols: levels 1, 3 and 5 within 2 % in size; 1 encodes fastest

    def encode(self, res: np.ndarray, runs: np.ndarray, rs: np.ndarray, classes: list[int]):
        n = int(runs[:, 1].sum())
        # Sign bits, bucket bytes and extra bits in one pass over the residuals (`residual_streams`: a third of the
        # time of the symbol / split / pack passes it replaced, which also wrote and read an int32 per element).
        signs, buckets = _buffers.empty((n + 7) // 8, np.uint8), _buffers.empty(n, np.uint8)
        extra = _buffers.empty((15 * n + 7) // 8, np.uint8)  # room for 15 extra bits per residual
        x = _kernels().residual_streams(res, runs, signs, buckets, extra)
        if x < 0:
            raise ValueError(_ZERO_RESIDUAL)
        # A compressor per call: zstandard's (de)compressor objects must not be shared between threads, and the
        # encode pool codes several tensors at once.
        frame = zstandard.ZstdCompressor(level=self.level, write_content_size=False, write_checksum=False).compress(
            buckets.data)
        return [[] for _ in classes], [signs, np.frombuffer(frame, np.uint8)], {"z": len(frame)}, extra[:x]

    def section_bytes(self, rows: list[list[int]], n: int, params: dict) -> int:
        try:
            z = int(params["z"])
        except (KeyError, TypeError, ValueError):
            raise FormatError("ctx delta tensor has no bucket stream size ('z')") from None
        if z < 0:
            raise FormatError("ctx delta bucket stream size out of range")
        return (n + 7) // 8 + z

    def decode(self, section: np.ndarray, extra: np.ndarray, rows: list[list[int]], n: int, params: dict) -> np.ndarray:
        signs, frame = section[: (n + 7) // 8], section[(n + 7) // 8:]
        try:
            buckets = zstandard.ZstdDecompressor().decompress(frame.tobytes(), max_output_size=n)
        except zstandard.ZstdError as exc:
            raise FormatError(f"ctx delta bucket stream does not decode ({exc})") from None
        if len(buckets) != n:
            raise FormatError(f"ctx delta bucket stream holds {len(buckets)} buckets, header says {n}")
        return _join_residuals(np.frombuffer(buckets, np.uint8), signs, extra, n)


def _join_residuals(buckets: np.ndarray, signs: np.ndarray, extra: np.ndarray, n: int) -> np.ndarray:
    """Both residual coders' last step: bucket bytes + sign bits + the extra-bit stream as n int16 residuals."""
    from shared import codec_coder

    residual = _buffers.empty(n, np.int16)
    status = codec_coder.bucket_residuals(buckets, signs, np.ascontiguousarray(extra), _MAX_MSYM, residual)
    if status == codec_coder.BAD_BUCKET:
        raise FormatError(f"ctx delta bucket stream holds a bucket above {_MAX_MSYM}")
    if status != 0:
        raise FormatError(f"ctx delta extra-bit stream of {extra.size} bytes does not match its residual buckets")
    return residual


# A tensor's param "r" names its residual coder; files written before the zstd coder name none: range. (What `encode`
# writes is `ContextEncoding.coder`.)
_RESIDUAL_CODERS = {c.name: c for c in (_RangeCoder(), _ZstdCoder())}
_UNNAMED_CODER = "range"


def _class_runs(seg: np.ndarray, cnt: np.ndarray, present: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The non-empty (start, length) runs of `_BaseClasses.ranks`' parts in class-major order -- class after class
    of `present`, each class's parts in position order -- and where each class's runs start (``rs``: class
    ``present[i]`` has ``runs[rs[i]:rs[i+1]]``): what the coders read instead of a joined copy."""
    s, n = seg[:, present].T, cnt[:, present].T
    keep = n > 0
    runs = np.ascontiguousarray(np.stack([s[keep], n[keep]], axis=1), dtype=np.int64).reshape(-1, 2)
    return runs, np.concatenate([[0], np.cumsum(keep.sum(axis=1))]).astype(np.int64)


def _join_pieces(d: "_Diff") -> EncodedTensor:
    """A ctx tensor's encoding from the pieces its detection's chunks coded (`codec_kernels.assemble_classes`: the
    streams `ContextEncoding.encode` writes from ranks, with the per-class Rice parameters and modes the detection
    chose from its sample)."""
    K = _kernels()
    addrs = np.fromiter((p.ctypes.data for p in d.pieces), np.int64, len(d.pieces))  # d.pieces keeps them alive
    present = np.flatnonzero(d.rows[:, :, K.P_CHANGED].sum(axis=0))
    rows = np.empty((present.size, 6), np.int64)
    streams, signs, buckets, extra = K.assemble_classes(addrs, d.rows, d.hist, d.ks, d.modes, present, rows)
    frame = zstandard.ZstdCompressor(level=_ZstdCoder.level, write_content_size=False,
                                     write_checksum=False).compress(buckets.data)
    params = {"n": int(buckets.size), "x": int(extra.size), "p": [d.lo, d.hi],
              "c": np.column_stack([present, rows]).tolist(), "r": "zstd", "z": len(frame)}
    return EncodedTensor({"": np.concatenate([streams, signs, np.frombuffer(frame, np.uint8), extra])}, params)


@register_encoding
class ContextEncoding:
    """Codec v2: positions and residuals conditioned on each element's base exponent (see the module docstring).

    params: ``n`` changed elements, ``x`` bytes of the extra-bit stream, ``p`` = ``[lo, hi]`` (exponents below/above
    are pooled into class lo/hi), ``r`` the residual coder (``"zstd"``; absent in files of the first coder:
    ``"range"``), for ``zstd`` ``z`` the bytes of its bucket frame, and ``c`` one row per class with changes:
    ``[class, n_c, k_c, mode, rice_k, unary bytes, remainder bytes]``, for ``range`` followed by ``[alphabet size,
    coder bytes]``.
    Payload ``""`` (uint8): every class's position streams (in the order of ``c``), then the residual coder's section
    (``zstd``: the sign bits of every changed element, then the bucket frame -- `_ZstdCoder`; ``range``: every class's
    frequency table, then every class's coder words -- `_RangeCoder`), then the extra bits (class-major).
    """

    name = "ctx"
    needs_base_context = True
    coder = "zstd"  # what encode writes; tests set "range" to reproduce files of the first coder

    def encode(self, positions, new_bits, base_bits, numel, *, base_context=None):
        if base_context is None:
            raise ValueError("the ctx encoding needs the whole base tensor (base_context=)")
        K = _kernels()
        positions = np.ascontiguousarray(positions, dtype=np.int64)
        new_bits = np.ascontiguousarray(new_bits, dtype=np.uint16)
        base_bits = np.ascontiguousarray(base_bits, dtype=np.uint16)
        if new_bits.shape != positions.shape or base_bits.shape != positions.shape:
            raise ValueError("positions, new and base values must have the same length")
        known = base_context.precoded if isinstance(base_context, BaseBits) else None
        # Positions that diff_bits found and coded (the very array it returned) are sorted, unique and in range by
        # construction; any others are checked (a pass over them: ~1 ns per element).
        if positions.size and (known is None or known.positions is not positions) and (
                int(positions[0]) < 0 or int(positions[-1]) >= numel
                or not bool(np.all(positions[1:] > positions[:-1]))):
            raise ValueError("positions must be sorted, unique and inside the tensor")
        if known is not None and self.coder == "zstd" and all(
                a is b or np.array_equal(a, b)
                for a, b in ((known.positions, positions), (known.new_at, new_bits), (known.old_at, base_bits))):
            return known.tensor  # coded by diff_bits while it read the base
        classes = _BaseClasses(base_context, numel)
        # Detected on the way: its bounds (its histogram holds class sizes under them), else the base's own.
        lo, hi = known.tensor.params["p"] if known is not None else classes.pooling_bounds(numel)
        classes.pool(lo, hi)
        rank, res, seg, cnt = classes.ranks(positions, base_bits, new_bits, numel)
        # Every class's position streams in one compiled call (a class where most changed codes its unchanged
        # ranks, one that changed entirely codes nothing): per-class Python calls were ~14 per tensor.
        sizes_all = cnt.sum(axis=0)
        present = np.flatnonzero(sizes_all)
        runs, rs = _class_runs(seg, cnt, present)
        meta = np.empty((present.size, 4), np.int64)
        spare = np.empty(int(max((classes.counts[c] - sizes_all[c] for c in present), default=0)),
                         rank.dtype)  # the largest complement coded
        pos_streams = K.rice_classes(rank, runs, rs, classes.counts, present, meta, _MAX_K, spare)
        rows = np.column_stack([present, classes.counts[present], sizes_all[present], meta]).tolist()
        present = present.tolist()
        params = {"n": int(positions.size), "p": [lo, hi], "c": rows}
        if self.coder != _UNNAMED_CODER:  # files of the first coder have no "r": writing it for them would not
            params["r"] = self.coder      # reproduce their bytes
        if not rows:
            return EncodedTensor({"": np.zeros(0, np.uint8)}, {"n": 0, "x": 0} | params)
        cols, section, coder_params, extra = _RESIDUAL_CODERS[self.coder].encode(res, runs, rs, present)
        for row, extra_cols in zip(rows, cols):
            row += extra_cols
        params = {"n": params["n"], "x": int(extra.size)} | params  # the key order of the files written before
        return EncodedTensor({"": np.concatenate([pos_streams, *section, extra])}, params | coder_params)

    def decode(self, arrays, params, numel, *, base_context=None):
        if base_context is None:
            raise FormatError("this tensor is ctx-encoded: decoding needs the whole base tensor (base_context=)")
        try:
            blob = arrays[""]
            n, xlen = int(params["n"]), int(params["x"])
            rows = [[int(v) for v in row] for row in params["c"]]
            lo, hi = (int(v) for v in params["p"])
            coder_name = params.get("r", _UNNAMED_CODER)
            assert 0 <= lo <= hi < _N_CLASSES
        except (KeyError, TypeError, ValueError, AttributeError, AssertionError) as exc:
            raise FormatError(f"ctx delta tensor has incomplete parameters ({exc!r})") from None
        coder = _RESIDUAL_CODERS.get(coder_name) if isinstance(coder_name, str) else None
        if coder is None:
            raise FormatError(f"ctx delta tensor names an unknown residual coder {coder_name!r}")
        if not all(len(row) == 7 + coder.row_cols for row in rows):
            raise FormatError(f"ctx delta class rows must have {7 + coder.row_cols} entries for coder {coder.name!r}")
        if blob.dtype != np.uint8 or blob.ndim != 1:
            raise FormatError("ctx delta payload must be a 1-D uint8 tensor")
        cls_ids = [row[0] for row in rows]
        if not (0 <= n <= numel and xlen >= 0 and all(0 <= c < _N_CLASSES for c in cls_ids)
                and cls_ids == sorted(set(cls_ids)) and sum(row[2] for row in rows) == n
                and all(0 < row[2] <= row[1] and row[3] in (0, 1, 2) and 0 <= row[4] <= _MAX_K
                        and min(row[5:7]) >= 0 for row in rows)
                and sum(r[5] + r[6] for r in rows) + (coder.section_bytes(rows, n, params) if rows else 0) + xlen
                == blob.size):
            raise FormatError(f"ctx delta parameters out of range or inconsistent with its {blob.size}-byte payload")
        K = _kernels()
        classes = _BaseClasses(base_context, numel, count_now=False)
        classes.pool(lo, hi)

        def check_counts() -> None:
            for c, n_c, *_ in rows:
                if int(classes.counts[c]) != n_c:
                    raise FormatError(f"ctx delta does not fit this base: exponent class {c} has "
                                      f"{int(classes.counts[c])} elements here, {n_c} in the base it was encoded against")

        if classes.counts is not None:
            check_counts()  # before any stream is decoded
        if not rows:
            return DecodedTensor(positions=np.zeros(0, np.int64), residual=np.zeros(0, np.int16))
        # The rank streams first (their errors before the residual coder's), as flag maps for the host walk.
        device = classes._torch is not None
        ranks = self._ranks(blob, rows, n) if device else None
        fl = None if device else _ClassFlags.decode(blob, rows)
        off = sum(r[5] + r[6] for r in rows)
        residual_cls = coder.decode(blob[off: blob.size - xlen], blob[blob.size - xlen:], rows, n, params)
        if device:
            positions, residual = classes._positions_device(
                np.repeat(np.array(cls_ids, np.int64), [row[2] for row in rows]), ranks, residual_cls)
            if positions.size != n:
                raise FormatError(f"ctx delta decodes to {positions.size} distinct positions, header says {n}")
            check_positions(positions, numel)
            return DecodedTensor(positions=positions, residual=residual)
        # The host walk: positions in order and inside the tensor by construction, with their new bits (it passes
        # each base value anyway), so callers skip their gather of the base.
        if classes.counts is None:  # the walk finds the positions and counts the classes
            positions, new_bits, _ = classes.walk(fl, residual_cls)
            check_counts()
        else:
            positions, new_bits = classes.positions(fl, residual_cls)
        if positions.size != n:
            raise FormatError("ctx delta ranks do not fit this base's exponent classes")
        return DecodedTensor(positions=positions, values=new_bits)

    @staticmethod
    def _ranks(blob: np.ndarray, rows: list[list[int]], n: int) -> np.ndarray:
        """Every class's ranks, class after class (the device path's input; the host path decodes flag maps)."""
        K = _kernels()
        off = at = 0
        ranks = np.empty(n, np.int64)
        for c, n_c, k_c, mode, rk, ulen, rlen, *_ in rows:
            unary, rem = blob[off: off + ulen], blob[off + ulen: off + ulen + rlen]
            off += ulen + rlen
            if mode == _MODE_ALL:
                if n_c != k_c:
                    raise FormatError(f"ctx delta class {c}: {n_c} positions decoded, header says {k_c}")
                ranks[at: at + k_c] = np.arange(n_c, dtype=np.int64)
            elif mode == _MODE_CHANGED:
                rice_positions(unary, rem, k_c, rk, n_c, what=f"class {c} ranks", out=ranks[at: at + k_c])
            else:
                r = K.complement(rice_positions(unary, rem, n_c - k_c, rk, n_c, what=f"class {c} ranks"), n_c)
                if r.size != k_c:
                    raise FormatError(f"ctx delta class {c}: {r.size} positions decoded, header says {k_c}")
                ranks[at: at + k_c] = r
            at += k_c
        return ranks
