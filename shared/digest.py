"""The weights digest: one hash that proves two copies of a model hold bit-identical bf16 weights.

Two algorithms exist; a digest string names its own by its prefix, so a manifest may hold both (a bucket written
before sharding, continued after it) and every reader checks each version with the algorithm its digest names.

``xsum64`` (the default since sharded publishing; every Space and the vLLM plugin compute it the same way):

    K = 0x9E3779B97F4A7C15, V = 0xD6E8FEB86659FD93                    # all arithmetic modulo 2**64
    seed(name, shape) = xxh3_64(name.utf8 + b"\\0bfloat16\\0" + json.dumps(list(shape)).encode() + b"\\0")
    element(name, shape, i, b) = fmix64((i * K + seed) XOR (b * V))     # i: flat row-major index in the FULL
                                                                       # tensor; b: the element's bf16 bits
    tensor(name, shape)        = fmix64(seed XOR 0x5851F42D4C957F2D)
    S = sum of element(...) over every element of every tensor         # the "element sum"
    digest = "xsum64:" + hex16(S + sum of tensor(...) over every tensor name)

    fmix64(x): x ^= x >> 33; x *= 0xFF51AFD7ED558CCD; x ^= x >> 33; x *= 0xC4CEB9FE1A85EC53; x ^= x >> 33

Because it is a sum of per-element terms keyed by the element's position in the full checkpoint tensor, the digest
does not depend on how the model was partitioned: a rank holding rows [r0, r1) of a tensor (FSDP2 shards dim 0) adds
its own elements' terms (`DigestBuilder.update_rows`, or `partial_sum`), rank 0 adds the ranks' sums and the
per-tensor terms (`combine`), and the result equals the single-process digest of the same weights. It can also be
updated in O(changed): `S' = S - element_sum(name, shape, pos, old_bits) + element_sum(name, shape, pos, new_bits)`
(`ElementSum.replace`), which is what the publishers do between versions and what a replica may do after a delta.
It is 64 bits: it detects accidental divergence (a probability of 2**-64 to miss one), it is not a MAC -- the sha256
of every file in the manifest is what protects against tampering in the bucket.

``xxh3_128`` (legacy; manifests written before parts existed): one xxh3-128 stream over, for each tensor in sorted
name order, ``name.utf8 + b"\\0bfloat16\\0" + json.dumps(list(shape)) + b"\\0"`` and then the tensor's bf16 bytes
(row-major, little-endian). It needs whole tensors in sorted order, so it cannot be combined from shards.

Tensors are in checkpoint (Hugging Face) coordinates: un-fused, unpadded, under the names of the safetensors
checkpoint. A tied `lm_head.weight` that the checkpoint omits is omitted here too.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import xxhash

from shared.codec import bf16_bits

XSUM64 = "xsum64"
XXH3_128 = "xxh3_128"
ALGORITHMS = (XSUM64, XXH3_128)
DEFAULT_ALGORITHM = XSUM64
PREFIX = XSUM64 + ":"  # the default algorithm's prefix
LEGACY_PREFIX = XXH3_128 + ":"

_M64 = (1 << 64) - 1
_K = np.uint64(0x9E3779B97F4A7C15)
_V = np.uint64(0xD6E8FEB86659FD93)
_F1 = np.uint64(0xFF51AFD7ED558CCD)
_F2 = np.uint64(0xC4CEB9FE1A85EC53)
_S33 = np.uint64(33)
_TENSOR_SALT = 0x5851F42D4C957F2D
_CHUNK = 1 << 16  # elements per vectorised step: a few 512 KiB buffers, whatever the tensor's size
_J = np.arange(_CHUNK, dtype=np.uint64) * _K  # j * K for the offsets inside one chunk


def algorithm_of(digest: str) -> str:
    """The algorithm a digest string names by its prefix (ValueError for anything else)."""
    algo, sep, _ = str(digest).partition(":")
    if not sep or algo not in ALGORITHMS:
        raise ValueError(f"not a dws weights digest: {str(digest)[:40]!r}")
    return algo


def tensor_preamble(name: str, shape: Iterable[int]) -> bytes:
    return name.encode("utf-8") + b"\0bfloat16\0" + json.dumps([int(s) for s in shape]).encode() + b"\0"


def _fmix(x: int) -> int:
    x ^= x >> 33
    x = (x * 0xFF51AFD7ED558CCD) & _M64
    x ^= x >> 33
    x = (x * 0xC4CEB9FE1A85EC53) & _M64
    return x ^ (x >> 33)


def tensor_seed(name: str, shape: Iterable[int]) -> int:
    return xxhash.xxh3_64_intdigest(tensor_preamble(name, shape))


def tensor_term(name: str, shape: Iterable[int]) -> int:
    """The once-per-tensor term: a model that lacks a tensor (even an empty one) digests differently."""
    return _fmix(tensor_seed(name, shape) ^ _TENSOR_SALT)


def _bf16_bits(tensor: Any) -> np.ndarray:
    """A zero-copy uint16 view of a bf16 torch tensor (or a uint16 numpy array of bf16 bit patterns)."""
    try:
        return bf16_bits(tensor)
    except TypeError as exc:
        raise TypeError(f"the digest is defined over bf16 weights: {exc}") from None


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _mix_sum(x: np.ndarray, values: np.ndarray, tmp: np.ndarray) -> int:
    """sum(fmix64(x ^ values * V)) for one chunk; `x` and `tmp` are scratch and get overwritten."""
    np.multiply(values, _V, out=tmp, dtype=np.uint64)
    np.bitwise_xor(x, tmp, out=x)
    np.right_shift(x, _S33, out=tmp)
    np.bitwise_xor(x, tmp, out=x)
    np.multiply(x, _F1, out=x)
    np.right_shift(x, _S33, out=tmp)
    np.bitwise_xor(x, tmp, out=x)
    np.multiply(x, _F2, out=x)
    np.right_shift(x, _S33, out=tmp)
    np.bitwise_xor(x, tmp, out=x)
    return int(x.sum(dtype=np.uint64))


def element_sum(name: str, shape: Iterable[int], values: Any, *, offset: int = 0,
                positions: np.ndarray | None = None) -> int:
    """Sum of the element terms of `values` (bf16 tensor or uint16 bits) of checkpoint tensor `name` (full `shape`).

    Contiguous: element k of `values` sits at flat index `offset + k` of the full tensor (a row slice starting at
    row r has offset r * row_length). Scattered: `positions` gives each element's flat index in the full tensor.
    """
    shape = tuple(int(s) for s in shape)
    bits = _bf16_bits(values).reshape(-1)
    numel = _numel(shape)
    seed = np.uint64(tensor_seed(name, shape))
    total = 0
    with np.errstate(over="ignore"):
        if positions is not None:
            pos = np.asarray(positions).reshape(-1)
            if pos.size != bits.size:
                raise ValueError(f"{name}: {pos.size} positions for {bits.size} values")
            if pos.size and (int(pos.min()) < 0 or int(pos.max()) >= numel):
                raise ValueError(f"{name}: positions outside [0, {numel})")
            for s in range(0, pos.size, _CHUNK):
                x = pos[s:s + _CHUNK].astype(np.uint64) * _K + seed
                total += _mix_sum(x, bits[s:s + _CHUNK], np.empty_like(x))
            return total & _M64
        if offset < 0 or offset + bits.size > numel:
            raise ValueError(f"{name}: elements [{offset}, {offset + bits.size}) outside the tensor's {numel}")
        if bits.size >= 2 * _BLOCK and _THREADS > 1:
            # numpy releases the GIL inside these ufuncs: blocks of a large tensor hash on several cores.
            starts = range(0, bits.size, _BLOCK)
            sums = _pool().map(lambda s: _contiguous_sum(bits[s:s + _BLOCK], offset + s, seed), starts)
            return sum(sums) & _M64
        total = _contiguous_sum(bits, offset, seed)
    return total & _M64


_BLOCK = 1 << 22  # elements per thread task (4 Mi: 8 MiB of bf16)
_THREADS = max(1, min(8, os.cpu_count() or 1))
_POOL = None
_POOL_LOCK = threading.Lock()


def _pool():
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=_THREADS, thread_name_prefix="dws-digest")
        return _POOL


def _contiguous_sum(bits: np.ndarray, offset: int, seed: np.uint64) -> int:
    total = 0
    x_buf = np.empty(min(_CHUNK, bits.size), np.uint64)
    t_buf = np.empty_like(x_buf)
    with np.errstate(over="ignore"):
        for s in range(0, bits.size, _CHUNK):
            c = bits[s:s + _CHUNK]
            x, t = x_buf[:c.size], t_buf[:c.size]
            base = np.uint64(((offset + s) * int(_K) + int(seed)) & _M64)
            np.add(_J[:c.size], base, out=x)
            total += _mix_sum(x, c, t)
    return total & _M64


def combine(shapes: Mapping[str, Iterable[int]], element_sums: Iterable[int]) -> str:
    """The xsum64 digest of a model from its identity (every tensor's full shape) and the element sums of a
    partition of its elements (one per rank, per part, ...). The sums must cover every element exactly once."""
    total = sum(int(s) for s in element_sums)
    total += sum(tensor_term(n, shape) for n, shape in shapes.items())
    return f"{XSUM64}:{total & _M64:016x}"


class ElementSum:
    """A running element sum that follows the weights it describes in O(changed) (the publishers keep one per rank;
    a replica may keep one to re-derive its digest after each delta without rehashing the model)."""

    def __init__(self, value: int = 0) -> None:
        self.value = value & _M64

    def add(self, name: str, shape: Iterable[int], values: Any, *, offset: int = 0) -> None:
        self.value = (self.value + element_sum(name, shape, values, offset=offset)) & _M64

    def replace(self, name: str, shape: Iterable[int], positions: np.ndarray, old_bits: Any, new_bits: Any) -> None:
        """Elements at flat `positions` of the full tensor changed from `old_bits` to `new_bits`."""
        self.value = (self.value - element_sum(name, shape, old_bits, positions=positions)
                      + element_sum(name, shape, new_bits, positions=positions)) & _M64

    def digest(self, shapes: Mapping[str, Iterable[int]]) -> str:
        return combine(shapes, [self.value])


class DigestBuilder:
    """Incremental digest for callers that stream tensors one at a time (the vLLM worker, the follower).

    xsum64 (default): whole tensors (`update`) or row slices (`update_rows`) in any order, each element once; the
    digest adds the per-tensor term of every tensor seen. xxh3_128 (legacy): whole tensors in sorted name order; a
    wrong order would give a different, silently wrong digest, so it raises.
    """

    def __init__(self, *, algorithm: str = DEFAULT_ALGORITHM) -> None:
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unknown digest algorithm {algorithm!r}; known: {ALGORITHMS}")
        self.algorithm = algorithm
        self._h = xxhash.xxh3_128() if algorithm == XXH3_128 else None
        self._sum = ElementSum()
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._last: str | None = None

    def update(self, name: str, tensor: Any) -> None:
        data = _bf16_bits(tensor)
        if self._h is not None:
            if self._last is not None and name <= self._last:
                raise ValueError(f"digest tensors must come in sorted order: {name!r} after {self._last!r}")
            self._last = name
            self._h.update(tensor_preamble(name, data.shape))
            self._h.update(data.reshape(-1).view(np.uint8) if data.size else b"")
            return
        if name in self._shapes:
            raise ValueError(f"tensor {name!r} given twice to the digest")
        self._shapes[name] = tuple(data.shape)
        self._sum.add(name, data.shape, data)

    def update_rows(self, name: str, shape: Iterable[int], row_start: int, rows: Any) -> None:
        """Rows [row_start, row_start + len(rows)) of checkpoint tensor `name` whose full shape is `shape`
        (xsum64 only). The caller gives each row once; the per-tensor term is added once per name."""
        if self._h is not None:
            raise ValueError("the legacy xxh3_128 digest needs whole tensors in order; it cannot take row slices")
        shape = tuple(int(s) for s in shape)
        if self._shapes.setdefault(name, shape) != shape:
            raise ValueError(f"tensor {name!r} given with shapes {self._shapes[name]} and {shape}")
        row = _numel(shape[1:]) if shape else 1
        self._sum.add(name, shape, rows, offset=int(row_start) * row)

    @property
    def partial_sum(self) -> int:
        """The element sum so far (xsum64): what a rank sends to rank 0 for `combine`."""
        return self._sum.value

    def hexdigest(self) -> str:
        if self._h is not None:
            return LEGACY_PREFIX + self._h.hexdigest()
        return self._sum.digest(self._shapes)


def weights_digest(tensors: Mapping[str, Any], *, algorithm: str = DEFAULT_ALGORITHM) -> str:
    """Digest of a whole state dict of bf16 tensors (or uint16 bit-pattern arrays)."""
    builder = DigestBuilder(algorithm=algorithm)
    for name in sorted(tensors):
        builder.update(name, tensors[name])
    return builder.hexdigest()


def matches(tensors: Mapping[str, Any], digest: str) -> bool:
    """Whether `tensors` hash to `digest` under the algorithm the digest names."""
    return weights_digest(tensors, algorithm=algorithm_of(digest)) == digest
