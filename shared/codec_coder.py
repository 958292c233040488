"""The ``ctx`` encoding's residual-symbol coder loops: splitting each changed element's ``(magnitude bucket, sign)``
symbol into a raw sign bit and a bucket byte, and turning bucket bytes + sign bits + the extra-bit stream back into
residuals in one pass.

Why this coder (`shared.codec.ContextEncoding`, residual coder ``"zstd"``): measured on the residual symbols of real
0.6B AdamW deltas (16-42 M changed elements), a sign is a coin flip (50.0 % negative), so it costs one raw bit, and a
bucket carries only 0.1-0.37 bits of order-0 entropy per element inside its exponent class. Range-coding whole
symbols with constriction (the first ctx coder) took 16-21 ns per symbol to decode and 6-13 to encode (extra bits
included), *holding the GIL*; raw sign bits plus one zstd frame of bucket bytes per tensor take 2-3 ns to decode and
1.4-2.4 to encode, and zstd and these loops release the GIL, so tensors code in parallel. The price is size: zstd's
Huffman stage cannot go below one bit per byte, so runs of the dominant bucket are left to its match finder -- 1.21 /
1.49 / 1.55 bits per element against the range coder's 1.11 / 1.31 / 1.39 (lr 1e-6, 3e-6, warm; zstd levels 1-5
within 2 % of each other). Measured one thread at a time, 14:50-15:00 UTC on the shared 2-core machine, through
both coders' classes in `shared.codec` on the symbols of bench/run.py's 0.6B deltas (16-42 M per delta).

The loops are numba-compiled with ``nogil=True`` and ``cache=True`` like `shared.codec_kernels`; this module holds
only the coder's own passes (the exponent-class passes stay there).
"""

from __future__ import annotations

import numpy as np
from numba import njit

# Statuses of `bucket_residuals` (0 = decoded); `shared.codec` maps each to a FormatError message.
BAD_BUCKET, SHORT_EXTRA, SPARE_EXTRA = -1, -2, -3


@njit(nogil=True, cache=True)
def split_symbols(sym, signs, buckets):
    """Each ctx symbol ``2 * (bucket - 1) + negative`` as its sign bit (packed MSB first into `signs`, which must be
    ``(n + 7) // 8`` zeroed bytes: the pad bits of the last byte stay 0) and its byte ``bucket - 1``."""
    n = sym.size
    full = n & ~7
    for i in range(0, full, 8):
        b = 0
        for j in range(8):
            s = sym[i + j]
            b = (b << 1) | (s & 1)
            buckets[i + j] = s >> 1
        signs[i >> 3] = b
    for i in range(full, n):
        s = sym[i]
        signs[i >> 3] |= (s & 1) << (7 - (i & 7))
        buckets[i] = s >> 1


@njit(nogil=True, cache=True)
def bucket_residuals(buckets, signs, packed, max_bucket, out):
    """Inverse of `split_symbols` + `codec_kernels.pack_low_bits`: out[i] = the int16 residual of bucket byte
    ``buckets[i]`` (bucket = byte + 1: 1, 2, 3 exact, then w + 2 for magnitudes in [2**w, 2**(w+1)), whose w low bits
    come from `packed`, MSB first) with sign bit i of `signs`. Returns 0, or `BAD_BUCKET` when a byte is not below
    `max_bucket`, `SHORT_EXTRA` when `packed` ends early, `SPARE_EXTRA` when it holds a whole spare byte -- a
    corrupt stream never reads out of bounds."""
    n = buckets.size
    limit = packed.size * 8
    bit = 0
    for i in range(n):
        b = np.int64(buckets[i]) + 1
        if b > max_bucket:
            return BAD_BUCKET
        if b >= 4:
            w = b - 2
            if bit + w > limit:
                return SHORT_EXTRA
            v = np.int64(0)
            for _ in range(w):
                v = (v << 1) | ((packed[bit >> 3] >> (7 - (bit & 7))) & 1)
                bit += 1
            m = (np.int64(1) << w) + v
        else:
            m = b
        neg = (signs[i >> 3] >> (7 - (i & 7))) & 1
        out[i] = np.int16((m ^ -neg) + neg)  # branch-free negation: signs are coin flips
    if limit - bit >= 8:
        return SPARE_EXTRA
    return 0
