"""Anchor and delta files: ordinary safetensors files, readable by `safe_open`, with dws metadata in the header.

Anchor (``anchors/vNNNNNNNN.safetensors``): every tensor in bf16 under its checkpoint name; header
``{"format": "pt", "dws_kind": "anchor", "version": "N"}`` -- an ordinary checkpoint transformers can load.

Delta (``deltas/vNNNNNNNN.safetensors``): header ``format="dws-delta"``, ``dws_kind="delta"``, ``encoding``,
``version``, ``base``, ``changed`` (elements), ``total`` (elements in the model) and ``tensors`` -- JSON
``{name: {"shape": [...], "params": {...}}}`` for each changed tensor. The arrays of tensor ``name`` are stored as
``name`` (suffix "") or ``name.<suffix>`` (``raw``: ``.indices`` int32, ``.values`` BF16).

Several encodings per file: the writer may code each tensor with whichever of the requested encoding and its
fallbacks (`FALLBACKS`) is smallest; a tensor whose encoding differs from the file's ``encoding`` says so in its
entry: ``{"shape": [...], "params": {...}, "encoding": "compact"}``. Files without per-tensor entries (every file
written before codec v2) read as before. A reader that does not know the file-level encoding (``ctx``) refuses the
whole file with a clear error instead of misreading its tensors.

A ``raw`` delta also carries TRL's keys (``sparse="True"``, ``model_version``, ``changed_params``), so it *is* TRL's
layout; and files written by TRL's delta-sync branch (those keys only: ``{name}.indices`` int32, ``{name}.values``
bf16; anchors with ``sparse="False"``) are read too, taking shapes from the caller (the manifest's model identity).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from shared import stfile
from shared.codec import ContextTensor, DecodedTensor, EncodedTensor, StreamedTensor, bf16_bits, bf16_from_bits, \
    _kernels, check_positions, diff_bits, diff_many, get_encoding
from shared.errors import FormatError

DELTA_FORMAT = "dws-delta"
MAX_HEADER_BYTES = 64 << 20  # a hostile 8-byte length prefix must not make us allocate gigabytes
# Per tensor, the writer keeps the smallest of the requested encoding and these. `raw` has none: a raw file must stay
# exactly TRL's layout. `ctx` falls back to `compact` where its per-class tables outweigh what context saves (tiny
# tensors) or where the base is not at hand.
FALLBACKS: dict[str, tuple[str, ...]] = {"ctx": ("compact",)}

bits = bf16_bits  # the names every caller already imports
from_bits = bf16_from_bits


@dataclass(frozen=True)
class TensorChange:
    """One tensor's change between two versions, as the publisher found it."""

    shape: tuple[int, ...]
    positions: np.ndarray  # int64 flat positions, sorted
    new_bits: np.ndarray  # uint16
    base_bits: np.ndarray  # uint16, the base at `positions`
    # The whole base tensor, flat (uint16 bits, `codec.BaseBits`, or a bf16 torch tensor on any device): what
    # encodings with base context (`ctx`) read. None: those encodings are skipped for this tensor.
    base: Any = None

    @classmethod
    def between(cls, shape: tuple[int, ...], new: Any, old: Any, *, encoding: str = "compact") -> TensorChange | None:
        """The change from `old` to `new` (bf16 tensors or uint16 bits of `shape`), found in one parallel read of
        both (`codec.diff_bits`), plus what `encoding` needs from the base on the way; None when nothing changed."""
        positions, new_at, old_at, base = diff_bits(new, old, context=get_encoding(encoding).needs_base_context)
        return cls(tuple(shape), positions, new_at, old_at, base=base) if positions.size else None


def _payload_bytes(out: EncodedTensor) -> int:
    return sum(int(a.nbytes) for a in out.arrays.values()) + len(json.dumps(out.params, separators=(",", ":")))


def _encode_tensor(ch: TensorChange, names: tuple[str, ...], verify: bool) -> tuple[str, EncodedTensor]:
    """The smallest of `names` for this tensor; with `verify`, decode it and compare before accepting it."""
    numel = int(np.prod(ch.shape))
    best: tuple[int, str, EncodedTensor] | None = None
    for name in names:
        enc = get_encoding(name)
        if enc.needs_base_context and ch.base is None:
            continue
        bound = getattr(enc, "size_lower_bound", None)
        if best is not None and bound is not None and bound(ch.positions, numel) >= best[0]:
            continue  # it cannot win: skip its encode (compact's residual coding is most of its cost)
        out = enc.encode(ch.positions, ch.new_bits, ch.base_bits, numel,
                         base_context=ch.base if enc.needs_base_context else None)
        size = _payload_bytes(out)
        if best is None or size < best[0]:
            best = (size, name, out)
    if best is None:
        raise ValueError(f"no encoding among {names} can code this tensor (the base context is missing)")
    _, name, out = best
    if verify:
        enc = get_encoding(name)
        dec = enc.decode(out.arrays, out.params, numel, base_context=ch.base if enc.needs_base_context else None)
        got = dec.resolve(ch.base_bits if dec.needs_base else None)
        if not (np.array_equal(dec.positions, ch.positions) and np.array_equal(got, ch.new_bits)):
            raise AssertionError(f"{name} encoding does not round-trip this tensor")  # a codec bug, never data
    return name, out


def _workers(workers: int | None) -> int:
    return max(1, workers if workers is not None else min(8, os.cpu_count() or 1))


def diff_state(new: Mapping[str, Any], old: Mapping[str, Any], *, encoding: str = "compact") -> dict[str, TensorChange]:
    """`TensorChange.between` for every tensor of `new` (bf16 tensors or their bits; `old` holds the same names),
    all their chunks queued at once on the codec's kernel pool (`codec.diff_many`: one thread per core, the kernels
    release the GIL). Tensors without a change are left out."""
    names = list(new)
    found = diff_many([(new[n], old[n]) for n in names], context=get_encoding(encoding).needs_base_context)
    return {n: TensorChange(tuple(new[n].shape), *f[:3], base=f[3]) for n, f in zip(names, found) if f[0].size}


def _largest_first(pool: ThreadPoolExecutor, fn, names: list[str], size) -> list:
    """`fn` over `names` on `pool`, the largest (by `size`) started first -- a big tensor started last (a tied
    embedding sorts after the layers) would run alone while the other threads idle -- results in `names`' order."""
    order = sorted(names, key=lambda n: -size(n))
    done = dict(zip(order, pool.map(fn, order)))
    return [done[n] for n in names]


@dataclass
class PatchFile:
    """A decoded anchor or delta. For deltas, `tensors` maps name -> DecodedTensor; for anchors -> dense bf16."""

    kind: str  # "anchor" | "delta"
    version: int
    base: int | None
    encoding: str | None
    shapes: dict[str, tuple[int, ...]]
    tensors: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def changed(self) -> int:
        if self.kind == "anchor":
            return sum(int(np.prod(s)) for s in self.shapes.values())
        return sum(t.count for t in self.tensors.values())


def encode_delta(changes: Mapping[str, TensorChange], *, version: int, base: int, total: int,
                 encoding: str = "compact", workers: int | None = None, verify: bool = False) -> bytes:
    """Serialise a delta. Only tensors with at least one changed element are stored.

    Each tensor gets the smallest of `encoding` and its `FALLBACKS`; tensors are coded on `workers` threads (numpy's
    sorts, packing, zstd and the codec's numba kernels release the GIL). `verify` decodes every tensor again and
    compares it before writing (twice the work; the codecs are lossless by construction and property-tested).
    """
    get_encoding(encoding)  # an unknown name fails here, not in a worker thread
    candidates = (encoding, *FALLBACKS.get(encoding, ()))
    names = [n for n in sorted(changes) if changes[n].positions.size]
    if len(names) > 1 and _workers(workers) > 1:
        with ThreadPoolExecutor(_workers(workers), thread_name_prefix="dws-encode") as pool:  # the file keeps its order
            coded = _largest_first(pool, lambda n: _encode_tensor(changes[n], candidates, verify), names,
                                   lambda n: changes[n].positions.size)
    else:
        coded = [_encode_tensor(changes[n], candidates, verify) for n in names]
    arrays: dict[str, np.ndarray] = {}
    values: set[str] = set()  # bf16 in the file (TRL's readers expect them so): numpy has no bf16
    info: dict[str, dict] = {}
    changed = 0
    for name, (used, out) in zip(names, coded):
        ch = changes[name]
        for suffix, arr in out.arrays.items():
            key = f"{name}.{suffix}" if suffix else name
            arrays[key] = np.ascontiguousarray(arr)
            if suffix == "values" and arr.dtype == np.uint16:
                values.add(key)
        info[name] = {"shape": list(ch.shape), "params": out.params}
        if used != encoding:
            info[name]["encoding"] = used
        changed += int(ch.positions.size)
    meta = {
        "format": DELTA_FORMAT,
        "dws_kind": "delta",
        "encoding": encoding,
        "version": str(version),
        "base": str(base),
        "changed": str(changed),
        "total": str(total),
        "tensors": json.dumps(info, separators=(",", ":")),
    }
    if encoding == "raw":
        # TRL's delta-sync readers look for exactly these keys.
        meta.update({"sparse": "True", "model_version": str(version), "changed_params": json.dumps(sorted(info))})
    return stfile.to_bytes(arrays, metadata=meta, bf16=frozenset(values))


def write_anchor(tensors: Mapping[str, torch.Tensor], dest: str | Path, *, version: int) -> int:
    """Write an anchor to a local file (anchors are model-sized: never held twice in memory). Returns its size."""
    for name, t in tensors.items():
        if t.dtype != torch.bfloat16:
            raise TypeError(f"anchor tensor {name} must be bf16, got {t.dtype}")
    return stfile.write(tensors, dest, metadata={"format": "pt", "dws_kind": "anchor", "version": str(version)})


def header_metadata(path: str | Path) -> dict[str, str]:
    """The `__metadata__` of a safetensors file, read from its header alone (no tensor is touched). The one header
    reader of the protocol: a hostile length prefix or a header that is not a JSON object is a FormatError."""
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise FormatError(f"{path.name}: not a safetensors file (truncated)")
        n = int.from_bytes(raw, "little")
        if n > MAX_HEADER_BYTES:
            raise FormatError(f"{path.name}: safetensors header of {n} bytes is larger than the {MAX_HEADER_BYTES} "
                              "allowed")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            raise FormatError(f"{path.name}: safetensors header is not valid JSON") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(header, dict) or not isinstance(meta or {}, dict) \
            or not all(isinstance(v, str) for v in (meta or {}).values()):
        raise FormatError(f"{path.name}: safetensors header is not a JSON object with string metadata")
    return dict(meta or {})


def _int(meta: Mapping[str, str], key: str, path: Path) -> int:
    try:
        return int(meta[key])
    except (KeyError, ValueError):
        raise FormatError(f"{path.name}: header metadata lacks an integer {key!r}") from None


def read_patch_file(path: str | Path, *, shapes: Mapping[str, tuple[int, ...]] | None = None,
                    base: int | None = None, allow_unknown_shapes: bool = False) -> PatchFile:
    """Decode an anchor or delta (ours or TRL's). `shapes` is needed only for TRL deltas, which do not store them;
    `allow_unknown_shapes` lets a caller that range-checks positions itself (the vLLM plugin) read them without.

    Raises FormatError for anything malformed; nothing is applied here, so a bad file can never be half-applied.
    A delta is decoded whole here; `DeltaReader` decodes one tensor at a time (memory bounded by one tensor).
    """
    path = Path(path)
    meta = header_metadata(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            kind = _kind_of(meta)
            if kind == "anchor":
                keys = list(f.keys())
                version = int(meta.get("version", meta.get("model_version", "0")))
                tensors = {k: f.get_tensor(k) for k in keys}
                bad = [k for k, t in tensors.items() if t.dtype != torch.bfloat16]
                if bad:
                    raise FormatError(f"{path.name}: anchor tensors must be bf16; {bad[:3]} are not")
                return PatchFile("anchor", version, None, None, {k: tuple(t.shape) for k, t in tensors.items()},
                                 tensors, meta)
    except SafetensorError as exc:
        raise FormatError(f"{path.name}: unreadable safetensors file ({exc})") from None
    with DeltaReader(path, shapes=shapes, base=base, allow_unknown_shapes=allow_unknown_shapes, meta=meta) as r:
        pf = r.header
        pf.tensors = dict(r)
        return pf


def _kind_of(meta: Mapping[str, str]) -> str:
    kind = meta.get("dws_kind")
    if kind is None and "sparse" in meta:  # TRL's layout
        kind = "delta" if meta["sparse"].lower() == "true" else "anchor"
    if kind is None:
        kind = "anchor"  # an ordinary checkpoint: every tensor in full
    return kind


class _PreadArrays:
    """A safetensors file's arrays read with ``pread`` into fresh numpy buffers (bf16 as uint16 bit patterns). Not
    ``safe_open(...).get_tensor``: that reads through a memory map, and every page read stays mapped -- counted in
    the process's resident memory -- until the file is closed, so reading a delta tensor by tensor still left the
    whole file resident (28 MB per 0.6B delta, most of what remained of the gateway's peak per sync). The header was
    already checked by ``safe_open``."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(str(path), os.O_RDONLY)
        try:
            n = int.from_bytes(os.pread(self._fd, 8, 0), "little")
            header = json.loads(os.pread(self._fd, n, 8))
            header.pop("__metadata__", None)
        except (ValueError, UnicodeDecodeError, AttributeError):
            self.close()
            raise FormatError(f"{path.name}: unreadable safetensors header") from None
        self._start, self._entries, self._name = 8 + n, header, path.name

    def dtype(self, key: str) -> str:
        return str(self._entries[key].get("dtype"))

    def get(self, key: str) -> np.ndarray:
        e = self._entries[key]
        dtype = stfile.ST_NUMPY.get(e.get("dtype"))
        if dtype is None:
            raise FormatError(f"{self._name}: {key} has an unsupported dtype {e.get('dtype')!r}")
        shape = tuple(int(s) for s in e["shape"])
        lo, hi = (int(x) for x in e["data_offsets"])
        out = np.empty(int(np.prod(shape)), dtype)
        view = memoryview(out).cast("B")
        if len(view) != hi - lo:
            raise FormatError(f"{self._name}: {key} holds {hi - lo} bytes for shape {shape}")
        done = 0
        while done < len(view):
            got = os.preadv(self._fd, [view[done:]], self._start + lo + done)
            if got <= 0:
                raise FormatError(f"{self._name}: truncated inside {key!r}")
            done += got
        return out.reshape(shape)

    def close(self) -> None:
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            os.close(fd)


class DeltaReader:
    """A delta file (dws or TRL layout) decoded one tensor at a time: ``header`` (a PatchFile with the version,
    base, encoding and every tensor's shape, and no tensors) is read and checked on opening; iterating yields
    ``(name, DecodedTensor | ContextTensor)`` in the file's order, each decoded only when reached -- a replica's
    memory for decoding is bounded by one tensor, not by the file; ``streamed()`` yields them undecoded, to be
    decoded slice by slice (bounded by one slice). Raises FormatError for anything malformed (an error in a later
    tensor surfaces during iteration: consumers must not treat earlier tensors as applied)."""

    def __init__(self, path: str | Path, *, shapes: Mapping[str, tuple[int, ...]] | None = None,
                 base: int | None = None, allow_unknown_shapes: bool = False,
                 meta: Mapping[str, str] | None = None) -> None:
        self.path = Path(path)
        meta = dict(meta) if meta is not None else header_metadata(self.path)
        kind = _kind_of(meta)
        if kind != "delta":
            raise FormatError(f"{self.path.name}: unknown dws_kind {kind!r}" if kind != "anchor" else
                              f"{self.path.name}: an anchor, not a delta")
        try:
            self._f = safe_open(str(self.path), framework="pt")  # checks the header; arrays are read by _arrays
            self._keys = list(self._f.keys())
        except SafetensorError as exc:
            raise FormatError(f"{self.path.name}: unreadable safetensors file ({exc})") from None
        self._arrays = _PreadArrays(self.path)
        if meta.get("format") == DELTA_FORMAT:
            self.header, self._plan = _dws_delta_header(meta, self.path)
            self._trl = False
        else:
            self.header, self._plan = _trl_delta_header(self._keys, meta, self.path, shapes, base,
                                                        allow_unknown_shapes)
            self._trl = True
        # No bound method kept on self (a `self._decode = self._decode_dws` would be one): it makes the reader a
        # reference cycle, and `read_patch_file`'s PatchFile (`header`) with every decoded array would then live
        # until the garbage collector's next run -- the codec's recycled buffers (`codec_buffers`) not returned, so
        # the next delta decoded into fresh pages: measured at 0.6B, 0-44 k page faults per decode, 200-410 ms.

    def __enter__(self) -> "DeltaReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        f, self._f = getattr(self, "_f", None), None
        if f is not None and hasattr(f, "__exit__"):
            f.__exit__(None, None, None)
        arrays, self._arrays = getattr(self, "_arrays", None), None
        if arrays is not None:
            arrays.close()

    def __iter__(self):
        try:
            for name, spec in self._plan.items():
                yield name, self._decode_trl(name, spec) if self._trl else self._decode_dws(name, spec)
        except SafetensorError as exc:
            raise FormatError(f"{self.path.name}: unreadable safetensors file ({exc})") from None

    def streamed(self):
        """Like iterating, but each tensor that does not need its base comes as a `codec.StreamedTensor`: read, not
        decoded, and decoded slice by slice by whoever consumes it (e.g. a replica writing its prepared file) -- so
        a replica's memory for decoding is bounded by one slice plus one tensor's *encoded* arrays, not by one
        tensor's decoded positions (int64: 8 bytes per changed element, before the decoder's temporaries)."""
        try:
            for name, spec in self._plan.items():
                yield name, self._read(name, spec)
        except SafetensorError as exc:
            raise FormatError(f"{self.path.name}: unreadable safetensors file ({exc})") from None

    def _read(self, name: str, spec):
        if self._trl:
            numel = int(np.prod(spec))
            arrays = self._trl_arrays(name)
            return StreamedTensor("raw", arrays, {}, numel, int(arrays["indices"].size))
        shape, params, enc = spec
        arrays = self._dws_arrays(name)
        numel = int(np.prod(shape))
        if enc.needs_base_context:
            return ContextTensor(enc.name, arrays, params, numel)
        if enc.name == "raw":
            count = int(arrays["indices"].size) if "indices" in arrays else 0
        else:
            try:
                count = int(params["n"])
            except (KeyError, TypeError, ValueError):
                raise FormatError(f"{self.path.name}: {name} lacks its element count") from None
        return StreamedTensor(enc.name, arrays, params, numel, count)

    def _dws_arrays(self, name: str) -> dict[str, np.ndarray]:
        arrays = {}
        for key in self._keys:
            if key == name or (key.startswith(name + ".") and "." not in key[len(name) + 1:]):
                suffix = key[len(name) + 1:] if key != name else ""
                arrays[suffix] = self._arrays.get(key)
        return arrays

    def _trl_arrays(self, name: str) -> dict[str, np.ndarray]:
        got = self._arrays.dtype(f"{name}.values")
        if got != "BF16":
            raise FormatError(f"{self.path.name}: {name}.values must be bf16, got {got}")
        return {"indices": self._arrays.get(f"{name}.indices").reshape(-1),
                "values": self._arrays.get(f"{name}.values").reshape(-1)}

    def _decode_dws(self, name: str, spec):
        shape, params, enc = spec
        arrays = self._dws_arrays(name)
        numel = int(np.prod(shape))
        # A tensor coded against its base's context decodes once the caller supplies that base (resolve_context).
        return ContextTensor(enc.name, arrays, params, numel) if enc.needs_base_context else \
            enc.decode(arrays, params, numel)

    def _decode_trl(self, name: str, shape):
        numel = int(np.prod(shape))
        arrays = self._trl_arrays(name)
        dec = get_encoding("raw").decode(arrays, {}, numel)
        # TRL writes positions in the order torch.nonzero returns them (sorted); re-check anyway.
        check_positions(dec.positions, numel)
        return dec


def _dws_delta_header(meta, path) -> tuple[PatchFile, dict]:
    version, base = _int(meta, "version", path), _int(meta, "base", path)
    if base >= version:
        raise FormatError(f"{path.name}: base {base} is not older than version {version}")
    file_enc = get_encoding(meta.get("encoding", "")).name
    try:
        info = json.loads(meta["tensors"])
        assert isinstance(info, dict)
    except (KeyError, ValueError, AssertionError):
        raise FormatError(f"{path.name}: header metadata 'tensors' is missing or not a JSON object") from None
    plan, shapes = {}, {}
    for name, entry in info.items():
        try:
            shape = tuple(int(s) for s in entry["shape"])
            params = dict(entry.get("params", {}))
            enc = get_encoding(str(entry.get("encoding", file_enc)))
        except (KeyError, TypeError, ValueError, AttributeError):
            raise FormatError(f"{path.name}: bad entry for tensor {name!r}") from None
        if any(s < 0 for s in shape):
            raise FormatError(f"{path.name}: negative dimension in {name!r}")
        plan[name] = (shape, params, enc)
        shapes[name] = shape
    return PatchFile("delta", version, base, file_enc, shapes, {}, dict(meta)), plan


def resolve_context(pf: PatchFile, bases: Mapping[str, Any], *, workers: int | None = None) -> PatchFile:
    """Decode, in place, every tensor of `pf` that needs its base: `bases[name]` is that tensor's current (base)
    weights -- bf16 torch on any device, or uint16 bit patterns. Returns `pf`. On the codec's kernel pool (a thread
    per core); ``workers=1`` decodes on the calling thread alone.
    Raises FormatError (nothing applied) when a tensor does not fit its base."""
    # Largest first: a big tensor started last (a tied embedding sorts after the layers) runs alone while the other
    # threads have nothing left (measured at 0.6B, 2 threads: 645 vs 706 ms median model-wide decode).
    pending = sorted((n for n, t in pf.tensors.items() if t.needs_base_context), key=lambda n: -pf.tensors[n].numel)
    missing = [n for n in pending if n not in bases]
    if missing:
        raise FormatError(f"v{pf.version}: no base weights for {missing[:3]}")

    def one(i: int):
        base = bases[pending[i]]
        return pf.tensors[pending[i]].decode(base.reshape(-1) if hasattr(base, "reshape") else base)

    if len(pending) > 1 and _workers(workers) > 1:
        # The codec's kernel pool (it starts calls in index order: largest first), not a pool per call: two fresh
        # threads per delta faulted in their stacks, ~1.7 k pages per 0.6B decode.
        decoded = _kernels().run_chunks(one, len(pending))
    else:
        decoded = [one(i) for i in range(len(pending))]
    pf.tensors.update(zip(pending, decoded))
    return pf


def _trl_delta_header(keys, meta, path, shapes, base, allow_unknown_shapes) -> tuple[PatchFile, dict]:
    version = _int(meta, "model_version", path)
    try:
        names = json.loads(meta.get("changed_params", "null"))
    except ValueError:
        names = None
    if names is None:
        names = sorted({k[: -len(".indices")] for k in keys if k.endswith(".indices")})
    if shapes is None and not allow_unknown_shapes:
        raise FormatError(f"{path.name}: a TRL-layout delta does not store shapes; pass the model's shapes")
    plan, out_shapes = {}, {}
    for name in names:
        if shapes is None:
            # The caller (the vLLM plugin) range-checks against the served model, which knows every shape.
            shape = (2**62,)
        elif name not in shapes:
            raise FormatError(f"{path.name}: tensor {name!r} is not part of the model")
        else:
            shape = tuple(shapes[name])
        if f"{name}.indices" not in keys or f"{name}.values" not in keys:
            raise FormatError(f"{path.name}: tensor {name!r} lacks .indices or .values")
        plan[name] = shape
        if shapes is not None:
            out_shapes[name] = shape
    return PatchFile("delta", version, base if base is not None else version - 1, "trl-raw", out_shapes, {},
                     dict(meta)), plan


def file_kind_summary(pf: PatchFile, nbytes: int) -> dict:
    """What `dws inspect` prints."""
    changed = pf.changed
    return {
        "kind": pf.kind,
        "version": pf.version,
        "base": pf.base,
        "encoding": pf.encoding,
        "tensors": len(pf.tensors),
        "changed_elements": changed,
        "bytes": nbytes,
        "bytes_per_changed_element": round(nbytes / changed, 4) if changed else None,
    }


def read_for_replica(path: str) -> PatchFile:
    """The decoder the vLLM plugin uses (`decoder="shared.formats:read_for_replica"`): shapes come from the served
    model, against which the plugin validates every name and position before writing."""
    return read_patch_file(path, allow_unknown_shapes=True)
