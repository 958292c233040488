"""A delta decoded once, outside the pause, in the form the vLLM worker writes directly.

Owns the hand-off file between the gateway (which downloads, sha256-checks, decodes and validates every delta while
vLLM keeps serving) and the worker (which prepares it against its weights between engine steps, ``dws_prepare``,
and inside the pause only writes). Before this file the worker re-read and re-decoded the original delta inside the
pause -- the Rice/zstd decode of a 0.6B delta is seconds.

Memory is bounded on both sides, never by the model or the file: the gateway writes the file *streaming*, each
tensor decoded slice by slice straight into its place (:class:`PreparedWriter`, fed by
``shared.formats.DeltaReader.streamed``: :data:`DECODE_SLICE` changed elements at a time), and the worker reads it
with ``pread`` into buffers of one chunk (:class:`PreparedReader`) -- no memory map, so pages of the file never
count as the replica's resident memory and are not kept in it.

Layout: an ordinary safetensors file (``safe_open`` reads it; its header is padded with spaces, which the format
allows, because the header is written after the data). For each changed checkpoint tensor ``NAME``:

* ``NAME.positions`` -- flat row-major positions in checkpoint coordinates, sorted, unique (int32 when the tensor
  has fewer than 2**31 elements, else int64);
* exactly one of ``NAME.values`` (int16: the new bf16 bit patterns), ``NAME.residual`` (int16: new = base + r mod
  2**16, resolved against the served base at those positions -- O(changed)), or, for encodings whose decode needs
  the whole base tensor (``Encoding.needs_base_context``), the encoded arrays ``NAME.enc.<suffix>`` to be decoded
  by the worker against its weights between engine steps (``dws_prepare``) before the pause.

Header metadata: ``dws_prepared="2"``, ``version``, ``base``, ``source`` (the bucket path), and ``tensors`` (JSON:
name -> {"shape", "mode", "count", and for context tensors "encoding", "params", "numel", "offset"}).
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shared.errors import FormatError

MARK = "dws_prepared"
MARK_VALUE = "2"  # 2: streamed, read with pread (1 was written whole and memory-mapped)
MODES = ("values", "residual", "context")
CHUNK_ELEMENTS = 1 << 19  # changed elements handled at once: temporaries of a few MB (measured: 2M-element
# chunks made the worker's plan step alone raise its peak RSS by ~90 MB at 0.6B)
DECODE_SLICE = 1 << 16  # changed elements the gateway decodes at once into the file (<1 MB of temporaries;
# measured on the 0.6B embedding's 7 M changed elements: peak +20 MB with 512 K-element slices, +7 MB with 64 K)
MAX_HEADER_BYTES = 64 << 20  # a broken length prefix must not make the worker allocate gigabytes
# numpy dtype <-> safetensors dtype name, for the arrays a prepared file holds
_ST_DTYPES = {np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8", np.dtype(np.int16): "I16",
              np.dtype(np.uint16): "U16", np.dtype(np.int32): "I32", np.dtype(np.uint32): "U32",
              np.dtype(np.int64): "I64", np.dtype(np.uint64): "U64", np.dtype(np.float32): "F32",
              np.dtype(np.float64): "F64", np.dtype(np.bool_): "BOOL"}
_NP_DTYPES = {v: k for k, v in _ST_DTYPES.items()}


@dataclass(frozen=True)
class PreparedTensor:
    name: str
    shape: tuple[int, ...]
    mode: str
    count: int
    encoding: str | None = None
    params: dict | None = None
    offset: int = 0  # context tensors of a part: where the slice starts in the full tensor (flat elements)


def _check_finite(name: str, bits: np.ndarray) -> None:
    # bf16 NaN/Inf: exponent field all ones.
    if bits.size and bool(((bits & 0x7F80) == 0x7F80).any()):
        raise FormatError(f"{name}: values contain NaN or Inf")


class PreparedWriter:
    """Writes a prepared file tensor by tensor: each :meth:`add` writes that tensor's arrays at once (in chunks of
    :data:`CHUNK_ELEMENTS`) and forgets them, so the writer's memory is bounded by what the caller holds -- one
    decoded tensor, or for a `codec.StreamedTensor` one slice of :data:`DECODE_SLICE`. The header is written last,
    into space reserved before the data (sized from every tensor's name and the parameters' JSON length, padded with
    spaces); a header that outgrows it is placed by copying the data once (not expected)."""

    def __init__(self, dest: str | Path, *, version: int, base: int, source: str = "",
                 names: Iterable[str] = (), params_chars: int = 0) -> None:
        self.dest = Path(dest)
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        names = list(names)
        self._budget = 4096 + params_chars * 2 + sum(1024 + 8 * len(n) for n in names)
        self._meta = {MARK: MARK_VALUE, "version": str(version), "base": str(base), "source": str(source or "")}
        self._entries: dict[str, dict] = {}
        self._info: dict[str, dict] = {}
        self._pos = 0  # bytes of data written
        self.changed = 0
        self._f = open(self.dest, "wb")
        self._f.seek(8 + self._budget)

    # ---- arrays ----------------------------------------------------------------------------------------------
    def _array(self, key: str, arr: np.ndarray, *, convert: Any = None) -> None:
        """Append ``arr`` (any shape, stored row-major; ``convert`` applied chunk by chunk, e.g. adding a row offset
        and narrowing)."""
        shape = [int(s) for s in arr.shape]
        flat = np.ascontiguousarray(arr).reshape(-1)
        n = int(flat.size)
        out_dtype = None
        for lo in range(0, max(n, 1), CHUNK_ELEMENTS):
            part = flat[lo:lo + CHUNK_ELEMENTS]
            if convert is not None:
                part = convert(part)
            out_dtype = part.dtype
            if part.size:
                self._f.write(memoryview(part).cast("B"))
        out_dtype = np.dtype(out_dtype if out_dtype is not None else arr.dtype)
        if out_dtype not in _ST_DTYPES:
            raise FormatError(f"{key}: cannot store dtype {out_dtype}")
        nbytes = n * out_dtype.itemsize if n else 0
        self._entries[key] = {"dtype": _ST_DTYPES[out_dtype], "shape": shape,
                              "data_offsets": [self._pos, self._pos + nbytes]}
        self._pos += nbytes

    def add(self, name: str, t: Any, *, shape: tuple[int, ...], offset: int = 0) -> None:
        """One decoded delta tensor (``shared.codec.DecodedTensor`` or ``ContextTensor``) of full ``shape``;
        ``offset``: flat position in the full tensor where this file's slice starts (a part of a version in
        parts), added to every position. Values must be finite: a NaN/Inf is refused here, before the pause."""
        if name in self._info:
            raise FormatError(f"{name}: tensor given twice")
        numel = math.prod(shape) if shape else 1
        if getattr(t, "needs_base_context", False):
            for suffix, arr in t.arrays.items():
                self._array(f"{name}.enc.{suffix or '_'}", np.asarray(arr))
            self._info[name] = {"shape": list(shape), "mode": "context", "count": int(t.count),
                                "encoding": t.encoding, "params": t.params, "numel": int(t.numel), "offset": offset}
            self.changed += int(t.count)
            return
        idx_dtype = np.int32 if numel < 2**31 else np.int64
        if hasattr(t, "chunks"):  # a codec.StreamedTensor: decoded here, one slice at a time
            self._add_streamed(name, t, shape=shape, offset=offset, idx_dtype=np.dtype(idx_dtype))
            return
        pos = np.asarray(t.positions)
        self._array(f"{name}.positions", pos.reshape(-1),
                    convert=lambda p: (p.astype(np.int64) + offset if offset else p).astype(idx_dtype, copy=False))
        if t.values is not None:
            vals = np.asarray(t.values).view(np.uint16).reshape(-1)
            _check_finite(name, vals)
            self._array(f"{name}.values", vals.view(np.int16))
            mode = "values"
        else:
            self._array(f"{name}.residual", np.asarray(t.residual).view(np.int16).reshape(-1))
            mode = "residual"
        self._info[name] = {"shape": list(shape), "mode": mode, "count": int(pos.size)}
        self.changed += int(pos.size)

    def _add_streamed(self, name: str, t: Any, *, shape: tuple[int, ...], offset: int, idx_dtype: np.dtype) -> None:
        """Decode `t` slice by slice (``t.chunks``) straight into its two arrays: both regions are reserved up front
        from the count the header gives (positions first, then the payload), and each slice is written at its place
        -- the writer never holds more than one slice (the whole decode of the 0.6B embedding held ~7 M int64
        positions plus the decoder's temporaries: most of a sync's peak RSS in the gateway)."""
        self._f.flush()  # the slices go to the file with pwrite: nothing may stay buffered behind them
        n = int(t.count)
        pos_at = self._pos
        pay_at = pos_at + n * idx_dtype.itemsize
        data0 = 8 + self._budget
        mode, done = None, 0
        for part in t.chunks(DECODE_SLICE):
            k = part.count
            if done + k > n:
                raise FormatError(f"{name}: decodes to more than the {n} changed elements its header says")
            pos = np.asarray(part.positions)
            pos = (pos.astype(np.int64) + offset if offset else pos).astype(idx_dtype, copy=False)
            part_mode = "values" if part.values is not None else "residual"
            if mode is not None and part_mode != mode:
                raise FormatError(f"{name}: mixes values and residuals")  # an encoding bug, never data
            mode = part_mode
            if mode == "values":
                payload = np.asarray(part.values).view(np.uint16).reshape(-1)
                _check_finite(name, payload)
            else:
                payload = np.asarray(part.residual).reshape(-1)
            os.pwrite(self._f.fileno(), memoryview(np.ascontiguousarray(pos)).cast("B"),
                      data0 + pos_at + done * idx_dtype.itemsize)
            os.pwrite(self._f.fileno(), memoryview(np.ascontiguousarray(payload.view(np.int16))).cast("B"),
                      data0 + pay_at + done * 2)
            done += k
        if done != n:
            raise FormatError(f"{name}: decodes to {done} changed elements, its header says {n}")
        mode = mode or "residual"
        self._entries[f"{name}.positions"] = {"dtype": _ST_DTYPES[idx_dtype], "shape": [n],
                                              "data_offsets": [pos_at, pay_at]}
        self._entries[f"{name}.{mode}"] = {"dtype": "I16", "shape": [n], "data_offsets": [pay_at, pay_at + 2 * n]}
        self._pos = pay_at + 2 * n
        self._f.seek(data0 + self._pos)  # the next array is appended after this one's regions
        self._info[name] = {"shape": list(shape), "mode": mode, "count": n}
        self.changed += n

    # ---- finishing ---------------------------------------------------------------------------------------------
    def close(self) -> dict:
        meta = dict(self._meta, changed=str(self.changed), tensors=json.dumps(self._info, separators=(",", ":")))
        header = json.dumps({"__metadata__": meta, **self._entries}, separators=(",", ":")).encode()
        if len(header) <= self._budget:
            self._f.seek(0)
            self._f.write(struct.pack("<Q", self._budget) + header + b" " * (self._budget - len(header)))
            self._f.close()
        else:  # the data sits after the reserved space: move it behind a header of the right size (one copy)
            self._f.close()
            tmp = self.dest.with_name(self.dest.name + ".tmp")
            with open(self.dest, "rb") as src, open(tmp, "wb") as out:
                out.write(struct.pack("<Q", len(header)) + header)
                src.seek(8 + self._budget)
                while block := src.read(64 << 20):
                    out.write(block)
            tmp.replace(self.dest)
        return {"tensors": len(self._info), "changed": self.changed, "bytes": self.dest.stat().st_size}

    def abort(self) -> None:
        self._f.close()
        self.dest.unlink(missing_ok=True)


def write_prepared(patch_file: Any, dest: str | Path, *, source: str = "",
                   rows: Mapping[str, tuple[int, int]] | None = None,
                   full_shapes: Mapping[str, tuple[int, ...]] | None = None) -> dict:
    """Write a decoded ``shared.formats.PatchFile`` (a delta) as a prepared file; returns a summary.

    ``rows`` (with ``full_shapes``): the file is one part of a version in parts (shared/parts.py) whose positions
    are inside row slices; they are written here in full-tensor coordinates (element p of the slice starting at row
    r0 is r0 * row + p). Values must be finite: a NaN/Inf in a delta is refused here, before the pause."""
    if patch_file.kind != "delta":
        raise FormatError("only deltas are prepared; anchors are streamed from their own file")
    params_chars = sum(len(json.dumps(getattr(t, "params", None), separators=(",", ":")))
                       for t in patch_file.tensors.values())
    return write_stream(((n, patch_file.tensors[n]) for n in sorted(patch_file.tensors)), dest,
                        version=patch_file.version, base=patch_file.base, shapes=patch_file.shapes, source=source,
                        rows=rows, full_shapes=full_shapes, params_chars=params_chars)


def write_stream(tensors: Iterable[tuple[str, Any]], dest: str | Path, *, version: int, base: int,
                 shapes: Mapping[str, tuple[int, ...]], source: str = "",
                 rows: Mapping[str, tuple[int, int]] | None = None,
                 full_shapes: Mapping[str, tuple[int, ...]] | None = None, params_chars: int = 0) -> dict:
    """Write delta tensors as they come (an iterator of decoded or `codec.StreamedTensor` tensors; a
    ``shared.formats.DeltaReader`` is read through its ``streamed()``, so each tensor is decoded slice by slice into
    the file) -- at most one tensor's encoded arrays and one slice in memory at a time. ``shapes``: every tensor's
    shape (known from the delta's header); ``params_chars``: the length of the tensors' parameters as JSON (sizes
    the header's reserved space)."""
    names = list(shapes)
    if hasattr(tensors, "streamed"):  # a shared.formats.DeltaReader: decode each tensor slice by slice, in the writer
        tensors = tensors.streamed()
    w = PreparedWriter(dest, version=version, base=base, source=source, names=names, params_chars=params_chars)
    try:
        for name, t in tensors:
            shape = tuple(int(s) for s in shapes.get(name, ()))
            offset = 0
            if rows is not None:
                full = tuple(int(s) for s in full_shapes[name])
                offset = int(rows[name][0]) * (math.prod(full[1:]) if len(full) > 1 else 1)
                shape = full
            w.add(name, t, shape=shape, offset=offset)
            del t
        return w.close()
    except BaseException:
        w.abort()
        raise


def _read_header(fd: int, name: str) -> tuple[dict, int]:
    raw = os.pread(fd, 8, 0)
    if len(raw) < 8:
        raise FormatError(f"{name}: not a dws prepared file (truncated)")
    n = struct.unpack("<Q", raw)[0]
    if n > MAX_HEADER_BYTES:
        raise FormatError(f"{name}: not a dws prepared file (header of {n} bytes)")
    try:
        header = json.loads(os.pread(fd, n, 8))
    except (ValueError, UnicodeDecodeError):
        raise FormatError(f"{name}: not a dws prepared file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise FormatError(f"{name}: not a dws prepared file")
    return header, 8 + n


class PreparedReader:
    """Reads a prepared file with ``pread``: ``tensors`` from the header, arrays chunk by chunk into fresh buffers
    of one chunk (the file is never memory-mapped: its pages are not the reader's resident memory).
    ``identity``: (inode, size, mtime) of the file as opened -- what a preparation made from it is keyed by."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._fd = os.open(str(self.path), os.O_RDONLY)
        except OSError as exc:
            raise FormatError(f"{self.path.name}: cannot open ({exc.strerror})") from None
        try:
            st = os.fstat(self._fd)
            self.identity = (st.st_ino, st.st_size, st.st_mtime_ns)
            header, data_start = _read_header(self._fd, self.path.name)
            meta = header.pop("__metadata__", None) or {}
            if not isinstance(meta, dict) or meta.get(MARK) != MARK_VALUE:
                raise FormatError(f"{self.path.name}: not a dws prepared file")
            self._arrays = {}
            for key, e in header.items():
                dtype = _NP_DTYPES.get(e.get("dtype")) if isinstance(e, dict) else None
                lo, hi = (e.get("data_offsets") or (None, None)) if isinstance(e, dict) else (None, None)
                shape = e.get("shape") if isinstance(e, dict) else None
                if dtype is None or not isinstance(lo, int) or not isinstance(hi, int) or not isinstance(shape, list) \
                        or hi - lo != math.prod(shape) * dtype.itemsize or data_start + hi > st.st_size:
                    raise FormatError(f"{self.path.name}: bad array entry {key!r}")
                self._arrays[key] = (dtype, math.prod(shape), data_start + lo, tuple(shape))
            self.version = int(meta["version"])
            self.base = int(meta["base"])
            raw = json.loads(meta["tensors"])
            self.tensors = {n: PreparedTensor(n, tuple(e["shape"]), e["mode"], int(e["count"]), e.get("encoding"),
                                              e.get("params"), int(e.get("offset", 0))) for n, e in raw.items()}
        except FormatError:
            self.close()
            raise
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            self.close()
            raise FormatError(f"{self.path.name}: bad prepared header ({exc})") from None
        if any(t.mode not in MODES for t in self.tensors.values()):
            self.close()
            raise FormatError(f"{self.path.name}: unknown tensor mode")
        self.source = meta.get("source", "")
        self._numel = {n: e.get("numel") for n, e in raw.items()}

    def close(self) -> None:
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:
        self.close()

    def __enter__(self) -> "PreparedReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def length(self, key: str) -> int:
        if key not in self._arrays:
            raise FormatError(f"{self.path.name}: lacks array {key!r}")
        return self._arrays[key][1]

    def read(self, key: str, lo: int = 0, hi: int | None = None, *, out: np.ndarray | None = None) -> np.ndarray:
        """Elements [lo, hi) of array ``key`` (into ``out`` when given: a reused buffer of at least hi - lo)."""
        if key not in self._arrays:
            raise FormatError(f"{self.path.name}: lacks array {key!r}")
        dtype, n, start, _ = self._arrays[key]
        hi = n if hi is None else min(hi, n)
        count = max(0, hi - lo)
        buf = np.empty(count, dtype) if out is None else out[:count]
        if buf.dtype != dtype:
            buf = buf.view(dtype)
        view, off = memoryview(buf).cast("B"), start + lo * dtype.itemsize
        done = 0
        while done < len(view):
            got = os.preadv(self._fd, [view[done:]], off + done)
            if got <= 0:
                raise FormatError(f"{self.path.name}: truncated inside {key!r}")
            done += got
        return buf

    def chunks(self, name: str, chunk: int = CHUNK_ELEMENTS) -> Iterator[tuple[Any, Any]]:
        """(positions int64, int16 payload) torch tensors for ``values``/``residual`` tensors, ``chunk`` at a time."""
        import torch

        t = self.tensors[name]
        pkey, vkey = f"{name}.positions", f"{name}.{t.mode}"
        n = self.length(pkey)
        if self.length(vkey) != n or n != t.count:
            raise FormatError(f"{name}: positions, {t.mode} and count differ in length")
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            yield (torch.from_numpy(self.read(pkey, lo, hi).astype(np.int64, copy=False)),
                   torch.from_numpy(self.read(vkey, lo, hi).view(np.int16)))

    def context_arrays(self, name: str) -> tuple[dict[str, np.ndarray], dict, int]:
        t = self.tensors[name]
        arrays = {}
        prefix = f"{name}.enc."
        for key in self._arrays:
            if key.startswith(prefix) and "." not in key[len(prefix):]:
                suffix = key[len(prefix):]
                arrays["" if suffix == "_" else suffix] = self.read(key).reshape(self._arrays[key][3])
        return arrays, dict(t.params or {}), int(self._numel.get(name) or math.prod(t.shape))


def is_prepared(path: str | Path) -> bool:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return False
    try:
        header, _ = _read_header(fd, str(path))
        return (header.get("__metadata__") or {}).get(MARK) == MARK_VALUE
    except (FormatError, AttributeError):
        return False
    finally:
        os.close(fd)


def summarize(mapping: Mapping[str, PreparedTensor]) -> int:
    return sum(t.count for t in mapping.values())
