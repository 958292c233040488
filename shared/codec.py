"""Sparse encodings of one changed tensor: which flat positions changed, and their new bf16 bit patterns.

Everything here works on numpy arrays of bf16 *bit patterns* (uint16), never on floats, so encode/decode is lossless
by construction and independent of torch.

Encodings (a registry, like vLLM's weight-transfer backends; the name is stored in each delta file's header):

* ``raw`` -- positions as int32 (int64 for tensors of 2**31 elements or more) and the new values as bf16: the layout
  TRL's delta-sync branch writes. 6 bytes per changed element. Needs nothing from the base.

* ``compact`` (default) -- about 1.1-1.3 bytes per changed element at RL densities (0.5-5 %):
    - positions: sorted gaps ``g_i = p_i - p_{i-1} - 1`` Rice-coded with one parameter ``k`` per tensor chosen to
      minimise the size, written as two separate bit streams -- the unary quotients (``g >> k`` zeros, then a one)
      and the fixed-width ``k``-bit remainders -- so both encode *and* decode are vectorised numpy (the unary stream
      decodes with one ``flatnonzero``). For geometric gaps Rice coding is within a few percent of the entropy floor.
    - values: the residual against the base in bit-pattern space, ``(new_bits - base_bits) mod 2**16`` read as int16
      (never 0: only changed elements are stored). An RL step moves most changed weights by exactly one ulp, so the
      residual is stored as three parts: the signs as raw packed bits (they are coin flips), a packed bitmap of
      "moved more than one ulp" and the extra magnitudes ``|r| - 2`` of those few (1 or 2 byte planes); bitmap and
      extras are zstd-compressed, where the skewed bitmap bytes entropy-code to well under a bit per element.
  Decoding values therefore needs the base values at the changed positions, which every reader has: a delta is only
  ever applied onto exactly its base (DESIGN.md §3 rule 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import zstandard

from shared.errors import FormatError

ZSTD_LEVEL = 3
_MAX_K = 62


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


class Encoding(Protocol):
    name: str

    def encode(self, positions: np.ndarray, new_bits: np.ndarray, base_bits: np.ndarray, numel: int) -> EncodedTensor:
        ...

    def decode(self, arrays: dict[str, np.ndarray], params: dict, numel: int) -> DecodedTensor:
        ...


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

    def encode(self, positions, new_bits, base_bits, numel):
        idx_dtype = np.int32 if numel < 2**31 else np.int64
        return EncodedTensor({"indices": positions.astype(idx_dtype), "values": new_bits.astype(np.uint16)}, {})

    def decode(self, arrays, params, numel):
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


def _rice_k(gaps: np.ndarray) -> int:
    """The Rice parameter that minimises n*(k+1) + sum(g >> k), searched around log2 of the mean gap."""
    mean = float(gaps.mean()) if gaps.size else 0.0
    k0 = max(0, int(np.floor(np.log2(mean + 1.0))))
    best_k, best_bits = 0, None
    for k in range(max(0, k0 - 2), min(_MAX_K, k0 + 2) + 1):
        bits = gaps.size * (k + 1) + int((gaps >> k).sum())
        if best_bits is None or bits < best_bits:
            best_k, best_bits = k, bits
    return best_k


def rice_encode(gaps: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Two packed bit streams: unary quotients (q zeros then a one) and k-bit remainders (MSB first)."""
    gaps = gaps.astype(np.uint64)
    q = (gaps >> np.uint64(k)).astype(np.int64)
    ones = np.cumsum(q + 1) - 1
    unary = np.zeros(int(ones[-1]) + 1 if ones.size else 0, dtype=np.uint8)
    unary[ones] = 1
    if k:
        shifts = np.arange(k - 1, -1, -1, dtype=np.uint64)
        rem_bits = ((gaps[:, None] >> shifts[None, :]) & np.uint64(1)).astype(np.uint8)
        rem = np.packbits(rem_bits.reshape(-1))
    else:
        rem = np.zeros(0, dtype=np.uint8)
    return np.packbits(unary), rem


def rice_decode(unary: np.ndarray, rem: np.ndarray, n: int, k: int) -> np.ndarray:
    ones = np.flatnonzero(np.unpackbits(unary))
    if ones.size < n:
        raise FormatError(f"position stream holds {ones.size} entries, header says {n}")
    ones = ones[:n].astype(np.int64)
    q = np.diff(ones, prepend=-1) - 1
    if k:
        bits = np.unpackbits(rem)
        if bits.size < n * k:
            raise FormatError(f"remainder stream too short: {bits.size} bits for {n}x{k}")
        weights = (np.uint64(1) << np.arange(k - 1, -1, -1, dtype=np.uint64))
        r = (bits[: n * k].reshape(n, k).astype(np.uint64) * weights[None, :]).sum(axis=1, dtype=np.uint64)
        return (q.astype(np.uint64) << np.uint64(k)) | r
    return q.astype(np.uint64)


@register_encoding
class CompactEncoding:
    name = "compact"

    def encode(self, positions, new_bits, base_bits, numel):
        positions = positions.astype(np.int64)
        gaps = np.diff(positions, prepend=-1) - 1
        k = _rice_k(gaps)
        unary, rem = rice_encode(gaps, k)
        residual = (new_bits.astype(np.uint16) - base_bits.astype(np.uint16)).view(np.int16).astype(np.int32)
        mag = np.abs(residual)
        if mag.size and int(mag.min()) == 0:
            raise ValueError("compact encoding stores changed elements only; a residual of 0 is not a change")
        signs = np.packbits(residual < 0)
        big = mag > 1
        extra = (mag[big] - 2).astype(np.uint16)  # |residual| - 2, only where it exceeds one ulp
        width = 1 if extra.size == 0 or int(extra.max()) < 256 else 2
        extra_bytes = extra.astype(np.uint8) if width == 1 else extra.view(np.uint8).reshape(-1, 2).T.reshape(-1)
        ztail = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(np.packbits(big).tobytes() + extra_bytes.tobytes())
        blob = np.concatenate([unary, rem, signs, np.frombuffer(ztail, dtype=np.uint8)])
        return EncodedTensor({"": blob}, {"n": int(positions.size), "k": k, "u": int(unary.size), "r": int(rem.size),
                                          "w": width})

    def decode(self, arrays, params, numel):
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
        gaps = rice_decode(blob[:ulen], blob[ulen: ulen + rlen], n, k)
        positions = np.cumsum(gaps.astype(np.int64) + 1) - 1 if n else np.zeros(0, np.int64)
        check_positions(positions, numel)
        negative = np.unpackbits(blob[ulen + rlen: ulen + rlen + nbytes])[:n].astype(bool)
        try:
            # max_output_size bounds memory against a hostile frame that claims a huge size.
            tail = zstandard.ZstdDecompressor().decompress(blob[ulen + rlen + nbytes:].tobytes(),
                                                           max_output_size=nbytes + n * width)
        except zstandard.ZstdError as exc:
            raise FormatError(f"compact delta residuals do not decompress: {exc}") from None
        if len(tail) < nbytes:
            raise FormatError("compact delta residual stream is truncated")
        big = np.unpackbits(np.frombuffer(tail[:nbytes], dtype=np.uint8))[:n].astype(bool)
        n_big = int(big.sum())
        extra_bytes = np.frombuffer(tail[nbytes:], dtype=np.uint8)
        if extra_bytes.size != n_big * width:
            raise FormatError(f"compact delta holds {extra_bytes.size} residual bytes, expected {n_big * width}")
        extra = extra_bytes.astype(np.int32) if width == 1 else \
            extra_bytes.reshape(2, n_big).T.copy().view(np.uint16).reshape(-1).astype(np.int32)
        mag = np.ones(n, dtype=np.int32)
        mag[big] = extra + 2
        residual = np.where(negative, -mag, mag).astype(np.int16)
        return DecodedTensor(positions=positions, residual=residual)
