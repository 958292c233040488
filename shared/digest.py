"""The weights digest: one hash that proves two copies of a model hold bit-identical bf16 weights.

Definition (version 1, every Space and the vLLM plugin must compute exactly this):

    h = xxh3_128()
    for name in sorted(tensor names):                      # Python's default str ordering (code points)
        h.update(name.encode("utf-8") + b"\\0" + b"bfloat16" + b"\\0"
                 + json.dumps(list(shape)).encode() + b"\\0")
        h.update(<the tensor's bf16 bytes, row-major, little-endian>)
    digest = "xxh3_128:" + h.hexdigest()

Tensors are in checkpoint (Hugging Face) coordinates: un-fused, unpadded, under the names of the safetensors
checkpoint. A tied `lm_head.weight` that the checkpoint omits is omitted here too. The name and shape enter the hash
so that two models whose bytes happen to concatenate identically still differ.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import xxhash

from shared.codec import bf16_bits

PREFIX = "xxh3_128:"


def tensor_preamble(name: str, shape: Iterable[int]) -> bytes:
    return name.encode("utf-8") + b"\0bfloat16\0" + json.dumps([int(s) for s in shape]).encode() + b"\0"


def _bf16_bytes(tensor: Any) -> np.ndarray:
    """A zero-copy uint16 view of a bf16 torch tensor (or a uint16 numpy array of bf16 bit patterns)."""
    try:
        return bf16_bits(tensor)
    except TypeError as exc:
        raise TypeError(f"the digest is defined over bf16 weights: {exc}") from None


class DigestBuilder:
    """Incremental digest for callers that stream tensors one at a time (the vLLM worker, the follower).

    Tensors must arrive in sorted name order; a wrong order would give a different, silently wrong digest.
    """

    def __init__(self) -> None:
        self._h = xxhash.xxh3_128()
        self._last: str | None = None

    def update(self, name: str, tensor: Any) -> None:
        if self._last is not None and name <= self._last:
            raise ValueError(f"digest tensors must come in sorted order: {name!r} after {self._last!r}")
        self._last = name
        data = _bf16_bytes(tensor)
        self._h.update(tensor_preamble(name, data.shape))
        self._h.update(data.reshape(-1).view(np.uint8) if data.size else b"")

    def hexdigest(self) -> str:
        return PREFIX + self._h.hexdigest()


def weights_digest(tensors: Mapping[str, Any]) -> str:
    """Digest of a whole state dict of bf16 tensors (or uint16 bit-pattern arrays)."""
    builder = DigestBuilder()
    for name in sorted(tensors):
        builder.update(name, tensors[name])
    return builder.hexdigest()
