"""A delta decoded once, outside the pause, in the form the vLLM worker writes directly.

Owns the hand-off file between the gateway (which downloads, sha256-checks, decodes and validates every delta while
vLLM keeps serving) and the worker (which, inside the pause, only writes). Before this file the worker re-read and
re-decoded the original delta inside the pause -- the Rice/zstd decode of a 0.6B delta is seconds.

Layout: an ordinary safetensors file (memory-mapped by the reader, read one tensor -- or one chunk of one tensor --
at a time, so the worker's extra memory is bounded by a chunk, never by the model). For each changed checkpoint
tensor ``NAME``:

* ``NAME.positions`` -- flat row-major positions in checkpoint coordinates, sorted, unique (int32 when the tensor
  has fewer than 2**31 elements, else int64);
* exactly one of ``NAME.values`` (int16: the new bf16 bit patterns), ``NAME.residual`` (int16: new = base + r mod
  2**16, resolved against the served base at those positions -- O(changed)), or, for encodings whose decode needs
  the whole base tensor (``Encoding.needs_base_context``), the encoded arrays ``NAME.enc.<suffix>`` to be decoded
  by the worker against its weights between engine steps (``dws_prepare``) before the pause.

Header metadata: ``dws_prepared="1"``, ``version``, ``base``, ``source`` (the bucket path), and ``tensors`` (JSON:
name -> {"shape", "mode", "count", and for context tensors "encoding", "params"}).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shared.errors import FormatError

MARK = "dws_prepared"
MODES = ("values", "residual", "context")
CHUNK_ELEMENTS = 1 << 21  # changed elements the worker handles at once (~ 2M x (8 + 2 + 8) bytes of temporaries)


@dataclass(frozen=True)
class PreparedTensor:
    name: str
    shape: tuple[int, ...]
    mode: str
    count: int
    encoding: str | None = None
    params: dict | None = None
    offset: int = 0  # context tensors of a part: where the slice starts in the full tensor (flat elements)


def write_prepared(patch_file: Any, dest: str | Path, *, source: str = "",
                   rows: Mapping[str, tuple[int, int]] | None = None,
                   full_shapes: Mapping[str, tuple[int, ...]] | None = None) -> dict:
    """Write a decoded ``shared.formats.PatchFile`` (a delta) as a prepared file; returns a summary.

    ``rows`` (with ``full_shapes``): the file is one part of a version in parts (shared/parts.py) whose positions
    are inside row slices; they are written here in full-tensor coordinates (element p of the slice starting at row
    r0 is r0 * row + p). Values must be finite: a NaN/Inf in a delta is refused here, before the pause."""
    import torch
    from safetensors.torch import save_file

    if patch_file.kind != "delta":
        raise FormatError("only deltas are prepared; anchors are streamed from their own file")
    arrays: dict[str, torch.Tensor] = {}
    info: dict[str, dict] = {}
    changed = 0
    for name in sorted(patch_file.tensors):
        t = patch_file.tensors[name]
        shape = tuple(int(s) for s in patch_file.shapes.get(name, ()))
        offset = 0
        if rows is not None:
            full = tuple(int(s) for s in full_shapes[name])
            offset = int(rows[name][0]) * (math.prod(full[1:]) if len(full) > 1 else 1)
            shape = full
        numel = math.prod(shape) if shape else None
        if getattr(t, "needs_base_context", False):
            u16 = []
            for suffix, arr in t.arrays.items():
                a = np.ascontiguousarray(arr)
                if a.dtype == np.uint16:  # torch has no uint16 tensors to store: int16 bits, marked to undo
                    u16.append(suffix)
                    a = a.view(np.int16)
                arrays[f"{name}.enc.{suffix or '_'}"] = torch.from_numpy(a)
            info[name] = {"shape": list(shape), "mode": "context", "count": int(t.count), "encoding": t.encoding,
                          "params": t.params, "numel": int(t.numel), "u16": u16, "offset": offset}
            changed += int(t.count)
            continue
        pos = np.asarray(t.positions, dtype=np.int64) + offset
        idx_dtype = np.int32 if (numel if numel is not None else 2**62) < 2**31 else np.int64
        arrays[f"{name}.positions"] = torch.from_numpy(pos.astype(idx_dtype))
        if t.values is not None:
            vals = np.asarray(t.values).view(np.uint16)
            _check_finite(name, vals)
            arrays[f"{name}.values"] = torch.from_numpy(np.ascontiguousarray(vals).view(np.int16))
            mode = "values"
        else:
            arrays[f"{name}.residual"] = torch.from_numpy(np.ascontiguousarray(t.residual).view(np.int16))
            mode = "residual"
        info[name] = {"shape": list(shape), "mode": mode, "count": int(pos.size)}
        changed += int(pos.size)
    meta = {MARK: "1", "version": str(patch_file.version), "base": str(patch_file.base), "source": str(source or ""),
            "changed": str(changed), "tensors": json.dumps(info, separators=(",", ":"))}
    Path(dest).parent.mkdir(parents=True, exist_ok=True)
    save_file(arrays, str(dest), metadata=meta)
    return {"tensors": len(info), "changed": changed, "bytes": Path(dest).stat().st_size}


def _check_finite(name: str, bits: np.ndarray) -> None:
    # bf16 NaN/Inf: exponent field all ones.
    if bits.size and bool(((bits & 0x7F80) == 0x7F80).any()):
        raise FormatError(f"{name}: values contain NaN or Inf")


class PreparedReader:
    """Reads a prepared file lazily (memory-mapped): ``tensors`` from the header, arrays chunk by chunk."""

    def __init__(self, path: str | Path) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        self._f = safe_open(str(self.path), framework="pt")
        meta = self._f.metadata() or {}
        if meta.get(MARK) != "1":
            raise FormatError(f"{self.path.name}: not a dws prepared file")
        try:
            self.version = int(meta["version"])
            self.base = int(meta["base"])
            raw = json.loads(meta["tensors"])
            self.tensors = {n: PreparedTensor(n, tuple(e["shape"]), e["mode"], int(e["count"]), e.get("encoding"),
                                              e.get("params"), int(e.get("offset", 0))) for n, e in raw.items()}
        except (KeyError, ValueError, TypeError) as exc:
            raise FormatError(f"{self.path.name}: bad prepared header ({exc})") from None
        if any(t.mode not in MODES for t in self.tensors.values()):
            raise FormatError(f"{self.path.name}: unknown tensor mode")
        self.source = meta.get("source", "")
        self._numel = {n: e.get("numel") for n, e in raw.items()}
        self._u16 = {n: set(e.get("u16") or ()) for n, e in raw.items()}

    def chunks(self, name: str, chunk: int = CHUNK_ELEMENTS) -> Iterator[tuple[Any, Any]]:
        """(positions int64, int16 payload) for ``values``/``residual`` tensors, ``chunk`` elements at a time."""
        import torch

        t = self.tensors[name]
        pos_s = self._f.get_slice(f"{name}.positions")
        pay_s = self._f.get_slice(f"{name}.{t.mode}")
        n = pos_s.get_shape()[0]
        if pay_s.get_shape()[0] != n:
            raise FormatError(f"{name}: positions and {t.mode} differ in length")
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            yield pos_s[lo:hi].to(torch.int64), pay_s[lo:hi]

    def context_arrays(self, name: str) -> tuple[dict[str, np.ndarray], dict, int]:
        t = self.tensors[name]
        arrays = {}
        prefix = f"{name}.enc."
        for key in self._f.keys():
            if key.startswith(prefix) and "." not in key[len(prefix):]:
                suffix = key[len(prefix):]
                arr = self._f.get_tensor(key).numpy()
                suffix = "" if suffix == "_" else suffix
                arrays[suffix] = arr.view(np.uint16) if suffix in self._u16.get(name, ()) else arr
        return arrays, dict(t.params or {}), int(self._numel.get(name) or math.prod(t.shape))


def is_prepared(path: str | Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get(MARK) == "1"
    except Exception:  # noqa: BLE001 -- not a safetensors file at all: the caller's reader says why
        return False


def summarize(mapping: Mapping[str, PreparedTensor]) -> int:
    return sum(t.count for t in mapping.values())
