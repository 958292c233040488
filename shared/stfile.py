"""safetensors files written byte for byte the same from the same tensors and metadata: `to_bytes` and `write`.

Why not safetensors' own `save`: its serializer keeps the header metadata in a hash map with a random seed per map, so
the same delta saved twice -- even twice in one process -- came out in a different key order each time, with a
different sha256. A publisher that writes a version again (a retry after a crash, a sharded rank re-sending its
part) should produce the very file it produced before, and a file's hash should say what it holds. The layout is
the format's own: an 8-byte little-endian header length, the JSON header (``__metadata__`` first, in the caller's
order, then each tensor's dtype, shape and data offsets), padded with spaces to a multiple of 8 bytes, then the
tensors' bytes back to back. Tensors are ordered by item size, largest first, then by name -- as safetensors orders
them -- so every tensor starts on a multiple of its item size (readers that memory-map the file view it in place).
One output allocation (`to_bytes`; safetensors' `save` built a buffer and then copied it into the `bytes`), and
`write` streams a model-sized anchor from the tensors themselves, no copy of the model.

What it takes: numpy arrays (their dtype names the safetensors dtype; `bf16` names the keys whose uint16 arrays are
bf16 bit patterns) and torch tensors (bf16 included; one on a device is brought to the host one tensor at a time).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

# safetensors dtype -> numpy (bf16 as its uint16 bit patterns): what the readers map each stored dtype to.
ST_NUMPY = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32, "F64": np.float64, "BOOL": np.bool_,
            "U8": np.uint8, "I8": np.int8, "U16": np.uint16, "I16": np.int16, "U32": np.uint32, "I32": np.int32,
            "U64": np.uint64, "I64": np.int64}
_NUMPY_ST = {np.dtype(v): k for k, v in ST_NUMPY.items() if k != "BF16"}


def _as_array(value: Any) -> tuple[np.ndarray, str | None]:
    """A C-contiguous numpy view of `value`, and "BF16" for a torch bf16 tensor (its bits as uint16)."""
    if isinstance(value, np.ndarray):
        arr = value if value.flags.c_contiguous else np.ascontiguousarray(value)  # (that one makes a 0-d array 1-d)
        if arr.dtype.byteorder == ">":  # the format is little-endian
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        return arr, None
    import torch

    if not isinstance(value, torch.Tensor):
        raise TypeError(f"safetensors entries must be numpy arrays or torch tensors, got {type(value).__name__}")
    t = value.detach().to("cpu").contiguous()  # one tensor at a time: a device anchor is never copied whole
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16), "BF16"
    return t.numpy(), None


def _layout(tensors: Mapping[str, Any], metadata: Mapping[str, str] | None,
            bf16: frozenset[str]) -> tuple[bytes, list[np.ndarray]]:
    """(the 8-byte length and padded header, the arrays in file order)."""
    entries = []
    for name, value in tensors.items():
        arr, st = _as_array(value)
        if st is None:
            st = "BF16" if name in bf16 else _NUMPY_ST.get(arr.dtype)
            if st is None:
                raise TypeError(f"{name}: no safetensors dtype for {arr.dtype}")
            if st == "BF16" and arr.dtype != np.uint16:
                raise TypeError(f"{name}: bf16 entries are given as uint16 bit patterns, got {arr.dtype}")
        entries.append((name, st, arr))
    entries.sort(key=lambda e: (-e[2].itemsize, e[0]))
    header: dict[str, Any] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise TypeError("safetensors metadata must map strings to strings")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, st, arr in entries:
        header[name] = {"dtype": st, "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    return header_bytes(header), [arr for _, _, arr in entries]


def header_bytes(header: Mapping[str, Any]) -> bytes:
    """A file's first bytes for a header (its ``__metadata__`` and tensor entries, in order): the 8-byte length and
    the compact JSON padded with spaces to a multiple of 8 bytes -- the data section starts 8-byte aligned. Offsets in
    a header are relative to the data section, so a header rewritten this way keeps the data after it valid."""
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def _buffer(arr: np.ndarray) -> memoryview:
    return memoryview(arr.reshape(-1).view(np.uint8)) if arr.size else memoryview(b"")


def to_bytes(tensors: Mapping[str, Any], *, metadata: Mapping[str, str] | None = None,
             bf16: frozenset[str] = frozenset()) -> bytes:
    """The safetensors file of `tensors` as bytes (see the module docstring)."""
    head, arrays = _layout(tensors, metadata, bf16)
    return b"".join([head, *(_buffer(a) for a in arrays)])


def write(tensors: Mapping[str, Any], path: str | Path, *, metadata: Mapping[str, str] | None = None,
          bf16: frozenset[str] = frozenset()) -> int:
    """Write the safetensors file of `tensors` to `path`, tensor by tensor; returns its size."""
    head, arrays = _layout(tensors, metadata, bf16)
    with open(path, "wb") as f:
        f.write(head)
        f.writelines(_buffer(a) for a in arrays)
    return Path(path).stat().st_size
